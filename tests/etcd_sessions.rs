//! Liveness sessions on a 3-member etcd cluster served by two
//! `distcore serve --backend etcd` front-ends, every piece a real process
//! (docs/liveness.md, "On etcd"). While sessions live: an etcd member is
//! frozen for longer than the client gives a silent member, the leader is
//! killed (and comes back), and a front-end is killed with SIGKILL and
//! restarted on its port. Then a member process is killed. Checked: no
//! live member was failed (each of the job's members sees its blocked get
//! answered, having resumed its session where its front-end died), the
//! killed one was reported to the members on both front-ends, naming it,
//! and its group's failure was recorded in etcd once. In a recoverable
//! group beside them, a member killed fails nobody, and the members on
//! both front-ends read the same membership without it at the same epoch.
//!
//! The members are this test binary run again (`etcd_member_process`,
//! which does nothing unless DISTCORE_ETCD_MEMBER is set).

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use distcore::store::tcp::SessionOptions;
use distcore::store::Store;
use distcore::Status;

mod common;
use common::Serve;

/// Far longer than the test: a call that returns did so because of what
/// happened, not its timeout.
const TIMEOUT: Duration = Duration::from_secs(300);

/// The members' TTL (their leases: 5 s, the least).
const TTL: Duration = Duration::from_millis(1500);

/// Rank `rank` of `group` (recoverable if a fourth word says so) on the
/// server at `port`: says "ready", then
/// waits for `<group>done`, resuming its session through every front-end
/// death (a network error: the next call resumes it), and says "done", or
/// "failed <message>" when told a member failed.
#[test]
fn etcd_member_process() {
    let Ok(spec) = std::env::var("DISTCORE_ETCD_MEMBER") else {
        return;
    };
    let parts: Vec<&str> = spec.split(' ').collect();
    let (port, group, rank) = (
        parts[0].parse().unwrap(),
        parts[1],
        parts[2].parse().unwrap(),
    );
    let store = common::client("127.0.0.1", port, TIMEOUT);
    let options = SessionOptions {
        ttl: Some(TTL),
        recoverable: parts.get(3) == Some(&"recoverable"),
        ..SessionOptions::new(group, rank)
    };
    store.open_session(&options).unwrap();
    println!("member: ready");
    let done = format!("{group}done");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        assert!(Instant::now() < deadline, "never done");
        match store.get(&done) {
            Ok(_) => {
                println!("member: done");
                break;
            }
            Err(e) if e.status() == Status::PeerFailed => {
                println!("member: failed {}", e.message());
                break;
            }
            Err(e) => {
                eprintln!("member {group}{rank}: {} (going on)", e.message());
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
    thread::sleep(TIMEOUT);
}

/// A member process and its output.
struct Member {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Member {
    fn spawn(port: u16, group: &str, rank: u32) -> Member {
        Member::spawn_as(port, &format!("{group} {rank}"))
    }

    /// A member of a recoverable group.
    fn spawn_recoverable(port: u16, group: &str, rank: u32) -> Member {
        Member::spawn_as(port, &format!("{group} {rank} recoverable"))
    }

    fn spawn_as(port: u16, who: &str) -> Member {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "etcd_member_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("DISTCORE_ETCD_MEMBER", format!("{port} {who}"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut member = Member { child, out };
        assert_eq!(member.next_line(), "ready");
        member
    }

    /// What it says next (the test harness's words around it skipped).
    fn next_line(&mut self) -> String {
        loop {
            let mut line = String::new();
            assert!(
                self.out.read_line(&mut line).unwrap() > 0,
                "the member exited"
            );
            if let Some((_, said)) = line.split_once("member: ") {
                return said.trim().to_string();
            }
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Three etcd members on loopback, in a directory removed at the end.
struct Cluster {
    clients: Vec<String>,
    peers: Vec<String>,
    children: Vec<Option<Child>>,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        let mut cluster = Cluster {
            clients: (0..3)
                .map(|_| format!("127.0.0.1:{}", free_port()))
                .collect(),
            peers: (0..3)
                .map(|_| format!("http://127.0.0.1:{}", free_port()))
                .collect(),
            children: vec![None, None, None],
            dir: tempfile::tempdir().unwrap(),
        };
        for i in 0..3 {
            cluster.run(i, "new");
        }
        cluster.leader();
        cluster
    }

    fn run(&mut self, i: usize, state: &str) {
        let initial: Vec<String> = (0..3).map(|j| format!("m{j}={}", self.peers[j])).collect();
        let client = format!("http://{}", self.clients[i]);
        let child = Command::new("etcd")
            .args(["--name", &format!("m{i}"), "--data-dir"])
            .arg(self.dir.path().join(format!("m{i}")))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args(["--listen-peer-urls", &self.peers[i]])
            .args(["--initial-advertise-peer-urls", &self.peers[i]])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", state])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd must be installed (apt-get install etcd-server)");
        self.children[i] = Some(child);
    }

    fn signal(&self, i: usize, signal: libc::c_int) {
        let pid = self.children[i].as_ref().unwrap().id() as libc::pid_t;
        // SAFETY: signalling a child of ours by its pid.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self, prefix: &str) -> String {
        format!("etcd://{}/{prefix}", self.clients.join(","))
    }

    fn status(&self, i: usize) -> Option<serde_json::Value> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(2)))
            .build()
            .into();
        let url = format!("http://{}/v3/maintenance/status", self.clients[i]);
        agent.post(url).send("{}").ok()?.body_mut().read_json().ok()
    }

    /// The member that leads (waiting, bounded, for one).
    fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let running = (0..3).filter(|i| self.children[*i].is_some());
            let statuses: Vec<(usize, serde_json::Value)> =
                running.filter_map(|i| Some((i, self.status(i)?))).collect();
            for (_, status) in &statuses {
                let leader = status["leader"].as_str().unwrap_or("");
                let found = statuses
                    .iter()
                    .find(|(_, s)| s["header"]["member_id"].as_str() == Some(leader));
                if let Some((i, _)) = found {
                    return *i;
                }
            }
            assert!(Instant::now() < deadline, "no etcd leader within 30 s");
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The keys under `prefix`, read from a running member.
    fn keys(&self, prefix: &str) -> Vec<Vec<u8>> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().unwrap() += 1;
        let body = serde_json::json!({
            "key": b64.encode(prefix), "range_end": b64.encode(&end), "keys_only": true,
        });
        for i in (0..3).filter(|i| self.children[*i].is_some()) {
            let url = format!("http://{}/v3/kv/range", self.clients[i]);
            let Ok(mut reply) = ureq::post(url).send(body.to_string()) else {
                continue;
            };
            let reply: serde_json::Value = reply.body_mut().read_json().unwrap();
            let kvs = reply["kvs"].as_array().cloned().unwrap_or_default();
            return kvs
                .iter()
                .map(|kv| b64.decode(kv["key"].as_str().unwrap()).unwrap())
                .collect();
        }
        panic!("no etcd member answered");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..3 {
            if self.children[i].is_some() {
                self.signal(i, libc::SIGCONT);
            }
            self.kill(i);
        }
    }
}

/// Waits (bounded) until the front-end on `port` holds the sessions of
/// `members` (group, rank): they resumed there.
fn until_resumed(port: u16, members: &[(&str, u32)]) {
    let inspector = common::client("127.0.0.1", port, TIMEOUT);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listing = inspector.sessions("").unwrap();
        let held = |(group, rank): &(&str, u32)| {
            listing
                .sessions
                .iter()
                .any(|s| s.group == *group && s.rank == *rank)
        };
        if members.iter().all(held) {
            return;
        }
        assert!(Instant::now() < deadline, "not resumed: {listing:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// A front-end on `port` (0: any), logging to `log` (kept for a failure).
fn front_end(url: &str, port: u16, log: &std::path::Path) -> Serve {
    let port = port.to_string();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let args = ["--port", &port, "--backend", url, "--backend-timeout", "30"];
    Serve::start_logging(log, &args)
}

#[test]
fn sessions_survive_etcd_faults_and_a_front_end_restart_and_a_failure_is_told_once_everywhere() {
    if std::env::var("DISTCORE_ETCD_MEMBER").is_ok() {
        return;
    }
    let mut cluster = Cluster::start();
    let url = cluster.url("job");
    let logs = cluster.dir.path().to_owned();
    let (f1_log, f2_log) = (logs.join("f1.log"), logs.join("f2.log"));
    let mut f1 = front_end(&url, 0, &f1_log);
    let f1_port = f1.port;
    let f2 = front_end(&url, 0, &f2_log);
    let logs_of = || {
        let read = |p| std::fs::read_to_string(p).unwrap_or_default();
        format!(
            "front-end 1:\n{}\nfront-end 2:\n{}",
            read(&f1_log),
            read(&f2_log)
        )
    };
    // The job: ranks 0-1 on f1, 2-3 on f2; another group whose rank 0 (on
    // f1) will be killed, ranks 1 (f2) and 2 (f1) told.
    let mut job: Vec<Member> = (0..4)
        .map(|rank| Member::spawn(if rank < 2 { f1_port } else { f2.port }, "job/", rank))
        .collect();
    let mut doomed = Member::spawn(f1_port, "doomed/", 0);
    let mut told = [
        Member::spawn(f2.port, "doomed/", 1),
        Member::spawn(f1_port, "doomed/", 2),
    ];
    // A recoverable group: ranks 0 and 2 on f1, 1 on f2, and two of this
    // test's handles watching its membership, one on each front-end.
    let mut elastic: Vec<Member> = (0..3)
        .map(|rank| {
            Member::spawn_recoverable(if rank == 1 { f2.port } else { f1_port }, "elastic/", rank)
        })
        .collect();
    let elastic_lost = elastic.pop().unwrap();

    // A follower frozen for longer than the client gives a silent member
    // (5 s), then thawed.
    let leader = cluster.leader();
    let follower = (leader + 1) % 3;
    cluster.signal(follower, libc::SIGSTOP);
    thread::sleep(Duration::from_secs(7));
    cluster.signal(follower, libc::SIGCONT);
    // The leader killed; the others elect one; it comes back.
    let leader = cluster.leader();
    cluster.kill(leader);
    thread::sleep(Duration::from_secs(3));
    cluster.leader();
    cluster.run(leader, "existing");
    // Front-end 1 killed with SIGKILL and started again on its port: its
    // members' connections break, and their next calls resume their
    // sessions there.
    f1.child.kill().unwrap();
    f1.child.wait().unwrap();
    drop(f1);
    let _f1 = front_end(&url, f1_port, &f1_log);
    until_resumed(
        f1_port,
        &[
            ("job/", 0),
            ("job/", 1),
            ("doomed/", 0),
            ("doomed/", 2),
            ("elastic/", 0),
            ("elastic/", 2),
        ],
    );

    // Rank 0 of the other group dies: both front-ends' members are told.
    let killed = Instant::now();
    doomed.child.kill().unwrap();
    let lines: Vec<String> = told.iter_mut().map(Member::next_line).collect();
    for line in &lines {
        assert!(
            line.starts_with("failed rank 0 of group 'doomed/'"),
            "told who failed: {line}\n{}",
            logs_of()
        );
    }
    // Both front-ends told the same failure (the one etcd recorded).
    assert_eq!(lines[0], lines[1], "the front-ends agree");
    let telling = killed.elapsed();
    assert!(
        telling < Duration::from_secs(5),
        "told at once: {telling:?}"
    );
    // Recorded once in etcd (the failure record of its group).
    let failures = cluster.keys("/job/f/");
    let expected = [b"/job/f/7:doomed/".to_vec()];
    assert_eq!(failures, expected, "one failure record\n{}", logs_of());

    // No member of the job failed through all of it.
    let release = common::client("127.0.0.1", f2.port, TIMEOUT);
    release.set("job/done", b"1").unwrap();
    for member in &mut job {
        let line = member.next_line();
        assert_eq!(line, "done", "a live member was failed\n{}", logs_of());
    }

    // The recoverable group: rank 2 killed changes its membership, read
    // alike on both front-ends, and fails nobody.
    let watchers: Vec<_> = [(f1_port, 3), (f2.port, 4)]
        .into_iter()
        .map(|(port, rank)| {
            let store = common::client("127.0.0.1", port, TIMEOUT);
            let options = SessionOptions {
                recoverable: true,
                ..SessionOptions::new("elastic/", rank)
            };
            store.open_session(&options).unwrap();
            store
        })
        .collect();
    let ranks = |store: &distcore::store::tcp::TcpStore| {
        let members = store.members().unwrap();
        let ranks: Vec<u32> = members.members.iter().map(|m| m.rank).collect();
        (members.epoch, ranks)
    };
    let (epoch, all) = ranks(&watchers[1]);
    assert_eq!(all, [0, 1, 2, 3, 4], "{}", logs_of());
    let changes: Vec<_> = watchers
        .iter()
        .map(|w| w.watch_members(epoch).unwrap())
        .collect();
    drop(elastic_lost); // SIGKILL
    for change in &changes {
        change.wait(Some(Duration::from_secs(30))).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let seen = loop {
        let seen: Vec<_> = watchers.iter().map(ranks).collect();
        if seen.iter().all(|(_, r)| r == &[0, 1, 3, 4]) {
            break seen;
        }
        assert!(
            Instant::now() < deadline,
            "membership {seen:?}\n{}",
            logs_of()
        );
        thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(seen[0].0, seen[1].0, "one epoch on both front-ends");
    assert!(seen[0].0 > epoch);
    release.set("elastic/done", b"1").unwrap();
    for member in &mut elastic {
        let line = member.next_line();
        assert_eq!(
            line,
            "done",
            "a recoverable member was failed\n{}",
            logs_of()
        );
    }
    assert!(
        cluster.keys("/job/f/7:doomed/").len() == 1 && cluster.keys("/job/f/8:elastic/").is_empty(),
        "no failure recorded in a recoverable group"
    );
}
