//! EtcdStore against a real etcd: one member started by the test on
//! loopback ports, in a temporary directory, and killed at the end.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{EtcdStore, EtcdStoreOptions};
use crate::store::kv::counter_after;
use crate::store::{conformance, Store};
use crate::Status;

/// A one-member etcd cluster for a test.
pub(crate) struct Etcd {
    child: Child,
    pub(crate) endpoint: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Etcd {
    /// Starts etcd (`etcd` on PATH, from the Debian package etcd-server)
    /// and waits until it answers. Fails the test when it cannot.
    pub(crate) fn start() -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd must be installed (apt-get install etcd-server): the etcd tests need it");
        let etcd = Etcd {
            child,
            endpoint: format!("127.0.0.1:{client}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while EtcdStore::new(etcd.options("/probe", Duration::from_millis(200))).is_err() {
            assert!(Instant::now() < deadline, "etcd did not start within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        etcd
    }

    pub(crate) fn options(&self, prefix: &str, timeout: Duration) -> EtcdStoreOptions {
        EtcdStoreOptions {
            endpoints: vec![self.endpoint.clone()],
            prefix: prefix.into(),
            timeout,
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn etcd_store_conformance() {
    let etcd = Etcd::start();
    let jobs = std::sync::atomic::AtomicUsize::new(0);
    conformance::run_all(&|| {
        let job = jobs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let options = etcd.options(
            &format!("/job{job}"),
            crate::runtime::timeout::DEFAULT_STORE_TIMEOUT,
        );
        Arc::new(EtcdStore::new(options).unwrap()) as Arc<dyn Store>
    });
}

#[test]
fn jobs_under_different_prefixes_do_not_see_each_other() {
    let etcd = Etcd::start();
    let a = EtcdStore::new(etcd.options("/a", Duration::from_secs(30))).unwrap();
    let b = EtcdStore::new(etcd.options("/a/b", Duration::from_secs(30))).unwrap();
    a.set("k", b"from a").unwrap();
    b.queue_push("q", b"x").unwrap();
    assert!(!b.check(&["k"]).unwrap());
    assert_eq!(a.num_keys().unwrap(), 1);
    assert_eq!(a.list_keys().unwrap(), vec!["k".to_string()]);
    assert_eq!(a.queue_len("q").unwrap(), 0);
}

#[test]
fn a_member_that_is_down_is_skipped() {
    let etcd = Etcd::start();
    let dead = format!("127.0.0.1:{}", free_port());
    let store = EtcdStore::new(EtcdStoreOptions {
        endpoints: vec![dead, etcd.endpoint.clone()],
        prefix: "/skip".into(),
        timeout: Duration::from_secs(30),
    })
    .unwrap();
    store.set("k", b"v").unwrap();
    assert_eq!(store.get("k").unwrap(), b"v");
}

#[test]
fn no_member_answering_is_a_network_error_within_the_timeout() {
    let start = Instant::now();
    let e = EtcdStore::new(EtcdStoreOptions {
        endpoints: vec![format!("127.0.0.1:{}", free_port())],
        prefix: "/none".into(),
        timeout: Duration::from_millis(500),
    })
    .err()
    .expect("nothing listens there");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(e.status(), Status::Network, "{}", e.message());
    assert!(e.message().contains("no etcd member"), "{}", e.message());
}

#[test]
fn concurrent_adds_from_many_handles_are_exact() {
    let etcd = Etcd::start();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let store = EtcdStore::new(etcd.options("/adds", Duration::from_secs(30))).unwrap();
            std::thread::spawn(move || {
                for _ in 0..25 {
                    store.add("n", 1).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let store = EtcdStore::new(etcd.options("/adds", Duration::from_secs(30))).unwrap();
    assert_eq!(store.get("n").unwrap(), b"100");
}

#[test]
fn a_queue_element_is_popped_by_exactly_one_waiter() {
    let etcd = Etcd::start();
    let poppers: Vec<_> = (0..3)
        .map(|_| {
            let store = EtcdStore::new(etcd.options("/pop", Duration::from_secs(30))).unwrap();
            std::thread::spawn(move || store.queue_pop("q", true).unwrap())
        })
        .collect();
    let store = EtcdStore::new(etcd.options("/pop", Duration::from_secs(30))).unwrap();
    for i in 0..3 {
        store.queue_push("q", format!("{i}").as_bytes()).unwrap();
    }
    let mut got: Vec<Vec<u8>> = poppers.into_iter().map(|t| t.join().unwrap()).collect();
    got.sort();
    assert_eq!(got, vec![b"0".to_vec(), b"1".to_vec(), b"2".to_vec()]);
    assert_eq!(store.queue_len("q").unwrap(), 0);
}

#[test]
fn urls_name_the_members_and_the_prefix() {
    let o = EtcdStoreOptions::from_url("etcd://a:1,b:2/jobs/7").unwrap();
    assert_eq!(o.endpoints, vec!["a:1".to_string(), "b:2".to_string()]);
    assert_eq!(o.prefix, "/jobs/7");
    assert_eq!(
        EtcdStoreOptions::from_url("etcd://a:1").unwrap().prefix,
        "/"
    );
    for bad in ["http://a:1/p", "etcd:///p", "etcd://"] {
        let e = EtcdStoreOptions::from_url(bad).unwrap_err();
        assert_eq!(e.status(), Status::InvalidArgument, "{bad}");
    }
}

#[test]
fn delete_all_clears_one_job_only() {
    let etcd = Etcd::start();
    let job = EtcdStore::new(etcd.options("/j", Duration::from_secs(30))).unwrap();
    let other = EtcdStore::new(etcd.options("/jj", Duration::from_secs(30))).unwrap();
    job.set("k", b"1").unwrap();
    job.queue_push("q", b"1").unwrap();
    other.set("k", b"2").unwrap();
    // The value, the element, and the last write's commit token.
    assert_eq!(job.delete_all().unwrap(), 3);
    assert_eq!(job.num_keys().unwrap(), 0);
    assert_eq!(other.get("k").unwrap(), b"2");
}

#[test]
fn elastic_helpers_and_rpc_rendezvous_work_on_etcd() {
    let etcd = Etcd::start();
    let stores: Vec<Arc<dyn Store>> = (0..3)
        .map(|_| {
            Arc::new(EtcdStore::new(etcd.options("/elastic", Duration::from_secs(30))).unwrap())
                as Arc<dyn Store>
        })
        .collect();
    let threads: Vec<_> = stores
        .iter()
        .enumerate()
        .map(|(rank, s)| {
            let s = s.clone();
            std::thread::spawn(move || {
                let data = format!("r{rank}");
                let all = crate::store::elastic::synchronize(
                    &*s,
                    data.as_bytes(),
                    rank as i64,
                    3,
                    "sync/",
                    Duration::from_secs(30),
                )
                .unwrap();
                crate::store::elastic::barrier(&*s, 3, "bar", Duration::from_secs(30)).unwrap();
                let name = format!("w{rank}");
                let rpc = crate::rpc::Rpc::init(
                    s,
                    &name,
                    rank as u16,
                    3,
                    crate::rpc::RpcOptions::default(),
                    Default::default(),
                )
                .unwrap();
                let peer = rpc.worker(&format!("w{}", (rank + 1) % 3)).unwrap();
                rpc.shutdown(true, None).unwrap();
                (all, peer.id)
            })
        })
        .collect();
    for (rank, t) in threads.into_iter().enumerate() {
        let (all, peer) = t.join().unwrap();
        assert_eq!(all, vec![b"r0".to_vec(), b"r1".to_vec(), b"r2".to_vec()]);
        assert_eq!(usize::from(peer), (rank + 1) % 3);
    }
}

/// A three-member etcd cluster whose members can be killed and restarted.
struct Cluster {
    members: Vec<Member>,
    initial_cluster: String,
    _dir: tempfile::TempDir,
}

struct Member {
    name: String,
    client: String,
    peer: String,
    data: std::path::PathBuf,
    child: Option<Child>,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let members: Vec<Member> = (0..3)
            .map(|i| Member {
                name: format!("m{i}"),
                client: format!("127.0.0.1:{}", free_port()),
                peer: format!("http://127.0.0.1:{}", free_port()),
                data: dir.path().join(format!("m{i}")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster {
            members,
            initial_cluster,
            _dir: dir,
        };
        for i in 0..3 {
            cluster.run(i, "new");
        }
        cluster
    }

    fn run(&mut self, i: usize, state: &str) {
        let m = &mut self.members[i];
        let client_url = format!("http://{}", m.client);
        m.child = Some(
            Command::new("etcd")
                .args(["--name", &m.name, "--data-dir"])
                .arg(&m.data)
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &m.peer])
                .args(["--initial-advertise-peer-urls", &m.peer])
                .args(["--initial-cluster", &self.initial_cluster])
                .args(["--initial-cluster-state", state])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("etcd must be installed (apt-get install etcd-server)"),
        );
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }

    fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client.clone()).collect()
    }

    /// The member that leads, as the members still running report it.
    fn leader(&self) -> usize {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(2)))
            .build()
            .into();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for m in self.members.iter().filter(|m| m.child.is_some()) {
                let status: Option<serde_json::Value> = agent
                    .post(format!("http://{}/v3/maintenance/status", m.client))
                    .send("{}")
                    .ok()
                    .and_then(|mut r| r.body_mut().read_json().ok());
                let Some(status) = status else { continue };
                let leader = status["leader"].as_str().unwrap_or("").to_owned();
                for (i, other) in self.members.iter().enumerate() {
                    let id: Option<serde_json::Value> = agent
                        .post(format!("http://{}/v3/maintenance/status", other.client))
                        .send("{}")
                        .ok()
                        .and_then(|mut r| r.body_mut().read_json().ok());
                    if id.is_some_and(|s| s["header"]["member_id"].as_str() == Some(&leader)) {
                        return i;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no etcd leader within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// What one client thread saw during the fault test.
#[derive(Default)]
struct Tally {
    acked_adds: i64,
    failed_adds: i64,
    acked_sets: Vec<String>,
    longest_call: Duration,
}

#[test]
fn killing_a_member_then_the_leader_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start();
    let timeout = Duration::from_secs(3);
    let options = EtcdStoreOptions {
        endpoints: cluster.endpoints(),
        prefix: "/faults".into(),
        timeout,
    };
    // Three members starting on a loaded machine elect a leader in time.
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = EtcdStore::new(options.clone()) {
        assert!(Instant::now() < deadline, "the cluster never answered: {e}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let (options, stop) = (options.clone(), stop.clone());
            std::thread::spawn(move || {
                let store = EtcdStore::new(options).unwrap();
                let mut tally = Tally::default();
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut timed = |call: &mut dyn FnMut() -> bool| {
                        let started = Instant::now();
                        let ok = call();
                        tally.longest_call = tally.longest_call.max(started.elapsed());
                        ok
                    };
                    if timed(&mut || store.add("counter", 1).is_ok()) {
                        tally.acked_adds += 1;
                    } else {
                        tally.failed_adds += 1;
                    }
                    let key = format!("w{t}-{i}");
                    if timed(&mut || store.set(&key, key.as_bytes()).is_ok()) {
                        tally.acked_sets.push(key.clone());
                    }
                    // A waiter: released by the set just made, or failing
                    // within its timeout, never stuck.
                    timed(&mut || store.wait(&[&key], None).is_ok());
                    i += 1;
                }
                tally
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let leader = cluster.leader();
    let follower = (leader + 1) % 3;
    cluster.kill(follower);
    std::thread::sleep(Duration::from_secs(1));
    cluster.kill(leader);
    std::thread::sleep(Duration::from_secs(2));
    cluster.run(follower, "existing");
    cluster.run(leader, "existing");
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let tallies: Vec<Tally> = writers.into_iter().map(|w| w.join().unwrap()).collect();

    let store = EtcdStore::new(EtcdStoreOptions {
        timeout: Duration::from_secs(30),
        ..options
    })
    .unwrap();
    let acked: i64 = tallies.iter().map(|t| t.acked_adds).sum();
    let failed: i64 = tallies.iter().map(|t| t.failed_adds).sum();
    let counter = counter_after(b"counter", Some(&store.get("counter").unwrap()), 0).unwrap();
    let sets: Vec<&String> = tallies.iter().flat_map(|t| &t.acked_sets).collect();
    let longest = tallies.iter().map(|t| t.longest_call).max().unwrap();
    eprintln!(
        "etcd faults: {acked} adds acknowledged, {failed} failed, counter {counter}; \
         {} sets acknowledged, all found; longest call {longest:?}",
        sets.len()
    );
    // Every acknowledged add counted once; a failed one at most once.
    assert!(
        counter >= acked && counter <= acked + failed,
        "{counter} vs {acked}+{failed}"
    );
    for key in sets {
        assert_eq!(
            store.get(key).unwrap(),
            key.as_bytes(),
            "acknowledged set {key} lost"
        );
    }
    // Losing quorum stalled calls (the faults were felt), but every call
    // ended within its timeout (plus the request under way at the deadline).
    assert!(
        acked > 0 && longest > Duration::from_millis(500),
        "{longest:?}"
    );
    assert!(
        longest < timeout + Duration::from_secs(1),
        "a call took {longest:?}"
    );
}

#[test]
fn requests_of_more_keys_than_one_transaction_takes() {
    let etcd = Etcd::start();
    let store = EtcdStore::new(etcd.options("/many", Duration::from_secs(30))).unwrap();
    let keys: Vec<String> = (0..300).map(|i| format!("k{i}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let values: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
    store.multi_set(&keys, &values).unwrap();
    assert!(store.check(&keys).unwrap());
    store.wait(&keys, None).unwrap();
    let got = store.multi_get(&keys).unwrap();
    assert_eq!(got.iter().map(Vec::as_slice).collect::<Vec<_>>(), values);
    assert_eq!(store.num_keys().unwrap(), 300);
    // Many commits leave no token behind once the handle goes.
    for _ in 0..40 {
        store.add("n", 1).unwrap();
    }
    drop(store);
    let store = EtcdStore::new(etcd.options("/many", Duration::from_secs(30))).unwrap();
    let tokens = store
        .client
        .range(b"/many/t/", true, super::Read::Count, store.deadline(None))
        .unwrap();
    assert_eq!(tokens.count, 0);
}

#[test]
fn a_wrong_guess_costs_a_retry_never_a_wrong_answer() {
    let etcd = Etcd::start();
    let store = EtcdStore::new(etcd.options("/guess", Duration::from_secs(30))).unwrap();
    store.set("n", b"5").unwrap();
    let stale = |value: &[u8]| {
        Some(super::Seen {
            value: Some(value.into()),
            mod_revision: 1,
        })
    };
    let (now, _) = store.add_to(b"n", 1, stale(b"3")).unwrap();
    assert_eq!(now, 6, "the failed comparison read the real value");
    let (now, _) = store.add_to(b"n", 1, stale(b"not a number")).unwrap();
    assert_eq!(now, 7, "an error from a guess is checked against etcd");
    let (value, written) = store
        .compare_and_set(b"n", b"3", b"x", stale(b"3"))
        .unwrap();
    assert_eq!(
        (value, written),
        (b"7".to_vec(), 0),
        "no write: the real value"
    );
    let (value, _) = store
        .compare_and_set(b"n", b"7", b"8", stale(b"0"))
        .unwrap();
    assert_eq!(value, b"8", "a guess that says no is checked too");
    assert_eq!(store.get("n").unwrap(), b"8");
    let right = super::Seen::default();
    assert_eq!(store.add_to(b"fresh", 2, Some(right)).unwrap().0, 2);
}

mod held;
mod sessions;
