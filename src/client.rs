//! netra's own WebSocket client: how the startup self-test, `netra chat`, the examples
//! and the test suite talk to a server. It opens a socket with a token in any of the
//! three places PROTOCOL.md §1.2 allows, sends frames, and reads the next text frame as
//! JSON, telling a close (with its code and reason) from a broken socket. What to do with
//! the frames is the caller's; a deadline is the caller's too (wrap a read in
//! `tokio::time::timeout`), so a read can sit in a `select!` beside other work.

use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Where the client puts its token.
#[derive(Debug, Clone)]
pub enum Auth {
    /// `Authorization: Bearer <token>`.
    Header(String),
    /// `Sec-WebSocket-Protocol: jwt-auth, jwt.<base64url(token)>`, as browsers must.
    Subprotocol(String),
    /// `?token=<token>` on the URL.
    Query(String),
    /// No token at all.
    None,
}

/// How a socket ended, as the client saw it: the close frame's code and reason, 1005
/// for a close frame without a code, 1006 when the connection broke without one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub code: u16,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the server closed the socket with {} {:?}", .0.code, .0.reason)]
    Closed(Closed),
    #[error("a text frame was not JSON: {0}")]
    NotJson(#[from] serde_json::Error),
    #[error("socket error: {0}")]
    Socket(#[from] tungstenite::Error),
}

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct Client {
    /// The socket itself, for what the methods do not cover (a binary frame, a ping).
    pub ws: Socket,
    /// The subprotocol the server selected, if any.
    pub protocol: Option<String>,
}

impl Client {
    /// Opens `url` (`ws://host:port/ws`) with the token where `auth` says.
    pub async fn open(url: &str, auth: &Auth) -> Result<Self, tungstenite::Error> {
        let url = match auth {
            Auth::Query(token) => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}token={token}")
            }
            _ => url.to_string(),
        };
        let mut request = url.as_str().into_client_request()?;
        let header = match auth {
            Auth::Header(token) => Some(("authorization", format!("Bearer {token}"))),
            Auth::Subprotocol(token) => {
                let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token);
                Some(("sec-websocket-protocol", format!("jwt-auth, jwt.{encoded}")))
            }
            Auth::Query(_) | Auth::None => None,
        };
        if let Some((name, value)) = header {
            let value = value.parse().map_err(|e| tungstenite::Error::HttpFormat(tungstenite::http::Error::from(e)))?;
            request.headers_mut().insert(name, value);
        }
        let (ws, response) = tokio_tungstenite::connect_async(request).await?;
        let protocol =
            response.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()).map(str::to_string);
        Ok(Self { ws, protocol })
    }

    /// Sends a frame as JSON text.
    pub async fn send(&mut self, frame: &Value) -> Result<(), tungstenite::Error> {
        self.send_text(&frame.to_string()).await
    }

    /// Sends text as it is (which need not be a valid frame).
    pub async fn send_text(&mut self, text: &str) -> Result<(), tungstenite::Error> {
        self.ws.send(Message::text(text)).await
    }

    /// The next text frame as JSON; pings, pongs and binary frames are passed over.
    /// Cancel-safe: a read dropped in a `select!` loses no frame.
    pub async fn next_frame(&mut self) -> Result<Value, ClientError> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(text.as_str())?),
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) =
                        frame.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string()));
                    return Err(ClientError::Closed(Closed { code, reason }));
                }
                Some(Ok(_)) => {}
                Some(Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed)) | None => {
                    return Err(ClientError::Closed(Closed { code: 1006, reason: String::new() }));
                }
                Some(Err(e)) => return Err(ClientError::Socket(e)),
            }
        }
    }

    /// Closes the socket politely (1000); a socket already gone is fine.
    pub async fn close(&mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// Whether a frame ends a run: `final_report`, an `error`, or an `agent_completed`
/// that says the run was cancelled (PROTOCOL.md §3).
pub fn ends_run(frame: &Value) -> bool {
    match frame["type"].as_str() {
        Some("final_report" | "error") => true,
        Some("agent_completed") => frame["payload"]["status"] == "cancelled",
        _ => false,
    }
}
