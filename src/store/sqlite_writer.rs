//! SQLite's writer: one OS thread that owns a `rusqlite` connection and runs every
//! [`Store::write_batch`](super::Store::write_batch) of this store, one transaction per
//! batch, with cached prepared statements.
//!
//! Why: sqlx-sqlite runs each statement on a per-connection worker thread, so every
//! statement costs two thread hand-offs (~30–60 µs of CPU, mostly futex wake-ups and
//! context switches). A chat message takes ~17 statements in 3 transactions, which made
//! the server spend ~1000 µs of CPU per message. Here a batch costs one hand-off, and its
//! statements run in-process on the writer's thread. Reads and every other write stay on
//! the sqlx pool; WAL lets them run beside this writer, and `BEGIN IMMEDIATE` with the
//! busy timeout orders it against other writers of the same file (another store, node or
//! pooled connection). Measured on a 2-core machine: one producer persisting events one
//! at a time went from ~3.2k to ~8.1k events/s (`examples/persist`); `wsload chat` from
//! ~955 to ~780 µs of server CPU per message, together with the pool changes in `connect`.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::mpsc;

use rusqlite::types::ToSqlOutput;
use rusqlite::{Connection, ErrorCode, ToSql, TransactionBehavior, params_from_iter};
use tokio::sync::oneshot;

use super::{Backend, Batch, Message, Param, RECENT_MESSAGES, Result, SQLITE_PRAGMAS, StoreError, WriteJob};

/// Prepared statements kept per shape: a batch's multi-row statements take a shape per
/// row count, and re-preparing a large one costs more than the rest of the batch.
const STATEMENT_CACHE: usize = 256;

/// A handle to the writer thread; cheap to clone. The thread stops when the last handle
/// is dropped.
#[derive(Clone)]
pub(super) struct Writer {
    requests: mpsc::Sender<Request>,
}

enum Request {
    Write {
        jobs: Vec<WriteJob>,
        now: i64,
        reply: oneshot::Sender<Result<Vec<i64>>>,
    },
    /// The run's history: read here, on the connection that just wrote it, instead of
    /// across sqlx's reader threads row by row on a page cache the writer invalidated.
    Recent {
        thread_id: String,
        limit: i64,
        reply: oneshot::Sender<Result<Vec<Message>>>,
    },
}

impl Writer {
    /// Opens the database at `path` on a new thread. The schema must exist already.
    pub(super) async fn start(path: &Path) -> Result<Self> {
        let (requests, inbox) = mpsc::channel::<Request>();
        let (ready_tx, ready) = oneshot::channel();
        let path = path.to_path_buf();
        std::thread::Builder::new()
            .name("netra-sqlite-writer".into())
            .spawn(move || match open(&path) {
                Ok(conn) => {
                    if ready_tx.send(Ok(())).is_ok() {
                        serve(conn, &inbox);
                    }
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| StoreError::Unavailable(Box::new(e)))?;
        ready.await.map_err(|_| stopped())??;
        Ok(Self { requests })
    }

    /// Writes the batch and returns the first `seq` of each job.
    pub(super) async fn write(&self, jobs: Vec<WriteJob>, now: i64) -> Result<Vec<i64>> {
        let (reply, answer) = oneshot::channel();
        self.requests.send(Request::Write { jobs, now, reply }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// The last `limit` messages of a thread, newest first.
    pub(super) async fn recent(&self, thread_id: &str, limit: i64) -> Result<Vec<Message>> {
        let (reply, answer) = oneshot::channel();
        let request = Request::Recent { thread_id: thread_id.to_string(), limit, reply };
        self.requests.send(request).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn panicked() -> StoreError {
    StoreError::Unavailable("the SQLite writer panicked".into())
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the SQLite writer thread stopped".into())
}

fn open(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    for pragma in SQLITE_PRAGMAS {
        // Some pragmas answer with a row; read it and let it go.
        let mut statement = conn.prepare(pragma)?;
        let mut rows = statement.query([])?;
        while rows.next()?.is_some() {}
    }
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// Runs batches until every [`Writer`] is dropped. A batch that fails, even by a panic,
/// is rolled back and answered with its error; the thread goes on with the next.
fn serve(mut conn: Connection, inbox: &mpsc::Receiver<Request>) {
    while let Ok(request) = inbox.recv() {
        match request {
            Request::Write { jobs, now, reply } => {
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| write(&mut conn, &jobs, now)))
                    .unwrap_or_else(|_| Err(panicked()));
                let _ = reply.send(result);
            }
            Request::Recent { thread_id, limit, reply } => {
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| recent(&conn, &thread_id, limit)))
                    .unwrap_or_else(|_| Err(panicked()));
                let _ = reply.send(result);
            }
        }
    }
}

fn recent(conn: &Connection, thread_id: &str, limit: i64) -> Result<Vec<Message>> {
    let mut statement = conn.prepare_cached(RECENT_MESSAGES)?;
    let rows = statement.query_map(rusqlite::params![thread_id, limit], |row| {
        Ok((row.get::<_, String>(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get::<_, String>(4)?))
    })?;
    rows.map(|row| {
        let (id, role, content, created_at, metadata) = row?;
        let metadata = serde_json::from_str(&metadata).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(Message { id, role, content, created_at, metadata })
    })
    .collect()
}

/// The batch in one `BEGIN IMMEDIATE` transaction: the write lock is taken (or waited
/// for, up to the busy timeout) before the first statement, never upgraded midway.
fn write(conn: &mut Connection, jobs: &[WriteJob], now: i64) -> Result<Vec<i64>> {
    let batch = Batch::new(Backend::Sqlite, jobs, now);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for statement in batch.creates() {
        tx.prepare_cached(&statement.sql)?.execute(params_from_iter(&statement.params))?;
    }
    let mut handed_out = Vec::new();
    if let Some(statement) = batch.allocate() {
        let mut prepared = tx.prepare_cached(&statement.sql)?;
        let mut rows = prepared.query(params_from_iter(&statement.params))?;
        while let Some(row) = rows.next()? {
            handed_out.push((row.get(0)?, row.get(1)?));
        }
    }
    let firsts = batch.firsts(handed_out)?;
    for statement in batch.rest(&firsts) {
        tx.prepare_cached(&statement.sql)?.execute(params_from_iter(&statement.params))?;
    }
    tx.commit()?;
    Ok(firsts)
}

impl ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        match self {
            Param::Text(v) => v.to_sql(),
            Param::MaybeText(v) => v.to_sql(),
            Param::Int(v) => v.to_sql(),
            Param::MaybeInt(v) => v.to_sql(),
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        let code = match &e {
            rusqlite::Error::QueryReturnedNoRows => return Self::NotFound,
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::IntegralValueOutOfRange(..) => return Self::Corrupt(e.to_string()),
            rusqlite::Error::SqliteFailure(failure, _) => failure.code,
            _ => return Self::Rejected(Box::new(e)),
        };
        match code {
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => Self::Corrupt(e.to_string()),
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::CannotOpen
            | ErrorCode::ReadOnly
            | ErrorCode::PermissionDenied
            | ErrorCode::OutOfMemory
            | ErrorCode::FileLockingProtocolFailed
            | ErrorCode::NoLargeFileSupport
            | ErrorCode::OperationInterrupted => Self::Unavailable(Box::new(e)),
            _ => Self::Rejected(Box::new(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::store::Row;

    fn job() -> WriteJob {
        WriteJob {
            thread_id: "th_1".into(),
            rows: vec![Row::CreateThread { owner_id: "u".into(), title: "t".into() }],
            events: vec![],
        }
    }

    #[tokio::test]
    async fn a_failed_batch_answers_with_its_error_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        // No schema: every batch fails inside SQLite.
        let writer = Writer::start(&dir.path().join("empty.db")).await.expect("writer starts");
        for _ in 0..2 {
            let err = writer.write(vec![job()], 1).await.expect_err("no threads table");
            assert!(matches!(&err, StoreError::Rejected(e) if e.to_string().contains("no such table")), "{err:?}");
        }
    }

    #[tokio::test]
    async fn the_writer_closes_its_connection_when_the_last_handle_drops() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("netra.db");
        let writer = Writer::start(&path).await.expect("writer starts");
        // A transaction (this one fails: no schema) opens the -wal file.
        writer.write(vec![job()], 1).await.expect_err("no threads table");
        let wal = dir.path().join("netra.db-wal");
        assert!(wal.exists(), "WAL mode makes the -wal file");
        let copy = writer.clone();
        drop(writer);
        assert!(wal.exists(), "a handle is left");
        drop(copy);
        // SQLite removes the -wal file when the last connection to the database closes.
        let deadline = Instant::now() + Duration::from_secs(5);
        while wal.exists() {
            assert!(Instant::now() < deadline, "the writer thread did not stop");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
