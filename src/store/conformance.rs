//! One behavioural test suite that every Store implementation runs.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::{Store, TimeoutGuard};
use crate::error::Status;

/// Makes a fresh, empty store; `clone_store` of it must reach the same data.
pub(crate) type MakeStore<'a> = &'a dyn Fn() -> Arc<dyn Store>;

pub(crate) fn run_all(make: MakeStore) {
    set_get_delete(make());
    add_and_counters(make());
    compare_set_cases(make());
    check_and_wait(make());
    append_multi(make());
    queues(make());
    list_and_num_keys(make());
    prefixes(make());
    barrier_releases_all(make());
    timeouts(make());
    clones_share_data(make());
}

fn set_get_delete(s: Arc<dyn Store>) {
    s.set("k1", b"v1").unwrap();
    assert_eq!(s.get("k1").unwrap(), b"v1");
    s.set("k1", b"").unwrap();
    assert_eq!(s.get("k1").unwrap(), b"");
    assert!(s.delete_key("k1").unwrap());
    assert!(!s.delete_key("k1").unwrap());
    assert!(!s.check(&["k1"]).unwrap());
}

fn add_and_counters(s: Arc<dyn Store>) {
    assert_eq!(s.add("cnt", 5).unwrap(), 5);
    assert_eq!(s.add("cnt", -2).unwrap(), 3);
    assert_eq!(s.get("cnt").unwrap(), b"3");
    s.set("text", b"abc").unwrap();
    // In-process stores say InvalidArgument; a TCPStore server closes the
    // connection, as PyTorch's does.
    assert!(s.add("text", 1).is_err());
}

fn compare_set_cases(s: Arc<dyn Store>) {
    assert_eq!(s.compare_set("cs", b"x", b"y").unwrap(), b"x");
    assert!(!s.check(&["cs"]).unwrap());
    assert_eq!(s.compare_set("cs", b"", b"first").unwrap(), b"first");
    assert_eq!(s.compare_set("cs", b"wrong", b"z").unwrap(), b"first");
    assert_eq!(s.compare_set("cs", b"first", b"second").unwrap(), b"second");
    assert_eq!(s.get("cs").unwrap(), b"second");
}

fn check_and_wait(s: Arc<dyn Store>) {
    assert!(s.check(&[]).unwrap());
    s.set("a", b"1").unwrap();
    assert!(!s.check(&["a", "b"]).unwrap());
    let writer = {
        let s = s.clone_store().unwrap();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(30));
            s.set("b", b"2").unwrap();
        })
    };
    s.wait(&["a", "b"], Some(Duration::from_secs(30))).unwrap();
    assert_eq!(s.get("b").unwrap(), b"2");
    writer.join().unwrap();
    // get blocks until a set from another thread.
    let writer = {
        let s = s.clone_store().unwrap();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(30));
            s.add("late", 1).unwrap();
        })
    };
    assert_eq!(s.get("late").unwrap(), b"1");
    writer.join().unwrap();
}

fn append_multi(s: Arc<dyn Store>) {
    s.append("ap", b"x").unwrap();
    s.append("ap", b"yz").unwrap();
    assert_eq!(s.get("ap").unwrap(), b"xyz");
    s.multi_set(&["m1", "m2"], &[b"1", b"22"]).unwrap();
    assert_eq!(
        s.multi_get(&["m2", "m1", "ap"]).unwrap(),
        vec![b"22".to_vec(), b"1".to_vec(), b"xyz".to_vec()]
    );
    assert_eq!(
        s.multi_set(&["m1"], &[]).unwrap_err().status(),
        Status::InvalidArgument
    );
}

fn queues(s: Arc<dyn Store>) {
    assert_eq!(s.queue_len("q").unwrap(), 0);
    let e = s.queue_pop("q", false).unwrap_err();
    assert_eq!(e.status(), Status::QueueEmpty);
    s.queue_push("q", b"1").unwrap();
    s.queue_push("q", b"2").unwrap();
    assert_eq!(s.queue_len("q").unwrap(), 2);
    assert!(s.check(&["q"]).unwrap());
    assert_eq!(s.queue_pop("q", false).unwrap(), b"1");
    assert_eq!(s.queue_pop("q", true).unwrap(), b"2");
    let pusher = {
        let s = s.clone_store().unwrap();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(30));
            s.queue_push("q", b"3").unwrap();
        })
    };
    assert_eq!(s.queue_pop("q", true).unwrap(), b"3");
    pusher.join().unwrap();
}

fn list_and_num_keys(s: Arc<dyn Store>) {
    let base = s.num_keys().unwrap();
    s.set("l1", b"").unwrap();
    s.set("l2", b"").unwrap();
    s.queue_push("lq", b"x").unwrap();
    assert_eq!(s.num_keys().unwrap(), base + 2);
    let keys = s.list_keys().unwrap();
    assert!(keys.contains(&"l1".to_string()) && keys.contains(&"l2".to_string()));
    assert!(!keys.contains(&"lq".to_string()));
}

fn prefixes(s: Arc<dyn Store>) {
    for key in ["job/a", "job/b", "jobx", "other/job/c"] {
        s.set(key, b"1").unwrap();
    }
    let mut listed = s.list_prefix("job/").unwrap();
    listed.sort();
    assert_eq!(listed, ["job/a", "job/b"]);
    assert_eq!(s.list_prefix("").unwrap().len(), 4);
    assert_eq!(s.delete_prefix("job/").unwrap(), 2);
    assert!(s.list_prefix("job/").unwrap().is_empty());
    assert_eq!(s.delete_prefix("job/").unwrap(), 0);
    assert!(s.check(&["jobx", "other/job/c"]).unwrap());
}

fn barrier_releases_all(s: Arc<dyn Store>) {
    let n = 4;
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let s = s.clone_store().unwrap();
            thread::spawn(move || s.barrier("bar", n, Some(Duration::from_secs(30))))
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    let e = s
        .barrier("lonely", 2, Some(Duration::from_millis(50)))
        .unwrap_err();
    assert_eq!(e.status(), Status::Timeout);
}

fn timeouts(s: Arc<dyn Store>) {
    let start = Instant::now();
    let e = s
        .wait(&["never"], Some(Duration::from_millis(100)))
        .unwrap_err();
    assert_eq!(e.status(), Status::Timeout);
    assert!(
        e.message().starts_with("wait timeout after 100ms, keys: "),
        "{}",
        e.message()
    );
    assert!(e.message().contains("never"));
    assert!(start.elapsed() >= Duration::from_millis(100));
    {
        let guard = TimeoutGuard::new(&*s, Duration::from_millis(50));
        assert_eq!(guard.store().timeout(), Duration::from_millis(50));
        assert_eq!(s.get("missing").unwrap_err().status(), Status::Timeout);
        assert_eq!(
            s.queue_pop("empty-q", true).unwrap_err().status(),
            Status::Timeout
        );
        assert_eq!(
            s.multi_get(&["missing"]).unwrap_err().status(),
            Status::Timeout
        );
    }
    assert_eq!(s.timeout(), Duration::from_secs(300));
}

fn clones_share_data(s: Arc<dyn Store>) {
    let c = s.clone_store().unwrap();
    c.set("from-clone", b"1").unwrap();
    assert_eq!(s.get("from-clone").unwrap(), b"1");
}
