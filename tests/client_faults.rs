//! The TCPStore client when its server stops answering: frozen (SIGSTOP) or
//! cut off by a partition (a network namespace behind a veth pair, its
//! traffic dropped with iptables; created and removed by the test). Every
//! operation must end within its timeout plus the documented cancel grace,
//! and the same handle must work again once the server does.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use distcore::store::{Store, TcpStore};
use distcore::Status;

mod common;
use common::{Netns, Serve};

const TIMEOUT: Duration = Duration::from_secs(3);
/// The cancel grace (0.5 s) and scheduling on a busy machine.
const SLACK: Duration = Duration::from_millis(1500);

fn client(host: &str, port: u16) -> TcpStore {
    common::client(host, port, TIMEOUT)
}

/// Runs `op`, asserts it failed (timeout or network) within the timeout
/// plus the slack, and prints how long it took.
fn ends_in_time<T: std::fmt::Debug>(what: &str, op: impl FnOnce() -> distcore::Result<T>) {
    let start = Instant::now();
    let result = op();
    let took = start.elapsed();
    println!("{what}: {took:.2?} -> {result:?}");
    let status = result.expect_err(what).status();
    assert!(
        matches!(status, Status::Timeout | Status::Network),
        "{what}: {status:?}"
    );
    assert!(took <= TIMEOUT + SLACK, "{what} took {took:?}");
}

#[test]
fn a_frozen_server_cannot_hold_any_operation_past_its_timeout() {
    let serve = Serve::start();
    let store = Arc::new(client("127.0.0.1", serve.port));
    store.set("k", b"v").unwrap();
    serve.signal(libc::SIGSTOP);
    let big = vec![7u8; 32 << 20];
    ends_in_time("get (missing key)", || store.get("missing"));
    ends_in_time("get (present key)", || store.get("k"));
    ends_in_time("wait", || store.wait(&["missing"], None));
    ends_in_time("add", || store.add("n", 1));
    ends_in_time("check", || store.check(&["k"]));
    ends_in_time("barrier", || store.barrier("b", 2, None));
    ends_in_time("set 32 MiB", || store.set("big", &big));
    ends_in_time("async get", || {
        let work = store.clone().get_async("missing".into())?;
        work.wait(Some(Duration::from_secs(60)))
    });
    // Many threads at once: none waits for another's timeout on top of its own.
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            thread::spawn(move || {
                ends_in_time(&format!("thread {i} add"), || store.add("n", 1));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    serve.signal(libc::SIGCONT);
    // The same handle works again: broken connections were replaced.
    store.set("after", b"1").unwrap();
    assert_eq!(store.get("after").unwrap(), b"1");
    assert_eq!(store.get("k").unwrap(), b"v");
}

#[test]
fn a_partition_is_timed_out_on_time_and_the_handle_works_after_it_heals() {
    let netns = match Netns::create() {
        Ok(netns) => netns,
        Err(why) => panic!(
            "network namespaces are unavailable here, so the partition test cannot run \
             (it needs root, iproute2 and iptables): {why}"
        ),
    };
    let serve = Serve::start_in(&netns.name, &["--host", &netns.inside]);
    let store = Arc::new(client(&netns.inside, serve.port));
    store.set("k", b"v").unwrap();

    // A wait that spans a short partition completes: its connection lives.
    let spanning = {
        let store = store.clone();
        thread::spawn(move || store.wait(&["spanning"], Some(Duration::from_secs(30))))
    };
    thread::sleep(Duration::from_millis(200));
    netns.partition(true);
    ends_in_time("get during the partition", || store.get("missing"));
    ends_in_time("add during the partition", || store.add("n", 1));
    ends_in_time("wait during the partition", || {
        store.wait(&["missing"], None)
    });
    netns.partition(false);

    // The same handle works again.
    store.set("after", b"1").unwrap();
    assert_eq!(store.get("after").unwrap(), b"1");
    assert_eq!(store.get("k").unwrap(), b"v");
    store.set("spanning", b"1").unwrap();
    spanning.join().unwrap().unwrap();
}

/// A SET still unread when its server dies is lost: the handle's next call
/// says so (whichever it is), instead of reconnecting to the server that
/// replaced it and reading around the lost write; the call after works.
#[test]
fn writes_a_dead_server_never_read_are_reported_lost_not_read_around() {
    for next_call in ["get", "set"] {
        let serve = Serve::start();
        let port = serve.port.to_string();
        let store = client("127.0.0.1", serve.port);
        store.set("k", b"old").unwrap();
        assert_eq!(store.get("k").unwrap(), b"old", "acknowledged");
        serve.signal(libc::SIGSTOP);
        store.set("k", b"new").unwrap(); // no reply in the protocol: sent
        drop(serve); // killed with the SET unread
        let _replaced = Serve::start_with(None, &["--port", &port]);
        let lost = match next_call {
            "get" => store.get("k").map(drop),
            _ => store.set("other", b"v"),
        };
        let e = lost.expect_err("the lost write is reported");
        assert_eq!(e.status(), Status::Network, "{next_call}: {e:?}");
        assert!(e.message().contains("may be lost"), "{}", e.message());
        assert!(
            !store.check(&["k"]).unwrap(),
            "the replacement never had it"
        );
        store.set("k", b"again").unwrap();
        assert_eq!(store.get("k").unwrap(), b"again");
    }
}
