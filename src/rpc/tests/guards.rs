//! A group's shared secret and TLS between its workers: calls and RRefs
//! work with them; a peer without the secret, with another one, in clear,
//! or with a certificate from another CA gets nothing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;

use super::*;
use crate::rpc::agent::{Agent, Guard, WorkerInfo};
use crate::rpc::frame::{frame, HEADER};
use crate::security::tls::TlsFiles;

fn secret(text: &str) -> Option<Secret> {
    Some(Secret::new(text.as_bytes().to_vec()).unwrap())
}

fn pem(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/tls")
        .join(name)
}

/// Options with TLS from the test certificates, trusting `ca`.
fn with_tls(ca: &str, options: RpcOptions) -> RpcOptions {
    let files = TlsFiles {
        cert: Some(pem("server.pem")),
        key: Some(pem("server.key")),
        ca: Some(pem(ca)),
        client_ca: Some(pem(ca)),
        server_name: None,
    };
    let (tls_server, tls_client) = files.load(true).unwrap();
    RpcOptions {
        tls_server,
        tls_client,
        ..options
    }
}

fn options(secret_text: Option<&str>) -> RpcOptions {
    RpcOptions {
        rpc_timeout: Duration::from_secs(10),
        secret: secret_text.and_then(secret),
        ..RpcOptions::default()
    }
}

/// Calls and RRefs both ways between two workers of `ws`.
fn calls_and_rrefs_work(ws: &[Arc<Rpc>]) {
    assert_eq!(call(&ws[0], "w1", "echo", b"hi", &[]).unwrap(), b"hi");
    let big = vec![5u8; 3 << 20];
    assert_eq!(call(&ws[1], "w0", "echo", &big, &[]).unwrap(), big);
    let rref = ws[0].remote("w1", "echo", b"value", &[], None).unwrap();
    assert_eq!(ws[0].to_here(&rref, None).unwrap(), b"value");
    drop(rref);
    assert_settles(ws);
}

/// Sends a request frame in clear on a raw connection to `to`: whether
/// anything came back before the connection closed.
fn intruder_answered(to: &WorkerInfo) -> bool {
    let mut s = TcpStream::connect(to.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let request = Request::Call {
        func: "echo".into(),
        args: b"x".to_vec(),
        rrefs: Vec::new(),
    };
    let frame = frame(0, 1, 9, &request.encode()).unwrap();
    let _ = s.write_all(&frame);
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    // A worker with a secret greets with its challenge (kind 2), and one
    // with TLS answers with an alert; nothing else may come back before
    // the connection closes.
    let mut at = 0;
    while let Some(head) = reply.get(at..at + 5) {
        if head[4] == 1 {
            return true;
        }
        at += 4 + u32::from_le_bytes(head[..4].try_into().unwrap()) as usize;
    }
    false
}

#[test]
fn workers_sharing_a_secret_call_each_other_and_intruders_get_nothing() {
    let ws = group_with(2, options(Some("the group's secret")));
    calls_and_rrefs_work(&ws);
    assert!(!intruder_answered(ws[0].worker_info()));
    assert_eq!(call(&ws[0], "w1", "echo", b"still", &[]).unwrap(), b"still");
    shutdown_all(ws);
}

/// Calls between the two workers of `ws` fail both ways, at once, with
/// PermissionDenied whose message contains `why`; then the workers stop.
fn refused_both_ways(ws: Vec<Arc<Rpc>>, why: &str) {
    let started = Instant::now();
    for (from, to) in [(0, "w1"), (1, "w0")] {
        let e = call(&ws[from], to, "echo", b"x", &[]).unwrap_err();
        assert_eq!(e.status(), Status::PermissionDenied, "{from} -> {to}: {e}");
        assert!(e.message().contains(why), "{from} -> {to}: {e}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused, not timed out"
    );
    for w in ws {
        w.shutdown(false, Some(Duration::from_secs(5))).unwrap();
    }
}

#[test]
fn a_worker_with_another_secret_or_none_is_refused_both_ways() {
    for other in [Some("another secret"), None] {
        let ws = group_each(vec![options(Some("the group's secret")), options(other)]);
        refused_both_ways(ws, "secret");
    }
}

#[test]
fn workers_speak_tls_with_a_secret_and_refuse_what_their_ca_does_not_vouch_for() {
    let ws = group_with(2, with_tls("ca.pem", options(Some("s"))));
    calls_and_rrefs_work(&ws);
    assert!(!intruder_answered(ws[1].worker_info()), "nothing in clear");
    shutdown_all(ws);

    let ws = group_each(vec![
        with_tls("ca.pem", options(None)),
        with_tls("other-ca.pem", options(None)),
    ]);
    refused_both_ways(ws, "TLS");
}

#[test]
fn tls_one_way_only_is_refused_up_front() {
    let (_, tls_client) = TlsFiles {
        ca: Some(pem("ca.pem")),
        ..TlsFiles::default()
    }
    .load(true)
    .unwrap();
    let store: Arc<dyn Store> = Arc::new(crate::store::HashStore::new());
    let lopsided = RpcOptions {
        tls_client,
        ..options(None)
    };
    let e = Rpc::init(store, "w0", 0, 1, lopsided, functions())
        .err()
        .unwrap();
    assert_eq!(e.status(), Status::InvalidArgument);
}

/// This process's resident memory (the workers run in it), in bytes.
fn resident() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

/// Announces a frame of `kind` and 256 MiB on `s`, then sends up to 64 MiB
/// of its body: how far this process's resident memory grew meanwhile, and
/// how long the worker took to close the connection (`None`: it was still
/// open 2 s after the last byte).
fn announce_a_huge_frame(s: &mut TcpStream, kind: u8) -> (usize, Option<Duration>) {
    let mib = vec![0u8; 1 << 20];
    let before = resident();
    let started = Instant::now();
    let mut header = ((256u32 << 20) - 4).to_le_bytes().to_vec();
    header.push(kind);
    header.extend_from_slice(&[0; 10]);
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let sent = std::iter::once(&header[..])
        .chain(std::iter::repeat_n(&mib[..], 64))
        .take_while(|bytes| s.write_all(bytes).is_ok())
        .count();
    // Time for the worker to read what arrived.
    thread::sleep(Duration::from_millis(300));
    let grown = resident().saturating_sub(before);
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut sink = [0u8; 4096];
    let closed = loop {
        match s.read(&mut sink) {
            Ok(0) => break true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    let closed = closed.then(|| started.elapsed());
    eprintln!(
        "kind {kind}: sent the header and {} MiB, resident memory grew by {} KiB, \
         closed after {closed:?}",
        sent.saturating_sub(1),
        grown >> 10
    );
    (grown, closed)
}

/// Set in the environment of a test run alone by [`alone`].
const ALONE: &str = "DISTCORE_TEST_ALONE";

/// Whether this process runs test `name` (of this module) alone, so that
/// what it measures of the process is the test's own. If not, runs the test
/// alone in a process of its own and checks it passed.
fn alone(name: &str) -> bool {
    if std::env::var_os(ALONE).is_some() {
        return true;
    }
    let (_crate, module) = module_path!().split_once("::").unwrap();
    let test = format!("{module}::{name}");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", &test, "--nocapture"])
        .env(ALONE, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{test}, run alone, failed: {stderr}");
    eprint!("{stderr}");
    false
}

#[test]
fn an_unauthenticated_peer_announcing_a_huge_frame_is_closed_before_it_is_buffered() {
    if !alone("an_unauthenticated_peer_announcing_a_huge_frame_is_closed_before_it_is_buffered") {
        return;
    }
    let ws = group_with(2, options(Some("the group's secret")));
    let addr = ws[1].worker_info().addr;
    // A request in place of the handshake, and an answer to the challenge
    // that announces 256 MiB.
    for read_the_challenge in [false, true] {
        let mut s = TcpStream::connect(addr).unwrap();
        let kind = if read_the_challenge {
            let mut challenge = [0u8; HEADER + crate::security::auth::NONCE_LEN];
            s.read_exact(&mut challenge).unwrap();
            assert_eq!(challenge[4], 3, "a CHALLENGE");
            4
        } else {
            0
        };
        let (grown, closed) = announce_a_huge_frame(&mut s, kind);
        assert!(grown < 16 << 20, "kind {kind}: grew by {grown} bytes");
        let closed = closed.unwrap_or_else(|| panic!("kind {kind}: still open"));
        // Closed once the header came (the old agent never closed it);
        // the bound leaves a loaded machine slack.
        assert!(
            closed < Duration::from_secs(5),
            "kind {kind}: closed after {closed:?}"
        );
    }
    assert_eq!(call(&ws[0], "w1", "echo", b"still", &[]).unwrap(), b"still");
    shutdown_all(ws);
}

/// The agent of worker 0 on a listener of its own, and that listener's
/// address; its connections have 500 ms to finish their handshake.
fn impatient_agent(guard: Guard) -> (Agent, SocketAddr) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let guard = Guard {
        handshake_timeout: Duration::from_millis(500),
        ..guard
    };
    (Agent::start(0, listener, guard).unwrap(), addr)
}

/// Guards with a secret, and with TLS only.
fn secret_or_tls() -> [Guard; 2] {
    let tls = with_tls("ca.pem", options(None));
    [
        Guard {
            secret: secret("s"),
            ..Guard::default()
        },
        Guard {
            tls_server: tls.tls_server,
            tls_client: tls.tls_client,
            ..Guard::default()
        },
    ]
}

/// The deadline (500 ms) has passed, not much more.
fn at_the_deadline(elapsed: Duration) -> bool {
    (Duration::from_millis(450)..Duration::from_secs(3)).contains(&elapsed)
}

#[test]
fn a_connection_accepted_that_does_not_finish_its_handshake_is_closed_at_the_deadline() {
    for guard in secret_or_tls() {
        let (agent, addr) = impatient_agent(guard);
        // Connects, and says nothing: no HELLO, no TLS handshake.
        let mut s = TcpStream::connect(addr).unwrap();
        let started = Instant::now();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut sink = [0u8; 4096];
        // The challenge, if any, then the end (or a reset).
        while let Ok(1..) = s.read(&mut sink) {}
        let open = started.elapsed();
        assert!(at_the_deadline(open), "closed after {open:?}");
        agent.shutdown();
    }
}

#[test]
fn a_call_to_a_worker_that_never_finishes_the_handshake_fails_at_the_deadline() {
    for guard in secret_or_tls() {
        let (agent, _) = impatient_agent(guard);
        // Accepts (the system does), and says nothing.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        agent.set_peers(vec![WorkerInfo {
            id: 1,
            name: "silent".into(),
            addr: silent.local_addr().unwrap(),
        }]);
        let request = Request::Call {
            func: "echo".into(),
            args: b"x".to_vec(),
            rrefs: Vec::new(),
        };
        let started = Instant::now();
        let call = agent.send(1, &request, Duration::from_secs(30));
        let e = call.wait(Some(Duration::from_secs(5))).unwrap_err();
        let failed = started.elapsed();
        assert!(at_the_deadline(failed), "failed after {failed:?}");
        assert_eq!(e.status(), Status::Timeout, "{e}");
        assert!(e.message().contains("'silent'"), "{e}");
        assert!(e.message().contains("handshake"), "{e}");
        agent.shutdown();
    }
}
