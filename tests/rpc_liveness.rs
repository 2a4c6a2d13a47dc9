//! RPC liveness with real processes (docs/liveness.md, "RPC"): a worker
//! killed with SIGKILL fails, at once, the calls other workers have
//! pending on it and their `to_here` on RRefs it owns, with PeerFailed
//! naming it — long before the RPC timeout; later calls to it fail the
//! same way, and calls between the survivors go on.
//!
//! The victim is this test binary run again (`worker_process`, which does
//! nothing unless DISTCORE_TEST_RPC_WORKER is set); the survivors are two
//! workers of the test process itself.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use distcore::rpc::{CallArgs, Rpc, RpcFunction, RpcOptions};
use distcore::store::{Store, TcpStore, TcpStoreOptions};
use distcore::{Error, Status};

/// The RPC timeout: a call that fails well within it failed because of
/// the kill.
const RPC_TIMEOUT: Duration = Duration::from_secs(60);
/// How soon after the kill every blocked call must have returned.
const PROMPTLY: Duration = Duration::from_secs(2);
const WORLD: u16 = 3;
/// The rank of the worker that is killed.
const VICTIM: u16 = 1;

fn store(port: u16, is_server: bool) -> TcpStore {
    TcpStore::new(TcpStoreOptions {
        host: "127.0.0.1".into(),
        port,
        is_server,
        bind_address: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        timeout: RPC_TIMEOUT,
        ..TcpStoreOptions::default()
    })
    .unwrap()
}

/// `echo` everywhere; on the victim also `block`, which says "blocked" on
/// its standard output and never returns.
fn functions() -> HashMap<String, Arc<RpcFunction>> {
    let mut f: HashMap<String, Arc<RpcFunction>> = HashMap::new();
    f.insert(
        "echo".into(),
        Arc::new(|c: &CallArgs<'_>| Ok(c.args.to_vec())),
    );
    f.insert(
        "block".into(),
        Arc::new(|_: &CallArgs<'_>| {
            println!("blocked");
            thread::sleep(RPC_TIMEOUT * 2);
            Ok(Vec::new())
        }),
    );
    f
}

fn join(port: u16, rank: u16) -> Arc<Rpc> {
    let options = RpcOptions {
        rpc_timeout: RPC_TIMEOUT,
        ..RpcOptions::default()
    };
    let store: Arc<dyn Store> = Arc::new(store(port, false));
    Rpc::init(
        store,
        &format!("w{rank}"),
        rank,
        WORLD,
        options,
        functions(),
    )
    .unwrap()
}

#[test]
fn worker_process() {
    let Ok(port) = std::env::var("DISTCORE_TEST_RPC_WORKER") else {
        return;
    };
    let _rpc = join(port.parse().unwrap(), VICTIM);
    println!("worker ready");
    thread::sleep(RPC_TIMEOUT * 2);
}

/// Reads the victim's output until a line saying `what`.
fn expect_line(out: &mut BufReader<ChildStdout>, what: &str) {
    let mut line = String::new();
    while !line.contains(what) {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the worker exited");
    }
}

/// Kills the victim (by its pid) when dropped, whatever happens.
struct Victim(Child);

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_killed_worker_fails_calls_and_to_here_on_its_rrefs_at_once_naming_it() {
    let server = store(0, true);
    let port = server.port();
    let mut victim = Victim(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "worker_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("DISTCORE_TEST_RPC_WORKER", port.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut out = BufReader::new(victim.0.stdout.take().unwrap());
    let survivors: Vec<Arc<Rpc>> = [0, 2]
        .map(|rank| thread::spawn(move || join(port, rank)))
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    expect_line(&mut out, "worker ready");
    let w0 = survivors[0].clone();
    let victim_info = w0.worker("w1").unwrap();

    // An RRef on the victim, confirmed and fetched before it dies.
    let earlier = w0.remote("w1", "echo", b"value", &[], None).unwrap();
    assert_eq!(w0.to_here(&earlier, None).unwrap(), b"value");

    // (a) a sync call blocked in the victim, (b) a to_here on an RRef the
    // victim owns whose value never comes.
    let calling = {
        let w0 = w0.clone();
        thread::spawn(move || w0.rpc_sync("w1", "block", b"", &[], None))
    };
    expect_line(&mut out, "blocked");
    let never = w0.remote("w1", "block", b"", &[], None).unwrap();
    expect_line(&mut out, "blocked");
    let fetching = {
        let w0 = w0.clone();
        thread::spawn(move || w0.to_here(&never, None))
    };
    // The fetch is on its way, or will find the victim dead.
    thread::sleep(Duration::from_millis(100));

    let killed = Instant::now();
    victim.0.kill().unwrap();
    let errors: Vec<Error> = [calling, fetching]
        .map(|t| t.join().unwrap().expect_err("returned without a reply"))
        .into();
    let elapsed = killed.elapsed();
    println!("the blocked call and to_here returned {elapsed:?} after the kill");
    assert!(elapsed < PROMPTLY, "{elapsed:?}: {errors:?}");

    // Later: a call, a to_here on the confirmed RRef, and a remote() fail
    // at once the same way.
    let later = Instant::now();
    let mut errors = errors;
    errors.push(w0.rpc_sync("w1", "echo", b"", &[], None).unwrap_err());
    errors.push(w0.to_here(&earlier, None).unwrap_err());
    let created = w0.remote("w1", "echo", b"", &[], None).unwrap();
    errors.push(w0.to_here(&created, None).unwrap_err());
    assert!(later.elapsed() < PROMPTLY, "{:?}", later.elapsed());
    for e in &errors {
        assert_eq!(e.status(), Status::PeerFailed, "{e}");
        let message = e.message();
        for part in [
            "worker 'w1'".to_string(),
            format!("id {VICTIM}"),
            victim_info.addr.to_string(),
            "connection".into(),
        ] {
            assert!(message.contains(&part), "{part}: {message}");
        }
    }

    // The survivors still call each other, both ways.
    assert_eq!(w0.rpc_sync("w2", "echo", b"on", &[], None).unwrap(), b"on");
    assert_eq!(
        survivors[1]
            .rpc_sync("w0", "echo", b"on", &[], None)
            .unwrap(),
        b"on"
    );
    drop((earlier, created));
    for w in survivors {
        w.shutdown(false, None).unwrap();
    }
}
