//! Async variants of the blocking store calls: each runs on its own thread
//! and completes a [`Work`] (a future-wrapping work whose result is the
//! reply).

use std::sync::Arc;
use std::time::Duration;

use super::Store;
use crate::error::Result;
use crate::work::Work;

/// Runs `op` on a new thread; the returned work completes with its outcome:
/// its error, or success with the result bytes it returned, if any.
pub fn spawn_op(op: impl FnOnce() -> Result<Option<Vec<u8>>> + Send + 'static) -> Result<Work> {
    let work = Work::from_future();
    let finisher = work.clone();
    std::thread::Builder::new()
        .name("dc-store-async".into())
        .spawn(move || {
            // The work is pending and only this thread finishes it.
            let _ = match op() {
                Ok(Some(result)) => finisher.finish_with_result(result),
                Ok(None) => finisher.finish(None),
                Err(error) => finisher.finish(Some(error)),
            };
        })
        .map_err(|e| crate::error::Error::internal(format!("spawning a thread: {e}")))?;
    Ok(work)
}

/// `store.get(key)` in the background; the work's result is the value.
pub fn get_async(store: Arc<dyn Store>, key: String) -> Result<Work> {
    spawn_op(move || store.get(&key).map(Some))
}

/// `store.wait(keys, timeout)` in the background; the work has no result.
pub fn wait_async(
    store: Arc<dyn Store>,
    keys: Vec<String>,
    timeout: Option<Duration>,
) -> Result<Work> {
    spawn_op(move || {
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        store.wait(&keys, timeout).map(|()| None)
    })
}

/// `store.queue_pop(key, true)` in the background; the result is the element.
pub fn queue_pop_async(store: Arc<dyn Store>, key: String) -> Result<Work> {
    spawn_op(move || store.queue_pop(&key, true).map(Some))
}

/// `store.barrier(key, world_size, timeout)` in the background.
pub fn barrier_async(
    store: Arc<dyn Store>,
    key: String,
    world_size: i64,
    timeout: Option<Duration>,
) -> Result<Work> {
    spawn_op(move || store.barrier(&key, world_size, timeout).map(|()| None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::HashStore;
    use crate::Status;

    #[test]
    fn async_get_completes_when_the_key_arrives() {
        let store: Arc<dyn Store> = Arc::new(HashStore::new());
        let work = get_async(store.clone(), "k".into()).unwrap();
        assert!(!work.is_completed());
        store.set("k", b"v").unwrap();
        work.wait(Some(Duration::from_secs(30))).unwrap();
        assert_eq!(&*work.result().unwrap(), b"v");
    }

    #[test]
    fn async_wait_reports_the_timeout() {
        let store: Arc<dyn Store> = Arc::new(HashStore::new());
        let work =
            wait_async(store, vec!["never".into()], Some(Duration::from_millis(20))).unwrap();
        let e = work.wait(Some(Duration::from_secs(30))).unwrap_err();
        assert_eq!(e.status(), Status::Timeout);
    }
}
