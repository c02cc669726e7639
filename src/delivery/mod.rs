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
//! chain of writes) and hands committed events to [`registry`], which offers each to the
//! owner's [`connection`]s; this module is the API producers call (submit, commit,
//! replay) and the types they see.

mod connection;
mod registry;
mod writer;

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

pub use connection::{CloseReason, Connection, QueueLimit};
pub use registry::{Registry, TooManyConnections};

use crate::store::{Store, StoreError, WriteJob};
use crate::telemetry::metric;
use connection::Follow;
use writer::{Chain, Pending, Waiter};

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
    /// Waits for the commit; the `seq` of the job's first event (0 when it had none).
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
    store: Store,
    replay_batch: u32,
    /// Payload bytes one replay page may hold: an outbox's worth.
    replay_bytes: usize,
}

impl Delivery {
    /// Starts the writer task on `tracker`; it ends when every `Delivery` clone is dropped
    /// or `stop` is cancelled after the queue drained.
    pub fn start(store: Store, replay_batch: u32, replay_bytes: usize, tracker: &TaskTracker) -> Self {
        let (writer, rx) = mpsc::channel::<Pending>(4096);
        let registry = Arc::new(Registry::default());
        tracker.spawn(writer::write_loop(store.clone(), registry.clone(), rx));
        Self { writer, registry, store, replay_batch, replay_bytes }
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
    /// still never be recorded as completed with an event missing.
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
        let waiter = Waiter { owner: owner.to_string(), queued_at: Instant::now(), reply };
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
