//! Several nodes on one PostgreSQL: each has an id of its own, kept in its data dir; a
//! node that is SIGKILLed mid-run has that run ended `interrupted` by another node once
//! its lease runs out, exactly once, and the tabs on the surviving node see the ending.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::{Spawn, fresh_pg_url, unique};
use serde_json::json;

/// The node's id as it keeps it in its data dir.
fn node_id_of(server: &common::Server) -> String {
    std::fs::read_to_string(server.data_dir.join("node_id")).expect("node id file").trim().to_string()
}

#[tokio::test]
async fn a_node_keeps_its_id_across_restarts_and_nodes_differ() {
    let url = fresh_pg_url().await;
    let mut a = Spawn::new().env("DATABASE_URL", &url).ready().await;
    let b = Spawn::new().env("DATABASE_URL", &url).ready().await;
    let id = node_id_of(&a);
    assert!(id.starts_with("node-"), "{id}");
    assert_ne!(id, node_id_of(&b));
    a.kill_and_restart().await;
    assert_eq!(node_id_of(&a), id);
    let named = Spawn::new().env("DATABASE_URL", &url).env("NETRA_NODE_ID", "edge-1").ready().await;
    assert!(named.stderr().contains("edge-1"), "the log names the node");
}

#[tokio::test]
async fn a_killed_nodes_run_is_ended_by_another_node_once() {
    let url = fresh_pg_url().await;
    let lease = "3s";
    // Slow words: the run is still going when its node dies.
    let node =
        |s: Spawn| s.env("DATABASE_URL", &url).env("NETRA_NODE_LEASE", lease).env("NETRA_AGENT_TOKEN_DELAY", "400ms");
    let mut a = node(Spawn::new()).ready().await;
    let b = node(Spawn::new()).ready().await;
    let c = node(Spawn::new()).ready().await;
    let user = unique("dana");
    let mut on_a = a.connect(&user).await;
    let mut on_b = b.connect(&user).await;
    let mut on_c = c.connect(&user).await;
    on_a.send(json!({"type": "user_message", "payload": {"content": "please explain the weather in detail"}})).await;
    let started = on_a.until(|f| f["type"] == "agent_started").await;
    let run_id = started.last().expect("frame")["run_id"].as_str().expect("run id").to_string();
    let thread_id = started.last().expect("frame")["thread_id"].as_str().expect("thread").to_string();

    a.signal("KILL");
    let _ = a.wait_exit().await;
    let killed = std::time::Instant::now();
    // Another node ends it, as the `interrupted` failure. Without a broker only the
    // tabs on the node that swept see it live: B's when B's sweep comes first (it
    // started before C), C's when a slow start put C's first.
    let ending = |f: &serde_json::Value| f["type"] == "error" && f["run_id"] == run_id.as_str();
    let frames = tokio::select! {
        frames = on_b.until(ending) => frames,
        frames = on_c.until(ending) => frames,
    };
    let waited = killed.elapsed();
    let error = frames.last().expect("frame");
    assert_eq!(error["payload"]["reason"], "interrupted", "{error}");
    assert!(waited < Duration::from_secs(10), "ended {waited:?} after the kill, with a 3 s lease");

    // Exactly once, whichever of B and C swept: the thread holds one ending.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut tab = c.connect(&user).await;
    tab.send(json!({"type": "subscribe", "payload": {"thread_id": thread_id, "after_seq": 0}})).await;
    let replay = tab.until(|f| f["type"] == "error" && f["run_id"] == run_id.as_str()).await;
    tab.expect_silence(Duration::from_millis(500)).await;
    let endings = replay.iter().filter(|f| f["type"] == "agent_error").count();
    assert_eq!(endings, 1, "one ending: {replay:?}");
}
