//! EtcdStore: PyTorch's Store on etcd's v3 API, so that a job's rendezvous
//! state lives in a replicated cluster instead of one process.
//!
//! Layout, under the job's prefix `P` (many jobs share one cluster):
//! - `P/v/<key>`: the value of `key`;
//! - `P/q/<key>\xff<id>`: the elements of the queue `key`, in the order of
//!   their creation revision (`\xff` never occurs in a UTF-8 key, so one
//!   queue's range holds no other queue's elements);
//! - `P/c/v`, `P/c/q/<key>`: clocks whose revision every deletion of a
//!   value, and every pop of the queue `key`, moves;
//! - `P/t/<id>`: commit tokens;
//! - `P/m/...`, `P/s/...`, `P/f/...`: liveness sessions, the front-ends'
//!   and the handles' own (`sessions.rs`, `membership.rs`).
//!
//! Every write is a transaction comparing the revisions of what it writes
//! (and, when it creates a key, of the clock), so that it applies exactly
//! once and never after a later write, whatever is resent (`guarded.rs`);
//! read-modify-writes decide on the values read. Waits read, then watch
//! from the revision after that read: no polling, and no write between the
//! read and the watch is missed.

mod client;
mod guarded;
mod membership;
mod recoverable;
mod requests;
mod sessions;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

pub(crate) use self::client::WatchEnd;
use self::client::{Client, Compare, Op, Read, Resend, Watched};
use self::guarded::{Committed, Remembered, Target, Write, MAX_KEYS_PER_WRITE};
use self::requests::split_element;
pub(crate) use self::requests::{Change, Element, Snapshot};
pub(crate) use self::sessions::{Ended, HeldSession, MemberRecord, SessionChange};
use super::{check_multi_set_lengths, wait_timeout_error, Store};
use crate::error::{Error, Result, Status};
use crate::runtime::timeout::DEFAULT_STORE_TIMEOUT;
use crate::store::kv::{appended_len, compare_set_swaps, counter_after};

/// How an EtcdStore reaches its cluster.
#[derive(Debug, Clone)]
pub struct EtcdStoreOptions {
    /// The members' client URLs or `host:port`s; a member that is down is
    /// skipped.
    pub endpoints: Vec<String>,
    /// The job's prefix: every key of the store lives under it.
    pub prefix: String,
    /// The timeout of every operation (zero: forever).
    pub timeout: Duration,
}

impl Default for EtcdStoreOptions {
    fn default() -> Self {
        EtcdStoreOptions {
            endpoints: vec!["127.0.0.1:2379".into()],
            prefix: "/distcore".into(),
            timeout: DEFAULT_STORE_TIMEOUT,
        }
    }
}

impl EtcdStoreOptions {
    /// Options from `etcd://HOST:PORT[,HOST:PORT...]/PREFIX` (the prefix
    /// may be empty: "/"), with the default timeout.
    pub fn from_url(url: &str) -> Result<EtcdStoreOptions> {
        let bad = |why: &str| {
            Error::invalid_argument(format!(
                "'{url}': {why} (expected etcd://HOST:PORT[,HOST:PORT...]/PREFIX)"
            ))
        };
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("not an etcd:// URL"))?;
        let (hosts, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
            .collect();
        if endpoints.is_empty() {
            return Err(bad("no endpoint"));
        }
        Ok(EtcdStoreOptions {
            endpoints,
            prefix: format!("/{prefix}"),
            ..EtcdStoreOptions::default()
        })
    }
}

/// A store whose keys live in an etcd cluster. Thread-safe; every handle
/// (and clone) on the same endpoints and prefix sees the same keys, from
/// any process.
pub struct EtcdStore {
    client: Arc<Client>,
    prefix: Vec<u8>,
    timeout: Mutex<Duration>,
    /// Commit tokens no longer needed, deleted by the next transaction
    /// (see [`EtcdStore::commit`]); never held across a request. Shared
    /// with the handle's leased views.
    stale_tokens: Arc<Mutex<Vec<Vec<u8>>>>,
    /// The revisions of values and clocks last seen: guesses for writes.
    remembered: Arc<Remembered>,
    /// The etcd lease its writes attach the keys they put to (0: none):
    /// see [`EtcdStore::with_lease`].
    lease: i64,
    /// Its liveness session, if it has one (shared with its leased views).
    session: membership::SessionSlot,
}

/// A key's value and the revision it last changed at (0: missing), as
/// someone saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Seen {
    /// Shared with the mirror it may come from, not copied.
    pub value: Option<crate::store::kv::Value>,
    pub mod_revision: i64,
}

impl Seen {
    fn of(kv: Option<client::Kv>) -> Seen {
        kv.map_or_else(Seen::default, |kv| Seen {
            value: Some(kv.value.into()),
            mod_revision: kv.mod_revision,
        })
    }
}

/// What [`EtcdStore::try_pop`] found.
struct Pop {
    /// The queue's length before the pop.
    before: i64,
    /// The element popped; None: the queue was empty.
    value: Option<Vec<u8>>,
    /// The revision the queue was read at.
    revision: i64,
    /// The revision of the delete (0: none).
    written: i64,
}

/// Where values live under the prefix.
const VALUES: &[u8] = b"/v/";
/// Where queue elements live under the prefix.
const QUEUES: &[u8] = b"/q/";
/// Where the clocks live under the prefix.
const CLOCKS: &[u8] = b"/c/";
/// Where commit tokens live under the prefix.
const TOKENS: &[u8] = b"/t/";

/// etcd's limit on the operations of one transaction (`--max-txn-ops`,
/// 128 by default), which reads of many keys stay within.
const MAX_TXN_OPS: usize = 128;

/// Stale commit tokens one transaction deletes, at most.
const MAX_CLEANUP_OPS: usize = 16;

/// "Forever", as a deadline.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl EtcdStore {
    /// A handle on the keys under `options.prefix` of the cluster at
    /// `options.endpoints`; checks that a member answers (within the
    /// timeout).
    pub fn new(options: EtcdStoreOptions) -> Result<EtcdStore> {
        let store = EtcdStore::on(
            Arc::new(Client::new(&options.endpoints)?),
            options.prefix.trim_end_matches('/').as_bytes().to_vec(),
            options.timeout,
        );
        store
            .client
            .range(
                &store.value_key(b""),
                false,
                Read::Count,
                store.deadline(None),
            )
            .map_err(|e| {
                Error::new(
                    e.status(),
                    format!(
                        "no etcd member of {} answered: {}",
                        store.client.endpoints().join(","),
                        e.message()
                    ),
                )
            })?;
        Ok(store)
    }

    fn on(client: Arc<Client>, prefix: Vec<u8>, timeout: Duration) -> EtcdStore {
        EtcdStore {
            client,
            prefix,
            timeout: Mutex::new(timeout),
            stale_tokens: Arc::default(),
            remembered: Arc::default(),
            lease: 0,
            session: Arc::default(),
        }
    }

    /// A view of this handle whose writes attach the keys they put
    /// (values, queue elements) to the etcd lease `lease`: etcd deletes
    /// them when the lease ends. Shares the handle's client and guesses.
    pub(crate) fn with_lease(&self, lease: i64) -> EtcdStore {
        EtcdStore {
            client: self.client.clone(),
            prefix: self.prefix.clone(),
            timeout: Mutex::new(*self.timeout.lock()),
            stale_tokens: self.stale_tokens.clone(),
            remembered: self.remembered.clone(),
            lease,
            session: self.session.clone(),
        }
    }

    /// Deletes every key of this store (everything under its prefix), for
    /// a job that is over: not while others still write to it (a write
    /// still on its way may be applied after it). Sent again only if it
    /// never reached a member. Returns how many etcd keys went.
    pub fn delete_all(&self) -> Result<i64> {
        let all = [&self.prefix[..], b"/"].concat();
        self.client.delete_prefix(&all, self.deadline(None))
    }

    fn deadline(&self, timeout: Option<Duration>) -> Instant {
        let timeout = timeout.unwrap_or_else(|| *self.timeout.lock());
        Instant::now() + if timeout.is_zero() { FOREVER } else { timeout }
    }

    fn value_key(&self, key: &[u8]) -> Vec<u8> {
        [&self.prefix[..], VALUES, key].concat()
    }

    fn queue_prefix(&self, key: &[u8]) -> Vec<u8> {
        [&self.prefix[..], QUEUES, key, b"\xff"].concat()
    }

    /// The guarded write of the values of `keys`; `values`: whether it
    /// needs them (a read-modify-write).
    fn values_target(&self, keys: &[&[u8]], values: bool) -> Target {
        Target {
            keys: keys.iter().map(|key| self.value_key(key)).collect(),
            clock: [&self.prefix[..], CLOCKS, b"v"].concat(),
            values,
            lease: self.lease,
        }
    }

    /// The clock every pop of the queue `key` moves.
    fn queue_clock(&self, key: &[u8]) -> Vec<u8> {
        [&self.prefix[..], CLOCKS, b"q/", key].concat()
    }

    /// Applies `change` to the value of `key` (None: missing), exactly
    /// once, on the value as it was when written; returns what `change`
    /// returned, and the revision of the write (0 when `change` wrote
    /// nothing). `guess`: what the caller believes the key holds (a
    /// front-end's mirror), tried first, saving the read.
    fn read_modify_write<T>(
        &self,
        key: &[u8],
        guess: Option<Seen>,
        mut change: impl FnMut(Option<&[u8]>) -> Result<(Option<Vec<u8>>, T)>,
    ) -> Result<(T, i64)> {
        let target = self.values_target(&[key], true);
        self.guarded_write(
            &target,
            guess.map(|g| vec![g]),
            self.deadline(None),
            |seen| {
                let (write, answer) = change(seen[0].value.as_deref())?;
                Ok((vec![write.map(Write::Put)], answer))
            },
        )
    }

    /// Whether each key exists (a value or a non-empty queue), and a
    /// revision at or before which they were read (transactions of at most
    /// MAX_TXN_OPS reads each).
    fn presence(&self, keys: &[&[u8]], deadline: Instant) -> Result<(Vec<bool>, i64)> {
        let mut present = Vec::with_capacity(keys.len());
        let mut revision = i64::MAX;
        for chunk in keys.chunks(MAX_TXN_OPS / 2) {
            let (p, r) = self.presence_at_once(chunk, deadline)?;
            present.extend(p);
            revision = revision.min(r);
        }
        Ok((present, if keys.is_empty() { 0 } else { revision }))
    }

    fn presence_at_once(&self, keys: &[&[u8]], deadline: Instant) -> Result<(Vec<bool>, i64)> {
        let ops: Vec<Op> = keys
            .iter()
            .flat_map(|key| {
                [
                    Op::Range {
                        key: self.value_key(key),
                        prefix: false,
                        read: Read::Count,
                    },
                    Op::Range {
                        key: self.queue_prefix(key),
                        prefix: true,
                        read: Read::Count,
                    },
                ]
            })
            .collect();
        let result = self.client.txn(&[], &ops, &[], Resend::Safe, deadline)?;
        let revision = result.ranges.first().map_or(0, |r| r.revision);
        let present = result
            .ranges
            .chunks(2)
            .map(|pair| pair.iter().any(|r| r.count > 0))
            .collect();
        Ok((present, revision))
    }

    /// Waits until every key has existed, until `deadline`; `timeout`
    /// names it in the error.
    fn wait_for(&self, keys: &[&str], deadline: Instant, timeout: Duration) -> Result<()> {
        let mut pending: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        while !pending.is_empty() {
            let (present, revision) = self.presence(&pending, deadline)?;
            pending = pending
                .iter()
                .zip(present)
                .filter(|(_, present)| !present)
                .map(|(k, _)| *k)
                .collect();
            let Some(first) = pending.first() else {
                break;
            };
            let ranges = [
                (self.value_key(first), false),
                (self.queue_prefix(first), true),
            ];
            if let Watched::Deadline = self.watch_for_put(&ranges, revision + 1, deadline)? {
                return Err(wait_timeout_error(timeout, keys));
            }
        }
        Ok(())
    }
}

/// Operations on byte keys, shared by the Store and a TCPStore front-end
/// (see [`requests`]).
impl EtcdStore {
    fn add_to(&self, key: &[u8], delta: i64, guess: Option<Seen>) -> Result<(i64, i64)> {
        self.read_modify_write(key, guess, |current| {
            let now = counter_after(key, current, delta)?;
            Ok((Some(now.to_string().into_bytes()), now))
        })
    }

    fn compare_and_set(
        &self,
        key: &[u8],
        expected: &[u8],
        desired: &[u8],
        guess: Option<Seen>,
    ) -> Result<(Vec<u8>, i64)> {
        self.read_modify_write(key, guess, |current| {
            Ok(match compare_set_swaps(current, expected) {
                true => (Some(desired.to_vec()), desired.to_vec()),
                false => (None, current.unwrap_or(expected).to_vec()),
            })
        })
    }

    /// Appends `suffix` to the value of `key` (creating it), refusing a
    /// result over `max_len` bytes; returns the revision of the write.
    fn append_to(
        &self,
        key: &[u8],
        suffix: &[u8],
        max_len: usize,
        guess: Option<Seen>,
    ) -> Result<i64> {
        self.read_modify_write(key, guess, |current| {
            let current = current.unwrap_or_default();
            appended_len(key, current.len(), suffix.len(), max_len)?;
            Ok((Some([current, suffix].concat()), ()))
        })
        .map(|((), revision)| revision)
    }

    /// The values of `keys` (None where missing), MAX_TXN_OPS keys per
    /// transaction.
    fn read_values(&self, keys: &[&[u8]], deadline: Instant) -> Result<Vec<Option<Vec<u8>>>> {
        let mut values = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(MAX_TXN_OPS) {
            let ops: Vec<Op> = chunk
                .iter()
                .map(|k| Op::Range {
                    key: self.value_key(k),
                    prefix: false,
                    read: Read::Values,
                })
                .collect();
            let ranges = self
                .client
                .txn(&[], &ops, &[], Resend::Safe, deadline)?
                .ranges;
            values.extend(
                ranges
                    .into_iter()
                    .map(|r| r.kvs.into_iter().next().map(|kv| kv.value)),
            );
        }
        Ok(values)
    }

    /// Sets every pair (the last of a key named twice): one transaction
    /// per [`MAX_KEYS_PER_WRITE`] keys, atomic up to that many; `guesses`:
    /// what each key is believed to hold. Returns the revision of the last.
    fn write_values(
        &self,
        pairs: &[(&[u8], &[u8])],
        guesses: Option<Vec<Seen>>,
        deadline: Instant,
    ) -> Result<i64> {
        let mut last: std::collections::HashMap<&[u8], usize> = Default::default();
        for (i, (key, _)) in pairs.iter().enumerate() {
            last.insert(key, i);
        }
        let distinct: Vec<usize> = (0..pairs.len())
            .filter(|i| last[pairs[*i].0] == *i)
            .collect();
        let mut revision = 0;
        for chunk in distinct.chunks(MAX_KEYS_PER_WRITE) {
            let keys: Vec<&[u8]> = chunk.iter().map(|i| pairs[*i].0).collect();
            let guess = guesses
                .as_ref()
                .map(|g| chunk.iter().map(|i| g[*i].clone()).collect());
            let target = self.values_target(&keys, false);
            revision = self
                .guarded_write(&target, guess, deadline, |_| {
                    let puts = chunk.iter().map(|i| Some(Write::Put(pairs[*i].1.to_vec())));
                    Ok((puts.collect(), ()))
                })?
                .1;
        }
        Ok(revision)
    }

    /// Sets `key` to `value`, exactly once; returns the revision.
    fn set_value(&self, key: &[u8], value: &[u8], guess: Option<Seen>) -> Result<i64> {
        self.write_values(&[(key, value)], guess.map(|g| vec![g]), self.deadline(None))
    }

    /// Deletes `key`, exactly once: whether it existed, and the revision
    /// of the delete (0: it did not exist).
    fn delete_value(&self, key: &[u8], guess: Option<Seen>) -> Result<(bool, i64)> {
        let target = self.values_target(&[key], false);
        self.guarded_write(
            &target,
            guess.map(|g| vec![g]),
            self.deadline(None),
            |seen| {
                let exists = seen[0].mod_revision != 0;
                Ok((vec![exists.then_some(Write::Delete)], exists))
            },
        )
    }

    /// Appends an element holding `value` to the queue `key`, exactly once
    /// (never again once popped); returns the revision.
    fn push(&self, key: &[u8], value: &[u8]) -> Result<i64> {
        let target = Target {
            keys: vec![[self.queue_prefix(key), element_id()].concat()],
            clock: self.queue_clock(key),
            values: false,
            lease: self.lease,
        };
        let pushed = self.guarded_write(&target, None, self.deadline(None), |_| {
            Ok((vec![Some(Write::Put(value.to_vec()))], ()))
        })?;
        Ok(pushed.1)
    }

    /// Pops the oldest element of the queue `key` if there is one (whoever
    /// deletes it first has it: one popper per element).
    fn try_pop(&self, key: &[u8], deadline: Instant) -> Result<Pop> {
        let queue = self.queue_prefix(key);
        loop {
            let range = self.client.first_created(&queue, deadline)?;
            let Some(first) = range.kvs.into_iter().next() else {
                return Ok(Pop {
                    before: 0,
                    value: None,
                    revision: range.revision,
                    written: 0,
                });
            };
            // Exactly once: a copy applied late finds the element gone.
            let compare = Compare::CreateRevision {
                key: first.key.clone(),
                revision: first.create_revision,
            };
            let clock = self.queue_clock(key);
            let pop = vec![
                Op::Delete { key: first.key },
                Op::Put {
                    key: clock.clone(),
                    value: Vec::new(),
                    lease: 0,
                },
            ];
            if let Committed::Yes(written) = self.commit(vec![compare], pop, vec![], deadline)? {
                self.remember(&clock, written);
                return Ok(Pop {
                    before: range.count,
                    value: Some(first.value),
                    revision: range.revision,
                    written,
                });
            }
        }
    }

    /// The keys holding values.
    /// The job's keys under `area` (values or queue elements) that start
    /// with `prefix`, without the area's own prefix.
    fn keys_under(&self, area: &[u8], prefix: &[u8], deadline: Instant) -> Result<Vec<Vec<u8>>> {
        let within = [&self.prefix[..], area].concat();
        let range = [&within[..], prefix].concat();
        let range = self.client.range(&range, true, Read::Keys, deadline)?;
        Ok(range
            .kvs
            .into_iter()
            .filter_map(|kv| Some(kv.key.strip_prefix(&within[..])?.to_vec()))
            .collect())
    }

    /// Deletes every value and queue element whose key starts with
    /// `prefix`, each exactly once (a guarded delete, a pop): not one
    /// transaction, so a write made meanwhile under the prefix may stay.
    /// Returns how many values it deleted and the revision of its last
    /// change (0: none).
    fn delete_under(&self, prefix: &[u8]) -> Result<(i64, i64)> {
        let deadline = self.deadline(None);
        let (mut deleted, mut revision) = (0, 0);
        for key in self.keys_under(VALUES, prefix, deadline)? {
            let (gone, at) = self.delete_value(&key, None)?;
            deleted += i64::from(gone);
            revision = revision.max(at);
        }
        let mut queues: Vec<Vec<u8>> = self
            .keys_under(QUEUES, prefix, deadline)?
            .iter()
            .map(|element| split_element(element).0)
            .collect();
        queues.dedup();
        for queue in queues {
            loop {
                let pop = self.try_pop(&queue, deadline)?;
                if pop.value.is_none() {
                    break;
                }
                revision = revision.max(pop.written);
            }
        }
        Ok((deleted, revision))
    }
}

impl Drop for EtcdStore {
    /// Deletes the last commit tokens (best effort, within a second: a
    /// token left behind is a few bytes under the job's prefix).
    fn drop(&mut self) {
        if Arc::strong_count(&self.stale_tokens) > 1 {
            return; // a leased view, or the handle it views: the last goes
        }
        let stale = std::mem::take(&mut *self.stale_tokens.lock());
        if stale.is_empty() {
            return;
        }
        let deletes: Vec<Op> = stale.into_iter().map(|key| Op::Delete { key }).collect();
        let deadline = self
            .deadline(None)
            .min(Instant::now() + Duration::from_secs(1));
        if let Err(e) = self
            .client
            .txn(&[], &deletes, &[], Resend::IfUnsent, deadline)
        {
            log::debug!("etcd: removing commit tokens: {}", e.message());
        }
    }
}

/// A queue element's name: unique across processes (time, process, count).
fn element_id() -> Vec<u8> {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{nanos:x}-{:x}-{:x}-{:x}",
        std::process::id(),
        COUNT.fetch_add(1, Ordering::Relaxed),
        fastrand::u64(..)
    )
    .into_bytes()
}

impl Store for EtcdStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.check_session()?;
        self.set_value(key.as_bytes(), value, None).map(drop)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        self.check_session()?;
        let deadline = self.deadline(None);
        let k = self.value_key(key.as_bytes());
        loop {
            let range = self.client.range(&k, false, Read::Values, deadline)?;
            if let Some(kv) = range.kvs.into_iter().next() {
                self.remember(&k, kv.mod_revision);
                return Ok(kv.value);
            }
            match self.watch_for_put(&[(k.clone(), false)], range.revision + 1, deadline)? {
                Watched::Put(kv) => return Ok(kv.value),
                Watched::Canceled => {}
                Watched::Deadline => return Err(wait_timeout_error(self.timeout(), &[key])),
            }
        }
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        self.check_session()?;
        Ok(self.add_to(key.as_bytes(), delta, None)?.0)
    }

    fn compare_set(&self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>> {
        self.check_session()?;
        Ok(self
            .compare_and_set(key.as_bytes(), expected, desired, None)?
            .0)
    }

    fn delete_key(&self, key: &str) -> Result<bool> {
        self.check_session()?;
        Ok(self.delete_value(key.as_bytes(), None)?.0)
    }

    fn check(&self, keys: &[&str]) -> Result<bool> {
        self.check_session()?;
        let keys: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        let (present, _) = self.presence(&keys, self.deadline(None))?;
        Ok(present.into_iter().all(|p| p))
    }

    fn wait(&self, keys: &[&str], timeout: Option<Duration>) -> Result<()> {
        self.check_session()?;
        let timeout = timeout.unwrap_or_else(|| self.timeout());
        self.wait_for(keys, self.deadline(Some(timeout)), timeout)
    }

    fn num_keys(&self) -> Result<i64> {
        self.check_session()?;
        let values = [&self.prefix[..], VALUES].concat();
        Ok(self
            .client
            .range(&values, true, Read::Count, self.deadline(None))?
            .count)
    }

    fn append(&self, key: &str, value: &[u8]) -> Result<()> {
        self.check_session()?;
        self.append_to(key.as_bytes(), value, usize::MAX, None)
            .map(drop)
    }

    fn multi_get(&self, keys: &[&str]) -> Result<Vec<Vec<u8>>> {
        self.check_session()?;
        let deadline = self.deadline(None);
        loop {
            self.wait_for(keys, deadline, self.timeout())?;
            let raw: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
            let values: Option<Vec<Vec<u8>>> =
                self.read_values(&raw, deadline)?.into_iter().collect();
            // A key deleted between the wait and the read: wait again.
            if let Some(values) = values {
                return Ok(values);
            }
            if Instant::now() >= deadline {
                return Err(wait_timeout_error(self.timeout(), keys));
            }
        }
    }

    /// One transaction per [`MAX_KEYS_PER_WRITE`] keys: atomic up to that
    /// many.
    fn multi_set(&self, keys: &[&str], values: &[&[u8]]) -> Result<()> {
        self.check_session()?;
        check_multi_set_lengths(keys, values)?;
        let pairs: Vec<(&[u8], &[u8])> = keys
            .iter()
            .map(|k| k.as_bytes())
            .zip(values.iter().copied())
            .collect();
        self.write_values(&pairs, None, self.deadline(None))
            .map(drop)
    }

    fn queue_push(&self, key: &str, value: &[u8]) -> Result<()> {
        self.check_session()?;
        self.push(key.as_bytes(), value).map(drop)
    }

    fn queue_pop(&self, key: &str, block: bool) -> Result<Vec<u8>> {
        self.check_session()?;
        let deadline = self.deadline(None);
        loop {
            let pop = self.try_pop(key.as_bytes(), deadline)?;
            if let Some(value) = pop.value {
                return Ok(value);
            }
            if !block {
                return Err(Error::new(
                    Status::QueueEmpty,
                    format!("queue_pop: the queue {key} is empty"),
                ));
            }
            let queue = self.queue_prefix(key.as_bytes());
            let watched = self.watch_for_put(&[(queue, true)], pop.revision + 1, deadline)?;
            if let Watched::Deadline = watched {
                return Err(wait_timeout_error(self.timeout(), &[key]));
            }
        }
    }

    fn queue_len(&self, key: &str) -> Result<i64> {
        self.check_session()?;
        Ok(self
            .client
            .range(
                &self.queue_prefix(key.as_bytes()),
                true,
                Read::Count,
                self.deadline(None),
            )?
            .count)
    }

    fn list_keys(&self) -> Result<Vec<String>> {
        self.list_prefix("")
    }

    fn list_prefix(&self, prefix: &str) -> Result<Vec<String>> {
        self.check_session()?;
        Ok(self
            .keys_under(VALUES, prefix.as_bytes(), self.deadline(None))?
            .into_iter()
            .map(|key| String::from_utf8_lossy(&key).into_owned())
            .collect())
    }

    fn delete_prefix(&self, prefix: &str) -> Result<i64> {
        self.check_session()?;
        Ok(self.delete_under(prefix.as_bytes())?.0)
    }

    fn timeout(&self) -> Duration {
        *self.timeout.lock()
    }

    fn set_timeout(&self, timeout: Duration) {
        *self.timeout.lock() = timeout;
    }

    fn clone_store(&self) -> Result<Arc<dyn Store>> {
        Ok(Arc::new(EtcdStore::on(
            Arc::new(Client::new(self.client.endpoints())?),
            self.prefix.clone(),
            self.timeout(),
        )))
    }
}

#[cfg(test)]
pub(crate) mod tests;
