//! The one event path: persist, then publish. Every thread event gets its `seq` and is
//! committed by the group-commit writer (one transaction per batch of whatever is
//! pending), and only then handed to the open connections of the thread's owner. A user
//! with no open connection is a normal outcome ([`DeliveryOutcome::Stored`]): the event
//! is in the store and is read on resume.
//!
//! A producer never waits on a consumer: frames are offered to each connection's bounded
//! queue with `try_send`; a connection whose queue is full is closed (1013) and counted,
//! and its client catches up from the store by `seq`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::task::TaskTracker;

use crate::protocol::EventType;
use crate::store::{Store, StoreError, WriteJob};
use crate::telemetry::metric;

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
    fn label(self) -> &'static str {
        match self {
            Self::Delivered(_) => "delivered",
            Self::Stored => "stored",
            Self::Dropped(DropReason::QueueFull) => "dropped_queue_full",
        }
    }
}

/// A close the server decided on; the connection's writer sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: &'static str,
}

/// How one connection currently follows one thread (§6b). No entry means the default:
/// every event of the owner's threads, as it comes.
#[derive(Debug)]
enum Follow {
    /// `unsubscribe`: nothing of this thread until it subscribes or sends into it.
    Muted,
    /// A `subscribe` replay is reading the store; live events are skipped (they are in
    /// the store already) and the highest skipped `seq` tells the replay to read again.
    Replaying { generation: u64, highest_live: u64 },
    /// Caught up after a replay: live events at or below `last_seq` are duplicates.
    Live { last_seq: u64 },
}

/// The server side of one WebSocket, as delivery sees it: who it is, the frames waiting
/// for the socket, and how it follows each thread.
///
/// The outbox is a plain queue under a lock, bounded in frames and in bytes, with two
/// notifications: the socket task waits on `wake` (frames queued or a close decided) and
/// a sender that found the queue full waits on `room`. A live event that finds it full
/// closes the connection 1013 instead: the client resumes by `seq`. An idle connection
/// holds no buffer at all (a channel would allocate its first block up front), which is
/// what lets one process hold many.
pub struct Connection {
    pub id: String,
    /// Shared with the registry's key for this user.
    pub user_id: Arc<str>,
    /// The socket speaks to the Netra web client (docs/protocol.md): it gets none of the
    /// frames that client ignores, since every frame it keeps counts against its cap.
    pub web_client: bool,
    limit: QueueLimit,
    outbox: Mutex<Outbox>,
    wake: Notify,
    room: Notify,
    follows: Mutex<HashMap<String, Follow>>,
    generation: std::sync::atomic::AtomicU64,
}

/// How much one connection's outbox may hold.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimit {
    pub frames: usize,
    /// A frame larger than this still goes alone into an empty outbox.
    pub bytes: usize,
}

#[derive(Default)]
struct Outbox {
    frames: VecDeque<Utf8Bytes>,
    /// The bytes of `frames`.
    bytes: usize,
    /// The first close decided; the socket task sends it after the queued frames.
    close: Option<CloseReason>,
    /// The socket task has finished: nothing more is taken.
    gone: bool,
}

/// What [`Connection::push`] did with a frame.
enum Push {
    Queued,
    Full,
    Refused,
}

impl Connection {
    /// A connection whose outbox holds at most what `limit` says.
    pub fn new(id: String, user_id: Arc<str>, limit: QueueLimit, web_client: bool) -> Arc<Self> {
        Arc::new(Self {
            id,
            user_id,
            web_client,
            limit,
            outbox: Mutex::default(),
            wake: Notify::new(),
            room: Notify::new(),
            follows: Mutex::new(HashMap::new()),
            generation: Default::default(),
        })
    }

    fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().expect("outbox lock is never held across a panic")
    }

    /// Queues a frame for this connection alone (replies, protocol errors, replays).
    /// Waits for room; `false` once a close is decided or the socket is gone.
    pub async fn send(&self, text: impl Into<Utf8Bytes>) -> bool {
        let text = text.into();
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            {
                let mut outbox = self.outbox();
                match self.push(&mut outbox, &text) {
                    Push::Queued => return true,
                    Push::Refused => return false,
                    // Registered before the lock is released: a drain in between still wakes us.
                    Push::Full => {
                        room.as_mut().enable();
                    }
                }
            }
            room.await;
        }
    }

    /// Queues `text` unless the outbox is full or refuses frames: once a close is decided,
    /// only what was queued before it still goes out.
    fn push(&self, outbox: &mut Outbox, text: &Utf8Bytes) -> Push {
        if outbox.gone || outbox.close.is_some() {
            return Push::Refused;
        }
        let too_many = outbox.frames.len() >= self.limit.frames;
        let too_big = !outbox.frames.is_empty() && outbox.bytes + text.len() > self.limit.bytes;
        if too_many || too_big {
            return Push::Full;
        }
        outbox.bytes += text.len();
        outbox.frames.push_back(text.clone());
        self.wake.notify_one();
        Push::Queued
    }

    /// Asks the socket task to close with `reason`; the first reason wins.
    pub fn close(&self, reason: CloseReason) {
        let mut outbox = self.outbox();
        if outbox.close.is_none() {
            outbox.close = Some(reason);
            metrics::counter!(metric::WS_CLOSES, "code" => reason.code.to_string()).increment(1);
        }
        drop(outbox);
        self.wake.notify_one();
    }

    /// Resolves when frames were queued or a close was decided since the last
    /// [`Connection::take`] (for the socket task, the only one that waits on it).
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    pub fn close_requested(&self) -> bool {
        self.outbox().close.is_some()
    }

    /// Moves every queued frame into `into`, tells waiting senders there is room, and
    /// returns the close decided, if any (to be sent after those frames).
    pub fn take(&self, into: &mut Vec<Utf8Bytes>) -> Option<CloseReason> {
        let mut outbox = self.outbox();
        into.extend(outbox.frames.drain(..));
        outbox.bytes = 0;
        if outbox.frames.capacity() > 64 {
            // A burst grew the queue; an idle connection keeps no buffer.
            outbox.frames = VecDeque::new();
        }
        let close = outbox.close;
        drop(outbox);
        self.room.notify_waiters();
        close
    }

    /// Like [`Connection::take`], but stops at the first frame `go` holds back (a paced
    /// socket); once a close is decided everything queued goes. Also says whether frames
    /// were left in the outbox.
    pub fn take_while(
        &self,
        into: &mut Vec<Utf8Bytes>,
        mut go: impl FnMut(&Utf8Bytes) -> bool,
    ) -> (Option<CloseReason>, bool) {
        let mut outbox = self.outbox();
        let closing = outbox.close.is_some();
        while let Some(front) = outbox.frames.front() {
            if !closing && !go(front) {
                break;
            }
            outbox.bytes -= front.len();
            into.extend(outbox.frames.pop_front());
        }
        let (close, left) = (outbox.close, !outbox.frames.is_empty());
        drop(outbox);
        self.room.notify_waiters();
        (close, left)
    }

    /// Whether this connection gets thread events of `kind` at all. The web client
    /// ignores the `user_message` echo (it shows its own copy), so its sockets skip it.
    pub fn wants(&self, kind: &str) -> bool {
        !(self.web_client && kind == EventType::UserMessage.as_str())
    }

    /// The socket task has ended: later frames are refused and waiting senders released.
    pub fn finish(&self) {
        let mut outbox = self.outbox();
        outbox.gone = true;
        outbox.frames = VecDeque::new();
        outbox.bytes = 0;
        drop(outbox);
        self.room.notify_waiters();
    }

    /// Back to the default for this thread: the client sent into it (§6b).
    pub fn follow_default(&self, thread_id: &str) {
        // A replay in progress (or the seq filter after one) is not undone: it hands over
        // to live delivery itself, with no gap.
        let mut follows = self.follows();
        if matches!(follows.get(thread_id), Some(Follow::Muted)) {
            follows.remove(thread_id);
        }
    }

    pub fn mute(&self, thread_id: &str) {
        self.follows().insert(thread_id.to_string(), Follow::Muted);
    }

    fn follows(&self) -> std::sync::MutexGuard<'_, HashMap<String, Follow>> {
        self.follows.lock().expect("follows lock is never held across a panic")
    }

    /// Offers a live event; never waits.
    fn offer(&self, kind: &str, seq: u64, thread_id: &str, text: &Utf8Bytes) -> Offer {
        if !self.wants(kind) {
            return Offer::Skipped;
        }
        {
            let mut follows = self.follows();
            match follows.get_mut(thread_id) {
                None => {}
                Some(Follow::Muted) => return Offer::Skipped,
                Some(Follow::Replaying { highest_live, .. }) => {
                    *highest_live = (*highest_live).max(seq);
                    return Offer::Skipped;
                }
                Some(Follow::Live { last_seq }) if seq <= *last_seq => return Offer::Skipped,
                Some(Follow::Live { last_seq }) => *last_seq = seq,
            }
        }
        let pushed = self.push(&mut self.outbox(), text);
        match pushed {
            Push::Queued => Offer::Queued,
            Push::Refused => Offer::Skipped,
            Push::Full => {
                self.close(CloseReason { code: 1013, reason: "send queue full" });
                Offer::Full
            }
        }
    }
}

enum Offer {
    Queued,
    Skipped,
    Full,
}

/// The connections of this node, by user.
#[derive(Default)]
pub struct Registry {
    users: Mutex<HashMap<Arc<str>, Vec<Arc<Connection>>>>,
}

/// The user already has the maximum number of open connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyConnections;

impl Registry {
    fn users(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Vec<Arc<Connection>>>> {
        self.users.lock().expect("registry lock is never held across a panic")
    }

    /// Adds a connection unless its user is at `limit`.
    pub fn register(&self, conn: &Arc<Connection>, limit: usize) -> Result<(), TooManyConnections> {
        let mut users = self.users();
        let list = users.entry(conn.user_id.clone()).or_default();
        if list.len() >= limit {
            return Err(TooManyConnections);
        }
        list.push(conn.clone());
        metrics::gauge!(metric::WS_CONNECTIONS).increment(1.0);
        Ok(())
    }

    pub fn unregister(&self, conn: &Connection) {
        let mut users = self.users();
        if let Some(list) = users.get_mut(&conn.user_id) {
            let before = list.len();
            list.retain(|c| c.id != conn.id);
            if list.len() < before {
                metrics::gauge!(metric::WS_CONNECTIONS).decrement(1.0);
            }
            if list.is_empty() {
                users.remove(&conn.user_id);
            }
        }
    }

    /// Closes every connection, e.g. with 1012 on shutdown.
    pub fn close_all(&self, reason: CloseReason) -> usize {
        let users = self.users();
        let mut n = 0;
        for conn in users.values().flatten() {
            conn.close(reason);
            n += 1;
        }
        n
    }

    /// Sends a frame that is not part of any thread's history (so not persisted) to every
    /// connection of `owner`, without waiting: one that has no room is closed 1013 and
    /// resumes by `seq`.
    pub fn tell(&self, owner: &str, text: &Utf8Bytes) {
        let conns: Vec<Arc<Connection>> = self.users().get(owner).cloned().unwrap_or_default();
        for conn in conns {
            if let Push::Full = conn.push(&mut conn.outbox(), text) {
                conn.close(CloseReason { code: 1013, reason: "send queue full" });
            }
        }
    }

    pub fn connection_count(&self) -> usize {
        self.users().values().map(Vec::len).sum()
    }

    fn dispatch(&self, owner: &str, kind: &str, thread_id: &str, seq: u64, text: &Utf8Bytes) -> DeliveryOutcome {
        // Clone the list out so no registry lock is held while offering.
        let conns: Vec<Arc<Connection>> = self.users().get(owner).cloned().unwrap_or_default();
        let (mut queued, mut full) = (0, false);
        for conn in &conns {
            match conn.offer(kind, seq, thread_id, text) {
                Offer::Queued => queued += 1,
                Offer::Skipped => {}
                Offer::Full => full = true,
            }
        }
        if full {
            DeliveryOutcome::Dropped(DropReason::QueueFull)
        } else if queued > 0 {
            DeliveryOutcome::Delivered(queued)
        } else {
            DeliveryOutcome::Stored
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

struct Pending {
    job: WriteJob,
    waiter: Waiter,
    chain: Option<Chain>,
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

#[derive(Debug, Clone)]
struct Chain {
    run_id: Arc<str>,
    link: Link,
}

/// Who is told about a job's commit, and whose connections get its events.
struct Waiter {
    owner: String,
    queued_at: Instant,
    reply: oneshot::Sender<Result<u64, DeliveryError>>,
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

/// Most jobs written in one transaction.
const MAX_BATCH: usize = 256;

impl Delivery {
    /// Starts the writer task on `tracker`; it ends when every `Delivery` clone is dropped
    /// or `stop` is cancelled after the queue drained.
    pub fn start(store: Store, replay_batch: u32, replay_bytes: usize, tracker: &TaskTracker) -> Self {
        let (writer, rx) = mpsc::channel::<Pending>(4096);
        let registry = Arc::new(Registry::default());
        tracker.spawn(write_loop(store.clone(), registry.clone(), rx));
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

async fn write_loop(store: Store, registry: Arc<Registry>, mut rx: mpsc::Receiver<Pending>) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    // Runs whose chain of writes is broken, until their last write comes by.
    let mut broken: HashSet<Arc<str>> = HashSet::new();
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        metrics::histogram!(metric::STORE_BATCH_JOBS).record(batch.len() as f64);
        let mut jobs = Vec::with_capacity(batch.len());
        let mut waiters = Vec::with_capacity(batch.len());
        for Pending { job, waiter, chain } in batch.drain(..) {
            if let Some(waiter) = admit(&mut broken, waiter, chain.as_ref()) {
                jobs.push(job);
                waiters.push((waiter, chain));
            }
        }
        if jobs.is_empty() {
            continue;
        }
        // The jobs move out of their envelopes into one shared slice: no copy of any payload.
        let jobs: Arc<[WriteJob]> = jobs.into();
        match store.write_batch(&jobs).await {
            Ok(firsts) => {
                for ((job, (waiter, _)), first) in jobs.iter().zip(waiters).zip(firsts) {
                    publish(&registry, job, waiter, first);
                }
            }
            Err(e) if jobs.len() == 1 => {
                tracing::warn!(error = %e, "event write failed");
                if let Some((waiter, chain)) = waiters.into_iter().next() {
                    break_chain(&mut broken, chain.as_ref());
                    let _ = waiter.reply.send(Err(e.into()));
                }
            }
            Err(e) if matches!(e, StoreError::Unavailable(_)) => {
                // The database is away: every job would wait for it again, one by one.
                tracing::warn!(error = %e, jobs = jobs.len(), "batch write failed: database unavailable");
                let reason = e.to_string();
                for (waiter, chain) in waiters {
                    break_chain(&mut broken, chain.as_ref());
                    let _ = waiter.reply.send(Err(StoreError::Unavailable(reason.clone().into()).into()));
                }
            }
            Err(e) => {
                // One bad job must not fail its neighbours: write each on its own.
                tracing::warn!(error = %e, jobs = jobs.len(), "batch write failed; retrying jobs one by one");
                for (job, (waiter, chain)) in jobs.iter().zip(waiters) {
                    let Some(waiter) = admit(&mut broken, waiter, chain.as_ref()) else { continue };
                    let single: Arc<[WriteJob]> = Arc::new([job.clone()]);
                    match store.write_batch(&single).await {
                        Ok(firsts) => publish(&registry, job, waiter, firsts[0]),
                        Err(e) => {
                            break_chain(&mut broken, chain.as_ref());
                            let _ = waiter.reply.send(Err(e.into()));
                        }
                    }
                }
            }
        }
    }
}

/// The job's waiter if the job may be written; `None` after telling it that its run's
/// chain is broken.
fn admit(broken: &mut HashSet<Arc<str>>, waiter: Waiter, chain: Option<&Chain>) -> Option<Waiter> {
    if chain.is_some_and(|chain| refused(broken, chain)) {
        let _ = waiter.reply.send(Err(DeliveryError::EarlierWriteFailed));
        return None;
    }
    Some(waiter)
}

/// Whether a chained job is refused because its run's chain is broken; a run's last
/// write (refused or not) forgets the chain.
fn refused(broken: &mut HashSet<Arc<str>>, chain: &Chain) -> bool {
    match chain.link {
        Link::Next => broken.contains(&chain.run_id),
        Link::Last => broken.remove(&chain.run_id),
        Link::Close => {
            broken.remove(&chain.run_id);
            false
        }
    }
}

/// A chained job failed: its run's later links are refused.
fn break_chain(broken: &mut HashSet<Arc<str>>, chain: Option<&Chain>) {
    if let Some(chain) = chain
        && chain.link == Link::Next
    {
        broken.insert(chain.run_id.clone());
    }
}

/// Hands a committed job's events, numbered from `first`, to the owner's connections:
/// each is serialized once, for all of them.
fn publish(registry: &Registry, job: &WriteJob, waiter: Waiter, first: u64) {
    for (i, event) in job.events.iter().enumerate() {
        let seq = first + i as u64;
        let text = Utf8Bytes::from(event.frame_text(&job.thread_id, seq));
        let outcome = registry.dispatch(&waiter.owner, event.kind.as_str(), &job.thread_id, seq, &text);
        metrics::counter!(metric::EVENTS, "outcome" => outcome.label()).increment(1);
        if let DeliveryOutcome::Dropped(_) = outcome {
            metrics::counter!(metric::EVENTS_DROPPED, "reason" => "queue_full").increment(1);
        }
    }
    metrics::histogram!(metric::DELIVERY_LATENCY).record(waiter.queued_at.elapsed().as_secs_f64());
    let _ = waiter.reply.send(Ok(first));
}
