//! Every limit and every bad input of PROTOCOL.md §1.5, §1.6, §6c and §6e, crossed on
//! the real binary with the limit lowered through its environment variable, and the
//! exact outcome asserted: the error code, the close code and reason, or the metric.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Auth, Client, Closed, Server, Spawn, WAIT, types};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Reads the next frame and asserts it is a protocol error with `code`: no `seq`, no
/// `thread_id`, and `error_message` repeating `message` (§6c).
async fn expect_error(client: &mut Client, code: &str) -> Value {
    let frame = client.next().await;
    assert_protocol_error(&frame, code);
    frame
}

fn assert_protocol_error(frame: &Value, code: &str) {
    assert_eq!(frame["type"], "error", "{frame}");
    assert_eq!(frame["payload"]["code"], code, "{frame}");
    assert!(frame.get("seq").is_none(), "protocol errors have no seq: {frame}");
    assert!(frame.get("thread_id").is_none(), "protocol errors are not thread-scoped: {frame}");
    let message = frame["payload"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{frame}");
    assert_eq!(frame["payload"]["error_message"], frame["payload"]["message"], "{frame}");
}

/// Proves the socket is still open and answering: an app-level ping gets its pong.
async fn assert_alive(client: &mut Client, stamp: u64) {
    client.send(json!({"type": "ping", "timestamp": stamp})).await;
    let pong = client.next().await;
    assert_eq!(pong["type"], "pong", "{pong}");
    assert_eq!(pong["payload"]["client_timestamp"], json!(stamp), "{pong}");
}

async fn create_thread(server: &Server, user: &str) -> String {
    let thread: Value = reqwest::Client::new()
        .post(server.http("/api/threads"))
        .bearer_auth(server.token(user))
        .json(&json!({"title": "limits"}))
        .send()
        .await
        .expect("create thread")
        .json()
        .await
        .expect("thread json");
    thread["id"].as_str().expect("thread id").to_string()
}

async fn metrics(server: &Server) -> String {
    reqwest::get(server.http("/metrics")).await.expect("metrics").text().await.expect("metrics text")
}

/// The value of one series, e.g. `netra_ws_closes_total{code="1013"}`.
fn series(metrics: &str, name_and_labels: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(name_and_labels)?.trim().parse().ok())
}

#[tokio::test]
async fn bad_input_is_answered_and_the_connection_stays_open() {
    let server = Server::start().await;
    let mut tab = server.connect("bad-input").await;

    tab.send_text("this is {not json").await;
    expect_error(&mut tab, "invalid_json").await;
    assert_alive(&mut tab, 1).await;

    tab.ws.send(Message::binary(vec![0x7b, 0x7d])).await.expect("send binary");
    expect_error(&mut tab, "invalid_json").await;
    assert_alive(&mut tab, 2).await;

    tab.send(json!([1, 2])).await;
    expect_error(&mut tab, "invalid_message").await;
    assert_alive(&mut tab, 3).await;

    tab.send(json!({"type": 5})).await;
    expect_error(&mut tab, "invalid_message").await;
    assert_alive(&mut tab, 4).await;

    tab.send(json!({"type": "strat_agent", "message_id": "m-17"})).await;
    let unknown = expect_error(&mut tab, "unknown_type").await;
    assert_eq!(unknown["payload"]["ref"], "m-17", "{unknown}");
    assert_eq!(unknown["payload"]["message"], "unknown message type 'strat_agent'", "{unknown}");
    assert_alive(&mut tab, 5).await;

    tab.send(json!({"type": "user_message", "payload": {"content": "  \n\t  ", "thread_id": null}})).await;
    let missing = expect_error(&mut tab, "missing_field").await;
    assert!(missing["payload"].get("ref").is_none(), "no message_id, so no ref: {missing}");
    assert!(missing["payload"]["message"].as_str().unwrap_or_default().contains("content"), "{missing}");
    assert_alive(&mut tab, 6).await;

    let thread = create_thread(&server, "bad-input").await;
    tab.send(json!({"type": "subscribe", "payload": {"thread_id": thread, "after_seq": -1}})).await;
    let invalid = expect_error(&mut tab, "invalid_field").await;
    assert!(invalid["payload"]["message"].as_str().unwrap_or_default().contains("after_seq"), "{invalid}");
    assert_alive(&mut tab, 7).await;

    // Everything else the web client sends is accepted without a word.
    tab.send(json!({"type": "session_restore", "payload": {"threadId": thread, "lastMessageId": "m-1", "connectionId": "c_old"}}))
        .await;
    tab.send(json!({"type": "disconnect", "payload": {"connectionId": "c_old", "reason": "navigating away"}})).await;
    tab.send(json!({"type": "heartbeat_ack"})).await;
    tab.send(json!({"type": "pong", "timestamp": 1_700_000_000_000_u64})).await;
    tab.send(json!({"type": "switch_thread", "payload": {"thread_id": thread}})).await;
    tab.expect_silence(Duration::from_millis(300)).await;
    assert_alive(&mut tab, 8).await;
}

#[tokio::test]
async fn oversized_frame_closes_1009() {
    let server = Spawn::new().env("NETRA_MAX_FRAME_BYTES", "65536").ready().await;
    let mut tab = server.connect("big-frames").await;
    let content = "x".repeat(70 * 1024);
    tab.send(json!({"type": "user_message", "payload": {"content": content}})).await;
    let closed = tab.next_or_close().await.expect_err("an oversized frame closes the socket");
    assert_eq!(closed.code, 1009, "{closed:?}");
    // Only that socket: the user connects again at once.
    let mut again = server.connect("big-frames").await;
    assert_alive(&mut again, 1).await;
}

#[tokio::test]
async fn frame_just_under_the_size_limit_is_processed() {
    let server = Spawn::new().env("NETRA_MAX_FRAME_BYTES", "65536").ready().await;
    let mut tab = server.connect("big-frames").await;
    let content = "word ".repeat(12 * 1024);
    assert!(content.len() + 100 < 65536 && content.len() > 60_000);
    let frames = tab.chat(&content, None).await;
    assert_eq!(types(&frames).last().map(String::as_str), Some("final_report"), "{:?}", types(&frames));
    let echo = frames.iter().find(|f| f["type"] == "user_message").expect("user_message echo");
    assert_eq!(echo["payload"]["content"].as_str().map(str::len), Some(content.trim().len()));
}

#[tokio::test]
async fn sixth_frame_in_the_window_is_rate_limited_and_not_processed() {
    let server = Spawn::new().env("NETRA_RATE_LIMIT", "5").env("NETRA_RATE_WINDOW", "60s").ready().await;
    let mut tab = server.connect("chatty").await;
    for stamp in 1..=6_u64 {
        tab.send(json!({"type": "ping", "timestamp": stamp})).await;
    }
    for stamp in 1..=5_u64 {
        let pong = tab.next().await;
        assert_eq!(pong["type"], "pong", "{pong}");
        assert_eq!(pong["payload"]["client_timestamp"], json!(stamp), "{pong}");
    }
    expect_error(&mut tab, "rate_limited").await;
    // The socket is open but may not send for a minute: prove it is alive by what it
    // receives. Another tab of the same user runs the agent; every tab gets the events.
    let mut other = server.connect("chatty").await;
    other.send(json!({"type": "user_message", "payload": {"content": "what is 2 + 2"}})).await;
    let frames = tab.collect_run().await;
    let kinds = types(&frames);
    assert!(!kinds.iter().any(|k| k == "pong"), "the rate-limited ping was answered: {kinds:?}");
    assert_eq!(kinds.first().map(String::as_str), Some("thread_created"), "{kinds:?}");
    assert_eq!(kinds.last().map(String::as_str), Some("final_report"), "{kinds:?}");
}

#[tokio::test]
async fn third_socket_of_a_user_closes_1013_until_one_closes() {
    let server = Spawn::new().env("NETRA_MAX_CONNECTIONS_PER_USER", "2").ready().await;
    let mut first = server.connect("crowded").await;
    let mut second = server.connect("crowded").await;

    let mut third = Client::open(&server.ws_url(), Auth::Header(server.token("crowded"))).await.expect("upgrade");
    let refused = third.next_or_close().await.expect_err("the third socket is refused");
    assert_eq!(refused, Closed { code: 1013, reason: "try again later".into() });

    // The limit is per user.
    let mut stranger = server.connect("someone-else").await;
    assert_alive(&mut stranger, 1).await;
    assert_alive(&mut second, 2).await;

    first.ws.close(None).await.expect("close");
    while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, first.ws.next()).await {}

    let deadline = Instant::now() + WAIT;
    let mut replacement = loop {
        let mut c = Client::open(&server.ws_url(), Auth::Header(server.token("crowded"))).await.expect("upgrade");
        match c.next_or_close().await {
            Ok(hello) => {
                assert_eq!(hello["payload"]["event"], "connection_established", "{hello}");
                break c;
            }
            Err(closed) => assert_eq!(closed, Closed { code: 1013, reason: "try again later".into() }),
        }
        assert!(Instant::now() < deadline, "a freed slot was never reused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_alive(&mut replacement, 3).await;
}

#[tokio::test]
async fn second_message_during_a_run_gets_busy_and_the_run_completes() {
    let server = Spawn::new().env("NETRA_MAX_RUNS_PER_USER", "1").env("NETRA_AGENT_TOKEN_DELAY", "100ms").ready().await;
    let mut tab = server.connect("impatient").await;
    tab.send(json!({"type": "user_message", "payload": {"content": "what is 2 + 2"}})).await;
    let mut frames = tab.until(|f| f["type"] == "agent_started").await;
    let thread = frames[0]["thread_id"].as_str().expect("thread_id").to_string();

    tab.send(json!({"type": "user_message", "message_id": "m-busy", "payload": {"content": "what is 3 + 3"}})).await;
    let mut busy = None;
    loop {
        let frame = tab.next().await;
        if frame["type"] == "error" && frame["payload"]["code"] == "busy" {
            assert!(busy.is_none(), "two busy errors");
            busy = Some(frame);
            continue;
        }
        assert_ne!(frame["type"], "error", "the first run failed: {frame}");
        let done = frame["type"] == "final_report";
        frames.push(frame);
        if done {
            break;
        }
    }
    let busy = busy.expect("the second message got `busy`");
    assert_protocol_error(&busy, "busy");
    assert_eq!(busy["payload"]["ref"], "m-busy", "{busy}");
    // The refused message started nothing: every event belongs to the first run.
    assert!(frames.iter().all(|f| f["thread_id"] == thread.as_str()), "{frames:?}");
    assert!(
        frames.last().expect("final_report")["payload"]["executive_summary"]
            .as_str()
            .is_some_and(|s| s.contains("= 4"))
    );
    common::assert_dense(&frames);

    // The slot is free again once the run ended.
    let next = tab.chat("what is 3 + 3", Some(&thread)).await;
    assert_eq!(types(&next).last().map(String::as_str), Some("final_report"), "{:?}", types(&next));
}

#[tokio::test]
async fn client_that_answers_pings_is_not_idled_out() {
    let server = Spawn::new().env("NETRA_HEARTBEAT_INTERVAL", "200ms").env("NETRA_IDLE_TIMEOUT", "1s").ready().await;
    let mut tab = server.connect("awake").await;
    // tungstenite answers each Ping with a Pong while it reads; nothing else is sent.
    let until = Instant::now() + Duration::from_millis(1500);
    let mut pings = 0;
    while let Ok(msg) = tokio::time::timeout_at(until, tab.ws.next()).await {
        match msg {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("expected only heartbeat pings, got {other:?}"),
        }
    }
    assert!(pings >= 3, "only {pings} heartbeat pings in 1.5 s at a 200 ms interval");
    assert_alive(&mut tab, 1).await;
}

/// A WebSocket client written by hand over TCP, so that it can stay silent: it never
/// answers a Ping and reads only when the test says so.
struct RawSocket {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// One server frame: opcode and unmasked payload.
#[derive(Debug)]
struct RawFrame {
    opcode: u8,
    payload: Vec<u8>,
}

impl RawSocket {
    async fn connect(addr: SocketAddr, token: &str) -> Self {
        let mut stream = TcpStream::connect(addr).await.expect("tcp connect");
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Authorization: Bearer {token}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("send upgrade");
        let mut socket = Self { stream, buf: Vec::new() };
        let end = loop {
            if let Some(i) = socket.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(socket.fill(Instant::now() + WAIT).await, "no upgrade response");
        };
        let head = String::from_utf8_lossy(&socket.buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(head.to_ascii_lowercase().contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="), "{head}");
        socket.buf.drain(..end);
        socket
    }

    /// Reads more bytes; false on EOF or when the deadline passes.
    async fn fill(&mut self, deadline: Instant) -> bool {
        let mut chunk = [0_u8; 8192];
        match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            _ => false,
        }
    }

    /// The next complete frame, or `None` on EOF or at the deadline.
    async fn frame(&mut self, deadline: Instant) -> Option<RawFrame> {
        loop {
            if let Some((frame, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            if !self.fill(deadline).await {
                return None;
            }
        }
    }
}

/// Parses a server frame (never masked) from the front of `buf`.
fn parse_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0, "server frames are not masked");
    let (len, header) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    let payload = buf.get(header..header + len)?.to_vec();
    Some((RawFrame { opcode: buf[0] & 0x0f, payload }, header + len))
}

#[tokio::test]
async fn silent_client_gets_pings_then_closes_1001_idle_timeout() {
    let server = Spawn::new().env("NETRA_HEARTBEAT_INTERVAL", "200ms").env("NETRA_IDLE_TIMEOUT", "1s").ready().await;
    let mut raw = RawSocket::connect(server.addr, &server.token("sleeper")).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    let hello = raw.frame(deadline).await.expect("connection_established");
    assert_eq!(hello.opcode, 0x1, "{hello:?}");
    let hello: Value = serde_json::from_slice(&hello.payload).expect("json");
    assert_eq!(hello["payload"]["event"], "connection_established");

    let mut pings = 0;
    let close = loop {
        let frame = raw.frame(deadline).await.expect("a close within 3 s");
        match frame.opcode {
            0x9 => pings += 1,
            0x8 => break frame,
            other => panic!("unexpected opcode {other:#x}: {frame:?}"),
        }
    };
    assert!(pings >= 1, "no heartbeat Ping before the idle close");
    assert!(close.payload.len() >= 2, "{close:?}");
    assert_eq!(u16::from_be_bytes([close.payload[0], close.payload[1]]), 1001);
    assert_eq!(&close.payload[2..], b"idle timeout");
}

#[tokio::test]
async fn consumer_that_cannot_keep_up_is_closed_and_counted_without_blocking_the_producer() {
    let server = Spawn::new()
        // Not 2: one commit publishes up to 3 frames at once (thread_created,
        // user_message, agent_started), so a queue under 3 closes even a fast reader, and
        // the server's own startup self-test fails with 1013 `send queue full`.
        .env("NETRA_SEND_QUEUE", "16")
        .env("NETRA_MAX_FRAME_BYTES", "131072")
        .env("NETRA_AGENT_TOKEN_DELAY", "0")
        .ready()
        .await;
    let user = "slow-reader";
    // Created over REST so that no run starts with a burst of three events.
    let thread = create_thread(&server, user).await;
    let mut stuck = RawSocket::connect(server.addr, &server.token(user)).await;
    let hello = stuck.frame(Instant::now() + WAIT).await.expect("connection_established");
    assert_eq!(hello.opcode, 0x1);
    // From here on `stuck` never reads again.
    let mut tab = server.connect(user).await;
    let content = "abc ".repeat(25_000);
    let started = Instant::now();
    let mut dropped = 0.0;
    for i in 0..60 {
        let frames = tab.chat(&content, Some(&thread)).await;
        let kinds = types(&frames);
        assert_eq!(kinds.last().map(String::as_str), Some("final_report"), "run {i}: {kinds:?}");
        let text = metrics(&server).await;
        dropped = series(&text, "netra_events_total{outcome=\"dropped_queue_full\"}")
            .or_else(|| series(&text, "netra_events_dropped_total{reason=\"queue_full\"}"))
            .unwrap_or(0.0);
        if dropped > 0.0 {
            break;
        }
    }
    assert!(dropped > 0.0, "60 runs of 100 KB never overflowed a 16-frame queue");
    // The producer was never blocked: the reading tab keeps getting whole runs.
    let frames = tab.chat("what is 2 + 2", Some(&thread)).await;
    assert_eq!(types(&frames).last().map(String::as_str), Some("final_report"));

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if series(&metrics(&server).await, "netra_ws_closes_total{code=\"1013\"}").is_some_and(|n| n >= 1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "the overflowing connection was never closed 1013");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Closed means the server let go of the socket: what is left in flight ends in EOF,
    // after a 1013 close frame if one got through.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match stuck.frame(deadline).await {
            Some(f) if f.opcode == 0x8 => {
                assert_eq!(f.payload.get(..2), Some(&1013_u16.to_be_bytes()[..]), "{f:?}");
            }
            Some(_) => {}
            None => break,
        }
    }
    assert!(Instant::now() < deadline, "the server never released the overflowing socket");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
}

/// A client that closes gets the server's close reply (not a dropped socket, 1006).
#[tokio::test]
async fn a_client_close_is_answered_with_a_close_frame() {
    let server = Spawn::new().ready().await;
    let mut tab = server.connect("leaver").await;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let close = CloseFrame { code: CloseCode::Normal, reason: "bye".into() };
    tab.ws.send(tokio_tungstenite::tungstenite::Message::Close(Some(close))).await.expect("send close");
    let closed = tab.next_or_close().await.expect_err("the server closes");
    assert_eq!(closed.code, 1000, "{closed:?}");
}
