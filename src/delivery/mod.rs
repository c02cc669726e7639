//! The one event path: persist, then publish. Every thread event gets its `seq` and is
//! committed by the group-commit writer (one transaction per batch of whatever is
//! pending), and only then handed to the open connections of the thread's owner. A user
//! with no open connection is a normal outcome ([`DeliveryOutcome::Stored`]): the event
//! is in the store and is read on resume.
//!
//! A producer never waits on a consumer: frames are offered to each connection's bounded
//! queue with `try_send`; a connection whose queue is full is closed (1013) and counted,
//! and its client catches up from the store by `seq`.
//!
//! Who owns what: [`writer`] turns submitted jobs into commits (group commit, the per-run
//! chain of writes, a run's waiting `partial_result` deltas merged into one event) and
//! hands committed events to [`Route`], which tells other nodes (the broker) and offers
//! each event to the owner's [`connection`]s through [`registry`]; with several nodes,
//! what arrives from them too, put in order by the [`gate`] (gaps filled from the store by
//! this module's filler). This module is the API producers call (submit, commit, replay)
//! and the types they see.

mod connection;
mod gate;
mod registry;
mod writer;

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

pub use connection::{CloseReason, Connection, QueueLimit};
pub use registry::{Registry, TooManyConnections};

use crate::broker::Broker;
use crate::protocol::Frame;
use crate::store::{Store, StoreError, WriteJob};
use crate::telemetry::metric;
use connection::Follow;
use gate::{Admit, Arrival, Gate};
use registry::{Wakes, fan_out};
use writer::{Chain, Pending, Waiter};

/// Events written shortly before an outage of the broker was noticed are filled too.
const OUTAGE_MARGIN_MS: i64 = 2_000;

/// What happened to one published event on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// Queued on this many connections.
    Delivered(usize),
    /// Persisted; no connection wanted it now.
    Stored,
    /// At least one connection could not take it and was closed; the event is stored.
    Dropped(DropReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    QueueFull,
}

impl DeliveryOutcome {
    pub(super) fn label(self) -> &'static str {
        match self {
            Self::Delivered(_) => "delivered",
            Self::Stored => "stored",
            Self::Dropped(DropReason::QueueFull) => "dropped_queue_full",
        }
    }
}

/// Why events could not be committed.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the writer has stopped")]
    Stopped,
    #[error("an earlier write of this run failed")]
    EarlierWriteFailed,
    /// The job's thread was written (by another node) since the job was made for it
    /// ([`WriteJob::expected_last_seq`](crate::store::WriteJob)); nothing of it was written.
    #[error("the thread was written since this write was made")]
    Raced,
}

/// How a job belongs to a run's sequence of writes, which a producer submits without
/// waiting for each commit (see [`Delivery::submit_in`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Written only if no earlier write of the run failed; a failure breaks the chain.
    Next,
    /// The run's last write: written only if the chain is intact, and it closes it.
    Last,
    /// Ends the chain whatever happened before it (a failure or cancellation ending).
    Close,
}

/// A submitted job whose commit has not been awaited yet.
pub struct InFlight(oneshot::Receiver<Result<u64, DeliveryError>>);

impl InFlight {
    /// Waits for the commit; the `seq` of the job's first event (0 when it had none). A
    /// `partial_result` delta merged into an earlier one of its run hears that one's.
    pub async fn wait(self) -> Result<u64, DeliveryError> {
        self.0.await.map_err(|_| DeliveryError::Stopped)?
    }

    /// The outcome if the commit already happened, `None` while it is pending.
    pub fn try_outcome(&mut self) -> Option<Result<(), DeliveryError>> {
        match self.0.try_recv() {
            Ok(result) => Some(result.map(|_| ())),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(DeliveryError::Stopped)),
        }
    }
}

/// Persist-then-publish for this node.
#[derive(Clone)]
pub struct Delivery {
    writer: mpsc::Sender<Pending>,
    pub registry: Arc<Registry>,
    route: Arc<Route>,
    store: Store,
    replay_batch: u32,
    /// Payload bytes one replay page may hold: an outbox's worth.
    replay_bytes: usize,
}

/// Where a committed event goes: to the other nodes (the broker), and to this node's
/// connections of its owner, through the gate when other nodes deliver too.
pub(crate) struct Route {
    registry: Arc<Registry>,
    pub(crate) broker: Broker,
    gate: Option<Gate>,
    fills: mpsc::UnboundedSender<Fill>,
}

/// What to read from the store for what arrived out of turn.
enum Fill {
    /// A lane of the gate, from `from` on.
    Lane { owner: Arc<str>, thread_id: Arc<str>, from: u64 },
    /// A socket that follows a thread by `seq` and missed what came after `after_seq`.
    Replay { conn: Arc<Connection>, thread_id: Arc<str>, after_seq: u64 },
}

impl Route {
    /// Offers one event to the owner's connections `conns` (in order, once, when other
    /// nodes deliver too), noting in `wakes` who got it.
    fn deliver(&self, conns: &[Arc<Connection>], arrival: Arrival, wakes: &mut Wakes) -> DeliveryOutcome {
        let Some(gate) = &self.gate else {
            return fan_out(conns, &arrival.kind, &arrival.thread_id, arrival.seq, &arrival.text, wakes);
        };
        match gate.admit(&arrival) {
            Admit::Deliver => fan_out(conns, &arrival.kind, &arrival.thread_id, arrival.seq, &arrival.text, wakes),
            Admit::Duplicate => DeliveryOutcome::Stored,
            Admit::Held(fill) => {
                if let Some(from) = fill {
                    metrics::counter!(metric::GAP_FILLS).increment(1);
                    let _ = self.fills.send(Fill::Lane { owner: arrival.owner, thread_id: arrival.thread_id, from });
                }
                DeliveryOutcome::Stored
            }
        }
    }

    /// Fills a thread's lane from `from`, unless a fill of it is under way.
    fn fill(&self, owner: &str, thread_id: &str, from: u64) {
        let Some(gate) = &self.gate else { return };
        let thread_id: Arc<str> = Arc::from(thread_id);
        if let Some(from) = gate.start_fill(&thread_id, from) {
            metrics::counter!(metric::GAP_FILLS).increment(1);
            let _ = self.fills.send(Fill::Lane { owner: Arc::from(owner), thread_id, from });
        }
    }

    /// Wakes the sockets offered frames, and sends those that found a gap to catch up
    /// from the store.
    fn settle(&self, mut wakes: Wakes) {
        for (conn, thread_id, after_seq) in std::mem::take(&mut wakes.gaps) {
            metrics::counter!(metric::GAP_FILLS).increment(1);
            let _ = self.fills.send(Fill::Replay { conn, thread_id, after_seq });
        }
        wakes.wake_all();
    }
}

impl Delivery {
    /// Starts the writer task on `tracker`; it ends when every `Delivery` clone is dropped
    /// or `stop` is cancelled after the queue drained. With a shared broker, events from
    /// other nodes arrive too: the gate keeps each thread in order and a filler task
    /// reads what is missing from the store.
    pub fn start(store: Store, replay_batch: u32, replay_bytes: usize, tracker: &TaskTracker, broker: Broker) -> Self {
        let (writer, rx) = mpsc::channel::<Pending>(4096);
        let registry = Arc::new(Registry::default());
        let (fills, fills_rx) = mpsc::unbounded_channel();
        let gate = broker.is_shared().then(Gate::default);
        let route = Arc::new(Route { registry: registry.clone(), broker, gate, fills });
        tracker.spawn(writer::write_loop(store.clone(), route.clone(), rx));
        let this = Self { writer, registry, route, store, replay_batch, replay_bytes };
        tracker.spawn(this.clone().fill_loop(fills_rx));
        this
    }

    /// The broker this node publishes on.
    pub fn broker(&self) -> &Broker {
        &self.route.broker
    }

    /// An event another node committed, for this node's connections of its owner.
    pub fn remote_event(&self, owner: &str, thread_id: &str, seq: u64, kind: &str, frame: String) {
        let conns = self.registry.connections_of(owner);
        let arrival = Arrival {
            owner: Arc::from(owner),
            thread_id: Arc::from(thread_id),
            seq,
            kind: Arc::from(kind),
            text: Frame::from(frame),
        };
        let mut wakes = Wakes::default();
        let outcome = self.route.deliver(&conns, arrival, &mut wakes);
        self.route.settle(wakes);
        metrics::counter!(metric::EVENTS, "outcome" => outcome.label()).increment(1);
    }

    /// Another node says events of `thread_id` up to `seq` exist, some of them never
    /// published from `since_ms` on: whatever this node has not delivered is read from
    /// the store.
    pub async fn doorbell(&self, owner: &str, thread_id: &str, seq: u64, since_ms: i64) {
        self.catch_up(owner, thread_id, seq, since_ms).await;
    }

    /// After an outage of the broker that began at `began_ms`: every thread of this
    /// node's users written since gets whatever this node did not deliver, from the store.
    pub async fn refill_since(&self, began_ms: i64) {
        let since = began_ms - OUTAGE_MARGIN_MS;
        for owner in self.registry.user_ids() {
            let threads = match self.store.threads_written_since(&owner, since).await {
                Ok(threads) => threads,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the threads written while Redis was away");
                    continue;
                }
            };
            for (thread_id, last_seq) in threads {
                self.catch_up(&owner, &thread_id, last_seq, since).await;
            }
        }
    }

    /// Makes sure this node delivers `thread_id`'s events up to `upto`: from where its
    /// lane is, or for a thread it has no lane for, those written since `since_ms`.
    async fn catch_up(&self, owner: &str, thread_id: &str, upto: u64, since_ms: i64) {
        let Some(gate) = &self.route.gate else { return };
        let from = match gate.next_of(thread_id) {
            Some(next) if next > upto => return,
            Some(next) => next,
            None => match self.store.first_seq_since(thread_id, since_ms).await {
                Ok(Some(first)) => first,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read what a thread missed");
                    return;
                }
            },
        };
        self.route.fill(owner, thread_id, from);
    }

    /// Reads what the gate's lanes miss from the store, one fill at a time, and forgets
    /// idle lanes now and then.
    async fn fill_loop(self, mut fills: mpsc::UnboundedReceiver<Fill>) {
        let mut sweep = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            let fill = tokio::select! {
                fill = fills.recv() => match fill { Some(fill) => fill, None => return },
                _ = sweep.tick() => {
                    if let Some(gate) = &self.route.gate {
                        gate.sweep();
                    }
                    continue;
                }
            };
            match fill {
                Fill::Lane { owner, thread_id, from } => self.fill_lane(&owner, &thread_id, from).await,
                Fill::Replay { conn, thread_id, after_seq } => {
                    if let Err(e) = self.replay(&conn, &thread_id, after_seq).await {
                        tracing::warn!(error = %e, "a socket could not catch up from the store");
                        conn.close(CloseReason { code: 1011, reason: "could not catch up; resume by seq" });
                    }
                }
            }
        }
    }

    /// Delivers what a lane of the gate misses, from `from` on, then what it held.
    async fn fill_lane(&self, owner: &Arc<str>, thread_id: &Arc<str>, mut from: u64) {
        let Some(gate) = &self.route.gate else { return };
        loop {
            if let Err(e) = self.fill_from(owner, thread_id, from).await {
                tracing::warn!(error = %e, thread_id = %thread_id, "a gap could not be filled from the store");
                let held = gate.give_up(thread_id);
                self.deliver_all(owner, held);
                return;
            }
            let (ready, again) = gate.filled(thread_id);
            self.deliver_all(owner, ready);
            match again {
                // The store had nothing past `from` yet a later event is held: the held
                // ones go as they are rather than wait forever.
                Some(next) if next == from => {
                    let held = gate.give_up(thread_id);
                    self.deliver_all(owner, held);
                    return;
                }
                Some(next) => from = next,
                None => return,
            }
        }
    }

    /// Delivers a lane's events from `from` on, read from the store page by page.
    async fn fill_from(&self, owner: &str, thread_id: &str, from: u64) -> Result<(), StoreError> {
        let Some(gate) = &self.route.gate else { return Ok(()) };
        let mut last = from.saturating_sub(1);
        loop {
            let page = self.store.events_after(thread_id, last, self.replay_batch, self.replay_bytes).await?;
            if page.is_empty() {
                return Ok(());
            }
            let conns = self.registry.connections_of(owner);
            let mut wakes = Wakes::default();
            for frame in &page {
                if gate.fill_step(thread_id, frame.seq) {
                    let text = Frame::from(frame.to_text());
                    fan_out(&conns, &frame.kind, thread_id, frame.seq, &text, &mut wakes);
                    metrics::counter!(metric::EVENTS, "outcome" => "filled").increment(1);
                }
                last = frame.seq;
            }
            self.route.settle(wakes);
        }
    }

    fn deliver_all(&self, owner: &str, arrivals: Vec<Arrival>) {
        if arrivals.is_empty() {
            return;
        }
        let conns = self.registry.connections_of(owner);
        let mut wakes = Wakes::default();
        for a in arrivals {
            fan_out(&conns, &a.kind, &a.thread_id, a.seq, &a.text, &mut wakes);
        }
        self.route.settle(wakes);
    }

    /// Commits a job (rows and events of one thread, atomically), publishes its events,
    /// and returns the `seq` of its first event (0 when it had none).
    pub async fn commit(&self, job: WriteJob, owner: &str) -> Result<u64, DeliveryError> {
        self.submit(job, owner).await?.wait().await
    }

    /// Queues a job for the writer without waiting for its commit. Jobs are written in
    /// the order they are submitted, so a producer may keep several in flight (a run
    /// streaming events) and they still commit, and publish, in order.
    pub async fn submit(&self, job: WriteJob, owner: &str) -> Result<InFlight, DeliveryError> {
        self.enqueue(job, owner, None).await
    }

    /// [`Delivery::submit`] as a link of run `run_id`'s chain of writes: once one of them
    /// fails, its later [`Link::Next`] and [`Link::Last`] writes are refused
    /// ([`DeliveryError::EarlierWriteFailed`]) instead of written, in submission order. A
    /// run can so submit its completion right behind its events, in the same commit, and
    /// still never be recorded as completed with an event missing. A run's
    /// `partial_result` jobs (one event each) that wait in the same batch may be written
    /// as one event (see [`writer`]).
    pub async fn submit_in(
        &self,
        run_id: &Arc<str>,
        link: Link,
        job: WriteJob,
        owner: &str,
    ) -> Result<InFlight, DeliveryError> {
        self.enqueue(job, owner, Some(Chain { run_id: run_id.clone(), link })).await
    }

    async fn enqueue(&self, job: WriteJob, owner: &str, chain: Option<Chain>) -> Result<InFlight, DeliveryError> {
        let (reply, rx) = oneshot::channel();
        let waiter = Waiter { owner: owner.to_string(), queued_at: Instant::now(), reply, merged: Vec::new() };
        self.writer.send(Pending { job, waiter, chain }).await.map_err(|_| DeliveryError::Stopped)?;
        Ok(InFlight(rx))
    }

    /// Replays the thread's stored events after `after_seq` to `conn`, then hands it over
    /// to live delivery with no gap and no duplicate (§6b). The follow state is set before
    /// the first read, so an event committed during the replay is either read from the
    /// store or seen live, and the `seq` check drops the second copy.
    pub async fn replay(&self, conn: &Arc<Connection>, thread_id: &str, after_seq: u64) -> Result<(), DeliveryError> {
        let generation = conn.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        conn.follows().insert(thread_id.to_string(), Follow::Replaying { generation, highest_live: 0 });
        let mut last = after_seq;
        loop {
            // One page at a time, an outbox's worth of bytes at most, each read only once the
            // last has gone into the outbox: a replay to a slow reader holds little.
            let page = self.store.events_after(thread_id, last, self.replay_batch, self.replay_bytes).await?;
            let full_page = !page.is_empty();
            for frame in &page {
                if !self.still_replaying(conn, thread_id, generation) {
                    return Ok(());
                }
                if conn.wants(&frame.kind) && !conn.send(frame.to_text()).await {
                    return Ok(());
                }
                metrics::counter!(metric::EVENTS_REPLAYED).increment(1);
                last = frame.seq;
            }
            if full_page {
                continue;
            }
            let mut follows = conn.follows();
            match follows.get(thread_id) {
                Some(Follow::Replaying { generation: g, highest_live }) if *g == generation => {
                    if *highest_live > last {
                        // Something was committed while we read; read the store again.
                        continue;
                    }
                    follows.insert(thread_id.to_string(), Follow::Live { last_seq: last });
                    return Ok(());
                }
                _ => return Ok(()),
            }
        }
    }

    fn still_replaying(&self, conn: &Connection, thread_id: &str, generation: u64) -> bool {
        matches!(conn.follows().get(thread_id), Some(Follow::Replaying { generation: g, .. }) if *g == generation)
    }
}
