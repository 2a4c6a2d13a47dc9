//! The fallback of the async store calls for stores with no event-driven
//! way to wait (FileStore): the blocking call on a thread of its own,
//! completing a [`Work`] whose result is the reply.

use crate::error::Result;
use crate::work::{Promise, Work};

/// Runs `op` on a new thread; the returned work completes with its outcome:
/// its error, or success with the result bytes it returned, if any.
pub fn spawn_op(op: impl FnOnce() -> Result<Option<Vec<u8>>> + Send + 'static) -> Result<Work> {
    let (promise, work) = Promise::new();
    std::thread::Builder::new()
        .name("dc-store-async".into())
        .spawn(move || promise.complete(op()))
        .map_err(|e| crate::error::Error::internal(format!("spawning a thread: {e}")))?;
    Ok(work)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::store::{FileStore, Store};
    use crate::Status;

    fn file_store(dir: &tempfile::TempDir) -> Arc<dyn Store> {
        Arc::new(FileStore::new(dir.path().join("store").to_str().unwrap(), None).unwrap())
    }

    #[test]
    fn async_get_completes_when_the_key_arrives() {
        let dir = tempfile::tempdir().unwrap();
        let store = file_store(&dir);
        let work = store.clone().get_async("k".into()).unwrap();
        assert!(!work.is_completed());
        store.set("k", b"v").unwrap();
        work.wait(Some(Duration::from_secs(30))).unwrap();
        assert_eq!(&**work.result().unwrap(), b"v");
    }

    #[test]
    fn async_wait_reports_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let work = file_store(&dir)
            .wait_async(vec!["never".into()], Some(Duration::from_millis(20)))
            .unwrap();
        let e = work.wait(Some(Duration::from_secs(30))).unwrap_err();
        assert_eq!(e.status(), Status::Timeout);
    }
}
