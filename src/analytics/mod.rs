//! Analytics: one row per run, per socket session and per error, into ClickHouse. It is
//! built so that it can never slow, fail or block a chat message: the chat path only ever
//! calls [`Analytics::record`], a non-blocking push onto a bounded queue (a full queue
//! drops the row and counts it). Everything else happens on the sink's own task
//! ([`sink`]): batching by size or interval, inserts over ClickHouse's HTTP interface
//! ([`clickhouse`]), and while ClickHouse is away a spool of batches in the data dir
//! ([`spool`]) that is sent, in order and never twice, when it answers again, also by the
//! next process. [`stats`] answers the operators' questions from the same tables.
//!
//! Off by default: without `CLICKHOUSE_URL` the handle records nothing and no task runs.

mod clickhouse;
mod sink;
mod spool;
pub mod stats;

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::mpsc;

pub use self::clickhouse::{ClickHouseError, Client};
pub use self::sink::{COMPONENT, Sink, start};
use crate::telemetry::metric;

/// The chat path's handle: cheap to clone, never waits.
#[derive(Clone, Default)]
pub struct Analytics {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    queue: mpsc::Sender<Row>,
    node: Arc<str>,
}

impl Analytics {
    /// A handle that records nothing: analytics is off.
    pub fn off() -> Self {
        Self::default()
    }

    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// The node every row of this process names.
    pub fn node(&self) -> &str {
        self.inner.as_ref().map_or("", |i| &i.node)
    }

    /// Rows waiting in the queue for the sink.
    pub fn queued(&self) -> usize {
        self.inner.as_ref().map_or(0, |i| i.queue.max_capacity() - i.queue.capacity())
    }

    /// Queues one row for the sink, or drops it (counted) when the queue is full. Never
    /// waits and never fails the caller.
    pub fn record(&self, row: impl Into<Row>) {
        let Some(inner) = &self.inner else { return };
        match inner.queue.try_send(row.into()) {
            Ok(()) => metrics::counter!(metric::ANALYTICS_ROWS, "outcome" => "queued").increment(1),
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!(metric::ANALYTICS_DROPPED, "reason" => "queue_full").increment(1);
            }
            // The sink has stopped: the process is shutting down.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                metrics::counter!(metric::ANALYTICS_DROPPED, "reason" => "stopped").increment(1);
            }
        }
    }

    /// Records an error told to a client: `place` is `socket` or `run`.
    pub fn record_error(&self, user_id: &str, code: &str, place: &'static str, thread_id: &str, run_id: &str) {
        if !self.is_on() {
            return;
        }
        self.record(ErrorRow {
            ts: unix_now(),
            user_id: user_id.to_string(),
            node: self.node().to_string(),
            code: code.to_string(),
            place,
            thread_id: thread_id.to_string(),
            run_id: run_id.to_string(),
        });
    }
}

/// Seconds since the Unix epoch: the `DateTime` columns' form on the wire.
pub fn unix_now() -> u32 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// Milliseconds as a column value, saturating.
pub fn millis(d: std::time::Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// One agent run, written when it ends.
#[derive(Debug, Clone, Serialize)]
pub struct RunRow {
    /// When the run was asked for.
    pub ts: u32,
    pub run_id: String,
    pub user_id: String,
    pub thread_id: String,
    pub node: String,
    pub provider: &'static str,
    pub model: String,
    /// completed, cancelled, timed_out or failed.
    pub status: &'static str,
    /// The reason code of a run that did not complete (`agent_error`'s), else empty.
    pub error_code: String,
    /// From the request to the provider starting work.
    pub queue_ms: u32,
    /// From the request to the first streamed text; `None` when no text came.
    pub first_token_ms: Option<u32>,
    pub total_ms: u32,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub tool_calls: u32,
}

/// One WebSocket session, written when it closes.
#[derive(Debug, Clone, Serialize)]
pub struct SessionRow {
    pub opened_at: u32,
    pub closed_at: u32,
    pub connection_id: String,
    pub user_id: String,
    pub node: String,
    /// `web_client` (the Netra web client's subprotocol) or `netra`.
    pub client: &'static str,
    /// The close code sent or received; 1006 when the transport went without one.
    pub close_code: u16,
    pub frames_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: u32,
}

/// One error told to a client: an `error` frame or a run's `agent_error`.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorRow {
    pub ts: u32,
    pub user_id: String,
    pub node: String,
    /// The §6c code (`rate_limited`, `forbidden`, …) or the run's reason.
    pub code: String,
    /// `socket` for error frames, `run` for a run's ending.
    #[serde(rename = "where")]
    pub place: &'static str,
    pub thread_id: String,
    pub run_id: String,
}

/// A row for one of the tables.
#[derive(Debug, Clone)]
pub enum Row {
    Run(RunRow),
    Session(SessionRow),
    Error(ErrorRow),
}

impl Row {
    fn table(&self) -> Table {
        match self {
            Self::Run(_) => Table::Runs,
            Self::Session(_) => Table::Sessions,
            Self::Error(_) => Table::Errors,
        }
    }

    /// The row's time, in Unix seconds: it picks the day partition.
    fn ts(&self) -> u32 {
        match self {
            Self::Run(r) => r.ts,
            Self::Session(s) => s.closed_at,
            Self::Error(e) => e.ts,
        }
    }

    /// The row as one line of `JSONEachRow`, with the batch it goes in.
    fn to_line(&self, batch_id: &str) -> String {
        let body = match self {
            Self::Run(r) => serde_json::to_string(r),
            Self::Session(s) => serde_json::to_string(s),
            Self::Error(e) => serde_json::to_string(e),
        }
        .expect("rows of strings and numbers always serialize");
        // `{"batch_id":"…",` followed by the row's own fields.
        format!("{{\"batch_id\":\"{batch_id}\",{}\n", &body[1..])
    }
}

impl From<RunRow> for Row {
    fn from(r: RunRow) -> Self {
        Self::Run(r)
    }
}

impl From<SessionRow> for Row {
    fn from(s: SessionRow) -> Self {
        Self::Session(s)
    }
}

impl From<ErrorRow> for Row {
    fn from(e: ErrorRow) -> Self {
        Self::Error(e)
    }
}

/// The tables analytics writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Runs,
    Sessions,
    Errors,
}

impl Table {
    pub const ALL: [Table; 3] = [Table::Runs, Table::Sessions, Table::Errors];

    pub fn name(self) -> &'static str {
        match self {
            Self::Runs => "runs",
            Self::Sessions => "sessions",
            Self::Errors => "errors",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The column holding the row's time (its partition and first sort key).
    fn time_column(self) -> &'static str {
        match self {
            Self::Runs | Self::Errors => "ts",
            Self::Sessions => "closed_at",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_the_row_with_its_batch_first() {
        let row = Row::Error(ErrorRow {
            ts: 1_700_000_000,
            user_id: "u\"1".into(),
            node: "n".into(),
            code: "forbidden".into(),
            place: "socket",
            thread_id: String::new(),
            run_id: String::new(),
        });
        let line = row.to_line("b1");
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).expect("one JSON object");
        assert_eq!(v["batch_id"], "b1");
        assert_eq!(v["user_id"], "u\"1");
        assert_eq!(v["where"], "socket");
        assert_eq!(v["ts"], 1_700_000_000);
    }

    #[test]
    fn an_off_handle_records_nothing_and_never_blocks() {
        let off = Analytics::off();
        assert!(!off.is_on());
        off.record(ErrorRow {
            ts: 0,
            user_id: String::new(),
            node: String::new(),
            code: String::new(),
            place: "socket",
            thread_id: String::new(),
            run_id: String::new(),
        });
    }
}
