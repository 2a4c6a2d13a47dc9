//! TCPStore requests on etcd, for a `distcore serve --backend etcd://...`
//! front-end (see [`crate::store::tcp::server`]): each data request as the
//! same etcd operations the Store methods use, the look-ups that waits
//! start with, and the stream of every write under the prefix that ends
//! them.

use std::time::Instant;

use super::client::{Read, WatchEnd};
use super::{EtcdStore, MAX_TXN_OPS, QUEUES, VALUES};
use crate::error::{Error, Result};
use crate::store::tcp::protocol::{Key, Request};
use crate::store::tcp::server::backend::{Outcome, Present};

impl EtcdStore {
    /// Runs a data request (not a session request: VALIDATE, PING, WAIT,
    /// CANCEL_WAIT, BARRIER and WAIT_GET are the front-end's own); values,
    /// APPEND's results included, stay within `max_value_len`.
    pub(crate) fn execute(&self, request: &Request, max_value_len: usize) -> Result<Outcome> {
        let deadline = self.deadline(None);
        let owned = |v: Option<Vec<u8>>| v.map(Into::into);
        Ok(match request {
            Request::Set { key, value } => {
                self.client.put(&self.value_key(key), value, deadline)?;
                Outcome::Silent
            }
            Request::Get { key } => Outcome::Values(
                self.read_values(&[key], deadline)?
                    .into_iter()
                    .map(owned)
                    .collect(),
            ),
            Request::MultiGet { keys } => {
                let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
                Outcome::Values(
                    self.read_values(&keys, deadline)?
                        .into_iter()
                        .map(owned)
                        .collect(),
                )
            }
            Request::Add { key, delta } => Outcome::Int(self.add_to(key, *delta)?),
            Request::CompareSet {
                key,
                expected,
                desired,
            } => Outcome::Value(self.compare_and_set(key, expected, desired)?.into()),
            Request::Check { keys } => {
                let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
                let (present, _) = self.presence(&keys, deadline)?;
                Outcome::Ready(present.into_iter().all(|p| p))
            }
            Request::GetNumKeys => {
                let values = [&self.prefix[..], VALUES].concat();
                Outcome::Int(
                    self.client
                        .range(&values, true, Read::Count, deadline)?
                        .count,
                )
            }
            Request::DeleteKey { key } => {
                Outcome::Int(self.client.delete(&self.value_key(key), false, deadline)?)
            }
            Request::Append { key, value } => {
                self.append_to(key, value, max_value_len)?;
                Outcome::Silent
            }
            Request::MultiSet { pairs } => {
                let pairs: Vec<(&[u8], &[u8])> =
                    pairs.iter().map(|(k, v)| (&k[..], &v[..])).collect();
                self.write_values(&pairs, deadline)?;
                Outcome::Silent
            }
            Request::QueuePush { key, value } => {
                let element = [self.queue_prefix(key), super::element_id()].concat();
                self.client.put(&element, value, deadline)?;
                Outcome::Silent
            }
            Request::QueuePop { key } => {
                let pop = self.try_pop(key, deadline)?;
                Outcome::Popped {
                    before: pop.before,
                    value: owned(pop.value),
                }
            }
            Request::QueueLen { key } => Outcome::Int(
                self.client
                    .range(&self.queue_prefix(key), true, Read::Count, deadline)?
                    .count,
            ),
            Request::ListKeys => Outcome::Keys(self.value_keys(deadline)?),
            _ => return Err(Error::internal("etcd was handed a session request")),
        })
    }

    /// Which of `keys` exist now, and how: the value, or a non-empty queue
    /// (MAX_TXN_OPS / 2 keys per transaction).
    pub(crate) fn look(&self, keys: &[Key]) -> Result<Vec<(Key, Present)>> {
        let deadline = self.deadline(None);
        let mut found = Vec::new();
        for chunk in keys.chunks(MAX_TXN_OPS / 2) {
            let ops: Vec<super::Op> = chunk
                .iter()
                .flat_map(|key| {
                    [
                        super::Op::Range {
                            key: self.value_key(key),
                            prefix: false,
                            read: Read::Values,
                        },
                        super::Op::Range {
                            key: self.queue_prefix(key),
                            prefix: true,
                            read: Read::Count,
                        },
                    ]
                })
                .collect();
            let ranges = self.client.txn(&[], &ops, &[], deadline)?.ranges;
            for (key, pair) in chunk.iter().zip(ranges.chunks(2)) {
                let [value, queue] = pair else {
                    return Err(Error::new(
                        crate::error::Status::Protocol,
                        "etcd answered a transaction with fewer reads than it had",
                    ));
                };
                if let Some(kv) = value.kvs.first() {
                    found.push((key.clone(), Present::Value(kv.value.clone().into())));
                } else if queue.count > 0 {
                    found.push((key.clone(), Present::Queued));
                }
            }
        }
        Ok(found)
    }

    /// The cluster's current revision.
    pub(crate) fn revision(&self) -> Result<i64> {
        Ok(self
            .client
            .range(
                &self.value_key(b""),
                false,
                Read::Count,
                self.deadline(None),
            )?
            .revision)
    }

    /// Hands every value and queue element written under the prefix from
    /// revision `*next` on to `on_write` (the store's key and what it now
    /// holds), until `deadline` or `on_write` answers false; `*next`
    /// follows, for the next call. `Canceled`: etcd no longer has the
    /// writes from `*next` (compacted), some may be missed.
    pub(crate) fn watch_writes(
        &self,
        next: &mut i64,
        deadline: Instant,
        mut on_write: impl FnMut(Key, Present) -> bool,
    ) -> Result<WatchEnd> {
        let values = [&self.prefix[..], VALUES].concat();
        let queues = [&self.prefix[..], QUEUES].concat();
        let ranges = [(values.clone(), true), (queues.clone(), true)];
        self.client.watch_puts(&ranges, *next, deadline, |kv| {
            *next = (*next).max(kv.mod_revision + 1);
            if let Some(key) = kv.key.strip_prefix(&values[..]) {
                on_write(key.to_vec(), Present::Value(kv.value.into()))
            } else if let Some(element) = kv.key.strip_prefix(&queues[..]) {
                // <key>\xff<id>: the id has no \xff.
                let end = element
                    .iter()
                    .rposition(|b| *b == 0xff)
                    .unwrap_or(element.len());
                on_write(element[..end].to_vec(), Present::Queued)
            } else {
                true
            }
        })
    }
}
