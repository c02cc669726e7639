//! Logs and metrics. Tracing goes to stderr, pretty or JSON; stdout is kept for the
//! lines a caller parses (`listening on …`, tokens). Metric names live in [`metric`] so
//! each has one spelling; labels are bounded (codes, outcomes, components), never ids.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Every metric netra records.
pub mod metric {
    pub const WS_CONNECTIONS: &str = "netra_ws_connections";
    pub const WS_CONNECTIONS_TOTAL: &str = "netra_ws_connections_total";
    pub const WS_CLOSES: &str = "netra_ws_closes_total";
    pub const FRAMES_IN: &str = "netra_ws_frames_in_total";
    pub const FRAMES_OUT: &str = "netra_ws_frames_out_total";
    pub const PROTOCOL_ERRORS: &str = "netra_protocol_errors_total";
    pub const AUTH_FAILURES: &str = "netra_auth_failures_total";
    pub const RUNS: &str = "netra_runs_total";
    pub const RUNS_ACTIVE: &str = "netra_runs_active";
    pub const RUN_STARTS: &str = "netra_run_starts_total";
    pub const CACHE_ENTRIES: &str = "netra_cache_entries";
    pub const CACHE_BYTES: &str = "netra_cache_bytes";
    pub const EVENTS: &str = "netra_events_total";
    pub const EVENTS_DROPPED: &str = "netra_events_dropped_total";
    pub const EVENTS_REPLAYED: &str = "netra_events_replayed_total";
    pub const DELIVERY_LATENCY: &str = "netra_delivery_latency_seconds";
    pub const STORE_BATCH_JOBS: &str = "netra_store_batch_jobs";
    /// `partial_result` deltas that waited in a batch behind another of their run and went
    /// out inside it (one event, one row, one frame).
    pub const DELTAS_MERGED: &str = "netra_partial_results_merged_total";
    pub const STARTUP_DURATION: &str = "netra_startup_component_duration_seconds";
    pub const HTTP_REQUESTS: &str = "netra_http_requests_total";
    /// Connections closed before their first request to make room for newer ones.
    pub const HTTP_SHED: &str = "netra_http_connections_shed_total";
    /// Messages between nodes by outcome: published, received, dropped.
    pub const BROKER_MESSAGES: &str = "netra_broker_messages_total";
    /// Gaps in a thread's events from other nodes, filled from the store.
    pub const GAP_FILLS: &str = "netra_gap_fills_total";
    /// Analytics rows by outcome: queued (taken from the chat path), sent, spooled.
    pub const ANALYTICS_ROWS: &str = "netra_analytics_rows_total";
    /// Analytics rows lost, by reason: queue_full, spool_full, spool_error, no_spool, stopped.
    pub const ANALYTICS_DROPPED: &str = "netra_analytics_dropped_total";
    pub const ANALYTICS_SPOOL_BYTES: &str = "netra_analytics_spool_bytes";
    /// Rows waiting in memory for the sink, read at each scrape.
    pub const ANALYTICS_QUEUE: &str = "netra_analytics_queue_rows";
    pub const ANALYTICS_INSERT_SECONDS: &str = "netra_analytics_insert_seconds";
}

/// Sets up logging once per process; a second call is a no-op.
pub fn init_logging(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // A log line that cannot be written (stderr on a full disk, a closed pipe) is lost,
    // never fatal: the subscriber's own report of it goes through `eprintln!`, which
    // panics when stderr fails, and that panic unwound whatever task was logging (a run
    // telling its tabs that its ending could not be stored, in the disk-full test).
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).log_internal_errors(false);
    let _ = match format {
        LogFormat::Pretty => builder.compact().try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Installs the Prometheus recorder; the handle renders `/metrics`.
pub fn init_metrics() -> PrometheusHandle {
    let latency = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(metric::STORE_BATCH_JOBS.into()),
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
            )
        })
        .expect("bucket lists are non-empty constants");
    match builder.install_recorder() {
        Ok(handle) => handle,
        // A recorder is already installed (a second server in one process): keep it and
        // render from a detached one so the endpoint still answers.
        Err(_) => PrometheusBuilder::new().build_recorder().handle(),
    }
}
