//! The keys in this process's memory (PyTorch's TCPStore server): every
//! request completes at once.

use super::{Backend, Present, Report, Ticket, Usage};
use crate::error::{Error, Result};
use crate::store::kv::KvTable;
use crate::store::tcp::protocol::{Key, Outcome, Request};
use crate::store::tcp::server::state::ConnId;
use crate::store::tcp::server::waits::WaitId;

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
    fn apply(&mut self, _: ConnId, _: Ticket, request: &Request) -> Result<Option<Outcome>> {
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
            Request::ListPrefix { prefix } => Outcome::Keys(
                t.keys()
                    .filter(|key| key.starts_with(prefix))
                    .map(<[u8]>::to_vec)
                    .collect(),
            ),
            Request::DeletePrefix { prefix } => Outcome::Int(t.delete_prefix(prefix)),
            Request::Wait { .. } | Request::WaitGet { .. } => Outcome::Silent,
            _ => return Err(Error::internal("the backend was handed a session request")),
        };
        Ok(Some(outcome))
    }

    fn holds_leased_keys(&self) -> bool {
        true
    }

    fn delete_leased(&mut self, keys: Vec<Key>) {
        for key in keys {
            self.table.delete_all_of(&key);
        }
    }

    fn peek(&self, key: &[u8]) -> Option<Present> {
        match self.table.get(key) {
            Some(value) => Some(Present::Value(value)),
            None => self.table.contains(key).then_some(Present::Queued),
        }
    }

    /// Never asked: this backend never misses a write.
    fn look(&mut self, _: WaitId, _: Vec<Key>) {}

    fn take_reports(&mut self) -> Vec<Report> {
        Vec::new()
    }

    fn value_len(&self, key: &[u8]) -> Option<usize> {
        self.table.value_len(key)
    }

    fn holds_queue(&self, key: &[u8]) -> bool {
        self.table.queue_len(key) > 0
    }

    fn usage(&self) -> Usage {
        Usage {
            keys: self.table.num_keys_and_queues(),
            bytes: self.table.stored_bytes(),
        }
    }
}
