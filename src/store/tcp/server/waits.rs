//! Pending WAIT, WAIT_GET and BARRIER requests, indexed by key (so a write
//! wakes only the waits of its key) and by id (so a cancel or a disconnect
//! costs what it touches).

use std::collections::{BTreeMap, HashMap};

use super::super::protocol::Key;
use super::state::ConnId;

/// A pending wait.
pub(crate) type WaitId = u64;

/// What a wait sends when it completes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WaitReply {
    /// WAIT: STOP_WAITING.
    StopWaiting,
    /// The WAIT_GET extension: STOP_WAITING then the values of the keys.
    Values(Vec<Key>),
    /// BARRIER: STOP_WAITING once the arrival count reaches `world_size`.
    Barrier { world_size: i64 },
}

/// One pending wait.
pub(crate) struct PendingWait {
    /// The connection waiting.
    pub(crate) conn: ConnId,
    /// Registrations in the key index still outstanding.
    registrations: Vec<(Key, u64)>,
    /// What to send on completion.
    pub(crate) reply: WaitReply,
}

/// Pending waits, indexed by id and by key.
#[derive(Default)]
pub(crate) struct Waits {
    pending: HashMap<WaitId, PendingWait>,
    /// WAIT / WAIT_GET registrations: key -> sequence -> wait, oldest first.
    by_key: HashMap<Key, BTreeMap<u64, WaitId>>,
    /// BARRIER registrations, the same way.
    barriers: HashMap<Key, BTreeMap<u64, WaitId>>,
    next: u64,
}

impl Waits {
    fn next_id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    /// Pending waits.
    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }

    /// Registers a wait of `conn` for `keys`.
    pub(crate) fn register(&mut self, conn: ConnId, keys: Vec<Key>, reply: WaitReply) -> WaitId {
        let id = self.next_id();
        let mut registrations = Vec::with_capacity(keys.len());
        for key in keys {
            let seq = self.next_id();
            let index = match reply {
                WaitReply::Barrier { .. } => &mut self.barriers,
                _ => &mut self.by_key,
            };
            index.entry(key.clone()).or_default().insert(seq, id);
            registrations.push((key, seq));
        }
        self.pending.insert(
            id,
            PendingWait {
                conn,
                registrations,
                reply,
            },
        );
        id
    }

    /// Removes a wait and whatever registrations it still has.
    pub(crate) fn remove(&mut self, id: WaitId) -> Option<PendingWait> {
        let wait = self.pending.remove(&id)?;
        let index = match wait.reply {
            WaitReply::Barrier { .. } => &mut self.barriers,
            _ => &mut self.by_key,
        };
        for (key, seq) in &wait.registrations {
            if let Some(regs) = index.get_mut(key) {
                regs.remove(seq);
                if regs.is_empty() {
                    index.remove(key);
                }
            }
        }
        Some(wait)
    }

    /// Marks `key` present for the waits registered on it (all of them, or
    /// only the oldest); returns the waits that have nothing left to wait for.
    pub(crate) fn satisfy(&mut self, key: &[u8], only_oldest: bool) -> Vec<WaitId> {
        let Some(regs) = self.by_key.get_mut(key) else {
            return Vec::new();
        };
        let taken: Vec<(u64, WaitId)> = if only_oldest {
            regs.pop_first().into_iter().collect()
        } else {
            std::mem::take(regs).into_iter().collect()
        };
        if regs.is_empty() {
            self.by_key.remove(key);
        }
        let mut done = Vec::new();
        for (seq, id) in taken {
            if let Some(wait) = self.pending.get_mut(&id) {
                wait.registrations.retain(|(_, s)| *s != seq);
                if wait.registrations.is_empty() {
                    done.push(id);
                }
            }
        }
        done
    }

    /// Whether barriers wait on `key`.
    pub(crate) fn has_barrier(&self, key: &[u8]) -> bool {
        self.barriers.contains_key(key)
    }

    /// The barrier waits on `key` whose world size `arrived` reaches.
    pub(crate) fn released_barriers(&self, key: &[u8], arrived: i64) -> Vec<WaitId> {
        let Some(regs) = self.barriers.get(key) else {
            return Vec::new();
        };
        regs.values()
            .copied()
            .filter(|id| {
                matches!(self.pending.get(id), Some(PendingWait {
                    reply: WaitReply::Barrier { world_size }, ..
                }) if arrived >= *world_size)
            })
            .collect()
    }
}
