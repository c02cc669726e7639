//! What the store remembers between calls on this node: thread owners and the users it
//! recorded (the history of threads it writes is in [`super::history`]). Each is bounded
//! and only ever right or absent: an owner never changes, and a user's claims are
//! recorded again when they change.

use foldhash::{HashMap, HashMapExt};
use std::sync::Mutex;

/// A digest of a user's email and name, as its token gave them: what the map of recorded
/// users keeps (one per connected user; the strings would double its size).
fn claims_digest(email: Option<&str>, name: Option<&str>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    (email, name).hash(&mut hasher);
    hasher.finish()
}

/// What one map entry is counted as: its two strings and the map's own share (the
/// slot, the strings' headers and the allocator's rounding).
fn entry_bytes(key: &str, value_len: usize) -> usize {
    key.len() + value_len + 96
}

/// Thread owners seen by this node. An owner never changes, so a hit is always right
/// about ownership; a thread deleted on another node may still be listed here, which is
/// harmless because every write re-checks `deleted_at` in its transaction. Past its
/// byte budget it starts over rather than grow.
pub(super) struct OwnerCache {
    inner: Mutex<Counted<String>>,
}

struct Counted<V> {
    map: HashMap<String, V>,
    bytes: usize,
    max_bytes: usize,
}

impl<V> Counted<V> {
    fn new(max_bytes: usize) -> Self {
        Self { map: HashMap::new(), bytes: 0, max_bytes }
    }

    /// Inserts an entry counted as `bytes`, starting over first if it would not fit.
    fn insert(&mut self, key: &str, value: V, bytes: usize) {
        if self.bytes + bytes > self.max_bytes {
            self.map.clear();
            self.bytes = 0;
        }
        if self.map.insert(key.to_string(), value).is_none() {
            self.bytes += bytes;
        }
    }
}

impl OwnerCache {
    pub(super) fn new(max_bytes: usize) -> Self {
        Self { inner: Mutex::new(Counted::new(max_bytes)) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counted<String>> {
        self.inner.lock().expect("owner cache lock is never held across a panic")
    }

    pub(super) fn get(&self, thread_id: &str) -> Option<String> {
        self.lock().map.get(thread_id).cloned()
    }

    pub(super) fn insert(&self, thread_id: &str, owner: &str) {
        self.lock().insert(thread_id, owner.to_string(), entry_bytes(thread_id, owner.len()));
    }

    pub(super) fn remove(&self, thread_id: &str) {
        let mut inner = self.lock();
        if let Some(owner) = inner.map.remove(thread_id) {
            inner.bytes -= entry_bytes(thread_id, owner.len());
        }
    }

    /// Entries and the bytes they count for.
    pub(super) fn size(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.map.len(), inner.bytes)
    }
}

/// Users recorded by this node, with a digest of the claims they were recorded with.
/// Past its byte budget it starts over (users are then recorded again).
pub(super) struct RecordedUsers {
    inner: Mutex<Counted<u64>>,
}

impl RecordedUsers {
    pub(super) fn new(max_bytes: usize) -> Self {
        Self { inner: Mutex::new(Counted::new(max_bytes)) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counted<u64>> {
        self.inner.lock().expect("users lock is never held across a panic")
    }

    /// Whether `user_id` was recorded with exactly these claims.
    pub(super) fn has(&self, user_id: &str, email: Option<&str>, name: Option<&str>) -> bool {
        self.lock().map.get(user_id) == Some(&claims_digest(email, name))
    }

    pub(super) fn remember(&self, user_id: &str, email: Option<&str>, name: Option<&str>) {
        self.lock().insert(user_id, claims_digest(email, name), entry_bytes(user_id, 8));
    }

    /// Entries and the bytes they count for.
    pub(super) fn size(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.map.len(), inner.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_cache_stays_within_its_byte_budget() {
        let cache = OwnerCache::new(10_000);
        for i in 0..1_000 {
            cache.insert(&format!("th_{i:032}"), "some-user");
            let (_, bytes) = cache.size();
            assert!(bytes <= 10_000, "{bytes} bytes after {i} inserts");
        }
        let (entries, _) = cache.size();
        assert!(entries > 0 && entries < 1_000, "it started over at its budget: {entries} entries");
        // The latest insert is always kept, and a removal gives its bytes back.
        assert_eq!(cache.get(&format!("th_{:032}", 999)).as_deref(), Some("some-user"));
        let before = cache.size();
        cache.remove(&format!("th_{:032}", 999));
        assert_eq!(cache.size(), (before.0 - 1, before.1 - entry_bytes(&format!("th_{:032}", 999), 9)));
    }

    #[test]
    fn recorded_users_stay_within_their_byte_budget() {
        let users = RecordedUsers::new(2_000);
        for i in 0..100 {
            users.remember(&format!("user-{i}"), Some("a@b.c"), None);
            assert!(users.size().1 <= 2_000);
        }
        assert!(users.has("user-99", Some("a@b.c"), None));
        assert!(!users.has("user-99", Some("other@b.c"), None), "changed claims are recorded again");
    }
}
