//! EtcdStore handles' own liveness sessions on a real etcd: a member
//! whose lease runs out (its handle gone without closing, as in a crash)
//! or that reports an error fails the other members' blocked calls,
//! naming it; a member that closes fails nobody; leased keys go with the
//! session.

use std::thread;
use std::time::{Duration, Instant};

use super::Etcd;
use crate::store::etcd::EtcdStore;
use crate::store::tcp::SessionOptions;
use crate::store::Store;
use crate::Status;

fn member(etcd: &Etcd, group: &str, rank: u32, ttl: Option<Duration>) -> EtcdStore {
    let store = EtcdStore::new(etcd.options("/job", Duration::from_secs(60))).unwrap();
    let options = SessionOptions {
        ttl,
        world_size: Some(3),
        ..SessionOptions::new(group, rank)
    };
    store.open_session(&options).unwrap();
    store
}

#[test]
fn a_member_whose_lease_runs_out_fails_the_blocked_calls_of_the_others_naming_it() {
    let etcd = Etcd::start();
    let ttl = Some(Duration::from_secs(2));
    let survivor = member(&etcd, "e/", 1, ttl);
    let dying = member(&etcd, "e/", 0, ttl);
    dying
        .leased()
        .unwrap()
        .set("e/addr/0", b"10.0.0.1:1")
        .unwrap();
    let blocked = thread::spawn(move || {
        let got = survivor.get("e/never");
        (survivor, got)
    });
    thread::sleep(Duration::from_millis(300)); // blocked by now
    let gone = Instant::now();
    drop(dying); // no more renewals, nothing closed: as a crash
    let (survivor, got) = blocked.join().unwrap();
    let error = got.unwrap_err();
    let waited = gone.elapsed();
    assert_eq!(error.status(), Status::PeerFailed, "{error}");
    assert!(
        error.message().contains("rank 0 of group 'e/'")
            && error.message().contains("etcd lease ran out"),
        "{error}"
    );
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10),
        "told once its lease ran out: {waited:?}"
    );
    // Its leased key went with it; later calls fail the same way.
    let reader = EtcdStore::new(etcd.options("/job", Duration::from_secs(10))).unwrap();
    assert!(!reader.check(&["e/addr/0"]).unwrap());
    assert_eq!(
        survivor.add("e/x", 1).unwrap_err().status(),
        Status::PeerFailed
    );
    // Another handle opening in the failed group (it still has a member)
    // is refused with the failure.
    let late = EtcdStore::new(etcd.options("/job", Duration::from_secs(10))).unwrap();
    let refused = late
        .open_session(&SessionOptions::new("e/", 2))
        .unwrap_err();
    assert_eq!(refused.status(), Status::PeerFailed, "{refused}");
}

#[test]
fn a_reported_error_reaches_the_others_at_once_and_a_close_fails_nobody() {
    let etcd = Etcd::start();
    let leaving = member(&etcd, "r/", 2, None);
    leaving.leased().unwrap().set("r/addr/2", b"x").unwrap();
    leaving.close_session().unwrap();
    assert!(
        !leaving.check(&["r/addr/2"]).unwrap(),
        "its leased key went"
    );
    let survivor = member(&etcd, "r/", 1, None);
    let reporter = member(&etcd, "r/", 0, None);
    let blocked = thread::spawn(move || {
        let got = survivor.wait(&["r/never"], None);
        (survivor, got)
    });
    thread::sleep(Duration::from_millis(300));
    let reported = Instant::now();
    reporter.report_error("loss is NaN at step 812").unwrap();
    let (_survivor, got) = blocked.join().unwrap();
    let error = got.unwrap_err();
    assert_eq!(error.status(), Status::PeerFailed, "{error}");
    assert!(
        error.message().contains("rank 0 of group 'r/'")
            && error.message().contains("loss is NaN at step 812"),
        "{error}"
    );
    assert!(reported.elapsed() < Duration::from_secs(5), "at once");
}

#[test]
fn a_session_needs_no_second_open_and_a_leased_view_needs_a_session() {
    let etcd = Etcd::start();
    let store = EtcdStore::new(etcd.options("/job", Duration::from_secs(10))).unwrap();
    assert_eq!(store.leased().err().unwrap().status(), Status::InvalidState);
    assert_eq!(
        store.close_session().unwrap_err().status(),
        Status::InvalidState
    );
    store.open_session(&SessionOptions::new("s/", 0)).unwrap();
    let again = store
        .open_session(&SessionOptions::new("s/", 1))
        .unwrap_err();
    assert_eq!(again.status(), Status::InvalidState);
    let recoverable = SessionOptions {
        recoverable: true,
        ..SessionOptions::new("t/", 0)
    };
    let other = EtcdStore::new(etcd.options("/job", Duration::from_secs(10))).unwrap();
    assert_eq!(
        other.open_session(&recoverable).unwrap_err().status(),
        Status::NotSupported
    );
    store.close_session().unwrap();
}

#[test]
fn a_lease_that_ran_out_while_nobody_watched_fails_the_next_blocking_call_at_once() {
    let etcd = Etcd::start();
    let ttl = Some(Duration::from_secs(2));
    let survivor = member(&etcd, "w/", 1, ttl);
    drop(member(&etcd, "w/", 0, ttl)); // gone unclosed, nobody blocked
    thread::sleep(Duration::from_secs(4)); // its lease ran out meanwhile
    let asked = Instant::now();
    let error = survivor.get("w/never").unwrap_err();
    assert_eq!(error.status(), Status::PeerFailed, "{error}");
    assert!(
        error.message().contains("rank 0 of group 'w/'")
            && error.message().contains("lease ran out"),
        "{error}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "at once, not at its timeout"
    );
}
