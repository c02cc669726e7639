//! The sink: one task that owns everything analytics does after a row is queued. Rows
//! are grouped into batches (one table, one UTC day: one partition, so an insert lands
//! whole or not at all) when the batch size is reached or the oldest row has waited the
//! interval. While ClickHouse answers, a batch is inserted at once; when an insert fails
//! the batch goes to the spool and so does every later one, so the order holds. The
//! spool is drained with backoff: oldest first, consecutive batches of one partition in
//! one insert, and batches ClickHouse already holds (an insert whose answer was lost)
//! skipped by their id. Health follows: `analytics` turns degraded with the reason when
//! an insert fails and ready again when the spool is empty.

use std::time::Duration;

use axum::body::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::spool::{Batch, Spool, Spooled, batch_id};
use super::{Analytics, ClickHouseError, Client, Inner, Row, Table};
use crate::config::ClickHouse as Settings;
use crate::startup::{Report, State};
use crate::telemetry::metric;

/// The component name in the startup report and `/health`.
pub const COMPONENT: &str = "analytics";
/// The most one drain insert carries, in bytes of rows.
const DRAIN_BYTES: usize = 8 << 20;
/// Batches looked at per drain step.
const DRAIN_BATCHES: usize = 256;
/// Longest the final flush at shutdown may take before its rows go to the spool.
const FINAL_FLUSH: Duration = Duration::from_secs(3);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The running sink, to be finished at shutdown.
pub struct Sink {
    task: JoinHandle<()>,
    stop: CancellationToken,
}

impl Sink {
    /// Stops taking rows, sends (or spools) what is queued, and waits for that.
    pub async fn finish(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "the analytics sink failed");
        }
    }
}

/// Starts the sink for `settings` and returns the handle the chat path records with.
/// ClickHouse need not answer yet: rows spool until it does.
pub fn start(settings: &Settings, client: Client, node: &str, report: Report) -> (Analytics, Sink) {
    let (tx, rx) = mpsc::channel(settings.queue);
    let spool = match Spool::open(&settings.spool_dir, settings.spool_bytes) {
        Ok(spool) => {
            if !spool.is_empty() {
                tracing::info!(batches = spool.len(), bytes = spool.bytes(), "analytics spool left by an earlier run");
            }
            metrics::gauge!(metric::ANALYTICS_SPOOL_BYTES).set(spool.bytes() as f64);
            Some(spool)
        }
        Err(e) => {
            let dir = settings.spool_dir.display();
            tracing::error!(error = %e, %dir, "cannot open the analytics spool: batches ClickHouse does not take are dropped");
            None
        }
    };
    let stop = CancellationToken::new();
    let worker = Worker {
        client,
        spool,
        report,
        healthy: false,
        schema_ready: false,
        retry_at: Instant::now(),
        backoff: Duration::from_millis(500),
        batch: settings.batch,
        interval: settings.interval,
    };
    let task = tokio::spawn(worker.run(rx, stop.clone()));
    let analytics = Analytics { inner: Some(std::sync::Arc::new(Inner { queue: tx, node: node.into() })) };
    (analytics, Sink { task, stop })
}

struct Worker {
    client: Client,
    spool: Option<Spool>,
    report: Report,
    /// The last request to ClickHouse succeeded.
    healthy: bool,
    schema_ready: bool,
    /// When the spool is next tried.
    retry_at: Instant,
    backoff: Duration,
    batch: usize,
    interval: Duration,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<Row>, stop: CancellationToken) {
        // Startup checks the schema; until a request of the sink's own succeeds, the
        // first batch tries ClickHouse and the spool (if any) waits its turn.
        self.healthy = true;
        let mut pending: Vec<Row> = Vec::new();
        let mut due: Option<Instant> = None;
        loop {
            let spooled = self.spool.as_ref().is_some_and(|s| !s.is_empty());
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                row = rx.recv() => {
                    let Some(row) = row else { break };
                    if pending.is_empty() {
                        due = Some(Instant::now() + self.interval);
                    }
                    pending.push(row);
                    if pending.len() >= self.batch {
                        self.flush(std::mem::take(&mut pending)).await;
                        due = None;
                    }
                }
                () = sleep_until(due), if due.is_some() => {
                    self.flush(std::mem::take(&mut pending)).await;
                    due = None;
                }
                () = tokio::time::sleep_until(self.retry_at), if spooled => self.drain().await,
            }
        }
        rx.close();
        while let Ok(row) = rx.try_recv() {
            pending.push(row);
        }
        if !pending.is_empty() {
            let rows = pending.len();
            match tokio::time::timeout(FINAL_FLUSH, self.flush(pending.clone())).await {
                Ok(()) => {}
                Err(_) => {
                    // The insert may still land; the spool's copy is skipped by its id then.
                    tracing::warn!(rows, "ClickHouse did not take the last rows in time: spooled");
                    self.healthy = false;
                    self.flush(pending).await;
                }
            }
        }
    }

    /// Sends `rows` as batches, or spools them while ClickHouse is away or the spool
    /// holds older batches.
    async fn flush(&mut self, rows: Vec<Row>) {
        for batch in batches(rows) {
            let spooled = self.spool.as_ref().is_some_and(|s| !s.is_empty());
            if self.healthy && !spooled {
                let rows = batch.rows;
                match self.insert(batch.table, Bytes::from(batch.lines.clone())).await {
                    Ok(()) => {
                        metrics::counter!(metric::ANALYTICS_ROWS, "outcome" => "sent").increment(rows as u64);
                        continue;
                    }
                    Err(e) => self.went_away(&e),
                }
            }
            self.spool_batch(&batch);
        }
    }

    async fn insert(&self, table: Table, lines: Bytes) -> Result<(), ClickHouseError> {
        let started = Instant::now();
        let result = self.client.insert(table, lines).await;
        metrics::histogram!(metric::ANALYTICS_INSERT_SECONDS).record(started.elapsed().as_secs_f64());
        result
    }

    fn spool_batch(&mut self, batch: &Batch) {
        let Some(spool) = &mut self.spool else {
            metrics::counter!(metric::ANALYTICS_DROPPED, "reason" => "no_spool").increment(batch.rows as u64);
            return;
        };
        match spool.push(batch) {
            Ok(dropped) => {
                metrics::counter!(metric::ANALYTICS_ROWS, "outcome" => "spooled").increment(batch.rows as u64);
                if dropped > 0 {
                    tracing::warn!(rows = dropped, "the analytics spool is full: its oldest rows were dropped");
                    metrics::counter!(metric::ANALYTICS_DROPPED, "reason" => "spool_full").increment(dropped as u64);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, rows = batch.rows, "cannot write to the analytics spool: rows dropped");
                metrics::counter!(metric::ANALYTICS_DROPPED, "reason" => "spool_error").increment(batch.rows as u64);
            }
        }
        metrics::gauge!(metric::ANALYTICS_SPOOL_BYTES).set(spool.bytes() as f64);
    }

    /// Sends the spool, oldest first, until it is empty or ClickHouse fails again.
    async fn drain(&mut self) {
        if !self.schema_ready {
            if let Err(e) = self.client.ensure_schema().await {
                self.went_away(&e);
                return;
            }
            self.schema_ready = true;
        }
        loop {
            let Some(spool) = &self.spool else { return };
            let group = partition_run(spool.oldest(DRAIN_BATCHES));
            let Some(first) = group.first() else { break };
            let table = first.table;
            let ids: Vec<String> = group.iter().map(|s| s.id.clone()).collect();
            let present = match self.client.present_batches(table, &ids).await {
                Ok(present) => present,
                Err(e) => return self.went_away(&e),
            };
            let mut lines = Vec::new();
            let mut rows = 0;
            let mut sending = Vec::new();
            for s in &group {
                if present.contains(&s.id) {
                    tracing::info!(batch = %s.id, "a spooled batch was already in ClickHouse: not sent again");
                    continue;
                }
                match spool.read(s) {
                    Ok(body) if lines.is_empty() || lines.len() + body.len() <= DRAIN_BYTES => {
                        lines.extend_from_slice(&body);
                        rows += s.rows;
                        sending.push(s.id.clone());
                    }
                    Ok(_) => break,
                    Err(e) => {
                        tracing::error!(error = %e, batch = %s.id, "cannot read a spooled batch: dropped");
                        metrics::counter!(metric::ANALYTICS_DROPPED, "reason" => "spool_error")
                            .increment(s.rows as u64);
                        sending.push(s.id.clone());
                    }
                }
            }
            let skipped: Vec<&String> = ids.iter().filter(|id| present.contains(*id)).collect();
            if !lines.is_empty()
                && let Err(e) = self.insert(table, Bytes::from(lines)).await
            {
                return self.went_away(&e);
            }
            metrics::counter!(metric::ANALYTICS_ROWS, "outcome" => "sent").increment(rows as u64);
            let spool = self.spool.as_mut().expect("checked above");
            for id in sending.iter().chain(skipped) {
                if let Err(e) = spool.remove(id) {
                    tracing::error!(error = %e, "cannot delete a sent batch from the analytics spool");
                }
            }
            metrics::gauge!(metric::ANALYTICS_SPOOL_BYTES).set(spool.bytes() as f64);
        }
        if !self.healthy {
            tracing::info!("ClickHouse is back: the analytics spool is sent");
        }
        self.healthy = true;
        self.backoff = Duration::from_millis(500);
        self.report.set(COMPONENT, State::Ready, None, None);
    }

    /// Marks ClickHouse away: spool from now on, retry after a backoff.
    fn went_away(&mut self, e: &ClickHouseError) {
        if self.healthy {
            tracing::warn!(error = %e, "analytics cannot reach ClickHouse: spooling until it answers");
        }
        self.healthy = false;
        if matches!(e, ClickHouseError::Server { .. }) {
            // A table dropped behind netra's back is made again on the next try.
            self.schema_ready = false;
        }
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.report.set(COMPONENT, State::Degraded, None, Some(e.to_string()));
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Rows as batches, one per table and UTC day, in the order rows came.
fn batches(rows: Vec<Row>) -> Vec<Batch> {
    let mut out: Vec<(Table, u32, Batch)> = Vec::new();
    for row in rows {
        let (table, day) = (row.table(), row.ts() / 86_400);
        let index = match out.iter().position(|(t, d, _)| *t == table && *d == day) {
            Some(i) => i,
            None => {
                out.push((table, day, Batch { id: batch_id(), table, day, rows: 0, lines: Vec::new() }));
                out.len() - 1
            }
        };
        let batch = &mut out[index].2;
        batch.lines.extend_from_slice(row.to_line(&batch.id).as_bytes());
        batch.rows += 1;
    }
    out.into_iter().map(|(_, _, b)| b).collect()
}

/// The leading batches that share the first one's table and day: one insert's worth.
fn partition_run(oldest: Vec<Spooled>) -> Vec<Spooled> {
    let Some(first) = oldest.first() else { return oldest };
    let key = (first.table, first.day);
    oldest.into_iter().take_while(|s| (s.table, s.day) == key).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analytics::ErrorRow;

    fn error_at(ts: u32) -> Row {
        Row::Error(ErrorRow {
            ts,
            user_id: "u".into(),
            node: "n".into(),
            code: "c".into(),
            place: "socket",
            thread_id: String::new(),
            run_id: String::new(),
        })
    }

    #[test]
    fn a_batch_holds_one_table_and_one_day() {
        let day = 86_400 * 20_000;
        let rows = vec![error_at(day + 5), error_at(day + 86_400), error_at(day + 10)];
        let made = batches(rows);
        assert_eq!(made.len(), 2);
        assert_eq!(made[0].rows, 2);
        assert_eq!(made[1].rows, 1);
        assert!(made[0].id < made[1].id);
        let text = String::from_utf8(made[0].lines.clone()).expect("utf-8");
        assert_eq!(text.lines().count(), 2);
        assert!(text.lines().all(|l| l.contains(&made[0].id)));
    }
}
