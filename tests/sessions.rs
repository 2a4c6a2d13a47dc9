//! Liveness sessions with real processes (docs/liveness.md): a member
//! that is killed, or that reports an error, fails every other member's
//! blocked calls at once — a get or a barrier waiting on it returns
//! PeerFailed naming it, long before its timeout — and a member that
//! leaves gracefully fails nobody.
//!
//! The members are this test binary run again (`member_process`, which
//! does nothing unless DISTCORE_TEST_MEMBER is set).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use distcore::store::tcp::SessionOptions;
use distcore::store::{Store, TcpStore};
use distcore::Status;

mod common;
use common::Serve;

/// Far longer than any of these tests takes: a call that returns an
/// error other than its timeout returned because of the failure.
const TIMEOUT: Duration = Duration::from_secs(120);

fn handle(port: u16) -> TcpStore {
    handle_at("127.0.0.1", port)
}

fn handle_at(host: &str, port: u16) -> TcpStore {
    common::client(host, port, TIMEOUT)
}

fn member(group: &str, rank: u32) -> SessionOptions {
    SessionOptions {
        world_size: Some(3),
        ..SessionOptions::new(group, rank)
    }
}

/// A TTL short enough for a test, long enough for a loaded machine.
const TTL: Duration = Duration::from_millis(1500);

fn member_with_ttl(group: &str, rank: u32) -> SessionOptions {
    SessionOptions {
        ttl: Some(TTL),
        ..member(group, rank)
    }
}

/// Rank 1 of `group` in another process: opens its session on the server
/// at `port`, says "member ready", then, once told "go" on its standard
/// input, does what `then` says ("sleep", "report", "close"), says
/// "member done" and sleeps.
fn spawn_member(
    port: u16,
    group: &str,
    then: &str,
) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "member_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("DISTCORE_TEST_MEMBER", format!("{port} {group} {then}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = until_ready(&mut child);
    (child, out)
}

/// Waits until `member` says it is ready; its output, to read on.
fn until_ready(member: &mut Child) -> BufReader<std::process::ChildStdout> {
    let mut out = BufReader::new(member.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("member ready") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the member exited");
    }
    out
}

/// Tells a member to go on.
fn go(member: &mut Child) {
    use std::io::Write;
    writeln!(member.stdin.as_mut().unwrap(), "go").unwrap();
}

#[test]
fn member_process() {
    let Ok(spec) = std::env::var("DISTCORE_TEST_MEMBER") else {
        return;
    };
    let parts: Vec<&str> = spec.split(' ').collect();
    // A member in a network namespace reaches the server at its address.
    let host = std::env::var("DISTCORE_TEST_HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let store = handle_at(&host, parts[0].parse().unwrap());
    let options = match parts.get(3) {
        Some(&"ttl") => member_with_ttl(parts[1], 1),
        Some(&"recoverable") => SessionOptions {
            recoverable: true,
            ..member(parts[1], 1)
        },
        _ => member(parts[1], 1),
    };
    store.open_session(&options).unwrap();
    // Its address, on a key that dies with it.
    let leased = store.leased();
    leased
        .set(&format!("{}addr1", parts[1]), b"10.0.0.1:29500")
        .unwrap();
    leased.add(&format!("{}alive", parts[1]), 1).unwrap();
    println!("member ready");
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).unwrap();
    match parts[2] {
        "report" => store.report_error("loss is NaN at step 812").unwrap(),
        "close" => store.close_session().unwrap(),
        _ => {}
    }
    println!("member done");
    thread::sleep(TIMEOUT);
}

/// Rank 0's blocked get and rank 2's blocked barrier (the third never
/// comes) in `group`, each on a handle of its own: their outcomes, once
/// `fail` has been done to rank 1.
fn blocked_calls_when(
    group: &str,
    then: &str,
    fail: impl FnOnce(&mut Child),
) -> Vec<distcore::Error> {
    let server = Serve::start();
    let (mut rank1, _out) = spawn_member(server.port, group, then);
    let mut waiting = Vec::new();
    for rank in [0, 2] {
        let store = Arc::new(handle(server.port));
        store.open_session(&member(group, rank)).unwrap();
        waiting.push(thread::spawn(move || match rank {
            0 => store.get("never-set").map(drop),
            _ => store.barrier("b", 3, Some(TIMEOUT)),
        }));
    }
    // Both calls are blocked by now, or will find the group failed.
    thread::sleep(Duration::from_millis(200));
    let failed = std::time::Instant::now();
    fail(&mut rank1);
    let outcomes: Vec<distcore::Error> = waiting
        .into_iter()
        .map(|t| {
            t.join()
                .unwrap()
                .expect_err("the call returned without the key")
        })
        .collect();
    println!(
        "{group}: every blocked call returned {:?} after rank 1 failed",
        failed.elapsed()
    );
    let _ = rank1.kill();
    let _ = rank1.wait();
    outcomes
}

#[test]
fn a_killed_member_fails_every_blocked_call_of_the_others_at_once_naming_it() {
    let mut pid = 0;
    let errors = blocked_calls_when("killed/", "sleep", |rank1| {
        pid = rank1.id();
        rank1.kill().unwrap();
    });
    for e in errors {
        assert_eq!(e.status(), Status::PeerFailed, "{e}");
        let message = e.message();
        for part in [
            "rank 1".to_string(),
            "'killed/'".into(),
            format!("pid {pid}"),
            "connection was lost".into(),
        ] {
            assert!(message.contains(&part), "{part}: {message}");
        }
    }
}

#[test]
fn a_reported_error_reaches_the_others_with_its_message() {
    let errors = blocked_calls_when("reported/", "report", go);
    for e in errors {
        assert_eq!(e.status(), Status::PeerFailed, "{e}");
        assert!(
            e.message().contains("it reported: loss is NaN at step 812"),
            "{e}"
        );
    }
}

/// Returns once `rank` of `group` is blocked on `wire_key`, as the server
/// lists it (a call started on a thread may take a while to get there on a
/// loaded machine).
fn until_waiting_on(store: &TcpStore, group: &str, rank: u32, wire_key: &str) {
    for _ in 0..3000 {
        let listing = store.sessions(group).unwrap();
        let member = listing.sessions.iter().find(|s| s.rank == rank);
        if member.is_some_and(|s| s.waiting_on.iter().any(|k| k == wire_key)) {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
    panic!("rank {rank} of {group} never blocked on {wire_key}");
}

/// Whether `keys` are gone within two seconds.
fn gone_soon(store: &TcpStore, keys: &[&str]) -> bool {
    for _ in 0..200 {
        if keys.iter().all(|key| !store.check(&[key]).unwrap()) {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn a_members_leased_keys_die_with_it_and_the_keys_of_others_stay() {
    let server = Serve::start();
    let observer = handle(server.port);
    observer.set("leased/plain", b"stays").unwrap();
    let (mut rank1, _out) = spawn_member(server.port, "leased/", "sleep");
    let keys = ["leased/addr1", "leased/alive"];
    assert!(
        observer.check(&keys).unwrap(),
        "written before it was ready"
    );
    assert_eq!(observer.get("leased/addr1").unwrap(), b"10.0.0.1:29500");
    rank1.kill().unwrap();
    rank1.wait().unwrap();
    assert!(gone_soon(&observer, &keys), "a dead member's keys stayed");
    assert_eq!(observer.get("leased/plain").unwrap(), b"stays");
    // Closing gracefully deletes them too, before the close returns.
    let (mut again, mut out) = spawn_member(server.port, "leased-closed/", "close");
    assert!(observer.check(&["leased-closed/addr1"]).unwrap());
    go(&mut again);
    let mut line = String::new();
    while !line.contains("member done") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0);
    }
    assert!(!observer.check(&["leased-closed/addr1"]).unwrap());
    again.kill().unwrap();
    again.wait().unwrap();
}

#[test]
fn a_member_that_leaves_gracefully_fails_nobody() {
    let server = Serve::start();
    let (mut rank1, mut out) = spawn_member(server.port, "left/", "close");
    go(&mut rank1);
    let mut line = String::new();
    while !line.contains("member done") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0);
    }
    rank1.kill().unwrap();
    rank1.wait().unwrap();
    let store = handle(server.port);
    store.open_session(&member("left/", 0)).unwrap();
    store.set("k", b"v").unwrap();
    assert_eq!(store.get("k").unwrap(), b"v");
    store.close_session().unwrap();
    assert_eq!(
        store.close_session().unwrap_err().status(),
        Status::InvalidState
    );
}

#[test]
fn a_handle_whose_own_connection_was_lost_fails_its_calls_until_it_closes() {
    let server = Serve::start();
    let store = handle(server.port);
    store.open_session(&member("restarted/", 0)).unwrap();
    store.set("k", b"v").unwrap();
    assert_eq!(store.get("k").unwrap(), b"v", "the set acknowledged");
    // The server goes away and comes back on the same port: this
    // process's session ended with the connection.
    let port = server.port;
    drop(server);
    let again = Serve::start_with(None, &["--port", &port.to_string()]);
    let lost = store.get("k").unwrap_err();
    assert_eq!(lost.status(), Status::PeerFailed, "{lost}");
    assert!(lost.message().contains("this process's session"), "{lost}");
    assert_eq!(
        store.check(&["k"]).unwrap_err().status(),
        Status::PeerFailed
    );
    store.close_session().unwrap();
    assert!(!store.check(&["k"]).unwrap(), "a new server, no keys");
    store.open_session(&member("restarted/", 0)).unwrap();
    drop(again);
}

#[test]
fn a_frozen_member_fails_the_others_once_its_ttl_passes() {
    let errors = blocked_calls_when("frozen/", "sleep ttl", |rank1| {
        let pid = rank1.id() as libc::pid_t;
        // SAFETY: signals a child of this test by its pid.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    });
    for e in errors {
        assert_eq!(e.status(), Status::PeerFailed, "{e}");
        assert!(
            e.message()
                .contains("nothing arrived from it within its TTL"),
            "{e}"
        );
    }
}

#[test]
fn keep_alives_keep_an_idle_member_alive_past_many_ttls() {
    let server = Serve::start();
    let (zero, one) = (handle(server.port), handle(server.port));
    zero.open_session(&member_with_ttl("idle/", 0)).unwrap();
    one.open_session(&member_with_ttl("idle/", 1)).unwrap();
    // Neither says anything for three TTLs but through its keep-alives.
    thread::sleep(TTL * 3);
    one.set("k", b"v").unwrap();
    assert_eq!(zero.get("k").unwrap(), b"v");
    zero.close_session().unwrap();
    one.close_session().unwrap();
    let too_short = SessionOptions {
        ttl: Some(Duration::from_millis(10)),
        ..member("idle/", 2)
    };
    let e = zero.open_session(&too_short).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument, "{e}");
}

#[test]
fn inspect_lists_each_session_with_what_it_waits_on() {
    let server = Serve::start();
    let store = Arc::new(handle(server.port));
    store.open_session(&member("seen/", 0)).unwrap();
    let blocked = {
        let store = store.clone();
        thread::spawn(move || store.get("seen/step/3"))
    };
    until_waiting_on(&store, "seen/", 0, "/seen/step/3");
    let output = Command::new(env!("CARGO_BIN_EXE_distcore"))
        .args(["inspect", &format!("127.0.0.1:{}", server.port)])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(report.contains("1 sessions"), "{report}");
    let line = report.lines().find(|l| l.contains("seen/")).unwrap();
    for part in [
        "rank     0/3",
        &format!(":{} ", std::process::id()),
        "waiting on seen/step/3",
    ] {
        assert!(line.contains(part), "{part}: {line}");
    }
    store.set("seen/step/3", b"go").unwrap();
    blocked.join().unwrap().unwrap();
    store.close_session().unwrap();
}

#[test]
fn a_recoverable_groups_survivors_go_on_and_see_the_membership_change() {
    let server = Serve::start();
    let zero = Arc::new(handle(server.port));
    let options = SessionOptions {
        recoverable: true,
        ..member("recover/", 0)
    };
    zero.open_session(&options).unwrap();
    let (mut rank1, _out) = spawn_member(server.port, "recover/", "sleep recoverable");
    let ranks = |m: &distcore::store::tcp::GroupMembers| {
        m.members.iter().map(|m| m.rank).collect::<Vec<_>>()
    };
    let before = zero.members().unwrap();
    assert_eq!(ranks(&before), [0, 1]);
    let watch = zero.watch_members(before.epoch).unwrap();
    let blocked = {
        let zero = zero.clone();
        thread::spawn(move || zero.get("recover/step/1"))
    };
    thread::sleep(Duration::from_millis(100));
    assert!(!watch.is_completed());
    let killed = std::time::Instant::now();
    rank1.kill().unwrap();
    rank1.wait().unwrap();
    watch.wait(Some(Duration::from_secs(10))).unwrap();
    let told = killed.elapsed();
    assert!(told < Duration::from_secs(2), "{told:?}");
    let epoch: u64 = String::from_utf8_lossy(&watch.result().unwrap())
        .parse()
        .unwrap();
    let after = zero.members().unwrap();
    assert_eq!((after.epoch, ranks(&after)), (epoch, vec![0]));
    assert!(after.epoch > before.epoch);
    // The survivor's blocked call was not failed, and its keys live on;
    // the dead member's leased keys went with it.
    assert!(!zero.check(&["recover/addr1"]).unwrap());
    zero.set("recover/step/1", b"go on").unwrap();
    assert_eq!(blocked.join().unwrap().unwrap(), b"go on");
    zero.close_session().unwrap();
    println!("a recoverable group's survivor saw the membership change {told:?} after the kill");
}

#[test]
fn a_member_cut_off_by_a_partition_fails_the_others_once_its_ttl_passes() {
    let netns = match common::Netns::create() {
        Ok(netns) => netns,
        Err(why) => panic!("this test needs root, iproute2 and iptables: {why}"),
    };
    // The server listens on this namespace's end of the veth pair; rank 1
    // runs inside the other namespace, rank 0 here.
    let server = Serve::start_on(&netns.outside);
    let exe = std::env::current_exe().unwrap();
    let mut rank1 = Command::new("ip")
        .args(["netns", "exec", &netns.name])
        .arg(&exe)
        .args([
            "--exact",
            "member_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            "DISTCORE_TEST_MEMBER",
            format!("{} cut/ sleep ttl", server.port),
        )
        .env("DISTCORE_TEST_HOST", &netns.outside)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let _out = until_ready(&mut rank1);
    let zero = Arc::new(handle_at(&netns.outside, server.port));
    zero.open_session(&member("cut/", 0)).unwrap();
    let blocked = {
        let zero = zero.clone();
        thread::spawn(move || zero.get("cut/never-set"))
    };
    thread::sleep(Duration::from_millis(200));
    // Nothing in or out of the namespace: rank 1 is alive but silent.
    netns
        .exec(&["iptables", "-A", "INPUT", "-j", "DROP"])
        .unwrap();
    netns
        .exec(&["iptables", "-A", "OUTPUT", "-j", "DROP"])
        .unwrap();
    let cut = std::time::Instant::now();
    let error = blocked.join().unwrap().unwrap_err();
    let told = cut.elapsed();
    assert_eq!(error.status(), Status::PeerFailed, "{error}");
    assert!(
        error.message().contains("rank 1")
            && error
                .message()
                .contains("nothing arrived from it within its TTL"),
        "{error}"
    );
    assert!(told < TTL + Duration::from_secs(1), "{told:?}");
    println!("a partitioned member's peers were told {told:?} after the cut (TTL {TTL:?})");
    rank1.kill().unwrap();
    rank1.wait().unwrap();
}

#[test]
fn a_barrier_that_times_out_names_the_ranks_that_never_arrived() {
    let server = Serve::start();
    let member = |rank: u32| {
        let store = handle(server.port);
        let options = SessionOptions {
            world_size: Some(4),
            ..SessionOptions::new("roll/", rank)
        };
        store.open_session(&options).unwrap();
        Arc::new(store)
    };
    // Ranks 0 and 1 arrive (rank 1 through the async barrier); rank 2 is
    // live but blocked elsewhere; rank 3 never joins.
    let early = member(1);
    let arrived = {
        let early = early.clone();
        let work = early
            .clone()
            .barrier_async("roll/b".into(), 4, Some(Duration::from_secs(5)))
            .unwrap();
        thread::spawn(move || {
            let outcome = work.wait(None);
            early.close_session().unwrap();
            outcome
        })
    };
    let late = member(2);
    let elsewhere = {
        let late = late.clone();
        thread::spawn(move || late.get("roll/step/9"))
    };
    until_waiting_on(&early, "roll/", 1, "/roll/b");
    until_waiting_on(&late, "roll/", 2, "/roll/step/9");
    let zero = member(0);
    let error = zero
        .barrier("roll/b", 4, Some(Duration::from_millis(500)))
        .unwrap_err();
    assert_eq!(error.status(), Status::Timeout, "{error}");
    let message = error.message();
    for part in [
        "barrier timeout after 500ms, key: roll/b; ",
        "2 of 4 ranks never arrived (2-3)",
        "2 live but late (rank 2 waiting on 'roll/step/9')",
        "3 with no session in group 'roll/'",
    ] {
        assert!(message.contains(part), "{part}: {message}");
    }
    // The arrival records are not the user's keys.
    assert!(zero
        .list_keys()
        .unwrap()
        .iter()
        .all(|k| !k.contains("arrived")));
    // The async barrier's timeout names them too.
    let error = arrived.join().unwrap().unwrap_err();
    assert_eq!(error.status(), Status::Timeout, "{error}");
    assert!(
        error.message().contains("2 of 4 ranks never arrived (2-3)"),
        "{error}"
    );
    late.set("roll/step/9", b"x").unwrap();
    elsewhere.join().unwrap().unwrap();
    let listing = zero.sessions("roll/").unwrap();
    assert_eq!(
        listing.sessions.iter().map(|s| s.rank).collect::<Vec<_>>(),
        [0, 2],
        "rank 1 closed its session"
    );
}
