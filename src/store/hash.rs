//! HashStore: an in-process store shared by threads (c10d's `HashStore`).

use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Condvar, Mutex, MutexGuard};

use super::kv::KvTable;
use super::{check_multi_set_lengths, wait_timeout_error, Store};
use crate::error::{Error, Result, Status};
use crate::net::bigbuf::check_allocatable;
use crate::printable::printable;
use crate::runtime::timeout::{deadline_after, wait_until, DEFAULT_STORE_TIMEOUT};
use crate::work::{Promise, Work};

struct Shared {
    table: Mutex<KvTable>,
    /// Signalled on every change that can satisfy a waiter.
    changed: Condvar,
    /// Async calls waiting for keys; locked after `table`, never before.
    waits: Mutex<AsyncWaits>,
}

/// What an async call waits for.
enum Awaited {
    /// The value of a key.
    Get(String),
    /// Every key to exist.
    Keys(Vec<String>),
    /// An element of a queue, popped.
    Pop(String),
}

impl Awaited {
    /// Completes the call if `table` allows it now: its result, or `None`.
    fn try_complete(&self, table: &mut KvTable) -> Option<Option<Vec<u8>>> {
        match self {
            Awaited::Get(key) => table.contains(key.as_bytes()).then(|| {
                Some(
                    table
                        .get(key.as_bytes())
                        .map_or_else(Vec::new, |v| v.to_vec()),
                )
            }),
            Awaited::Keys(keys) => keys
                .iter()
                .all(|k| table.contains(k.as_bytes()))
                .then_some(None),
            Awaited::Pop(key) => table.queue_pop(key.as_bytes()).map(|v| Some(v.to_vec())),
        }
    }

    fn keys(&self) -> Vec<&str> {
        match self {
            Awaited::Get(key) | Awaited::Pop(key) => vec![key.as_str()],
            Awaited::Keys(keys) => keys.iter().map(String::as_str).collect(),
        }
    }
}

struct AsyncWait {
    id: u64,
    awaited: Awaited,
    promise: Promise,
    /// Its timeout's job, cancelled when it ends otherwise.
    timer: Option<crate::runtime::timer::TimerId>,
}

#[derive(Default)]
struct AsyncWaits {
    next_id: u64,
    pending: Vec<AsyncWait>,
}

/// An in-process store. Clones share the table; each handle has its own
/// timeout (like a TCPStore clone, so threads scoping timeouts on their own
/// handles do not race). Waits block on a condvar; async calls are
/// completed by the change that satisfies them (their timeouts by the
/// process's timer thread), with no thread of their own.
pub struct HashStore {
    shared: Arc<Shared>,
    timeout: Mutex<Duration>,
}

impl Shared {
    /// Removes the async calls the table now satisfies, with their outcomes
    /// (queue pops take their elements, oldest call first).
    fn satisfied(&self, table: &mut KvTable) -> Vec<(AsyncWait, Option<Vec<u8>>)> {
        let mut waits = self.waits.lock();
        let mut done = Vec::new();
        let mut i = 0;
        while i < waits.pending.len() {
            match waits.pending[i].awaited.try_complete(table) {
                Some(outcome) => done.push((waits.pending.remove(i), outcome)),
                None => i += 1,
            }
        }
        done
    }
}

/// Takes async call `id` out of the store behind `shared`, if both remain.
fn take_wait(shared: &Weak<Shared>, id: u64) -> Option<AsyncWait> {
    let shared = shared.upgrade()?;
    let mut waits = shared.waits.lock();
    let at = waits.pending.iter().position(|w| w.id == id)?;
    Some(waits.pending.remove(at))
}

impl AsyncWait {
    /// Ends the call with `outcome` (its timeout job no longer needed).
    fn complete(self, outcome: Result<Option<Vec<u8>>>) {
        if let Some(timer) = self.timer {
            crate::runtime::timer::cancel(timer);
        }
        self.promise.complete(outcome);
    }
}

impl Clone for HashStore {
    fn clone(&self) -> Self {
        HashStore {
            shared: self.shared.clone(),
            timeout: Mutex::new(self.timeout()),
        }
    }
}

impl Default for HashStore {
    fn default() -> Self {
        HashStore::new()
    }
}

impl HashStore {
    /// An empty store with PyTorch's default timeout (300 s).
    pub fn new() -> HashStore {
        HashStore {
            shared: Arc::new(Shared {
                table: Mutex::new(KvTable::default()),
                changed: Condvar::new(),
                waits: Mutex::default(),
            }),
            timeout: Mutex::new(DEFAULT_STORE_TIMEOUT),
        }
    }

    /// Runs `change` on the table, wakes every waiter and completes the
    /// async calls it satisfied (outside the locks: callbacks may call back).
    fn modify<T>(&self, change: impl FnOnce(&mut KvTable) -> T) -> T {
        let (result, done) = {
            let mut table = self.shared.table.lock();
            let result = change(&mut table);
            (result, self.shared.satisfied(&mut table))
        };
        self.shared.changed.notify_all();
        for (wait, outcome) in done {
            wait.complete(Ok(outcome));
        }
        result
    }

    /// Starts an async call for `awaited`, completed at once if the table
    /// allows it, else by the change that does or by its timeout; aborting
    /// the work, or dropping its last handle, forgets it.
    fn start(&self, awaited: Awaited, timeout: Duration) -> Result<Work> {
        let (promise, work) = Promise::new();
        let mut table = self.shared.table.lock();
        if let Some(outcome) = awaited.try_complete(&mut table) {
            drop(table);
            promise.complete(Ok(outcome));
            return Ok(work);
        }
        let mut waits = self.shared.waits.lock();
        waits.next_id += 1;
        let id = waits.next_id;
        let weak = Arc::downgrade(&self.shared);
        let timer = match deadline_after(timeout) {
            Some(at) => {
                let error = wait_timeout_error(timeout, &awaited.keys());
                let weak = weak.clone();
                let expire = move || {
                    if let Some(wait) = take_wait(&weak, id) {
                        wait.promise.complete(Err(error));
                    }
                };
                Some(crate::runtime::timer::at(at, Box::new(expire))?)
            }
            None => None,
        };
        // `work` is alive and pending: the hook is kept, not run now.
        promise.on_release(Box::new(move || {
            if let Some(wait) = take_wait(&weak, id) {
                if let Some(timer) = wait.timer {
                    crate::runtime::timer::cancel(timer);
                }
            }
        }));
        waits.pending.push(AsyncWait {
            id,
            awaited,
            promise,
            timer,
        });
        Ok(work)
    }

    /// Locks the table once every key exists, or fails after `timeout`.
    fn lock_when_present(
        &self,
        keys: &[&str],
        timeout: Duration,
    ) -> Result<MutexGuard<'_, KvTable>> {
        let mut table = self.shared.table.lock();
        let present = wait_until(
            &self.shared.changed,
            &mut table,
            deadline_after(timeout),
            |t| keys.iter().all(|k| t.contains(k.as_bytes())),
        );
        if present {
            Ok(table)
        } else {
            Err(wait_timeout_error(timeout, keys))
        }
    }
}

impl Store for HashStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        check_allocatable(value.len(), "set")?;
        self.modify(|t| t.set(key.as_bytes(), value.into()));
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let table = self.lock_when_present(&[key], self.timeout())?;
        // Present as a non-empty queue only: PyTorch's GET replies empty.
        Ok(table
            .get(key.as_bytes())
            .map_or_else(Vec::new, |v| v.to_vec()))
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        self.modify(|t| t.add(key.as_bytes(), delta))
    }

    fn compare_set(&self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>> {
        check_allocatable(expected.len().saturating_add(desired.len()), "compare_set")?;
        let reply =
            self.modify(|t| t.compare_set(key.as_bytes(), &expected.into(), &desired.into()));
        Ok(reply.to_vec())
    }

    fn delete_key(&self, key: &str) -> Result<bool> {
        Ok(self.shared.table.lock().delete(key.as_bytes()))
    }

    fn check(&self, keys: &[&str]) -> Result<bool> {
        let table = self.shared.table.lock();
        Ok(keys.iter().all(|k| table.contains(k.as_bytes())))
    }

    fn wait(&self, keys: &[&str], timeout: Option<Duration>) -> Result<()> {
        self.lock_when_present(keys, timeout.unwrap_or_else(|| self.timeout()))
            .map(drop)
    }

    fn num_keys(&self) -> Result<i64> {
        Ok(self.shared.table.lock().num_keys())
    }

    fn append(&self, key: &str, value: &[u8]) -> Result<()> {
        self.modify(|t| t.append(key.as_bytes(), value, usize::MAX))
    }

    fn multi_get(&self, keys: &[&str]) -> Result<Vec<Vec<u8>>> {
        let table = self.lock_when_present(keys, self.timeout())?;
        Ok(keys
            .iter()
            .map(|k| {
                table
                    .get(k.as_bytes())
                    .map_or_else(Vec::new, |v| v.to_vec())
            })
            .collect())
    }

    fn multi_set(&self, keys: &[&str], values: &[&[u8]]) -> Result<()> {
        check_multi_set_lengths(keys, values)?;
        for value in values {
            check_allocatable(value.len(), "multi_set")?;
        }
        self.modify(|t| {
            for (key, value) in keys.iter().zip(values) {
                t.set(key.as_bytes(), (*value).into());
            }
        });
        Ok(())
    }

    fn queue_push(&self, key: &str, value: &[u8]) -> Result<()> {
        check_allocatable(value.len(), "queue_push")?;
        self.modify(|t| t.queue_push(key.as_bytes(), value.into()));
        Ok(())
    }

    fn queue_pop(&self, key: &str, block: bool) -> Result<Vec<u8>> {
        let mut table = if block {
            self.lock_when_present(&[key], self.timeout())?
        } else {
            self.shared.table.lock()
        };
        table
            .queue_pop(key.as_bytes())
            .map(|v| v.to_vec())
            .ok_or_else(|| {
                Error::new(
                    Status::QueueEmpty,
                    format!("queue '{}' is empty", printable(key.as_bytes())),
                )
            })
    }

    fn queue_len(&self, key: &str) -> Result<i64> {
        Ok(self.shared.table.lock().queue_len(key.as_bytes()))
    }

    fn list_keys(&self) -> Result<Vec<String>> {
        let table = self.shared.table.lock();
        Ok(table
            .keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect())
    }

    fn delete_prefix(&self, prefix: &str) -> Result<i64> {
        Ok(self.shared.table.lock().delete_prefix(prefix.as_bytes()))
    }

    fn get_async(self: Arc<Self>, key: String) -> Result<Work> {
        self.start(Awaited::Get(key), self.timeout())
    }

    fn wait_async(self: Arc<Self>, keys: Vec<String>, timeout: Option<Duration>) -> Result<Work> {
        self.start(
            Awaited::Keys(keys),
            timeout.unwrap_or_else(|| self.timeout()),
        )
    }

    fn queue_pop_async(self: Arc<Self>, key: String) -> Result<Work> {
        self.start(Awaited::Pop(key), self.timeout())
    }

    fn timeout(&self) -> Duration {
        *self.timeout.lock()
    }

    fn set_timeout(&self, timeout: Duration) {
        *self.timeout.lock() = timeout;
    }

    fn clone_store(&self) -> Result<Arc<dyn Store>> {
        Ok(Arc::new(self.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    #[test]
    fn conforms() {
        conformance::run_all(&|| Arc::new(HashStore::new()) as Arc<dyn Store>);
    }

    fn pending(s: &HashStore) -> usize {
        s.shared.waits.lock().pending.len()
    }

    #[test]
    fn async_calls_complete_on_the_change_that_satisfies_them_with_no_thread() {
        let s = Arc::new(HashStore::new());
        let threads = || std::fs::read_dir("/proc/self/task").unwrap().count();
        let before = threads();
        let gets: Vec<Work> = (0..200)
            .map(|i| s.clone().get_async(format!("k{i}")).unwrap())
            .collect();
        let pops: Vec<Work> = (0..3)
            .map(|_| s.clone().queue_pop_async("q".into()).unwrap())
            .collect();
        let waited = s
            .clone()
            .wait_async(vec!["a".into(), "b".into()], None)
            .unwrap();
        // Other tests run threads meanwhile; a thread per call would add 204.
        assert!(
            threads() < before + 50,
            "{} threads, {before} before",
            threads()
        );
        assert_eq!(pending(&s), 204);
        for i in 0..200 {
            s.set(&format!("k{i}"), format!("v{i}").as_bytes()).unwrap();
        }
        for (i, w) in gets.iter().enumerate() {
            w.wait(Some(Duration::from_secs(30))).unwrap();
            assert_eq!(&**w.result().unwrap(), format!("v{i}").as_bytes());
        }
        s.set("a", b"1").unwrap();
        assert!(!waited.is_completed());
        s.set("b", b"1").unwrap();
        waited.wait(Some(Duration::from_secs(30))).unwrap();
        // One element per pop, oldest pop first.
        s.queue_push("q", b"e1").unwrap();
        assert!(pops[0].is_completed() && !pops[1].is_completed());
        s.queue_push("q", b"e2").unwrap();
        s.queue_push("q", b"e3").unwrap();
        let popped: Vec<Vec<u8>> = pops.iter().map(|w| w.result().unwrap().to_vec()).collect();
        assert_eq!(popped, [b"e1", b"e2", b"e3"]);
        assert_eq!(pending(&s), 0);
        // Already there: completed at once.
        let now = s.clone().get_async("k0".into()).unwrap();
        assert!(now.is_completed());
    }

    #[test]
    fn async_calls_time_out_and_are_forgotten_when_aborted_or_dropped() {
        let s = Arc::new(HashStore::new());
        let late = s
            .clone()
            .wait_async(vec!["never".into()], Some(Duration::from_millis(30)))
            .unwrap();
        let e = late.wait(Some(Duration::from_secs(30))).unwrap_err();
        assert_eq!(
            (e.status(), e.message()),
            (Status::Timeout, "wait timeout after 30ms, keys: never")
        );
        let aborted = s.clone().get_async("never".into()).unwrap();
        let dropped = s.clone().get_async("never".into()).unwrap();
        assert_eq!(pending(&s), 2);
        aborted.abort();
        drop(dropped);
        assert_eq!(pending(&s), 0);
    }

    #[test]
    fn clones_share_data_but_not_timeout() {
        let a = HashStore::new();
        a.set_timeout(Duration::from_secs(9));
        let b = a.clone_store().unwrap();
        a.set("k", b"v").unwrap();
        assert_eq!(b.get("k").unwrap(), b"v");
        assert_eq!(b.timeout(), Duration::from_secs(9));
        b.set_timeout(Duration::from_millis(5));
        assert_eq!(a.timeout(), Duration::from_secs(9));
    }
}
