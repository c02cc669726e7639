//! In-order delivery of a thread's events when they reach this node from more than one
//! place: its own writer, and other nodes through the broker. Each thread this node has
//! delivered lately has a lane: the next `seq` its local connections expect. An event at
//! that `seq` goes through; one below it was delivered already (a duplicate: skipped);
//! one above it means events in between have not arrived yet: it is held, and the lane
//! is filled from the store, where every event below a committed `seq` already is (seq
//! is handed out under the thread's row lock, so commits of a thread are in `seq`
//! order). Held events follow once the gap is filled. With the in-process broker only
//! the writer delivers, in order: no lane is kept.

use std::collections::BTreeMap;

use foldhash::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::protocol::Frame;

/// A lane not used for this long is forgotten; the next event of its thread starts a new one.
const IDLE_LANE: Duration = Duration::from_secs(600);
/// Most events held for one lane while it is filled; past it the lane starts over at the
/// newest event (the store fill still covers everything below it).
const MAX_HELD: usize = 4096;

/// One event on its way to the owner's local connections.
#[derive(Debug, Clone)]
pub(super) struct Arrival {
    pub(super) owner: Arc<str>,
    pub(super) thread_id: Arc<str>,
    pub(super) seq: u64,
    pub(super) kind: Arc<str>,
    pub(super) text: Frame,
}

/// What to do with an arrival.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Admit {
    /// Deliver it now.
    Deliver,
    /// Delivered before.
    Duplicate,
    /// Held; when `Some`, the caller must fill the lane from the store from this `seq`
    /// (inclusive) and then call [`Gate::filled`].
    Held(Option<u64>),
}

struct Lane {
    next: u64,
    filling: bool,
    held: BTreeMap<u64, Arrival>,
    used: Instant,
}

#[derive(Default)]
pub(super) struct Gate {
    lanes: Mutex<HashMap<Arc<str>, Lane>>,
}

impl Gate {
    fn lanes(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Lane>> {
        self.lanes.lock().expect("gate lock is never held across a panic")
    }

    /// Decides about one arrival.
    pub(super) fn admit(&self, arrival: &Arrival) -> Admit {
        let mut lanes = self.lanes();
        let now = Instant::now();
        let Some(lane) = lanes.get_mut(&arrival.thread_id) else {
            let lane = Lane { next: arrival.seq + 1, filling: false, held: BTreeMap::new(), used: now };
            lanes.insert(arrival.thread_id.clone(), lane);
            return Admit::Deliver;
        };
        lane.used = now;
        if arrival.seq < lane.next || lane.held.contains_key(&arrival.seq) {
            return Admit::Duplicate;
        }
        if arrival.seq == lane.next && !lane.filling {
            lane.next += 1;
            return Admit::Deliver;
        }
        if lane.held.len() >= MAX_HELD {
            // Too far behind: what is held is in the store too; start over at this one.
            lane.held.clear();
        }
        lane.held.insert(arrival.seq, arrival.clone());
        if lane.filling {
            Admit::Held(None)
        } else {
            lane.filling = true;
            Admit::Held(Some(lane.next))
        }
    }

    /// Starts a fill of `thread_id` from `from` (or from where its lane is, if it has
    /// one), unless one is under way: the `seq` to fill from, or `None`.
    pub(super) fn start_fill(&self, thread_id: &Arc<str>, from: u64) -> Option<u64> {
        let mut lanes = self.lanes();
        let lane = lanes.entry(thread_id.clone()).or_insert_with(|| Lane {
            next: from,
            filling: false,
            held: BTreeMap::new(),
            used: Instant::now(),
        });
        if lane.filling {
            return None;
        }
        lane.filling = true;
        Some(lane.next)
    }

    /// Whether `thread_id` has a lane, and the next `seq` it expects.
    pub(super) fn next_of(&self, thread_id: &str) -> Option<u64> {
        self.lanes().get(thread_id).map(|l| l.next)
    }

    /// Marks `seq` delivered by a fill (read from the store): the lane moves past it.
    pub(super) fn fill_step(&self, thread_id: &str, seq: u64) -> bool {
        let mut lanes = self.lanes();
        let Some(lane) = lanes.get_mut(thread_id) else { return false };
        if seq < lane.next {
            return false;
        }
        lane.next = seq + 1;
        lane.held.remove(&seq);
        true
    }

    /// Ends a fill: returns the held events that now follow in order (to deliver), and
    /// `Some(from)` when a gap remains before the next held one (fill again from there).
    pub(super) fn filled(&self, thread_id: &str) -> (Vec<Arrival>, Option<u64>) {
        let mut lanes = self.lanes();
        let Some(lane) = lanes.get_mut(thread_id) else { return (Vec::new(), None) };
        let mut ready = Vec::new();
        while let Some(entry) = lane.held.first_entry() {
            if *entry.key() < lane.next {
                entry.remove();
            } else if *entry.key() == lane.next {
                ready.push(entry.remove());
                lane.next += 1;
            } else {
                return (ready, Some(lane.next));
            }
        }
        lane.filling = false;
        (ready, None)
    }

    /// A fill that could not read the store: the held events go out as they are, in
    /// order (a gap the store could not close is not made worse by waiting).
    pub(super) fn give_up(&self, thread_id: &str) -> Vec<Arrival> {
        let mut lanes = self.lanes();
        let Some(lane) = lanes.get_mut(thread_id) else { return Vec::new() };
        let held = std::mem::take(&mut lane.held);
        lane.filling = false;
        if let Some((&last, _)) = held.last_key_value() {
            lane.next = last + 1;
        }
        held.into_values().collect()
    }

    /// Forgets lanes idle for long.
    pub(super) fn sweep(&self) {
        self.lanes().retain(|_, lane| lane.filling || lane.used.elapsed() < IDLE_LANE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrival(seq: u64) -> Arrival {
        Arrival {
            owner: Arc::from("u"),
            thread_id: Arc::from("t"),
            seq,
            kind: Arc::from("partial_result"),
            text: Frame::from(format!("{seq}")),
        }
    }

    #[test]
    fn in_order_passes_duplicates_are_skipped() {
        let gate = Gate::default();
        assert_eq!(gate.admit(&arrival(5)), Admit::Deliver, "a new lane starts where its first event is");
        assert_eq!(gate.admit(&arrival(6)), Admit::Deliver);
        assert_eq!(gate.admit(&arrival(6)), Admit::Duplicate);
        assert_eq!(gate.admit(&arrival(3)), Admit::Duplicate);
    }

    #[test]
    fn a_gap_holds_later_events_until_the_fill_closes_it() {
        let gate = Gate::default();
        assert_eq!(gate.admit(&arrival(1)), Admit::Deliver);
        assert_eq!(gate.admit(&arrival(4)), Admit::Held(Some(2)), "fill from 2");
        assert_eq!(gate.admit(&arrival(5)), Admit::Held(None), "one fill at a time");
        assert_eq!(gate.admit(&arrival(4)), Admit::Duplicate, "already held");
        // The fill reads 2 and 3 from the store.
        assert!(gate.fill_step("t", 2));
        assert!(gate.fill_step("t", 3));
        let (ready, again) = gate.filled("t");
        assert_eq!(ready.iter().map(|a| a.seq).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(again, None);
        assert_eq!(gate.admit(&arrival(3)), Admit::Duplicate, "the late copy of a filled event");
        assert_eq!(gate.admit(&arrival(6)), Admit::Deliver);
    }

    #[test]
    fn a_fill_that_reads_past_the_held_events_makes_them_duplicates() {
        let gate = Gate::default();
        assert_eq!(gate.admit(&arrival(1)), Admit::Deliver);
        assert_eq!(gate.admit(&arrival(3)), Admit::Held(Some(2)));
        for seq in 2..=4 {
            assert!(gate.fill_step("t", seq));
        }
        assert!(!gate.fill_step("t", 3), "delivered by the fill already");
        let (ready, again) = gate.filled("t");
        assert!(ready.is_empty() && again.is_none());
        assert_eq!(gate.next_of("t"), Some(5));
    }

    #[test]
    fn a_gap_the_fill_leaves_is_filled_again() {
        let gate = Gate::default();
        assert_eq!(gate.admit(&arrival(1)), Admit::Deliver);
        assert_eq!(gate.admit(&arrival(5)), Admit::Held(Some(2)));
        assert!(gate.fill_step("t", 2));
        let (ready, again) = gate.filled("t");
        assert!(ready.is_empty());
        assert_eq!(again, Some(3));
        let lost = gate.give_up("t");
        assert_eq!(lost.iter().map(|a| a.seq).collect::<Vec<_>>(), vec![5]);
        assert_eq!(gate.admit(&arrival(6)), Admit::Deliver);
    }

    #[test]
    fn a_fill_can_start_a_lane() {
        let gate = Gate::default();
        let t: Arc<str> = Arc::from("t");
        assert_eq!(gate.start_fill(&t, 7), Some(7));
        assert_eq!(gate.start_fill(&t, 7), None, "under way");
        assert_eq!(gate.admit(&arrival(9)), Admit::Held(None));
        assert!(gate.fill_step("t", 7));
        assert!(gate.fill_step("t", 8));
        let (ready, again) = gate.filled("t");
        assert_eq!(ready.len(), 1);
        assert!(again.is_none());
    }
}
