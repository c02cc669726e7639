//! Analytics into a real ClickHouse (Debian's clickhouse-server, started per test by
//! `scripts/clickhouse` on free ports): rows arrive with their values; ClickHouse stopped
//! mid-traffic leaves chat working while the spool grows, and its return drains the
//! spool with every row once; a spool left by a stopped server is sent by the next; a
//! missing or misconfigured ClickHouse is degraded when optional and stops startup,
//! naming what to fix, when required.
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Server, Spawn, WAIT, unique};
use netra::auth::{TokenKind, User};
use serde_json::{Value, json};

/// Longest a row, a spool drain or a health change may take to show.
const WITHIN: Duration = Duration::from_secs(30);

/// A ClickHouse server of the test's own, in a temporary directory.
struct ClickHouse {
    dir: tempfile::TempDir,
    port: u16,
    http: reqwest::Client,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/clickhouse")
}

fn clickhouse_script(args: &[&str]) -> String {
    let out = std::process::Command::new(script()).args(args).output().expect("run scripts/clickhouse");
    assert!(out.status.success(), "scripts/clickhouse {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl ClickHouse {
    async fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("netra-ch-").tempdir().expect("tempdir");
        let path = dir.path().display().to_string();
        let port = tokio::task::spawn_blocking(move || clickhouse_script(&["start", &path]))
            .await
            .expect("join")
            .parse()
            .expect("the script prints the HTTP port");
        Self { dir, port, http: reqwest::Client::new() }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn stop(&self) {
        let path = self.dir.path().display().to_string();
        tokio::task::spawn_blocking(move || clickhouse_script(&["stop", &path])).await.expect("join");
    }

    /// Starts it again on the same port, with its data.
    async fn restart(&self) {
        let (path, port) = (self.dir.path().display().to_string(), self.port.to_string());
        tokio::task::spawn_blocking(move || clickhouse_script(&["start", &path, &port])).await.expect("join");
    }

    /// Rows of a `SELECT` (as the `default` user), or none while the table is missing.
    async fn rows(&self, sql: &str) -> Vec<Value> {
        let response = self
            .http
            .post(format!("{}/", self.url()))
            .body(format!("{sql} FORMAT JSONEachRow"))
            .send()
            .await
            .expect("ClickHouse answers");
        let status = response.status();
        let text = response.text().await.expect("body");
        if !status.is_success() {
            assert!(text.contains("doesn't exist"), "{sql}: {status} {text}");
            return Vec::new();
        }
        text.lines().map(|l| serde_json::from_str(l).expect("JSON rows")).collect()
    }

    async fn count(&self, sql: &str) -> u64 {
        let rows = self.rows(sql).await;
        rows.first().map_or(0, |r| r["n"].as_str().and_then(|n| n.parse().ok()).or(r["n"].as_u64()).unwrap_or(0))
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        let _ = std::process::Command::new(script()).args(["stop", &self.dir.path().display().to_string()]).output();
    }
}

/// A netra writing analytics to `ch` into a database of its own, as user `netra`.
fn with_analytics(spawn: Spawn, ch: &ClickHouse, database: &str) -> Spawn {
    spawn
        .env("CLICKHOUSE_URL", ch.url())
        .env("CLICKHOUSE_USER", "netra")
        .env("CLICKHOUSE_PASSWORD", "netra-secret")
        .env("CLICKHOUSE_DATABASE", database)
        .env("NETRA_ANALYTICS_INTERVAL", "100ms")
        .env("NETRA_AGENT_TOKEN_DELAY", "0")
}

async fn health(server: &Server) -> Value {
    reqwest::get(server.http("/health")).await.expect("health").json().await.expect("json")
}

async fn analytics_state(server: &Server) -> (String, String) {
    let h = health(server).await;
    let check = &h["checks"]["analytics"][0];
    (check["state"].as_str().unwrap_or("missing").to_string(), check["output"].as_str().unwrap_or("").to_string())
}

fn spool_files(server: &Server) -> usize {
    std::fs::read_dir(server.data_dir.join("analytics-spool")).map_or(0, |d| d.count())
}

/// Runs `n` chats for `user`, each in a thread of its own; returns their run ids and the
/// slowest run's time.
async fn chats(server: &Server, user: &str, n: usize) -> (Vec<String>, Duration) {
    let mut client = server.connect(user).await;
    let mut runs = Vec::new();
    let mut slowest = Duration::ZERO;
    for _ in 0..n {
        let started = std::time::Instant::now();
        let frames = client.chat("what is 6 * 7?", None).await;
        slowest = slowest.max(started.elapsed());
        let last = frames.last().expect("frames");
        assert_eq!(last["type"], "final_report", "{last}");
        runs.push(last["run_id"].as_str().expect("run_id").to_string());
    }
    (runs, slowest)
}

#[tokio::test]
async fn rows_arrive_with_their_values_and_stats_answer_from_them() {
    let ch = ClickHouse::start().await;
    let db = unique("t").replace('-', "_");
    let server = with_analytics(Spawn::new(), &ch, &db).ready().await;
    assert_eq!(analytics_state(&server).await.0, "ready");

    let user = unique("alice");
    let mut client = server.connect(&user).await;
    let frames = client.chat("what is 6 * 7?", None).await;
    let run_id = frames.last().expect("frames")["run_id"].as_str().expect("run id").to_string();
    let thread_id = frames.last().expect("frames")["thread_id"].as_str().expect("thread id").to_string();
    client.send_text("{not json").await;
    let error = client.next().await;
    assert_eq!(error["payload"]["code"], "invalid_json", "{error}");
    client.ws.close(None).await.expect("close");
    drop(client);

    let runs = format!("SELECT * FROM {db}.runs WHERE user_id = '{user}'");
    common::eventually("the run's row", WITHIN, || async { !ch.rows(&runs).await.is_empty() }).await;
    let run = &ch.rows(&runs).await[0];
    assert_eq!(run["run_id"], run_id.as_str());
    assert_eq!(run["thread_id"], thread_id.as_str());
    assert_eq!(run["status"], "completed");
    assert_eq!(run["error_code"], "");
    assert_eq!(run["provider"], "builtin");
    let node = std::fs::read_to_string(server.data_dir.join("node_id")).expect("the node id kept in the data dir");
    assert_eq!(run["node"], node.trim(), "the node's generated id");
    assert!(run["tool_calls"].as_u64().expect("tool calls") >= 1, "the calculator: {run}");
    assert!(run["first_token_ms"].is_u64(), "text was streamed: {run}");
    assert!(run["total_ms"].as_u64().expect("total") >= run["first_token_ms"].as_u64().expect("first"));

    let sessions = format!("SELECT * FROM {db}.sessions WHERE user_id = '{user}'");
    common::eventually("the session's row", WITHIN, || async { !ch.rows(&sessions).await.is_empty() }).await;
    let session = &ch.rows(&sessions).await[0];
    assert_eq!(session["close_code"], 1005, "a close frame without a code: {session}");
    assert_eq!(session["client"], "netra");
    assert_eq!(session["frames_in"], "2", "the chat and the bad frame: {session}");
    let frames_out: u64 = session["frames_out"].as_str().expect("quoted UInt64").parse().expect("number");
    assert_eq!(frames_out, frames.len() as u64 + 2, "the hello, the run and the error: {session}");

    let errors = format!("SELECT * FROM {db}.errors WHERE user_id = '{user}'");
    common::eventually("the error's row", WITHIN, || async { !ch.rows(&errors).await.is_empty() }).await;
    let error = &ch.rows(&errors).await[0];
    assert_eq!(error["code"], "invalid_json");
    assert_eq!(error["where"], "socket");

    // The self-test's run is netra's own, not a user's.
    let own = format!("SELECT count() AS n FROM {db}.runs WHERE user_id = 'netra-self-test'");
    assert_eq!(ch.count(&own).await, 0);

    // `netra stats` and the admin route answer from the same rows.
    let out = server.cli(&["stats", "--json", "--hours", "1"], "").await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert!(report["runs"].as_u64().expect("runs") >= 1, "{report}");
    assert!(report["top_users"].as_array().expect("users").iter().any(|u| u["user_id"] == user.as_str()), "{report}");
    assert!(report["first_token_ms"]["p50"].is_number(), "{report}");
    assert!(report["errors"].as_array().expect("errors").iter().any(|e| e["code"] == "invalid_json"), "{report}");
    let text = server.cli(&["stats"], "").await;
    assert!(String::from_utf8_lossy(&text.stdout).contains("time to first token"));

    let http = reqwest::Client::new();
    let plain = http.get(server.http("/api/admin/stats")).bearer_auth(server.token(&user)).send().await.expect("get");
    assert_eq!(plain.status(), 403, "a user without the admin permission");
    let mut admin = User::new(unique("ops"));
    admin.permissions = vec!["admin".into()];
    let token = server.keys().mint(&admin, TokenKind::Access, Duration::from_secs(60));
    let response = http.get(server.http("/api/admin/stats?hours=2")).bearer_auth(&token).send().await.expect("get");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["hours"], 2);
    assert!(body["runs"].as_u64().expect("runs") >= 1, "{body}");
    let bad = http.get(server.http("/api/admin/stats?hours=0")).bearer_auth(&token).send().await.expect("get");
    assert_eq!(bad.status(), 422);
}

#[tokio::test]
async fn clickhouse_stopped_mid_traffic_spools_then_every_row_arrives_once() {
    let ch = ClickHouse::start().await;
    let db = unique("t").replace('-', "_");
    let server = with_analytics(Spawn::new(), &ch, &db).ready().await;
    let user = unique("bob");
    let (mut all, before) = chats(&server, &user, 5).await;
    let counted = format!("SELECT count() AS n FROM {db}.runs WHERE user_id = '{user}'");
    common::eventually("the first runs' rows", WITHIN, || async { ch.count(&counted).await == 5 }).await;

    ch.stop().await;
    let (during, slowest) = chats(&server, &user, 10).await;
    all.extend(during);
    // Chat does not wait for analytics: no run takes long, whatever ClickHouse does.
    assert!(slowest < Duration::from_secs(2), "slowest run {slowest:?} with ClickHouse away (before: {before:?})");
    common::eventually("analytics to say degraded", WITHIN, || async {
        analytics_state(&server).await.0 == "degraded"
    })
    .await;
    common::eventually("batches in the spool", WITHIN, || async { spool_files(&server) > 0 }).await;
    let (state, output) = analytics_state(&server).await;
    assert!(output.contains("ClickHouse"), "{state}: {output}");
    let live: Value = reqwest::get(server.http("/health/ready")).await.expect("ready").json().await.expect("json");
    assert_eq!(live["status"], "ready", "optional analytics never makes the node unready");

    ch.restart().await;
    common::eventually("every run's row", WITHIN, || async { ch.count(&counted).await >= 15 }).await;
    common::eventually("the spool to empty", WITHIN, || async { spool_files(&server) == 0 }).await;
    common::eventually("analytics to say ready", WITHIN, || async { analytics_state(&server).await.0 == "ready" })
        .await;
    let rows =
        ch.rows(&format!("SELECT run_id, count() AS n FROM {db}.runs WHERE user_id = '{user}' GROUP BY run_id")).await;
    let mut seen: Vec<String> = rows.iter().map(|r| r["run_id"].as_str().expect("run id").to_string()).collect();
    assert!(rows.iter().all(|r| r["n"] == "1"), "a row written twice: {rows:?}");
    seen.sort();
    all.sort();
    assert_eq!(seen, all);
    let metrics = reqwest::get(server.http("/metrics")).await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("netra_analytics_rows_total{outcome=\"spooled\"}"), "{metrics}");
}

#[tokio::test]
async fn a_spool_left_by_a_stopped_server_is_sent_by_the_next() {
    let ch = ClickHouse::start().await;
    ch.stop().await;
    let db = unique("t").replace('-', "_");
    let data = tempfile::tempdir().expect("tempdir");
    // Missing at start and optional: ready, analytics degraded.
    let mut server = with_analytics(Spawn::new(), &ch, &db).data_dir(data.path().to_path_buf()).ready().await;
    let (state, output) = analytics_state(&server).await;
    assert_eq!(state, "degraded", "{output}");
    assert!(output.contains(&ch.url()), "names the server: {output}");
    let user = unique("carol");
    let (runs, _) = chats(&server, &user, 3).await;
    server.signal("TERM");
    assert_eq!(server.wait_exit().await, Some(0));
    let left = std::fs::read_dir(data.path().join("analytics-spool")).expect("spool").count();
    assert!(left > 0, "the last rows were spooled at shutdown");

    ch.restart().await;
    let server = with_analytics(Spawn::new(), &ch, &db).data_dir(data.path().to_path_buf()).ready().await;
    let counted = format!("SELECT count() AS n FROM {db}.runs WHERE user_id = '{user}'");
    common::eventually("the spooled runs", WITHIN, || async { ch.count(&counted).await == runs.len() as u64 }).await;
    common::eventually("the spool to empty", WITHIN, || async { spool_files(&server) == 0 }).await;
    let sessions = format!("SELECT count() AS n FROM {db}.sessions WHERE user_id = '{user}'");
    assert_eq!(ch.count(&sessions).await, 1);
    // Nothing more arrives later: every row once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ch.count(&counted).await, runs.len() as u64);
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

#[tokio::test]
async fn missing_and_required_stops_startup_naming_it() {
    let url = format!("http://127.0.0.1:{}", closed_port());
    let mut server = Spawn::new().env("CLICKHOUSE_URL", &url).env("CLICKHOUSE_REQUIRED", "true").start().await;
    let code = tokio::time::timeout(WAIT * 2, server.wait_exit()).await.expect("exits");
    assert_ne!(code, Some(0));
    let stderr = server.stderr();
    assert!(stderr.contains("analytics") && stderr.contains(&url), "{stderr}");
}

#[tokio::test]
async fn a_wrong_password_is_named_and_never_shown() {
    let ch = ClickHouse::start().await;
    let wrong = "hunter2-not-it";
    let spawn = || {
        Spawn::new()
            .env("CLICKHOUSE_URL", ch.url())
            .env("CLICKHOUSE_USER", "netra")
            .env("CLICKHOUSE_PASSWORD", wrong)
            .env("CLICKHOUSE_DATABASE", unique("t").replace('-', "_"))
    };
    let optional = spawn().ready().await;
    let (state, output) = analytics_state(&optional).await;
    assert_eq!(state, "degraded");
    assert!(output.contains("CLICKHOUSE_PASSWORD"), "{output}");
    assert!(!output.contains(wrong));
    drop(optional);

    let mut required = spawn().env("CLICKHOUSE_REQUIRED", "true").start().await;
    let code = tokio::time::timeout(WAIT * 2, required.wait_exit()).await.expect("exits");
    assert_ne!(code, Some(0));
    let stderr = required.stderr();
    assert!(stderr.contains("CLICKHOUSE_PASSWORD"), "{stderr}");
    assert!(!stderr.contains(wrong), "the password never reaches the log");
}

#[tokio::test]
async fn analytics_off_serves_no_report() {
    let server = Server::start().await;
    let h = health(&server).await;
    assert!(h["checks"].get("analytics").is_none(), "no component when off: {h}");
    let mut admin = User::new(unique("ops"));
    admin.permissions = vec!["admin".into()];
    let token = server.keys().mint(&admin, TokenKind::Access, Duration::from_secs(60));
    let response =
        reqwest::Client::new().get(server.http("/api/admin/stats")).bearer_auth(&token).send().await.expect("get");
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body, json!({"detail": "analytics is off: set CLICKHOUSE_URL"}));
    let out = server.cli(&["stats"], "").await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CLICKHOUSE_URL"));
}
