//! A front-end's copy of its job's keys, kept by the stream of changes
//! from etcd: what it answers reads and waits from.

use std::collections::HashMap;

use super::super::super::protocol::{Key, Request};
use super::super::backend::{Outcome, Present, Usage};
use crate::store::etcd::{Change, Seen, Snapshot};
use crate::store::kv::Value;

/// The job's keys as of `revision`.
#[derive(Default)]
pub(crate) struct Mirror {
    /// Each value, with the revision it last changed at.
    values: HashMap<Key, (Value, i64)>,
    /// Elements per non-empty queue.
    queues: HashMap<Key, i64>,
    /// The revision of the last change applied.
    pub(crate) revision: i64,
    /// Bytes of the keys and values in `values`.
    value_bytes: u64,
}

impl Mirror {
    /// The keys of `snapshot`.
    pub(crate) fn new(snapshot: Snapshot) -> Mirror {
        let mut mirror = Mirror {
            values: snapshot
                .values
                .into_iter()
                .map(|(key, value, changed)| (key, (value, changed)))
                .collect(),
            queues: HashMap::new(),
            revision: snapshot.revision,
            value_bytes: 0,
        };
        mirror.value_bytes = mirror
            .values
            .iter()
            .map(|(k, (v, _))| (k.len() + v.len()) as u64)
            .sum();
        for key in snapshot.elements {
            *mirror.queues.entry(key).or_default() += 1;
        }
        mirror
    }

    /// Applies `change`, made at `revision`.
    pub(crate) fn apply(&mut self, change: &Change, revision: i64) {
        self.revision = self.revision.max(revision);
        match change {
            Change::Value {
                key,
                value: Some(v),
            } => {
                self.value_bytes += (key.len() + v.len()) as u64;
                if let Some((old, _)) = self.values.insert(key.clone(), (v.clone(), revision)) {
                    self.value_bytes -= (key.len() + old.len()) as u64;
                }
            }
            Change::Value { key, value: None } => {
                if let Some((old, _)) = self.values.remove(key) {
                    self.value_bytes -= (key.len() + old.len()) as u64;
                }
            }
            Change::Element { key, added: true } => {
                *self.queues.entry(key.clone()).or_default() += 1
            }
            Change::Element { key, added: false } => {
                if let Some(n) = self.queues.get_mut(key) {
                    *n -= 1;
                    if *n <= 0 {
                        self.queues.remove(key);
                    }
                }
            }
        }
    }

    /// What `key` holds (None: it does not exist).
    pub(crate) fn peek(&self, key: &[u8]) -> Option<Present> {
        match self.values.get(key) {
            Some((value, _)) => Some(Present::Value(value.clone())),
            None => self.queues.contains_key(key).then_some(Present::Queued),
        }
    }

    /// What `key` holds and since when, as a read-modify-write's guess.
    pub(crate) fn seen(&self, key: &[u8]) -> Seen {
        self.values
            .get(key)
            .map_or_else(Seen::default, |(value, changed)| Seen {
                value: Some(value.clone()),
                mod_revision: *changed,
            })
    }

    /// Keys holding values or queues, and the bytes of the values with
    /// their keys (queue elements are not counted: the change stream does
    /// not carry their sizes).
    pub(crate) fn usage(&self) -> Usage {
        Usage {
            keys: self.values.len() + self.queues.len(),
            bytes: self.value_bytes,
        }
    }

    /// Whether `key` holds a non-empty queue.
    pub(crate) fn holds_queue(&self, key: &[u8]) -> bool {
        self.queues.contains_key(key)
    }

    /// The length of the value of `key`, if it holds one.
    pub(crate) fn value_len(&self, key: &[u8]) -> Option<usize> {
        self.values.get(key).map(|(v, _)| v.len())
    }

    /// Answers a read (GET, MULTI_GET, CHECK, GETNUMKEYS, QUEUE_LEN,
    /// LIST_KEYS), or lets a WAIT or WAIT_GET start (`Silent`: the core
    /// runs it from [`Mirror::peek`]); None for any other request.
    pub(crate) fn read(&self, request: &Request) -> Option<Outcome> {
        let exists = |k: &Key| self.values.contains_key(k) || self.queues.contains_key(k);
        let value = |k: &Key| self.values.get(k).map(|(v, _)| v.clone());
        Some(match read_of(request)? {
            Read::Get(key) => Outcome::Values(vec![value(key)]),
            Read::MultiGet(keys) => Outcome::Values(keys.iter().map(value).collect()),
            Read::Check(keys) => Outcome::Ready(keys.iter().all(exists)),
            Read::NumKeys => Outcome::Int(self.values.len() as i64),
            Read::QueueLen(key) => Outcome::Int(self.queues.get(key).copied().unwrap_or(0)),
            Read::ListKeys => Outcome::Keys(self.values.keys().cloned().collect()),
            Read::Wait => Outcome::Silent,
        })
    }
}

/// The requests the mirror answers, with what they read.
enum Read<'a> {
    Get(&'a Key),
    MultiGet(&'a [Key]),
    Check(&'a [Key]),
    NumKeys,
    QueueLen(&'a Key),
    ListKeys,
    /// WAIT or WAIT_GET, which the mirror lets start.
    Wait,
}

/// What `request` reads from the mirror; None if it is not a read. The
/// one list of reads: [`is_read`] and [`Mirror::read`] both go by it.
fn read_of(request: &Request) -> Option<Read<'_>> {
    Some(match request {
        Request::Get { key } => Read::Get(key),
        Request::MultiGet { keys } => Read::MultiGet(keys),
        Request::Check { keys } => Read::Check(keys),
        Request::GetNumKeys => Read::NumKeys,
        Request::QueueLen { key } => Read::QueueLen(key),
        Request::ListKeys => Read::ListKeys,
        Request::Wait { .. } | Request::WaitGet { .. } => Read::Wait,
        _ => return None,
    })
}

/// Whether the mirror answers `request` (see [`Mirror::read`]).
pub(crate) fn is_read(request: &Request) -> bool {
    read_of(request).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(key: &str, v: &str) -> Change {
        Change::Value {
            key: key.into(),
            value: Some(v.as_bytes().into()),
        }
    }

    #[test]
    fn follows_values_and_queue_lengths() {
        let mut m = Mirror::new(Snapshot {
            values: vec![(b"a".to_vec(), b"1".as_slice().into(), 4)],
            elements: vec![b"q".to_vec(), b"q".to_vec()],
            revision: 5,
        });
        assert_eq!(m.peek(b"q"), Some(Present::Queued));
        m.apply(&value("b", "2"), 6);
        m.apply(
            &Change::Value {
                key: b"a".to_vec(),
                value: None,
            },
            7,
        );
        for _ in 0..2 {
            m.apply(
                &Change::Element {
                    key: b"q".to_vec(),
                    added: false,
                },
                8,
            );
        }
        assert_eq!(m.revision, 8);
        assert_eq!(m.peek(b"a"), None);
        assert_eq!(m.peek(b"q"), None, "emptied");
        let get = Request::MultiGet {
            keys: vec![b"a".to_vec(), b"b".to_vec()],
        };
        assert_eq!(
            m.read(&get),
            Some(Outcome::Values(vec![None, Some(b"2".as_slice().into())]))
        );
        assert_eq!(m.read(&Request::GetNumKeys), Some(Outcome::Int(1)));
        assert!(!is_read(&Request::Add {
            key: b"a".to_vec(),
            delta: 1
        }));
        let b = Seen {
            value: Some(b"2".as_slice().into()),
            mod_revision: 6,
        };
        assert_eq!(m.seen(b"b"), b, "a read-modify-write's guess");
        assert_eq!(m.seen(b"a"), Seen::default());
        assert_eq!(m.usage(), Usage { keys: 1, bytes: 2 });
        m.apply(&value("b", "2345"), 9);
        assert_eq!(m.usage(), Usage { keys: 1, bytes: 5 }, "replaced");
        assert_eq!(m.value_len(b"b"), Some(4));
    }
}
