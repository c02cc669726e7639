//! PostgreSQL stopped and started again under a running server. This test restarts the
//! machine's shared PostgreSQL, so scripts/test runs it alone, after the rest.

mod common;

use std::time::Duration;

use common::{Backend, Spawn};
use serde_json::json;

fn pg_ctl(action: &str) {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("/etc/postgresql")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .next()
        .expect("a PostgreSQL cluster");
    let status = std::process::Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", action, "-m", "fast"])
        .status()
        .expect("pg_ctlcluster");
    assert!(status.success(), "pg_ctlcluster {action} failed");
}

/// Starts PostgreSQL again even if the test fails half-way.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        let _ = std::process::Command::new("sh")
            .args(["-c", "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | head -n1) main start"])
            .status();
    }
}

async fn ready_status(http: &reqwest::Client, url: &str) -> u16 {
    http.get(url).send().await.map(|r| r.status().as_u16()).unwrap_or(0)
}

async fn poll_until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "{what} did not happen within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn postgres_outage_turns_unready_answers_errors_and_recovers() {
    let server = Spawn::new().backend(Backend::Postgres).await.env("NETRA_AGENT_TOKEN_DELAY", "0ms").ready().await;
    let http = reqwest::Client::new();
    let ready = server.http("/health/ready");
    let mut tab = server.connect("outage").await;
    let before = tab.chat("before the outage", None).await;
    let thread = before[0]["thread_id"].as_str().expect("thread").to_string();

    let _restart = Restart;
    pg_ctl("stop");
    poll_until("readiness turning 503", async || ready_status(&http, &ready).await == 503).await;
    tab.send(
        json!({"type": "user_message", "payload": {"content": "during", "thread_id": thread}, "message_id": "m1"}),
    )
    .await;
    let error = tab.next().await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["payload"]["code"], "internal");
    assert_eq!(error["payload"]["ref"], "m1");
    // On a new connection: the pooled one may have idled past NETRA_HEADER_TIMEOUT while
    // the write above waited for the database, and a server closes such a connection.
    let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("client");
    assert_eq!(ready_status(&fresh, &server.http("/health/live")).await, 200);

    pg_ctl("start");
    poll_until("readiness returning to 200", async || ready_status(&http, &ready).await == 200).await;
    let after = tab.chat("after the outage", Some(&thread)).await;
    assert_eq!(after.last().expect("frames")["type"], "final_report");
    let last_before = before.last().and_then(|f| f["seq"].as_u64()).expect("seq");
    assert_eq!(after[0]["seq"].as_u64(), Some(last_before + 1), "nothing half-written during the outage");
}
