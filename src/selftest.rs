//! The last startup step: a real client. It opens a loopback WebSocket with a short-lived
//! internal token, sends one message through the whole pipeline (gateway, supervisor,
//! agent, store, delivery) and checks the run it gets back. The server is ready only
//! after this passes, so readiness means a message can get through. Its thread is
//! removed right after, off the startup path.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};

use crate::auth::{Keys, TokenKind, User};
use crate::client::{Auth, Client, ClientError};
use crate::store::Store;

/// The user the self-test runs as; its runs always use the builtin agent.
pub(crate) const USER: &str = "netra-self-test";

pub(crate) async fn run(addr: SocketAddr, keys: &Keys, store: &Store) -> Result<(), String> {
    let host = if addr.ip().is_unspecified() {
        if addr.is_ipv4() { "127.0.0.1".to_string() } else { "[::1]".to_string() }
    } else if addr.is_ipv6() {
        format!("[{}]", addr.ip())
    } else {
        addr.ip().to_string()
    };
    let url = format!("ws://{host}:{}/ws", addr.port());
    let token = keys.mint(&User::new(USER), TokenKind::Access, Duration::from_secs(60));
    let mut ws = Client::open(&url, &Auth::Header(token)).await.map_err(|e| format!("cannot connect to {url}: {e}"))?;

    let first = next_json(&mut ws).await?;
    if first["payload"]["event"] != "connection_established" {
        return Err(format!("first frame was not connection_established: {first}"));
    }
    let send = json!({"type": "user_message", "payload": {"content": "self-test: what is 6*7?"}});
    ws.send(&send).await.map_err(|e| format!("cannot send: {e}"))?;

    let mut seen = Vec::new();
    let mut thread_id = None;
    let mut last_seq = 0;
    let outcome = loop {
        let frame = next_json(&mut ws).await?;
        let kind = frame["type"].as_str().unwrap_or_default().to_string();
        if thread_id.is_none() {
            thread_id = frame["thread_id"].as_str().map(str::to_string);
        }
        if let Some(seq) = frame["seq"].as_u64() {
            if seq != last_seq + 1 {
                break Err(format!("seq went from {last_seq} to {seq}"));
            }
            last_seq = seq;
        }
        match kind.as_str() {
            "final_report" => {
                let summary = frame["payload"]["executive_summary"].as_str().unwrap_or_default();
                break if summary.contains("42") { Ok(()) } else { Err(format!("unexpected answer {summary:?}")) };
            }
            "error" => break Err(format!("the run failed: {}", frame["payload"])),
            _ => seen.push(kind),
        }
    };
    let expected = [
        "thread_created",
        "user_message",
        "agent_started",
        "agent_thinking",
        "tool_executing",
        "tool_completed",
        "agent_completed",
    ];
    let outcome = outcome.and_then(|()| match expected.iter().find(|e| !seen.iter().any(|s| s == *e)) {
        Some(missing) => Err(format!("the run had no {missing} event")),
        None => Ok(()),
    });
    // Cleaning up proves nothing about the pipeline: it is done after readiness is told,
    // off the startup path (on PostgreSQL, a transaction of four statements).
    let store = store.clone();
    tokio::spawn(async move {
        ws.close().await;
        if let Some(thread_id) = thread_id
            && let Err(e) = store.purge_thread(&thread_id).await
        {
            tracing::warn!(error = %e, thread_id, "the self-test thread could not be removed");
        }
    });
    outcome
}

async fn next_json(ws: &mut Client) -> Result<Value, String> {
    match tokio::time::timeout(Duration::from_secs(5), ws.next_frame()).await {
        Err(_) => Err("no frame within 5 s".into()),
        Ok(Err(ClientError::Closed(closed))) => Err(format!("server closed the socket: {closed:?}")),
        Ok(frame) => frame.map_err(|e| e.to_string()),
    }
}
