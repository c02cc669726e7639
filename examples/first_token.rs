//! Time from a model's first token to the client's first `partial_result` frame: what
//! netra adds between an OpenAI-compatible endpoint and the browser (reading the SSE
//! chunk, persisting the event, publishing it, writing the WebSocket frame).
//!
//! One process holds both ends, so both instants come from the same monotonic clock:
//! a fake OpenAI-compatible server (in-process, 127.0.0.1) records `Instant::now()` right
//! before it writes the first `content` chunk of a reply, and a WebSocket client records
//! `Instant::now()` when the first `partial_result` of that run arrives. The real `netra`
//! binary runs in between (SQLite in a temp dir). The fake holds the rest of the reply
//! until the client has seen that first frame, so the first chunk travels alone.
//! Runs go one after another into one thread; the first 10 are dropped as warm-up.
//!
//!     cargo build --release && cargo run --release --example first_token [-- NETRA_BIN]
//!
//! Env: RUNS (default 300, warm-up included), NETRA_BIN (default
//! `$CARGO_TARGET_DIR/release/netra`, CARGO_TARGET_DIR default `$HOME/.cache/netra-target`).
//! Prints one JSON line on stdout and a human summary on stderr.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use netra::auth::{Keys, TokenKind, User};
use netra::client::{Auth, Client};
use netra::config::Secret;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{Notify, mpsc};

const WARMUP: usize = 10;
/// Longest any single step (startup, one frame) may take before the benchmark gives up.
const WAIT: Duration = Duration::from_secs(15);

struct Settings {
    netra_bin: PathBuf,
    runs: usize,
    path: Option<std::ffi::OsString>,
}

#[allow(clippy::disallowed_methods)]
fn settings() -> Settings {
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("HOME").expect("HOME or CARGO_TARGET_DIR is set")).join(".cache/netra-target")
    });
    let netra_bin = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("NETRA_BIN").ok())
        .map(PathBuf::from)
        .unwrap_or_else(|| target.join("release/netra"));
    let runs = std::env::var("RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    Settings { netra_bin, runs, path: std::env::var_os("PATH") }
}

/// The fake model: every reply's first-token instant, in request order, and the gate
/// that holds each reply's remaining chunks until the client has seen the first one.
#[derive(Clone)]
struct Fake {
    first_token: Arc<Mutex<Vec<Instant>>>,
    rest: Arc<Notify>,
}

fn chunk(v: Value) -> String {
    format!("data: {v}\n\n")
}

fn content(text: &str) -> String {
    chunk(json!({"choices": [{"index": 0, "delta": {"content": text}}]}))
}

async fn completions(State(fake): State<Fake>, _request: Bytes) -> Response {
    let (tx, rx) = mpsc::channel::<String>(1);
    tokio::spawn(async move {
        let first = content("Hello");
        fake.first_token.lock().expect("first-token lock").push(Instant::now());
        if tx.send(first).await.is_err() {
            return;
        }
        fake.rest.notified().await;
        let rest = [
            content(" from"),
            content(" the"),
            content(" fake"),
            chunk(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})),
            chunk(json!({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 4}})),
            "data: [DONE]\n\n".to_string(),
        ];
        for piece in rest {
            if tx.send(piece).await.is_err() {
                return;
            }
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|piece| (Ok::<_, Infallible>(piece), rx))
    });
    ([(header::CONTENT_TYPE, "text/event-stream")], Body::from_stream(body)).into_response()
}

async fn start_fake() -> (Fake, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the fake model");
    let addr = listener.local_addr().expect("fake model address");
    // Without TCP_NODELAY the lone first chunk waits for the ACK of the response head
    // (Nagle against delayed ACK: ~40 ms on Linux), which would measure the fake, not netra.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        tcp.set_nodelay(true).expect("TCP_NODELAY on the fake model's connection");
    });
    let fake = Fake { first_token: Arc::new(Mutex::new(Vec::new())), rest: Arc::new(Notify::new()) };
    let router = axum::Router::new()
        .route("/v1/models", get(|| async { Json(json!({"data": []})) }))
        .route("/v1/chat/completions", post(completions))
        .with_state(fake.clone());
    tokio::spawn(async move { axum::serve(listener, router).await.expect("fake model serves") });
    (fake, addr)
}

/// Starts `netra serve` against the fake and returns it once `/health/ready` answers 200.
async fn start_netra(s: &Settings, fake: SocketAddr, secret: &str, data_dir: &std::path::Path) -> (Child, SocketAddr) {
    let mut cmd = Command::new(&s.netra_bin);
    cmd.arg("serve").env_clear().stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true);
    if let Some(path) = &s.path {
        cmd.env("PATH", path);
    }
    cmd.env("PORT", "0")
        .env("NETRA_DATA_DIR", data_dir)
        .env("JWT_SECRET", secret)
        .env("LLM_BASE_URL", format!("http://{fake}/v1"))
        .env("LLM_MODEL", "fake")
        .env("NETRA_LOG", "warn")
        .env("NETRA_RATE_LIMIT", "100000");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {} (build it with cargo build --release): {e}", s.netra_bin.display()));
    let stdout = child.stdout.take().expect("netra stdout is piped");
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
    .expect("netra prints its address in time")
    .expect("netra prints `listening on http://ADDR`");
    // Keep draining stdout so netra never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let http = reqwest::Client::new();
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(r) = http.get(format!("http://{addr}/health/ready")).send().await
            && r.status() == 200
        {
            return (child, addr);
        }
        assert!(Instant::now() < deadline, "netra not ready within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The next text frame as JSON, with the instant it came off the socket.
async fn next_frame(ws: &mut Client) -> (Value, Instant) {
    let frame = tokio::time::timeout(WAIT, ws.next_frame()).await.expect("a frame within the deadline");
    (frame.expect("a frame from netra"), Instant::now())
}

/// Nearest-rank percentile of sorted samples, in microseconds.
fn percentile(sorted: &[Duration], p: f64) -> u128 {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_micros()
}

#[tokio::main]
async fn main() {
    let s = settings();
    assert!(s.runs > WARMUP, "RUNS must be above the {WARMUP} warm-up runs");
    let (fake, fake_addr) = start_fake().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = format!("bench-secret-{}", uuid::Uuid::new_v4().simple());
    let (mut child, addr) = start_netra(&s, fake_addr, &secret, dir.path()).await;

    let token =
        Keys::new(&Secret::new(secret.clone())).mint(&User::new("bench"), TokenKind::Access, Duration::from_secs(3600));
    let mut ws = Client::open(&format!("ws://{addr}/ws"), &Auth::Header(token)).await.expect("open the socket");
    let (hello, _) = next_frame(&mut ws).await;
    assert_eq!(hello["payload"]["event"], "connection_established", "{hello}");

    let mut thread_id: Option<String> = None;
    let mut latencies = Vec::with_capacity(s.runs);
    for run in 0..s.runs {
        let mut payload = json!({"content": format!("message {run}")});
        if let Some(id) = &thread_id {
            payload["thread_id"] = json!(id);
        }
        ws.send(&json!({"type": "user_message", "payload": payload})).await.expect("send user_message");
        let mut first_partial: Option<Instant> = None;
        loop {
            let (frame, at) = next_frame(&mut ws).await;
            if thread_id.is_none() {
                thread_id = frame["thread_id"].as_str().map(str::to_string);
            }
            match frame["type"].as_str() {
                Some("partial_result") if first_partial.is_none() => {
                    assert_eq!(frame["payload"]["content"], "Hello", "the first token arrives alone: {frame}");
                    first_partial = Some(at);
                    fake.rest.notify_one();
                }
                Some("final_report") => break,
                Some("error" | "agent_error") => panic!("run {run} failed: {frame}"),
                _ => {}
            }
        }
        let received = first_partial.unwrap_or_else(|| panic!("run {run} ended without a partial_result"));
        let sent = {
            let first_token = fake.first_token.lock().expect("first-token lock");
            assert_eq!(first_token.len(), run + 1, "one model request per run");
            first_token[run]
        };
        latencies.push(received.duration_since(sent));
    }

    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().expect("netra still running").to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM failed");
    let exit = tokio::time::timeout(WAIT, child.wait()).await.expect("netra exits after SIGTERM").expect("wait");

    let mut measured = latencies.split_off(WARMUP);
    measured.sort();
    let (p50, p90, p99) = (percentile(&measured, 0.50), percentile(&measured, 0.90), percentile(&measured, 0.99));
    let max = measured.last().expect("at least one measured run").as_micros();
    println!(
        "{}",
        json!({"scenario": "first_token", "runs": s.runs, "warmup": WARMUP,
               "p50_us": p50, "p90_us": p90, "p99_us": p99, "max_us": max})
    );
    eprintln!(
        "first token -> first partial_result over {} runs (after {WARMUP} warm-up): p50 {p50} us, p90 {p90} us, \
         p99 {p99} us, max {max} us; netra exited {exit}",
        measured.len()
    );
}
