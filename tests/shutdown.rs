//! Graceful shutdown (ARCHITECTURE.md "Shutdown", PROTOCOL.md §6f): readiness goes false,
//! new upgrades are refused, running runs get the drain window and are then cancelled with
//! a persisted `agent_completed`, and every socket closes with 1012 `service restart`.

mod common;

use std::time::{Duration, Instant};

use common::{Auth, Client, Closed, Server, Spawn, WAIT, types, unique};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;

/// A message with no arithmetic and no clock word: the builtin agent answers with ~35 words.
const LONG_RUN: &str = "tell me a story about the sea";

fn restart() -> Closed {
    Closed { code: 1012, reason: "service restart".into() }
}

fn is(kind: &'static str) -> impl Fn(&Value) -> bool {
    move |f: &Value| f["type"] == kind
}

/// Sends a message and reads up to its `agent_started`, returning that frame.
async fn start_run(tab: &mut Client, text: &str) -> Value {
    tab.send(json!({"type": "user_message", "payload": {"content": text}})).await;
    let frames = tab.until(is("agent_started")).await;
    frames.last().cloned().expect("agent_started")
}

#[tokio::test]
async fn sigterm_mid_run_cancels_it_persisted_and_closes_1012() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = unique("shutdown-secret");
    let mut server = Spawn::new()
        .data_dir(dir.path().to_path_buf())
        .secret(&secret)
        .env("NETRA_AGENT_TOKEN_DELAY", "300ms")
        .env("NETRA_DRAIN_TIMEOUT", "500ms")
        .ready()
        .await;
    let mut tab = server.connect("drained").await;
    let started = start_run(&mut tab, LONG_RUN).await;
    let (thread_id, run_id) = (started["thread_id"].clone(), started["run_id"].clone());
    assert!(thread_id.is_string() && run_id.is_string(), "{started}");

    let signalled = Instant::now();
    server.signal("TERM");
    let frames = tab.until(is("agent_completed")).await;
    let drained_for = signalled.elapsed();
    let completed = frames.last().cloned().expect("agent_completed");
    assert_eq!(completed["payload"]["status"], "cancelled", "{completed}");
    assert_eq!(completed["run_id"], run_id, "{completed}");
    assert_eq!(completed["thread_id"], thread_id, "{completed}");
    assert!(completed["seq"].is_u64(), "{completed}");
    assert!(drained_for >= Duration::from_millis(500), "cancelled after {drained_for:?}, inside the drain window");
    assert!(drained_for < Duration::from_secs(5), "cancelled only after {drained_for:?}");

    let (rest, closed) = tab.until_close().await;
    assert_eq!(closed, restart(), "frames before the close: {:?}", types(&rest));
    assert!(!types(&rest).iter().any(|k| k == "final_report"), "no final_report after a cancel: {rest:?}");
    assert_eq!(server.wait_exit().await, Some(0), "stderr:\n{}", server.stderr());
    // A clean stop leaves no SQLite WAL for the next start to replay.
    let wal = dir.path().join("netra.db-wal");
    if dir.path().join("netra.db").exists() {
        let len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        assert_eq!(len, 0, "the WAL was left with {len} bytes");
    }

    // The cancellation was persisted: a restarted server replays it with the same seq.
    let again = Spawn::new().data_dir(dir.path().to_path_buf()).secret(&secret).ready().await;
    let mut tab = again.connect("drained").await;
    tab.send(json!({"type": "subscribe", "payload": {"thread_id": thread_id, "after_seq": 0}})).await;
    let replay = tab.until(|f| f["seq"] == completed["seq"]).await;
    assert_eq!(replay.first().map(|f| f["seq"].clone()), Some(json!(1)), "{replay:?}");
    common::assert_dense(&replay);
    assert_eq!(replay.last(), Some(&completed), "the replayed frame is the one received live");
}

#[tokio::test]
async fn a_run_that_fits_the_drain_window_finishes_before_the_1012_close() {
    let mut server = Spawn::new().env("NETRA_AGENT_TOKEN_DELAY", "20ms").env("NETRA_DRAIN_TIMEOUT", "5s").ready().await;
    let mut tab = server.connect("finisher").await;
    let started = start_run(&mut tab, LONG_RUN).await;
    server.signal("TERM");
    let frames = tab.collect_run().await;
    let kinds = types(&frames);
    assert_eq!(kinds.last().map(String::as_str), Some("final_report"), "{kinds:?}");
    let completed = frames.iter().find(|f| f["type"] == "agent_completed").expect("agent_completed");
    assert_eq!(completed["payload"]["status"], "completed", "{completed}");
    assert_eq!(completed["run_id"], started["run_id"], "{completed}");
    assert!(kinds.iter().any(|k| k == "partial_result"), "{kinds:?}");

    let (rest, closed) = tab.until_close().await;
    assert_eq!(closed, restart(), "frames before the close: {:?}", types(&rest));
    assert_eq!(server.wait_exit().await, Some(0), "stderr:\n{}", server.stderr());
}

#[tokio::test]
async fn during_the_drain_new_upgrades_are_refused_and_ready_is_503() {
    let mut server =
        Spawn::new().env("NETRA_AGENT_TOKEN_DELAY", "200ms").env("NETRA_DRAIN_TIMEOUT", "2s").ready().await;
    let mut tab = server.connect("drainer").await;
    let started = start_run(&mut tab, LONG_RUN).await;
    server.signal("TERM");

    // Readiness turns false while the run drains.
    let http = reqwest::Client::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let status = http.get(server.http("/health/ready")).send().await.expect("ready probe").status();
        if status == 503 {
            break;
        }
        assert_eq!(status, 200, "unexpected readiness status");
        assert!(Instant::now() < deadline, "/health/ready never turned 503 after SIGTERM");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A new socket is refused: 503 on the upgrade (or no connection at all).
    match Client::open(&server.ws_url(), Auth::Header(server.token("latecomer"))).await {
        Ok(_) => panic!("an upgrade was accepted after SIGTERM"),
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        Err(tungstenite::Error::Io(_)) => {}
        Err(e) => panic!("unexpected refusal: {e}"),
    }

    // The refusal happened inside the drain: the original run is only now cancelled.
    let frames = tab.until(is("agent_completed")).await;
    let completed = frames.last().expect("agent_completed");
    assert_eq!(completed["payload"]["status"], "cancelled", "{completed}");
    assert_eq!(completed["run_id"], started["run_id"], "{completed}");
    let (_, closed) = tab.until_close().await;
    assert_eq!(closed, restart());
    assert_eq!(server.wait_exit().await, Some(0), "stderr:\n{}", server.stderr());
}

#[tokio::test]
async fn sigint_shuts_down_like_sigterm() {
    let mut server = Server::start().await;
    let mut first = server.connect("interrupted").await;
    let mut second = server.connect("interrupted-too").await;
    server.signal("INT");
    let (frames, closed) = first.until_close().await;
    assert_eq!(closed, restart(), "frames: {frames:?}");
    let (frames, closed) = second.until_close().await;
    assert_eq!(closed, restart(), "frames: {frames:?}");
    assert_eq!(server.wait_exit().await, Some(0), "stderr:\n{}", server.stderr());
}
