//! The WebSocket gateway: upgrade, token extraction, the readiness wait, and per
//! connection one task that writes what the connection's outbox holds and reads and
//! handles the client's frames one at a time.
//! It enforces the frame-size, rate and per-user connection limits and the heartbeat,
//! answers every bad frame with an `error` frame, and never touches the database or the
//! agent directly: it calls the supervisor and delivery only.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;

use crate::agent::StartError;
use crate::analytics::{self, SessionRow};
use crate::auth::AuthError;
use crate::delivery::{CloseReason, Connection, QueueLimit};
use crate::protocol::{self, ClientMessage, ErrorCode, Frame, ProtocolError};
use crate::rate::RateWindow;
use crate::store::StoreError;
use crate::telemetry::metric;
use crate::{App, Shared};

/// Bytes read from a socket at a time, and the read buffer an idle connection keeps.
/// Chat frames are a few hundred bytes; a larger frame grows the buffer while it is read.
const READ_BUFFER: usize = 256;

const CLOSE_IDLE: CloseReason = CloseReason { code: 1001, reason: "idle timeout" };
const CLOSE_TOO_BIG: CloseReason = CloseReason { code: 1009, reason: "frame too large" };
const CLOSE_PROTOCOL: CloseReason = CloseReason { code: 1002, reason: "protocol error" };
const CLOSE_BAD_DATA: CloseReason = CloseReason { code: 1007, reason: "invalid UTF-8" };
const CLOSE_STARTUP: CloseReason = CloseReason { code: 1011, reason: "service startup incomplete" };
const CLOSE_BUSY: CloseReason = CloseReason { code: 1013, reason: "try again later" };

/// Where the token came from; the first source present is the only one used (§1.2).
fn extract_token(headers: &HeaderMap, offered: &[String], query: Option<&str>) -> Result<String, AuthError> {
    if let Some(value) = headers.get(axum::http::header::AUTHORIZATION) {
        let value = value.to_str().map_err(|_| AuthError::Malformed)?;
        return value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Malformed);
    }
    if let Some(encoded) = offered.iter().find_map(|p| p.strip_prefix("jwt.")) {
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let bytes = engine.decode(encoded.trim_end_matches('=')).map_err(|_| AuthError::Malformed)?;
        return String::from_utf8(bytes).map_err(|_| AuthError::Malformed);
    }
    if let Some(query) = query {
        for pair in query.split('&') {
            if let Some(token) = pair.strip_prefix("token=") {
                return Ok(token.to_string());
            }
        }
    }
    Err(AuthError::Missing)
}

fn offered_protocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// `GET /ws` and its aliases.
pub(crate) async fn upgrade(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    ws: WebSocketUpgrade,
) -> Response {
    if shared.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({"detail": "server is shutting down"})))
            .into_response();
    }
    if !origin_allowed(&shared.config.ws_origins, &headers) {
        metrics::counter!(metric::AUTH_FAILURES, "reason" => "origin").increment(1);
        return (StatusCode::FORBIDDEN, axum::Json(serde_json::json!({"detail": "this origin may not open a socket"})))
            .into_response();
    }
    let offered = offered_protocols(&headers);
    let token = extract_token(&headers, &offered, query.as_deref());
    let mut ws = limited(ws, &shared);
    // A browser aborts the handshake unless one protocol it offered is selected (§1.2).
    // Only the Netra web client offers `jwt-auth`; netra's own page offers `netra`.
    let web_client = offered.iter().any(|p| p == WEB_CLIENT_PROTOCOL);
    if web_client {
        ws = ws.protocols([WEB_CLIENT_PROTOCOL]);
    } else if offered.iter().any(|p| p == NETRA_PROTOCOL) {
        ws = ws.protocols([NETRA_PROTOCOL]);
    }
    // The socket goes straight into a box: a value moved from one async frame into
    // another keeps its slot in both, and an idle connection is mostly its task's frames.
    ws.on_failed_upgrade(|e| tracing::debug!(error = %e, "websocket upgrade failed"))
        .on_upgrade(move |socket| Box::pin(session(shared, Box::new(socket), token, web_client)))
}

/// An upgrade with the limits every socket has: frame size and read buffer.
fn limited(ws: WebSocketUpgrade, shared: &Shared) -> WebSocketUpgrade {
    let limit = shared.config.limits.max_frame_bytes;
    ws.max_message_size(limit).max_frame_size(limit).read_buffer_size(READ_BUFFER)
}

/// Whether a browser page from the request's `Origin` may open a socket: its own page
/// (same host), a listed origin, or any when the list is `*`. Clients that are not
/// browsers send no `Origin` and are judged by their token alone.
fn origin_allowed(allowed: &Option<Vec<String>>, headers: &HeaderMap) -> bool {
    let Some(list) = allowed else { return true };
    let Some(origin) = headers.get(axum::http::header::ORIGIN).and_then(|v| v.to_str().ok()) else { return true };
    let origin = origin.trim_end_matches('/');
    let host = headers.get(axum::http::header::HOST).and_then(|v| v.to_str().ok());
    let same_host = origin.split_once("://").is_some_and(|(_, rest)| Some(rest) == host);
    same_host || list.iter().any(|o| o.eq_ignore_ascii_case(origin))
}

/// `GET /ws/echo`, served only with `NETRA_ECHO_ROUTE`: every data frame comes back.
/// Conformance suites (Autobahn) test the WebSocket layer through it: the limits, the
/// read-error close codes and the close handshake are those of `/ws`.
pub(crate) async fn echo(State(shared): State<Arc<Shared>>, ws: WebSocketUpgrade) -> Response {
    if !shared.config.echo_route {
        return (StatusCode::NOT_FOUND, axum::Json(serde_json::json!({"detail": "not found"}))).into_response();
    }
    let idle = shared.config.limits.idle_timeout;
    limited(ws, &shared).on_upgrade(move |socket| Box::pin(echo_session(socket, idle)))
}

async fn echo_session(mut socket: WebSocket, idle: Duration) {
    loop {
        let Ok(message) = tokio::time::timeout(idle, socket.next()).await else {
            close_now(&mut socket, CLOSE_IDLE).await;
            return;
        };
        let reply = match message {
            Some(Ok(Message::Text(t))) => Message::Text(t),
            Some(Ok(Message::Binary(b))) => Message::Binary(b),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Err(e)) => {
                if let Inbound::Close(reason) = read_failed(e) {
                    close_now(&mut socket, reason).await;
                }
                return;
            }
            None | Some(Ok(Message::Close(_))) => {
                let _ = tokio::time::timeout(CLOSE_GRACE, socket.flush()).await;
                return;
            }
        };
        if socket.send(reply).await.is_err() {
            return;
        }
    }
}

/// The subprotocol the Netra web client offers beside its token. Its sockets are paced
/// and trimmed to what that client can follow (docs/protocol.md).
const WEB_CLIENT_PROTOCOL: &str = "jwt-auth";
/// The subprotocol of netra's own page: full-speed streaming.
const NETRA_PROTOCOL: &str = "netra";

/// One connection's task. It holds the socket and little else while idle: the steps
/// before the loop, each frame's handling and each write live in boxes of their own.
async fn session(shared: Arc<Shared>, mut socket: Box<WebSocket>, token: Result<String, AuthError>, web_client: bool) {
    let _tracked = shared.connections.token();
    let opened = (std::time::Instant::now(), analytics::unix_now());
    let Some((app, conn, hello)) = Box::pin(open(&shared, &mut socket, token, web_client)).await else { return };
    let mut traffic = Traffic { frames_out: 1, bytes_out: hello as u64, ..Traffic::default() };
    app.delivery.broker().hold(&conn.user_id);
    let close_code = serve(&app, &shared, &conn, &mut socket, &mut traffic).await;
    app.delivery.registry.unregister(&conn);
    app.delivery.broker().release(&conn.user_id);
    conn.finish();
    if app.analytics.is_on() && *conn.user_id != *crate::selftest::USER {
        app.analytics.record(SessionRow {
            opened_at: opened.1,
            closed_at: analytics::unix_now(),
            connection_id: conn.id.clone(),
            user_id: conn.user_id.to_string(),
            node: app.analytics.node().to_string(),
            client: if web_client { "web_client" } else { "netra" },
            close_code,
            frames_in: traffic.frames_in,
            frames_out: traffic.frames_out,
            bytes_in: traffic.bytes_in,
            bytes_out: traffic.bytes_out,
            duration_ms: analytics::millis(opened.0.elapsed()),
        });
    }
}

/// Data frames and their bytes each way on one socket, for its analytics row.
#[derive(Default)]
struct Traffic {
    frames_in: u64,
    frames_out: u64,
    bytes_in: u64,
    bytes_out: u64,
}

/// The close code of a socket whose transport went without a close frame (RFC 6455 §7.1.5).
const CLOSED_ABNORMALLY: u16 = 1006;

async fn close_now(socket: &mut WebSocket, reason: CloseReason) {
    metrics::counter!(metric::WS_CLOSES, "code" => reason.code.to_string()).increment(1);
    close_socket(socket, reason).await;
}

/// Sends the close frame and waits briefly for the client's reply, so the close is clean
/// on both sides.
async fn close_socket(socket: &mut WebSocket, reason: CloseReason) {
    let frame = CloseFrame { code: reason.code, reason: Utf8Bytes::from_static(reason.reason) };
    let _ = tokio::time::timeout(CLOSE_GRACE, socket.send(Message::Close(Some(frame)))).await;
    let _ = tokio::time::timeout(CLOSE_GRACE, async { while let Some(Ok(_)) = socket.next().await {} }).await;
}

/// Everything between the upgrade and the first frame: readiness, the token, the
/// per-user limit, the hello (its length is returned). `None` when the socket was
/// closed instead.
async fn open(
    shared: &Arc<Shared>,
    socket: &mut WebSocket,
    token: Result<String, AuthError>,
    web_client: bool,
) -> Option<(Arc<App>, Arc<Connection>, usize)> {
    metrics::counter!(metric::WS_CONNECTIONS_TOTAL).increment(1);
    let Some(app) = shared.wait_for_app().await else {
        close_now(socket, CLOSE_STARTUP).await;
        return None;
    };
    let verified = match token {
        Ok(t) => app.keys.authenticate(&t).await,
        Err(e) => Err(e),
    };
    let user = match verified {
        Ok(user) => user,
        Err(e) => {
            metrics::counter!(metric::AUTH_FAILURES, "reason" => e.reason()).increment(1);
            let (code, reason) = match e {
                AuthError::Expired => (ErrorCode::TokenExpired, "Token expired"),
                _ => (ErrorCode::Unauthorized, "unauthorized"),
            };
            app.analytics.record_error("", code.as_str(), "socket", "", "");
            let frame = protocol::error_frame(&ProtocolError::new(code, e.to_string()));
            let _ = socket.send(Message::Text(frame.into())).await;
            close_now(socket, CloseReason { code: 1008, reason }).await;
            return None;
        }
    };
    let limits = &shared.config.limits;
    let conn_id = format!("c_{}", uuid::Uuid::now_v7().simple());
    let queue = QueueLimit { frames: limits.send_queue, bytes: limits.send_queue_bytes };
    let conn = Connection::new(conn_id, Arc::from(user.id.as_str()), queue, web_client);
    if app.delivery.registry.register(&conn, limits.connections_per_user).is_err() {
        close_now(socket, CLOSE_BUSY).await;
        return None;
    }
    // Recording the user is bookkeeping (no row refers to it), so it stays off the path to
    // the first frame: a connection storm is not a storm of awaited writes.
    let store = app.store.clone();
    app.tasks.spawn(async move {
        if let Err(e) = store.upsert_user(&user.id, user.email.as_deref(), user.name.as_deref()).await {
            tracing::warn!(user_id = %user.id, error = %e, "could not record the user");
        }
    });
    let hello = protocol::connection_established(
        &conn.id,
        &conn.user_id,
        limits.heartbeat_interval.as_secs(),
        limits.max_frame_bytes,
    );
    let hello_bytes = hello.len();
    if socket.send(Message::Text(hello.into())).await.is_err() {
        app.delivery.registry.unregister(&conn);
        return None;
    }
    if web_client {
        // The client processes the first frame of a type it knows when a chat view mounts
        // again; this one is that frame, instead of the first run's `agent_started`.
        conn.send(protocol::web_client_ready(&conn.id, &conn.user_id)).await;
    }
    Some((app, conn, hello_bytes))
}

/// How long a write may still take once a close is decided: a client that reads gets its
/// last frames and the close frame; one that stopped reading is dropped after this.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// A frame being handled: the next one is read once it is done, so a connection's
/// frames are handled in order and a client cannot pile up work.
type Handling<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// The connection's loop, one task: writes what the outbox holds (everything pending in
/// one flush), reads and handles frames one at a time, pings on the heartbeat, closes
/// after the idle timeout or when asked to. Returns the close code sent or received.
async fn serve(
    app: &App,
    shared: &Shared,
    conn: &Arc<Connection>,
    socket: &mut WebSocket,
    traffic: &mut Traffic,
) -> u16 {
    let limits = &shared.config.limits;
    let mut rate = RateWindow::new(limits.rate_limit, limits.rate_window);
    let mut idle_at = Instant::now() + limits.idle_timeout;
    let mut ping_at = Instant::now() + limits.heartbeat_interval;
    let mut handling: Option<Handling<'_>> = None;
    let mut batch = Vec::new();
    let pace = if conn.web_client { limits.web_client_pace } else { Duration::ZERO };
    // When the next frame of a paced socket may go, and whether frames wait for it.
    let (mut paced_until, mut held) = (Instant::now(), false);
    let timer = tokio::time::sleep_until(ping_at.min(idle_at));
    tokio::pin!(timer);
    loop {
        let close = if pace.is_zero() {
            conn.take(&mut batch)
        } else {
            let now = Instant::now();
            let (close, left) = conn.take_while(&mut batch, |_| {
                let go = now >= paced_until;
                if go {
                    paced_until = now + pace;
                }
                go
            });
            held = left;
            close
        };
        if !batch.is_empty() {
            metrics::counter!(metric::FRAMES_OUT).increment(batch.len() as u64);
            traffic.frames_out += batch.len() as u64;
            traffic.bytes_out += batch.iter().map(|f| f.len() as u64).sum::<u64>();
            let frames = std::mem::take(&mut batch);
            let write = async {
                for frame in frames {
                    socket.feed(text_message(frame)).await?;
                }
                socket.flush().await
            };
            // Boxed, like every step but the wait itself: the idle task stays small.
            if !matches!(Box::pin(write_unless_stuck(conn, limits.idle_timeout, write)).await, Some(Ok(()))) {
                return CLOSED_ABNORMALLY;
            }
            continue;
        }
        if let Some(reason) = close {
            Box::pin(close_socket(socket, reason)).await;
            return reason.code;
        }
        let wake_at = ping_at.min(idle_at);
        timer.as_mut().reset(if held { wake_at.min(paced_until) } else { wake_at });
        tokio::select! {
            biased;
            () = conn.woken() => {}
            () = async { handling.as_mut().expect("guarded").await }, if handling.is_some() => {
                handling = None;
                // Time spent handling a frame (a commit, a slow database) is not idleness.
                idle_at = Instant::now() + limits.idle_timeout;
            }
            message = socket.next(), if handling.is_none() => {
                idle_at = Instant::now() + limits.idle_timeout;
                if let Some(Ok(Message::Text(t))) = &message {
                    traffic.frames_in += 1;
                    traffic.bytes_in += t.len() as u64;
                } else if let Some(Ok(Message::Binary(b))) = &message {
                    traffic.frames_in += 1;
                    traffic.bytes_in += b.len() as u64;
                }
                match inbound(app, conn, &mut rate, message) {
                    Inbound::Handle(work) => handling = Some(work),
                    Inbound::Skip => {}
                    Inbound::Close(reason) => conn.close(reason),
                    Inbound::Gone(code) => {
                        // Sends tungstenite's reply to a client's close frame, if there was one.
                        let _ = Box::pin(tokio::time::timeout(CLOSE_GRACE, socket.flush())).await;
                        return code;
                    }
                }
            }
            () = &mut timer => {
                let now = Instant::now();
                if now >= idle_at && handling.is_some() {
                    // A frame being handled (a slow commit) is activity, not idleness.
                    idle_at = now + limits.idle_timeout;
                } else if now >= idle_at {
                    conn.close(CLOSE_IDLE);
                } else if now >= ping_at {
                    ping_at = now + limits.heartbeat_interval;
                    let ping = socket.send(Message::Ping(Bytes::new()));
                    if !matches!(Box::pin(write_unless_stuck(conn, limits.idle_timeout, ping)).await, Some(Ok(()))) {
                        return CLOSED_ABNORMALLY;
                    }
                }
            }
        }
    }
}

/// A frame from the outbox as the socket's text message. Its bytes are checked once more
/// (tens of nanoseconds): the WebSocket library takes text only as checked UTF-8.
fn text_message(frame: Frame) -> Message {
    Message::Text(Utf8Bytes::try_from(frame.into_bytes()).expect("a frame is only ever made from a str"))
}

/// Runs a socket write to completion, unless it is stuck (`None`: give up on the socket):
/// once a close is decided (before or while it is blocked) it gets [`CLOSE_GRACE`]; any
/// write gets `limit` at most, for a client that stopped reading when nothing else
/// happens on the connection.
async fn write_unless_stuck<T>(
    conn: &Connection,
    limit: Duration,
    write: impl std::future::Future<Output = T>,
) -> Option<T> {
    let bounded = tokio::time::timeout(limit, write);
    tokio::pin!(bounded);
    loop {
        if conn.close_requested() {
            return tokio::time::timeout(CLOSE_GRACE, bounded).await.ok().and_then(Result::ok);
        }
        tokio::select! {
            r = &mut bounded => return r.ok(),
            () = conn.woken() => {}
        }
    }
}

enum Inbound<'a> {
    Handle(Handling<'a>),
    Skip,
    Close(CloseReason),
    /// The client closed (with this code; 1005 when its close frame had none) or its
    /// transport went (1006).
    Gone(u16),
}

/// What to do about one read from the socket.
fn inbound<'a>(
    app: &'a App,
    conn: &'a Arc<Connection>,
    rate: &mut RateWindow,
    message: Option<Result<Message, axum::Error>>,
) -> Inbound<'a> {
    let text = match message {
        None => return Inbound::Gone(CLOSED_ABNORMALLY),
        Some(Ok(Message::Close(frame))) => return Inbound::Gone(frame.map_or(1005, |f| f.code)),
        Some(Err(e)) => return read_failed(e),
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => return Inbound::Skip,
        Some(Ok(Message::Binary(_))) => None,
        Some(Ok(Message::Text(t))) => Some(t),
    };
    metrics::counter!(metric::FRAMES_IN).increment(1);
    let reply = |error: ProtocolError| -> Inbound<'a> { Inbound::Handle(Box::pin(reply_error(app, conn, error))) };
    // Parsed before the rate check, so even a refused frame's error names its reference.
    let parsed = text.map(|t| protocol::parse_client_frame(t.as_str()));
    if !rate.allow() {
        let mut e = ProtocolError::new(ErrorCode::RateLimited, "too many frames; this one was not processed");
        e.reference = match parsed {
            Some(Ok(inbound)) => inbound.reference,
            Some(Err(refused)) => refused.reference,
            None => None,
        };
        return reply(e);
    }
    let Some(parsed) = parsed else {
        return reply(ProtocolError::new(ErrorCode::InvalidJson, "binary frames are not part of the protocol"));
    };
    match parsed {
        Ok(inbound) => Inbound::Handle(Box::pin(async move {
            if let Err(mut e) = handle(app, conn, inbound.message).await {
                e.reference = inbound.reference;
                reply_error(app, conn, e).await;
            }
        })),
        Err(e) => reply(e),
    }
}

/// How a failed read ends the socket (RFC 6455 §7.4.1): a frame that breaks the
/// protocol closes 1002, text that is not UTF-8 closes 1007, an oversized one 1009. A
/// transport that is already gone gets no close frame.
fn read_failed(e: axum::Error) -> Inbound<'static> {
    use tokio_tungstenite::tungstenite::error::{Error, ProtocolError as WsError};
    let inner = e.into_inner();
    match inner.downcast_ref::<Error>() {
        Some(Error::Capacity(_)) => Inbound::Close(CLOSE_TOO_BIG),
        Some(Error::Utf8(_)) => Inbound::Close(CLOSE_BAD_DATA),
        Some(Error::Protocol(WsError::ResetWithoutClosingHandshake)) => Inbound::Gone(CLOSED_ABNORMALLY),
        Some(Error::Protocol(_)) => Inbound::Close(CLOSE_PROTOCOL),
        _ => Inbound::Gone(CLOSED_ABNORMALLY),
    }
}

async fn reply_error(app: &App, conn: &Connection, error: ProtocolError) {
    metrics::counter!(metric::PROTOCOL_ERRORS, "code" => error.code.as_str()).increment(1);
    app.analytics.record_error(&conn.user_id, error.code.as_str(), "socket", "", "");
    conn.send(protocol::error_frame(&error)).await;
}

/// Checks that `thread_id` is a live thread of the connection's user.
async fn owned(app: &App, conn: &Connection, thread_id: &str) -> Result<(), ProtocolError> {
    app.store.check_owner(&conn.user_id, thread_id).await.map_err(lookup_failed)
}

/// Like [`owned`], and the thread's last committed `seq`.
async fn owned_last_seq(app: &App, conn: &Connection, thread_id: &str) -> Result<u64, ProtocolError> {
    let thread = app.store.owned_thread(&conn.user_id, thread_id).await.map_err(lookup_failed)?;
    Ok(thread.last_seq.max(0) as u64)
}

/// A foreign thread and a missing one look the same to the client.
fn thread_not_found() -> ProtocolError {
    ProtocolError::new(ErrorCode::Forbidden, "thread not found")
}

fn lookup_failed(e: StoreError) -> ProtocolError {
    if matches!(e, StoreError::NotFound | StoreError::NotOwner) {
        return thread_not_found();
    }
    tracing::warn!(error = %e, "thread lookup failed");
    ProtocolError::new(ErrorCode::Internal, "could not read the thread; try again")
}

async fn handle(app: &App, conn: &Arc<Connection>, message: ClientMessage) -> Result<(), ProtocolError> {
    match message {
        ClientMessage::Chat { text, thread_id } => {
            if let Some(t) = &thread_id {
                conn.follow_default(t);
            }
            match app.supervisor.start(&conn.user_id, thread_id.as_deref(), &text).await {
                Ok(_) => Ok(()),
                Err(e) => Err(start_error(e)),
            }
        }
        ClientMessage::Stop { run_id, thread_id } => {
            app.supervisor.stop(&conn.user_id, run_id.as_deref(), thread_id.as_deref());
            // The run may be on another node.
            app.delivery.broker().publish_stop(&conn.user_id, run_id.as_deref(), thread_id.as_deref());
            Ok(())
        }
        ClientMessage::SwitchThread { thread_id } => owned(app, conn, &thread_id).await,
        ClientMessage::Ping { timestamp } => {
            // The web client ignores pongs (its handler is dead code), and every frame it
            // keeps counts against its cap of 500: one ping every 15 s would fill it.
            if !conn.web_client {
                conn.send(protocol::pong(timestamp.as_ref())).await;
            }
            Ok(())
        }
        ClientMessage::Subscribe { thread_id, after_seq } => {
            let last_seq = owned_last_seq(app, conn, &thread_id).await?;
            if after_seq > last_seq {
                // Live delivery drops what is not past `after_seq`: accepting it would mute
                // the thread on this socket until its seq caught up.
                let message = format!("after_seq {after_seq} is past the thread's last seq {last_seq}");
                return Err(ProtocolError::new(ErrorCode::InvalidField, message));
            }
            let delivery = app.delivery.clone();
            let conn = conn.clone();
            app.tasks.spawn(async move {
                if let Err(e) = delivery.replay(&conn, &thread_id, after_seq).await {
                    tracing::warn!(error = %e, "replay failed");
                    let error = ProtocolError::new(ErrorCode::Internal, "could not replay the thread; subscribe again");
                    conn.send(protocol::error_frame(&error)).await;
                }
            });
            Ok(())
        }
        ClientMessage::Unsubscribe { thread_id } => {
            // Only the user's threads: each mute is kept for the life of the connection.
            owned(app, conn, &thread_id).await?;
            conn.mute(&thread_id);
            Ok(())
        }
        ClientMessage::Ignored => Ok(()),
    }
}

/// The one mapping from a refused run to its §6c code.
pub(crate) fn start_error(e: StartError) -> ProtocolError {
    match e {
        StartError::Forbidden => ProtocolError::new(ErrorCode::Forbidden, "thread not found"),
        StartError::Busy => ProtocolError::new(ErrorCode::Busy, "too many runs in progress; wait for one to finish"),
        StartError::ShuttingDown => ProtocolError::new(ErrorCode::Internal, "the server is shutting down; reconnect"),
        StartError::Delivery(e) => {
            tracing::warn!(error = %e, "could not start a run");
            ProtocolError::new(ErrorCode::Internal, "could not save your message; try again")
        }
        StartError::Store(e) => {
            tracing::warn!(error = %e, "could not start a run");
            ProtocolError::new(ErrorCode::Internal, "could not save your message; try again")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Any header, subprotocol list or query string yields a token or an auth error,
        /// never a panic.
        #[test]
        fn any_token_source_is_read_without_a_panic(
            header in proptest::prelude::any::<String>(),
            protocols in proptest::collection::vec(proptest::prelude::any::<String>(), 0..4),
            query in proptest::option::of(proptest::prelude::any::<String>()),
        ) {
            let mut headers = HeaderMap::new();
            if let Ok(value) = header.parse() {
                headers.insert(axum::http::header::AUTHORIZATION, value);
            }
            let _ = extract_token(&headers, &protocols, query.as_deref());
        }
    }

    #[test]
    fn the_first_token_source_present_wins() {
        let mut h = HeaderMap::new();
        let sub = vec![
            "jwt-auth".to_string(),
            format!("jwt.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("from-proto")),
        ];
        assert_eq!(extract_token(&h, &sub, Some("token=from-query")), Ok("from-proto".into()));
        assert_eq!(extract_token(&h, &[], Some("a=1&token=from-query")), Ok("from-query".into()));
        h.insert("authorization", "Bearer from-header".parse().expect("header"));
        assert_eq!(extract_token(&h, &sub, Some("token=q")), Ok("from-header".into()));
        h.insert("authorization", "Basic abc".parse().expect("header"));
        assert_eq!(extract_token(&h, &sub, None), Err(AuthError::Malformed));
        assert_eq!(extract_token(&HeaderMap::new(), &[], None), Err(AuthError::Missing));
    }
}
