//! PostgreSQL's side of the store: a batch of jobs as a few multi-row statements (each
//! statement is a round trip, so fewer is faster), and the task that records users in
//! batches. Reads share the sqlx pool with SQLite and live in the facade.

use std::collections::HashMap;

use sqlx::{Any, AnyPool, Row as _};

use super::{Batch, NewUser, Result, Row, StoreError, WriteJob, shared_outcome};

/// [`Store::write_batch`](super::Store::write_batch) on PostgreSQL: few statements, each a
/// round trip, in one transaction; returns each job's first seq.
pub(super) async fn write_batch(pool: &AnyPool, jobs: &[WriteJob], now: i64) -> Result<Vec<i64>> {
    let batch = Batch::new(jobs, now);
    let mut tx = pool.begin().await?;
    for statement in batch.creates() {
        statement.sqlx().execute(&mut *tx).await?;
    }
    let mut handed_out = Vec::new();
    if let Some(statement) = batch.allocate() {
        for row in statement.sqlx().fetch_all(&mut *tx).await? {
            handed_out.push((row.try_get("id")?, row.try_get("last_seq")?));
        }
    }
    let firsts = batch.firsts(handed_out)?;
    for statement in batch.rest(&firsts) {
        statement.sqlx().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(firsts)
}

/// A user to record and who waits for it.
pub(super) type UserRequest = (NewUser, tokio::sync::oneshot::Sender<Result<()>>);

/// PostgreSQL's user recorder: every user queued goes into one statement, so a storm of
/// new connections is not a storm of round trips. Ends when every [`Store`] is dropped.
pub(super) async fn record_users(pool: AnyPool, mut requests: tokio::sync::mpsc::Receiver<UserRequest>) {
    let mut batch = Vec::new();
    while requests.recv_many(&mut batch, 500).await > 0 {
        let result = {
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
            let mut ph = Placeholders::default();
            let values: Vec<String> = rows.iter().map(|_| ph.row(4)).collect();
            let sql = format!(
                "INSERT INTO users (id, email, name, created_at) VALUES {}{}",
                values.join(", "),
                user_conflict!()
            );
            let mut query = sqlx::query(&sql);
            for user in &rows {
                query = query.bind(&user.id).bind(&user.email).bind(&user.name).bind(user.created_at);
            }
            query.execute(&pool).await.map(|_| ()).map_err(StoreError::from)
        };
        for (_, reply) in batch.drain(..) {
            let _ = reply.send(shared_outcome(&result));
        }
    }
}

/// A value bound to a statement of [`Store::write_batch`], whichever the driver.
#[derive(Debug, Clone, Copy)]
enum Param<'a> {
    Text(&'a str),
    MaybeText(Option<&'a str>),
    Int(i64),
    MaybeInt(Option<i64>),
}

/// A statement of [`Store::write_batch`] on PostgreSQL (SQLite's writer thread runs cached
/// single-row statements instead): its text and its values in placeholder order.
#[derive(Debug)]
struct Statement<'a> {
    sql: String,
    params: Vec<Param<'a>>,
}

impl Statement<'_> {
    fn sqlx(&self) -> sqlx::query::Query<'_, Any, sqlx::any::AnyArguments<'_>> {
        let mut query = sqlx::query(&self.sql);
        for param in &self.params {
            query = match *param {
                Param::Text(v) => query.bind(v),
                Param::MaybeText(v) => query.bind(v),
                Param::Int(v) => query.bind(v),
                Param::MaybeInt(v) => query.bind(v),
            };
        }
        query
    }
}

/// Rows per multi-row insert: 7 parameters each stays far below every backend's limit.
const ROWS_PER_INSERT: usize = 200;

impl<'a> Batch<'a> {
    /// One insert per thread the batch creates.
    fn creates(&self) -> Vec<Statement<'a>> {
        let mut statements = Vec::new();
        for job in self.jobs {
            for row in &job.rows {
                if let Row::CreateThread { owner_id, title } = row {
                    let mut ph = Placeholders::default();
                    statements.push(Statement {
                        sql: format!(
                            "INSERT INTO threads (id, owner_id, title, metadata, created_at, updated_at, last_seq) \
                             VALUES {}",
                            ph.row_with(&[None, None, None, Some("'{}'"), None, None, Some("0")])
                        ),
                        params: vec![
                            Param::Text(&job.thread_id),
                            Param::Text(owner_id),
                            Param::Text(title),
                            Param::Int(self.now),
                            Param::Int(self.now),
                        ],
                    });
                }
            }
        }
        statements
    }

    /// Hands out the next sequence numbers of every thread in the batch with one
    /// statement returning `(id, last_seq)`; none when the batch has no events. The row
    /// locks it takes serialize every writer of those threads, on every node, until
    /// commit: that is what keeps seq dense and unique.
    fn allocate(&self) -> Option<Statement<'a>> {
        if self.totals.is_empty() {
            return None;
        }
        let mut ph = Placeholders::default();
        let mut sql = String::from("UPDATE threads SET last_seq = last_seq + CASE id");
        let mut params = Vec::with_capacity(self.totals.len() * 3 + 1);
        for (thread, n) in &self.totals {
            let (a, b) = (ph.next(), ph.next());
            sql.push_str(&format!(" WHEN {a} THEN {b}"));
            params.extend([Param::Text(thread), Param::Int(*n)]);
        }
        sql.push_str(&format!(
            " END, updated_at = {} WHERE deleted_at IS NULL AND id IN {} RETURNING id, last_seq",
            ph.next(),
            ph.row(self.totals.len())
        ));
        params.push(Param::Int(self.now));
        params.extend(self.totals.iter().map(|(thread, _)| Param::Text(thread)));
        Some(Statement { sql, params })
    }

    /// The events, then the message and run rows, as few statements as the batch allows;
    /// `firsts` is the `seq` of each job's first event. Inserts come before run endings,
    /// so a run that starts and ends within one batch is recorded right.
    fn rest(&self, firsts: &[i64]) -> Vec<Statement<'a>> {
        let mut events = Vec::new();
        let mut messages = Vec::new();
        let mut starts = Vec::new();
        let mut ends = Vec::new();
        for (job, first) in self.jobs.iter().zip(firsts) {
            for (i, event) in job.events.iter().enumerate() {
                events.extend([
                    Param::Text(&job.thread_id),
                    Param::Int(first + i as i64),
                    Param::MaybeText(event.run_id.as_deref()),
                    Param::Text(event.kind.as_str()),
                    Param::MaybeText(event.agent_name.as_deref()),
                    Param::Text(event.payload.get()),
                    Param::Text(&event.timestamp),
                ]);
            }
            for row in &job.rows {
                match row {
                    Row::CreateThread { .. } => {}
                    Row::Message { id, role, content, run_id, event_index } => messages.extend([
                        Param::Text(id),
                        Param::Text(&job.thread_id),
                        Param::Int(first + *event_index as i64),
                        Param::Text(role),
                        Param::Text(content),
                        Param::MaybeText(run_id.as_deref()),
                        Param::Int(self.now),
                    ]),
                    Row::StartRun { run_id, user_id, node_id } => starts.extend([
                        Param::Text(run_id),
                        Param::Text(&job.thread_id),
                        Param::Text(user_id),
                        Param::Text(node_id),
                        Param::Int(self.now),
                    ]),
                    Row::EndRun { run_id, status, error, prompt_tokens, completion_tokens } => {
                        let mut ph = Placeholders::default();
                        ends.push(Statement {
                            sql: format!(
                                "UPDATE runs SET status = {}, ended_at = {}, error = {}, prompt_tokens = {}, \
                                 completion_tokens = {} WHERE id = {}",
                                ph.next(),
                                ph.next(),
                                ph.next(),
                                ph.next(),
                                ph.next(),
                                ph.next()
                            ),
                            params: vec![
                                Param::Text(status),
                                Param::Int(self.now),
                                Param::MaybeText(error.as_deref()),
                                Param::MaybeInt(*prompt_tokens),
                                Param::MaybeInt(*completion_tokens),
                                Param::Text(run_id),
                            ],
                        });
                    }
                }
            }
        }
        let mut statements = self.inserts(
            "INSERT INTO events (thread_id, seq, run_id, type, agent_name, payload, created_at) VALUES",
            &[None; 7],
            events,
        );
        statements.extend(self.inserts(
            "INSERT INTO messages (id, thread_id, seq, role, content, run_id, created_at) VALUES",
            &[None; 7],
            messages,
        ));
        statements.extend(self.inserts(
            "INSERT INTO runs (id, thread_id, user_id, node_id, started_at, status) VALUES",
            &[None, None, None, None, None, Some("'running'")],
            starts,
        ));
        statements.extend(ends);
        statements
    }

    /// Multi-row inserts of `params`, [`ROWS_PER_INSERT`] rows per statement, each row
    /// shaped like `columns` (see [`Placeholders::row_with`]).
    fn inserts(&self, head: &str, columns: &[Option<&str>], params: Vec<Param<'a>>) -> Vec<Statement<'a>> {
        let bound = columns.iter().filter(|c| c.is_none()).count();
        params
            .chunks(bound * ROWS_PER_INSERT)
            .map(|chunk| {
                let mut ph = Placeholders::default();
                let rows: Vec<String> = (0..chunk.len() / bound).map(|_| ph.row_with(columns)).collect();
                Statement { sql: format!("{head} {}", rows.join(", ")), params: chunk.to_vec() }
            })
            .collect()
    }
}

/// PostgreSQL's numbered placeholders (`$1`, `$2`, …) in order of appearance.
#[derive(Default)]
struct Placeholders {
    n: usize,
}

impl Placeholders {
    fn next(&mut self) -> String {
        self.n += 1;
        format!("${}", self.n)
    }

    /// `(p, p, …)` for one row of `cols` bound values.
    fn row(&mut self, cols: usize) -> String {
        format!("({})", (0..cols).map(|_| self.next()).collect::<Vec<_>>().join(", "))
    }

    /// One row: a placeholder for each `None` column, the literal SQL of each `Some`.
    fn row_with(&mut self, columns: &[Option<&str>]) -> String {
        let items: Vec<String> = columns
            .iter()
            .map(|c| match c {
                None => self.next(),
                Some(literal) => (*literal).to_string(),
            })
            .collect();
        format!("({})", items.join(", "))
    }
}
