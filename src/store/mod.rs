//! The source of truth: users, threads, messages, runs and every thread event, in SQLite
//! (the embedded default, WAL) or PostgreSQL, through one [`Store`] API. SQL lives in
//! this module only. Multi-row writes are single transactions: a failed one leaves
//! nothing behind. Sequence numbers are handed out inside the writing transaction from
//! the thread row, so they stay dense and unique under concurrent writers on any node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use serde_json::value::RawValue;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Row as _, Transaction};
use tracing::instrument;

use crate::config::DatabaseUrl;
use crate::protocol::{EventFrame, EventType};

/// What can go wrong in the store, by meaning.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("database rejected the operation: {0}")]
    Rejected(#[source] sqlx::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("migration {version} failed: {source}")]
    Migration { version: i64, source: sqlx::Error },
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::RowNotFound => Self::NotFound,
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_) => Self::Unavailable(e),
            other => Self::Rejected(other),
        }
    }
}

type Result<T> = std::result::Result<T, StoreError>;

const MIGRATIONS: &[(i64, &str)] =
    &[(1, include_str!("migrations/0001_init.sql")), (2, include_str!("migrations/0002_run_usage.sql"))];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    owners: Arc<OwnerCache>,
}

/// Thread owners seen by this node. An owner never changes, so a hit is always right
/// about ownership; a thread deleted on another node may still be listed here, which is
/// harmless because every write re-checks `deleted_at` in its transaction.
#[derive(Default)]
struct OwnerCache {
    map: Mutex<HashMap<String, String>>,
}

/// Past this many entries the cache starts over rather than grow without bound.
const OWNER_CACHE_MAX: usize = 100_000;

impl OwnerCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.map.lock().expect("owner cache lock is never held across a panic")
    }

    fn get(&self, thread_id: &str) -> Option<String> {
        self.lock().get(thread_id).cloned()
    }

    fn insert(&self, thread_id: &str, owner: &str) {
        let mut map = self.lock();
        if map.len() >= OWNER_CACHE_MAX {
            map.clear();
        }
        map.insert(thread_id.to_string(), owner.to_string());
    }

    fn remove(&self, thread_id: &str) {
        self.lock().remove(thread_id);
    }
}

/// A thread as the REST API shows it.
#[derive(Debug, Clone)]
pub struct Thread {
    pub id: String,
    pub owner_id: String,
    pub title: String,
    pub metadata: Value,
    /// Unix milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
    pub message_count: i64,
    pub last_seq: i64,
}

/// A chat message: the user's input or the agent's final answer.
#[derive(Debug, Clone)]
pub struct Message {
    pub id: String,
    pub role: String,
    pub content: String,
    pub created_at: i64,
    pub metadata: Value,
}

/// A run that was still marked running when its node stopped.
#[derive(Debug, Clone)]
pub struct InterruptedRun {
    pub run_id: String,
    pub thread_id: String,
}

/// An event to persist; it gets its `seq` in the writing transaction.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kind: EventType,
    pub run_id: Option<String>,
    pub agent_name: Option<String>,
    pub timestamp: String,
    pub payload: Box<RawValue>,
}

/// Rows written in the same transaction as a job's events.
#[derive(Debug, Clone)]
pub enum Row {
    CreateThread {
        owner_id: String,
        title: String,
    },
    /// A message whose position is the `seq` of the job's event at `event_index`.
    Message {
        id: String,
        role: &'static str,
        content: String,
        run_id: Option<String>,
        event_index: usize,
    },
    StartRun {
        run_id: String,
        user_id: String,
        node_id: String,
    },
    EndRun {
        run_id: String,
        status: &'static str,
        error: Option<String>,
        /// Tokens the model reported, when a model ran.
        prompt_tokens: Option<i64>,
        completion_tokens: Option<i64>,
    },
}

/// One atomic unit of writing: rows and events of a single thread.
#[derive(Debug, Clone)]
pub struct WriteJob {
    pub thread_id: String,
    pub rows: Vec<Row>,
    pub events: Vec<NewEvent>,
}

pub fn now_ms() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64 / 1_000_000
}

impl Store {
    /// Connects (retrying until `timeout`, so a database that is still starting is waited
    /// for) and brings the schema up to date.
    #[instrument(skip_all, fields(db = %url.masked()))]
    pub async fn connect(url: &DatabaseUrl, timeout: Duration) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let (conn_str, backend, max) = match url {
            DatabaseUrl::Sqlite(path) => {
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent).map_err(|e| StoreError::Unavailable(sqlx::Error::Io(e)))?;
                }
                (format!("sqlite://{}?mode=rwc", path.display()), Backend::Sqlite, 8)
            }
            DatabaseUrl::Postgres(url) => (url.expose().to_string(), Backend::Postgres, 16),
        };
        let deadline = Instant::now() + timeout;
        let mut backoff = Duration::from_millis(50);
        let pool = loop {
            let attempt = AnyPoolOptions::new()
                .max_connections(max)
                .min_connections(1)
                .acquire_timeout(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100)))
                .after_connect(move |conn, _| {
                    Box::pin(async move {
                        if backend == Backend::Sqlite {
                            // WAL lets readers run beside the one writer; NORMAL syncs at
                            // checkpoints, so a power cut may lose the last commits but never
                            // corrupts, and a process kill loses nothing committed.
                            for pragma in [
                                "PRAGMA journal_mode = WAL",
                                "PRAGMA synchronous = NORMAL",
                                "PRAGMA busy_timeout = 5000",
                                "PRAGMA foreign_keys = ON",
                                // Every write by one pooled connection invalidates the
                                // others' page caches; with the file mapped, re-reading a
                                // page is a memory access instead of a pread syscall.
                                "PRAGMA mmap_size = 268435456",
                            ] {
                                sqlx::query(pragma).execute(&mut *conn).await?;
                            }
                        }
                        Ok(())
                    })
                })
                .connect(&conn_str)
                .await;
            match attempt {
                Ok(pool) => break pool,
                Err(e) if Instant::now() + backoff < deadline => {
                    tracing::debug!(error = %e, "database not reachable yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(StoreError::Unavailable(e)),
            }
        };
        let store = Self { pool, backend, owners: Arc::default() };
        store.migrate().await?;
        Ok(store)
    }

    /// Applies missing migrations, each in its own transaction. On PostgreSQL an advisory
    /// lock keeps two nodes starting together from applying the same one twice.
    pub async fn migrate(&self) -> Result<()> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS netra_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .execute(&self.pool)
        .await?;
        for (version, sql) in MIGRATIONS {
            let mut tx = self.pool.begin().await?;
            if self.backend == Backend::Postgres {
                sqlx::query("SELECT pg_advisory_xact_lock(7261)").execute(&mut *tx).await?;
            }
            let applied: Option<i64> = sqlx::query_scalar("SELECT version FROM netra_migrations WHERE version = $1")
                .bind(version)
                .fetch_optional(&mut *tx)
                .await?;
            if applied.is_some() {
                continue;
            }
            for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty() && !is_comment_only(s)) {
                sqlx::query(statement)
                    .execute(&mut *tx)
                    .await
                    .map_err(|source| StoreError::Migration { version: *version, source })?;
            }
            sqlx::query("INSERT INTO netra_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(version)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            tracing::info!(version, "applied migration");
        }
        Ok(())
    }

    /// A real round trip, for health checks.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    #[instrument(skip_all, fields(user_id))]
    pub async fn upsert_user(&self, user_id: &str, email: Option<&str>, name: Option<&str>) -> Result<()> {
        sqlx::query(
            "INSERT INTO users (id, email, name, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET email = COALESCE(excluded.email, users.email), \
             name = COALESCE(excluded.name, users.name)",
        )
        .bind(user_id)
        .bind(email)
        .bind(name)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A live (not deleted) thread.
    #[instrument(skip_all, fields(thread_id))]
    pub async fn thread(&self, thread_id: &str) -> Result<Thread> {
        let row = sqlx::query(&format!("{THREAD_SELECT} WHERE t.id = $1 AND t.deleted_at IS NULL"))
            .bind(thread_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        thread_from_row(&row)
    }

    /// The owner of a live thread: the cheap check every send and subscribe makes.
    #[instrument(skip_all, fields(thread_id))]
    pub async fn thread_owner(&self, thread_id: &str) -> Result<String> {
        if let Some(owner) = self.owners.get(thread_id) {
            return Ok(owner);
        }
        let owner: String = sqlx::query_scalar("SELECT owner_id FROM threads WHERE id = $1 AND deleted_at IS NULL")
            .bind(thread_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        self.owners.insert(thread_id, &owner);
        Ok(owner)
    }

    /// The owner's live threads, most recently updated first.
    #[instrument(skip_all, fields(owner_id))]
    pub async fn threads_of(&self, owner_id: &str, limit: i64, offset: i64) -> Result<Vec<Thread>> {
        let rows = sqlx::query(&format!(
            "{THREAD_SELECT} WHERE t.owner_id = $1 AND t.deleted_at IS NULL \
             ORDER BY t.updated_at DESC, t.created_at DESC, t.id LIMIT $2 OFFSET $3"
        ))
        .bind(owner_id)
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(thread_from_row).collect()
    }

    /// Creates an empty thread (REST). Threads created by a chat message go through
    /// [`Store::write_batch`] with their first events instead.
    #[instrument(skip_all, fields(thread_id))]
    pub async fn create_thread(
        &self,
        thread_id: &str,
        owner_id: &str,
        title: &str,
        metadata: &Value,
    ) -> Result<Thread> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO threads (id, owner_id, title, metadata, created_at, updated_at, last_seq) \
             VALUES ($1, $2, $3, $4, $5, $5, 0)",
        )
        .bind(thread_id)
        .bind(owner_id)
        .bind(title)
        .bind(metadata.to_string())
        .bind(now)
        .execute(&self.pool)
        .await?;
        self.thread(thread_id).await
    }

    /// Renames and/or merges metadata keys into the thread's metadata.
    #[instrument(skip_all, fields(thread_id))]
    pub async fn update_thread(
        &self,
        thread_id: &str,
        title: Option<&str>,
        metadata: Option<&Value>,
    ) -> Result<Thread> {
        let mut tx = self.pool.begin().await?;
        let current: Option<String> =
            sqlx::query_scalar("SELECT metadata FROM threads WHERE id = $1 AND deleted_at IS NULL")
                .bind(thread_id)
                .fetch_optional(&mut *tx)
                .await?;
        let current = current.ok_or(StoreError::NotFound)?;
        let mut merged: Value = serde_json::from_str(&current).unwrap_or_else(|_| Value::Object(Default::default()));
        if let (Some(Value::Object(patch)), Value::Object(target)) = (metadata, &mut merged) {
            for (k, v) in patch {
                target.insert(k.clone(), v.clone());
            }
        }
        sqlx::query("UPDATE threads SET title = COALESCE($2, title), metadata = $3, updated_at = $4 WHERE id = $1")
            .bind(thread_id)
            .bind(title)
            .bind(merged.to_string())
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.thread(thread_id).await
    }

    /// Soft delete: the thread and its events are no longer served.
    #[instrument(skip_all, fields(thread_id))]
    pub async fn delete_thread(&self, thread_id: &str) -> Result<()> {
        self.owners.remove(thread_id);
        let done = sqlx::query("UPDATE threads SET deleted_at = $2 WHERE id = $1 AND deleted_at IS NULL")
            .bind(thread_id)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// Removes a thread and everything in it for good (the startup self-test's cleanup).
    #[instrument(skip_all, fields(thread_id))]
    pub async fn purge_thread(&self, thread_id: &str) -> Result<()> {
        self.owners.remove(thread_id);
        let mut tx = self.pool.begin().await?;
        for table in ["events", "messages", "runs"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE thread_id = $1")).bind(thread_id).execute(&mut *tx).await?;
        }
        sqlx::query("DELETE FROM threads WHERE id = $1").bind(thread_id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A page of a thread's messages in conversation order, and the total count.
    #[instrument(skip_all, fields(thread_id))]
    pub async fn messages(&self, thread_id: &str, limit: i64, offset: i64) -> Result<(Vec<Message>, i64)> {
        let rows = sqlx::query(
            "SELECT id, role, content, created_at, metadata FROM messages WHERE thread_id = $1 \
             ORDER BY seq LIMIT $2 OFFSET $3",
        )
        .bind(thread_id)
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.pool)
        .await?;
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM messages WHERE thread_id = $1")
            .bind(thread_id)
            .fetch_one(&self.pool)
            .await?;
        let messages = rows.iter().map(message_from_row).collect::<Result<_>>()?;
        Ok((messages, total))
    }

    /// The last `limit` messages of a thread, oldest first: the agent's context.
    #[instrument(skip_all, fields(thread_id))]
    pub async fn recent_messages(&self, thread_id: &str, limit: i64) -> Result<Vec<Message>> {
        let rows = sqlx::query(
            "SELECT id, role, content, created_at, metadata FROM messages WHERE thread_id = $1 \
             ORDER BY seq DESC LIMIT $2",
        )
        .bind(thread_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut messages: Vec<Message> = rows.iter().map(message_from_row).collect::<Result<_>>()?;
        messages.reverse();
        Ok(messages)
    }

    /// Up to `limit` events with `seq > after_seq`, in order.
    #[instrument(skip_all, fields(thread_id, after_seq))]
    pub async fn events_after(&self, thread_id: &str, after_seq: u64, limit: u32) -> Result<Vec<EventFrame>> {
        let rows = sqlx::query(
            "SELECT seq, run_id, type, agent_name, payload, created_at FROM events \
             WHERE thread_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(thread_id)
        .bind(i64::try_from(after_seq).unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let seq: i64 = row.try_get("seq")?;
                let payload: String = row.try_get("payload")?;
                Ok(EventFrame {
                    kind: row.try_get("type")?,
                    thread_id: thread_id.to_string(),
                    run_id: row.try_get("run_id")?,
                    seq: u64::try_from(seq).map_err(|_| StoreError::Corrupt(format!("negative seq {seq}")))?,
                    agent_name: row.try_get("agent_name")?,
                    timestamp: row.try_get("created_at")?,
                    payload: RawValue::from_string(payload).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                })
            })
            .collect()
    }

    /// Writes every job in one transaction and returns each job's events with their
    /// `seq`. All or nothing: on error no job's rows exist. The statements per batch do
    /// not grow with its size: one update hands out the sequence numbers of every thread
    /// in the batch, one multi-row insert stores the events.
    #[instrument(skip_all, fields(jobs = jobs.len()))]
    pub async fn write_batch(&self, jobs: &[WriteJob]) -> Result<Vec<Vec<EventFrame>>> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        for job in jobs {
            for row in &job.rows {
                if let Row::CreateThread { owner_id, title } = row {
                    sqlx::query(
                        "INSERT INTO threads (id, owner_id, title, metadata, created_at, updated_at, last_seq) \
                         VALUES ($1, $2, $3, '{}', $4, $4, 0)",
                    )
                    .bind(&job.thread_id)
                    .bind(owner_id)
                    .bind(title)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        let firsts = allocate_seqs(&mut tx, self.backend, jobs, now).await?;
        let mut written: Vec<Vec<EventFrame>> = Vec::with_capacity(jobs.len());
        for (job, first) in jobs.iter().zip(&firsts) {
            let frames = job
                .events
                .iter()
                .enumerate()
                .map(|(i, event)| EventFrame {
                    kind: event.kind.as_str().to_string(),
                    thread_id: job.thread_id.clone(),
                    run_id: event.run_id.clone(),
                    seq: (first + i as i64) as u64,
                    agent_name: event.agent_name.clone(),
                    timestamp: event.timestamp.clone(),
                    payload: event.payload.clone(),
                })
                .collect();
            written.push(frames);
        }
        insert_events(&mut tx, self.backend, written.iter().flatten()).await?;
        write_rows(&mut tx, self.backend, jobs, &firsts, now).await?;
        tx.commit().await?;
        for job in jobs {
            for row in &job.rows {
                if let Row::CreateThread { owner_id, .. } = row {
                    self.owners.insert(&job.thread_id, owner_id);
                }
            }
        }
        Ok(written)
    }

    /// Marks this node's runs that were still running as `interrupted` and returns them,
    /// so their threads can be told. Called at startup, before any new run exists.
    #[instrument(skip_all, fields(node_id))]
    pub async fn interrupted_runs(&self, node_id: &str) -> Result<Vec<InterruptedRun>> {
        let rows = sqlx::query("SELECT id, thread_id FROM runs WHERE status = 'running' AND node_id = $1")
            .bind(node_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok(InterruptedRun { run_id: r.try_get("id")?, thread_id: r.try_get("thread_id")? }))
            .collect()
    }

    /// The status a run ended with, if any.
    pub async fn run_status(&self, run_id: &str) -> Result<String> {
        sqlx::query_scalar("SELECT status FROM runs WHERE id = $1")
            .bind(run_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)
    }
}

impl Backend {
    /// The `i`-th (1-based) bind placeholder. SQLite gets plain `?`, bound by position:
    /// sqlx resolves every `$N` on SQLite by scanning the statement's parameter names,
    /// which is quadratic in a statement with hundreds of parameters.
    fn placeholder(self, i: usize) -> String {
        match self {
            Self::Sqlite => "?".to_string(),
            Self::Postgres => format!("${i}"),
        }
    }
}

/// Hands out the next sequence numbers of every thread in the batch with one statement
/// and returns the first `seq` of each job. The row locks it takes serialize every
/// writer of those threads, on every node, until commit: that is what keeps seq dense
/// and unique. A thread that is missing or deleted fails the batch (`NotFound`).
async fn allocate_seqs(
    tx: &mut Transaction<'static, Any>,
    backend: Backend,
    jobs: &[WriteJob],
    now: i64,
) -> Result<Vec<i64>> {
    let mut totals: Vec<(&str, i64)> = Vec::new();
    for job in jobs.iter().filter(|j| !j.events.is_empty()) {
        match totals.iter_mut().find(|(t, _)| *t == job.thread_id) {
            Some((_, n)) => *n += job.events.len() as i64,
            None => totals.push((&job.thread_id, job.events.len() as i64)),
        }
    }
    let mut next: HashMap<&str, i64> = HashMap::with_capacity(totals.len());
    if !totals.is_empty() {
        // Placeholders are numbered in order of appearance and bound in that order.
        let mut n = 0;
        let mut next_ph = || {
            n += 1;
            backend.placeholder(n)
        };
        let mut sql = String::from("UPDATE threads SET last_seq = last_seq + CASE id");
        for _ in &totals {
            let (a, b) = (next_ph(), next_ph());
            sql.push_str(&format!(" WHEN {a} THEN {b}"));
        }
        let now_ph = next_ph();
        let ids: Vec<String> = totals.iter().map(|_| next_ph()).collect();
        sql.push_str(&format!(
            " END, updated_at = {now_ph} WHERE deleted_at IS NULL AND id IN ({}) RETURNING id, last_seq",
            ids.join(", ")
        ));
        let mut query = sqlx::query(&sql);
        for (thread, n) in &totals {
            query = query.bind(*thread).bind(*n);
        }
        query = query.bind(now);
        for (thread, _) in &totals {
            query = query.bind(*thread);
        }
        let rows = query.fetch_all(&mut **tx).await?;
        for row in &rows {
            let id: String = row.try_get("id")?;
            let last: i64 = row.try_get("last_seq")?;
            if let Some((thread, n)) = totals.iter().find(|(t, _)| *t == id) {
                next.insert(thread, last - n + 1);
            }
        }
        if next.len() != totals.len() {
            return Err(StoreError::NotFound);
        }
    }
    Ok(jobs
        .iter()
        .map(|job| match next.get_mut(job.thread_id.as_str()) {
            Some(seq) => {
                let first = *seq;
                *seq += job.events.len() as i64;
                first
            }
            None => 0,
        })
        .collect())
}

/// Rows per insert statement: 7 parameters each stays far below every backend's limit.
const EVENT_ROWS_PER_INSERT: usize = 200;

async fn insert_events<'a>(
    tx: &mut Transaction<'static, Any>,
    backend: Backend,
    frames: impl Iterator<Item = &'a EventFrame>,
) -> Result<()> {
    let frames: Vec<&EventFrame> = frames.collect();
    for chunk in frames.chunks(EVENT_ROWS_PER_INSERT) {
        let mut sql =
            String::from("INSERT INTO events (thread_id, seq, run_id, type, agent_name, payload, created_at) VALUES ");
        let mut ph = Placeholders::new(backend);
        let rows: Vec<String> = chunk.iter().map(|_| ph.row(7)).collect();
        sql.push_str(&rows.join(", "));
        let mut query = sqlx::query(&sql);
        for f in chunk {
            query = query
                .bind(f.thread_id.as_str())
                .bind(f.seq as i64)
                .bind(f.run_id.as_deref())
                .bind(f.kind.as_str())
                .bind(f.agent_name.as_deref())
                .bind(f.payload.get())
                .bind(f.timestamp.as_str());
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// The job's message and run rows; `first` is the `seq` of its first event.
/// Numbered placeholders in order of appearance, whatever the backend's syntax.
struct Placeholders {
    backend: Backend,
    n: usize,
}

impl Placeholders {
    fn new(backend: Backend) -> Self {
        Self { backend, n: 0 }
    }

    /// `(p, p, …)` for one row of `cols` bound values.
    fn row(&mut self, cols: usize) -> String {
        format!("({})", self.items(cols).join(", "))
    }

    /// A row of `cols` bound values followed by a literal SQL value.
    fn row_then(&mut self, cols: usize, literal: &str) -> String {
        format!("({}, {literal})", self.items(cols).join(", "))
    }

    fn items(&mut self, cols: usize) -> Vec<String> {
        (0..cols)
            .map(|_| {
                self.n += 1;
                self.backend.placeholder(self.n)
            })
            .collect()
    }
}

/// Rows per multi-row insert of messages or runs.
const ROWS_PER_INSERT: usize = 200;

/// The batch's message and run rows, as few statements as the batch allows. Inserts come
/// before run endings, so a run that starts and ends within one batch is recorded right.
async fn write_rows(
    tx: &mut Transaction<'static, Any>,
    backend: Backend,
    jobs: &[WriteJob],
    firsts: &[i64],
    now: i64,
) -> Result<()> {
    let mut messages = Vec::new();
    let mut starts = Vec::new();
    let mut ends = Vec::new();
    for (job, first) in jobs.iter().zip(firsts) {
        for row in &job.rows {
            match row {
                Row::CreateThread { .. } => {}
                Row::Message { event_index, .. } => messages.push((job, first + *event_index as i64, row)),
                Row::StartRun { .. } => starts.push((job, row)),
                Row::EndRun { .. } => ends.push(row),
            }
        }
    }
    for chunk in messages.chunks(ROWS_PER_INSERT) {
        let mut ph = Placeholders::new(backend);
        let rows: Vec<String> = chunk.iter().map(|_| ph.row(7)).collect();
        let sql = format!(
            "INSERT INTO messages (id, thread_id, seq, role, content, run_id, created_at) VALUES {}",
            rows.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for (job, seq, row) in chunk {
            if let Row::Message { id, role, content, run_id, .. } = row {
                query = query
                    .bind(id.as_str())
                    .bind(job.thread_id.as_str())
                    .bind(*seq)
                    .bind(*role)
                    .bind(content.as_str())
                    .bind(run_id.as_deref())
                    .bind(now);
            }
        }
        query.execute(&mut **tx).await?;
    }
    for chunk in starts.chunks(ROWS_PER_INSERT) {
        let mut ph = Placeholders::new(backend);
        let rows: Vec<String> = chunk.iter().map(|_| ph.row_then(5, "'running'")).collect();
        let sql = format!(
            "INSERT INTO runs (id, thread_id, user_id, node_id, started_at, status) VALUES {}",
            rows.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for (job, row) in chunk {
            if let Row::StartRun { run_id, user_id, node_id } = row {
                query = query
                    .bind(run_id.as_str())
                    .bind(job.thread_id.as_str())
                    .bind(user_id.as_str())
                    .bind(node_id.as_str())
                    .bind(now);
            }
        }
        query.execute(&mut **tx).await?;
    }
    for row in ends {
        if let Row::EndRun { run_id, status, error, prompt_tokens, completion_tokens } = row {
            sqlx::query(
                "UPDATE runs SET status = $2, ended_at = $3, error = $4, prompt_tokens = $5, \
                 completion_tokens = $6 WHERE id = $1",
            )
            .bind(run_id)
            .bind(*status)
            .bind(now)
            .bind(error.as_deref())
            .bind(*prompt_tokens)
            .bind(*completion_tokens)
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(())
}

const THREAD_SELECT: &str = "SELECT t.id, t.owner_id, t.title, t.metadata, t.created_at, t.updated_at, t.last_seq, \
     (SELECT COUNT(*) FROM messages m WHERE m.thread_id = t.id) AS message_count FROM threads t";

fn thread_from_row(row: &AnyRow) -> Result<Thread> {
    let metadata: String = row.try_get("metadata")?;
    Ok(Thread {
        id: row.try_get("id")?,
        owner_id: row.try_get("owner_id")?,
        title: row.try_get("title")?,
        metadata: serde_json::from_str(&metadata).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        message_count: row.try_get("message_count")?,
        last_seq: row.try_get("last_seq")?,
    })
}

fn message_from_row(row: &AnyRow) -> Result<Message> {
    let metadata: String = row.try_get("metadata")?;
    Ok(Message {
        id: row.try_get("id")?,
        role: row.try_get("role")?,
        content: row.try_get("content")?,
        created_at: row.try_get("created_at")?,
        metadata: serde_json::from_str(&metadata).map_err(|e| StoreError::Corrupt(e.to_string()))?,
    })
}

fn is_comment_only(statement: &str) -> bool {
    statement.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with("--"))
}
