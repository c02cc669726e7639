//! What the store remembers between calls on this node: thread owners and the users it
//! recorded (the history of threads it writes is in [`super::history`]). Each is bounded
//! and only ever right or absent: an owner never changes, and a user's claims are
//! recorded again when they change.

use std::collections::HashMap;
use std::sync::Mutex;

/// A digest of a user's email and name, as its token gave them: what the map of recorded
/// users keeps (one per connected user; the strings would double its size).
fn claims_digest(email: Option<&str>, name: Option<&str>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    (email, name).hash(&mut hasher);
    hasher.finish()
}

/// Thread owners seen by this node. An owner never changes, so a hit is always right
/// about ownership; a thread deleted on another node may still be listed here, which is
/// harmless because every write re-checks `deleted_at` in its transaction.
#[derive(Default)]
pub(super) struct OwnerCache {
    map: Mutex<HashMap<String, String>>,
}

/// Past this many entries the cache starts over rather than grow without bound.
pub(super) const OWNER_CACHE_MAX: usize = 100_000;

impl OwnerCache {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.map.lock().expect("owner cache lock is never held across a panic")
    }

    pub(super) fn get(&self, thread_id: &str) -> Option<String> {
        self.lock().get(thread_id).cloned()
    }

    pub(super) fn insert(&self, thread_id: &str, owner: &str) {
        let mut map = self.lock();
        if map.len() >= OWNER_CACHE_MAX {
            map.clear();
        }
        map.insert(thread_id.to_string(), owner.to_string());
    }

    pub(super) fn remove(&self, thread_id: &str) {
        self.lock().remove(thread_id);
    }

    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Users recorded by this node, with a digest of the claims they were recorded with.
#[derive(Default)]
pub(super) struct RecordedUsers {
    map: Mutex<HashMap<String, u64>>,
}

impl RecordedUsers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.map.lock().expect("users lock is never held across a panic")
    }

    /// Whether `user_id` was recorded with exactly these claims.
    pub(super) fn has(&self, user_id: &str, email: Option<&str>, name: Option<&str>) -> bool {
        self.lock().get(user_id) == Some(&claims_digest(email, name))
    }

    pub(super) fn remember(&self, user_id: &str, email: Option<&str>, name: Option<&str>) {
        let mut map = self.lock();
        if map.len() >= OWNER_CACHE_MAX {
            map.clear();
        }
        map.insert(user_id.to_string(), claims_digest(email, name));
    }

    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }
}
