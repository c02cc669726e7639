//! Persisted events per second through the real delivery path (group commit, seq
//! assignment, publish), with N producers each appending to its own thread the way a run
//! emits: one event at a time, each awaited. Prints one JSON line per run.
//!
//!     cargo run --release --example persist -- sqlite 1 10 100
//!     cargo run --release --example persist -- postgres://postgres@127.0.0.1:5432/test 1 10 100
//!
//! Env: EVENTS (total per run, default 20000), PAYLOAD (bytes of text per event, default 64),
//! SQLITE_PATH (keep the SQLite database at this path instead of a temp dir: bench/run
//! uses it to build a data dir holding 1M events), WINDOW (commits each producer keeps in flight, default 1: every event awaited; a run
//! streaming its events pipelines them the way WINDOW > 1 does).

use std::time::{Duration, Instant};

use netra::config::{DatabaseUrl, Secret};
use netra::delivery::Delivery;
use netra::protocol::EventType;
use netra::store::{NewEvent, Row, Store, WriteJob};
use serde_json::value::RawValue;
use tokio_util::task::TaskTracker;

fn event(kind: EventType, text: &str) -> NewEvent {
    NewEvent {
        kind,
        run_id: Some("run_bench".into()),
        agent_name: Some("supervisor"),
        timestamp: netra::protocol::now_rfc3339(),
        payload: RawValue::from_string(serde_json::json!({"content": text, "is_complete": false}).to_string())
            .expect("json"),
    }
}

#[allow(clippy::disallowed_methods)]
fn setting(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[allow(clippy::disallowed_methods)]
fn sqlite_path(dir: &std::path::Path) -> std::path::PathBuf {
    std::env::var("SQLITE_PATH").map(Into::into).unwrap_or_else(|_| dir.join("bench.db"))
}

async fn open(target: &str, dir: &std::path::Path) -> (Store, String) {
    if target == "sqlite" {
        let url = DatabaseUrl::Sqlite(sqlite_path(dir));
        return (Store::connect(&url, Duration::from_secs(10)).await.expect("sqlite"), "sqlite".into());
    }
    use sqlx::Connection;
    let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(target).await.expect("postgres reachable");
    sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&mut conn).await.expect("schema");
    let sep = if target.contains('?') { '&' } else { '?' };
    let url = format!("{target}{sep}options=-c%20search_path%3D{schema}");
    let store = Store::connect(&DatabaseUrl::Postgres(Secret::new(url)), Duration::from_secs(10)).await.expect("pg");
    (store, "postgres".into())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let target = args.first().cloned().unwrap_or_else(|| "sqlite".into());
    let producers: Vec<usize> = args.iter().skip(1).filter_map(|a| a.parse().ok()).collect();
    let producers = if producers.is_empty() { vec![1, 10, 100] } else { producers };
    let total = setting("EVENTS", 20_000);
    let text = "x".repeat(setting("PAYLOAD", 64));
    let window = setting("WINDOW", 1).max(1);
    for n in producers {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, backend) = open(&target, dir.path()).await;
        let tracker = TaskTracker::new();
        let delivery = Delivery::start(store.clone(), 500, 2 * 1024 * 1024, &tracker, netra::broker::Broker::local());
        let per = total / n;
        let mut threads = Vec::new();
        for i in 0..n {
            let thread_id = format!("th_bench_{i}_{}", uuid::Uuid::new_v4().simple());
            let job = WriteJob {
                thread_id: thread_id.clone(),
                rows: vec![Row::CreateThread { owner_id: "bench".into(), title: "bench".into() }],
                events: vec![event(EventType::ThreadCreated, "")],
                expected_last_seq: None,
            };
            delivery.commit(job, "bench").await.expect("create thread");
            threads.push(thread_id);
        }
        let started = Instant::now();
        let mut tasks = Vec::new();
        for thread_id in threads {
            let delivery = delivery.clone();
            let text = text.clone();
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per);
                let mut in_flight = std::collections::VecDeque::new();
                for _ in 0..per {
                    let job = WriteJob {
                        thread_id: thread_id.clone(),
                        rows: vec![],
                        events: vec![event(EventType::PartialResult, &text)],
                        expected_last_seq: None,
                    };
                    in_flight.push_back((Instant::now(), delivery.submit(job, "bench").await.expect("submit")));
                    if in_flight.len() >= window {
                        let (t, w) = in_flight.pop_front().expect("non-empty");
                        w.wait().await.expect("commit");
                        latencies.push(t.elapsed());
                    }
                }
                for (t, w) in in_flight {
                    w.wait().await.expect("commit");
                    latencies.push(t.elapsed());
                }
                latencies
            }));
        }
        let mut latencies = Vec::with_capacity(total);
        for t in tasks {
            latencies.extend(t.await.expect("producer"));
        }
        let elapsed = started.elapsed();
        store.close().await.expect("checkpoint");
        latencies.sort();
        let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
        let events = latencies.len();
        println!(
            "{}",
            serde_json::json!({
                "scenario": "persist", "backend": backend, "producers": n, "events": events,
                "events_per_s": (events as f64 / elapsed.as_secs_f64()).round(),
                "commit_p50_us": pct(0.50).as_micros(), "commit_p99_us": pct(0.99).as_micros(),
                "payload_bytes": text.len(), "window": window,
            })
        );
    }
}
