//! TcpStore client + server together, in both protocol modes.

use std::thread;

use super::*;
use crate::store::conformance;

fn server_store() -> TcpStore {
    TcpStore::new(TcpStoreOptions {
        is_server: true,
        ..TcpStoreOptions::default()
    })
    .unwrap()
}

fn client_of(port: u16) -> TcpStore {
    TcpStore::new(TcpStoreOptions {
        port,
        ..TcpStoreOptions::default()
    })
    .unwrap()
}

#[test]
fn conforms_against_a_distcore_server() {
    conformance::run_all(&|| {
        let s = server_store();
        assert!(s.peer_is_distcore());
        Arc::new(s) as Arc<dyn Store>
    });
}

#[test]
fn a_leased_view_needs_a_session_and_a_distcore_server() {
    let store = server_store();
    let leased = store.leased();
    assert!(leased.is_leased() && !store.is_leased());
    let refused = leased.set("k", b"v").unwrap_err();
    assert_eq!(refused.status(), Status::InvalidState, "{refused}");
    assert!(!store.check(&["k"]).unwrap(), "nothing was written");
    store
        .open_session(&SessionOptions::new("view/", 0))
        .unwrap();
    leased.set("view/k", b"v").unwrap();
    assert_eq!(
        leased.get("view/k").unwrap(),
        b"v",
        "it reads as the handle"
    );
    assert!(!leased
        .clone_store()
        .unwrap()
        .as_any()
        .downcast_ref::<TcpStore>()
        .unwrap()
        .is_leased());
    store.close_session().unwrap();
    assert!(
        !store.check(&["view/k"]).unwrap(),
        "deleted with the session"
    );

    let server = Server::start(ServerOptions {
        extensions: false,
        ..ServerOptions::default()
    })
    .unwrap();
    let pytorch = client_of(server.port());
    let refused = pytorch.leased().add("k", 1).unwrap_err();
    assert_eq!(refused.status(), Status::NotSupported, "{refused}");
}

#[test]
fn wait_for_workers_on_a_member_names_the_ranks_with_no_session() {
    let server = TcpStore::new(TcpStoreOptions {
        is_server: true,
        world_size: Some(3),
        wait_for_workers: false,
        timeout: Duration::from_millis(300),
        ..TcpStoreOptions::default()
    })
    .unwrap();
    server
        .open_session(&SessionOptions::new("workers/", 0))
        .unwrap();
    let one = client_of(server.port());
    one.open_session(&SessionOptions::new("workers/", 1))
        .unwrap();
    let error = server.wait_for_workers().unwrap_err();
    assert_eq!(error.status(), Status::Timeout);
    assert!(
        error
            .message()
            .ends_with("1/3 clients joined. Ranks with no session in group 'workers/': 2."),
        "{error}"
    );
}

#[test]
fn conforms_in_pytorch_mode() {
    // A server without the extensions answers like PyTorch's: the client
    // falls back to WAIT + GET and never sends a command it would not know.
    conformance::run_all(&|| {
        let server = Arc::new(
            Server::start(ServerOptions {
                extensions: false,
                ..ServerOptions::default()
            })
            .unwrap(),
        );
        let mut store = client_of(server.port());
        assert!(!store.peer_is_distcore());
        store.server = Some(server);
        Arc::new(store) as Arc<dyn Store>
    });
}

#[test]
fn keys_travel_with_a_slash_and_list_without_it() {
    let s = server_store();
    s.set("k1", b"v1").unwrap();
    s.add_raw(INIT_KEY, 1).unwrap();
    assert_eq!(s.get_raw("/k1").unwrap(), b"v1");
    assert_eq!(s.list_keys().unwrap(), vec!["k1".to_string()]);
    assert_eq!(s.num_keys().unwrap(), 2, "init/ counts, as in PyTorch");
}

#[test]
fn server_waits_for_workers_then_times_out_with_pytorch_message() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let workers: Vec<_> = (0..2)
        .map(|_| {
            thread::spawn(move || {
                TcpStore::new(TcpStoreOptions {
                    port,
                    world_size: Some(3),
                    ..TcpStoreOptions::default()
                })
            })
        })
        .collect();
    let master = TcpStore::new(TcpStoreOptions {
        is_server: true,
        port,
        world_size: Some(3),
        ..TcpStoreOptions::default()
    })
    .unwrap();
    for w in workers {
        w.join().unwrap().unwrap();
    }
    assert_eq!(master.get_raw(INIT_KEY).unwrap(), b"3");
    let e = TcpStore::new(TcpStoreOptions {
        is_server: true,
        world_size: Some(3),
        timeout: Duration::from_millis(300),
        ..TcpStoreOptions::default()
    })
    .err()
    .unwrap();
    assert_eq!(e.status(), Status::Timeout);
    assert_eq!(
        e.message(),
        "Timed out after 1 seconds waiting for clients. 1/3 clients joined."
    );
}

#[test]
fn multi_tenant_handles_share_one_server() {
    let first = TcpStore::new(TcpStoreOptions {
        is_server: true,
        multi_tenant: true,
        ..TcpStoreOptions::default()
    })
    .unwrap();
    let port = first.port();
    let second = TcpStore::new(TcpStoreOptions {
        is_server: true,
        multi_tenant: true,
        port,
        ..TcpStoreOptions::default()
    })
    .unwrap();
    first.set("shared", b"1").unwrap();
    assert_eq!(second.get("shared").unwrap(), b"1");
    drop(first);
    // The server lives while any handle does.
    assert_eq!(client_of(port).get("shared").unwrap(), b"1");
    drop(second);
}

#[test]
fn wait_and_barrier_timeouts_use_pytorch_messages() {
    let s = server_store();
    let e = s
        .wait(&["never"], Some(Duration::from_millis(200)))
        .unwrap_err();
    assert_eq!(
        (e.status(), e.message()),
        (Status::Timeout, "wait timeout after 200ms, keys: /never")
    );
    let e = s
        .barrier("bar2", 2, Some(Duration::from_millis(100)))
        .unwrap_err();
    assert_eq!(
        (e.status(), e.message()),
        (Status::Timeout, "barrier timeout after 100ms, key: bar2")
    );
    // The connection stays usable after a cancelled wait.
    s.set("after", b"ok").unwrap();
    assert_eq!(s.get("after").unwrap(), b"ok");
}

#[test]
fn a_value_arriving_during_cancel_is_still_returned_or_timed_out_cleanly() {
    let s = Arc::new(server_store());
    let writer = s.clone_store().unwrap();
    for i in 0..50 {
        let key = format!("race{i}");
        let w = writer.clone_store().unwrap();
        let k2 = key.clone();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_micros(200 * (i % 10)));
            w.set(&k2, b"v").unwrap();
        });
        s.set_timeout(Duration::from_millis(1));
        match s.get(&key) {
            Ok(v) => assert_eq!(v, b"v"),
            Err(e) => assert_eq!(e.status(), Status::Timeout),
        }
        t.join().unwrap();
        s.set_timeout(Duration::from_secs(30));
        assert_eq!(
            s.get(&key).unwrap(),
            b"v",
            "connection out of sync after the race"
        );
    }
}

#[test]
fn a_dead_server_is_a_network_error_not_a_hang() {
    let server = Arc::new(Server::start(ServerOptions::default()).unwrap());
    let client = Arc::new(client_of(server.port()));
    let waiter = {
        let c = client.clone();
        thread::spawn(move || {
            let start = Instant::now();
            (
                c.wait(&["never"], Some(Duration::from_secs(60))),
                start.elapsed(),
            )
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.stats().pending_waits == 0 {
        assert!(Instant::now() < deadline);
        thread::sleep(Duration::from_millis(5));
    }
    drop(server);
    let (result, elapsed) = waiter.join().unwrap();
    assert_eq!(result.unwrap_err().status(), Status::Network);
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    // The next operation tries to reconnect, for its timeout.
    client.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    assert_eq!(client.set("x", b"1").unwrap_err().status(), Status::Network);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn connect_retries_until_the_server_appears_then_gives_up_in_time() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let late = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        TcpStore::new(TcpStoreOptions {
            is_server: true,
            port,
            ..TcpStoreOptions::default()
        })
        .unwrap()
    });
    let c = TcpStore::new(TcpStoreOptions {
        port,
        timeout: Duration::from_secs(20),
        ..TcpStoreOptions::default()
    })
    .unwrap();
    c.set("k", b"v").unwrap();
    let server = late.join().unwrap();
    drop(c);
    drop(server);
    let start = Instant::now();
    let e = TcpStore::new(TcpStoreOptions {
        port,
        timeout: Duration::from_millis(700),
        ..TcpStoreOptions::default()
    })
    .err()
    .unwrap();
    assert_eq!(e.status(), Status::Network);
    assert!(
        e.message().contains("timed out after 700ms"),
        "{}",
        e.message()
    );
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn ipv6_and_hostnames_resolve() {
    let s = server_store();
    for host in ["localhost", "::1", "[::1]"] {
        if host.contains(':') && std::net::TcpStream::connect(("::1", s.port())).is_err() {
            continue; // no IPv6 loopback on this host
        }
        let c = TcpStore::new(TcpStoreOptions {
            host: host.into(),
            port: s.port(),
            ..TcpStoreOptions::default()
        })
        .unwrap();
        c.set(host, b"1").unwrap();
    }
    assert_eq!(
        s.num_keys().unwrap(),
        2 + i64::from(std::net::TcpStream::connect(("::1", s.port())).is_ok())
    );
}

#[test]
fn counters_track_each_operation() {
    let s = server_store();
    for _ in 0..3 {
        s.set("k", b"v").unwrap();
    }
    s.get("k").unwrap();
    let counters = s.counters();
    let set = counters.iter().find(|c| c.op == "set").unwrap();
    assert_eq!(set.count, 3);
    assert!(set.mean_ms >= 0.0 && set.variance_ms >= 0.0);
    assert_eq!(counters.iter().find(|c| c.op == "get").unwrap().count, 1);
}

#[test]
fn large_values_round_trip() {
    let s = server_store();
    let value: Vec<u8> = (0..(16 << 20)).map(|i| (i % 251) as u8).collect();
    s.set("big", &value).unwrap();
    assert_eq!(s.get("big").unwrap(), value);
}

/// Polls `f` until it holds, for at most 10 s.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

fn pending_waits(s: &TcpStore) -> usize {
    s.server().unwrap().stats().pending_waits
}

#[test]
fn blocked_gets_never_hold_up_other_threads_on_the_same_handle() {
    let s = Arc::new(server_store());
    s.set_timeout(Duration::from_secs(60));
    let blocked: Vec<_> = (0..63)
        .map(|i| {
            let s = s.clone();
            thread::spawn(move || s.get(&format!("late{i}")))
        })
        .collect();
    eventually("63 gets waiting", || pending_waits(&s) == 63);
    let start = Instant::now();
    s.set("k", b"v").unwrap();
    assert_eq!(s.add("n", 2).unwrap(), 2);
    assert_eq!(s.get("k").unwrap(), b"v");
    // Not wedged until the gets time out (60 s): well before.
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
    for i in 0..63 {
        s.set(&format!("late{i}"), b"x").unwrap();
    }
    for h in blocked {
        assert_eq!(h.join().unwrap().unwrap(), b"x");
    }
}

#[test]
fn an_async_get_then_a_set_on_the_same_handle_both_complete() {
    let s = Arc::new(server_store());
    let work = s.clone().get_async("k".into()).unwrap();
    eventually("the get waiting", || pending_waits(&s) == 1);
    s.set("k", b"v").unwrap();
    work.wait(Some(Duration::from_secs(30))).unwrap();
    assert_eq!(&**work.result().unwrap(), b"v");
    // Every async flavour, through a PrefixStore too.
    let prefixed: Arc<dyn Store> = Arc::new(crate::store::PrefixStore::new("p", s.clone()));
    let waited = prefixed.clone().wait_async(vec!["w".into()], None).unwrap();
    let popped = prefixed.clone().queue_pop_async("q".into()).unwrap();
    let barrier = s.clone().barrier_async("b".into(), 1, None).unwrap();
    prefixed.set("w", b"1").unwrap();
    prefixed.queue_push("q", b"e").unwrap();
    for w in [&waited, &popped, &barrier] {
        w.wait(Some(Duration::from_secs(30))).unwrap();
    }
    assert_eq!(&**popped.result().unwrap(), b"e");
}

#[test]
fn async_operations_share_one_thread() {
    fn threads() -> usize {
        std::fs::read_dir("/proc/self/task").unwrap().count()
    }
    let s = Arc::new(server_store());
    // Starts the waiter thread if no test has yet.
    s.clone()
        .wait_async(vec!["warm".into()], Some(Duration::from_millis(1)))
        .unwrap()
        .wait(Some(Duration::from_secs(30)))
        .unwrap_err();
    let before = threads();
    let works: Vec<_> = (0..200)
        .map(|i| s.clone().get_async(format!("a{i}")).unwrap())
        .collect();
    eventually("200 gets waiting", || pending_waits(&s) == 200);
    // Other tests run threads of their own meanwhile (50 were seen once): a
    // thread per get would add 200.
    assert!(
        threads() < before + 150,
        "{} threads, {before} before",
        threads()
    );
    for i in 0..200 {
        s.set(&format!("a{i}"), b"v").unwrap();
    }
    for w in works {
        w.wait(Some(Duration::from_secs(30))).unwrap();
    }
}

#[test]
fn an_aborted_or_abandoned_async_wait_releases_its_waiter_on_the_server() {
    let s = Arc::new(server_store());
    let work = s.clone().get_async("never".into()).unwrap();
    eventually("the get waiting", || pending_waits(&s) == 1);
    work.abort();
    eventually("the aborted get released", || pending_waits(&s) == 0);
    let work = s.clone().wait_async(vec!["never".into()], None).unwrap();
    eventually("the wait waiting", || pending_waits(&s) == 1);
    drop(work);
    eventually("the dropped wait released", || pending_waits(&s) == 0);
    // With a callback to run, dropping the handle keeps the operation.
    let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let work = s.clone().get_async("later".into()).unwrap();
    let flag = ran.clone();
    work.add_done_callback(Box::new(move |_| {
        flag.store(true, std::sync::atomic::Ordering::SeqCst)
    }));
    drop(work);
    s.set("later", b"1").unwrap();
    eventually("the callback ran", || {
        ran.load(std::sync::atomic::Ordering::SeqCst)
    });
}

#[test]
fn add_on_a_non_integer_is_an_invalid_argument_and_the_handle_lives() {
    let s = server_store();
    s.set("k", b"abc").unwrap();
    let e = s.add("k", 1).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("not an integer"), "{}", e.message());
    s.set("x", b"1").unwrap();
    assert_eq!(s.get("x").unwrap(), b"1");
    assert_eq!(
        s.server().unwrap().stats().connections,
        2,
        "no reconnect was needed"
    );
}

#[test]
fn a_request_over_the_servers_limits_is_refused_before_it_is_sent() {
    let s = TcpStore::new(TcpStoreOptions {
        is_server: true,
        max_value_len: 1 << 20,
        ..TcpStoreOptions::default()
    })
    .unwrap();
    let big = vec![1u8; (1 << 20) + 1];
    for result in [
        s.set("k", &big),
        s.append("k", &big),
        s.queue_push("k", &big),
        s.multi_set(&["a", "k"], &[b"1", &big]),
        s.compare_set("k", b"", &big).map(drop),
    ] {
        let e = result.unwrap_err();
        assert_eq!(e.status(), Status::InvalidArgument);
        assert!(
            e.message().contains("exceeds the server's limit"),
            "{}",
            e.message()
        );
    }
    let long_key = "k".repeat(9 << 10);
    assert_eq!(
        s.get(&long_key).unwrap_err().status(),
        Status::InvalidArgument
    );
    s.set("k", &big[..1 << 20]).unwrap();
    assert_eq!(s.get("k").unwrap().len(), 1 << 20);
    // Appending past the limit is the server's call: an error reply.
    let e = s.append("k", b"x").unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument, "{}", e.message());
    assert_eq!(s.num_keys().unwrap(), 1);
}

#[test]
fn against_a_pytorch_server_pytorchs_limits_apply() {
    let server = Server::start(ServerOptions {
        extensions: false,
        ..ServerOptions::default()
    })
    .unwrap();
    let s = client_of(server.port());
    let e = s.set("k", &vec![0u8; (8 << 20) + 1]).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    s.set("k", &vec![0u8; 8 << 20]).unwrap();
    assert_eq!(s.get("k").unwrap().len(), 8 << 20);
}

#[test]
fn a_restarted_server_is_reconnected_on_the_next_operation() {
    let server = Server::start(ServerOptions::default()).unwrap();
    let port = server.port();
    let s = client_of(port);
    s.set("before", b"1").unwrap();
    let waiter = s.clone_store().unwrap();
    drop(server);
    let server = Server::start(ServerOptions {
        port,
        ..ServerOptions::default()
    })
    .unwrap();
    // "before" had no reply, and the server that may have had it is gone:
    // the next call says so instead of reconnecting around it.
    let lost = s.set("after", b"2").unwrap_err();
    assert_eq!(lost.status(), Status::Network);
    assert!(lost.message().contains("1 write(s)"), "{}", lost.message());
    // The old connections are closed: the next operations reconnect.
    s.set("after", b"2").unwrap();
    assert_eq!(s.get("after").unwrap(), b"2");
    assert_eq!(s.num_keys().unwrap(), 1, "the new server starts empty");
    assert_eq!(waiter.get("after").unwrap(), b"2");
    drop(server);
}

#[test]
fn sets_sent_just_before_a_handle_closes_are_applied() {
    // A closing socket with unread bytes is reset by the kernel, which can
    // lose what the server had not read yet: a set leaves nothing to read.
    let s = server_store();
    for round in 0..20 {
        let c = client_of(s.port());
        for i in 0..1000 {
            c.set(&format!("r{round}/{i}"), b"v").unwrap();
        }
        drop(c);
        let last = format!("r{round}/999");
        s.wait(&[&last], Some(Duration::from_secs(10))).unwrap();
    }
    assert_eq!(s.num_keys().unwrap(), 20 * 1000);
}
