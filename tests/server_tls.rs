//! TLS between distcore peers: a `distcore serve` with a certificate, the
//! library's own server, clients that trust (or do not trust) it, mutual
//! TLS, and the clear errors of every mismatch — each within its timeout.
//! The certificates are tests/tls/ (made by its make.sh).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use distcore::security::tls::TlsFiles;
use distcore::store::{Store, TcpStore, TcpStoreOptions};
use distcore::Status;

mod common;
use common::raw::{raw_client, try_get, try_ping, try_set_get};
use common::Serve;

/// A test certificate file.
fn pem(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/tls")
        .join(name)
}

fn pem_arg(name: &str) -> String {
    pem(name).to_str().unwrap().to_owned()
}

/// A client's TLS from `ca`, with the named certificate and key if given.
fn client_tls(ca: &str, identity: Option<&str>) -> TlsFiles {
    TlsFiles {
        ca: Some(pem(ca)),
        cert: identity.map(|name| pem(&format!("{name}.pem"))),
        key: identity.map(|name| pem(&format!("{name}.key"))),
        ..TlsFiles::default()
    }
}

fn connect(port: u16, tls: TlsFiles) -> distcore::Result<TcpStore> {
    let (_, tls_client) = tls.load(false)?;
    TcpStore::new(TcpStoreOptions {
        host: "127.0.0.1".into(),
        port,
        timeout: Duration::from_secs(3),
        tls_client,
        ..TcpStoreOptions::default()
    })
}

/// Why connecting failed (it must), and how long it took.
fn refusal(port: u16, tls: TlsFiles) -> (distcore::Error, Duration) {
    let started = Instant::now();
    match connect(port, tls) {
        Ok(_) => panic!("connected to 127.0.0.1:{port}"),
        Err(e) => (e, started.elapsed()),
    }
}

fn serve_tls(extra: &[&str]) -> Serve {
    let (cert, key) = (pem_arg("server.pem"), pem_arg("server.key"));
    let mut args = vec!["--port", "0", "--tls-cert", &cert, "--tls-key", &key];
    args.extend_from_slice(extra);
    Serve::start_with(None, &args)
}

fn metric(store: &TcpStore, line: &str) {
    let metrics = store.server_metrics().unwrap();
    assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
}

#[test]
fn tls_clients_are_served_and_a_client_in_clear_is_told_to_use_tls() {
    let serve = serve_tls(&[]);
    let store = Arc::new(connect(serve.port, client_tls("ca.pem", None)).unwrap());
    store.set("k", b"v").unwrap();
    assert_eq!(store.get("k").unwrap(), b"v");
    // Values past a TLS record and past the session's buffer, both ways.
    let big: Vec<u8> = (0..(3 << 20) + 17).map(|i| (i % 251) as u8).collect();
    store.set("big", &big).unwrap();
    assert_eq!(store.get("big").unwrap(), big);
    assert_eq!(store.add("n", 5).unwrap(), 5);
    assert_eq!(
        store.multi_get(&["k", "big"]).unwrap(),
        vec![b"v".to_vec(), big.clone()]
    );
    // An async wait on its own connection, woken by a write from another.
    let work = store.clone().get_async("later".into()).unwrap();
    let other = connect(serve.port, client_tls("ca.pem", None)).unwrap();
    other.set("later", b"now").unwrap();
    work.wait(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(work.result().unwrap().as_slice(), b"now");

    let (e, took) = refusal(serve.port, TlsFiles::default());
    assert_eq!(e.status(), Status::PermissionDenied, "{e}");
    assert!(e.message().contains("only over TLS"), "{e}");
    assert!(
        took < Duration::from_secs(2),
        "refused at once, not retried"
    );

    // PyTorch's client, in clear: VALIDATE and PING, then nothing.
    let mut pytorch = raw_client(serve.port);
    assert!(try_ping(&mut pytorch, 7));
    assert_eq!(try_get(&mut pytorch, "k"), None);
    assert_eq!(store.get("k").unwrap(), b"v", "the server goes on");
    metric(
        &store,
        "distcore_connections_refused_total{reason=\"plaintext\"} 1",
    );
}

#[test]
fn a_client_refuses_a_server_its_ca_does_not_vouch_for() {
    let serve = serve_tls(&[]);
    let (e, took) = refusal(serve.port, client_tls("other-ca.pem", None));
    assert_eq!(e.status(), Status::PermissionDenied, "{e}");
    assert!(e.message().contains("certificate"), "{e}");
    assert!(
        took < Duration::from_secs(2),
        "refused at once, not retried"
    );
    let wrong_name = TlsFiles {
        server_name: Some("example.org".into()),
        ..client_tls("ca.pem", None)
    };
    let (e, _) = refusal(serve.port, wrong_name);
    assert_eq!(e.status(), Status::PermissionDenied, "{e}");
    assert!(e.message().contains("example.org"), "{e}");
    let right_name = TlsFiles {
        server_name: Some("localhost".into()),
        ..client_tls("ca.pem", None)
    };
    connect(serve.port, right_name).unwrap();
}

#[test]
fn mutual_tls_serves_only_clients_with_a_certificate_from_its_ca() {
    let client_ca = pem_arg("ca.pem");
    let mut serve = serve_tls(&["--tls-client-ca", &client_ca]);
    let stderr = BufReader::new(serve.stderr());
    let log = thread::spawn(move || stderr.lines().map_while(Result::ok).collect::<Vec<_>>());

    let store = connect(serve.port, client_tls("ca.pem", Some("client"))).unwrap();
    store.set("k", b"v").unwrap();
    for (tls, what) in [
        (client_tls("ca.pem", None), "no certificate"),
        (client_tls("ca.pem", Some("other-client")), "another CA's"),
    ] {
        let (e, took) = refusal(serve.port, tls);
        assert_eq!(e.status(), Status::PermissionDenied, "{what}: {e}");
        assert!(e.message().contains("TLS"), "{what}: {e}");
        assert!(took < Duration::from_secs(2), "{what}: refused at once");
    }
    assert_eq!(store.get("k").unwrap(), b"v", "the server goes on");
    metric(
        &store,
        "distcore_connections_refused_total{reason=\"tls_failed\"} 2",
    );
    drop(store);
    drop(serve);
    let log = log.join().unwrap().join("\n");
    assert!(log.contains("TLS failed"), "{log}");
}

#[test]
fn a_tls_client_of_a_server_in_clear_fails_in_time_saying_why() {
    let serve = Serve::start();
    let started = Instant::now();
    let e = match TcpStore::new(TcpStoreOptions {
        port: serve.port,
        timeout: Duration::from_secs(2),
        tls_client: client_tls("ca.pem", None).load(false).unwrap().1,
        ..TcpStoreOptions::default()
    }) {
        Ok(_) => panic!("a TLS client connected to a server in clear"),
        Err(e) => e,
    };
    assert!(started.elapsed() < Duration::from_secs(4), "{e}");
    assert!(e.message().contains("TLS"), "{e}");
}

#[test]
fn pytorch_clients_from_exempt_networks_are_served_in_clear() {
    let serve = serve_tls(&["--allow-unauthenticated", "127.0.0.0/8"]);
    let mut pytorch = raw_client(serve.port);
    assert!(try_ping(&mut pytorch, 7));
    assert_eq!(try_set_get(&mut pytorch, "/p"), Some(b"v".to_vec()));
    let store = connect(serve.port, client_tls("ca.pem", None)).unwrap();
    assert_eq!(store.get("p").unwrap(), b"v");
}

#[test]
fn the_library_server_serves_tls_to_its_own_handle_and_others() {
    let files = TlsFiles {
        cert: Some(pem("server.pem")),
        key: Some(pem("server.key")),
        ca: Some(pem("ca.pem")),
        ..TlsFiles::default()
    };
    let (tls_server, tls_client) = files.load(true).unwrap();
    let server = TcpStore::new(TcpStoreOptions {
        is_server: true,
        bind_address: Some("127.0.0.1".parse().unwrap()),
        timeout: Duration::from_secs(3),
        tls_server,
        tls_client,
        ..TcpStoreOptions::default()
    })
    .unwrap();
    server.set("k", b"v").unwrap();
    let client = connect(server.port(), client_tls("ca.pem", None)).unwrap();
    assert_eq!(client.get("k").unwrap(), b"v");
    let (e, _) = refusal(server.port(), TlsFiles::default());
    assert_eq!(e.status(), Status::PermissionDenied, "{e}");
}

#[test]
fn tls_files_that_cannot_work_are_refused_up_front() {
    let cases = [
        (
            TlsFiles {
                cert: Some(pem("server.pem")),
                ..TlsFiles::default()
            },
            true,
            "go together",
        ),
        (
            TlsFiles {
                client_ca: Some(pem("ca.pem")),
                ..TlsFiles::default()
            },
            true,
            "client CA",
        ),
        (
            TlsFiles {
                server_name: Some("localhost".into()),
                ..TlsFiles::default()
            },
            false,
            "CA file",
        ),
        (client_tls("missing.pem", None), false, "missing.pem"),
        (client_tls("server.key", None), false, "no PEM certificate"),
        (
            TlsFiles {
                cert: Some(pem("server.pem")),
                key: Some(pem("client.key")),
                ..TlsFiles::default()
            },
            true,
            "key",
        ),
    ];
    for (files, serves, why) in cases {
        let e = files.load(serves).unwrap_err();
        assert_eq!(e.status(), Status::InvalidArgument, "{why}: {e}");
        assert!(e.message().contains(why), "{why}: {e}");
    }
}
