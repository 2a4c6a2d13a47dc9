//! PrefixStore: a namespace inside another store (c10d's `PrefixStore`).

use std::sync::Arc;
use std::time::Duration;

use super::Store;
use crate::error::Result;
use crate::work::Work;

/// Every key `k` becomes `prefix + "/" + k` in the underlying store. Like
/// PyTorch's, its barrier is the generic one over its own keys (even over a
/// TCPStore).
/// Timeouts and key counts are those of the underlying store, as in PyTorch;
/// `list_keys` returns only the keys under the prefix, without it.
pub struct PrefixStore {
    prefix: String,
    store: Arc<dyn Store>,
}

impl PrefixStore {
    /// A view of `store` under `prefix`.
    pub fn new(prefix: impl Into<String>, store: Arc<dyn Store>) -> PrefixStore {
        PrefixStore {
            prefix: prefix.into(),
            store,
        }
    }

    /// The prefix, without the joining `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The store underneath.
    pub fn underlying(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn join(&self, key: &str) -> String {
        format!("{}/{}", self.prefix, key)
    }

    fn join_all(&self, keys: &[&str]) -> Vec<String> {
        keys.iter().map(|k| self.join(k)).collect()
    }
}

fn as_strs(keys: &[String]) -> Vec<&str> {
    keys.iter().map(String::as_str).collect()
}

impl Store for PrefixStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.store.set(&self.join(key), value)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        self.store.get(&self.join(key))
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        self.store.add(&self.join(key), delta)
    }

    fn compare_set(&self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>> {
        self.store.compare_set(&self.join(key), expected, desired)
    }

    fn delete_key(&self, key: &str) -> Result<bool> {
        self.store.delete_key(&self.join(key))
    }

    fn check(&self, keys: &[&str]) -> Result<bool> {
        self.store.check(&as_strs(&self.join_all(keys)))
    }

    fn wait(&self, keys: &[&str], timeout: Option<Duration>) -> Result<()> {
        self.store.wait(&as_strs(&self.join_all(keys)), timeout)
    }

    fn num_keys(&self) -> Result<i64> {
        self.store.num_keys()
    }

    fn append(&self, key: &str, value: &[u8]) -> Result<()> {
        self.store.append(&self.join(key), value)
    }

    fn multi_get(&self, keys: &[&str]) -> Result<Vec<Vec<u8>>> {
        self.store.multi_get(&as_strs(&self.join_all(keys)))
    }

    fn multi_set(&self, keys: &[&str], values: &[&[u8]]) -> Result<()> {
        self.store.multi_set(&as_strs(&self.join_all(keys)), values)
    }

    fn queue_push(&self, key: &str, value: &[u8]) -> Result<()> {
        self.store.queue_push(&self.join(key), value)
    }

    fn queue_pop(&self, key: &str, block: bool) -> Result<Vec<u8>> {
        self.store.queue_pop(&self.join(key), block)
    }

    fn queue_len(&self, key: &str) -> Result<i64> {
        self.store.queue_len(&self.join(key))
    }

    fn list_keys(&self) -> Result<Vec<String>> {
        self.list_prefix("")
    }

    fn list_prefix(&self, prefix: &str) -> Result<Vec<String>> {
        let own = format!("{}/", self.prefix);
        Ok(self
            .store
            .list_prefix(&self.join(prefix))?
            .into_iter()
            .filter_map(|k| k.strip_prefix(&own).map(str::to_owned))
            .collect())
    }

    fn delete_prefix(&self, prefix: &str) -> Result<i64> {
        self.store.delete_prefix(&self.join(prefix))
    }

    fn timeout(&self) -> Duration {
        self.store.timeout()
    }

    fn get_async(self: Arc<Self>, key: String) -> Result<Work> {
        self.store.clone().get_async(self.join(&key))
    }

    fn wait_async(self: Arc<Self>, keys: Vec<String>, timeout: Option<Duration>) -> Result<Work> {
        let keys = self.join_all(&as_strs(&keys));
        self.store.clone().wait_async(keys, timeout)
    }

    fn queue_pop_async(self: Arc<Self>, key: String) -> Result<Work> {
        self.store.clone().queue_pop_async(self.join(&key))
    }

    fn set_timeout(&self, timeout: Duration) {
        self.store.set_timeout(timeout)
    }

    fn clone_store(&self) -> Result<Arc<dyn Store>> {
        Ok(Arc::new(PrefixStore::new(
            self.prefix.clone(),
            self.store.clone_store()?,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{conformance, HashStore};

    #[test]
    fn conforms() {
        conformance::run_all(&|| {
            Arc::new(PrefixStore::new("pre", Arc::new(HashStore::new()))) as Arc<dyn Store>
        });
    }

    #[test]
    fn keys_are_joined_with_a_slash_and_listed_without_prefix() {
        let base: Arc<dyn Store> = Arc::new(HashStore::new());
        let p = PrefixStore::new("job", base.clone());
        p.set("a", b"1").unwrap();
        base.set("other", b"2").unwrap();
        assert_eq!(base.get("job/a").unwrap(), b"1");
        assert_eq!(p.list_keys().unwrap(), vec!["a".to_string()]);
        assert_eq!(p.num_keys().unwrap(), 2);
        let nested = PrefixStore::new("inner", Arc::new(p));
        nested.set("x", b"y").unwrap();
        assert!(base.check(&["job/inner/x"]).unwrap());
    }
}
