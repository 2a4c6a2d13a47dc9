//! Where a server keeps its keys: the backend behind the protocol core.
//!
//! The core hands a backend the requests that read or write data and gets
//! back an [`Outcome`] to encode as the reply. A backend may also complete
//! a request later (a remote store): it answers `Ok(None)`, and whoever
//! drives the core reports the outcome with
//! [`ServerCore::complete`](super::state::ServerCore::complete); that
//! connection's next requests wait meanwhile. Waits and barriers are the
//! core's own, resolved against the backend's view of which keys exist.

use super::super::protocol::{Key, Request};
use crate::error::{Error, Result};
use crate::store::kv::{KvTable, Value};

/// What a data request produced, before it is encoded as a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// No reply (SET, APPEND, MULTI_SET, QUEUE_PUSH).
    Silent,
    /// A byte string (COMPARE_SET).
    Value(Value),
    /// A byte string per key, empty where missing (GET, MULTI_GET).
    Values(Vec<Option<Value>>),
    /// An `i64` (ADD, GETNUMKEYS, DELETE_KEY, QUEUE_LEN).
    Int(i64),
    /// CHECK's answer: every key exists.
    Ready(bool),
    /// QUEUE_POP: the length before the pop, and the value if there was one.
    Popped { before: i64, value: Option<Value> },
    /// LIST_KEYS.
    Keys(Vec<Key>),
}

/// A store of keys for the protocol core.
pub(crate) trait Backend: Send {
    /// Applies a data request (SET, GET, ADD, ...); `Ok(None)`: the outcome
    /// comes later. An error refuses the request (ADD to a non-integer, a
    /// value over the limit).
    fn apply(&mut self, request: &Request) -> Result<Option<Outcome>>;

    /// Whether `key` holds a value or a non-empty queue (what WAIT waits
    /// for).
    fn contains(&self, key: &[u8]) -> bool;

    /// The value of `key`.
    fn value(&self, key: &[u8]) -> Option<Value>;

    /// The integer at `key` (a barrier's arrivals), if it holds one.
    fn counter(&self, key: &[u8]) -> Option<i64>;

    /// Keys holding values.
    fn num_keys(&self) -> usize;
}

/// Keys in this process's memory.
pub(crate) struct MemoryBackend {
    table: KvTable,
    max_value_len: usize,
}

impl MemoryBackend {
    /// An empty store whose values (APPEND's results included) stay within
    /// `max_value_len`.
    pub(crate) fn new(max_value_len: usize) -> MemoryBackend {
        MemoryBackend {
            table: KvTable::default(),
            max_value_len,
        }
    }
}

impl Backend for MemoryBackend {
    fn apply(&mut self, request: &Request) -> Result<Option<Outcome>> {
        let t = &mut self.table;
        let outcome = match request {
            Request::Set { key, value } => {
                t.set(key, value.clone());
                Outcome::Silent
            }
            Request::QueuePush { key, value } => {
                t.queue_push(key, value.clone());
                Outcome::Silent
            }
            Request::CompareSet {
                key,
                expected,
                desired,
            } => Outcome::Value(t.compare_set(key, expected, desired)),
            Request::Get { key } => Outcome::Values(vec![t.get(key)]),
            Request::MultiGet { keys } => Outcome::Values(keys.iter().map(|k| t.get(k)).collect()),
            Request::Add { key, delta } => Outcome::Int(t.add(key, *delta)?),
            Request::Check { keys } => Outcome::Ready(keys.iter().all(|k| t.contains(k))),
            Request::GetNumKeys => Outcome::Int(t.num_keys()),
            Request::DeleteKey { key } => Outcome::Int(i64::from(t.delete(key))),
            Request::Append { key, value } => {
                t.append(key, value, self.max_value_len)?;
                Outcome::Silent
            }
            Request::MultiSet { pairs } => {
                for (key, value) in pairs {
                    t.set(key, value.clone());
                }
                Outcome::Silent
            }
            Request::QueuePop { key } => Outcome::Popped {
                before: t.queue_len(key),
                value: t.queue_pop(key),
            },
            Request::QueueLen { key } => Outcome::Int(t.queue_len(key)),
            Request::ListKeys => Outcome::Keys(t.keys().map(<[u8]>::to_vec).collect()),
            _ => return Err(Error::internal("the backend was handed a session request")),
        };
        Ok(Some(outcome))
    }

    fn contains(&self, key: &[u8]) -> bool {
        self.table.contains(key)
    }

    fn value(&self, key: &[u8]) -> Option<Value> {
        self.table.get(key)
    }

    fn counter(&self, key: &[u8]) -> Option<i64> {
        self.table.counter(key).ok()
    }

    fn num_keys(&self) -> usize {
        self.table.num_keys() as usize
    }
}
