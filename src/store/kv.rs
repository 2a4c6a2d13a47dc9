//! The key-value table behind the in-process and network stores: PyTorch's
//! semantics for every operation, without any waiting (callers own locking
//! and wake-ups).
//!
//! Small entries (key and value within 4 KiB) are packed into slabs
//! ([`PackedMap`]): about 130 bytes for a 100-byte value, where a map of
//! boxed keys to shared values spends 200. Larger values are kept whole and
//! shared by reference with the replies that send them; values grown by
//! APPEND are kept with room to grow, so an append costs what it appends.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::packed::{record_len, PackedMap, MAX_RECORD};
use crate::error::{Error, Result};
use crate::printable::printable;

/// A stored value, shared rather than copied between readers.
pub(crate) type Value = Arc<[u8]>;

/// An entry too large to pack.
enum Large {
    /// Sent by reference, never copied.
    Shared(Value),
    /// Being grown by APPEND, with room to grow.
    Growing(Vec<u8>),
}

impl Large {
    fn bytes(&self) -> &[u8] {
        match self {
            Large::Shared(v) => v,
            Large::Growing(v) => v,
        }
    }
}

/// Values and queues by key. Keys are bytes, as on the wire; a key is in
/// `small` or in `large`, never both.
#[derive(Default)]
pub(crate) struct KvTable {
    small: PackedMap,
    large: HashMap<Box<[u8]>, Large>,
    queues: HashMap<Box<[u8]>, VecDeque<Value>>,
    /// Bytes stored: every value with its key, every queue element with
    /// its queue's key (what quotas count).
    stored_bytes: u64,
}

impl KvTable {
    pub(crate) fn set(&mut self, key: &[u8], value: Value) {
        let before = self.entry_len(key);
        self.stored_bytes = self.stored_bytes - before + (key.len() + value.len()) as u64;
        if record_len(key, &value) <= MAX_RECORD {
            self.large.remove(key);
            self.small.insert(key, &value);
            return;
        }
        self.small.remove(key);
        match self.large.get_mut(key) {
            Some(slot) => *slot = Large::Shared(value),
            None => {
                self.large.insert(key.into(), Large::Shared(value));
            }
        }
    }

    /// The value of `key` (shared when large, copied out when small or
    /// being appended to).
    pub(crate) fn get(&self, key: &[u8]) -> Option<Value> {
        if let Some(value) = self.small.get(key) {
            return Some(Value::from(value));
        }
        match self.large.get(key)? {
            Large::Shared(value) => Some(value.clone()),
            Large::Growing(value) => Some(Value::from(&value[..])),
        }
    }

    /// Bytes of `key` and its value (0 if it has none).
    fn entry_len(&self, key: &[u8]) -> u64 {
        self.bytes(key).map_or(0, |v| (key.len() + v.len()) as u64)
    }

    /// Bytes stored: values with their keys, queue elements with theirs.
    pub(crate) fn stored_bytes(&self) -> u64 {
        self.stored_bytes
    }

    /// The length of the value of `key`, if it holds one.
    pub(crate) fn value_len(&self, key: &[u8]) -> Option<usize> {
        self.bytes(key).map(<[u8]>::len)
    }

    /// The bytes of the value of `key`, wherever it is kept.
    fn bytes(&self, key: &[u8]) -> Option<&[u8]> {
        self.small
            .get(key)
            .or_else(|| self.large.get(key).map(Large::bytes))
    }

    /// Adds `delta` to the decimal integer at `key` (missing counts as 0).
    pub(crate) fn add(&mut self, key: &[u8], delta: i64) -> Result<i64> {
        let new = counter_after(key, self.bytes(key), delta)?;
        self.set(key, new.to_string().into_bytes().into());
        Ok(new)
    }

    /// PyTorch's COMPARE_SET; returns the reply value: what is stored
    /// after it (or `expected`, when the key is missing and stays so).
    pub(crate) fn compare_set(&mut self, key: &[u8], expected: &Value, desired: &Value) -> Value {
        if compare_set_swaps(self.bytes(key), expected) {
            self.set(key, desired.clone());
            return desired.clone();
        }
        self.get(key).unwrap_or_else(|| expected.clone())
    }

    pub(crate) fn delete(&mut self, key: &[u8]) -> bool {
        self.stored_bytes -= self.entry_len(key);
        self.small.remove(key) || self.large.remove(key).is_some()
    }

    /// Whether `key` holds a value or a non-empty queue.
    pub(crate) fn contains(&self, key: &[u8]) -> bool {
        self.small.contains(key)
            || self.large.contains_key(key)
            || self.queues.get(key).is_some_and(|q| !q.is_empty())
    }

    pub(crate) fn num_keys(&self) -> i64 {
        (self.small.len() + self.large.len()) as i64
    }

    /// Keys holding a value, plus keys holding a non-empty queue (a key
    /// holding both counts twice).
    pub(crate) fn num_keys_and_queues(&self) -> usize {
        self.small.len() + self.large.len() + self.queues.len()
    }

    /// Appends `suffix` to the value of `key` (creating it), refusing a
    /// result longer than `max_len`. Amortised: a value too large to pack
    /// grows in place.
    pub(crate) fn append(&mut self, key: &[u8], suffix: &[u8], max_len: usize) -> Result<()> {
        let existing = self.bytes(key).map(<[u8]>::len);
        let total = appended_len(key, existing.unwrap_or(0), suffix.len(), max_len)?;
        let no_memory =
            || Error::invalid_argument(format!("append: cannot allocate {total} bytes"));
        let added = if existing.is_none() {
            (key.len() + suffix.len()) as u64
        } else {
            suffix.len() as u64
        };
        if let Some(Large::Growing(grown)) = self.large.get_mut(key) {
            grown.try_reserve(suffix.len()).map_err(|_| no_memory())?;
            grown.extend_from_slice(suffix);
            self.stored_bytes += added;
            return Ok(());
        }
        let mut grown = Vec::new();
        grown.try_reserve_exact(total).map_err(|_| no_memory())?;
        grown.extend_from_slice(self.bytes(key).unwrap_or_default());
        grown.extend_from_slice(suffix);
        self.stored_bytes += added;
        if key.len() + total + 8 <= MAX_RECORD {
            self.small.insert(key, &grown);
            return Ok(());
        }
        self.small.remove(key);
        match self.large.get_mut(key) {
            Some(slot) => *slot = Large::Growing(grown),
            None => {
                self.large.insert(key.into(), Large::Growing(grown));
            }
        }
        Ok(())
    }

    pub(crate) fn queue_push(&mut self, key: &[u8], value: Value) {
        self.stored_bytes += (key.len() + value.len()) as u64;
        self.queues.entry(key.into()).or_default().push_back(value);
    }

    pub(crate) fn queue_pop(&mut self, key: &[u8]) -> Option<Value> {
        let queue = self.queues.get_mut(key)?;
        let value = queue.pop_front();
        if let Some(v) = &value {
            self.stored_bytes -= (key.len() + v.len()) as u64;
        }
        if queue.is_empty() {
            self.queues.remove(key);
        }
        value
    }

    pub(crate) fn queue_len(&self, key: &[u8]) -> i64 {
        self.queues.get(key).map_or(0, |q| q.len() as i64)
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.small.keys().chain(self.large.keys().map(|k| &**k))
    }

    /// Deletes every value and queue whose key starts with `prefix`;
    /// returns how many values it deleted (as DELETE_KEY counts).
    pub(crate) fn delete_prefix(&mut self, prefix: &[u8]) -> i64 {
        let keys: Vec<Vec<u8>> = self
            .keys()
            .filter(|key| key.starts_with(prefix))
            .map(<[u8]>::to_vec)
            .collect();
        let queues: Vec<Vec<u8>> = self
            .queues
            .keys()
            .filter(|key| key.starts_with(prefix))
            .map(|key| key.to_vec())
            .collect();
        for key in &queues {
            self.delete_queue(key);
        }
        keys.iter().filter(|key| self.delete(key)).count() as i64
    }

    /// Deletes the value and the queue of `key`.
    pub(crate) fn delete_all_of(&mut self, key: &[u8]) {
        self.delete(key);
        self.delete_queue(key);
    }

    fn delete_queue(&mut self, key: &[u8]) {
        if let Some(queue) = self.queues.remove(key) {
            let held: usize = queue.iter().map(|v| key.len() + v.len()).sum();
            self.stored_bytes -= held as u64;
        }
    }
}

/// Whether COMPARE_SET of `expected` stores its desired value over
/// `current` (PyTorch's semantics, for every store): when the value is
/// `expected`, or the key is missing and `expected` empty. Otherwise the
/// reply is the value as it is (`expected` for a missing key).
pub(crate) fn compare_set_swaps(current: Option<&[u8]>, expected: &[u8]) -> bool {
    current.map_or(expected.is_empty(), |value| value == expected)
}

/// The length of a value of `current_len` bytes after APPEND of
/// `suffix_len` more, refused past `max_len` (for every store).
pub(crate) fn appended_len(
    key: &[u8],
    current_len: usize,
    suffix_len: usize,
    max_len: usize,
) -> Result<usize> {
    let total = current_len.saturating_add(suffix_len);
    if total > max_len {
        return Err(Error::invalid_argument(format!(
            "append: the value of key '{}' would be {total} bytes, over the limit of {max_len}",
            printable(key),
        )));
    }
    Ok(total)
}

/// What ADD of `delta` makes of the counter at `key` whose value is
/// `current` (missing counts as 0): PyTorch's semantics, errors included,
/// for every store that keeps counters as decimal text.
pub(crate) fn counter_after(key: &[u8], current: Option<&[u8]>, delta: i64) -> Result<i64> {
    let current = current.map_or(Ok(0), |value| parse_counter(key, value))?;
    current.checked_add(delta).ok_or_else(|| {
        Error::invalid_argument(format!(
            "add: {current} + {delta} overflows a 64-bit counter at key '{}'",
            printable(key)
        ))
    })
}

fn parse_counter(key: &[u8], value: &[u8]) -> Result<i64> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.trim().parse::<i64>().ok())
        .ok_or_else(|| {
            Error::invalid_argument(format!(
                "add: the value of key '{}' is not an integer",
                printable(key)
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_set_cases() {
        let mut t = KvTable::default();
        let v = |b: &[u8]| Value::from(b);
        assert_eq!(t.compare_set(b"k", &v(b"x"), &v(b"y")), v(b"x"));
        assert!(t.get(b"k").is_none());
        assert_eq!(t.compare_set(b"k", &v(b""), &v(b"a")), v(b"a"));
        assert_eq!(t.compare_set(b"k", &v(b"zz"), &v(b"b")), v(b"a"));
        assert_eq!(t.compare_set(b"k", &v(b"a"), &v(b"b")), v(b"b"));
        t.append(b"k", b"c", 10).unwrap();
        assert_eq!(t.compare_set(b"k", &v(b"bc"), &v(b"d")), v(b"d"));
    }

    #[test]
    fn appends_grow_in_place_within_the_limit_and_behave_as_values() {
        let mut t = KvTable::default();
        t.set(b"a", Value::from(&b"1"[..]));
        for _ in 0..1000 {
            t.append(b"a", b"0", 2000).unwrap();
        }
        let value = t.get(b"a").unwrap();
        assert_eq!(value.len(), 1001);
        assert!(t.contains(b"a"));
        assert_eq!(t.num_keys(), 1);
        assert_eq!(t.keys().collect::<Vec<_>>(), vec![&b"a"[..]]);
        let err = t.append(b"a", &[0; 1000], 2000).unwrap_err();
        assert!(err.message().contains("over the limit of 2000"), "{err}");
        assert_eq!(
            t.get(b"a").unwrap().len(),
            1001,
            "a refused append changes nothing"
        );
        t.set(b"n", Value::from(&b"4"[..]));
        t.append(b"n", b"2", 10).unwrap();
        assert_eq!(t.add(b"n", 1).unwrap(), 43);
        assert_eq!(t.num_keys(), 2, "the counter is one key, wherever kept");
        assert!(t.delete(b"a"));
        assert!(!t.contains(b"a"));
        t.append(b"fresh", b"x", 10).unwrap();
        assert_eq!(&*t.get(b"fresh").unwrap(), b"x");
    }

    #[test]
    fn add_stores_decimal_text_and_rejects_non_integers() {
        let mut t = KvTable::default();
        assert_eq!(t.add(b"c", 5).unwrap(), 5);
        assert_eq!(&*t.get(b"c").unwrap(), b"5");
        assert_eq!(t.add(b"c", -7).unwrap(), -2);
        t.set(b"s", Value::from(&b"abc"[..]));
        assert!(t.add(b"s", 1).is_err());
        t.set(b"m", Value::from(i64::MAX.to_string().as_bytes()));
        assert!(t.add(b"m", 1).is_err());
    }

    #[test]
    fn values_move_between_packed_and_large_as_their_size_changes() {
        let mut t = KvTable::default();
        let big = Value::from(vec![1u8; MAX_RECORD]);
        t.set(b"k", Value::from(&b"small"[..]));
        t.set(b"k", big.clone());
        assert!(
            Arc::ptr_eq(&t.get(b"k").unwrap(), &big),
            "large values are shared"
        );
        assert_eq!(t.num_keys(), 1);
        t.set(b"k", Value::from(&b"small again"[..]));
        assert_eq!(&*t.get(b"k").unwrap(), b"small again");
        assert_eq!(t.num_keys(), 1);
        // Appends cross from packed to growing.
        for _ in 0..100 {
            t.append(b"k", &[7; 100], 1 << 20).unwrap();
        }
        assert_eq!(t.get(b"k").unwrap().len(), 11 + 100 * 100);
        assert_eq!(t.keys().count(), 1);
        assert!(t.delete(b"k"));
        assert!(!t.contains(b"k"));
    }

    #[test]
    fn stored_bytes_count_keys_values_and_queue_elements() {
        let mut t = KvTable::default();
        t.set(b"k", Value::from(&b"12345"[..]));
        assert_eq!(t.stored_bytes(), 6);
        t.set(b"k", Value::from(vec![0u8; MAX_RECORD]));
        assert_eq!(t.stored_bytes(), 1 + MAX_RECORD as u64, "large");
        t.set(b"k", Value::from(&b"1"[..]));
        t.append(b"k", b"23", 100).unwrap();
        assert_eq!(t.stored_bytes(), 4);
        t.append(b"new", b"", 100).unwrap();
        assert_eq!(t.stored_bytes(), 7, "an empty value still holds its key");
        t.append(b"new", b"ab", 100).unwrap();
        assert_eq!(t.stored_bytes(), 9);
        for _ in 0..50 {
            t.append(b"big", &[1; 100], 1 << 20).unwrap();
        }
        assert_eq!(t.stored_bytes(), 9 + 3 + 5000, "growing in place");
        assert_eq!(t.add(b"c", 10).unwrap(), 10);
        assert_eq!(t.stored_bytes(), 9 + 5003 + 3);
        t.queue_push(b"q", Value::from(&b"xy"[..]));
        assert_eq!(t.stored_bytes(), 5015 + 3);
        assert_eq!(t.num_keys_and_queues(), 5);
        t.queue_pop(b"q");
        for key in [&b"k"[..], b"new", b"big", b"c"] {
            assert!(t.delete(key));
        }
        assert_eq!(t.stored_bytes(), 0);
        assert_eq!(t.num_keys_and_queues(), 0);
    }

    #[test]
    fn queues_are_separate_from_values() {
        let mut t = KvTable::default();
        t.queue_push(b"q", Value::from(&b"1"[..]));
        assert!(t.contains(b"q"));
        assert_eq!(t.num_keys(), 0);
        assert!(!t.delete(b"q"));
        assert_eq!(t.queue_len(b"q"), 1);
        assert_eq!(&*t.queue_pop(b"q").unwrap(), b"1");
        assert!(!t.contains(b"q"));
        assert!(t.queue_pop(b"q").is_none());
    }
}
