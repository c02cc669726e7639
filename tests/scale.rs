//! Several nodes on one PostgreSQL and one Redis (a redis-server of the test's own, on a
//! free port, so it can be stopped and started without touching the machine's): a tab on
//! one node sees, in order and once, the runs started from a tab on another; `stop_agent`
//! reaches the node running the run; while Redis is away each node serves its own users
//! and says `broker` degraded, and when it is back every event reaches every tab.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Duration;

use common::{Client, Redis, Server, Spawn, assert_dense, fresh_pg_url, types, unique};
use serde_json::{Value, json};

/// Longest a node takes to notice Redis going or coming back.
const WITHIN: Duration = Duration::from_secs(20);

/// A node of the cluster on `pg` and `redis`.
fn node(pg: &str, redis: &Redis) -> Spawn {
    Spawn::new().env("DATABASE_URL", pg).env("REDIS_URL", redis.url()).env("NETRA_NODE_LEASE", "3s")
}

/// Two nodes that sign tokens with one secret, as a deployment's nodes do.
async fn two_nodes(redis: &Redis, delay: &str) -> (Server, Server) {
    let pg = fresh_pg_url().await;
    let secret = unique("cluster-secret");
    let a = node(&pg, redis).secret(&secret).env("NETRA_AGENT_TOKEN_DELAY", delay).ready().await;
    let b = node(&pg, redis).secret(&secret).env("NETRA_AGENT_TOKEN_DELAY", delay).ready().await;
    (a, b)
}

async fn component(server: &Server, name: &str) -> Value {
    let health: Value = reqwest::get(server.http("/health")).await.expect("health").json().await.expect("json");
    health["checks"][name][0].clone()
}

/// The frames of one run, as a tab that did not send it sees them: until its ending.
async fn run_seen(tab: &mut Client, run_id: &str) -> Vec<Value> {
    let frames = tab.until(|f| f["run_id"] == run_id && common::ends_run(f)).await;
    frames.into_iter().filter(|f| f["run_id"] == run_id).collect()
}

fn seqs(frames: &[Value]) -> Vec<u64> {
    frames.iter().filter_map(|f| f["seq"].as_u64()).collect()
}

#[tokio::test]
async fn a_run_from_one_node_reaches_the_tab_on_another_in_order_and_once() {
    let redis = Redis::start().await;
    let (a, b) = two_nodes(&redis, "0ms").await;
    assert_eq!(component(&a, "broker").await["state"], "ready");
    let user = unique("erin");
    let mut on_a = a.connect(&user).await;
    let mut on_b = b.connect(&user).await;
    // Subscriptions are asynchronous: give Redis a moment to hold A's.
    tokio::time::sleep(Duration::from_millis(200)).await;

    for text in ["what is 6 * 7?", "and what time is it?"] {
        let sent = on_b.chat(text, None).await;
        let run_id = sent.last().expect("frames")["run_id"].as_str().expect("run id").to_string();
        let seen = run_seen(&mut on_a, &run_id).await;
        let sent: Vec<Value> = sent.into_iter().filter(|f| f["run_id"] == run_id.as_str()).collect();
        assert_eq!(types(&seen), types(&sent), "the other node's tab sees the whole run");
        assert_eq!(seqs(&seen), seqs(&sent), "with the same seqs");
        assert_dense(&seen);
    }
    on_a.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn stop_from_a_tab_on_another_node_cancels_the_run() {
    let redis = Redis::start().await;
    let (a, b) = two_nodes(&redis, "300ms").await;
    let user = unique("finn");
    let mut on_a = a.connect(&user).await;
    let mut on_b = b.connect(&user).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    on_b.send(json!({"type": "user_message", "payload": {"content": "tell me a long story about the sea"}})).await;
    let started = on_a.until(|f| f["type"] == "agent_started").await;
    let run_id = started.last().expect("frame")["run_id"].as_str().expect("run id").to_string();
    on_a.send(json!({"type": "stop_agent", "payload": {"run_id": run_id}})).await;
    let ended = on_b.until(|f| f["run_id"] == run_id.as_str() && common::ends_run(f)).await;
    let last = ended.last().expect("frame");
    assert_eq!(last["type"], "agent_completed", "{last}");
    assert_eq!(last["payload"]["status"], "cancelled");
    let seen = on_a.until(|f| f["run_id"] == run_id.as_str() && common::ends_run(f)).await;
    assert_eq!(seen.last().expect("frame")["payload"]["status"], "cancelled");
}

#[tokio::test]
async fn redis_away_each_node_serves_its_own_and_when_back_every_event_arrives() {
    let mut redis = Redis::start().await;
    let (a, b) = two_nodes(&redis, "0ms").await;
    let user = unique("gus");
    let mut on_a = a.connect(&user).await;
    let mut on_b = b.connect(&user).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    redis.down();
    common::eventually("both nodes to say the broker is degraded", WITHIN, || async {
        component(&a, "broker").await["state"] == "degraded" && component(&b, "broker").await["state"] == "degraded"
    })
    .await;
    let ready: Value = reqwest::get(b.http("/health/ready")).await.expect("ready").json().await.expect("json");
    assert_eq!(ready["status"], "ready", "an optional broker never makes a node unready");
    // Same-node traffic goes on.
    let mut runs = Vec::new();
    for text in ["what is 2 + 2?", "what is 3 + 3?"] {
        let frames = on_b.chat(text, None).await;
        assert_eq!(frames.last().expect("frames")["type"], "final_report");
        runs.push(frames);
    }
    on_a.expect_silence(Duration::from_millis(300)).await;

    redis.up().await;
    common::eventually("the broker to be ready again", WITHIN, || async {
        component(&a, "broker").await["state"] == "ready"
    })
    .await;
    for sent in runs {
        let run_id = sent.last().expect("frames")["run_id"].as_str().expect("run id").to_string();
        let seen = run_seen(&mut on_a, &run_id).await;
        let sent: Vec<Value> = sent.into_iter().filter(|f| f["run_id"] == run_id.as_str()).collect();
        assert_eq!(seqs(&seen), seqs(&sent), "every event of the run, once, in order");
    }
    // And live delivery is back.
    let frames = on_b.chat("what is 4 + 4?", None).await;
    let run_id = frames.last().expect("frames")["run_id"].as_str().expect("run id").to_string();
    let seen = run_seen(&mut on_a, &run_id).await;
    assert_eq!(seen.last().expect("frame")["type"], "final_report");
}

#[tokio::test]
async fn a_node_started_while_redis_is_away_is_ready_degraded_and_heals() {
    let mut redis = Redis::start().await;
    redis.down();
    let pg = fresh_pg_url().await;
    let a = node(&pg, &redis).ready().await;
    let broker = component(&a, "broker").await;
    assert_eq!(broker["state"], "degraded", "{broker}");
    assert!(broker["output"].as_str().unwrap_or("").contains(&format!("127.0.0.1:{}", redis.port)), "{broker}");
    redis.up().await;
    common::eventually("the broker to heal", WITHIN, || async { component(&a, "broker").await["state"] == "ready" })
        .await;

    let mut required =
        node(&pg, &redis).env("REDIS_REQUIRED", "true").env("REDIS_URL", "redis://127.0.0.1:1").start().await;
    let code = tokio::time::timeout(Duration::from_secs(30), required.wait_exit()).await.expect("exits");
    assert_ne!(code, Some(0));
    assert!(required.stderr().contains("broker"), "{}", required.stderr());
}

/// A node answers a thread's runs from the history it keeps; when another node wrote
/// the thread since, the run must still see the whole conversation: its start, made for
/// the thread as this node last saw it, is refused, and the run starts again on it as
/// it is.
#[tokio::test]
async fn a_run_sees_the_messages_another_node_wrote_since() {
    let redis = Redis::start().await;
    let (a, b) = two_nodes(&redis, "0ms").await;
    let user = unique("fay");
    let mut on_a = a.connect(&user).await;
    let first = on_a.chat("first words", None).await;
    let thread = first.last().expect("frames")["thread_id"].as_str().expect("thread id").to_string();
    // Connected after A's run: this tab sees only what follows.
    let mut on_b = b.connect(&user).await;
    let second = on_b.chat("second words", Some(&thread)).await;
    let run_b = second.last().expect("frames")["run_id"].as_str().expect("run id").to_string();
    // A's tab sees B's run too: read it, so A's next run is all that follows.
    run_seen(&mut on_a, &run_b).await;
    let third = on_a.chat("third words", Some(&thread)).await;
    let report = third.iter().find(|f| f["type"] == "final_report").expect("the run completes");
    let answer = report["payload"]["executive_summary"].as_str().expect("answer");
    assert!(answer.contains("(2 messages from you) you wrote: \"second words\""), "{answer}");
    assert_dense(&third);
    let metrics = reqwest::get(a.http("/metrics")).await.expect("metrics").text().await.expect("text");
    let raced = metrics.lines().find_map(|l| l.strip_prefix("netra_run_starts_total{start=\"raced\"}"));
    assert_eq!(raced.map(str::trim), Some("1"), "A's start raced B's write once:\n{metrics}");
}
