//! The agent supervisor: starts runs as tracked tasks with a deadline and a cancellation
//! token, enforces the per-user limit on concurrent runs, stops runs on request, and
//! drains them on shutdown. A run only emits events through delivery; it never touches
//! a socket, and every run ends with a persisted final event and status. Providers
//! (the builtin agent, an OpenAI-compatible model) only produce a run's middle events.

mod builtin;
mod openai;
pub mod tools;

use foldhash::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use builtin::Builtin;
pub use openai::{ClientError, OpenAi, UpstreamError};

use crate::analytics::{self, Analytics, RunRow};
use crate::delivery::{Delivery, DeliveryError, InFlight, Link};
use crate::protocol::{
    self, Empty, ErrorCode, EventType, FailureReason, Payload, Role, RunResult, Status, Tokens, now_rfc3339,
};
use crate::store::{InterruptedRun, Message, NewEvent, Row, Store, StoreError, WriteJob};
use crate::telemetry::metric;

/// The name every event of a run carries in `agent_name`.
pub const AGENT_NAME: &str = "supervisor";

/// How many of a thread's latest messages a run reads as its context.
const HISTORY_MESSAGES: usize = crate::store::HISTORY_DEPTH;

/// Where a run's words come from.
#[derive(Debug, Clone)]
pub enum Provider {
    Builtin(Builtin),
    OpenAi(OpenAi),
}

impl Provider {
    async fn run(&self, ctx: &RunContext) -> Result<Answer, RunFailure> {
        match self {
            Self::Builtin(b) => b.run(ctx).await,
            Self::OpenAi(o) => o.run(ctx).await,
        }
    }

    /// The provider's kind and model, as analytics records them.
    fn describe(&self) -> (&'static str, &str) {
        match self {
            Self::Builtin(_) => ("builtin", "builtin"),
            Self::OpenAi(o) => ("openai", o.model()),
        }
    }
}

/// Which provider serves whom.
#[derive(Debug, Clone)]
pub struct Providers {
    /// Serves every user but `probe`'s.
    pub main: Provider,
    /// A user whose runs use another provider: the startup self-test checks netra's own
    /// pipeline with the builtin agent, whatever model serves everyone else.
    pub probe: Option<(String, Provider)>,
}

impl Providers {
    fn for_user(&self, user_id: &str) -> &Provider {
        match &self.probe {
            Some((probe, provider)) if probe == user_id => provider,
            _ => &self.main,
        }
    }
}

/// Tokens a model reported for a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// A finished answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub text: String,
    /// The tools called, in order.
    pub tools: Vec<String>,
    /// `None` when no model ran (the builtin agent) or it reported none.
    pub usage: Option<Usage>,
}

/// Why a run could not produce an answer.
#[derive(Debug, thiserror::Error)]
pub enum RunFailure {
    #[error("could not record the run's progress: {0}")]
    Delivery(#[from] DeliveryError),
    #[error("could not read the thread's history: {0}")]
    History(#[from] StoreError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// A bug: the provider panicked. The run still ends, persisted, and frees its slot.
    #[error("the agent panicked: {0}")]
    Panicked(String),
}

impl RunFailure {
    /// The reason code and message the client sees: upstream causes in general terms,
    /// server faults not at all. The details stay in the log.
    fn public(&self) -> (&'static str, String) {
        match self {
            Self::Upstream(e) => (e.reason(), e.public_message()),
            Self::Delivery(_) | Self::History(_) => {
                ("failed", "the run could not be stored: the database is unavailable; try again".into())
            }
            Self::Panicked(_) => ("failed", "the agent failed; see the server log".into()),
        }
    }
}

/// What a provider sees of the run it works on.
pub struct RunContext {
    /// Shared with every write of the run's chain (see [`Link`]).
    pub run_id: Arc<str>,
    pub thread_id: String,
    pub owner: String,
    pub text: String,
    /// The thread's messages, oldest first, ending with this run's user message.
    pub history: Vec<Arc<Message>>,
    /// The `seq` of the run's own message.
    message_seq: u64,
    delivery: Delivery,
    /// Emitted events whose commit has not been confirmed yet.
    in_flight: std::sync::Mutex<Vec<InFlight>>,
    /// Streamed text held back to be merged (see [`RunContext::stream_text`]).
    held: std::sync::Mutex<HeldText>,
    stream_interval: Duration,
    /// What analytics records of the run: when it was asked for, its first text, its tools.
    timing: std::sync::Mutex<Timing>,
}

/// When a run was asked for and what it did, for its analytics row.
struct Timing {
    requested: Instant,
    requested_unix: u32,
    first_text: Option<Instant>,
    tool_calls: u32,
}

impl Timing {
    fn now() -> Self {
        Self { requested: Instant::now(), requested_unix: analytics::unix_now(), first_text: None, tool_calls: 0 }
    }
}

/// Answer text streamed but not yet emitted, and when the last `partial_result` went.
#[derive(Default)]
struct HeldText {
    pending: String,
    last_sent: Option<tokio::time::Instant>,
}

impl RunContext {
    /// Persists and publishes one event of this run. The write is pipelined: the run does
    /// not wait for each commit (the writer keeps submission order, so events still
    /// commit and publish in order), but the first failed write fails the next emit.
    /// Text streamed before it is emitted first, so the thread keeps its order.
    pub async fn emit(&self, payload: Payload<'_>) -> Result<(), DeliveryError> {
        self.flush_text().await?;
        if payload.kind() == EventType::ToolExecuting {
            self.timing().tool_calls += 1;
        }
        self.push_event(&payload).await
    }

    /// Streams answer text as `partial_result` deltas, merged: the first chunk goes at
    /// once, later chunks wait until the stream interval has passed since the last delta
    /// and then go together. A run is then a handful of events, not one per token, at
    /// whatever pace the model writes; held text goes before the run's next event, when
    /// [`RunContext::text_due`] says so, and before the run's ending.
    pub async fn stream_text(&self, chunk: &str) -> Result<(), DeliveryError> {
        let due = {
            let mut held = self.held();
            held.pending.push_str(chunk);
            held.last_sent.is_none_or(|t| t.elapsed() >= self.stream_interval)
        };
        if due { self.flush_text().await } else { Ok(()) }
    }

    /// When held text is due, if any: a provider waiting on a slow source emits it then
    /// with [`RunContext::flush_text`].
    pub fn text_due(&self) -> Option<tokio::time::Instant> {
        let held = self.held();
        if held.pending.is_empty() {
            return None;
        }
        Some(held.last_sent.map_or_else(tokio::time::Instant::now, |t| t + self.stream_interval))
    }

    /// Emits the held text now, if there is any.
    pub async fn flush_text(&self) -> Result<(), DeliveryError> {
        let text = {
            let mut held = self.held();
            if held.pending.is_empty() {
                return Ok(());
            }
            held.last_sent = Some(tokio::time::Instant::now());
            std::mem::take(&mut held.pending)
        };
        self.timing().first_text.get_or_insert_with(Instant::now);
        self.push_event(&Payload::PartialResult { content: &text, is_complete: false }).await
    }

    fn timing(&self) -> std::sync::MutexGuard<'_, Timing> {
        self.timing.lock().expect("timing lock is never held across a panic")
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HeldText> {
        self.held.lock().expect("held-text lock is never held across a panic")
    }

    async fn push_event(&self, payload: &Payload<'_>) -> Result<(), DeliveryError> {
        self.check_written()?;
        let job = WriteJob {
            expected_last_seq: None,
            thread_id: self.thread_id.clone(),
            rows: Vec::new(),
            events: vec![run_event(&self.run_id, payload)],
        };
        let in_flight = self.delivery.submit_in(&self.run_id, Link::Next, job, &self.owner).await?;
        self.in_flight().push(in_flight);
        Ok(())
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, Vec<InFlight>> {
        self.in_flight.lock().expect("in-flight lock is never held across a panic")
    }

    /// Drops commits that succeeded; returns the first failure.
    fn check_written(&self) -> Result<(), DeliveryError> {
        let mut failure = None;
        self.in_flight().retain_mut(|w| match w.try_outcome() {
            None => true,
            Some(Ok(())) => false,
            Some(Err(e)) => {
                failure.get_or_insert(e);
                false
            }
        });
        failure.map_or(Ok(()), Err)
    }

    /// Waits until every event emitted so far is committed.
    async fn settle(&self) -> Result<(), DeliveryError> {
        let pending = std::mem::take(&mut *self.in_flight());
        for w in pending {
            w.wait().await?;
        }
        Ok(())
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic".into())
}

fn run_event(run_id: &Arc<str>, payload: &Payload<'_>) -> NewEvent {
    NewEvent {
        kind: payload.kind(),
        run_id: Some(run_id.clone()),
        agent_name: Some(AGENT_NAME),
        timestamp: now_rfc3339(),
        payload: payload.to_raw(),
    }
}

/// Why a run was not started. Each maps to one §6c code in the gateway.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("thread not found")]
    Forbidden,
    #[error("too many runs in progress for this user")]
    Busy,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    #[error(transparent)]
    Store(StoreError),
}

/// A run that was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStarted {
    pub run_id: String,
    pub thread_id: String,
}

struct ActiveRun {
    user_id: String,
    thread_id: String,
    cancel: CancellationToken,
}

/// The runs on this node, with how many each user and each thread has: a start checks
/// its user's limit and whether its thread is quiet without going through every run
/// (two string compares per run on this node, for every start).
#[derive(Default)]
struct ActiveRuns {
    by_id: HashMap<String, ActiveRun>,
    per_user: HashMap<String, usize>,
    per_thread: HashMap<String, usize>,
}

impl ActiveRuns {
    fn of_user(&self, user_id: &str) -> usize {
        self.per_user.get(user_id).copied().unwrap_or(0)
    }

    fn in_thread(&self, thread_id: &str) -> bool {
        self.per_thread.contains_key(thread_id)
    }

    fn insert(&mut self, run_id: String, run: ActiveRun) {
        *self.per_user.entry(run.user_id.clone()).or_default() += 1;
        *self.per_thread.entry(run.thread_id.clone()).or_default() += 1;
        if let Some(replaced) = self.by_id.insert(run_id, run) {
            self.uncount(&replaced);
        }
    }

    fn remove(&mut self, run_id: &str) -> Option<ActiveRun> {
        let run = self.by_id.remove(run_id)?;
        self.uncount(&run);
        Some(run)
    }

    fn uncount(&mut self, run: &ActiveRun) {
        for (map, key) in [(&mut self.per_user, &run.user_id), (&mut self.per_thread, &run.thread_id)] {
            if let Some(n) = map.get_mut(key.as_str()) {
                *n -= 1;
                if *n == 0 {
                    map.remove(key.as_str());
                }
            }
        }
    }
}

struct Inner {
    delivery: Delivery,
    store: Store,
    providers: Providers,
    node_id: String,
    runs_per_user: usize,
    deadline: Duration,
    /// How long streamed text is held to be merged into one delta.
    stream_interval: Duration,
    analytics: Analytics,
    runs: Mutex<ActiveRuns>,
    tracker: TaskTracker,
    accepting: AtomicBool,
}

/// Owns every run on this node.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

/// How a run ended; persisted as the run's status.
#[derive(Debug)]
enum Ending {
    Completed(Answer),
    Cancelled,
    TimedOut,
    Failed(RunFailure),
}

impl Supervisor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        delivery: Delivery,
        store: Store,
        providers: Providers,
        node_id: String,
        runs_per_user: usize,
        deadline: Duration,
        stream_interval: Duration,
        analytics: Analytics,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                delivery,
                store,
                providers,
                node_id,
                runs_per_user,
                deadline,
                stream_interval,
                analytics,
                runs: Mutex::new(ActiveRuns::default()),
                tracker: TaskTracker::new(),
                accepting: AtomicBool::new(true),
            }),
        }
    }

    fn runs(&self) -> std::sync::MutexGuard<'_, ActiveRuns> {
        self.inner.runs.lock().expect("runs lock is never held across a panic")
    }

    /// The run has ended or never started: its slot is free.
    fn forget_run(&self, run_id: &str) {
        if let Some(run) = self.runs().remove(run_id) {
            self.inner.delivery.broker().release(&run.user_id);
        }
    }

    /// Ends the runs a previous process on this node left marked `running`: each gets
    /// a persisted failure so clients that resume see how it ended.
    pub async fn close_interrupted_runs(&self, interrupted: &[InterruptedRun]) -> Result<usize, StartError> {
        for run in interrupted {
            self.end_interrupted(run, "the run was interrupted when the server stopped").await?;
        }
        Ok(interrupted.len())
    }

    /// Ends the runs of nodes whose lease ran out before `expired` (Unix ms): each is
    /// taken over first, so exactly one node ends it, whichever nodes sweep at once.
    pub async fn close_orphaned_runs(&self, expired: i64) -> Result<usize, StartError> {
        let store = &self.inner.store;
        let orphans = store.orphaned_runs(&self.inner.node_id, expired).await.map_err(StartError::Store)?;
        let mut ended = 0;
        for orphan in &orphans {
            let taken = store.take_over_run(&orphan.run.run_id, &orphan.node_id, &self.inner.node_id).await;
            if !taken.map_err(StartError::Store)? {
                continue;
            }
            tracing::info!(run_id = %orphan.run.run_id, node = %orphan.node_id, "ending a run of a node that is gone");
            self.end_interrupted(&orphan.run, "the run was interrupted: the server running it stopped").await?;
            ended += 1;
        }
        Ok(ended)
    }

    /// Writes the `interrupted` ending of a run no task of this process runs.
    async fn end_interrupted(&self, run: &InterruptedRun, message: &str) -> Result<(), StartError> {
        let owner = match self.inner.store.thread_owner(&run.thread_id).await {
            Ok(owner) => owner,
            Err(StoreError::NotFound) => return Ok(()),
            Err(e) => return Err(StartError::Store(e)),
        };
        let job = ending_job(
            &run.thread_id,
            &run.run_id,
            "interrupted",
            failure_events(&Arc::from(run.run_id.as_str()), message, "interrupted"),
            Some(message),
            None,
        );
        self.inner.delivery.commit(job, &owner).await?;
        tracing::info!(run_id = %run.run_id, "marked run interrupted");
        Ok(())
    }

    /// Starts a run on `text` in `thread_id` (a new thread when `None`). The user's
    /// message, the run and its first events are one transaction.
    pub async fn start(&self, user_id: &str, thread_id: Option<&str>, text: &str) -> Result<RunStarted, StartError> {
        // On a task of its own: a caller that goes away (a socket closed, an HTTP request
        // dropped) must not cancel a start halfway, after the run took its slot and its
        // first commit was queued but before its task was spawned.
        let this = self.clone();
        let (user_id, thread_id, text) = (user_id.to_string(), thread_id.map(str::to_string), text.to_string());
        self.inner
            .tracker
            .spawn(Box::pin(async move { this.start_now(&user_id, thread_id.as_deref(), &text).await }))
            .await
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "a run's start panicked");
                Err(StartError::Store(StoreError::Unavailable("the run could not be started".into())))
            })
    }

    async fn start_now(&self, user_id: &str, thread_id: Option<&str>, text: &str) -> Result<RunStarted, StartError> {
        match self.start_once(user_id, thread_id, text, true).await {
            // Another node wrote the thread since this node last did, and nothing of the
            // start was written: the run starts again, reading its history after its start.
            Err(StartError::Delivery(DeliveryError::Raced)) => {
                metrics::counter!(metric::RUN_STARTS, "start" => "raced").increment(1);
                self.start_once(user_id, thread_id, text, false).await
            }
            started => started,
        }
    }

    /// Starts a run; `ahead`: from the history this node keeps, if it has it
    /// ([`Supervisor::start_ahead`]).
    async fn start_once(
        &self,
        user_id: &str,
        thread_id: Option<&str>,
        text: &str,
        ahead: bool,
    ) -> Result<RunStarted, StartError> {
        if !self.inner.accepting.load(Ordering::Acquire) {
            return Err(StartError::ShuttingDown);
        }
        let timing = Timing::now();
        let run_id = format!("run_{}", uuid::Uuid::now_v7().simple());
        let cancel = CancellationToken::new();
        let (thread_id, create) = match thread_id {
            Some(id) => {
                match self.inner.store.check_owner(user_id, id).await {
                    Ok(()) => {}
                    Err(StoreError::NotFound | StoreError::NotOwner) => return Err(StartError::Forbidden),
                    Err(e) => return Err(StartError::Store(e)),
                }
                (id.to_string(), false)
            }
            None => (format!("th_{}", uuid::Uuid::now_v7().simple()), true),
        };
        // Another run of this thread on this node may still have messages on their way to
        // the store, which this run's history must include.
        let thread_quiet = {
            let mut runs = self.runs();
            if runs.of_user(user_id) >= self.inner.runs_per_user {
                return Err(StartError::Busy);
            }
            let quiet = !runs.in_thread(&thread_id);
            runs.insert(
                run_id.clone(),
                ActiveRun { user_id: user_id.to_string(), thread_id: thread_id.clone(), cancel: cancel.clone() },
            );
            // A run's user's channel stays subscribed while it runs: a stop from another
            // node reaches it.
            self.inner.delivery.broker().hold(user_id);
            quiet
        };
        let message_id = format!("msg_{}", uuid::Uuid::now_v7().simple());
        let mut rows = Vec::new();
        let mut events = Vec::new();
        if create {
            let title: String = text.chars().take(50).collect();
            rows.push(Row::CreateThread { owner_id: user_id.to_string(), title: title.clone() });
            let created = Payload::ThreadCreated { thread_id: &thread_id, title: &title };
            events.push(NewEvent {
                kind: created.kind(),
                run_id: None,
                agent_name: None,
                timestamp: now_rfc3339(),
                payload: created.to_raw(),
            });
        }
        let message_index = events.len();
        rows.push(Row::Message {
            id: message_id.clone(),
            role: "user",
            content: text.to_string(),
            event_index: message_index,
        });
        rows.push(Row::StartRun {
            run_id: run_id.clone(),
            user_id: user_id.to_string(),
            node_id: self.inner.node_id.clone(),
        });
        let run: Arc<str> = Arc::from(run_id.as_str());
        let mut echo =
            run_event(&run, &Payload::UserMessage { message_id: &message_id, content: text, role: Role::User });
        echo.agent_name = None;
        events.push(echo);
        let message = format!("{AGENT_NAME} started");
        events.push(run_event(
            &run,
            &Payload::AgentStarted { status: Status::Started, message: &message, context: Empty {} },
        ));
        let job = WriteJob { expected_last_seq: None, thread_id: thread_id.clone(), rows, events };
        let started = RunStarted { run_id: run_id.clone(), thread_id: thread_id.clone() };
        let ctx = RunContext {
            run_id: run,
            thread_id: thread_id.clone(),
            owner: user_id.to_string(),
            text: text.to_string(),
            history: Vec::new(),
            message_seq: 0,
            delivery: self.inner.delivery.clone(),
            in_flight: Default::default(),
            held: Default::default(),
            stream_interval: self.inner.stream_interval,
            timing: std::sync::Mutex::new(timing),
        };
        let known = if thread_quiet && ahead {
            self.inner.store.history_now(&thread_id, create, HISTORY_MESSAGES - 1)
        } else {
            None
        };
        match known {
            Some((through, history)) => {
                // Another node may have written the thread since this one last did: the
                // start is written only if it has not ([`DeliveryError::Raced`]).
                let job = WriteJob { expected_last_seq: (!create).then_some(through), ..job };
                self.start_ahead(ctx, cancel, job, through, history, message_index, &message_id).await?;
            }
            None => self.start_after_commit(ctx, cancel, job, message_index).await?,
        }
        Ok(started)
    }

    /// Starts a run whose history is known before its start is written: its first
    /// events follow the start in the run's chain of writes, so a fast run is one commit
    /// (its thread's pages written once, not twice). The start's outcome is still
    /// awaited before the caller hears it. The start is written only if the thread is
    /// still as this node last wrote it ([`WriteJob::expected_last_seq`]): on PostgreSQL
    /// another node may have written it since, and then nothing of the run is written
    /// ([`DeliveryError::Raced`]) and [`Supervisor::start_now`] starts it again.
    #[allow(clippy::too_many_arguments)]
    async fn start_ahead(
        &self,
        mut ctx: RunContext,
        cancel: CancellationToken,
        job: WriteJob,
        through: u64,
        mut history: Vec<Arc<Message>>,
        message_index: usize,
        message_id: &str,
    ) -> Result<(), StartError> {
        let message_seq = through + 1 + message_index as u64;
        history.push(Arc::new(Message {
            id: message_id.to_string(),
            role: "user".into(),
            content: ctx.text.clone(),
            created_at: crate::store::now_ms(),
            metadata: Value::Object(Default::default()),
            seq: i64::try_from(message_seq).unwrap_or(i64::MAX),
        }));
        ctx.history = history;
        ctx.message_seq = message_seq;
        let run_id = ctx.run_id.clone();
        let owner = ctx.owner.clone();
        let start = match self.inner.delivery.submit_in(&run_id, Link::Next, job, &owner).await {
            Ok(start) => start,
            Err(e) => {
                self.forget_run(&run_id);
                return Err(e.into());
            }
        };
        metrics::gauge!(metric::RUNS_ACTIVE).increment(1.0);
        let (written, start_written) = oneshot::channel();
        let this = self.clone();
        // Boxed: a run's future is large, and the task would otherwise copy it whole into
        // its cell and again when it finishes.
        self.inner.tracker.spawn(Box::pin(async move { this.execute(ctx, cancel, Some(start_written)).await }));
        let outcome = start.wait().await;
        let _ = written.send(outcome.is_ok());
        outcome?;
        metrics::counter!(metric::RUN_STARTS, "start" => "one_commit").increment(1);
        Ok(())
    }

    /// Starts a run once its start is written, and reads its history then.
    async fn start_after_commit(
        &self,
        mut ctx: RunContext,
        cancel: CancellationToken,
        job: WriteJob,
        message_index: usize,
    ) -> Result<(), StartError> {
        ctx.message_seq = match self.inner.delivery.commit(job, &ctx.owner).await {
            Ok(first) => first + message_index as u64,
            Err(e) => {
                self.forget_run(&ctx.run_id);
                return Err(e.into());
            }
        };
        metrics::counter!(metric::RUN_STARTS, "start" => "after_commit").increment(1);
        metrics::gauge!(metric::RUNS_ACTIVE).increment(1.0);
        let this = self.clone();
        self.inner.tracker.spawn(Box::pin(async move { this.execute(ctx, cancel, None).await }));
        Ok(())
    }

    #[tracing::instrument(name = "run", skip_all, fields(run_id = %ctx.run_id, thread_id = %ctx.thread_id))]
    /// Runs the provider and records how the run ended. `start_written` is set for a run
    /// started ahead of its start's commit ([`Supervisor::start_ahead`]): it tells
    /// whether the start was written, and a run whose start was not leaves nothing behind.
    async fn execute(
        self,
        mut ctx: RunContext,
        cancel: CancellationToken,
        start_written: Option<oneshot::Receiver<bool>>,
    ) {
        let started = Instant::now();
        let queue_ms = analytics::millis(started.duration_since(ctx.timing().requested));
        let history_known = start_written.is_some();
        let provider = self.inner.providers.for_user(&ctx.owner);
        // A model behind an API is paid per call, so a run started ahead calls one only
        // once its start is written: a start that raced another node's write must not
        // cost a call. Its first words take a round trip to the model anyway; the builtin
        // agent's come at once and join its start's commit.
        let mut start_written = start_written;
        if matches!(provider, Provider::OpenAi(_))
            && let Some(written) = start_written.take()
            && written.await != Ok(true)
        {
            self.release(&ctx).await;
            metrics::gauge!(metric::RUNS_ACTIVE).decrement(1.0);
            self.forget_run(&ctx.run_id);
            return;
        }
        // Dropping `work` (stop, deadline) drops the provider's upstream stream with it.
        let work = async {
            if !history_known {
                ctx.history =
                    self.inner.store.recent_messages(&ctx.thread_id, HISTORY_MESSAGES, ctx.message_seq).await?;
            }
            provider.run(&ctx).await
        };
        // A panic in a provider must not skip the run's ending (its slot, its status).
        let work = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(work));
        let ending = tokio::select! {
            biased;
            _ = cancel.cancelled() => Ending::Cancelled,
            r = tokio::time::timeout(self.inner.deadline, work) => match r {
                Ok(Ok(Ok(answer))) => Ending::Completed(answer),
                Ok(Ok(Err(failure))) => Ending::Failed(failure),
                Ok(Err(panic)) => Ending::Failed(RunFailure::Panicked(panic_message(panic.as_ref()))),
                Err(_) => Ending::TimedOut,
            },
        };
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let (usage, reason) = match &ending {
            Ending::Completed(answer) => (answer.usage, ""),
            Ending::Cancelled => (None, ""),
            Ending::TimedOut => (None, "timed_out"),
            Ending::Failed(failure) => (None, failure.public().0),
        };
        if let Some(status) = self.record_ending(&ctx, ending, elapsed_ms, start_written).await {
            metrics::counter!(metric::RUNS, "outcome" => status).increment(1);
            let reason = if status == "failed" && reason.is_empty() { "failed" } else { reason };
            self.record_run(&ctx, status, reason, queue_ms, usage);
        }
        metrics::gauge!(metric::RUNS_ACTIVE).decrement(1.0);
        self.forget_run(&ctx.run_id);
    }

    /// The run's analytics row, and its error when it ended with one. The self-test's
    /// runs are netra's own, not a user's.
    fn record_run(&self, ctx: &RunContext, status: &'static str, reason: &str, queue_ms: u32, usage: Option<Usage>) {
        let analytics = &self.inner.analytics;
        if !analytics.is_on() || self.inner.providers.probe.as_ref().is_some_and(|(probe, _)| *probe == ctx.owner) {
            return;
        }
        let timing = ctx.timing();
        let (provider, model) = self.inner.providers.for_user(&ctx.owner).describe();
        let usage = usage.unwrap_or_default();
        analytics.record(RunRow {
            ts: timing.requested_unix,
            run_id: ctx.run_id.to_string(),
            user_id: ctx.owner.clone(),
            thread_id: ctx.thread_id.clone(),
            node: analytics.node().to_string(),
            provider,
            model: model.to_string(),
            status,
            error_code: reason.to_string(),
            queue_ms,
            first_token_ms: timing.first_text.map(|t| analytics::millis(t.duration_since(timing.requested))),
            total_ms: analytics::millis(timing.requested.elapsed()),
            tokens_in: usage.prompt_tokens,
            tokens_out: usage.completion_tokens,
            tool_calls: timing.tool_calls,
        });
        if !reason.is_empty() {
            analytics.record_error(&ctx.owner, reason, "run", &ctx.thread_id, &ctx.run_id);
        }
    }

    /// Persists how the run ended and returns the status recorded. A completion is
    /// submitted right behind the run's events, as the last link of its chain, so they
    /// usually share one commit; if any of them failed, delivery refuses the completion
    /// and the run is recorded as failed instead: a completed answer counts only once
    /// every event before it is stored.
    ///
    /// A run started ahead of its start's commit submits its completion without waiting
    /// for it (the completion is refused if the start was); any other ending is written
    /// only once `start_written` says the start was, and `None` is returned when it
    /// was not: the caller was told, and nothing of the run is stored.
    async fn record_ending(
        &self,
        ctx: &RunContext,
        ending: Ending,
        elapsed_ms: u64,
        start_written: Option<oneshot::Receiver<bool>>,
    ) -> Option<&'static str> {
        // Text held for merging belongs to the answer, also of a stopped run. If it cannot
        // be written, the ending below says how the run ended.
        let ending = match (ctx.flush_text().await, ending) {
            (Err(e), Ending::Completed(_)) => Ending::Failed(e.into()),
            (_, ending) => ending,
        };
        let ending = if matches!(ending, Ending::Completed(_)) {
            let (status, job) = self.ending_job(ctx, &ending, elapsed_ms);
            let end = self.inner.delivery.submit_in(&ctx.run_id, Link::Last, job, &ctx.owner).await;
            let settled = ctx.settle().await;
            let recorded = match (settled, end) {
                (Ok(()), Ok(end)) => end.wait().await.map(|_| ()),
                (Err(e), _) | (_, Err(e)) => Err(e),
            };
            match recorded {
                Ok(()) => return Some(status),
                Err(e) => Ending::Failed(e.into()),
            }
        } else {
            ending
        };
        if let Some(written) = start_written
            && written.await != Ok(true)
        {
            self.release(ctx).await;
            return None;
        }
        let (status, job) = self.ending_job(ctx, &ending, elapsed_ms);
        let close =
            async { self.inner.delivery.submit_in(&ctx.run_id, Link::Close, job, &ctx.owner).await?.wait().await };
        if let Err(e) = close.await {
            // The run stays marked running and is closed as interrupted at next start. Its
            // tabs are told now, with a frame outside the thread's history: nothing of this
            // ending could be stored, and a client waiting for one would wait forever.
            tracing::error!(error = %e, status, "could not record the end of a run");
            let frame = protocol::run_lost(&ctx.run_id, &ctx.thread_id);
            self.inner.delivery.registry.tell(&ctx.owner, &frame.into());
        }
        Some(status)
    }

    /// Releases the chain of writes of a run whose start was not written: every later
    /// write of it was refused with its start, and an empty closing link ends the chain.
    async fn release(&self, ctx: &RunContext) {
        let _ = ctx.settle().await;
        let release = WriteJob {
            thread_id: ctx.thread_id.clone(),
            rows: Vec::new(),
            events: Vec::new(),
            expected_last_seq: None,
        };
        if let Ok(release) = self.inner.delivery.submit_in(&ctx.run_id, Link::Close, release, &ctx.owner).await {
            let _ = release.wait().await;
        }
    }

    /// The status and the final write of a run that ended this way.
    fn ending_job(&self, ctx: &RunContext, ending: &Ending, elapsed_ms: u64) -> (&'static str, WriteJob) {
        match &ending {
            Ending::Completed(answer) => {
                let tokens = Tokens {
                    prompt_tokens: answer.usage.map(|u| u.prompt_tokens),
                    completion_tokens: answer.usage.map(|u| u.completion_tokens),
                };
                let message = format!("{AGENT_NAME} completed");
                let events = vec![
                    run_event(
                        &ctx.run_id,
                        &Payload::AgentCompleted {
                            status: Status::Completed,
                            result: RunResult { response: Some(&answer.text), tools: Some(&answer.tools) },
                            execution_time_ms: elapsed_ms,
                            metrics: Some(tokens),
                            message: &message,
                        },
                    ),
                    run_event(
                        &ctx.run_id,
                        &Payload::FinalReport {
                            executive_summary: &answer.text,
                            report: Empty {},
                            recommendations: [],
                            action_plan: "",
                            total_duration_ms: elapsed_ms,
                        },
                    ),
                ];
                let mut job = ending_job(&ctx.thread_id, &ctx.run_id, "completed", events, None, answer.usage);
                job.rows.push(Row::Message {
                    id: format!("msg_{}", uuid::Uuid::now_v7().simple()),
                    role: "assistant",
                    content: answer.text.clone(),
                    event_index: 1,
                });
                ("completed", job)
            }
            Ending::Cancelled => {
                let events = vec![run_event(
                    &ctx.run_id,
                    &Payload::AgentCompleted {
                        status: Status::Cancelled,
                        result: RunResult::default(),
                        execution_time_ms: elapsed_ms,
                        metrics: None,
                        message: "the run was stopped",
                    },
                )];
                ("cancelled", ending_job(&ctx.thread_id, &ctx.run_id, "cancelled", events, None, None))
            }
            Ending::TimedOut => {
                let message = format!("the run exceeded its deadline of {} s", self.inner.deadline.as_secs());
                let events = failure_events(&ctx.run_id, &message, "timed_out");
                ("timed_out", ending_job(&ctx.thread_id, &ctx.run_id, "timed_out", events, Some(&message), None))
            }
            Ending::Failed(failure) => {
                tracing::warn!(error = %failure, "run failed");
                let (reason, message) = failure.public();
                let events = failure_events(&ctx.run_id, &message, reason);
                let error = failure.to_string();
                ("failed", ending_job(&ctx.thread_id, &ctx.run_id, "failed", events, Some(&error), None))
            }
        }
    }

    /// Cancels the user's runs named by `run_id`, or in `thread_id`, or all of them.
    /// Returns how many were asked to stop; zero is a normal no-op.
    pub fn stop(&self, user_id: &str, run_id: Option<&str>, thread_id: Option<&str>) -> usize {
        let runs = self.runs();
        let mut n = 0;
        for (id, run) in &runs.by_id {
            let selected = match (run_id, thread_id) {
                (Some(r), _) => r == id,
                (None, Some(t)) => t == run.thread_id,
                (None, None) => true,
            };
            if run.user_id == user_id && selected {
                run.cancel.cancel();
                n += 1;
            }
        }
        n
    }

    pub fn active_runs(&self) -> usize {
        self.runs().by_id.len()
    }

    /// Refuses new runs, lets running ones finish within `window`, then cancels the rest
    /// and waits for their endings to be persisted.
    pub async fn drain(&self, window: Duration) {
        self.inner.accepting.store(false, Ordering::Release);
        self.inner.tracker.close();
        let active = self.active_runs();
        if active > 0 {
            tracing::info!(active, window_ms = window.as_millis() as u64, "draining agent runs");
        }
        if tokio::time::timeout(window, self.inner.tracker.wait()).await.is_err() {
            let names: Vec<String> = self.runs().by_id.keys().cloned().collect();
            tracing::warn!(runs = ?names, "drain window over; cancelling runs");
            for run in self.runs().by_id.values() {
                run.cancel.cancel();
            }
            if tokio::time::timeout(Duration::from_secs(5), self.inner.tracker.wait()).await.is_err() {
                tracing::error!("cancelled runs did not finish within 5 s");
            }
        }
    }
}

fn failure_events(run_id: &Arc<str>, message: &str, reason: &str) -> Vec<NewEvent> {
    vec![
        run_event(
            run_id,
            &Payload::AgentError {
                status: Status::Error,
                error_message: message,
                error_context: FailureReason { reason },
                message,
            },
        ),
        run_event(run_id, &Payload::Error { code: ErrorCode::AgentFailed, message, error_message: message, reason }),
    ]
}

fn ending_job(
    thread_id: &str,
    run_id: &str,
    status: &'static str,
    events: Vec<NewEvent>,
    error: Option<&str>,
    usage: Option<Usage>,
) -> WriteJob {
    let tokens = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    WriteJob {
        expected_last_seq: None,
        thread_id: thread_id.to_string(),
        rows: vec![Row::EndRun {
            run_id: run_id.to_string(),
            status,
            error: error.map(str::to_string),
            prompt_tokens: usage.map(|u| tokens(u.prompt_tokens)),
            completion_tokens: usage.map(|u| tokens(u.completion_tokens)),
        }],
        events,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_provider_becomes_a_failure_with_its_message() {
        let work = async {
            if std::hint::black_box(true) {
                panic!("bad tool output");
            }
            Ok::<u8, RunFailure>(1)
        };
        let caught = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(work)).await;
        let panic = caught.expect_err("the panic is caught");
        let failure = RunFailure::Panicked(panic_message(panic.as_ref()));
        assert_eq!(failure.to_string(), "the agent panicked: bad tool output");
        assert_eq!(failure.public().0, "failed", "clients see a plain failure, the log has the rest");
        let formatted = std::panic::catch_unwind(|| panic!("{} items", 3)).expect_err("panics");
        assert_eq!(panic_message(formatted.as_ref()), "3 items");
    }

    #[test]
    fn active_runs_count_each_user_and_thread_until_the_last_run_goes() {
        let run = |user: &str, thread: &str| ActiveRun {
            user_id: user.into(),
            thread_id: thread.into(),
            cancel: CancellationToken::new(),
        };
        let mut runs = ActiveRuns::default();
        runs.insert("r1".into(), run("ann", "t1"));
        runs.insert("r2".into(), run("ann", "t2"));
        runs.insert("r3".into(), run("bob", "t1"));
        assert_eq!((runs.of_user("ann"), runs.of_user("bob"), runs.of_user("cy")), (2, 1, 0));
        assert!(runs.in_thread("t1") && runs.in_thread("t2") && !runs.in_thread("t3"));
        // The same id again replaces the run and its counts.
        runs.insert("r2".into(), run("bob", "t3"));
        assert_eq!((runs.of_user("ann"), runs.of_user("bob")), (1, 2));
        assert!(!runs.in_thread("t2") && runs.in_thread("t3"));
        assert!(runs.remove("r1").is_some() && runs.remove("r1").is_none());
        assert!(runs.in_thread("t1"), "bob's run is still in t1");
        runs.remove("r3");
        runs.remove("r2");
        assert!(runs.by_id.is_empty() && runs.per_user.is_empty() && runs.per_thread.is_empty());
    }
}
