//! Writes held by a paused member: a member that stops (SIGSTOP) with a
//! request in hand forwards it to the leader when it resumes, after the
//! client, hearing nothing for `MEMBER_SILENCE`, sent it again elsewhere
//! and went on writing. The copy applied late must change nothing.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use super::super::client::{Read, WatchEnd};
use super::super::{EtcdStore, EtcdStoreOptions};
use super::Cluster;
use crate::store::Store;
use crate::Status;

impl Cluster {
    /// Sends `signal` (STOP, CONT) to member `i`.
    fn signal(&self, i: usize, signal: &str) {
        let child = self.members[i].child.as_ref().expect("member running");
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }
}

/// Every change under `prefix` in etcd's history, in order: the key and
/// its new value (None: deleted).
type History = Vec<(Vec<u8>, Option<Vec<u8>>)>;

fn history(store: &EtcdStore, prefix: &str) -> History {
    let deadline = Instant::now() + Duration::from_secs(10);
    let last = store
        .client
        .range(prefix.as_bytes(), true, Read::Count, deadline)
        .unwrap()
        .revision;
    let mut changes = History::new();
    let end = store
        .client
        .watch(
            &[(prefix.as_bytes().to_vec(), true)],
            1,
            true,
            deadline,
            |events| {
                let mut reached = false;
                for event in events {
                    reached |= event.kv.mod_revision >= last;
                    let value = (!event.deleted).then_some(event.kv.value);
                    changes.push((event.kv.key, value));
                }
                !reached
            },
        )
        .unwrap();
    assert_eq!(end, WatchEnd::Stopped, "the whole history was read");
    changes
}

/// The values `key` took, in order (None: deleted).
fn values_of(history: &History, key: &str) -> Vec<Option<String>> {
    history
        .iter()
        .filter(|(k, _)| k == key.as_bytes())
        .map(|(_, v)| v.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()))
        .collect()
}

#[test]
fn a_write_held_by_a_paused_member_never_lands_after_a_later_one() {
    let cluster = Cluster::start();
    let leader = cluster.leader();
    let follower = (leader + 1) % 3;
    // Every handle talks to the follower first: a paused leader loses its
    // office, and its log with the held copy; a follower forwards it.
    let mut endpoints = cluster.endpoints();
    endpoints.swap(0, follower);
    let options = EtcdStoreOptions {
        endpoints,
        prefix: "/held".into(),
        timeout: Duration::from_secs(30),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let open = || loop {
        match EtcdStore::new(options.clone()) {
            Ok(store) => return store,
            Err(e) => assert!(Instant::now() < deadline, "no answer: {e}"),
        }
        thread::sleep(Duration::from_millis(100));
    };
    let handles: Vec<EtcdStore> = (0..5).map(|_| open()).collect();
    handles[0].set("k", b"v0").unwrap();
    handles[1].set("q-ready", b"").unwrap();
    for handle in &handles {
        assert!(handle.client.endpoint().ends_with(&options.endpoints[0]));
    }
    cluster.signal(follower, "STOP");
    // Each handle's first write is held by the paused member, answered by
    // another after the silence, then followed by a later write.
    let paused_at = Instant::now();
    thread::scope(|s| {
        let [set, push, delete, add, create] = &handles[..] else {
            unreachable!()
        };
        s.spawn(|| {
            set.set("k", b"v1").unwrap();
            set.set("k", b"v2").unwrap();
        });
        s.spawn(|| {
            push.queue_push("q", b"x").unwrap();
            assert_eq!(push.queue_pop("q", false).unwrap(), b"x");
        });
        s.spawn(|| {
            delete.set("d", b"1").unwrap();
            assert!(delete.delete_key("d").unwrap());
            delete.set("d", b"2").unwrap();
        });
        s.spawn(|| {
            assert_eq!(add.add("n", 1).unwrap(), 1);
            assert!(add.delete_key("n").unwrap());
        });
        s.spawn(|| {
            create.set("m", b"a").unwrap();
            assert!(create.delete_key("m").unwrap());
        });
    });
    assert!(
        paused_at.elapsed() >= Duration::from_secs(4),
        "the writes waited for the silent member: they were held"
    );
    cluster.signal(follower, "CONT");
    // The member forwards what it held as it resumes, before a request
    // sent to it afterwards: once one is answered, the late copies are in.
    let through_member = EtcdStoreOptions {
        endpoints: vec![options.endpoints[0].clone()],
        ..options.clone()
    };
    loop {
        let synced = EtcdStore::new(through_member.clone()).and_then(|s| s.set("synced", b""));
        match synced {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline + Duration::from_secs(30), "{e}"),
        }
        thread::sleep(Duration::from_millis(100));
    }
    let store = open();
    assert_eq!(store.get("k").unwrap(), b"v2");
    assert_eq!(
        store.queue_len("q").unwrap(),
        0,
        "the popped element is not back"
    );
    let empty = store.queue_pop("q", false).unwrap_err();
    assert_eq!(empty.status(), Status::QueueEmpty);
    assert_eq!(store.get("d").unwrap(), b"2");
    assert!(
        !store.check(&["n", "m"]).unwrap(),
        "deleted keys stay deleted"
    );

    let history = history(&store, "/held/");
    let s = |v: &str| Some(v.to_owned());
    assert_eq!(
        values_of(&history, "/held/v/k"),
        [s("v0"), s("v1"), s("v2")]
    );
    assert_eq!(values_of(&history, "/held/v/d"), [s("1"), None, s("2")]);
    assert_eq!(values_of(&history, "/held/v/n"), [s("1"), None]);
    assert_eq!(values_of(&history, "/held/v/m"), [s("a"), None]);
    let elements: Vec<_> = history
        .iter()
        .filter(|(k, _)| k.starts_with(b"/held/q/q\xff"))
        .map(|(_, v)| v.is_some())
        .collect();
    assert_eq!(
        elements,
        [true, false],
        "one element, created once, popped once"
    );
}
