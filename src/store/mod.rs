//! Key-value stores with PyTorch's `c10d::Store` surface, and the helpers
//! built on any store.

use std::any::Any;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::printable::printable;
use crate::work::Work;

pub mod background;
pub mod elastic;
pub mod etcd;
pub mod file;
pub mod hash;
pub(crate) mod kv;
mod packed;
pub mod prefix;
pub mod tcp;

pub use etcd::{EtcdStore, EtcdStoreOptions};
pub use file::FileStore;
pub use hash::HashStore;
pub use prefix::PrefixStore;
pub use tcp::{TcpStore, TcpStoreOptions};

/// Access to the concrete type behind a `dyn Store` (e.g. a TCPStore's port).
pub trait AsAny {
    /// `self` as `Any`, for downcasting.
    fn as_any(&self) -> &dyn Any;
}

impl<T: Any> AsAny for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// PyTorch's `Store`: a key-value store shared by the workers of a job.
///
/// Every implementation is safe to share between threads. Timeouts follow
/// [`crate::runtime::timeout`]: `None` means the store's own timeout, a zero duration
/// waits forever.
pub trait Store: AsAny + Send + Sync + 'static {
    /// Sets `key` to `value`, waking the waiters of `key`.
    fn set(&self, key: &str, value: &[u8]) -> Result<()>;

    /// The value of `key`, waiting up to the store's timeout for it to exist.
    fn get(&self, key: &str) -> Result<Vec<u8>>;

    /// Adds `delta` to the integer stored (as decimal text) at `key`, a
    /// missing key counting as 0; returns the new value.
    fn add(&self, key: &str, delta: i64) -> Result<i64>;

    /// Atomically replaces the value of `key` with `desired` if it equals
    /// `expected` (a missing key matches an empty `expected`); returns the
    /// value now stored, or `expected` when the key is missing and `expected`
    /// is not empty.
    fn compare_set(&self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>>;

    /// Deletes `key`; returns whether it existed. Queues are untouched.
    fn delete_key(&self, key: &str) -> Result<bool>;

    /// Whether every key exists (as a value or a non-empty queue), without waiting.
    fn check(&self, keys: &[&str]) -> Result<bool>;

    /// Blocks until every key exists, or fails with a timeout error.
    fn wait(&self, keys: &[&str], timeout: Option<Duration>) -> Result<()>;

    /// The number of keys holding values (queues not counted).
    fn num_keys(&self) -> Result<i64>;

    /// Appends `value` to the value of `key` (creating it).
    fn append(&self, key: &str, value: &[u8]) -> Result<()>;

    /// The values of every key, in order, waiting for all of them to exist.
    fn multi_get(&self, keys: &[&str]) -> Result<Vec<Vec<u8>>>;

    /// Sets each key to the value at the same index.
    fn multi_set(&self, keys: &[&str], values: &[&[u8]]) -> Result<()>;

    /// Pushes `value` at the back of the queue `key`, waking one waiter.
    fn queue_push(&self, key: &str, value: &[u8]) -> Result<()>;

    /// Pops the front of the queue `key`. With `block`, waits up to the
    /// store's timeout for an element; without, an empty queue fails with
    /// [`crate::Status::QueueEmpty`].
    fn queue_pop(&self, key: &str, block: bool) -> Result<Vec<u8>>;

    /// The number of elements in the queue `key`.
    fn queue_len(&self, key: &str) -> Result<i64>;

    /// Every key holding a value, as the user named it.
    fn list_keys(&self) -> Result<Vec<String>>;

    /// The keys holding a value that start with `prefix` (since 1.4). The
    /// default filters [`Store::list_keys`]; a TCPStore asks a distcore
    /// server for them only.
    fn list_prefix(&self, prefix: &str) -> Result<Vec<String>> {
        list_prefix_by_listing(self, prefix)
    }

    /// Deletes every key starting with `prefix` (since 1.4); returns how
    /// many values it deleted. A HashStore, an EtcdStore and a TCPStore on
    /// a distcore server (in one step) delete the queues under it too. The
    /// default (FileStore, a TCPStore on PyTorch's server) deletes the
    /// values [`Store::list_prefix`] lists, one key at a time: a key
    /// written under the prefix meanwhile may stay, and queues do.
    fn delete_prefix(&self, prefix: &str) -> Result<i64> {
        delete_prefix_one_by_one(self, prefix)
    }

    /// Blocks until `world_size` callers have entered the barrier `key`.
    ///
    /// The default is c10d's `Store::barrier`, which HashStore, FileStore
    /// and PrefixStore use in PyTorch: count in at `key/num_members`; the
    /// caller that makes it `world_size` sets `key/last_member` to "1";
    /// everyone waits for `key/last_member`. TCPStore overrides it with its
    /// BARRIER command.
    fn barrier(&self, key: &str, world_size: i64, timeout: Option<Duration>) -> Result<()> {
        let last_member = format!("{key}/last_member");
        if self.add(&format!("{key}/num_members"), 1)? == world_size {
            self.set(&last_member, b"1")?;
        }
        self.wait(&[&last_member], timeout)
    }

    /// Starts [`Store::get`] without blocking: the work completes with the
    /// value as its result, or the get's error. The default runs the get on
    /// a thread of its own (FileStore); a TCPStore waits on its process's one
    /// waiter thread instead, a HashStore completes it with the change that
    /// satisfies it, and a PrefixStore uses its underlying store's.
    fn get_async(self: Arc<Self>, key: String) -> Result<Work> {
        background::spawn_op(move || self.get(&key).map(Some))
    }

    /// Starts [`Store::wait`] without blocking; the work has no result.
    fn wait_async(self: Arc<Self>, keys: Vec<String>, timeout: Option<Duration>) -> Result<Work> {
        background::spawn_op(move || {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            self.wait(&keys, timeout).map(|()| None)
        })
    }

    /// Starts a blocking [`Store::queue_pop`]; the work's result is the element.
    fn queue_pop_async(self: Arc<Self>, key: String) -> Result<Work> {
        background::spawn_op(move || self.queue_pop(&key, true).map(Some))
    }

    /// Starts [`Store::barrier`]. The default counts in at once (as the
    /// generic barrier does) and waits for the last member asynchronously.
    fn barrier_async(
        self: Arc<Self>,
        key: String,
        world_size: i64,
        timeout: Option<Duration>,
    ) -> Result<Work> {
        let last_member = format!("{key}/last_member");
        if self.add(&format!("{key}/num_members"), 1)? == world_size {
            self.set(&last_member, b"1")?;
        }
        self.wait_async(vec![last_member], timeout)
    }

    /// The default timeout of blocking calls.
    fn timeout(&self) -> Duration;

    /// Changes the default timeout of blocking calls.
    fn set_timeout(&self, timeout: Duration);

    /// A new handle on the same store (for a network store, a new connection).
    fn clone_store(&self) -> Result<Arc<dyn Store>>;
}

/// Sets a store's timeout for a scope and restores the previous one when
/// dropped (c10d's `StoreTimeoutGuard`).
pub struct TimeoutGuard<S>
where
    S: Deref,
    S::Target: Store,
{
    store: S,
    previous: Duration,
}

impl<S> TimeoutGuard<S>
where
    S: Deref,
    S::Target: Store,
{
    /// Sets `timeout` on `store` until the guard drops.
    pub fn new(store: S, timeout: Duration) -> Self {
        let previous = store.timeout();
        store.set_timeout(timeout);
        TimeoutGuard { store, previous }
    }

    /// The store the guard holds.
    pub fn store(&self) -> &S::Target {
        &self.store
    }
}

impl<S> Drop for TimeoutGuard<S>
where
    S: Deref,
    S::Target: Store,
{
    fn drop(&mut self) {
        self.store.set_timeout(self.previous);
    }
}

/// [`Store::list_prefix`] by filtering every key.
pub(crate) fn list_prefix_by_listing<S: Store + ?Sized>(
    store: &S,
    prefix: &str,
) -> Result<Vec<String>> {
    let mut keys = store.list_keys()?;
    keys.retain(|key| key.starts_with(prefix));
    Ok(keys)
}

/// [`Store::delete_prefix`] one listed key at a time.
pub(crate) fn delete_prefix_one_by_one<S: Store + ?Sized>(store: &S, prefix: &str) -> Result<i64> {
    let mut deleted = 0;
    for key in store.list_prefix(prefix)? {
        deleted += i64::from(store.delete_key(&key)?);
    }
    Ok(deleted)
}

/// The timeout error of a wait on `keys`, in PyTorch's TCPStore wording.
pub(crate) fn wait_timeout_error(timeout: Duration, keys: &[&str]) -> Error {
    Error::timeout(format!(
        "wait timeout after {}ms, keys: {}",
        timeout.as_millis(),
        keys.iter()
            .map(|key| printable(key.as_bytes()))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// Checks that `multi_set` got one value per key.
pub(crate) fn check_multi_set_lengths(keys: &[&str], values: &[&[u8]]) -> Result<()> {
    if keys.len() != values.len() {
        return Err(Error::invalid_argument(format!(
            "multi_set: {} keys but {} values",
            keys.len(),
            values.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod conformance;
