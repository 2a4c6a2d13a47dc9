//! Servers on a real etcd (one member the test starts): the whole store
//! suite through them, and several servers serving one store.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::store::etcd::tests::Etcd;
use crate::store::etcd::EtcdStore;
use crate::store::tcp::{
    Server, ServerBackend, ServerOptions, SessionOptions, TcpStore, TcpStoreOptions,
};
use crate::store::{conformance, Store};

/// A server whose keys live under `prefix` in `etcd`.
fn front_end(etcd: &Etcd, prefix: &str, extensions: bool) -> Arc<Server> {
    front_end_on(etcd, prefix, extensions, 0)
}

/// A server whose keys live under `prefix` in `etcd`, on `port` (0: any).
fn front_end_on(etcd: &Etcd, prefix: &str, extensions: bool, port: u16) -> Arc<Server> {
    let options = etcd.options(prefix, Duration::from_secs(30));
    Arc::new(
        Server::start(ServerOptions {
            bind_address: Some([127, 0, 0, 1].into()),
            port,
            extensions,
            backend: ServerBackend::Etcd(options),
            ..ServerOptions::default()
        })
        .unwrap(),
    )
}

fn client(server: &Server) -> TcpStore {
    TcpStore::new(TcpStoreOptions {
        port: server.port(),
        timeout: Duration::from_secs(30),
        ..TcpStoreOptions::default()
    })
    .unwrap()
}

fn conformance_on_etcd(extensions: bool) {
    let etcd = Etcd::start();
    let jobs = AtomicUsize::new(0);
    conformance::run_all(&|| {
        let job = jobs.fetch_add(1, Ordering::Relaxed);
        let server = front_end(&etcd, &format!("/job{job}"), extensions);
        let mut store = TcpStore::new(TcpStoreOptions {
            port: server.port(),
            ..TcpStoreOptions::default()
        })
        .unwrap();
        assert_eq!(store.peer_is_distcore(), extensions);
        store.server = Some(server);
        Arc::new(store) as Arc<dyn Store>
    });
}

#[test]
fn a_server_on_etcd_conforms() {
    conformance_on_etcd(true);
}

#[test]
fn a_server_on_etcd_conforms_in_pytorch_mode() {
    conformance_on_etcd(false);
}

#[test]
fn two_servers_on_one_prefix_serve_one_store() {
    let etcd = Etcd::start();
    let (a, b) = (
        front_end(&etcd, "/job", true),
        front_end(&etcd, "/job", true),
    );
    let (on_a, on_b) = (client(&a), client(&b));
    on_a.set("k", b"v").unwrap();
    assert_eq!(on_b.get("k").unwrap(), b"v", "b sees a's write");
    // A wait on b ends with a set on a.
    let waiter = {
        let on_b = client(&b);
        thread::spawn(move || on_b.wait(&["late"], Some(Duration::from_secs(20))))
    };
    while b.stats().pending_waits == 0 {
        thread::sleep(Duration::from_millis(5));
    }
    on_a.set("late", b"1").unwrap();
    waiter.join().unwrap().unwrap();
    // A barrier spans both (BARRIER on each server, counted in etcd).
    let arrivals: Vec<_> = (0..4)
        .map(|i| {
            let store = client(if i % 2 == 0 { &a } else { &b });
            thread::spawn(move || store.barrier("/bar", 4, Some(Duration::from_secs(20))))
        })
        .collect();
    for arrival in arrivals {
        arrival.join().unwrap().unwrap();
    }
    // Counters are exact across servers, and every add sees its own
    // value (concurrent adds to one key share a transaction).
    let adders: Vec<_> = (0..8)
        .map(|i| {
            let store = client(if i % 2 == 0 { &a } else { &b });
            thread::spawn(move || {
                (0..25)
                    .map(|_| store.add("n", 1).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut seen: Vec<i64> = adders
        .into_iter()
        .flat_map(|adder| adder.join().unwrap())
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (1..=200).collect::<Vec<_>>());
    assert_eq!(on_b.add("n", 0).unwrap(), 200);
    // A pop on b waits for a push on a.
    let popper = {
        let on_b = client(&b);
        thread::spawn(move || on_b.queue_pop("q", true))
    };
    thread::sleep(Duration::from_millis(50));
    on_a.queue_push("q", b"x").unwrap();
    assert_eq!(popper.join().unwrap().unwrap(), b"x");
}

#[test]
fn a_server_that_goes_loses_nothing_and_another_takes_over() {
    let etcd = Etcd::start();
    let a = front_end(&etcd, "/job", true);
    let on_a = client(&a);
    on_a.set("k", b"v").unwrap();
    on_a.add("n", 3).unwrap();
    on_a.queue_push("q", b"x").unwrap();
    // Acknowledged: a request with a reply after them on the connection.
    assert_eq!(on_a.queue_len("q").unwrap(), 1);
    drop(on_a);
    drop(a);
    let b = front_end(&etcd, "/job", true);
    let on_b = client(&b);
    assert_eq!(on_b.get("k").unwrap(), b"v");
    assert_eq!(on_b.add("n", 1).unwrap(), 4);
    assert_eq!(on_b.queue_pop("q", false).unwrap(), b"x");
}

#[test]
fn a_value_over_the_etcd_limit_is_refused_with_the_limit() {
    let etcd = Etcd::start();
    let server = front_end(&etcd, "/job", true);
    let store = client(&server);
    let big = vec![7u8; crate::store::tcp::server::ETCD_MAX_VALUE_LEN];
    store.set("big", &big).unwrap();
    assert_eq!(store.get("big").unwrap().len(), big.len());
    let err = store.set("bigger", &[big, vec![0]].concat()).unwrap_err();
    assert_eq!(err.status(), crate::Status::InvalidArgument, "{err}");
    assert!(err.message().contains("1048576"), "{err}");
}

#[test]
fn no_etcd_member_answering_fails_the_start_within_the_timeout() {
    let started = Instant::now();
    let mut options =
        crate::store::etcd::EtcdStoreOptions::from_url("etcd://127.0.0.1:1/job").unwrap();
    options.timeout = Duration::from_millis(500);
    let err = Server::start(ServerOptions {
        backend: ServerBackend::Etcd(options),
        ..ServerOptions::default()
    })
    .err()
    .unwrap();
    assert!(err.message().contains("no etcd member"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_server_stops_within_its_timeout_when_etcd_does_not_answer_its_writes() {
    use crate::store::tcp::protocol::{Command, Encoder, VALIDATE_MAGIC};
    use std::io::Write;
    let etcd = Etcd::start();
    let timeout = Duration::from_secs(1);
    let server = Server::start(ServerOptions {
        bind_address: Some([127, 0, 0, 1].into()),
        backend: ServerBackend::Etcd(etcd.options("/job", timeout)),
        ..ServerOptions::default()
    })
    .unwrap();
    drop(etcd);
    // 160 connections with a write each: ten times the workers.
    let mut set = Encoder::request(Command::Validate)
        .u32(VALIDATE_MAGIC)
        .finish();
    set.extend(
        Encoder::request(Command::Set)
            .bytes(b"k")
            .bytes(b"v")
            .finish(),
    );
    let clients: Vec<_> = (0..160)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", server.port())).unwrap();
            s.write_all(&set).unwrap();
            s
        })
        .collect();
    while server.stats().connections < clients.len() {
        thread::sleep(Duration::from_millis(10));
    }
    thread::sleep(Duration::from_millis(200));
    let stopping = Instant::now();
    drop(server);
    // The writes under way end within the timeout, the queued ones are
    // given up after it (one by one, they would take 10 timeouts).
    assert!(stopping.elapsed() < 5 * timeout, "{:?}", stopping.elapsed());
}

/// A member of `group` on `server`, with a session of rank `rank`.
fn member(server: &Server, group: &str, rank: u32, ttl: Option<Duration>) -> TcpStore {
    member_with(
        server,
        SessionOptions {
            ttl,
            world_size: Some(3),
            ..SessionOptions::new(group, rank)
        },
    )
}

/// A client of `server` with a session of `options`.
fn member_with(server: &Server, options: SessionOptions) -> TcpStore {
    let store = client(server);
    store.open_session(&options).unwrap();
    store
}

/// Waits (bounded) until `server` serves `n` blocked waits.
fn until_waits(server: &Server, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.stats().pending_waits < n {
        assert!(Instant::now() < deadline, "the waits never blocked");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_member_lost_on_one_server_fails_the_blocked_calls_of_members_on_another_naming_it() {
    let etcd = Etcd::start();
    let (a, b) = (
        front_end(&etcd, "/job", true),
        front_end(&etcd, "/job", true),
    );
    let dying = member(&a, "g/", 0, None);
    let (on_a, on_b) = (member(&a, "g/", 1, None), member(&b, "g/", 2, None));
    let waiters: Vec<_> = [on_a, on_b]
        .into_iter()
        .map(|store| {
            thread::spawn(move || {
                let error = store.get("g/never").unwrap_err();
                (store, error) // still members: the group keeps its failure
            })
        })
        .collect();
    until_waits(&a, 1);
    until_waits(&b, 1);
    let killed = Instant::now();
    drop(dying); // its connection closes: as a crash, to its server
    let mut survivors = Vec::new();
    for waiter in waiters {
        let (survivor, error) = waiter.join().unwrap();
        survivors.push(survivor);
        assert_eq!(error.status(), crate::Status::PeerFailed, "{error}");
        assert!(
            error.message().contains("rank 0 of group 'g/'")
                && error.message().contains("its connection was lost"),
            "{error}"
        );
    }
    assert!(killed.elapsed() < Duration::from_secs(5), "told at once");
    // A later member of the group is refused while members remain.
    let late = client(&b);
    let refused = late
        .open_session(&SessionOptions::new("g/", 0))
        .unwrap_err();
    assert_eq!(refused.status(), crate::Status::PeerFailed, "{refused}");
}

#[test]
fn leased_keys_live_in_etcd_until_their_session_ends_on_any_server() {
    let etcd = Etcd::start();
    let (a, b) = (
        front_end(&etcd, "/job", true),
        front_end(&etcd, "/job", true),
    );
    let owner = member(&a, "k/", 0, None);
    owner.leased().set("k/addr/0", b"10.0.0.1:7").unwrap();
    owner.leased().queue_push("k/q", b"element").unwrap();
    owner.set("k/plain", b"stays").unwrap();
    let reader = client(&b);
    assert_eq!(reader.get("k/addr/0").unwrap(), b"10.0.0.1:7");
    // In etcd (a TCPStore client's keys start with '/', as PyTorch's do).
    let direct = EtcdStore::new(etcd.options("/job", Duration::from_secs(10))).unwrap();
    assert_eq!(direct.get("/k/addr/0").unwrap(), b"10.0.0.1:7");
    owner.close_session().unwrap();
    // Deleted before the close returned: etcd no longer has them.
    assert!(!direct.check(&["/k/addr/0"]).unwrap());
    assert_eq!(direct.queue_len("/k/q").unwrap(), 0);
    assert_eq!(direct.get("/k/plain").unwrap(), b"stays");
    let deadline = Instant::now() + Duration::from_secs(10);
    while reader.check(&["k/addr/0"]).unwrap() {
        assert!(Instant::now() < deadline, "b never saw the key go");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_session_outlives_a_killed_server_for_its_lease_then_fails_once_for_every_server() {
    let etcd = Etcd::start();
    let survivor_server = front_end(&etcd, "/job", true);
    let watcher = member(&survivor_server, "x/", 1, None);
    // (The handle comes back: a group whose last member left forgets its
    // failure.)
    let blocked = thread::spawn(move || {
        let error = watcher.get("x/never").unwrap_err();
        (watcher, error)
    });
    until_waits(&survivor_server, 1);
    // A server whose members' process and server both die: nobody renews
    // rank 0's lease, which runs out (its TTL: 5 s, the least).
    let doomed = front_end(&etcd, "/job", true);
    let orphan = member(&doomed, "x/", 0, Some(Duration::from_millis(500)));
    let started = Instant::now();
    // The member's process is gone with its server: neither ends the
    // session, nobody renews its lease.
    std::mem::forget(orphan);
    drop(doomed); // its event loop and backend stop; its sessions are not ended
    let (_watcher, error) = blocked.join().unwrap();
    let waited = started.elapsed();
    assert_eq!(error.status(), crate::Status::PeerFailed, "{error}");
    assert!(error.message().contains("etcd lease ran out"), "{error}");
    assert!(
        waited >= Duration::from_millis(4500) && waited < Duration::from_secs(15),
        "the lease's TTL, not before: {waited:?}"
    );
    // One failure record, which a server started afterwards agrees on.
    let late_server = front_end(&etcd, "/job", true);
    let late = client(&late_server);
    let refused = late
        .open_session(&SessionOptions::new("x/", 2))
        .unwrap_err();
    assert!(
        refused.message().contains("rank 0 of group 'x/'"),
        "{refused}"
    );
}

#[test]
fn a_member_resumes_its_session_on_a_server_restarted_within_its_ttl_and_nobody_is_failed() {
    let etcd = Etcd::start();
    let b = front_end(&etcd, "/job", true);
    let a = front_end(&etcd, "/job", true);
    let port = a.port();
    let ttl = Some(Duration::from_secs(2)); // its lease: 5 s, the least
    let other = member(&b, "r/", 1, ttl);
    let blocked = thread::spawn(move || {
        let got = other.get("r/go");
        (other, got)
    });
    until_waits(&b, 1);
    let moving = member(&a, "r/", 0, ttl);
    moving.leased().set("r/addr/0", b"here").unwrap();
    assert!(moving.check(&["r/addr/0"]).unwrap()); // acknowledged
    drop(a); // the server dies: the member's connections break
    let _a = front_end_on(&etcd, "/job", true, port);
    // The member's next call resumes its session on the new server.
    assert_eq!(moving.add("r/go-count", 1).unwrap(), 1);
    moving.set("r/go", b"1").unwrap();
    let (other, got) = blocked.join().unwrap();
    assert_eq!(got.unwrap(), b"1", "nobody was failed");
    // Its keep-alives resumed too: alive past its lease's TTL, with the
    // key leased to it.
    thread::sleep(Duration::from_secs(7));
    assert_eq!(other.get("r/addr/0").unwrap(), b"here");
    assert_eq!(
        other.add("r/after", 1).unwrap(),
        1,
        "the group has not failed"
    );
    moving.close_session().unwrap();
    // b sees the leased key go within the stream's delay.
    let deadline = Instant::now() + Duration::from_secs(10);
    while other.check(&["r/addr/0"]).unwrap() {
        assert!(
            Instant::now() < deadline,
            "the leased key outlived its session"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_one_job_server_on_etcd_ends_the_waits_of_clients_without_a_session_when_a_member_elsewhere_fails(
) {
    let etcd = Etcd::start();
    let a = front_end(&etcd, "/job", true);
    let b = Arc::new(
        Server::start(ServerOptions {
            bind_address: Some([127, 0, 0, 1].into()),
            one_job: true,
            backend: ServerBackend::Etcd(etcd.options("/job", Duration::from_secs(30))),
            ..ServerOptions::default()
        })
        .unwrap(),
    );
    // The group's members are all on a: b has none, but serves the job.
    let dying = member(&a, "o/", 0, None);
    let _other = member(&a, "o/", 1, None);
    // A client of b's with no session (as PyTorch's are), blocked.
    let bystander = client(&b);
    let blocked = thread::spawn(move || bystander.get("o/never").unwrap_err());
    until_waits(&b, 1);
    drop(dying);
    let error = blocked.join().unwrap();
    assert_eq!(error.status(), crate::Status::PeerFailed, "{error}");
    assert!(error.message().contains("rank 0 of group 'o/'"), "{error}");
}

/// A member of recoverable group `group` on `server`, of rank `rank`.
fn recoverable_member(server: &Server, group: &str, rank: u32, ttl: Option<Duration>) -> TcpStore {
    member_with(
        server,
        SessionOptions {
            ttl,
            recoverable: true,
            ..SessionOptions::new(group, rank)
        },
    )
}

/// The ranks `store` reads in its group's membership, and the epoch.
fn ranks(store: &TcpStore) -> (u64, Vec<u32>) {
    let members = store.members().unwrap();
    (
        members.epoch,
        members.members.iter().map(|m| m.rank).collect(),
    )
}

/// Waits (bounded) until `store` reads `ranks` in its group's
/// membership; the epoch then.
fn until_members(store: &TcpStore, expected: &[u32]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (epoch, now) = ranks(store);
        if now == expected {
            return epoch;
        }
        assert!(
            Instant::now() < deadline,
            "members {now:?}, never {expected:?}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_recoverable_group_on_two_servers_fails_nobody_and_every_member_reads_one_membership() {
    let etcd = Etcd::start();
    let (a, b) = (
        front_end(&etcd, "/job", true),
        front_end(&etcd, "/job", true),
    );
    let first = recoverable_member(&a, "e/", 0, None);
    assert_eq!(ranks(&first).1, [0], "an open is answered once published");
    let on_b = recoverable_member(&b, "e/", 1, None);
    let dying = recoverable_member(&a, "e/", 2, None);
    let (epoch, all) = ranks(&dying);
    assert_eq!(all, [0, 1, 2]);
    // Every member reads the same set at the same epoch, on either server.
    assert_eq!(until_members(&on_b, &[0, 1, 2]), epoch);
    assert_eq!(until_members(&first, &[0, 1, 2]), epoch);
    // Every member agrees on the mode, across servers.
    let refused = client(&b)
        .open_session(&SessionOptions::new("e/", 3))
        .unwrap_err();
    assert_eq!(refused.status(), crate::Status::InvalidState, "{refused}");
    assert!(refused.message().contains("recoverable"), "{refused}");
    // A survivor blocked in a get, and one watching the membership.
    let blocked = thread::spawn(move || {
        let got = on_b.get("e/go");
        (on_b, got)
    });
    until_waits(&b, 1);
    let changed = first.watch_members(epoch).unwrap();
    let killed = Instant::now();
    drop(dying); // its connection closes: as a crash, to its server
    changed.wait(Some(Duration::from_secs(20))).unwrap();
    let told = killed.elapsed();
    let (after, left) = ranks(&first);
    assert_eq!(left, [0, 1]);
    assert!(after > epoch);
    first.set("e/go", b"1").unwrap();
    let (on_b, got) = blocked.join().unwrap();
    assert_eq!(got.unwrap(), b"1", "the survivor's call was not failed");
    assert_eq!(until_members(&on_b, &[0, 1]), after);
    println!(
        "a recoverable group's survivor on etcd saw the membership change {told:?} after the kill"
    );
    // No failure record: a new member joins the group as it goes on.
    let joined = recoverable_member(&b, "e/", 2, None);
    assert_eq!(ranks(&joined).1, [0, 1, 2]);
    // The group's last members leave: its membership goes with them, and
    // the group may start again in the other mode.
    for store in [first, on_b, joined] {
        store.close_session().unwrap();
    }
    let direct = EtcdStore::new(etcd.options("/job", Duration::from_secs(10))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !direct.list_prefix("distcore/members/").unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the membership outlived the group"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let _again = member(&a, "e/", 0, None);
}

#[test]
fn a_recoverable_member_whose_server_died_with_it_leaves_the_membership_when_its_lease_runs_out() {
    let etcd = Etcd::start();
    let survivor_server = front_end(&etcd, "/job", true);
    let survivor = recoverable_member(&survivor_server, "x/", 1, None);
    let doomed = front_end(&etcd, "/job", true);
    let orphan = recoverable_member(&doomed, "x/", 0, Some(Duration::from_millis(500)));
    let epoch = until_members(&survivor, &[0, 1]);
    let changed = survivor.watch_members(epoch).unwrap();
    let started = Instant::now();
    // The member's process is gone with its server: neither ends the
    // session, nobody renews its lease (5 s, the least).
    std::mem::forget(orphan);
    drop(doomed);
    changed.wait(Some(Duration::from_secs(30))).unwrap();
    let waited = started.elapsed();
    assert_eq!(ranks(&survivor).1, [1]);
    assert!(
        waited >= Duration::from_millis(4500) && waited < Duration::from_secs(15),
        "the lease's TTL, not before: {waited:?}"
    );
    assert_eq!(survivor.add("x/after", 1).unwrap(), 1, "nobody failed");
}
