//! What a stranger who has not authenticated can make a guarded
//! `distcore serve` do: hold memory (nothing beyond a handshake's worth),
//! hold connections (only the handshake budget, and only until the
//! handshake deadline), keep real clients waiting (no). Every attack
//! starts before the handshake, against a real server process.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use distcore::security::auth::Secret;
use distcore::security::tls::TlsFiles;
use distcore::store::{Store, TcpStore, TcpStoreOptions};

mod common;
use common::raw::{bytes, SET, VALIDATE};
use common::Serve;

const SECRET: &str = "the-shared-secret";

/// A file holding the secret, kept while the returned guard lives.
fn secret_file() -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "{SECRET}").unwrap();
    file
}

/// `distcore serve` with the secret and `args`.
fn serve_with_secret(file: &tempfile::NamedTempFile, args: &[&str]) -> Serve {
    let path = file.path().to_str().unwrap();
    let mut all = vec!["--port", "0", "--secret-file", path];
    all.extend_from_slice(args);
    Serve::start_with(None, &all)
}

/// A client holding the secret.
fn client(port: u16) -> distcore::Result<TcpStore> {
    TcpStore::new(TcpStoreOptions {
        host: "127.0.0.1".into(),
        port,
        timeout: Duration::from_secs(5),
        secret: Some(Secret::new(SECRET.as_bytes().to_vec()).unwrap()),
        ..TcpStoreOptions::default()
    })
}

/// A raw connection with a read timeout of `patience`.
fn stranger(port: u16, patience: Duration) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(patience)).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Whether the server closed `s` (a read ends rather than times out).
fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut byte = [0u8; 64];
    loop {
        match s.read(&mut byte) {
            Ok(0) => return true,
            // A refusal with replies (PyTorch's protocol has none here).
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Sends the head of a SET announcing `len` bytes, then as much of its
/// body as the server takes, but never its last byte (the request stays
/// incomplete): how many body bytes went out before the connection failed.
fn send_a_big_set(s: &mut TcpStream, validate: bool, len: usize) -> usize {
    let mut head = Vec::new();
    if validate {
        head.extend_from_slice(&VALIDATE);
    }
    head.push(SET);
    bytes(&mut head, b"big");
    head.extend_from_slice(&(len as u64).to_le_bytes());
    if s.write_all(&head).is_err() {
        return 0;
    }
    let chunk = vec![7u8; 1 << 20];
    let mut sent = 0;
    while sent < len - 1 {
        match s.write(&chunk[..chunk.len().min(len - 1 - sent)]) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    sent
}

/// Memory a stranger's connections may make the server hold, with room
/// for the allocator and noise: the documented bound is a few KiB each.
const STRANGERS_BOUND_MIB: f64 = 16.0;

#[test]
fn a_request_before_authenticating_is_refused_at_its_first_byte_not_buffered() {
    const LEN: usize = 48 << 20;
    let file = secret_file();
    let serve = serve_with_secret(&file, &[]);
    let store = client(serve.port).unwrap();
    store.set("k", b"v").unwrap();
    let before = serve.rss_mib();
    let port = serve.port;
    // Four strangers, two of them validated first (as a PyTorch client),
    // each sending all but the last byte of a 48 MiB SET.
    let attacks: Vec<_> = (0..4)
        .map(|i| {
            thread::spawn(move || {
                let mut s = stranger(port, Duration::from_secs(5));
                let started = Instant::now();
                let sent = send_a_big_set(&mut s, i % 2 == 0, LEN);
                (s, sent, started.elapsed())
            })
        })
        .collect();
    let mut held = Vec::new();
    for attack in attacks {
        let (s, sent, took) = attack.join().unwrap();
        assert!(sent < LEN / 2, "{sent} bytes of body taken: it was read");
        assert!(took < Duration::from_secs(5), "refused after {took:?}");
        held.push(s);
    }
    // What the server holds while the strangers are still there.
    let grew = serve.rss_mib() - before;
    eprintln!("server memory grew {grew:.1} MiB under 4 unauthenticated 48 MiB SETs");
    assert!(grew < STRANGERS_BOUND_MIB, "grew {grew:.1} MiB");
    for s in &mut held {
        assert!(closed_by_server(s), "the server closed the connection");
    }
    // Real clients are served all along.
    assert_eq!(store.get("k").unwrap(), b"v");
    let metrics = store.server_metrics().unwrap();
    assert!(
        metrics.contains("distcore_connections_refused_total{reason=\"unauthenticated\"} 4"),
        "{metrics}"
    );
}

#[test]
fn strangers_in_their_handshake_neither_lock_clients_out_nor_stay() {
    let file = secret_file();
    let timeout = Duration::from_secs(3);
    let serve = serve_with_secret(
        &file,
        &[
            "--max-connections",
            "4",
            "--max-handshakes",
            "4",
            "--handshake-timeout",
            "3",
        ],
    );
    let store = client(serve.port).unwrap();
    store.set("k", b"v").unwrap();
    assert_eq!(store.get("k").unwrap(), b"v", "a spare connection for gets");
    // Ten strangers connect and say nothing: four fit the handshake budget,
    // the others are closed as soon as accepted.
    let arrived = Instant::now();
    let strangers: Vec<TcpStream> = (0..10)
        .map(|_| stranger(serve.port, Duration::from_millis(200)))
        .collect();
    // Until the server has taken them all in (however loaded the machine).
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = "distcore_quota_refusals_total{quota=\"handshakes\"} 6";
    while !store
        .server_metrics()
        .unwrap()
        .lines()
        .any(|l| l == refused)
    {
        assert!(Instant::now() < deadline, "the strangers were not all seen");
        thread::sleep(Duration::from_millis(20));
    }
    let mut held = Vec::new();
    for mut s in strangers {
        if !closed_by_server(&mut s) {
            held.push(s);
        }
    }
    assert_eq!(held.len(), 4, "the handshake budget holds");
    // The client connected before keeps being served, at once, on the
    // connections it has (a new one would wait for room in the budget).
    let started = Instant::now();
    store.set("k2", b"v2").unwrap();
    assert_eq!(store.get("k").unwrap(), b"v");
    assert!(started.elapsed() < timeout, "{:?}", started.elapsed());
    // The strangers are closed at their deadline, not before, not long after.
    for s in &mut held {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert!(closed_by_server(s));
        let at = arrived.elapsed();
        assert!(
            at >= timeout - Duration::from_millis(100),
            "closed at {at:?}"
        );
    }
    let at = arrived.elapsed();
    assert!(at < timeout + Duration::from_secs(5), "closed at {at:?}");
    // Room again for a new client.
    let other = client(serve.port).unwrap();
    assert_eq!(other.get("k2").unwrap(), b"v2");
    let metrics = store.server_metrics().unwrap();
    for line in [
        "distcore_connections_refused_total{reason=\"handshake_timeout\"} 4",
        "distcore_quota_refusals_total{quota=\"handshakes\"} 6",
        "distcore_quota_limit{quota=\"handshakes\"} 4",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
}

fn pem(name: &str) -> String {
    format!("{}/tests/tls/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn a_tls_handshake_never_finished_holds_a_few_kib_until_its_deadline() {
    let serve = Serve::start_with(
        None,
        &[
            "--port",
            "0",
            "--tls-cert",
            &pem("server.pem"),
            "--tls-key",
            &pem("server.key"),
            "--handshake-timeout",
            "2",
        ],
    );
    let tls = TlsFiles {
        ca: Some(pem("ca.pem").into()),
        ..TlsFiles::default()
    };
    let (_, client_tls) = tls.load(false).unwrap();
    let store = TcpStore::new(TcpStoreOptions {
        host: "127.0.0.1".into(),
        port: serve.port,
        timeout: Duration::from_secs(5),
        tls_client: client_tls,
        ..TcpStoreOptions::default()
    })
    .unwrap();
    store.set("k", b"v").unwrap();
    assert_eq!(store.get("k").unwrap(), b"v", "a spare connection for gets");
    let before = serve.rss_mib();
    // The budget's worth of strangers (128 by default) who send a TLS
    // ClientHello and never go on, and one who never starts at all.
    let config = Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
    );
    let arrived = Instant::now();
    let mut strangers: Vec<TcpStream> = (0..127)
        .map(|_| {
            let mut s = stranger(serve.port, Duration::from_secs(10));
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut hello = rustls::ClientConnection::new(config.clone(), name).unwrap();
            hello.write_tls(&mut s).unwrap();
            s
        })
        .collect();
    strangers.push(stranger(serve.port, Duration::from_secs(10)));
    thread::sleep(Duration::from_millis(500));
    let grew = serve.rss_mib() - before;
    eprintln!("server memory grew {grew:.2} MiB with 128 TLS handshakes left hanging");
    assert!(grew < STRANGERS_BOUND_MIB, "grew {grew:.1} MiB");
    assert_eq!(
        store.get("k").unwrap(),
        b"v",
        "clients are served meanwhile"
    );
    for s in &mut strangers {
        assert!(closed_by_server(s));
    }
    let at = arrived.elapsed();
    assert!(
        (Duration::from_millis(1900)..Duration::from_secs(6)).contains(&at),
        "closed at {at:?}"
    );
    assert!(store
        .server_metrics()
        .unwrap()
        .contains("distcore_connections_refused_total{reason=\"handshake_timeout\"} 128"));
}

#[test]
fn a_client_authenticating_into_a_full_server_waits_for_room_and_says_why_it_did_not_get_any() {
    let file = secret_file();
    let serve = serve_with_secret(&file, &["--max-connections", "1"]);
    let first = client(serve.port).unwrap();
    first.set("k", b"v").unwrap();
    // No room: retried until the client's timeout, then the server's reason.
    let started = Instant::now();
    let e = TcpStore::new(TcpStoreOptions {
        host: "127.0.0.1".into(),
        port: serve.port,
        timeout: Duration::from_secs(1),
        secret: Some(Secret::new(SECRET.as_bytes().to_vec()).unwrap()),
        ..TcpStoreOptions::default()
    })
    .err()
    .expect("no room for a second client");
    assert_eq!(e.status(), distcore::Status::Network, "{e}");
    assert!(e.message().contains("maximum of 1 connections"), "{e}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    // Room comes while it retries: it gets in (an ADD, on the one
    // connection the quota leaves it).
    let port = serve.port;
    let second = thread::spawn(move || client(port).map(|s| s.add("n", 1)));
    thread::sleep(Duration::from_millis(300));
    drop(first);
    assert_eq!(second.join().unwrap().unwrap().unwrap(), 1);
}
