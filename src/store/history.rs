//! The latest messages of the threads this node writes, kept in memory so a run's
//! history costs no read: before it, a third of the writer thread's time in `wsload
//! chat` went to reading the same 50 messages back for every run.
//!
//! An entry is only ever complete. It starts from a thread this node created or from a
//! read that also returned the thread's `last_seq`, and it follows the thread by `seq`:
//! a commit whose first `seq` is not the next one means another writer (another node)
//! wrote in between, and the entry is dropped until the next read refills it. A caller
//! says which `seq` it needs the history through (its run's own message): an entry
//! that has not seen that far, because another node wrote since, is not used.

use std::collections::VecDeque;

use foldhash::{HashMap, HashMapExt};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::{Message, Row, WriteJob};

/// Past this many threads, or its byte budget, the cache starts over rather than grow.
const MAX_THREADS: usize = 10_000;

pub(super) struct HistoryCache {
    /// Messages kept per thread: the most any run asks for.
    depth: usize,
    inner: Mutex<Inner>,
}

struct Inner {
    threads: HashMap<String, Tail>,
    bytes: usize,
    max_bytes: usize,
}

struct Tail {
    /// Every event of the thread up to this `seq` is reflected in `messages`.
    through_seq: u64,
    /// Oldest first, at most `depth`.
    messages: VecDeque<Arc<Message>>,
}

fn size(message: &Message) -> usize {
    message.id.len() + message.content.len() + 64
}

impl HistoryCache {
    /// A cache of `depth` messages per thread, whose messages count for at most
    /// `max_bytes`.
    pub(super) fn new(depth: usize, max_bytes: usize) -> Self {
        Self { depth, inner: Mutex::new(Inner { threads: HashMap::new(), bytes: 0, max_bytes }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("history cache lock is never held across a panic")
    }

    /// The last `limit` messages up to `seq`, oldest first, if the thread is followed at
    /// least through `seq` and what is kept covers them (messages past `seq` take room:
    /// if the entry is full and too few are left, the caller reads the store).
    pub(super) fn get(&self, thread_id: &str, limit: usize, seq: u64) -> Option<Vec<Arc<Message>>> {
        if limit > self.depth {
            return None;
        }
        let inner = self.lock();
        let tail = inner.threads.get(thread_id).filter(|t| t.through_seq >= seq)?;
        let upto = i64::try_from(seq).unwrap_or(i64::MAX);
        let kept = tail.messages.iter().filter(|m| m.seq <= upto).count();
        if kept < limit && tail.messages.len() >= self.depth {
            return None;
        }
        Some(tail.messages.iter().filter(|m| m.seq <= upto).skip(kept.saturating_sub(limit)).cloned().collect())
    }

    /// What is followed of the thread now: every event through the `seq` returned is
    /// reflected, and the last `limit` messages (at most the depth) are all there is.
    pub(super) fn tail(&self, thread_id: &str, limit: usize) -> Option<(u64, Vec<Arc<Message>>)> {
        if limit > self.depth {
            return None;
        }
        let inner = self.lock();
        let tail = inner.threads.get(thread_id)?;
        let skip = tail.messages.len().saturating_sub(limit);
        Some((tail.through_seq, tail.messages.iter().skip(skip).cloned().collect()))
    }

    /// Starts following a thread from a read: `newest_first` are its last messages (up to
    /// the depth, or all it has) as of `through_seq`. A newer entry is kept.
    pub(super) fn fill(&self, thread_id: &str, through_seq: u64, newest_first: &[Arc<Message>]) {
        let mut inner = self.lock();
        if inner.threads.get(thread_id).is_some_and(|t| t.through_seq >= through_seq) {
            return;
        }
        let messages: VecDeque<Arc<Message>> = newest_first.iter().take(self.depth).rev().cloned().collect();
        inner.insert(thread_id, Tail { through_seq, messages });
    }

    /// Follows a committed job whose first event got `first`, written at `now`.
    pub(super) fn record(&self, job: &WriteJob, first: u64, now: i64) {
        if job.events.is_empty() {
            return;
        }
        let last = first + job.events.len() as u64 - 1;
        let created = job.rows.iter().any(|r| matches!(r, Row::CreateThread { .. }));
        let new_messages = job.rows.iter().filter_map(|row| match row {
            Row::Message { id, role, content, event_index } => Some(Arc::new(Message {
                id: id.clone(),
                role: (*role).to_string(),
                content: content.clone(),
                created_at: now,
                metadata: Value::Object(Default::default()),
                seq: i64::try_from(first + *event_index as u64).unwrap_or(i64::MAX),
            })),
            _ => None,
        });
        let mut inner = self.lock();
        if created {
            let mut messages: VecDeque<Arc<Message>> = new_messages.collect();
            while messages.len() > self.depth {
                messages.pop_front();
            }
            inner.insert(&job.thread_id, Tail { through_seq: last, messages });
            return;
        }
        let Some(tail) = inner.threads.get_mut(&job.thread_id) else { return };
        if tail.through_seq + 1 != first {
            // Someone else wrote to the thread in between (or an older commit is
            // reported late): this entry no longer knows every message.
            inner.remove(&job.thread_id);
            return;
        }
        tail.through_seq = last;
        let (mut added, mut removed) = (0, 0);
        for message in new_messages {
            added += size(&message);
            tail.messages.push_back(message);
            if tail.messages.len() > self.depth {
                removed += tail.messages.pop_front().map_or(0, |m| size(&m));
            }
        }
        inner.bytes = inner.bytes + added - removed;
        if inner.bytes > inner.max_bytes {
            inner.clear();
        }
    }

    /// Threads followed and the bytes their messages count for.
    pub(super) fn size(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.threads.len(), inner.bytes)
    }

    pub(super) fn forget(&self, thread_id: &str) {
        self.lock().remove(thread_id);
    }
}

impl Inner {
    fn insert(&mut self, thread_id: &str, tail: Tail) {
        self.remove(thread_id);
        if self.threads.len() >= MAX_THREADS || self.bytes > self.max_bytes {
            self.clear();
        }
        self.bytes += tail.messages.iter().map(|m| size(m)).sum::<usize>();
        self.threads.insert(thread_id.to_string(), tail);
    }

    fn remove(&mut self, thread_id: &str) {
        if let Some(tail) = self.threads.remove(thread_id) {
            self.bytes -= tail.messages.iter().map(|m| size(m)).sum::<usize>();
        }
    }

    fn clear(&mut self) {
        self.threads.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NewEvent, Row};

    fn job(thread: &str, create: bool, texts: &[&str], events: usize) -> WriteJob {
        let mut rows = Vec::new();
        if create {
            rows.push(Row::CreateThread { owner_id: "u".into(), title: "t".into() });
        }
        for (i, text) in texts.iter().enumerate() {
            rows.push(Row::Message { id: format!("m{text}"), role: "user", content: (*text).into(), event_index: i });
        }
        let event = NewEvent {
            kind: crate::protocol::EventType::UserMessage,
            run_id: None,
            agent_name: None,
            timestamp: String::new(),
            payload: serde_json::value::RawValue::from_string("{}".into()).expect("json"),
        };
        WriteJob { expected_last_seq: None, thread_id: thread.into(), rows, events: vec![event; events] }
    }

    fn contents(cache: &HistoryCache, thread: &str, limit: usize, seq: u64) -> Option<Vec<String>> {
        cache.get(thread, limit, seq).map(|v| v.iter().map(|m| m.content.clone()).collect())
    }

    #[test]
    fn a_thread_created_here_is_followed_commit_by_commit() {
        let cache = HistoryCache::new(3, 1 << 20);
        cache.record(&job("t", true, &["a"], 2), 1, 0);
        cache.record(&job("t", false, &[], 3), 3, 0);
        cache.record(&job("t", false, &["b", "c", "d"], 3), 6, 0);
        assert_eq!(contents(&cache, "t", 3, 8), Some(vec!["b".into(), "c".into(), "d".into()]));
        assert_eq!(contents(&cache, "t", 1, 8), Some(vec!["d".into()]));
        // Up to seq 7 (a run that started before "d" was written): "d" is not part of it.
        assert_eq!(contents(&cache, "t", 1, 7), Some(vec!["c".into()]));
        assert!(cache.get("t", 3, 7).is_none(), "the full entry holds only two up to seq 7: read the store");
        assert!(cache.get("t", 4, 0).is_none(), "deeper than kept: read the store");
        assert!(cache.get("t", 1, 9).is_none(), "not seen through seq 9: read the store");
        assert!(cache.get("t", 1, 8).is_some());
        assert!(cache.get("other", 1, 0).is_none());
    }

    #[test]
    fn a_gap_in_seq_drops_the_entry_until_a_read_refills_it() {
        let cache = HistoryCache::new(5, 1 << 20);
        cache.record(&job("t", true, &["a"], 1), 1, 0);
        // Seq 2..=3 were written by another node.
        cache.record(&job("t", false, &["x"], 1), 4, 0);
        assert!(cache.get("t", 1, 0).is_none());
        cache.record(&job("t", false, &["y"], 1), 5, 0);
        assert!(cache.get("t", 1, 0).is_none(), "an unknown thread is not followed from the middle");
        let read: Vec<Arc<Message>> =
            [("y", 5), ("x", 4), ("b", 2), ("a", 1)].iter().map(|(c, seq)| Arc::new(job_message(c, *seq))).collect();
        cache.fill("t", 5, &read);
        assert_eq!(contents(&cache, "t", 5, 5), Some(vec!["a".into(), "b".into(), "x".into(), "y".into()]));
        // An older read does not replace what is newer.
        cache.fill("t", 3, &read[2..]);
        assert_eq!(contents(&cache, "t", 5, 5).map(|v| v.len()), Some(4));
    }

    fn job_message(content: &str, seq: i64) -> Message {
        Message {
            id: format!("m{content}"),
            role: "user".into(),
            content: content.into(),
            created_at: 0,
            metadata: Value::Null,
            seq,
        }
    }

    #[test]
    fn bytes_are_accounted_and_forgetting_releases_them() {
        let cache = HistoryCache::new(2, 1 << 20);
        cache.record(&job("t", true, &["aaaa", "bbbb", "cccc"], 3), 1, 0);
        let expected: usize = ["bbbb", "cccc"].iter().map(|c| size(&job_message(c, 0))).sum();
        assert_eq!(cache.lock().bytes, expected);
        cache.forget("t");
        assert_eq!(cache.lock().bytes, 0);
        assert!(cache.get("t", 1, 0).is_none());
    }
}
