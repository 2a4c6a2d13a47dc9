//! What guards a `distcore serve` exposed to others: where it listens by
//! default, its allow-list, authentication, and quotas — each refusing what
//! it should while the server goes on serving the rest.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use distcore::security::auth::Secret;
use distcore::store::{Store, TcpStore, TcpStoreOptions};
use distcore::Status;

mod common;
use common::raw::{raw_client, try_ping, try_set_get};
use common::{Netns, Serve};

fn netns() -> Netns {
    Netns::create().unwrap_or_else(|why| {
        panic!("network namespaces are unavailable here (root, iproute2 needed): {why}")
    })
}

fn client(host: &str, port: u16, secret: Option<Secret>) -> distcore::Result<TcpStore> {
    TcpStore::new(TcpStoreOptions {
        host: host.into(),
        port,
        timeout: Duration::from_secs(3),
        secret,
        ..TcpStoreOptions::default()
    })
}

/// Why `client` failed (it must).
fn refusal(host: &str, port: u16, secret: Option<Secret>) -> distcore::Error {
    match client(host, port, secret) {
        Ok(_) => panic!("connected to {host}:{port}"),
        Err(e) => e,
    }
}

fn secret(text: &str) -> Secret {
    Secret::new(text.as_bytes().to_vec()).unwrap()
}

/// A file holding `text`, kept while the returned guard lives.
fn secret_file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "{text}").unwrap();
    file
}

/// A PyTorch client's SET then GET of `key` on `s`: the value read back,
/// or `None` if the server closed the connection.
#[test]
fn a_default_serve_is_reachable_on_loopback_only() {
    let netns = netns();
    let private = Serve::start_in(&netns.name, &[]);
    let reached = TcpStream::connect_timeout(
        &format!("{}:{}", netns.inside, private.port)
            .parse()
            .unwrap(),
        Duration::from_secs(2),
    );
    assert!(
        reached.is_err(),
        "a default server must not be reachable from another network"
    );
    // The same server told to listen everywhere is reachable, from the
    // same place: the check above can fail.
    let exposed = Serve::start_in(&netns.name, &["--host", "0.0.0.0"]);
    let store = client(&netns.inside, exposed.port, None).unwrap();
    store.set("k", b"v").unwrap();
}

#[test]
fn clients_outside_the_allow_list_are_refused_and_counted() {
    let netns = netns();
    let outside = format!("{}/32", netns.outside);
    // We connect from `outside`: a list without it refuses us.
    let strict = Serve::start_in(
        &netns.name,
        &["--host", "0.0.0.0", "--allow", "192.0.2.0/24,127.0.0.1"],
    );
    let e = refusal(&netns.inside, strict.port, None);
    assert_eq!(e.status(), Status::Network, "{e}");
    let mut pytorch = TcpStream::connect((netns.inside.as_str(), strict.port)).unwrap();
    pytorch
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(
        matches!(pytorch.read(&mut b), Ok(0) | Err(_)),
        "a PyTorch client is closed at once too"
    );
    let open = Serve::start_in(
        &netns.name,
        &[
            "--host",
            "0.0.0.0",
            "--allow",
            &format!("192.0.2.0/24,{outside}"),
        ],
    );
    let store = client(&netns.inside, open.port, None).unwrap();
    store.set("k", b"v").unwrap();
    let metrics = store.server_metrics().unwrap();
    assert!(metrics.contains("distcore_connections_refused_total{reason=\"not_allowed\"} 0"));
    drop(store);
    // The strict server, asked from inside its namespace (loopback is allowed).
    let inside = std::process::Command::new("ip")
        .args(["netns", "exec", &netns.name, env!("CARGO_BIN_EXE_distcore")])
        .args(["inspect", &format!("127.0.0.1:{}", strict.port)])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&inside.stdout);
    assert!(
        report.contains("connections_refused_total{reason=\"not_allowed\"}"),
        "{report}"
    );
}

#[test]
fn only_clients_with_the_secret_get_in_and_the_secret_is_never_logged() {
    let file = secret_file("correct horse battery staple");
    let path = file.path().to_str().unwrap();
    let mut serve = Serve::start_with(None, &["--port", "0", "--secret-file", path]);
    let stderr = BufReader::new(serve.stderr());
    let log = thread::spawn(move || stderr.lines().map_while(Result::ok).collect::<Vec<_>>());

    let good = client(
        "127.0.0.1",
        serve.port,
        Some(secret("correct horse battery staple")),
    );
    let good = good.unwrap();
    good.set("k", b"v").unwrap();
    assert_eq!(good.get("k").unwrap(), b"v");

    let started = Instant::now();
    let e = refusal("127.0.0.1", serve.port, Some(secret("tr0ub4dor&3")));
    assert_eq!(e.status(), Status::PermissionDenied, "{e}");
    assert!(e.message().contains("wrong secret"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once, not retried until the timeout"
    );
    let e = refusal("127.0.0.1", serve.port, None);
    assert_eq!(e.status(), Status::PermissionDenied);
    assert!(e.message().contains("requires authentication"), "{e}");

    let mut pytorch = raw_client(serve.port);
    assert!(
        try_ping(&mut pytorch, 77),
        "VALIDATE and PING are let through"
    );
    assert_eq!(
        try_set_get(&mut pytorch, "/p"),
        None,
        "a PyTorch client from an address not let in unauthenticated"
    );
    assert_eq!(good.get("k").unwrap(), b"v", "the server goes on");
    let metrics = good.server_metrics().unwrap();
    for line in [
        "distcore_connections_refused_total{reason=\"authentication_failed\"} 1",
        "distcore_connections_refused_total{reason=\"unauthenticated\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }

    drop(good);
    drop(serve);
    // Refusals are logged a line per 10 s at most: the first one is.
    let log = log.join().unwrap().join("\n");
    assert!(log.contains("authentication failed: wrong secret"), "{log}");
    assert!(
        !log.contains("horse") && !log.contains("tr0ub4dor"),
        "{log}"
    );
}

#[test]
fn pytorch_clients_from_networks_let_in_unauthenticated_still_work() {
    let file = secret_file("s3cret");
    let path = file.path().to_str().unwrap();
    let serve = Serve::start_with(
        None,
        &[
            "--port",
            "0",
            "--secret-file",
            path,
            "--allow-unauthenticated",
            "127.0.0.0/8",
        ],
    );
    let mut pytorch = raw_client(serve.port);
    assert!(
        try_ping(&mut pytorch, 77),
        "VALIDATE and PING are let through"
    );
    assert_eq!(try_set_get(&mut pytorch, "/p"), Some(b"v".to_vec()));
    // A distcore client with the secret still proves it; one with the
    // wrong secret is still refused (the server proves itself either way).
    client("127.0.0.1", serve.port, Some(secret("s3cret"))).unwrap();
    let e = refusal("127.0.0.1", serve.port, Some(secret("other")));
    assert_eq!(e.status(), Status::PermissionDenied);
}

#[test]
fn a_client_with_a_secret_refuses_a_server_without_one() {
    let serve = Serve::start();
    let e = refusal("127.0.0.1", serve.port, Some(secret("s3cret")));
    assert_eq!(e.status(), Status::PermissionDenied);
    assert!(e.message().contains("has no secret"), "{e}");
}

#[test]
fn quotas_refuse_what_exceeds_them_and_the_server_keeps_serving() {
    let serve = Serve::start_with(
        None,
        &[
            "--port",
            "0",
            "--max-connections",
            "4",
            "--max-keys",
            "3",
            "--max-stored-bytes",
            "4096",
        ],
    );
    // One handle is one connection until it waits.
    let store = client("127.0.0.1", serve.port, None).unwrap();
    store.set("a", b"1").unwrap();
    store.set("b", b"2").unwrap();
    store.set("c", b"3").unwrap();
    // A SET has no reply (PyTorch's protocol): its refusal comes before
    // the next reply, and fails that call when it only reads.
    store.set("d", b"4").unwrap();
    let refused = store.check(&["d"]).unwrap_err();
    assert_eq!(refused.status(), Status::QuotaExceeded, "{refused}");
    assert!(
        refused.message().contains("1 write(s) sent earlier"),
        "{refused}"
    );
    assert!(!store.check(&["d"]).unwrap(), "not stored");
    // A call that writes returns its own outcome; the refusal fails the
    // call after it, before it is sent.
    store.set("e", b"5").unwrap();
    let e = store.add("counter", 1).unwrap_err();
    assert_eq!(e.status(), Status::QuotaExceeded, "{e}");
    assert!(e.message().contains("maximum of 3 keys"), "{e}");
    let refused = store.check(&["a"]).unwrap_err();
    assert!(refused.message().contains("sent earlier"), "{refused}");
    let e = store.add("counter", 1).unwrap_err();
    assert_eq!(e.status(), Status::QuotaExceeded, "{e}");
    assert!(e.message().contains("maximum of 3 keys"), "{e}");
    store.set("a", b"overwritten").unwrap();
    assert_eq!(store.get("a").unwrap(), b"overwritten");
    let e = store.compare_set("b", b"2", &[0; 5000]).unwrap_err();
    assert_eq!(e.status(), Status::QuotaExceeded);
    assert!(e.message().contains("maximum of 4096 stored bytes"), "{e}");
    assert_eq!(store.get("b").unwrap(), b"2");

    // The handle holds a connection or two; others fill the rest.
    let mut others = Vec::new();
    loop {
        let mut s = raw_client(serve.port);
        if !try_ping(&mut s, 77) {
            break;
        }
        others.push(s);
        assert!(others.len() <= 4, "the connection quota holds");
    }
    let metrics = store.server_metrics().unwrap();
    assert!(metrics.contains("distcore_connections{kind=\"pytorch\"} "));
    let open: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("distcore_connections{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(open, 4, "{metrics}");
    drop(others);
    // Room again once the server has seen them close.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !try_ping(&mut raw_client(serve.port), 77) {
        assert!(
            Instant::now() < deadline,
            "no room after connections closed"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let metrics = store.server_metrics().unwrap();
    for line in [
        // d, e and the two ADDs.
        "distcore_quota_refusals_total{quota=\"keys\"} 4",
        "distcore_quota_refusals_total{quota=\"stored_bytes\"} 1",
        "distcore_quota_limit{quota=\"connections\"} 4",
        "distcore_keys 3",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    // The fifth connection was refused, and so may a retry above have
    // been before the server saw the others close: counted alike.
    let refused = metric(
        &metrics,
        "distcore_quota_refusals_total{quota=\"connections\"}",
    );
    assert!(refused >= 1, "{metrics}");
    assert_eq!(
        metric(
            &metrics,
            "distcore_connections_refused_total{reason=\"connection_quota\"}"
        ),
        refused,
        "{metrics}"
    );
}

/// The value of the sample `name` (with its labels) in a metrics page.
fn metric(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
}

#[test]
fn a_key_full_of_control_characters_never_reaches_the_operators_terminal() {
    let serve = Serve::start();
    let store = client("127.0.0.1", serve.port, None).unwrap();
    // Retitles the terminal, clears it and forges a line of output.
    let hostile = "\x1b]0;owned\x07\x1b[2J\rfake: 0 keys\nx";
    store.set(hostile, b"v").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_distcore"))
        .args(["inspect", &format!("127.0.0.1:{}", serve.port)])
        .output()
        .unwrap();
    assert!(out.status.success());
    let report = String::from_utf8(out.stdout).unwrap();
    assert!(
        !report.contains(['\x1b', '\x07', '\r']),
        "control characters printed: {report:?}"
    );
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("\\u{1b}]0;owned\\u{7}\\u{1b}[2J\\rfake: 0 keys\\nx ")),
        "{report}"
    );
    // Error messages quote it the same way.
    let e = store
        .wait(&[hostile, "absent"], Some(Duration::from_millis(50)))
        .unwrap_err();
    assert!(!e.message().contains(['\x1b', '\r', '\n']), "{e:?}");
    assert!(e.message().contains("\\u{1b}[2J"), "{e}");
}
