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

use std::collections::HashMap;
use std::fs::File;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, TransactionBehavior};
use tokio::sync::oneshot;

use super::batch::Batch;
use super::messages::RECENT_MESSAGES;
use super::{Message, NewEvent, NewUser, Result, Row, StoreError, UPSERT_USER, WriteJob, shared_outcome};

/// Set on every SQLite connection, pooled or the writer's. WAL lets readers run beside
/// the one writer; NORMAL syncs at checkpoints, so a power cut may lose the last commits
/// but never corrupts, and a process kill loses nothing committed.
pub(super) const PRAGMAS: &[&str] = &[
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = NORMAL",
    "PRAGMA busy_timeout = 5000",
    "PRAGMA foreign_keys = ON",
    // No mmap_size: a WAL reader that finds a new commit drops its page cache and unmaps
    // the whole file, so with a writer committing all the time every read paid for a
    // munmap, a TLB shootdown and fresh page faults (more than the preads it saved).
];

/// Prepared statements kept: the writer uses about ten (four of them for events).
const STATEMENT_CACHE: usize = 16;

/// The writer's own settings, after [`PRAGMAS`]: it never checkpoints. A
/// checkpoint copies the WAL's pages back into the database and syncs the file; done by
/// the writer at commit time (SQLite's default), every commit that crossed the threshold
/// waited for it, tens of milliseconds with the sync. The checkpointer thread does it
/// instead, beside the writer. The page cache stays at its default size: SQLite scans
/// the whole cache at the end of every transaction (`pcache1TruncateUnsafe`), which at
/// 32 MiB was 9 % of the writer's time.
const WRITER_PRAGMAS: &[&str] = &["PRAGMA wal_autocheckpoint = 0", "PRAGMA journal_size_limit = 67108864"];

/// How long the checkpointer lets commits gather before copying them back: the hot pages
/// of a chat (the tail of each thread's index entries) are rewritten by every commit,
/// and one checkpoint copies each of them once.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// WAL frames past which the checkpointer also restarts the log. A passive checkpoint
/// never waits for the writer, and the WAL only starts over from its beginning when a
/// transaction begins while every frame is copied back, which a writer that never
/// pauses does not give it: the WAL grew past a gigabyte in a 4 s `wsload chat`, with
/// every new frame extending the file. Past this size a RESTART checkpoint holds the
/// writer back for what the passive one before it has not copied yet, and the next
/// commit writes from the start of the file again (~64 MiB with 4 KiB pages).
const WAL_RESTART_FRAMES: i64 = 16384;

/// The writer's busy handler: when the lock it needs is held (a RESTART checkpoint,
/// another process), it retries every 100 µs for up to 5 s. SQLite's own handler sleeps
/// 1, 2, 5, 10 … ms between tries, which turned a 3 ms checkpoint into a 20 ms stall
/// of every event in flight.
fn wait_briefly(attempts: i32) -> bool {
    std::thread::sleep(Duration::from_micros(100));
    attempts < 50_000
}

/// The checkpointer's busy handler. A RESTART holds the writer while it waits for
/// readers to leave the WAL, so it looks again every 100 µs (with SQLite's own handler,
/// which sleeps 1, 2, 5, 10 … ms, each restart held every commit ~20 ms: the chat's p99)
/// and gives up after 1,000 looks (100 to 200 ms with the sleeps' overshoot), to try
/// again after the next burst of commits, instead of the 5 s every other connection
/// waits for a lock.
fn wait_for_readers(attempts: i32) -> bool {
    std::thread::sleep(Duration::from_micros(100));
    attempts < 1_000
}

/// Passive rounds at most before a RESTART, and the frames written during the last one
/// below which the RESTART goes ahead (see [`checkpoint`]).
const CATCH_UP_ROUNDS: usize = 6;
const CAUGHT_UP_FRAMES: i64 = 500;

/// Copies the whole WAL back and truncates it. Another checkpoint in progress (the
/// checkpointer's) makes SQLite answer "busy" at once rather than wait: it is tried again
/// for up to a second.
fn truncate(conn: &Connection) -> Result<()> {
    for _ in 0..50 {
        let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| row.get(0))?;
        if busy == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(StoreError::Unavailable("the WAL stayed in use; it was not truncated".into()))
}

/// Copies committed WAL frames back into the database after each burst of commits,
/// until the writer thread stops.
fn checkpointer(conn: &Connection, database: &File, nudges: &mpsc::Receiver<()>) {
    while nudges.recv().is_ok() {
        std::thread::sleep(CHECKPOINT_EVERY);
        while nudges.try_recv().is_ok() {}
        if let Err(e) = checkpoint(conn, database) {
            tracing::warn!(error = %e, "WAL checkpoint failed; the next commit retries it");
        }
    }
}

fn checkpoint(conn: &Connection, database: &File) -> rusqlite::Result<()> {
    let passive = || conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| row.get::<_, i64>(1));
    let mut frames = passive()?;
    if frames < WAL_RESTART_FRAMES {
        return Ok(());
    }
    // The RESTART holds the writer while it copies what the last passive round did not
    // (the frames written during it) and syncs: ~20 ms after a 40 ms round. More passive
    // rounds first, each copying only what came in during the previous one, shrink that.
    for _ in 0..CATCH_UP_ROUNDS {
        let now = passive()?;
        if now < frames {
            return Ok(()); // The WAL started over already.
        }
        let written_meanwhile = now - frames;
        frames = now;
        if written_meanwhile <= CAUGHT_UP_FRAMES {
            break;
        }
    }
    // A passive round that does not catch up never syncs the database file, so the
    // RESTART's sync would write back every page the rounds before it copied, with the
    // writer held: ~20 ms, the chat's p99. Synced here first, beside the writer, the file
    // has only the pages of one more short round left for the RESTART to sync. (An extra
    // sync only makes the file safer sooner; if it fails, the RESTART's sync still runs.)
    if let Err(e) = database.sync_data() {
        tracing::warn!(error = %e, "could not sync the database file ahead of a WAL restart");
    }
    passive()?;
    conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))
}

/// A descriptor of the database file at `path`, for the checkpointer to sync it beside
/// the writer. It is never closed: closing any descriptor of a file drops every POSIX
/// lock this process holds on it, SQLite's connections' included, and another process
/// could then take the file for its last user (SQLite's "How To Corrupt", 2.2). One per
/// file (device and inode), kept for the life of the process, as SQLite keeps its own.
fn database_file(path: &Path) -> std::io::Result<Arc<File>> {
    use std::os::unix::fs::MetadataExt;
    /// By device and inode.
    type Kept = HashMap<(u64, u64), Arc<File>>;
    static OPEN: OnceLock<Mutex<Kept>> = OnceLock::new();
    let meta = std::fs::metadata(path)?;
    let mut open = OPEN.get_or_init(Mutex::default).lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(file) = open.get(&(meta.dev(), meta.ino())) {
        return Ok(file.clone());
    }
    let file = Arc::new(File::open(path)?);
    open.insert((meta.dev(), meta.ino()), file.clone());
    Ok(file)
}

/// A handle to the writer thread; cheap to clone. The thread stops when the last handle
/// is dropped.
#[derive(Clone)]
pub(super) struct Writer {
    requests: mpsc::Sender<Request>,
}

enum Request {
    Write {
        jobs: Arc<[WriteJob]>,
        now: i64,
        reply: oneshot::Sender<Result<Vec<i64>>>,
    },
    /// A user seen with these claims; users queued together are one transaction.
    User {
        user: NewUser,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Copy the whole WAL back and truncate it (at shutdown).
    Checkpoint {
        reply: oneshot::Sender<Result<()>>,
    },
    /// The run's history: read here, on the connection that just wrote it, instead of
    /// across sqlx's reader threads row by row on a page cache the writer invalidated.
    Recent {
        thread_id: String,
        limit: i64,
        reply: oneshot::Sender<Result<(Vec<Message>, Option<i64>)>>,
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
            .spawn(move || {
                let opened = open(&path, WRITER_PRAGMAS).and_then(|writer| {
                    writer.busy_handler(Some(wait_briefly))?;
                    let checkpoints = open(&path, &[])?;
                    checkpoints.busy_handler(Some(wait_for_readers))?;
                    let database = database_file(&path).map_err(|e| StoreError::Unavailable(Box::new(e)))?;
                    let (nudge, nudges) = mpsc::sync_channel(1);
                    std::thread::Builder::new()
                        .name("netra-sqlite-checkpoint".into())
                        .spawn(move || checkpointer(&checkpoints, &database, &nudges))
                        .map_err(|e| StoreError::Unavailable(Box::new(e)))?;
                    Ok((writer, nudge))
                });
                match opened {
                    Ok((conn, nudge)) => {
                        if ready_tx.send(Ok(())).is_ok() {
                            serve(conn, &inbox, &nudge);
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| StoreError::Unavailable(Box::new(e)))?;
        ready.await.map_err(|_| stopped())??;
        Ok(Self { requests })
    }

    /// Writes the batch and returns the first `seq` of each job.
    pub(super) async fn write(&self, jobs: Arc<[WriteJob]>, now: i64) -> Result<Vec<i64>> {
        let (reply, answer) = oneshot::channel();
        self.requests.send(Request::Write { jobs, now, reply }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Copies the whole WAL back into the database and truncates it, so the next start
    /// has nothing to recover.
    pub(super) async fn checkpoint(&self) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.requests.send(Request::Checkpoint { reply }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Records a user (insert, or update the claims it came with).
    pub(super) async fn upsert_user(&self, user: NewUser) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.requests.send(Request::User { user, reply }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// The last `limit` messages of a thread, newest first, and the thread's `last_seq`
    /// as of that read (`None` when it has no message).
    pub(super) async fn recent(&self, thread_id: &str, limit: i64) -> Result<(Vec<Message>, Option<i64>)> {
        let (reply, answer) = oneshot::channel();
        let request = Request::Recent { thread_id: thread_id.to_string(), limit, reply };
        self.requests.send(request).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// Runs one request; a panic inside it becomes that request's error and the thread goes
/// on with the next.
fn guarded<T>(request: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(AssertUnwindSafe(request))
        .unwrap_or_else(|_| Err(StoreError::Unavailable("the SQLite writer panicked".into())))
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the SQLite writer thread stopped".into())
}

fn open(path: &Path, pragmas: &[&str]) -> Result<Connection> {
    let conn = Connection::open(path)?;
    for pragma in PRAGMAS.iter().chain(pragmas) {
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
fn serve(mut conn: Connection, inbox: &mpsc::Receiver<Request>, nudge: &mpsc::SyncSender<()>) {
    let mut next = inbox.recv().ok();
    while let Some(request) = next.take() {
        match request {
            Request::Write { jobs, now, reply } => {
                let result = guarded(|| write(&mut conn, &jobs, now));
                let _ = reply.send(result);
                // Full means a nudge is already waiting.
                let _ = nudge.try_send(());
            }
            Request::User { user, reply } => {
                // A connection storm is a storm of new users: whoever is queued behind this
                // one goes into the same transaction.
                let mut users = vec![(user, reply)];
                loop {
                    match inbox.try_recv() {
                        Ok(Request::User { user, reply }) => users.push((user, reply)),
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let result = guarded(|| upsert_users(&mut conn, &users));
                for (_, reply) in users {
                    let _ = reply.send(shared_outcome(&result));
                }
                let _ = nudge.try_send(());
            }
            Request::Checkpoint { reply } => {
                let _ = reply.send(truncate(&conn));
            }
            Request::Recent { thread_id, limit, reply } => {
                let result = guarded(|| recent(&conn, &thread_id, limit));
                let _ = reply.send(result);
            }
        }
        if next.is_none() {
            next = inbox.recv().ok();
        }
    }
}

fn upsert_users(conn: &mut Connection, users: &[(NewUser, oneshot::Sender<Result<()>>)]) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut upsert = tx.prepare_cached(UPSERT_USER)?;
        for (user, _) in users {
            upsert.execute(rusqlite::params![user.id, user.email, user.name, user.created_at])?;
        }
    }
    tx.commit()?;
    Ok(())
}

fn recent(conn: &Connection, thread_id: &str, limit: i64) -> Result<(Vec<Message>, Option<i64>)> {
    let mut statement = conn.prepare_cached(RECENT_MESSAGES)?;
    let mut rows = statement.query(rusqlite::params![thread_id, limit])?;
    let mut through = None;
    let mut messages = Vec::new();
    while let Some(row) = rows.next()? {
        let text = |i| row.get_ref(i).and_then(|v| v.as_str().map_err(rusqlite::Error::from));
        let message = Message::from_event(row.get(0)?, text(1)?, text(2)?, text(3)?, row.get(4)?)?;
        through = Some(row.get(5)?);
        messages.push(message);
    }
    Ok((messages, through))
}

/// A thread as a batch's write found it.
struct Allocated<'a> {
    thread: &'a str,
    /// Its last seq after the batch, and before it.
    last: i64,
    base: i64,
    num: i64,
    /// Its last message before the batch, if it had one.
    message_before: Option<i64>,
}

/// The batch in one `BEGIN IMMEDIATE` transaction: the write lock is taken (or waited
/// for, up to the busy timeout) before the first statement, never upgraded midway.
///
/// Every statement is cached (no SQL text is built per batch), and every one is
/// `OR FAIL`: any failure fails the whole batch, which is rolled back, so no statement
/// needs a statement journal to undo its own part. SQLite keeps one for every statement
/// that may abort inside a transaction, in memory up to 64 KiB: allocated and freed
/// again by every such statement, it made glibc hand the memory back to the kernel each
/// time, one `madvise` per chat message and a TLB shootdown on both cores with it
/// (bench/PROFILE.md, 38).
fn write(conn: &mut Connection, jobs: &[WriteJob], now: i64) -> Result<Vec<i64>> {
    let batch = Batch::new(jobs);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut create = tx.prepare_cached(concat!(
            "INSERT OR FAIL INTO threads (id, owner_id, title, metadata, created_at, updated_at, last_seq, num) \
             VALUES (?1, ?2, ?3, '{}', ?4, ?4, 0, ",
            sqlite_next_thread_num!(),
            ")"
        ))?;
        for job in jobs {
            for row in &job.rows {
                if let Row::CreateThread { owner_id, title } = row {
                    create.execute(rusqlite::params![job.thread_id, owner_id, title, now])?;
                }
            }
        }
    }
    // Each thread's number, which its events are filed under, the seq it had before the
    // batch, and its last message before the batch.
    let mut allocated: Vec<Allocated> = Vec::with_capacity(batch.totals.len());
    {
        let mut allocate = tx.prepare_cached(
            "UPDATE OR FAIL threads SET last_seq = last_seq + ?2, message_count = message_count + ?3, \
             message_before = last_message, last_message = COALESCE(last_seq + ?4, last_message), updated_at = ?5 \
             WHERE id = ?1 AND deleted_at IS NULL RETURNING last_seq, num, message_before",
        )?;
        for ((thread, n), said) in batch.totals.iter().zip(&batch.messages) {
            let mut rows = allocate.query(rusqlite::params![thread, n, said.count, said.last, now])?;
            if let Some(row) = rows.next()? {
                let last: i64 = row.get(0)?;
                allocated.push(Allocated {
                    thread,
                    last,
                    base: last - n,
                    num: row.get(1)?,
                    message_before: row.get(2)?,
                });
            }
        }
    }
    // A thread missing or deleted fails the batch here: no row of it is written.
    let firsts = batch.firsts(allocated.iter().map(|a| (a.thread, a.last)))?;
    // `allocated` follows `totals`, whole: `firsts` failed the batch otherwise.
    let of = |thread: &str| {
        let i = batch.thread_index.get(thread).copied();
        i.and_then(|i| allocated.get(i)).filter(|a| a.thread == thread).ok_or(StoreError::NotFound)
    };
    let mut rows: Vec<EventRow<'_>> = Vec::with_capacity(batch.message_ids.len());
    let mut messages = batch.message_ids.iter().zip(&batch.previous);
    for (job, first) in jobs.iter().zip(&firsts) {
        if job.events.is_empty() {
            continue;
        }
        let thread = of(&job.thread_id)?;
        for (i, e) in job.events.iter().enumerate() {
            let (message_id, previous) = messages.next().map_or((None, None), |(id, p)| (*id, *p));
            let before = match previous {
                Some(0) => thread.message_before,
                place => place.map(|p| thread.base + p),
            };
            rows.push(EventRow { thread: thread.num, seq: first + i as i64, event: e, message_id, before });
        }
    }
    insert_events(&tx, &rows)?;
    for job in jobs {
        for row in &job.rows {
            match row {
                Row::CreateThread { .. } | Row::Message { .. } => {}
                Row::StartRun { run_id, user_id, node_id } => {
                    tx.prepare_cached(
                        "INSERT OR FAIL INTO runs (id, thread_id, user_id, node_id, started_at, status) \
                         VALUES (?1, ?2, ?3, ?4, ?5, 'running')",
                    )?
                    .execute(rusqlite::params![run_id, job.thread_id, user_id, node_id, now])?;
                }
                Row::EndRun { run_id, status, error, prompt_tokens, completion_tokens } => {
                    tx.prepare_cached(
                        "UPDATE OR FAIL runs SET status = ?1, ended_at = ?2, error = ?3, prompt_tokens = ?4, \
                         completion_tokens = ?5 WHERE id = ?6",
                    )?
                    .execute(rusqlite::params![
                        status,
                        now,
                        error,
                        prompt_tokens,
                        completion_tokens,
                        run_id
                    ])?;
                }
            }
        }
    }
    tx.commit()?;
    Ok(firsts)
}

/// One event row as the writer files it.
struct EventRow<'a> {
    thread: i64,
    seq: i64,
    event: &'a NewEvent,
    message_id: Option<&'a str>,
    before: Option<i64>,
}

/// Rows per INSERT: a batch's events go in statements of these sizes, largest first.
/// Each statement costs SQLite its own start, cursors, seek to the table's end and halt
/// (about a third of a one-row insert), so a batch of 250 events takes 10 statements
/// instead of 250. A few fixed sizes keep the prepared statements cached.
///
/// `OR FAIL`: a statement of many rows that may stop halfway otherwise keeps a
/// statement journal, to undo its own earlier rows, in a temporary file: half again as
/// many `pwrite`s per chat message. Any failure here fails the whole batch, which is
/// rolled back, so there is nothing for a statement journal to do.
const ROWS_PER_INSERT: [usize; 4] = [64, 16, 4, 1];

/// The columns of one event row, as the INSERT lists them.
const EVENT_COLUMNS: usize = 9;

fn insert_events(tx: &rusqlite::Transaction<'_>, rows: &[EventRow<'_>]) -> Result<()> {
    static STATEMENTS: OnceLock<[String; 4]> = OnceLock::new();
    let statements = STATEMENTS.get_or_init(|| {
        ROWS_PER_INSERT.map(|n| {
            let row = format!("({})", ["?"; EVENT_COLUMNS].join(", "));
            let values = vec![row; n].join(", ");
            format!(
                "INSERT OR FAIL INTO events (thread_num, seq, run_id, type, agent_name, payload, created_at, \
                 message_id, previous_message) VALUES {values}"
            )
        })
    });
    let mut rest = rows;
    for (size, sql) in ROWS_PER_INSERT.iter().zip(statements) {
        if rest.len() < *size {
            continue;
        }
        let mut insert = tx.prepare_cached(sql)?;
        while rest.len() >= *size {
            let (chunk, after) = rest.split_at(*size);
            for (i, row) in chunk.iter().enumerate() {
                let e = row.event;
                let at = i * EVENT_COLUMNS;
                insert.raw_bind_parameter(at + 1, row.thread)?;
                insert.raw_bind_parameter(at + 2, row.seq)?;
                insert.raw_bind_parameter(at + 3, e.run_id.as_deref())?;
                insert.raw_bind_parameter(at + 4, e.kind.as_str())?;
                insert.raw_bind_parameter(at + 5, e.agent_name)?;
                insert.raw_bind_parameter(at + 6, e.payload.get())?;
                insert.raw_bind_parameter(at + 7, e.timestamp.as_str())?;
                insert.raw_bind_parameter(at + 8, row.message_id)?;
                insert.raw_bind_parameter(at + 9, row.before)?;
            }
            insert.raw_execute()?;
            rest = after;
        }
    }
    debug_assert!(rest.is_empty(), "the last size is one row");
    Ok(())
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
            expected_last_seq: None,
            thread_id: "th_1".into(),
            rows: vec![Row::CreateThread { owner_id: "u".into(), title: "t".into() }],
            events: vec![],
        }
    }

    #[test]
    fn one_descriptor_per_database_file_is_kept_whatever_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("one.db");
        std::fs::write(&path, b"").expect("file");
        let first = database_file(&path).expect("opens");
        let again = database_file(&dir.path().join(".").join("one.db")).expect("opens");
        assert!(Arc::ptr_eq(&first, &again), "a second descriptor would have to be closed some day");
        let other = dir.path().join("two.db");
        std::fs::write(&other, b"").expect("file");
        assert!(!Arc::ptr_eq(&first, &database_file(&other).expect("opens")));
    }

    #[tokio::test]
    async fn a_failed_batch_answers_with_its_error_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        // No schema: every batch fails inside SQLite.
        let writer = Writer::start(&dir.path().join("empty.db")).await.expect("writer starts");
        for _ in 0..2 {
            let err = writer.write(vec![job()].into(), 1).await.expect_err("no threads table");
            assert!(matches!(&err, StoreError::Rejected(e) if e.to_string().contains("no such table")), "{err:?}");
        }
    }

    #[tokio::test]
    async fn the_writer_closes_its_connection_when_the_last_handle_drops() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("netra.db");
        let writer = Writer::start(&path).await.expect("writer starts");
        // A transaction (this one fails: no schema) opens the -wal file.
        writer.write(vec![job()].into(), 1).await.expect_err("no threads table");
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
