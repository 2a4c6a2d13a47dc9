//! The key-value table behind the in-process and network stores: PyTorch's
//! semantics for every operation, without any waiting (callers own locking
//! and wake-ups).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::error::{Error, Result};

/// A stored value, shared rather than copied between readers.
pub(crate) type Value = Arc<[u8]>;

/// Values and queues by key. Keys are bytes, as on the wire.
#[derive(Default)]
pub(crate) struct KvTable {
    /// Keys as boxed slices: 8 bytes less per entry than a `Vec`, which
    /// counts at 100k keys.
    values: HashMap<Box<[u8]>, Value>,
    queues: HashMap<Box<[u8]>, VecDeque<Value>>,
}

impl KvTable {
    pub(crate) fn set(&mut self, key: &[u8], value: Value) {
        self.values.insert(key.into(), value);
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<&Value> {
        self.values.get(key)
    }

    /// Adds `delta` to the decimal integer at `key` (missing counts as 0).
    pub(crate) fn add(&mut self, key: &[u8], delta: i64) -> Result<i64> {
        let current = match self.values.get(key) {
            Some(value) => parse_counter(key, value)?,
            None => 0,
        };
        let new = current.checked_add(delta).ok_or_else(|| {
            Error::invalid_argument(format!(
                "add: {current} + {delta} overflows a 64-bit counter at key '{}'",
                String::from_utf8_lossy(key)
            ))
        })?;
        self.set(key, new.to_string().into_bytes().into());
        Ok(new)
    }

    /// PyTorch's COMPARE_SET; returns the reply value and whether the key was
    /// written.
    pub(crate) fn compare_set(
        &mut self,
        key: &[u8],
        expected: &[u8],
        desired: &[u8],
    ) -> (Value, bool) {
        match self.values.get(key) {
            None if expected.is_empty() => {
                let value: Value = desired.into();
                self.set(key, value.clone());
                (value, true)
            }
            None => (expected.into(), false),
            Some(current) if **current == *expected => {
                let value: Value = desired.into();
                self.set(key, value.clone());
                (value, true)
            }
            Some(current) => (current.clone(), false),
        }
    }

    pub(crate) fn delete(&mut self, key: &[u8]) -> bool {
        self.values.remove(key).is_some()
    }

    /// Whether `key` holds a value or a non-empty queue.
    pub(crate) fn contains(&self, key: &[u8]) -> bool {
        self.values.contains_key(key) || self.queues.get(key).is_some_and(|q| !q.is_empty())
    }

    pub(crate) fn num_keys(&self) -> i64 {
        self.values.len() as i64
    }

    pub(crate) fn append(&mut self, key: &[u8], suffix: &[u8]) {
        let value: Value = match self.values.get(key) {
            Some(current) => [&current[..], suffix].concat().into(),
            None => suffix.into(),
        };
        self.set(key, value);
    }

    pub(crate) fn queue_push(&mut self, key: &[u8], value: Value) {
        self.queues.entry(key.into()).or_default().push_back(value);
    }

    pub(crate) fn queue_pop(&mut self, key: &[u8]) -> Option<Value> {
        let queue = self.queues.get_mut(key)?;
        let value = queue.pop_front();
        if queue.is_empty() {
            self.queues.remove(key);
        }
        value
    }

    pub(crate) fn queue_len(&self, key: &[u8]) -> i64 {
        self.queues.get(key).map_or(0, |q| q.len() as i64)
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.values.keys().map(|k| &**k)
    }

    /// The arrival count of the barrier `key` (0 before anyone arrived).
    pub(crate) fn counter(&self, key: &[u8]) -> Result<i64> {
        self.values
            .get(key)
            .map_or(Ok(0), |value| parse_counter(key, value))
    }
}

fn parse_counter(key: &[u8], value: &[u8]) -> Result<i64> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.trim().parse::<i64>().ok())
        .ok_or_else(|| {
            Error::invalid_argument(format!(
                "add: the value of key '{}' is not an integer",
                String::from_utf8_lossy(key)
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_set_cases() {
        let mut t = KvTable::default();
        assert_eq!(
            t.compare_set(b"k", b"x", b"y"),
            (Value::from(&b"x"[..]), false)
        );
        assert!(t.get(b"k").is_none());
        assert_eq!(
            t.compare_set(b"k", b"", b"a"),
            (Value::from(&b"a"[..]), true)
        );
        assert_eq!(
            t.compare_set(b"k", b"zz", b"b"),
            (Value::from(&b"a"[..]), false)
        );
        assert_eq!(
            t.compare_set(b"k", b"a", b"b"),
            (Value::from(&b"b"[..]), true)
        );
    }

    #[test]
    fn add_stores_decimal_text_and_rejects_non_integers() {
        let mut t = KvTable::default();
        assert_eq!(t.add(b"c", 5).unwrap(), 5);
        assert_eq!(&**t.get(b"c").unwrap(), b"5");
        assert_eq!(t.add(b"c", -7).unwrap(), -2);
        t.set(b"s", Value::from(&b"abc"[..]));
        assert!(t.add(b"s", 1).is_err());
        t.set(b"m", Value::from(i64::MAX.to_string().as_bytes()));
        assert!(t.add(b"m", 1).is_err());
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
