//! A group's shared secret and TLS between its workers: calls and RRefs
//! work with them; a peer without the secret, with another one, in clear,
//! or with a certificate from another CA gets nothing.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;

use super::*;
use crate::tls::TlsFiles;

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
    let frame = crate::rpc::agent::frame(0, 1, 9, &request.encode()).unwrap();
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
