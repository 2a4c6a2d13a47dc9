//! HashStore: an in-process store shared by threads (c10d's `HashStore`).

use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, MutexGuard};

use super::kv::KvTable;
use super::{check_multi_set_lengths, wait_timeout_error, Store};
use crate::bigbuf::check_allocatable;
use crate::error::{Error, Result, Status};
use crate::timeout::{deadline_after, wait_until, DEFAULT_STORE_TIMEOUT};

struct Shared {
    table: Mutex<KvTable>,
    /// Signalled on every change that can satisfy a waiter.
    changed: Condvar,
}

/// An in-process store. Clones share the table; each handle has its own
/// timeout (like a TCPStore clone, so threads scoping timeouts on their own
/// handles do not race). Waits block on a condvar.
pub struct HashStore {
    shared: Arc<Shared>,
    timeout: Mutex<Duration>,
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
            }),
            timeout: Mutex::new(DEFAULT_STORE_TIMEOUT),
        }
    }

    /// Runs `change` on the table and wakes every waiter.
    fn modify<T>(&self, change: impl FnOnce(&mut KvTable) -> T) -> T {
        let result = change(&mut self.shared.table.lock());
        self.shared.changed.notify_all();
        result
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
            .ok_or_else(|| Error::new(Status::QueueEmpty, format!("queue '{key}' is empty")))
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
