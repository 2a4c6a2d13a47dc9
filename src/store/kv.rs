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
    /// Values being grown by APPEND, with room to grow (a key is here or
    /// in `values`, never both): an append costs what it appends, not a
    /// copy of the whole value.
    appended: HashMap<Box<[u8]>, Vec<u8>>,
    queues: HashMap<Box<[u8]>, VecDeque<Value>>,
}

impl KvTable {
    pub(crate) fn set(&mut self, key: &[u8], value: Value) {
        // Replacing a value keeps the boxed key.
        match self.values.get_mut(key) {
            Some(slot) => *slot = value,
            None => {
                self.appended.remove(key);
                self.values.insert(key.into(), value);
            }
        }
    }

    /// The value of `key` (a value being appended to is copied out).
    pub(crate) fn get(&self, key: &[u8]) -> Option<Value> {
        match self.values.get(key) {
            Some(value) => Some(value.clone()),
            None => self.appended.get(key).map(|v| Value::from(&v[..])),
        }
    }

    /// The bytes of the value of `key`, wherever it is kept.
    fn bytes(&self, key: &[u8]) -> Option<&[u8]> {
        match self.values.get(key) {
            Some(value) => Some(value),
            None => self.appended.get(key).map(Vec::as_slice),
        }
    }

    /// Adds `delta` to the decimal integer at `key` (missing counts as 0).
    pub(crate) fn add(&mut self, key: &[u8], delta: i64) -> Result<i64> {
        let current = match self.bytes(key) {
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

    /// PyTorch's COMPARE_SET; returns the reply value: what is stored
    /// after it (or `expected`, when the key is missing and stays so).
    pub(crate) fn compare_set(&mut self, key: &[u8], expected: &Value, desired: &Value) -> Value {
        match self.bytes(key) {
            None if expected.is_empty() => {
                self.set(key, desired.clone());
                desired.clone()
            }
            None => expected.clone(),
            Some(current) if current == &expected[..] => {
                self.set(key, desired.clone());
                desired.clone()
            }
            Some(_) => self.get(key).unwrap_or_default(),
        }
    }

    pub(crate) fn delete(&mut self, key: &[u8]) -> bool {
        self.values.remove(key).is_some() || self.appended.remove(key).is_some()
    }

    /// Whether `key` holds a value or a non-empty queue.
    pub(crate) fn contains(&self, key: &[u8]) -> bool {
        self.values.contains_key(key)
            || self.appended.contains_key(key)
            || self.queues.get(key).is_some_and(|q| !q.is_empty())
    }

    pub(crate) fn num_keys(&self) -> i64 {
        (self.values.len() + self.appended.len()) as i64
    }

    /// Appends `suffix` to the value of `key` (creating it), refusing a
    /// result longer than `max_len`. Amortised: the value grows in place.
    pub(crate) fn append(&mut self, key: &[u8], suffix: &[u8], max_len: usize) -> Result<()> {
        let current = self.bytes(key).map_or(0, <[u8]>::len);
        if current.saturating_add(suffix.len()) > max_len {
            return Err(Error::invalid_argument(format!(
                "append: the value of key '{}' would be {} bytes, over the limit of {max_len}",
                String::from_utf8_lossy(key),
                current.saturating_add(suffix.len())
            )));
        }
        if let Some(grown) = self.appended.get_mut(key) {
            grown.extend_from_slice(suffix);
            return Ok(());
        }
        let mut grown = match self.values.remove_entry(key) {
            Some((key, value)) => (key, value.to_vec()),
            None => (key.into(), Vec::new()),
        };
        grown.1.reserve(suffix.len());
        grown.1.extend_from_slice(suffix);
        self.appended.insert(grown.0, grown.1);
        Ok(())
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
        self.values.keys().chain(self.appended.keys()).map(|k| &**k)
    }

    /// The arrival count of the barrier `key` (0 before anyone arrived).
    pub(crate) fn counter(&self, key: &[u8]) -> Result<i64> {
        self.bytes(key)
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
        assert_eq!(t.num_keys(), 2, "add moved the counter back, once");
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
