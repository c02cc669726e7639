//! The newcomer path: an empty environment, ready, a token, a chat round trip.

mod common;

use common::{Auth, Client, Server, Spawn, types};
use serde_json::json;

#[tokio::test]
async fn empty_environment_starts_ready_and_streams_a_run() {
    // Only PORT and the data dir: no secret, so development generates one that
    // `netra token` reads too.
    let server = Spawn::new().env("JWT_SECRET", "").ready().await;
    let out = server.cli(&["token", "--user", "newcomer"], "").await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).expect("utf8").trim().to_string();
    let mut tab = Client::open(&server.ws_url(), Auth::Header(token)).await.expect("connect");
    assert_eq!(tab.next().await["payload"]["event"], "connection_established");
    let frames = tab.chat("what is 12 * (3 + 4)?", None).await;
    let kinds = types(&frames);
    let expected = [
        "thread_created",
        "user_message",
        "agent_started",
        "agent_thinking",
        "tool_executing",
        "tool_completed",
        "partial_result",
        "agent_completed",
        "final_report",
    ];
    for e in expected {
        assert!(kinds.iter().any(|k| k == e), "missing {e} in {kinds:?}");
    }
    assert_eq!(kinds.last().map(String::as_str), Some("final_report"));
    let report = frames.last().expect("final_report");
    assert!(report["payload"]["executive_summary"].as_str().unwrap_or_default().contains("84"), "{report}");
    common::assert_dense(&frames);
    assert_eq!(frames[0]["seq"], json!(1));
    for f in &frames {
        assert!(f["timestamp"].as_str().is_some_and(|t| t.ends_with('Z') && t.len() == 24), "{f}");
    }
}

#[tokio::test]
async fn health_endpoints_report_every_component() {
    let server = Server::start().await;
    let http = reqwest::Client::new();
    let live = http.get(server.http("/health/live")).send().await.expect("live");
    assert_eq!(live.status(), 200);
    let startup: serde_json::Value =
        http.get(server.http("/health/startup")).send().await.expect("startup").json().await.expect("json");
    let names: Vec<&str> =
        startup["components"].as_array().expect("array").iter().filter_map(|c| c["name"].as_str()).collect();
    for n in ["store", "auth", "delivery", "agent_supervisor", "gateway", "self_test"] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    assert!(startup["components"].as_array().expect("array").iter().all(|c| c["state"] == "ready"));
    let health = http.get(server.http("/health")).send().await.expect("health");
    assert_eq!(health.headers()["content-type"], "application/health+json");
    let body: serde_json::Value = health.json().await.expect("json");
    assert_eq!(body["status"], "pass");
    let metrics = http.get(server.http("/metrics")).send().await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("netra_startup_component_duration_seconds"), "{metrics}");
}

#[tokio::test]
async fn netra_chat_streams_a_full_run_from_stdin() {
    let server = Spawn::new().env("JWT_SECRET", "").ready().await;
    let out = server.cli(&["chat", "--user", "terminal"], "what is 6 * 7?\n").await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("calculator"), "{stdout}");
    assert!(stdout.contains("6 * 7 = 42."), "{stdout}");
    assert!(stdout.contains("[completed in"), "{stdout}");
}
