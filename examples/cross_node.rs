//! Delivery latency between nodes: one user with a tab on node A and a tab on node B
//! (two netra processes on one PostgreSQL and one Redis, started by bench/cluster). The
//! tab on A sends RUNS messages one after another into one thread; for every event of
//! every run, the time from the send to its arrival is taken at both tabs, on one clock
//! (one process holds both). A's tab is served by the node running the run (same-node
//! delivery), B's through Redis (cross-node). The first 10 runs are warm-up.
//!
//!     cargo run --release --example cross_node -- ws://127.0.0.1:A/ws ws://127.0.0.1:B/ws
//!
//! Env: JWT_SECRET (the nodes' secret), RUNS (default 300). Prints one JSON line.

use std::time::{Duration, Instant};

use netra::auth::{Keys, TokenKind, User};
use netra::client::{Auth, Client as Socket};
use netra::config::Secret;
use serde_json::{Value, json};

async fn open(url: &str, token: &str) -> Socket {
    let mut socket = Socket::open(url, &Auth::Header(token.to_string())).await.expect("connect");
    let hello = next(&mut socket).await;
    assert_eq!(hello["payload"]["event"], "connection_established", "{hello}");
    socket
}

async fn next(socket: &mut Socket) -> Value {
    tokio::time::timeout(Duration::from_secs(30), socket.next_frame())
        .await
        .expect("a frame within 30 s")
        .expect("a frame")
}

/// Arrival times (ms after `sent`) of one run's events, by seq, until its final report.
async fn arrivals(socket: &mut Socket, sent: Instant) -> (Vec<(u64, f64)>, Value) {
    let mut times = Vec::new();
    loop {
        let frame = next(socket).await;
        let at = sent.elapsed().as_secs_f64() * 1000.0;
        if let Some(seq) = frame["seq"].as_u64() {
            times.push((seq, at));
        }
        if frame["type"] == "final_report" || frame["type"] == "error" {
            return (times, frame);
        }
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    (sorted[i] * 100.0).round() / 100.0
}

fn summary(mut xs: Vec<f64>) -> Value {
    xs.sort_by(f64::total_cmp);
    json!({"p50": quantile(&xs, 0.5), "p90": quantile(&xs, 0.9), "p99": quantile(&xs, 0.99),
           "max": quantile(&xs, 1.0), "n": xs.len()})
}

#[tokio::main]
#[allow(clippy::disallowed_methods)] // a benchmark reads its sizes from the environment
async fn main() {
    let mut args = std::env::args().skip(1);
    let (url_a, url_b) = (args.next().expect("URL of node A"), args.next().expect("URL of node B"));
    let secret = std::env::var("JWT_SECRET").expect("JWT_SECRET: the nodes' secret");
    let runs: usize = std::env::var("RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(300);
    let keys = Keys::new(&Secret::new(secret));
    let user = format!("cross-{}", std::process::id());
    let token = keys.mint(&User::new(&user), TokenKind::Access, Duration::from_secs(3600));
    let mut on_a = open(&url_a, &token).await;
    let mut on_b = open(&url_b, &token).await;
    // B subscribes to the user's channel asynchronously after its hello.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (mut same, mut cross, mut extra, mut final_a, mut final_b) = (vec![], vec![], vec![], vec![], vec![]);
    let mut thread_id: Option<String> = None;
    let mut missing = 0usize;
    for i in 0..runs {
        let text = format!("what is {i} + {i}?");
        let sent = Instant::now();
        let frame = json!({"type": "user_message", "payload": {"content": text, "thread_id": thread_id}});
        on_a.send(&frame).await.expect("send");
        let ((at_a, end_a), (at_b, _)) = tokio::join!(arrivals(&mut on_a, sent), arrivals(&mut on_b, sent));
        thread_id = end_a["thread_id"].as_str().map(str::to_string);
        let seqs_a: Vec<u64> = at_a.iter().map(|(s, _)| *s).collect();
        let seqs_b: Vec<u64> = at_b.iter().map(|(s, _)| *s).collect();
        if seqs_a != seqs_b {
            missing += 1;
        }
        if i < 10 {
            continue;
        }
        for ((_, a), (_, b)) in at_a.iter().zip(&at_b) {
            same.push(*a);
            cross.push(*b);
            extra.push(b - a);
        }
        final_a.push(at_a.last().map_or(f64::NAN, |x| x.1));
        final_b.push(at_b.last().map_or(f64::NAN, |x| x.1));
    }
    println!(
        "{}",
        json!({
            "scenario": "cross_node", "runs": runs, "warmup": 10, "runs_with_different_events": missing,
            "events_same_node_ms": summary(same), "events_cross_node_ms": summary(cross),
            "cross_minus_same_ms": summary(extra),
            "final_report_same_node_ms": summary(final_a), "final_report_cross_node_ms": summary(final_b),
        })
    );
}
