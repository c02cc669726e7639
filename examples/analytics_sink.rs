//! The analytics sink's sustained throughput into a real ClickHouse: ROWS run rows go
//! through `Analytics::record` (the chat path's only call) as fast as the queue takes
//! them, then the sink is finished; rows per second is ROWS over the time until the last
//! one is inserted. The count in ClickHouse is checked against ROWS (nothing dropped,
//! nothing twice). The database is made for the run and dropped after it.
//!
//!     cargo run --release --example analytics_sink -- http://127.0.0.1:8123 [ROWS]
//!
//! Prints one JSON line on stdout.

use std::time::{Duration, Instant};

use netra::analytics::{self, Client, RunRow};
use netra::config::ClickHouse;
use netra::startup::Report;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url = args.next().expect("usage: analytics_sink CLICKHOUSE_URL [ROWS]");
    let rows: usize = args.next().map_or(1_000_000, |r| r.parse().expect("ROWS is a number"));
    let spool = tempfile::tempdir().expect("tempdir");
    let settings = ClickHouse {
        url,
        user: "default".into(),
        password: None,
        database: format!("bench_sink_{}", std::process::id()),
        required: false,
        queue: 20_000,
        batch: 5_000,
        interval: Duration::from_secs(1),
        spool_dir: spool.path().to_path_buf(),
        spool_bytes: 64 << 20,
    };
    let client = Client::new(&settings).expect("client");
    client.ensure_schema().await.expect("ClickHouse answers and takes the schema");
    let (sink_handle, sink) = analytics::start(&settings, client.clone(), "bench", Report::default());
    let started = Instant::now();
    let mut waits = 0u64;
    for i in 0..rows {
        // The chat path never waits; the benchmark does, to measure the sink, not drops.
        while sink_handle.queued() + 1 >= settings.queue {
            waits += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        sink_handle.record(RunRow {
            ts: analytics::unix_now(),
            run_id: format!("run_{i:016x}"),
            user_id: format!("user-{}", i % 1000),
            thread_id: format!("th_{:016x}", i / 4),
            node: "bench".into(),
            provider: "builtin",
            model: "builtin".into(),
            status: "completed",
            error_code: String::new(),
            queue_ms: 1,
            first_token_ms: Some(12),
            total_ms: 40,
            tokens_in: 100,
            tokens_out: 200,
            tool_calls: 1,
        });
    }
    sink.finish().await;
    let seconds = started.elapsed().as_secs_f64();
    let stored = client.select("SELECT count() AS n FROM runs").await.expect("count");
    let stored: u64 = stored[0]["n"].as_str().and_then(|n| n.parse().ok()).unwrap_or(0);
    let left = std::fs::read_dir(spool.path()).map_or(0, |d| d.count());
    client.drop_database().await.expect("drop the bench database");
    println!(
        "{}",
        serde_json::json!({
            "scenario": "analytics_sink", "rows": rows, "stored": stored, "spooled_left": left,
            "seconds": (seconds * 100.0).round() / 100.0, "rows_per_s": (rows as f64 / seconds).round(),
            "producer_waits_ms": waits,
        })
    );
    assert_eq!(stored, rows as u64, "every row once");
}
