//! One WebSocket as delivery sees it: its outbox (bounded in frames and bytes) and how it
//! follows each thread (§6b).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::protocol::{EventType, Frame};
use crate::telemetry::metric;

/// A close the server decided on; the connection's writer sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: &'static str,
}

/// How one connection currently follows one thread (§6b). No entry means the default:
/// every event of the owner's threads, as it comes.
#[derive(Debug)]
pub(super) enum Follow {
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
    pub(super) follows: Mutex<HashMap<String, Follow>>,
    pub(super) generation: std::sync::atomic::AtomicU64,
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
    frames: VecDeque<Frame>,
    /// The bytes of `frames`.
    bytes: usize,
    /// The first close decided; the socket task sends it after the queued frames.
    close: Option<CloseReason>,
    /// The socket task has finished: nothing more is taken.
    gone: bool,
}

/// What [`Connection::push`] did with a frame.
pub(super) enum Push {
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
    pub async fn send(&self, text: impl Into<Frame>) -> bool {
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
    fn push(&self, outbox: &mut Outbox, text: &Frame) -> Push {
        let pushed = self.push_quietly(outbox, text);
        if let Push::Queued = pushed {
            self.wake.notify_one();
        }
        pushed
    }

    /// [`Connection::push`] without waking the socket task: the caller does, with
    /// [`Connection::wake`], once it has queued everything it has for this connection.
    fn push_quietly(&self, outbox: &mut Outbox, text: &Frame) -> Push {
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
        Push::Queued
    }

    /// Wakes the socket task to write what was queued quietly.
    pub(super) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Queues `text` now if there is room; never waits.
    pub(super) fn try_push(&self, text: &Frame) -> Push {
        self.push(&mut self.outbox(), text)
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
    pub fn take(&self, into: &mut Vec<Frame>) -> Option<CloseReason> {
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
    pub fn take_while(&self, into: &mut Vec<Frame>, mut go: impl FnMut(&Frame) -> bool) -> (Option<CloseReason>, bool) {
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

    pub(super) fn follows(&self) -> std::sync::MutexGuard<'_, HashMap<String, Follow>> {
        self.follows.lock().expect("follows lock is never held across a panic")
    }

    /// Offers a live event; never waits. The socket task is not woken: the caller wakes
    /// it with [`Connection::wake`] after its last offer, so that a commit's frames to one
    /// connection go out in one write.
    pub(super) fn offer(&self, kind: &str, seq: u64, thread_id: &str, text: &Frame) -> Offer {
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
                // Events this socket has not seen came before this one (they reached this
                // node before it heard of them): it catches up from the store instead.
                Some(Follow::Live { last_seq }) if seq > *last_seq + 1 => return Offer::Gap(*last_seq),
                Some(Follow::Live { last_seq }) => *last_seq = seq,
            }
        }
        // Counted as seen above even when not wanted: the next one is no gap.
        if !self.wants(kind) {
            return Offer::Skipped;
        }
        let pushed = self.push_quietly(&mut self.outbox(), text);
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

pub(super) enum Offer {
    Queued,
    Skipped,
    Full,
    /// Not queued: the socket follows the thread by `seq` and missed the events after
    /// this one; it must replay from the store.
    Gap(u64),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn following(web_client: bool, last_seq: u64) -> Arc<Connection> {
        let conn = Connection::new("c".into(), Arc::from("u"), QueueLimit { frames: 16, bytes: 1 << 20 }, web_client);
        conn.follows().insert("t".into(), Follow::Live { last_seq });
        conn
    }

    #[test]
    fn a_socket_following_by_seq_reports_a_gap_instead_of_taking_the_event() {
        let conn = following(false, 5);
        let text = Frame::from_static("{}");
        assert!(matches!(conn.offer("partial_result", 7, "t", &text), Offer::Gap(5)));
        assert!(matches!(conn.offer("partial_result", 6, "t", &text), Offer::Queued));
        assert!(matches!(conn.offer("partial_result", 7, "t", &text), Offer::Queued));
        assert!(matches!(conn.offer("partial_result", 7, "t", &text), Offer::Skipped), "a duplicate");
        assert!(matches!(conn.offer("partial_result", 1, "other", &text), Offer::Queued), "not followed by seq");
    }

    #[test]
    fn an_event_a_socket_does_not_want_still_counts_as_seen() {
        let conn = following(true, 5);
        let text = Frame::from_static("{}");
        assert!(matches!(conn.offer("user_message", 6, "t", &text), Offer::Skipped), "the web client skips its echo");
        assert!(matches!(conn.offer("agent_started", 7, "t", &text), Offer::Queued), "no gap after it");
    }
}
