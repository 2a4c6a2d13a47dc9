//! torchelastic's store helpers (`torch.distributed.elastic.utils.store`):
//! the same keys and values, so distcore and Python agents can meet in one
//! barrier or synchronize on one store.

use std::time::Duration;

use super::{Store, TimeoutGuard};
use crate::error::{Error, Result, Status};

const NUM_MEMBERS: &str = "/num_members";
const LAST_MEMBER_CHECKIN: &str = "/last_member";
const TRACE: &str = "/TRACE";
const TRACING_GATE: &str = "/TRACING_GATE";
const MAX_TRACE_MISSING_RANKS: usize = 16;
const VAL_IGNORED: &[u8] = b"<val_ignored>";

/// torchelastic's default wait for the missing-rank trace of a timed-out barrier.
pub const DEFAULT_TRACE_TIMEOUT: Duration = Duration::from_secs(10);

/// The most ranks [`get_all`] reads (one key each, in one request): a
/// TCPStore request's key limit (PyTorch's).
pub(crate) const MAX_GET_ALL_RANKS: i64 = 128 << 10;

/// Refuses a world size below 1 (a barrier that could never complete) and,
/// when given, a rank outside `0..world_size`.
pub(crate) fn check_world(world_size: i64, rank: Option<i64>) -> Result<()> {
    if world_size < 1 {
        return Err(Error::invalid_argument(format!(
            "world_size must be at least 1, not {world_size}"
        )));
    }
    match rank {
        Some(rank) if !(0..world_size).contains(&rank) => Err(Error::invalid_argument(format!(
            "rank {rank} is not in 0..{world_size} (the world size)"
        ))),
        _ => Ok(()),
    }
}

/// The non-blocking half of a barrier: count this member in and, as the last
/// one, set the key everyone waits on. Returns that key.
fn barrier_nonblocking(store: &dyn Store, world_size: i64, key_prefix: &str) -> Result<String> {
    let last_member_key = format!("{key_prefix}{LAST_MEMBER_CHECKIN}");
    let idx = store.add(&format!("{key_prefix}{NUM_MEMBERS}"), 1)?;
    if idx == world_size {
        store.set(&last_member_key, VAL_IGNORED)?;
    }
    Ok(last_member_key)
}

/// Reads `{prefix}0 .. {prefix}{world_size-1}` (waiting for each), then
/// checks in to `{prefix}/finished`; rank 0 waits until every rank has read,
/// since in torchelastic it hosts the store and must leave last.
pub fn get_all(
    store: &dyn Store,
    rank: i64,
    prefix: &str,
    world_size: i64,
) -> Result<Vec<Vec<u8>>> {
    check_world(world_size, Some(rank))?;
    if world_size > MAX_GET_ALL_RANKS {
        return Err(Error::invalid_argument(format!(
            "get_all reads one key per rank, at most {MAX_GET_ALL_RANKS}: not {world_size}"
        )));
    }
    let keys: Vec<String> = (0..world_size).map(|i| format!("{prefix}{i}")).collect();
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let data = store.multi_get(&key_refs)?;
    let barrier_key = barrier_nonblocking(store, world_size, &format!("{prefix}/finished"))?;
    if rank == 0 {
        store.wait(&[&barrier_key], None)?;
    }
    Ok(data)
}

/// Publishes `data` as `{key_prefix}{rank}` and returns every rank's data, in
/// rank order, with the store's timeout set to `timeout` meanwhile.
pub fn synchronize(
    store: &dyn Store,
    data: &[u8],
    rank: i64,
    world_size: i64,
    key_prefix: &str,
    timeout: Duration,
) -> Result<Vec<Vec<u8>>> {
    check_world(world_size, Some(rank))?;
    let guard = TimeoutGuard::new(store, timeout);
    let store = guard.store();
    store.set(&format!("{key_prefix}{rank}"), data)?;
    get_all(store, rank, key_prefix, world_size)
}

/// Blocks until `world_size` members have entered the barrier `key_prefix`
/// (usable once per prefix), with the store's timeout set to `timeout`.
pub fn barrier(
    store: &dyn Store,
    world_size: i64,
    key_prefix: &str,
    timeout: Duration,
) -> Result<()> {
    check_world(world_size, None)?;
    let guard = TimeoutGuard::new(store, timeout);
    let last_member_key = barrier_nonblocking(guard.store(), world_size, key_prefix)?;
    guard.store().wait(&[&last_member_key], None)
}

/// [`barrier`] that, on a timeout, finds out which ranks never arrived (up to
/// 16, waiting `trace_timeout` for the first) and fails with torchelastic's
/// "Timed out waiting on barrier on rank ..." message naming them.
pub fn barrier_traced(
    store: &dyn Store,
    world_size: i64,
    key_prefix: &str,
    timeout: Duration,
    rank: i64,
    trace_timeout: Duration,
) -> Result<()> {
    check_world(world_size, Some(rank))?;
    let guard = TimeoutGuard::new(store, timeout);
    let store = guard.store();
    let last_member_key = barrier_nonblocking(store, world_size, key_prefix)?;
    let error = match store.wait(&[&last_member_key], None) {
        Err(e) if e.status() == Status::Timeout => e,
        other => return other,
    };
    match detect_missing_ranks(store, world_size, key_prefix, rank, trace_timeout)? {
        Some(missing) => Err(Error::timeout(format!(
            "Timed out waiting on barrier on rank {rank}, for key prefix: {key_prefix} \
             (world_size={world_size}, missing_ranks=[{}], timeout={})",
            missing.join(", "),
            python_seconds(timeout)
        ))),
        None => Err(error),
    }
}

/// torchelastic's `_try_detecting_missing_ranks`: rank 0 collects who never
/// traced in; the others learn to ask rank 0.
fn detect_missing_ranks(
    store: &dyn Store,
    world_size: i64,
    key_prefix: &str,
    rank: i64,
    trace_timeout: Duration,
) -> Result<Option<Vec<String>>> {
    store.set(&format!("{key_prefix}{rank}{TRACE}"), VAL_IGNORED)?;
    let gate = format!("{key_prefix}{TRACING_GATE}");
    if rank != 0 {
        return match store.wait(&[&gate], None) {
            Ok(()) => Ok(Some(vec![
                "[<check rank 0 (0) for missing rank info>]".into()
            ])),
            Err(e) if e.status() == Status::Timeout => Ok(None),
            Err(e) => Err(e),
        };
    }
    let mut missing = Vec::new();
    for i in 1..world_size {
        if missing.len() >= MAX_TRACE_MISSING_RANKS {
            break;
        }
        let wait_for = if missing.is_empty() {
            trace_timeout
        } else {
            Duration::from_millis(1)
        };
        match store.wait(&[&format!("{key_prefix}{i}{TRACE}")], Some(wait_for)) {
            Ok(()) => {}
            Err(e) if e.status() == Status::Timeout => missing.push(i.to_string()),
            Err(e) => return Err(e),
        }
    }
    store.set(&gate, VAL_IGNORED)?;
    Ok(Some(missing))
}

/// Seconds as Python prints a float (`300.0`, `0.5`).
fn python_seconds(timeout: Duration) -> String {
    let secs = timeout.as_secs_f64();
    if secs.fract() == 0.0 {
        format!("{secs:.1}")
    } else {
        format!("{secs}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_world_that_cannot_meet_is_refused_at_once() {
        let store = crate::store::HashStore::new();
        let t = Duration::from_secs(30);
        for bad in [0, -1] {
            let e = barrier(&store, bad, "b", t).unwrap_err();
            assert_eq!(e.status(), Status::InvalidArgument, "{e}");
        }
        let e = synchronize(&store, b"x", 3, 3, "s", t).unwrap_err();
        assert!(e.message().contains("rank 3 is not in 0..3"), "{e}");
        let e = barrier_traced(&store, 2, "t", t, -1, t).unwrap_err();
        assert_eq!(e.status(), Status::InvalidArgument);
        let e = get_all(&store, 0, "g", MAX_GET_ALL_RANKS + 1).unwrap_err();
        assert_eq!(e.status(), Status::InvalidArgument);
    }
    use crate::store::HashStore;
    use std::sync::Arc;
    use std::thread;

    fn spawn_ranks<T: Send + 'static>(
        world: i64,
        f: impl Fn(Arc<dyn Store>, i64) -> T + Send + Sync + 'static,
        store: &Arc<dyn Store>,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let threads: Vec<_> = (0..world)
            .map(|rank| {
                let (f, s) = (f.clone(), store.clone_store().unwrap());
                thread::spawn(move || f(s, rank))
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    #[test]
    fn barrier_uses_torchelastic_keys() {
        let store: Arc<dyn Store> = Arc::new(HashStore::new());
        let results = spawn_ranks(
            4,
            |s, _| barrier(&*s, 4, "bar", Duration::from_secs(30)),
            &store,
        );
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(store.get("bar/num_members").unwrap(), b"4");
        assert_eq!(store.get("bar/last_member").unwrap(), b"<val_ignored>");
        assert_eq!(store.timeout(), Duration::from_secs(300));
    }

    #[test]
    fn synchronize_returns_everyone_in_rank_order() {
        let store: Arc<dyn Store> = Arc::new(HashStore::new());
        let results = spawn_ranks(
            3,
            |s, rank| {
                let data = format!("data{rank}");
                synchronize(
                    &*s,
                    data.as_bytes(),
                    rank,
                    3,
                    "sync/",
                    Duration::from_secs(30),
                )
            },
            &store,
        );
        for r in results {
            assert_eq!(
                r.unwrap(),
                vec![b"data0".to_vec(), b"data1".to_vec(), b"data2".to_vec()]
            );
        }
        assert_eq!(store.get("sync//finished/num_members").unwrap(), b"3");
        assert!(store.check(&["sync//finished/last_member"]).unwrap());
    }

    #[test]
    fn rank_zero_of_get_all_waits_for_the_others() {
        let store: Arc<dyn Store> = Arc::new(HashStore::new());
        store.multi_set(&["p0", "p1"], &[b"a", b"b"]).unwrap();
        store.set_timeout(Duration::from_millis(100));
        let e = get_all(&*store, 0, "p", 2).unwrap_err();
        assert_eq!(e.status(), Status::Timeout);
        // Rank 1 does not wait and completes the barrier.
        assert_eq!(get_all(&*store, 1, "p", 2).unwrap().len(), 2);
        assert!(store.check(&["p/finished/last_member"]).unwrap());
    }

    #[test]
    fn traced_barrier_names_missing_ranks() {
        let store: Arc<dyn Store> = Arc::new(HashStore::new());
        let other = store.clone_store().unwrap();
        let rank1 = thread::spawn(move || {
            barrier_traced(
                &*other,
                3,
                "tb",
                Duration::from_millis(200),
                1,
                Duration::from_millis(100),
            )
        });
        let e = barrier_traced(
            &*store,
            3,
            "tb",
            Duration::from_millis(200),
            0,
            Duration::from_millis(100),
        )
        .unwrap_err();
        assert_eq!(
            e.message(),
            "Timed out waiting on barrier on rank 0, for key prefix: tb \
             (world_size=3, missing_ranks=[2], timeout=0.2)"
        );
        let e1 = rank1.join().unwrap().unwrap_err();
        assert!(e1.message().contains("check rank 0"), "{}", e1.message());
    }
}
