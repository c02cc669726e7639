//! PostgreSQL's side of the store: the batch writer and the task that records users in
//! batches, each on a typed connection of its own ([`Own`]). Reads share the sqlx `Any`
//! pool with SQLite and live in the facade.
//!
//! A batch is one statement ([`WRITE_BATCH`]): every column travels as an array, so its
//! text never changes (prepared once per connection), and one statement is one round
//! trip and one commit. The earlier shape — `BEGIN`, a ping, one statement per table
//! and per run ending, `COMMIT`, each with SQL text built for its row count — took 7 to
//! 15 round trips per batch and parsed most statements anew (bench/PROFILE.md).

use std::collections::HashMap;
use std::str::FromStr as _;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgConnection, PgDatabaseError};
use sqlx::{Connection as _, Row as _};
use tokio::sync::Mutex;

use super::batch::Batch;
use super::{NewUser, Result, Row, StoreError, WriteJob, shared_outcome};

/// Writes a batch of jobs in one statement. Threads the batch creates start with
/// `last_seq` at their number of events (seq from 1); the others hand theirs out under
/// their row lock (`allocated`), which serializes every writer of a thread, on every
/// node, until commit: that is what keeps seq dense and unique. Sibling parts of one
/// statement see the same snapshot, so a run that starts and ends in the batch is
/// inserted with its ending ([`Columns::push_row`]). An event or run start of a thread
/// that is missing or deleted has no base, hence a null `thread_num` (a run's
/// `thread_id`): the statement fails whole and the error reads as [`StoreError::NotFound`].
/// That is also why these tables need no foreign keys (migrations 0006, 0009): every
/// row's thread is created or locked by the statement that writes it. Events are filed
/// under the thread's number (`num`), which the same parts return; an event that is a
/// chat message carries its id and its thread's message before it (from the batch, or
/// the row's `last_message` as the lock found it, which `message_before` returns), and
/// its thread's `message_count` and `last_message` follow. A thread whose jobs expected it
/// at another `last_seq` ([`Batch::expected`]) is not allocated, under the same lock, so
/// the statement fails as for a missing one; [`missing_or_raced`] tells the two apart.
const WRITE_BATCH: &str = "\
WITH created AS (
    INSERT INTO threads (id, owner_id, title, metadata, created_at, updated_at, last_seq, message_count,
                         last_message)
    SELECT id, owner_id, title, '{}', $1, $1, n, m, l
    FROM unnest($2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[])
        AS c (id, owner_id, title, n, m, l)
    RETURNING id, num, 0::bigint AS base, NULL::bigint AS message_before
), allocated AS (
    UPDATE threads t SET last_seq = t.last_seq + a.n, message_count = t.message_count + a.m,
                         message_before = t.last_message, last_message = COALESCE(t.last_seq + a.l, t.last_message),
                         updated_at = $1
    FROM unnest($8::text[], $9::bigint[], $10::bigint[], $11::bigint[], $34::bigint[]) AS a (id, n, m, l, expected)
    WHERE t.id = a.id AND t.deleted_at IS NULL AND (a.expected IS NULL OR t.last_seq = a.expected)
    RETURNING t.id, t.num, t.last_seq AS last_seq, t.last_seq - a.n AS base, t.message_before
), bases AS (
    SELECT id, num, base, message_before FROM created
    UNION ALL SELECT id, num, base, message_before FROM allocated
), written_events AS (
    INSERT INTO events (thread_num, seq, run_id, type, agent_name, payload, created_at, message_id,
                        previous_message)
    SELECT b.num, b.base + e.n, e.run_id, e.type, e.agent_name, e.payload, e.created_at, e.message_id,
           CASE WHEN e.previous = 0 THEN b.message_before ELSE b.base + e.previous END
    FROM unnest($12::text[], $13::bigint[], $14::text[], $15::text[], $16::text[], $17::text[], $18::text[],
                $19::text[], $20::bigint[])
        AS e (thread_id, n, run_id, type, agent_name, payload, created_at, message_id, previous)
    LEFT JOIN bases b ON b.id = e.thread_id
), started AS (
    INSERT INTO runs (id, thread_id, user_id, node_id, started_at, status, ended_at, error,
                      prompt_tokens, completion_tokens)
    SELECT s.id, b.id, s.user_id, s.node_id, $1, s.status, CASE WHEN s.status = 'running' THEN NULL ELSE $1 END,
           s.error, s.prompt_tokens, s.completion_tokens
    FROM unnest($21::text[], $22::text[], $23::text[], $24::text[], $25::text[], $26::text[], $27::bigint[],
                $28::bigint[])
        AS s (id, thread_id, user_id, node_id, status, error, prompt_tokens, completion_tokens)
    LEFT JOIN bases b ON b.id = s.thread_id
), ended AS (
    UPDATE runs r SET status = u.status, ended_at = $1, error = u.error, prompt_tokens = u.prompt_tokens,
                      completion_tokens = u.completion_tokens
    FROM unnest($29::text[], $30::text[], $31::text[], $32::bigint[], $33::bigint[])
        AS u (id, status, error, prompt_tokens, completion_tokens)
    WHERE r.id = u.id
)
SELECT id, last_seq FROM allocated";

/// A connection of its own for one task (the batch writer, the user recorder), opened
/// on first use and again after a failure that may have left it unusable.
pub(super) struct Own {
    options: PgConnectOptions,
    connect_timeout: Duration,
    conn: Option<PgConnection>,
    /// When the connection last did work: one idle past [`IDLE_CHECK`] is pinged first.
    used_at: Instant,
}

/// Idle time after which a connection is pinged before use: a server restarted while it
/// sat idle would otherwise fail the first batch after it (a lost answer cannot be retried
/// blindly: the batch may have committed). Under load no batch pays for the ping.
const IDLE_CHECK: Duration = Duration::from_secs(1);

impl Own {
    /// `name` is what `pg_stat_activity` shows as its `application_name`.
    pub(super) fn new(url: &str, connect_timeout: Duration, name: &str) -> Result<Self> {
        let options =
            PgConnectOptions::from_str(url).map_err(|e| StoreError::Unavailable(Box::new(e)))?.application_name(name);
        Ok(Self { options, connect_timeout, conn: None, used_at: Instant::now() })
    }

    /// Opens the connection ahead of its first use, which would otherwise wait for it
    /// (the startup self-test's first message waited for two: a connection is a few round
    /// trips), and prepares the one statement it is for: a new server process reads the
    /// tables' catalog and plans the statement once, off the path of the first use. A
    /// failure is left to that use, which connects and prepares again.
    pub(super) async fn open_ahead(&mut self, statement: &'static str) {
        let prepare = async |conn: &mut PgConnection| {
            sqlx::Executor::prepare(conn, statement).await.map(drop).map_err(StoreError::from)
        };
        if let Err(e) = self.run(prepare).await {
            let name = self.options.get_application_name().unwrap_or("netra");
            tracing::debug!(error = %e, connection = name, "a connection could not be opened ahead");
        }
    }

    /// Runs `work` on the connection; whatever state an error that is not the database's
    /// answer about the data left it in, the next call starts on a new one.
    async fn run<T>(&mut self, work: impl AsyncFnOnce(&mut PgConnection) -> Result<T>) -> Result<T> {
        if self.used_at.elapsed() > IDLE_CHECK
            && let Some(conn) = &mut self.conn
            && conn.ping().await.is_err()
        {
            self.conn = None;
        }
        self.used_at = Instant::now();
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => {
                let connect = async {
                    let mut conn = PgConnection::connect_with(&self.options).await?;
                    // A generic plan is made once, for the tables as they were then: one
                    // made while `runs` was empty scans it whole for every run ending
                    // ever after. Every table these statements read they read by primary
                    // key, so a plan that scans a table is never the right one for them.
                    sqlx::query("SET enable_seqscan = off").execute(&mut conn).await?;
                    Ok::<_, sqlx::Error>(conn)
                };
                let conn = tokio::time::timeout(self.connect_timeout, connect)
                    .await
                    .map_err(|e| StoreError::Unavailable(Box::new(e)))??;
                self.conn.insert(conn)
            }
        };
        let result = work(conn).await;
        if let Err(e) = &result
            && !answered(e)
        {
            self.conn = None;
        }
        result
    }
}

/// The batch writer's connection: one batch at a time, the writer task is its only user.
pub(super) struct Writer {
    own: Mutex<Own>,
}

impl Writer {
    pub(super) fn new(url: &str, connect_timeout: Duration) -> Result<Self> {
        Ok(Self { own: Mutex::new(Own::new(url, connect_timeout, "netra writer")?) })
    }

    /// Opens the connection ahead of the first batch ([`Own::open_ahead`]).
    pub(super) async fn warm(&self) {
        self.own.lock().await.open_ahead(WRITE_BATCH).await;
    }

    /// [`Store::write_batch`](super::Store::write_batch) on PostgreSQL: returns each
    /// job's first seq (0 for a job without events).
    pub(super) async fn write(&self, jobs: &[WriteJob], now: i64) -> Result<Vec<i64>> {
        self.own.lock().await.run(async |conn| write_batch(conn, jobs, now).await).await
    }
}

/// Whether an error is the database's answer about the data (the connection is fine),
/// rather than something that may have broken the connection.
fn answered(e: &StoreError) -> bool {
    match e {
        StoreError::NotFound | StoreError::Raced(_) => true,
        StoreError::Rejected(cause) => matches!(cause.downcast_ref::<sqlx::Error>(), Some(sqlx::Error::Database(_))),
        _ => false,
    }
}

async fn write_batch(conn: &mut PgConnection, jobs: &[WriteJob], now: i64) -> Result<Vec<i64>> {
    let batch = Batch::new(jobs);
    let columns = Columns::of(&batch);
    let rows = match columns.query(now).fetch_all(&mut *conn).await {
        Ok(rows) => rows,
        Err(sqlx::Error::Database(db))
            if db.try_downcast_ref::<PgDatabaseError>().is_some_and(|pg| {
                pg.code() == "23502" && matches!(pg.column(), Some("seq" | "thread_num" | "thread_id"))
            }) =>
        {
            return Err(missing_or_raced(conn, &batch).await);
        }
        Err(e) => return Err(StoreError::from(e)),
    };
    let allocated = rows
        .iter()
        .map(|row| Ok((row.try_get::<String, _>(0)?, row.try_get::<i64, _>(1)?)))
        .collect::<Result<Vec<_>>>()?;
    // A created thread's last seq is its number of events in the batch.
    let created = batch.totals.iter().filter(|(thread, _)| columns.created_ids.contains(thread)).copied();
    batch.firsts(allocated.iter().map(|(id, last)| (id.as_str(), *last)).chain(created))
}

/// Why a batch found a thread it needs missing: gone (`NotFound`), or written since jobs
/// that expected it as it was were made (`Raced`, naming them). Read after the failed
/// statement: a thread's `last_seq` only grows, so an expectation that failed then fails
/// now. One that held then and fails now (the statement failed for another thread, and
/// the thread was written in between) is named too: its job is made again, no harm.
async fn missing_or_raced(conn: &mut PgConnection, batch: &Batch<'_>) -> StoreError {
    let expecting: Vec<&str> =
        batch.totals.iter().map(|(thread, _)| *thread).filter(|thread| batch.expected_of(thread).is_some()).collect();
    if expecting.is_empty() {
        return StoreError::NotFound;
    }
    let found = sqlx::query("SELECT id, last_seq FROM threads WHERE id = ANY($1) AND deleted_at IS NULL")
        .bind(&expecting)
        .fetch_all(&mut *conn)
        .await;
    let found = match found {
        Ok(rows) => rows.iter().map(|row| Ok((row.try_get::<String, _>(0)?, row.try_get::<i64, _>(1)?))).collect(),
        Err(e) => Err(e),
    };
    let found: HashMap<String, i64> = match found {
        Ok(found) => found,
        Err(e) => return StoreError::from(e),
    };
    let raced = batch.raced(|i| found.get(batch.totals[i].0).copied());
    if raced.is_empty() { StoreError::NotFound } else { StoreError::Raced(raced) }
}

/// A user to record and who waits for it.
pub(super) type UserRequest = (NewUser, tokio::sync::oneshot::Sender<Result<()>>);

/// Records a batch of users in one statement; the last claims of a user win.
const RECORD_USERS: &str = concat!(
    "INSERT INTO users (id, email, name, created_at) \
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])",
    user_conflict!()
);

/// PostgreSQL's user recorder, on a connection of its own: every user queued goes into
/// one statement, so a storm of new connections is not a storm of round trips. Ends when
/// every [`Store`](super::Store) is dropped.
pub(super) async fn record_users(mut own: Own, mut requests: tokio::sync::mpsc::Receiver<UserRequest>) {
    let mut batch = Vec::new();
    own.open_ahead(RECORD_USERS).await;
    while requests.recv_many(&mut batch, 500).await > 0 {
        // One row per user: one statement may not update a row twice. The last claims win.
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut rows: Vec<&NewUser> = Vec::new();
        for (user, _) in &batch {
            match index.get(user.id.as_str()) {
                Some(&i) => rows[i] = user,
                None => {
                    index.insert(&user.id, rows.len());
                    rows.push(user);
                }
            }
        }
        let statement = || {
            sqlx::query(RECORD_USERS)
                .bind(rows.iter().map(|u| u.id.as_str()).collect::<Vec<_>>())
                .bind(rows.iter().map(|u| u.email.as_deref()).collect::<Vec<_>>())
                .bind(rows.iter().map(|u| u.name.as_deref()).collect::<Vec<_>>())
                .bind(rows.iter().map(|u| u.created_at).collect::<Vec<_>>())
        };
        let record = async |own: &mut Own| {
            let query = statement();
            own.run(async |conn| query.execute(conn).await.map(|_| ()).map_err(StoreError::from)).await
        };
        // Recording users is idempotent: a connection that broke under it (the server
        // restarted since its last use) is replaced and the statement sent once more.
        let result = match record(&mut own).await {
            Err(e) if !answered(&e) => record(&mut own).await,
            result => result,
        };
        for (_, reply) in batch.drain(..) {
            let _ = reply.send(shared_outcome(&result));
        }
    }
}

/// A batch as the arrays [`WRITE_BATCH`] takes: one vector per column, borrowed from the
/// jobs (no payload is copied).
#[derive(Default)]
struct Columns<'a> {
    created_ids: Vec<&'a str>,
    created_owners: Vec<&'a str>,
    created_titles: Vec<&'a str>,
    created_events: Vec<i64>,
    created_messages: Vec<i64>,
    created_last_messages: Vec<Option<i64>>,
    allocated_ids: Vec<&'a str>,
    allocated_events: Vec<i64>,
    allocated_messages: Vec<i64>,
    allocated_last_messages: Vec<Option<i64>>,
    /// The `last_seq` a thread must have for the batch to be written ([`Batch::expected`]).
    allocated_expected: Vec<Option<i64>>,
    event_threads: Vec<&'a str>,
    /// An event's place among its thread's events in the batch, from 1.
    event_places: Vec<i64>,
    event_runs: Vec<Option<&'a str>>,
    event_kinds: Vec<&'a str>,
    event_agents: Vec<Option<&'a str>>,
    event_payloads: Vec<&'a str>,
    event_times: Vec<&'a str>,
    /// The id of the message an event carries, if any ([`Batch::message_ids`]).
    event_messages: &'a [Option<&'a str>],
    /// A message's place of its thread's message before it (0: before the batch).
    event_previous: &'a [Option<i64>],
    starts: Vec<Run<'a>>,
    ends: Vec<Run<'a>>,
}

/// A run row: started (status `running` unless it also ended in the batch) or ended.
#[derive(Clone, Copy, Default)]
struct Run<'a> {
    id: &'a str,
    thread_id: &'a str,
    user_id: &'a str,
    node_id: &'a str,
    status: &'a str,
    error: Option<&'a str>,
    prompt_tokens: Option<i64>,
    completion_tokens: Option<i64>,
}

impl<'a> Run<'a> {
    fn take_ending(&mut self, end: &Run<'a>) {
        self.status = end.status;
        self.error = end.error;
        self.prompt_tokens = end.prompt_tokens;
        self.completion_tokens = end.completion_tokens;
    }
}

impl<'a> Columns<'a> {
    fn of(batch: &'a Batch<'a>) -> Self {
        let mut c = Self::default();
        for job in batch.jobs {
            for row in &job.rows {
                if let Row::CreateThread { owner_id, title } = row {
                    let (events, said) = batch.counts(&job.thread_id);
                    c.created_ids.push(&job.thread_id);
                    c.created_owners.push(owner_id);
                    c.created_titles.push(title);
                    c.created_events.push(events);
                    c.created_messages.push(said.count);
                    c.created_last_messages.push(said.last);
                }
            }
        }
        // Every existing thread a row needs is locked, a thread with no events in the
        // batch too (0 seq handed out): a run row of a job without events still finds
        // its thread's base, or fails the batch if the thread is gone.
        let mut allocated: Vec<&str> =
            batch.totals.iter().map(|(thread, _)| *thread).filter(|thread| !c.created_ids.contains(thread)).collect();
        for job in batch.jobs {
            let thread = job.thread_id.as_str();
            let needs_base = job.rows.iter().any(|r| matches!(r, Row::StartRun { .. }));
            if needs_base && !c.created_ids.contains(&thread) && !allocated.contains(&thread) {
                allocated.push(thread);
            }
        }
        // Locked in id order, the same on every node: two nodes' batches that share
        // threads wait for each other instead of deadlocking.
        allocated.sort_unstable();
        for thread in allocated {
            let (events, said) = batch.counts(thread);
            c.allocated_ids.push(thread);
            c.allocated_events.push(events);
            c.allocated_messages.push(said.count);
            c.allocated_last_messages.push(said.last);
            c.allocated_expected.push(batch.expected_of(thread));
        }
        c.event_messages = &batch.message_ids;
        c.event_previous = &batch.previous;
        for (job, &first) in batch.jobs.iter().zip(&batch.places) {
            let thread = job.thread_id.as_str();
            for (i, event) in job.events.iter().enumerate() {
                c.event_threads.push(thread);
                c.event_places.push(first + i as i64);
                c.event_runs.push(event.run_id.as_deref());
                c.event_kinds.push(event.kind.as_str());
                c.event_agents.push(event.agent_name);
                c.event_payloads.push(event.payload.get());
                c.event_times.push(&event.timestamp);
            }
            for row in &job.rows {
                c.push_row(thread, row);
            }
        }
        c
    }

    /// A job's run row (thread and message rows are written with the thread and events).
    fn push_row(&mut self, thread_id: &'a str, row: &'a Row) {
        match row {
            Row::CreateThread { .. } | Row::Message { .. } => {}
            Row::StartRun { run_id, user_id, node_id } => {
                let mut start = Run { id: run_id, thread_id, user_id, node_id, status: "running", ..Run::default() };
                // An ending that came first (not in today's order of writes) goes with it.
                if let Some(i) = self.ends.iter().position(|r| r.id == run_id) {
                    start.take_ending(&self.ends.remove(i));
                }
                self.starts.push(start);
            }
            Row::EndRun { run_id, status, error, prompt_tokens, completion_tokens } => {
                let end = Run {
                    id: run_id,
                    thread_id,
                    status,
                    error: error.as_deref(),
                    prompt_tokens: *prompt_tokens,
                    completion_tokens: *completion_tokens,
                    ..Run::default()
                };
                // The statement's parts see one snapshot: a run inserted by it cannot be
                // updated by it, so it is inserted ended. A run ended twice keeps the last.
                if let Some(run) = self.starts.iter_mut().find(|r| r.id == run_id) {
                    run.take_ending(&end);
                } else if let Some(run) = self.ends.iter_mut().find(|r| r.id == run_id) {
                    run.take_ending(&end);
                } else {
                    self.ends.push(end);
                }
            }
        }
    }

    fn query(&self, now: i64) -> sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments> {
        let column = |runs: &[Run<'a>], f: fn(&Run<'a>) -> &'a str| runs.iter().map(f).collect::<Vec<_>>();
        let (starts, ends) = (&self.starts, &self.ends);
        sqlx::query(WRITE_BATCH)
            .bind(now)
            .bind(&self.created_ids)
            .bind(&self.created_owners)
            .bind(&self.created_titles)
            .bind(&self.created_events)
            .bind(&self.created_messages)
            .bind(&self.created_last_messages)
            .bind(&self.allocated_ids)
            .bind(&self.allocated_events)
            .bind(&self.allocated_messages)
            .bind(&self.allocated_last_messages)
            .bind(&self.event_threads)
            .bind(&self.event_places)
            .bind(&self.event_runs)
            .bind(&self.event_kinds)
            .bind(&self.event_agents)
            .bind(&self.event_payloads)
            .bind(&self.event_times)
            .bind(self.event_messages)
            .bind(self.event_previous)
            .bind(column(starts, |r| r.id))
            .bind(column(starts, |r| r.thread_id))
            .bind(column(starts, |r| r.user_id))
            .bind(column(starts, |r| r.node_id))
            .bind(column(starts, |r| r.status))
            .bind(starts.iter().map(|r| r.error).collect::<Vec<_>>())
            .bind(starts.iter().map(|r| r.prompt_tokens).collect::<Vec<_>>())
            .bind(starts.iter().map(|r| r.completion_tokens).collect::<Vec<_>>())
            .bind(column(ends, |r| r.id))
            .bind(column(ends, |r| r.status))
            .bind(ends.iter().map(|r| r.error).collect::<Vec<_>>())
            .bind(ends.iter().map(|r| r.prompt_tokens).collect::<Vec<_>>())
            .bind(ends.iter().map(|r| r.completion_tokens).collect::<Vec<_>>())
            .bind(&self.allocated_expected)
    }
}
