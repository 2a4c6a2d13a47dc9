//! What a `distcore serve --backend etcd://...` front-end asks of etcd (see
//! [`crate::store::tcp::server`]): its writes, made with the same etcd
//! operations as the Store methods and answered with the revision they
//! made; a snapshot of the job's keys; and the stream of every change
//! after it. The front-end answers reads and waits from a mirror of the
//! job's keys that the snapshot starts and the stream keeps up to date.

use std::time::Instant;

use super::client::{Read, Resend, WatchEnd};
use super::sessions::SessionChange;
use super::{EtcdStore, Seen, CLOCKS, QUEUES, VALUES};
use crate::error::{Error, Result};
use crate::store::kv::Value;
use crate::store::tcp::protocol::{Key, Outcome, Request};

/// A change to the job's keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// `key` now holds `value` (None: deleted).
    Value { key: Key, value: Option<Value> },
    /// The element `id` of the queue `key` exists, created at `created`
    /// (None: it was deleted).
    Element {
        key: Key,
        id: Vec<u8>,
        created: Option<i64>,
    },
    /// A liveness session's key changed (`super::sessions`).
    Session(SessionChange),
}

/// A queue element: its queue, its id and the revision it was created at.
pub(crate) type Element = (Key, Vec<u8>, i64);

/// The job's keys at one revision.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    /// Each key, its value and the revision it last changed at.
    pub values: Vec<(Key, Value, i64)>,
    /// Every queue element.
    pub elements: Vec<Element>,
    /// Every liveness session's key, as changes from nothing.
    pub sessions: Vec<SessionChange>,
    pub revision: i64,
}

impl EtcdStore {
    /// Makes a write (SET, ADD, COMPARE_SET, DELETE_KEY, APPEND, MULTI_SET,
    /// QUEUE_PUSH, QUEUE_POP, DELETE_PREFIX), exactly once; values, APPEND's results
    /// included, stay within `max_value_len`; `guess`: what each key the
    /// write names is believed to hold (saves a read when right, costs one
    /// when wrong). Returns the outcome and a revision at or after the
    /// change it made, which the front-end's mirror shows once it has
    /// caught up with it (0: nothing changed), or for a pop that found the
    /// queue empty, the revision it was found empty at.
    pub(crate) fn write(
        &self,
        request: &Request,
        max_value_len: usize,
        guess: Option<Vec<Seen>>,
    ) -> Result<(Outcome, i64)> {
        let deadline = self.deadline(None);
        let first = || guess.clone().and_then(|g| g.into_iter().next());
        Ok(match request {
            Request::Set { key, value } => (Outcome::Silent, self.set_value(key, value, first())?),
            Request::Add { key, delta } => {
                let (now, revision) = self.add_to(key, *delta, first())?;
                (Outcome::Int(now), revision)
            }
            Request::CompareSet {
                key,
                expected,
                desired,
            } => {
                let (value, revision) = self.compare_and_set(key, expected, desired, first())?;
                (Outcome::Value(value.into()), revision)
            }
            Request::DeleteKey { key } => {
                let (deleted, revision) = self.delete_value(key, first())?;
                (Outcome::Int(deleted.into()), revision)
            }
            Request::Append { key, value } => (
                Outcome::Silent,
                self.append_to(key, value, max_value_len, first())?,
            ),
            Request::MultiSet { pairs } => {
                let pairs: Vec<(&[u8], &[u8])> =
                    pairs.iter().map(|(k, v)| (&k[..], &v[..])).collect();
                (Outcome::Silent, self.write_values(&pairs, guess, deadline)?)
            }
            Request::QueuePush { key, value } => (Outcome::Silent, self.push(key, value)?),
            Request::DeletePrefix { prefix } => {
                let (deleted, revision) = self.delete_under(prefix)?;
                (Outcome::Int(deleted), revision)
            }
            Request::QueuePop { key } => {
                let pop = self.try_pop(key, deadline)?;
                let revision = match pop.value {
                    Some(_) => pop.written,
                    None => pop.revision,
                };
                let outcome = Outcome::Popped {
                    before: pop.before,
                    value: pop.value.map(Into::into),
                };
                (outcome, revision)
            }
            _ => {
                return Err(Error::internal(
                    "etcd was handed a request that is not a write",
                ))
            }
        })
    }

    /// Every value and queue element of the job, at one revision.
    pub(crate) fn snapshot(&self) -> Result<Snapshot> {
        let deadline = self.deadline(None);
        let values = [&self.prefix[..], VALUES].concat();
        let queues = [&self.prefix[..], QUEUES].concat();
        let read = |key: &[u8], read| super::Op::Range {
            key: key.to_vec(),
            prefix: true,
            read,
        };
        let mut ops = vec![read(&values, Read::Values), read(&queues, Read::Keys)];
        ops.extend(self.session_reads());
        let result = self.client.txn(&[], &ops, &[], Resend::Safe, deadline)?;
        let [stored, elements, sessions @ ..] = &result.ranges[..] else {
            return Err(Error::new(
                crate::error::Status::Protocol,
                "etcd answered a transaction of reads with fewer",
            ));
        };
        let sessions = sessions.iter().flat_map(|range| &range.kvs);
        Ok(Snapshot {
            // Keys outside the range asked for (etcd never sends them) are
            // skipped rather than trusted.
            values: stored
                .kvs
                .iter()
                .filter_map(|kv| {
                    let key = kv.key.strip_prefix(&values[..])?.to_vec();
                    Some((key, kv.value.clone().into(), kv.mod_revision))
                })
                .collect(),
            elements: elements
                .kvs
                .iter()
                .filter_map(|kv| {
                    let (key, id) = split_element(kv.key.strip_prefix(&queues[..])?);
                    Some((key, id, kv.create_revision))
                })
                .collect(),
            sessions: sessions
                .filter_map(|kv| self.session_change(kv, false))
                .collect(),
            revision: result.revision,
        })
    }

    /// Hands the changes to the job's keys from revision `*next` on to
    /// `on_changes`, each with its revision, whole revisions at a time (a
    /// transaction's writes together), until `deadline` or `on_changes`
    /// answers false; `*next` follows, for the next call. `Canceled`: etcd
    /// no longer has the changes from `*next` (compacted): take a snapshot.
    /// The clocks' revisions are remembered as the guesses of the next
    /// writes.
    pub(crate) fn watch_changes(
        &self,
        next: &mut i64,
        deadline: Instant,
        mut on_changes: impl FnMut(Vec<(Change, i64)>) -> bool,
    ) -> Result<WatchEnd> {
        let values = [&self.prefix[..], VALUES].concat();
        let queues = [&self.prefix[..], QUEUES].concat();
        let clocks = [&self.prefix[..], CLOCKS].concat();
        let all = [&self.prefix[..], b"/"].concat();
        self.client
            .watch(&[(all, true)], *next, true, deadline, |events| {
                let mut changes = Vec::with_capacity(events.len());
                for event in events {
                    let revision = event.kv.mod_revision;
                    *next = (*next).max(revision + 1);
                    let key = &event.kv.key;
                    let change = if let Some(key) = key.strip_prefix(&values[..]) {
                        Change::Value {
                            key: key.to_vec(),
                            value: (!event.deleted).then(|| event.kv.value.into()),
                        }
                    } else if let Some(element) = key.strip_prefix(&queues[..]) {
                        let (key, id) = split_element(element);
                        Change::Element {
                            key,
                            id,
                            created: (!event.deleted).then_some(event.kv.create_revision),
                        }
                    } else if let Some(change) = self.session_change(&event.kv, event.deleted) {
                        Change::Session(change)
                    } else {
                        if key.starts_with(&clocks) && !event.deleted {
                            self.remembered.set(key, revision, true);
                        }
                        continue; // a clock or a commit token
                    };
                    changes.push((change, revision));
                }
                changes.is_empty() || on_changes(changes)
            })
    }
}

/// The queue and the id of an element `<key>\xff<id>` (ids have no \xff).
pub(super) fn split_element(element: &[u8]) -> (Key, Vec<u8>) {
    let end = element
        .iter()
        .rposition(|b| *b == 0xff)
        .unwrap_or(element.len());
    let id = element.get(end + 1..).unwrap_or_default();
    (element[..end].to_vec(), id.to_vec())
}
