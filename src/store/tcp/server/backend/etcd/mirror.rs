//! A front-end's copy of its job's keys, kept by the stream of changes
//! from etcd: what it answers reads and waits from.

use std::collections::HashMap;

use crate::store::etcd::{Change, Element, Seen, Snapshot};
use crate::store::kv::Value;
use crate::store::tcp::protocol::{Key, Outcome, Request};
use crate::store::tcp::server::backend::{Present, Usage};

/// The job's keys as of `revision`, as etcd holds them: queues are the
/// elements etcd holds (by their ids), never a count of the changes seen,
/// so a change seen twice, or an element written again, leaves them
/// right.
#[derive(Default)]
pub(crate) struct Mirror {
    /// Each value, with the revision it last changed at.
    values: HashMap<Key, (Value, i64)>,
    /// The queues with elements, or known empty after `revision`.
    queues: HashMap<Key, Queue>,
    /// The revision of the last change applied.
    pub(crate) revision: i64,
    /// Bytes of the keys and values in `values`.
    value_bytes: u64,
}

/// A queue's elements as the mirror knows them.
#[derive(Default)]
struct Queue {
    /// The elements by id, with the revision each was created at.
    elements: HashMap<Vec<u8>, i64>,
    /// A pop found the queue empty at this revision: no element created at
    /// or before it exists any more, whatever changes are still to come.
    empty_at: i64,
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
        for (key, id, created) in snapshot.elements {
            mirror.add_element((key, id, created));
        }
        mirror
    }

    /// Applies the changes of one or more whole revisions, in revision
    /// order; changes at or before the revision already shown (a change
    /// stream that repeats itself) are skipped. Returns the keys written,
    /// with what they now hold, for the waits on them: a value set, a
    /// queue that got an element.
    pub(crate) fn apply(&mut self, changes: &[(Change, i64)]) -> Vec<(Key, Present)> {
        let shown = self.revision;
        let mut written = Vec::new();
        for (change, revision) in changes.iter().filter(|(_, r)| *r > shown) {
            self.revision = self.revision.max(*revision);
            match change {
                Change::Value {
                    key,
                    value: Some(v),
                } => {
                    self.value_bytes += (key.len() + v.len()) as u64;
                    if let Some((old, _)) = self.values.insert(key.clone(), (v.clone(), *revision))
                    {
                        self.value_bytes -= (key.len() + old.len()) as u64;
                    }
                    written.push((key.clone(), Present::Value(v.clone())));
                }
                Change::Value { key, value: None } => {
                    if let Some((old, _)) = self.values.remove(key) {
                        self.value_bytes -= (key.len() + old.len()) as u64;
                    }
                }
                Change::Element {
                    key,
                    id,
                    created: Some(created),
                } => {
                    if self.add_element((key.clone(), id.clone(), *created)) {
                        written.push((key.clone(), Present::Queued));
                    }
                }
                Change::Element {
                    key,
                    id,
                    created: None,
                } => {
                    if let Some(queue) = self.queues.get_mut(key) {
                        queue.elements.remove(id);
                    }
                    self.forget_if_empty(key);
                }
                // The backend's session view takes these.
                Change::Session(_) => {}
            }
        }
        written
    }

    /// Adds an element unless it is known gone; whether it is new.
    fn add_element(&mut self, (key, id, created): Element) -> bool {
        let queue = self.queues.entry(key).or_default();
        if created <= queue.empty_at {
            return false;
        }
        queue.elements.insert(id, created).is_none()
    }

    /// A pop found the queue `key` empty at `revision`: its elements
    /// created until then are gone, even those whose deletion the mirror
    /// has not seen yet (another server popped them). A blocking pop then
    /// waits for an element created after, instead of being told again
    /// and again of one that is gone.
    pub(crate) fn saw_empty(&mut self, key: &[u8], revision: i64) {
        if revision <= self.revision && !self.queues.contains_key(key) {
            return;
        }
        let queue = self.queues.entry(key.to_vec()).or_default();
        queue.empty_at = queue.empty_at.max(revision);
        queue.elements.retain(|_, created| *created > revision);
        self.forget_if_empty(key);
    }

    /// Forgets a queue with no element whose emptiness the changes
    /// applied already show.
    fn forget_if_empty(&mut self, key: &[u8]) {
        let shown = self.revision;
        if let Some(queue) = self.queues.get(key) {
            if queue.elements.is_empty() && queue.empty_at <= shown {
                self.queues.remove(key);
            }
        }
    }

    /// The number of elements of the queue `key`.
    fn queue_len(&self, key: &[u8]) -> usize {
        self.queues.get(key).map_or(0, |q| q.elements.len())
    }

    /// What `key` holds (None: it does not exist).
    pub(crate) fn peek(&self, key: &[u8]) -> Option<Present> {
        match self.values.get(key) {
            Some((value, _)) => Some(Present::Value(value.clone())),
            None => (self.queue_len(key) > 0).then_some(Present::Queued),
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
        let queues = self.queues.values().filter(|q| !q.elements.is_empty());
        Usage {
            keys: self.values.len() + queues.count(),
            bytes: self.value_bytes,
        }
    }

    /// Whether `key` holds a non-empty queue.
    pub(crate) fn holds_queue(&self, key: &[u8]) -> bool {
        self.queue_len(key) > 0
    }

    /// The length of the value of `key`, if it holds one.
    pub(crate) fn value_len(&self, key: &[u8]) -> Option<usize> {
        self.values.get(key).map(|(v, _)| v.len())
    }

    /// Answers a read (GET, MULTI_GET, CHECK, GETNUMKEYS, QUEUE_LEN,
    /// LIST_KEYS), or lets a WAIT or WAIT_GET start (`Silent`: the core
    /// runs it from [`Mirror::peek`]); None for any other request.
    pub(crate) fn read(&self, request: &Request) -> Option<Outcome> {
        let exists = |k: &Key| self.values.contains_key(k) || self.holds_queue(k);
        let value = |k: &Key| self.values.get(k).map(|(v, _)| v.clone());
        Some(match read_of(request)? {
            Read::Get(key) => Outcome::Values(vec![value(key)]),
            Read::MultiGet(keys) => Outcome::Values(keys.iter().map(value).collect()),
            Read::Check(keys) => Outcome::Ready(keys.iter().all(exists)),
            Read::NumKeys => Outcome::Int(self.values.len() as i64),
            Read::QueueLen(key) => Outcome::Int(self.queue_len(key) as i64),
            Read::ListKeys => Outcome::Keys(self.values.keys().cloned().collect()),
            Read::ListPrefix(prefix) => Outcome::Keys(
                self.values
                    .keys()
                    .filter(|key| key.starts_with(prefix))
                    .cloned()
                    .collect(),
            ),
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
    ListPrefix(&'a Key),
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
        Request::ListPrefix { prefix } => Read::ListPrefix(prefix),
        Request::Wait { .. } | Request::WaitGet { .. } => Read::Wait,
        _ => return None,
    })
}

/// Whether the mirror answers `request` (see [`Mirror::read`]).
pub(crate) fn is_read(request: &Request) -> bool {
    read_of(request).is_some()
}

#[cfg(test)]
mod tests;
