//! Test fixture: the real `netra` binary on port 0 with real configuration, a token
//! minter with the server's secret, and a WebSocket client that speaks the protocol.
//! No sleeps: every wait polls with a deadline or waits on a frame.
#![allow(dead_code, unreachable_pub, clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use netra::auth::{Keys, TokenKind, User};
use netra::config::Secret;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

pub const WAIT: Duration = Duration::from_secs(15);

/// A fresh id, so tests sharing a database never see each other's data.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// A running `netra serve`. Dropping it sends SIGTERM and waits.
pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub secret: String,
    pub stderr_path: PathBuf,
    env: Vec<(String, String)>,
}

/// Builder for a server's environment.
pub struct Spawn {
    env: Vec<(String, String)>,
    data_dir: Option<PathBuf>,
    secret: String,
}

impl Default for Spawn {
    fn default() -> Self {
        Self::new()
    }
}

impl Spawn {
    pub fn new() -> Self {
        Self { env: Vec::new(), data_dir: None, secret: unique("test-secret") }
    }

    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.to_string(), value.into()));
        self
    }

    /// Reuse a data dir (restart tests).
    pub fn data_dir(mut self, dir: PathBuf) -> Self {
        self.data_dir = Some(dir);
        self
    }

    pub fn secret(mut self, secret: &str) -> Self {
        self.secret = secret.to_string();
        self
    }

    /// Starts the process and waits for its `listening on` line (not for readiness).
    pub async fn start(self) -> Server {
        let (tmp, data_dir) = match self.data_dir {
            Some(d) => (None, d),
            None => {
                let t = tempfile::tempdir().expect("tempdir");
                let d = t.path().to_path_buf();
                (Some(t), d)
            }
        };
        let stderr_path = data_dir.join(format!("stderr-{}.log", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&data_dir).expect("data dir");
        let mut env = vec![
            ("PORT".to_string(), "0".to_string()),
            ("NETRA_DATA_DIR".to_string(), data_dir.display().to_string()),
            ("JWT_SECRET".to_string(), self.secret.clone()),
            ("NETRA_LOG".to_string(), "info".to_string()),
        ];
        // The whole suite runs once per backend: scripts/test sets NETRA_TEST_BACKEND=postgres
        // for the second pass, which gives every server without an explicit DATABASE_URL a
        // fresh PostgreSQL schema.
        // A restart on the same data dir must find the same database, so the schema's URL
        // is remembered in the data dir.
        if std::env::var("NETRA_TEST_BACKEND").is_ok_and(|b| b == "postgres")
            && !self.env.iter().any(|(k, _)| k == "DATABASE_URL")
        {
            let remembered = data_dir.join("test-database-url");
            let url = match std::fs::read_to_string(&remembered) {
                Ok(url) => url,
                Err(_) => {
                    let url = fresh_pg_url().await;
                    std::fs::write(&remembered, &url).expect("remember the test database");
                    url
                }
            };
            env.push(("DATABASE_URL".to_string(), url));
        }
        for (k, v) in self.env {
            env.retain(|(ek, _)| *ek != k);
            env.push((k, v));
        }
        let (child, addr) = launch(&env, &stderr_path).await;
        Server { child: Some(child), addr, data_dir, _tmp: tmp, secret: self.secret, stderr_path, env }
    }

    /// Starts and waits for `/health/ready`.
    pub async fn ready(self) -> Server {
        let server = self.start().await;
        server.wait_ready().await;
        server
    }
}

async fn launch(env: &[(String, String)], stderr_path: &PathBuf) -> (Child, SocketAddr) {
    let stderr = std::fs::File::create(stderr_path).expect("stderr log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_netra"));
    cmd.arg("serve").env_clear().stdout(Stdio::piped()).stderr(stderr).kill_on_drop(true);
    for key in ["PATH", "HOME"] {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn netra");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(WAIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(a) = line.strip_prefix("listening on http://") {
                return a.parse::<SocketAddr>().ok();
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    let Some(addr) = addr else {
        let _ = child.start_kill();
        let log = std::fs::read_to_string(stderr_path).unwrap_or_default();
        panic!("netra printed no listening line; stderr:\n{log}");
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

impl Server {
    pub async fn start() -> Self {
        Spawn::new().ready().await
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn keys(&self) -> Keys {
        Keys::new(&Secret::new(self.secret.clone()))
    }

    pub fn token(&self, user: &str) -> String {
        self.keys().mint(&User::new(user), TokenKind::Access, Duration::from_secs(3600))
    }

    /// Runs another `netra` subcommand with this server's environment (minus PORT).
    pub async fn cli(&self, args: &[&str], stdin: &str) -> std::process::Output {
        use tokio::io::AsyncWriteExt;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_netra"));
        cmd.args(args).env_clear().stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        if let Some(v) = std::env::var_os("PATH") {
            cmd.env("PATH", v);
        }
        for (k, v) in self.env.iter().filter(|(k, _)| k != "PORT") {
            cmd.env(k, v);
        }
        cmd.env("PORT", self.addr.port().to_string());
        let mut child = cmd.spawn().expect("spawn netra cli");
        let mut input = child.stdin.take().expect("stdin");
        input.write_all(stdin.as_bytes()).await.expect("write stdin");
        drop(input);
        tokio::time::timeout(WAIT, child.wait_with_output()).await.expect("cli finishes in time").expect("cli output")
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub async fn wait_ready(&self) {
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(r) = client.get(self.http("/health/ready")).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "not ready in time; stderr:\n{}", self.stderr());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Opens a socket for `user` with a header token and reads `connection_established`.
    pub async fn connect(&self, user: &str) -> Client {
        let mut client = Client::open(&self.ws_url(), Auth::Header(self.token(user))).await.expect("connect");
        let first = client.next().await;
        assert_eq!(first["payload"]["event"], "connection_established", "{first}");
        client
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().and_then(Child::id).expect("running")
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status();
        assert!(status.map(|s| s.success()).unwrap_or(false), "kill -{signal} failed");
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self) -> Option<i32> {
        let mut child = self.child.take().expect("running");
        let status = tokio::time::timeout(WAIT, child.wait()).await.expect("exit in time").expect("wait");
        status.code()
    }

    /// SIGKILL, then start again on the same data dir and secret (new port).
    pub async fn kill_and_restart(&mut self) {
        self.signal("KILL");
        let _ = self.wait_exit().await;
        let (child, addr) = launch(&self.env, &self.stderr_path).await;
        self.child = Some(child);
        self.addr = addr;
        self.wait_ready().await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Some(pid) = child.id()
        {
            {
                let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
                let deadline = std::time::Instant::now() + Duration::from_secs(15);
                while std::time::Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = child.start_kill();
            }
        }
    }
}

pub use netra::client::{Auth, Closed, ends_run};

/// netra's client (`netra::client`) with the suite's deadline, and panics instead of
/// errors: a test that cannot read or send has failed.
pub struct Client(pub netra::client::Client);

impl std::ops::Deref for Client {
    type Target = netra::client::Client;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Client {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Client {
    pub async fn open(url: &str, auth: Auth) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        netra::client::Client::open(url, &auth).await.map(Self)
    }

    pub async fn send(&mut self, v: Value) {
        self.0.send(&v).await.expect("send");
    }

    pub async fn send_text(&mut self, text: &str) {
        self.0.send_text(text).await.expect("send");
    }

    /// The next text frame as JSON; panics on close or after the deadline.
    pub async fn next(&mut self) -> Value {
        match self.next_or_close().await {
            Ok(v) => v,
            Err(closed) => panic!("socket closed while waiting for a frame: {closed:?}"),
        }
    }

    /// The next text frame, or how the socket closed (a broken socket as 1006).
    pub async fn next_or_close(&mut self) -> Result<Value, Closed> {
        let next = tokio::time::timeout(WAIT, self.0.next_frame()).await.expect("a frame within the deadline");
        match next {
            Ok(v) => Ok(v),
            Err(netra::client::ClientError::Closed(closed)) => Err(closed),
            Err(netra::client::ClientError::Socket(_)) => Err(Closed { code: 1006, reason: String::new() }),
            Err(e) => panic!("{e}"),
        }
    }

    /// Reads until the socket closes, returning the frames before it and the close.
    pub async fn until_close(&mut self) -> (Vec<Value>, Closed) {
        let mut frames = Vec::new();
        loop {
            match self.next_or_close().await {
                Ok(v) => frames.push(v),
                Err(c) => return (frames, c),
            }
        }
    }

    /// Sends a message and collects frames until the run ends (`final_report`, a
    /// run-ending `error`, or a cancelled `agent_completed`).
    pub async fn chat(&mut self, text: &str, thread_id: Option<&str>) -> Vec<Value> {
        self.send(json!({"type": "user_message", "payload": {"content": text, "thread_id": thread_id}})).await;
        self.collect_run().await
    }

    pub async fn collect_run(&mut self) -> Vec<Value> {
        let mut frames = Vec::new();
        loop {
            let v = self.next().await;
            let end = ends_run(&v);
            frames.push(v);
            if end {
                return frames;
            }
        }
    }

    /// Reads until a frame matches, returning everything read.
    pub async fn until(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut frames = Vec::new();
        loop {
            let v = self.next().await;
            let hit = pred(&v);
            frames.push(v);
            if hit {
                return frames;
            }
        }
    }

    /// Asserts nothing arrives for `window` (used sparingly: only to prove absence).
    pub async fn expect_silence(&mut self, window: Duration) {
        if let Ok(Ok(frame)) = tokio::time::timeout(window, self.0.next_frame()).await {
            panic!("expected no frame, got {frame}");
        }
    }
}

pub fn types(frames: &[Value]) -> Vec<String> {
    frames.iter().map(|f| f["type"].as_str().unwrap_or_default().to_string()).collect()
}

/// Asserts `seq` rises by exactly one across the thread-scoped frames.
pub fn assert_dense(frames: &[Value]) {
    let seqs: Vec<u64> = frames.iter().filter_map(|f| f["seq"].as_u64()).collect();
    for pair in seqs.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "seq not dense: {seqs:?}");
    }
}

/// The PostgreSQL the suite runs against (`NETRA_TEST_DATABASE_URL`, set by scripts/test).
#[allow(clippy::disallowed_methods)]
pub fn pg_base_url() -> String {
    std::env::var("NETRA_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A URL for a fresh, empty schema in the test database, so each test starts clean.
pub async fn fresh_pg_url() -> String {
    use sqlx::Connection;
    let base = pg_base_url();
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&base).await.expect("PostgreSQL reachable (scripts/test starts it)");
    sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&mut conn).await.expect("create schema");
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}options=-c%20search_path%3D{schema}")
}

/// The two store backends every store test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub const BACKENDS: [Backend; 2] = [Backend::Sqlite, Backend::Postgres];

impl Spawn {
    /// Points the server at `backend`: the default SQLite file, or a fresh PG schema.
    pub async fn backend(self, backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => self,
            Backend::Postgres => self.env("DATABASE_URL", fresh_pg_url().await),
        }
    }
}

/// Polls `check` every 50 ms until it holds, failing the test after `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A redis-server of the test's own (Debian's binary) on a free port, nothing kept on
/// disk: it can be stopped and started mid-test without touching the machine's Redis.
pub struct Redis {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl Redis {
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let mut redis = Self { port, child: None };
        redis.up().await;
        redis
    }

    /// Starts it (again) on its port.
    pub async fn up(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's; scripts/test installs it)");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "redis-server did not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills it, as an outage would.
    pub fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.down();
    }
}
