//! The connections of this node, by user, and the fan-out of one event to them.

use foldhash::HashMap;
use std::sync::{Arc, Mutex};

use super::connection::{Offer, Push};
use super::{CloseReason, Connection, DeliveryOutcome, DropReason};
use crate::protocol::Frame;
use crate::telemetry::metric;

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
    pub fn tell(&self, owner: &str, text: &Frame) {
        let conns: Vec<Arc<Connection>> = self.users().get(owner).cloned().unwrap_or_default();
        for conn in conns {
            if let Push::Full = conn.try_push(text) {
                conn.close(CloseReason { code: 1013, reason: "send queue full" });
            }
        }
    }

    pub fn connection_count(&self) -> usize {
        self.users().values().map(Vec::len).sum()
    }

    /// The users with a connection here.
    pub fn user_ids(&self) -> Vec<String> {
        self.users().keys().map(|u| u.to_string()).collect()
    }

    /// The open connections of `owner`, cloned out so no registry lock is held while
    /// offering to them.
    pub(super) fn connections_of(&self, owner: &str) -> Vec<Arc<Connection>> {
        self.users().get(owner).cloned().unwrap_or_default()
    }
}

/// Connections that were offered frames during one publish, woken together at its end:
/// each socket task then writes everything a commit had for it at once. Also the sockets
/// that found a gap in a thread they follow by `seq`, to catch up from the store.
#[derive(Default)]
pub(super) struct Wakes {
    conns: Vec<Arc<Connection>>,
    pub(super) gaps: Vec<(Arc<Connection>, Arc<str>, u64)>,
}

impl Wakes {
    pub(super) fn add(&mut self, conn: &Arc<Connection>) {
        if !self.conns.last().is_some_and(|last| Arc::ptr_eq(last, conn)) {
            self.conns.push(conn.clone());
        }
    }

    fn gap(&mut self, conn: &Arc<Connection>, thread_id: &str, after_seq: u64) {
        let known = self.gaps.iter().any(|(c, t, _)| Arc::ptr_eq(c, conn) && &**t == thread_id);
        if !known {
            self.gaps.push((conn.clone(), Arc::from(thread_id), after_seq));
        }
    }

    pub(super) fn wake_all(mut self) {
        self.conns.sort_unstable_by_key(Arc::as_ptr);
        self.conns.dedup_by(|a, b| Arc::ptr_eq(a, b));
        for conn in self.conns {
            conn.wake();
        }
    }
}

/// Offers one committed event to `conns` (its owner's), noting in `wakes` who got it.
pub(super) fn fan_out(
    conns: &[Arc<Connection>],
    kind: &str,
    thread_id: &str,
    seq: u64,
    text: &Frame,
    wakes: &mut Wakes,
) -> DeliveryOutcome {
    let (mut queued, mut full) = (0, false);
    for conn in conns {
        match conn.offer(kind, seq, thread_id, text) {
            Offer::Queued => {
                queued += 1;
                wakes.add(conn);
            }
            Offer::Skipped => {}
            Offer::Full => full = true,
            Offer::Gap(after_seq) => wakes.gap(conn, thread_id, after_seq),
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
