//! The source of truth: users, threads, runs and every thread event, in SQLite (the
//! embedded default, WAL) or PostgreSQL, through one [`Store`] API. SQL lives in this
//! module only. Multi-row writes are single transactions: a failed one leaves nothing
//! behind. Sequence numbers are handed out inside the writing transaction from the
//! thread row, so they stay dense and unique under concurrent writers on any node.
//! Events are filed under the thread's number (`threads.num`, an integer) rather than
//! its text id: theirs is the index a chat writes most (migration 0009). The API speaks
//! thread ids; reads find the number by the id in the same statement. A chat message is
//! the event that carries it (a `user_message` or a `final_report`, stored with the
//! message's id), and the thread row counts them: the text is stored once (migration 0010).
//! They are linked newest to oldest, from the thread row through the events (0011).
//!
//! Who owns what: this module is the facade (the API, its types and errors, the reads and
//! REST writes through the sqlx pool); [`batch`] is the plan of a batch of writes that
//! both writers follow (its `seq` numbers and its messages' links); [`messages`] reads a
//! thread's messages from their events; [`sqlite`] is SQLite's writer thread, which runs
//! every batch of events on its own rusqlite connection, and the history read;
//! [`postgres`] holds PostgreSQL's writer connection, which writes a batch as one
//! statement of arrays (typed sqlx, prepared once), and the user recorder's, which
//! records users in batches the same way; [`cache`] and [`history`] are what this node
//! remembers between calls.
//!
//! Why two drivers on SQLite: the event path (every batch, and the history a run reads)
//! runs on one thread that owns a rusqlite connection with cached statements, because
//! sqlx-sqlite hands every statement and row across threads, which measured several times
//! the CPU (bench/PROFILE.md, 5, 7 and 8). The reads and REST writes go through one sqlx
//! pool (`Any`) with one text of each statement for both backends: they are not on the
//! measured path, and one text keeps the two backends from drifting apart.

/// What recording a user who exists already does: absent claims keep stored ones.
macro_rules! user_conflict {
    () => {
        " ON CONFLICT (id) DO UPDATE SET email = COALESCE(excluded.email, users.email), \
         name = COALESCE(excluded.name, users.name)"
    };
}

/// A new thread's number on SQLite, which has no identity columns: one past the highest,
/// read from the end of `threads_num` (writers are serialized by the database's write
/// lock). PostgreSQL's column numbers new threads itself.
macro_rules! sqlite_next_thread_num {
    () => {
        "(SELECT IFNULL(MAX(num), 0) + 1 FROM threads)"
    };
}

mod batch;
mod cache;
mod history;
mod messages;
mod postgres;
mod sqlite;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use serde_json::value::RawValue;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row as _};
use tracing::instrument;

use self::messages::{PAGE_OF_MESSAGES, RECENT_MESSAGES, message_from_row};
use crate::config::DatabaseUrl;
use crate::protocol::{EventFrame, EventText, EventType};
use crate::telemetry::metric;

/// The driver's error behind a [`StoreError`].
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// What can go wrong in the store, by meaning.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    /// The thread is another user's. Each way in decides what its client hears: REST says
    /// 403, the socket says what it says of a missing thread (nothing leaks).
    #[error("the thread is another user's")]
    NotOwner,
    #[error("database unavailable: {0}")]
    Unavailable(#[source] Cause),
    #[error("database rejected the operation: {0}")]
    Rejected(#[source] Cause),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The request would break a limit; the message says which.
    #[error("{0}")]
    TooLarge(String),
    /// Jobs of a batch (their places in it) found their thread written since they were
    /// made ([`WriteJob::expected_last_seq`]); nothing of the batch was written.
    #[error("{} jobs found their thread written since they were made", .0.len())]
    Raced(Vec<usize>),
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
            | sqlx::Error::Protocol(_) => Self::Unavailable(Box::new(e)),
            // PostgreSQL's class 08 (connection exception) and 57P (shutting down,
            // crashed, starting up) say the server is away; 57014, a cancelled statement,
            // does not.
            sqlx::Error::Database(ref db) if db.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P")) => {
                Self::Unavailable(Box::new(e))
            }
            other => Self::Rejected(Box::new(other)),
        }
    }
}

type Result<T> = std::result::Result<T, StoreError>;

/// The schema's versions in order: each with its SQL and the backend it is for (`None`:
/// both). A version for the other backend is recorded as applied without running.
const MIGRATIONS: &[(i64, &str, Option<Backend>)] = &[
    (1, include_str!("migrations/0001_init.sql"), None),
    (2, include_str!("migrations/0002_run_usage.sql"), None),
    (3, include_str!("migrations/0003_threads_by_owner.sql"), None),
    (4, include_str!("migrations/0004_running_runs.sql"), None),
    (5, include_str!("migrations/0005_nodes.sql"), None),
    (6, include_str!("migrations/0006_postgres_events_without_foreign_keys.sql"), Some(Backend::Postgres)),
    (7, include_str!("migrations/0007_sqlite_thread_numbers.sql"), Some(Backend::Sqlite)),
    (8, include_str!("migrations/0008_postgres_thread_numbers.sql"), Some(Backend::Postgres)),
    (9, include_str!("migrations/0009_events_by_thread_number.sql"), None),
    (10, include_str!("migrations/0010_messages_are_events.sql"), None),
    (11, include_str!("migrations/0011_message_chain.sql"), None),
];

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
    /// What runs [`Store::write_batch`]: SQLite's writer thread, or PostgreSQL's writer
    /// connection.
    writer: Option<Writer>,
    /// On PostgreSQL, the task that records users in batches.
    user_queue: Option<tokio::sync::mpsc::Sender<postgres::UserRequest>>,
    owners: Arc<cache::OwnerCache>,
    history: Arc<history::HistoryCache>,
    users: Arc<cache::RecordedUsers>,
}

/// Each backend's writer of event batches.
#[derive(Clone)]
enum Writer {
    Sqlite(sqlite::Writer),
    Postgres(Arc<postgres::Writer>),
}

/// A user to record.
#[derive(Debug)]
struct NewUser {
    id: String,
    email: Option<String>,
    name: Option<String>,
    created_at: i64,
}

/// Inserts a user, or updates the claims it came with.
const UPSERT_USER: &str =
    concat!("INSERT INTO users (id, email, name, created_at) VALUES ($1, $2, $3, $4)", user_conflict!());

/// One batch's outcome, for each request in it: the error's kind (database away or the
/// operation refused) is kept, its text copied.
fn shared_outcome(result: &Result<()>) -> Result<()> {
    match result {
        Ok(()) => Ok(()),
        Err(StoreError::Unavailable(e)) => Err(StoreError::Unavailable(e.to_string().into())),
        Err(e) => Err(StoreError::Rejected(e.to_string().into())),
    }
}

/// The memory the store's caches may keep unless `NETRA_CACHE_BYTES` says otherwise.
pub const DEFAULT_CACHE_BYTES: usize = 48 << 20;

/// The store's caches within about `bytes`: two thirds for the history, a sixth each
/// for thread owners and recorded users.
fn caches(bytes: usize) -> (Arc<cache::OwnerCache>, Arc<history::HistoryCache>, Arc<cache::RecordedUsers>) {
    (
        Arc::new(cache::OwnerCache::new(bytes / 6)),
        Arc::new(history::HistoryCache::new(HISTORY_DEPTH, bytes / 3 * 2)),
        Arc::new(cache::RecordedUsers::new(bytes / 6)),
    )
}

/// The most messages a run reads as its history ([`Store::recent_messages`]).
pub const HISTORY_DEPTH: usize = 50;

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
    /// Its place in the thread: the `seq` of the event that carried it.
    pub seq: i64,
}

/// A run that was still marked running when its node stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterruptedRun {
    pub run_id: String,
    pub thread_id: String,
}

/// A run left `running` by a node whose lease ran out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrphanedRun {
    pub run: InterruptedRun,
    pub node_id: String,
}

/// An event to persist; it gets its `seq` in the writing transaction.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kind: EventType,
    /// Shared by every event of its run.
    pub run_id: Option<Arc<str>>,
    pub agent_name: Option<&'static str>,
    pub timestamp: String,
    pub payload: Box<RawValue>,
}

impl NewEvent {
    /// The event's frame text once it is stored in `thread_id` as `seq`.
    pub fn frame_text(&self, thread_id: &str, seq: u64) -> String {
        EventText {
            kind: self.kind.as_str(),
            thread_id,
            run_id: self.run_id.as_deref(),
            seq,
            agent_name: self.agent_name,
            timestamp: &self.timestamp,
            payload: &self.payload,
        }
        .to_text()
    }
}

/// Rows written in the same transaction as a job's events.
#[derive(Debug, Clone)]
pub enum Row {
    CreateThread {
        owner_id: String,
        title: String,
    },
    /// The job's event at `event_index` is a chat message (a `user_message` echo or a
    /// `final_report`) with this id: the event is stored with it and the thread's
    /// `message_count` grows. `role` and `content` are what the event says, for the
    /// history this node keeps.
    Message {
        id: String,
        role: &'static str,
        content: String,
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
    /// The thread's `last_seq` the job was made for (a run that took its history from
    /// memory): the job is written only if its first event gets the seq right after it.
    /// If another writer (another node) wrote the thread since, the batch fails with
    /// [`StoreError::Raced`] and writes nothing. `None`: written wherever its turn comes.
    pub expected_last_seq: Option<u64>,
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
                    std::fs::create_dir_all(parent).map_err(|e| StoreError::Unavailable(Box::new(e)))?;
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
                // A ping before each use is a round trip to the connection's worker
                // thread; a SQLite file handle cannot go stale the way a socket can.
                .test_before_acquire(backend == Backend::Postgres)
                .acquire_timeout(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100)))
                .after_connect(move |conn, _| {
                    Box::pin(async move {
                        if backend == Backend::Sqlite {
                            for pragma in sqlite::PRAGMAS {
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
                Err(e) => return Err(StoreError::Unavailable(Box::new(e))),
            }
        };
        let (owners, history, users) = caches(DEFAULT_CACHE_BYTES);
        let mut store = Self { pool, backend, writer: None, user_queue: None, owners, history, users };
        store.migrate().await?;
        match url {
            DatabaseUrl::Sqlite(path) => store.writer = Some(Writer::Sqlite(sqlite::Writer::start(path).await?)),
            DatabaseUrl::Postgres(url) => {
                let writer = Arc::new(postgres::Writer::new(url.expose(), timeout)?);
                tokio::spawn({
                    let writer = writer.clone();
                    async move { writer.warm().await }
                });
                store.writer = Some(Writer::Postgres(writer));
                let (queue, requests) = tokio::sync::mpsc::channel(4096);
                tokio::spawn(postgres::record_users(
                    postgres::Own::new(url.expose(), timeout, "netra users")?,
                    requests,
                ));
                store.user_queue = Some(queue);
            }
        }
        Ok(store)
    }

    /// Applies missing migrations, each in its own transaction. On PostgreSQL an advisory
    /// lock keeps two nodes starting together from applying the same one twice.
    pub async fn migrate(&self) -> Result<()> {
        // The usual start: everything applied already. One read, no lock, no transaction.
        // The table is made only when that read fails (a new database), so a start does
        // not pay a second round trip for it (nor PostgreSQL's notice that it exists).
        let applied = || sqlx::query_scalar::<_, i64>("SELECT version FROM netra_migrations").fetch_all(&self.pool);
        let applied = match applied().await {
            Ok(applied) => applied,
            Err(_) => {
                sqlx::query(
                    "CREATE TABLE IF NOT EXISTS netra_migrations (version BIGINT PRIMARY KEY, \
                     applied_at BIGINT NOT NULL)",
                )
                .execute(&self.pool)
                .await?;
                applied().await?
            }
        };
        if MIGRATIONS.iter().all(|(version, _, _)| applied.contains(version)) {
            return Ok(());
        }
        for (version, sql, only) in MIGRATIONS {
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
            let code = without_comments(sql);
            let statements = code.split(';').map(str::trim).filter(|s| !s.is_empty());
            for statement in statements.filter(|_| only.is_none_or(|backend| backend == self.backend)) {
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

    /// Leaves the database tidy for the next start: on SQLite the WAL is copied back and
    /// truncated (otherwise the next open replays it, up to 64 MiB). Called at shutdown.
    pub async fn close(&self) -> Result<()> {
        match &self.writer {
            Some(Writer::Sqlite(writer)) => writer.checkpoint().await,
            _ => Ok(()),
        }
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

    /// Records a user and the claims it came with. Repeats with the same claims cost
    /// nothing; on SQLite, users recorded together are one transaction on the writer.
    #[instrument(skip_all, fields(user_id))]
    pub async fn upsert_user(&self, user_id: &str, email: Option<&str>, name: Option<&str>) -> Result<()> {
        if self.users.has(user_id, email, name) {
            return Ok(());
        }
        let user = NewUser {
            id: user_id.to_string(),
            email: email.map(str::to_string),
            name: name.map(str::to_string),
            created_at: now_ms(),
        };
        match (&self.writer, &self.user_queue) {
            (Some(Writer::Sqlite(writer)), _) => writer.upsert_user(user).await?,
            (_, Some(queue)) => {
                let (reply, answer) = tokio::sync::oneshot::channel();
                let stopped = || StoreError::Unavailable("the user recorder stopped".into());
                queue.send((user, reply)).await.map_err(|_| stopped())?;
                answer.await.map_err(|_| stopped())??;
            }
            _ => {
                sqlx::query(UPSERT_USER)
                    .bind(&user.id)
                    .bind(&user.email)
                    .bind(&user.name)
                    .bind(user.created_at)
                    .execute(&self.pool)
                    .await?;
            }
        }
        self.users.remember(user_id, email, name);
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

    /// Checks that `user` owns the live thread `thread_id`, from the owner cache when it
    /// can: the one ownership check every way in (socket, REST, agent) makes. `NotOwner`
    /// for another user's thread, `NotFound` for a missing or deleted one.
    pub async fn check_owner(&self, user: &str, thread_id: &str) -> Result<()> {
        if self.thread_owner(thread_id).await? == user { Ok(()) } else { Err(StoreError::NotOwner) }
    }

    /// The live thread `thread_id` if `user` owns it; errors as [`Store::check_owner`].
    pub async fn owned_thread(&self, user: &str, thread_id: &str) -> Result<Thread> {
        let thread = self.thread(thread_id).await?;
        if thread.owner_id == user { Ok(thread) } else { Err(StoreError::NotOwner) }
    }

    /// The owner of a live thread (cached): what [`Store::check_owner`] compares.
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
        let metadata = metadata_text(metadata)?;
        let insert = match self.backend {
            Backend::Sqlite => concat!(
                "INSERT INTO threads (id, owner_id, title, metadata, created_at, updated_at, last_seq, num) \
                 VALUES ($1, $2, $3, $4, $5, $5, 0, ",
                sqlite_next_thread_num!(),
                ")"
            ),
            Backend::Postgres => {
                "INSERT INTO threads (id, owner_id, title, metadata, created_at, updated_at, last_seq) \
                 VALUES ($1, $2, $3, $4, $5, $5, 0)"
            }
        };
        sqlx::query(insert)
            .bind(thread_id)
            .bind(owner_id)
            .bind(title)
            .bind(metadata)
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
        let merged = metadata_text(&merged)?;
        sqlx::query("UPDATE threads SET title = COALESCE($2, title), metadata = $3, updated_at = $4 WHERE id = $1")
            .bind(thread_id)
            .bind(title)
            .bind(merged)
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
        self.history.forget(thread_id);
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
        self.history.forget(thread_id);
        let mut tx = self.pool.begin().await?;
        // The thread row first: a batch writing the thread holds its lock, so this waits
        // for that batch to commit, and the deletes below then see its rows; a batch that
        // comes after finds no thread. (Events have no cascade.)
        let num: Option<i64> = sqlx::query_scalar("DELETE FROM threads WHERE id = $1 RETURNING num")
            .bind(thread_id)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(num) = num {
            sqlx::query("DELETE FROM events WHERE thread_num = $1").bind(num).execute(&mut *tx).await?;
        }
        sqlx::query("DELETE FROM runs WHERE thread_id = $1").bind(thread_id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A page of a thread's messages in conversation order, and the total count (none
    /// for a thread that does not exist).
    #[instrument(skip_all, fields(thread_id))]
    pub async fn messages(&self, thread_id: &str, limit: i64, offset: i64) -> Result<(Vec<Message>, i64)> {
        // Far below overflow in `total - offset - limit`, far above any thread.
        let bound = |n: i64| n.clamp(0, i64::MAX / 4);
        let rows = sqlx::query(PAGE_OF_MESSAGES)
            .bind(thread_id)
            .bind(bound(offset))
            .bind(bound(limit))
            .fetch_all(&self.pool)
            .await?;
        let total = match rows.first() {
            Some(row) => row.try_get("total")?,
            // An empty page: the count alone (a missing thread has none).
            None => sqlx::query_scalar("SELECT message_count FROM threads WHERE id = $1")
                .bind(thread_id)
                .fetch_optional(&self.pool)
                .await?
                .unwrap_or(0),
        };
        let messages = rows.iter().map(message_from_row).collect::<Result<_>>()?;
        Ok((messages, total))
    }

    /// The thread as a job submitted now will find it: the `seq` its writes have reached
    /// and its last `limit` messages (at most [`HISTORY_DEPTH`]), oldest first, from
    /// memory. A thread being created has none, on either backend (no other writer can
    /// know its new id). An existing one is known when this node follows the thread and
    /// nothing of it is still on its way to the store (the caller knows); `None`
    /// otherwise. Another node may have written it since (on PostgreSQL): a job made
    /// from this answer names the `seq` it expects ([`WriteJob::expected_last_seq`]).
    pub fn history_now(&self, thread_id: &str, new_thread: bool, limit: usize) -> Option<(u64, Vec<Arc<Message>>)> {
        if new_thread {
            return Some((0, Vec::new()));
        }
        self.history.tail(thread_id, limit.min(HISTORY_DEPTH))
    }

    /// Bounds what the store keeps in memory to about `bytes` (see [`caches`]). Called
    /// before the store is used (it starts the caches empty).
    pub fn with_cache_bytes(mut self, bytes: usize) -> Self {
        (self.owners, self.history, self.users) = caches(bytes);
        self
    }

    /// What the store holds in memory, as gauges (set when `/metrics` is read, so the
    /// write path pays nothing for them): entries of each cache, and the bytes of
    /// message text the history keeps. Each is bounded (see [`cache`] and [`history`]).
    pub fn record_cache_sizes(&self) {
        let (threads, bytes) = self.history.size();
        metrics::gauge!(metric::CACHE_ENTRIES, "cache" => "history").set(threads as f64);
        metrics::gauge!(metric::CACHE_BYTES, "cache" => "history").set(bytes as f64);
        for (name, (entries, bytes)) in [("thread_owners", self.owners.size()), ("users", self.users.size())] {
            metrics::gauge!(metric::CACHE_ENTRIES, "cache" => name).set(entries as f64);
            metrics::gauge!(metric::CACHE_BYTES, "cache" => name).set(bytes as f64);
        }
    }

    /// The last `limit` (at most [`HISTORY_DEPTH`]) messages of a thread up to `seq`,
    /// oldest first: the agent's context, where `seq` is the run's own message (a run in
    /// the same thread that started later is not part of it). Threads this node writes
    /// are answered from memory.
    #[instrument(skip_all, fields(thread_id))]
    pub async fn recent_messages(&self, thread_id: &str, limit: usize, seq: u64) -> Result<Vec<Arc<Message>>> {
        let limit = limit.min(HISTORY_DEPTH);
        if let Some(messages) = self.history.get(thread_id, limit, seq) {
            return Ok(messages);
        }
        let depth = HISTORY_DEPTH as i64;
        let (newest_first, through) = match &self.writer {
            Some(Writer::Sqlite(writer)) => writer.recent(thread_id, depth).await?,
            _ => {
                let rows = sqlx::query(RECENT_MESSAGES).bind(thread_id).bind(depth).fetch_all(&self.pool).await?;
                let through = rows.first().map(|r| r.try_get::<i64, _>("through_seq")).transpose()?;
                (rows.iter().map(message_from_row).collect::<Result<Vec<_>>>()?, through)
            }
        };
        let newest_first: Vec<Arc<Message>> = newest_first.into_iter().map(Arc::new).collect();
        if let Some(through) = through {
            self.history.fill(thread_id, u64::try_from(through).unwrap_or(0), &newest_first);
        }
        let upto = i64::try_from(seq).unwrap_or(i64::MAX);
        let mut history: Vec<Arc<Message>> = newest_first.into_iter().filter(|m| m.seq <= upto).take(limit).collect();
        history.reverse();
        Ok(history)
    }

    /// Up to `limit` events with `seq > after_seq`, in order, and no more than fit in
    /// about `budget` bytes of payload (always at least one): a page of large events is
    /// never read into memory whole. The sizes are read first, then only the rows that fit.
    #[instrument(skip_all, fields(thread_id, after_seq))]
    pub async fn events_after(
        &self,
        thread_id: &str,
        after_seq: u64,
        limit: u32,
        budget: usize,
    ) -> Result<Vec<EventFrame>> {
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let sizes: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT seq, LENGTH(payload) FROM events WHERE thread_num = (SELECT num FROM threads WHERE id = $1) \
             AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(thread_id)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut used = 0usize;
        let mut upto = None;
        for (seq, size) in sizes {
            used += usize::try_from(size).unwrap_or(0);
            if upto.is_some() && used > budget {
                break;
            }
            upto = Some(seq);
        }
        let Some(upto) = upto else { return Ok(Vec::new()) };
        let rows = sqlx::query(
            "SELECT seq, run_id, type, agent_name, payload, created_at FROM events \
             WHERE thread_num = (SELECT num FROM threads WHERE id = $1) AND seq > $2 AND seq <= $3 ORDER BY seq",
        )
        .bind(thread_id)
        .bind(after)
        .bind(upto)
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

    /// Writes every job in one transaction and returns the `seq` of each job's first event
    /// (0 for a job without events); the job's later events follow densely. All or
    /// nothing: on error no job's rows exist. The jobs are shared, not copied, with the
    /// SQLite writer thread.
    #[instrument(skip_all, fields(jobs = jobs.len()))]
    pub async fn write_batch(&self, jobs: &Arc<[WriteJob]>) -> Result<Vec<u64>> {
        let now = now_ms();
        let written = match &self.writer {
            Some(Writer::Sqlite(writer)) => writer.write(jobs.clone(), now).await,
            Some(Writer::Postgres(writer)) => writer.write(jobs, now).await,
            None => return Err(StoreError::Unavailable("the store has no writer".into())),
        };
        let firsts = match written {
            Ok(firsts) => firsts,
            Err(StoreError::Raced(raced)) => {
                // What this node keeps of those threads is behind: their next run reads.
                for &i in &raced {
                    self.history.forget(&jobs[i].thread_id);
                }
                return Err(StoreError::Raced(raced));
            }
            Err(e) => return Err(e),
        };
        let firsts: Vec<u64> = firsts.into_iter().map(|f| u64::try_from(f).unwrap_or(0)).collect();
        for (job, first) in jobs.iter().zip(&firsts) {
            for row in &job.rows {
                if let Row::CreateThread { owner_id, .. } = row {
                    self.owners.insert(&job.thread_id, owner_id);
                }
            }
            self.history.record(job, *first, now);
        }
        Ok(firsts)
    }

    /// A node is starting, before any run of it exists: returns the runs its previous
    /// process left `running`, to be ended as interrupted. On a store nodes share, the
    /// node's lease is renewed first, in the same statement (one round trip on the startup
    /// path): it is alive before any run of it exists, so no other node sweeps its runs.
    #[instrument(skip_all, fields(node_id))]
    pub async fn node_started(&self, node_id: &str, now: i64) -> Result<Vec<InterruptedRun>> {
        const RUNNING: &str = "SELECT id, thread_id FROM runs WHERE status = 'running' AND node_id = $1";
        let rows = if self.is_shared() {
            // A data-modifying part of a statement runs whether or not it is read.
            let statement = format!(
                "WITH lease AS (INSERT INTO nodes (id, started_at, heartbeat_at) VALUES ($1, $2, $2) \
                 ON CONFLICT (id) DO UPDATE SET heartbeat_at = $2) {RUNNING}"
            );
            sqlx::query(&statement).bind(node_id).bind(now).fetch_all(&self.pool).await?
        } else {
            sqlx::query(RUNNING).bind(node_id).fetch_all(&self.pool).await?
        };
        rows.iter()
            .map(|r| Ok(InterruptedRun { run_id: r.try_get("id")?, thread_id: r.try_get("thread_id")? }))
            .collect()
    }

    /// The owner's threads written since `since_ms` (Unix ms), with their last `seq`.
    pub async fn threads_written_since(&self, owner: &str, since_ms: i64) -> Result<Vec<(String, u64)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT id, last_seq FROM threads WHERE owner_id = $1 AND updated_at >= $2 AND deleted_at IS NULL",
        )
        .bind(owner)
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(id, seq)| (id, u64::try_from(seq).unwrap_or(0))).collect())
    }

    /// The first `seq` of the thread's events written at or after `since_ms` (Unix ms).
    pub async fn first_seq_since(&self, thread_id: &str, since_ms: i64) -> Result<Option<u64>> {
        let since = crate::protocol::format_rfc3339(
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(since_ms) * 1_000_000)
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
        );
        let first: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(seq) FROM events WHERE thread_num = (SELECT num FROM threads WHERE id = $1) \
                 AND created_at >= $2",
        )
        .bind(thread_id)
        .bind(since)
        .fetch_one(&self.pool)
        .await?;
        Ok(first.and_then(|s| u64::try_from(s).ok()))
    }

    /// Renews `node`'s lease: it is alive at `now` (Unix ms).
    pub async fn renew_lease(&self, node: &str, now: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO nodes (id, started_at, heartbeat_at) VALUES ($1, $2, $2) \
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = $2",
        )
        .bind(node)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Gives `node`'s lease up: it stopped with no run left.
    pub async fn release_lease(&self, node: &str) -> Result<()> {
        sqlx::query("DELETE FROM nodes WHERE id = $1").bind(node).execute(&self.pool).await?;
        Ok(())
    }

    /// Runs still `running` on a node other than `me` whose lease was last renewed before
    /// `expired` (Unix ms), or that has none.
    pub async fn orphaned_runs(&self, me: &str, expired: i64) -> Result<Vec<OrphanedRun>> {
        let rows = sqlx::query(
            "SELECT r.id, r.thread_id, r.node_id FROM runs r WHERE r.status = 'running' AND r.node_id <> $1 \
             AND NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = r.node_id AND n.heartbeat_at >= $2)",
        )
        .bind(me)
        .bind(expired)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OrphanedRun {
                    run: InterruptedRun { run_id: r.try_get("id")?, thread_id: r.try_get("thread_id")? },
                    node_id: r.try_get("node_id")?,
                })
            })
            .collect()
    }

    /// Takes a running run over from node `from` for node `to`: true for exactly one of
    /// the nodes that try, false when another did or the run ended.
    pub async fn take_over_run(&self, run_id: &str, from: &str, to: &str) -> Result<bool> {
        let done = sqlx::query("UPDATE runs SET node_id = $3 WHERE id = $1 AND node_id = $2 AND status = 'running'")
            .bind(run_id)
            .bind(from)
            .bind(to)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Whether several nodes may share this database (PostgreSQL), so leases matter.
    pub fn is_shared(&self) -> bool {
        self.backend == Backend::Postgres
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

/// The most a thread's metadata may hold, as stored JSON. Every thread listing returns it.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

/// A thread's metadata as stored, if it is within [`MAX_METADATA_BYTES`].
fn metadata_text(metadata: &Value) -> Result<String> {
    let text = metadata.to_string();
    if text.len() > MAX_METADATA_BYTES {
        return Err(StoreError::TooLarge(format!(
            "thread metadata would be {} bytes; the limit is {MAX_METADATA_BYTES}",
            text.len()
        )));
    }
    Ok(text)
}

const THREAD_SELECT: &str = "SELECT t.id, t.owner_id, t.title, t.metadata, t.created_at, t.updated_at, \
     t.last_seq, t.message_count FROM threads t";

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

/// A migration without its comment lines, so that statements can be split at semicolons
/// whatever the comments say.
fn without_comments(sql: &str) -> String {
    sql.lines().filter(|l| !l.trim_start().starts_with("--")).collect::<Vec<_>>().join("\n")
}
