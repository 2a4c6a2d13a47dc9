//! Pending WAIT, WAIT_GET and BARRIER requests, indexed by key (so a write
//! wakes only the waits of its key) and by id (so a cancel or a disconnect
//! costs what it touches).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use super::super::protocol::{Command, Key};
use super::backend::Present;
use super::state::ConnId;
use crate::store::kv::Value;

/// A pending wait.
pub(crate) type WaitId = u64;

/// What a wait sends when it completes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WaitReply {
    /// WAIT: STOP_WAITING.
    StopWaiting,
    /// The WAIT_GET extension: STOP_WAITING then the values of `keys` (in
    /// the request's order), each as it is then or, if deleted since, as
    /// the wait saw it exist (`seen`, by key).
    Values {
        keys: Vec<Key>,
        seen: HashMap<Key, Value>,
    },
    /// BARRIER: STOP_WAITING once the arrival count reaches `world_size`.
    Barrier { world_size: i64 },
}

impl WaitReply {
    /// The command that made the wait.
    pub(crate) fn command(&self) -> Command {
        match self {
            WaitReply::StopWaiting => Command::Wait,
            WaitReply::Values { .. } => Command::WaitGet,
            WaitReply::Barrier { .. } => Command::Barrier,
        }
    }

    /// `key` was seen `present`: a WAIT_GET keeps its value for the reply
    /// (one lookup, however many keys the request has).
    pub(crate) fn record(&mut self, key: &[u8], present: &Present) {
        if let WaitReply::Values { seen, .. } = self {
            match present.value() {
                Some(value) => seen.insert(key.to_vec(), value),
                None => seen.remove(key),
            };
        }
    }
}

/// One pending wait.
pub(crate) struct PendingWait {
    /// The connection waiting.
    pub(crate) conn: ConnId,
    /// Registrations in the key index still outstanding.
    registrations: Vec<(Key, u64)>,
    /// What to send on completion.
    pub(crate) reply: WaitReply,
    /// When its request arrived.
    pub(crate) started: Instant,
}

impl PendingWait {
    /// Registration `seq` (on `key`) is satisfied: records the value a
    /// WAIT_GET answers with; returns whether nothing is left.
    fn mark(&mut self, seq: u64, key: &[u8], present: &Present) -> bool {
        self.registrations.retain(|(_, s)| *s != seq);
        self.reply.record(key, present);
        self.registrations.is_empty()
    }
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

    /// Registers a wait of `conn` for `keys`, whose request arrived at
    /// `started`.
    pub(crate) fn register(
        &mut self,
        conn: ConnId,
        keys: Vec<Key>,
        reply: WaitReply,
        started: Instant,
    ) -> WaitId {
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
                started,
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

    /// The keys wait `id` still waits for (a barrier: its key).
    pub(crate) fn keys_of(&self, id: WaitId) -> impl Iterator<Item = &[u8]> {
        let registrations = self.pending.get(&id).map(|w| &w.registrations[..]);
        registrations
            .unwrap_or_default()
            .iter()
            .map(|(key, _)| &key[..])
    }

    /// Whether a wait or a barrier is registered on `key`.
    pub(crate) fn is_waited(&self, key: &[u8]) -> bool {
        self.by_key.contains_key(key) || self.barriers.contains_key(key)
    }

    /// `key` was written and is `present`: marks it for the waits
    /// registered on it (only the oldest for a queue element, which one
    /// popper takes); returns the waits that have nothing left to wait for.
    pub(crate) fn satisfy(&mut self, key: &[u8], present: &Present) -> Vec<WaitId> {
        let Some(regs) = self.by_key.get_mut(key) else {
            return Vec::new();
        };
        let taken: Vec<(u64, WaitId)> = match present {
            Present::Queued => regs.pop_first().into_iter().collect(),
            Present::Value(_) => std::mem::take(regs).into_iter().collect(),
        };
        if regs.is_empty() {
            self.by_key.remove(key);
        }
        let mut done = Vec::new();
        for (seq, id) in taken {
            if let Some(wait) = self.pending.get_mut(&id) {
                if wait.mark(seq, key, present) {
                    done.push(id);
                }
            }
        }
        done
    }

    /// A look for `id` found `key` `present`: marks it for that wait only
    /// (a barrier: checks its count); returns whether the wait is done.
    pub(crate) fn satisfy_one(&mut self, id: WaitId, key: &[u8], present: &Present) -> bool {
        let Some(wait) = self.pending.get_mut(&id) else {
            return false;
        };
        if let WaitReply::Barrier { world_size } = wait.reply {
            return present
                .counter()
                .is_some_and(|arrived| arrived >= world_size);
        }
        let Some(&(_, seq)) = wait.registrations.iter().find(|(k, _)| k == key) else {
            return false;
        };
        if let Some(regs) = self.by_key.get_mut(key) {
            regs.remove(&seq);
            if regs.is_empty() {
                self.by_key.remove(key);
            }
        }
        wait.mark(seq, key, present)
    }

    /// Every pending wait with the keys it still waits for.
    pub(crate) fn outstanding(&self) -> Vec<(WaitId, Vec<Key>)> {
        self.pending
            .iter()
            .map(|(id, w)| {
                (
                    *id,
                    w.registrations.iter().map(|(k, _)| k.clone()).collect(),
                )
            })
            .collect()
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
