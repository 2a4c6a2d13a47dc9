//! Keys that die with their owner: which session each leased key belongs
//! to. As with etcd's leases, the last write of a key decides: a leased
//! write ties it to the writer's session, any other write or a delete
//! unties it; when the session ends, every key still tied to it is
//! deleted.

use std::collections::{HashMap, HashSet};

use super::SessionId;
use crate::store::tcp::protocol::Key;

/// The leased keys of every session.
#[derive(Debug, Default)]
pub(super) struct Leases {
    owner: HashMap<Key, SessionId>,
    owned: HashMap<SessionId, HashSet<Key>>,
}

impl Leases {
    /// Ties `key` to session `id` (from whichever session held it).
    pub(super) fn tie(&mut self, key: &[u8], id: SessionId) {
        if let Some(previous) = self.owner.insert(key.to_vec(), id) {
            if previous == id {
                return;
            }
            self.forget(previous, key);
        }
        self.owned.entry(id).or_default().insert(key.to_vec());
    }

    /// Whether no key is leased.
    pub(super) fn is_empty(&self) -> bool {
        self.owner.is_empty()
    }

    /// Unties `key`: it was written without a lease, or deleted.
    pub(super) fn untie(&mut self, key: &[u8]) {
        if self.owner.is_empty() {
            return;
        }
        if let Some(id) = self.owner.remove(key) {
            self.forget(id, key);
        }
    }

    /// Unties every key starting with `prefix` (they were deleted).
    pub(super) fn untie_prefix(&mut self, prefix: &[u8]) {
        let keys: Vec<Key> = self
            .owner
            .keys()
            .filter(|key| key.starts_with(prefix))
            .cloned()
            .collect();
        for key in keys {
            self.untie(&key);
        }
    }

    /// The keys session `id` still holds, now untied: to delete, as it
    /// ended.
    pub(super) fn take(&mut self, id: SessionId) -> Vec<Key> {
        let keys: Vec<Key> = self.owned.remove(&id).into_iter().flatten().collect();
        for key in &keys {
            self.owner.remove(key);
        }
        keys
    }

    fn forget(&mut self, id: SessionId, key: &[u8]) {
        if let Some(keys) = self.owned.get_mut(&id) {
            keys.remove(key);
            if keys.is_empty() {
                self.owned.remove(&id);
            }
        }
    }
}
