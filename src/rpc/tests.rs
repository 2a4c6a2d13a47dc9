//! RPC groups of worker threads in one process, through every RRef flow.

use std::sync::atomic::AtomicUsize;
use std::thread;
use std::time::Instant;

use super::*;
use crate::store::HashStore;

mod guards;

fn functions() -> HashMap<String, Arc<RpcFunction>> {
    let mut f: HashMap<String, Arc<RpcFunction>> = HashMap::new();
    f.insert(
        "echo".into(),
        Arc::new(|c: &CallArgs<'_>| Ok(c.args.to_vec())),
    );
    f.insert(
        "fail".into(),
        Arc::new(|_: &CallArgs<'_>| Err(Error::invalid_argument("the function failed on purpose"))),
    );
    f.insert(
        "sleep_ms".into(),
        Arc::new(|c: &CallArgs<'_>| {
            let ms: u64 = String::from_utf8_lossy(c.args).parse().unwrap_or(0);
            thread::sleep(Duration::from_millis(ms));
            Ok(c.args.to_vec())
        }),
    );
    // Confirms every RRef argument is confirmed when the function runs, and
    // returns how many it got.
    f.insert(
        "count_confirmed".into(),
        Arc::new(|c: &CallArgs<'_>| {
            assert!(c.rrefs.iter().all(RRef::confirmed_by_owner));
            Ok(c.rrefs.len().to_string().into_bytes())
        }),
    );
    f
}

/// A group of `n` workers, each initialised on its own thread.
fn group_with(n: u16, options: RpcOptions) -> Vec<Arc<Rpc>> {
    group_each(vec![options; usize::from(n)])
}

/// A group of workers with these options, each initialised on its own
/// thread.
fn group_each(options: Vec<RpcOptions>) -> Vec<Arc<Rpc>> {
    let store: Arc<dyn Store> = Arc::new(HashStore::new());
    let n = options.len() as u16;
    let threads: Vec<_> = (0..n)
        .zip(options)
        .map(|(rank, options)| {
            let store = store.clone_store().unwrap();
            thread::spawn(move || {
                Rpc::init(store, &format!("w{rank}"), rank, n, options, functions()).unwrap()
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn group(n: u16) -> Vec<Arc<Rpc>> {
    group_with(
        n,
        RpcOptions {
            rpc_timeout: Duration::from_secs(30),
            ..RpcOptions::default()
        },
    )
}

/// Waits until every worker's RRef counters are back to zero.
fn assert_settles(workers: &[Arc<Rpc>]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let infos: Vec<DebugInfo> = workers.iter().map(|w| w.debug_info()).collect();
        if infos.iter().all(|i| *i == DebugInfo::default()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "RRef counters never settled: {infos:?}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

fn shutdown_all(workers: Vec<Arc<Rpc>>) {
    let threads: Vec<_> = workers
        .into_iter()
        .map(|w| thread::spawn(move || w.shutdown(true, Some(Duration::from_secs(30)))))
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
}

fn call(w: &Rpc, to: &str, func: &str, args: &[u8], rrefs: &[RRef]) -> Result<Vec<u8>> {
    w.rpc_sync(to, func, args, rrefs, None)
}

#[test]
fn workers_find_each_other_and_call() {
    let ws = group(3);
    assert_eq!(
        ws[0]
            .workers()
            .iter()
            .map(|w| w.name.clone())
            .collect::<Vec<_>>(),
        ["w0", "w1", "w2"]
    );
    assert_eq!(call(&ws[0], "w1", "echo", b"hi", &[]).unwrap(), b"hi");
    assert_eq!(call(&ws[2], "w2", "echo", b"self", &[]).unwrap(), b"self");
    let work = ws[1]
        .rpc_async("w0", "echo", &[7; 100_000], &[], None)
        .unwrap();
    work.wait(None).unwrap();
    assert_eq!(work.result().unwrap().len(), 100_000);
    let e = call(&ws[0], "w1", "fail", b"", &[]).unwrap_err();
    assert_eq!(
        (e.status(), e.message()),
        (Status::Remote, "the function failed on purpose")
    );
    let e = call(&ws[0], "w1", "nope", b"", &[]).unwrap_err();
    assert_eq!(e.status(), Status::Remote);
    assert!(
        e.message()
            .contains("Unknown function 'nope' on worker 'w1'"),
        "{}",
        e.message()
    );
    let e = ws[0]
        .rpc_sync(
            "w1",
            "sleep_ms",
            b"500",
            &[],
            Some(Duration::from_millis(50)),
        )
        .unwrap_err();
    assert_eq!(e.status(), Status::Timeout);
    assert!(e
        .message()
        .starts_with("RPC ran for more than set timeout (50 ms)"));
    assert_eq!(
        call(&ws[0], "w9", "echo", b"", &[]).unwrap_err().status(),
        Status::InvalidArgument
    );
    shutdown_all(ws);
}

#[test]
fn remote_then_to_here_then_delete() {
    let ws = group(2);
    let rref = ws[0].remote("w1", "echo", b"value", &[], None).unwrap();
    assert!(!rref.is_owner());
    assert_eq!(ws[0].to_here(&rref, None).unwrap(), b"value");
    assert!(rref.confirmed_by_owner());
    assert_eq!(ws[0].owner_name(&rref), "w1");
    assert_eq!(ws[1].debug_info().num_owner_rrefs, 1);
    assert_eq!(ws[1].debug_info().num_forks, 1);
    assert!(rref.local_value().is_err());
    drop(rref);
    assert_settles(&ws);
    // remote() to oneself returns the OwnerRRef, which goes with its last
    // handle: the counters return to zero.
    for _ in 0..100 {
        let own = ws[0].remote("w0", "echo", b"mine", &[], None).unwrap();
        assert!(own.is_owner());
        assert_eq!(ws[0].to_here(&own, None).unwrap(), b"mine");
        drop(own);
    }
    assert_settles(&ws);
    assert_eq!(ws[0].debug_info().num_owner_rrefs, 0);
    // Passed to another worker, it is registered, and released again.
    let own = ws[0].remote("w0", "echo", b"lent", &[], None).unwrap();
    ws[0]
        .rpc_sync("w1", "echo", b"", std::slice::from_ref(&own), None)
        .unwrap();
    drop(own);
    assert_settles(&ws);
    assert_eq!(ws[0].debug_info().num_owner_rrefs, 0);
    shutdown_all(ws);
}

#[test]
fn a_failed_or_timed_out_remote_marks_its_rref() {
    let ws = group(2);
    let failed = ws[0].remote("w1", "fail", b"", &[], None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !failed.confirmed_by_owner() {
        assert!(Instant::now() < deadline);
        thread::sleep(Duration::from_millis(1));
    }
    let e = ws[0].to_here(&failed, None).unwrap_err();
    assert_eq!(e.message(), "the function failed on purpose");
    assert!(
        ws[0]
            .rpc_sync("w1", "echo", b"", std::slice::from_ref(&failed), None)
            .is_err(),
        "forking a failed RRef"
    );
    drop(failed);
    let slow = ws[0]
        .remote(
            "w1",
            "sleep_ms",
            b"300",
            &[],
            Some(Duration::from_millis(20)),
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ws[0].debug_info().num_pending_users > 0 {
        assert!(Instant::now() < deadline);
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        ws[0].to_here(&slow, None).unwrap_err().message(),
        rref::REMOTE_TIMED_OUT
    );
    let e = ws[0]
        .rpc_sync("w1", "echo", b"", std::slice::from_ref(&slow), None)
        .unwrap_err();
    assert_eq!(e.message(), rref::REMOTE_TIMED_OUT);
    drop(slow);
    thread::sleep(Duration::from_millis(400)); // the slow function finishes on w1
    assert_settles(&ws);
    shutdown_all(ws);
}

#[test]
fn every_fork_flow_ends_with_nothing_left() {
    let ws = group(3);
    let mut f = functions();
    // Functions that use their RRef arguments.
    for w in &ws {
        let me = Arc::downgrade(w);
        w.register(
            "fetch",
            Arc::new(move |c: &CallArgs<'_>| me.upgrade().unwrap().to_here(&c.rrefs[0], None)),
        );
        let me = Arc::downgrade(w);
        w.register(
            "forward_to_w2",
            Arc::new(move |c: &CallArgs<'_>| {
                me.upgrade()
                    .unwrap()
                    .rpc_sync("w2", "fetch", b"", c.rrefs, None)
            }),
        );
    }
    f.clear();
    // 1. The owner shares its RRef with a user (early fork registration).
    let owned = ws[0].rref(b"from-owner".to_vec());
    assert_eq!(
        call(&ws[0], "w1", "fetch", b"", std::slice::from_ref(&owned)).unwrap(),
        b"from-owner"
    );
    assert_settles(&ws);
    // 2. A user shares a UserRRef with a third worker (fork request, child accept).
    let user = ws[1].remote("w0", "echo", b"shared", &[], None).unwrap();
    assert_eq!(
        call(&ws[1], "w2", "fetch", b"", std::slice::from_ref(&user)).unwrap(),
        b"shared"
    );
    // 3. The user sends it back to its owner (phantom fork).
    assert_eq!(
        call(&ws[1], "w0", "fetch", b"", std::slice::from_ref(&user)).unwrap(),
        b"shared"
    );
    // 4. The owner sends its own RRef to itself.
    assert_eq!(
        call(&ws[0], "w0", "fetch", b"", std::slice::from_ref(&owned)).unwrap(),
        b"from-owner"
    );
    // 5. A chain: w1 -> w0 -> w2 of an RRef owned by w0, while w1 holds it.
    assert_eq!(
        call(
            &ws[1],
            "w0",
            "forward_to_w2",
            b"",
            std::slice::from_ref(&user)
        )
        .unwrap(),
        b"shared"
    );
    // 6. A function runs only once its RRef arguments are confirmed.
    let fresh = ws[1].remote("w2", "sleep_ms", b"50", &[], None).unwrap();
    assert_eq!(
        call(
            &ws[1],
            "w0",
            "count_confirmed",
            b"",
            &[fresh.clone(), user.clone()]
        )
        .unwrap(),
        b"2"
    );
    drop((owned, user, fresh));
    assert_settles(&ws);
    shutdown_all(ws);
}

#[test]
fn a_fetch_before_the_owner_exists_waits_for_it() {
    let ws = group(1);
    let ctx = &ws[0].ctx;
    let id = ctx.gen_globally_unique_id();
    let seen = Arc::new(AtomicUsize::new(0));
    let s2 = seen.clone();
    ctx.get_owner_rref(id, move |owner| {
        assert_eq!(owner.rref_id(), id);
        s2.fetch_add(1, Ordering::SeqCst);
    });
    assert_eq!(seen.load(Ordering::SeqCst), 0);
    let owner = ctx.get_or_create_owner_rref(id);
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    // Forks and deletes are idempotent under retried messages.
    let fork = ctx.gen_globally_unique_id();
    ctx.add_fork_of_owner_if_not_present(id, fork);
    ctx.add_fork_of_owner_if_not_present(id, fork);
    assert_eq!(ctx.debug_info().num_forks, 1);
    assert!(ctx.del_fork_of_owner(id, fork).is_some());
    assert!(ctx.del_fork_of_owner(id, fork).is_none());
    drop(owner);
    assert_settles(&ws);
    shutdown_all(ws);
}

#[test]
fn thousands_of_rrefs_across_three_workers() {
    let ws = group(3);
    for w in &ws {
        let me = Arc::downgrade(w);
        w.register(
            "fetch",
            Arc::new(move |c: &CallArgs<'_>| me.upgrade().unwrap().to_here(&c.rrefs[0], None)),
        );
    }
    let rrefs: Vec<RRef> = (0..2000u32)
        .map(|i| {
            ws[0]
                .remote("w1", "echo", &i.to_le_bytes(), &[], None)
                .unwrap()
        })
        .collect();
    for chunk in rrefs.chunks(50) {
        let works: Vec<Work> = chunk
            .iter()
            .map(|r| {
                ws[0]
                    .rpc_async("w2", "fetch", b"", std::slice::from_ref(r), None)
                    .unwrap()
            })
            .collect();
        for w in works {
            w.wait(None).unwrap();
        }
    }
    assert_eq!(ws[1].debug_info().num_owner_rrefs, 2000);
    drop(rrefs);
    assert_settles(&ws);
    shutdown_all(ws);
}

/// Asserts `e` is PeerFailed naming `worker`, or a remote error whose
/// message does (the failure met on another worker).
fn assert_names(e: &Error, worker: &WorkerInfo, status: Status) {
    assert_eq!(e.status(), status, "{e}");
    let named = format!(
        "RPC worker '{}' (id {}, address {}) failed: connection lost",
        worker.name, worker.id, worker.addr
    );
    assert!(e.message().contains(&named), "{e}");
}

#[test]
fn a_lost_worker_fails_what_waits_on_it_at_once_and_nothing_else() {
    let ws = group(3);
    let w2 = ws[0].worker("w2").unwrap();
    let rref = ws[0].remote("w2", "echo", b"doomed", &[], None).unwrap();
    ws[0].to_here(&rref, None).unwrap();
    let pending = ws[0]
        .rpc_async("w2", "sleep_ms", b"1500", &[], None)
        .unwrap();
    thread::sleep(Duration::from_millis(50));
    let lost = Instant::now();
    ws[2].shutdown(false, None).unwrap(); // its connections close as a crash's
    let e = pending.wait(None).unwrap_err();
    assert!(
        lost.elapsed() < Duration::from_secs(1),
        "{:?}",
        lost.elapsed()
    );
    assert_names(&e, &w2, Status::PeerFailed);
    // Later: a call, to_here, and passing the RRef to w1, whose fork of it
    // cannot be confirmed by w2 (it learns that w2 is lost by trying).
    assert_names(
        &call(&ws[0], "w2", "echo", b"", &[]).unwrap_err(),
        &w2,
        Status::PeerFailed,
    );
    assert_names(
        &ws[0].to_here(&rref, None).unwrap_err(),
        &w2,
        Status::PeerFailed,
    );
    let passing = Instant::now();
    let args = std::slice::from_ref(&rref);
    let e = call(&ws[0], "w1", "count_confirmed", b"", args).unwrap_err();
    assert_names(&e, &w2, Status::Remote);
    assert!(
        passing.elapsed() < Duration::from_secs(1),
        "not retried: {:?}",
        passing.elapsed()
    );
    // w0 and w1 go on.
    assert_eq!(call(&ws[0], "w1", "echo", b"alive", &[]).unwrap(), b"alive");
    assert_eq!(call(&ws[1], "w0", "echo", b"alive", &[]).unwrap(), b"alive");
    drop(rref);
    for w in &ws[..2] {
        w.shutdown(false, None).unwrap();
    }
    assert_eq!(
        call(&ws[0], "w1", "echo", b"", &[]).unwrap_err().status(),
        Status::ShutDown
    );
}

#[test]
fn graceful_shutdown_deletes_what_is_left_and_reports_leaks_when_asked() {
    let ws = group(2);
    let kept = ws[0]
        .remote("w1", "echo", b"still held", &[], None)
        .unwrap();
    kept.confirmed_by_owner();
    // The user still holds `kept`: graceful shutdown deletes it anyway.
    shutdown_all(ws.clone());
    assert_eq!(ws[1].debug_info(), DebugInfo::default());
    drop(kept);

    let strict = group_with(
        2,
        RpcOptions {
            ignore_rref_leak: false,
            rpc_timeout: Duration::from_secs(5),
            ..RpcOptions::default()
        },
    );
    let owned = strict[1].rref(b"x".to_vec());
    // Forked (to w0) but the fork's user is dropped without telling anyone:
    // simulate with a fork registered on the owner and never deleted.
    strict[1].ctx.prepare_child_fork(&owned).unwrap();
    let results: Vec<_> = strict
        .iter()
        .map(|w| {
            let w = w.clone();
            thread::spawn(move || w.shutdown(true, Some(Duration::from_millis(500))))
        })
        .collect();
    let outcomes: Vec<_> = results.into_iter().map(|t| t.join().unwrap()).collect();
    let leak = outcomes[1].as_ref().unwrap_err();
    assert!(
        leak.message()
            .contains("Leaking RRef GloballyUniqueId(created_on=1"),
        "{}",
        leak.message()
    );
}
