//! Small keys and values packed together: each entry is one record
//! `[u32 key length][u32 value length][key][value]` in 1 MiB slabs, found
//! through a hash table of 8-byte record handles. A 100-byte value under a
//! 10-byte key costs about 130 bytes here, against about 200 as a map of a
//! boxed key to a shared value (a slot, two allocations and their headers).
//!
//! A value replaced by one of the same length is overwritten in place
//! (counters, mostly); otherwise the old record becomes garbage, and the
//! slabs are compacted once garbage outweighs the live records, so the
//! memory held stays within twice what is stored (plus one slab).
//!
//! Keys are hashed with std's keyed SipHash: a client cannot choose keys
//! that collide.

use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;

/// Bytes of one slab.
const SLAB_LEN: usize = 1 << 20;
/// Bytes of a record's header.
const HEADER: usize = 8;
/// The largest record kept here; larger entries belong elsewhere.
pub(crate) const MAX_RECORD: usize = 4 << 10;
/// Marks a record whose entry was removed or replaced.
const DEAD: u32 = 1 << 31;

/// Where a record is: slab index (high half) and offset in it.
type Handle = u64;

/// Entries of at most [`MAX_RECORD`] bytes, packed.
#[derive(Default)]
pub(crate) struct PackedMap {
    slabs: Vec<Vec<u8>>,
    index: HashTable<Handle>,
    hasher: RandomState,
    /// Bytes of live records.
    live: usize,
    /// Bytes of dead records.
    garbage: usize,
}

/// The size of the record of `key` and `value`.
pub(crate) fn record_len(key: &[u8], value: &[u8]) -> usize {
    HEADER + key.len() + value.len()
}

fn u32_at(slab: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([slab[at], slab[at + 1], slab[at + 2], slab[at + 3]])
}

/// The record at `at` in `slab`: (key, value, dead).
fn record_at(slab: &[u8], at: usize) -> (&[u8], &[u8], bool) {
    let key_word = u32_at(slab, at);
    let key_len = (key_word & !DEAD) as usize;
    let value_len = u32_at(slab, at + 4) as usize;
    let key = &slab[at + HEADER..at + HEADER + key_len];
    let value = &slab[at + HEADER + key_len..at + HEADER + key_len + value_len];
    (key, value, key_word & DEAD != 0)
}

fn split(handle: Handle) -> (usize, usize) {
    ((handle >> 32) as usize, (handle & 0xFFFF_FFFF) as usize)
}

impl PackedMap {
    fn record(&self, handle: Handle) -> (&[u8], &[u8]) {
        let (slab, at) = split(handle);
        let (key, value, _) = record_at(&self.slabs[slab], at);
        (key, value)
    }

    fn find(&self, key: &[u8]) -> Option<Handle> {
        let hash = self.hasher.hash_one(key);
        self.index.find(hash, |&h| self.record(h).0 == key).copied()
    }

    /// The value of `key`.
    pub(crate) fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.find(key).map(|h| self.record(h).1)
    }

    /// Whether `key` is here.
    pub(crate) fn contains(&self, key: &[u8]) -> bool {
        self.find(key).is_some()
    }

    /// Entries.
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    /// Every key (in no particular order).
    pub(crate) fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.index.iter().map(|&h| self.record(h).0)
    }

    /// Sets `key` to `value`; their record must fit [`MAX_RECORD`].
    pub(crate) fn insert(&mut self, key: &[u8], value: &[u8]) {
        debug_assert!(record_len(key, value) <= MAX_RECORD);
        let hash = self.hasher.hash_one(key);
        let slabs = &self.slabs;
        let found = self.index.find_mut(hash, |&h| {
            let (slab, at) = split(h);
            record_at(&slabs[slab], at).0 == key
        });
        if let Some(&mut handle) = found {
            let (slab, at) = split(handle);
            let old_len = u32_at(&self.slabs[slab], at + 4) as usize;
            if old_len == value.len() {
                let start = at + HEADER + key.len();
                self.slabs[slab][start..start + value.len()].copy_from_slice(value);
                return;
            }
            self.kill(handle);
            let new = self.append(key, value);
            if let Some(slot) = self.index.find_mut(hash, |&h| h == handle) {
                *slot = new;
            }
        } else {
            let new = self.append(key, value);
            let (slabs, hasher) = (&self.slabs, &self.hasher);
            self.index.insert_unique(hash, new, |&h| {
                let (slab, at) = split(h);
                hasher.hash_one(record_at(&slabs[slab], at).0)
            });
        }
        self.compact_if_wasteful();
    }

    /// Removes `key`; whether it was here.
    pub(crate) fn remove(&mut self, key: &[u8]) -> bool {
        let hash = self.hasher.hash_one(key);
        let slabs = &self.slabs;
        let Ok(entry) = self.index.find_entry(hash, |&h| {
            let (slab, at) = split(h);
            record_at(&slabs[slab], at).0 == key
        }) else {
            return false;
        };
        let (handle, _) = entry.remove();
        self.kill(handle);
        self.compact_if_wasteful();
        true
    }

    /// Writes a record at the end of the last slab (a new one if it is
    /// full); returns its handle.
    fn append(&mut self, key: &[u8], value: &[u8]) -> Handle {
        let len = record_len(key, value);
        if self
            .slabs
            .last()
            .is_none_or(|s| s.len() + len > s.capacity())
        {
            self.slabs.push(Vec::with_capacity(SLAB_LEN));
        }
        let index = self.slabs.len() - 1;
        let slab = &mut self.slabs[index];
        let at = slab.len();
        slab.extend_from_slice(&(key.len() as u32).to_le_bytes());
        slab.extend_from_slice(&(value.len() as u32).to_le_bytes());
        slab.extend_from_slice(key);
        slab.extend_from_slice(value);
        self.live += len;
        ((index as u64) << 32) | at as u64
    }

    /// Marks the record at `handle` dead.
    fn kill(&mut self, handle: Handle) {
        let (slab, at) = split(handle);
        let slab = &mut self.slabs[slab];
        let (key, value, _) = record_at(slab, at);
        let len = HEADER + key.len() + value.len();
        let word = u32_at(slab, at) | DEAD;
        slab[at..at + 4].copy_from_slice(&word.to_le_bytes());
        self.live -= len;
        self.garbage += len;
    }

    /// Rewrites the live records into fresh slabs once dead ones take more
    /// room than they do (and more than a slab).
    fn compact_if_wasteful(&mut self) {
        if self.garbage <= SLAB_LEN || self.garbage <= self.live {
            return;
        }
        let old = std::mem::take(&mut self.slabs);
        self.index.clear();
        self.live = 0;
        self.garbage = 0;
        for slab in &old {
            let mut at = 0;
            while at < slab.len() {
                let (key, value, dead) = record_at(slab, at);
                at += HEADER + key.len() + value.len();
                if dead {
                    continue;
                }
                let handle = self.append(key, value);
                let hash = self.hasher.hash_one(key);
                let (slabs, hasher) = (&self.slabs, &self.hasher);
                self.index.insert_unique(hash, handle, |&h| {
                    let (slab, at) = split(h);
                    hasher.hash_one(record_at(&slabs[slab], at).0)
                });
            }
        }
        self.index.shrink_to_fit(|&h| {
            let (slab, at) = split(h);
            self.hasher.hash_one(record_at(&self.slabs[slab], at).0)
        });
    }

    /// Bytes held: slabs and index (for tests and stats).
    #[cfg(test)]
    fn footprint(&self) -> usize {
        self.slabs.iter().map(Vec::capacity).sum::<usize>() + self.index.capacity() * 9
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn behaves_as_a_map_through_overwrites_removals_and_compactions() {
        let mut packed = PackedMap::default();
        let mut model: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        let mut rng = fastrand::Rng::with_seed(7);
        for step in 0..200_000 {
            let key = format!("k{}", rng.usize(..3000)).into_bytes();
            match rng.u8(..10) {
                0..=5 => {
                    let value: Vec<u8> = (0..rng.usize(..300)).map(|_| rng.u8(..)).collect();
                    packed.insert(&key, &value);
                    model.insert(key, value);
                }
                6..=7 => assert_eq!(packed.remove(&key), model.remove(&key).is_some()),
                _ => assert_eq!(packed.get(&key), model.get(&key).map(Vec::as_slice)),
            }
            if step % 20_000 == 0 {
                assert_eq!(packed.len(), model.len());
                let mut keys: Vec<&[u8]> = packed.keys().collect();
                keys.sort_unstable();
                let mut expected: Vec<&[u8]> = model.keys().map(Vec::as_slice).collect();
                expected.sort_unstable();
                assert_eq!(keys, expected);
            }
        }
        for (key, value) in &model {
            assert_eq!(packed.get(key), Some(&value[..]));
        }
        assert!(packed.garbage <= packed.live.max(SLAB_LEN));
    }

    #[test]
    fn same_length_values_are_overwritten_in_place_and_memory_stays_bounded() {
        let mut packed = PackedMap::default();
        packed.insert(b"counter", b"1");
        for i in 0..1000 {
            packed.insert(b"counter", format!("{}", i % 10).as_bytes());
        }
        assert_eq!(packed.garbage, 0);
        // Rewriting 10,000 keys with growing values again and again: the
        // memory held stays within about twice what is stored.
        for round in 1..=20 {
            for k in 0..10_000 {
                packed.insert(format!("key{k}").as_bytes(), &vec![round as u8; 50 + round]);
            }
        }
        let stored = 10_000 * (HEADER + 8 + 70);
        assert!(
            packed.footprint() < 2 * stored + 2 * SLAB_LEN + packed.index.capacity() * 9,
            "{} bytes held for {stored} stored",
            packed.footprint()
        );
        assert_eq!(packed.get(b"key9999"), Some(&vec![20u8; 70][..]));
    }
}
