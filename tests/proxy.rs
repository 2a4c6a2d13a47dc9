//! `distcore proxy` (the library's [`Proxy`]) in front of a `distcore
//! serve` that requires the secret and TLS: a client speaking PyTorch's
//! protocol (distcore's own, which falls back to it when the HELLO probe
//! is echoed) gets the store through it; a client that closes right after
//! a write loses nothing; a refused request and a dead server close only
//! what they must; a settings mismatch stops the proxy at start.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use distcore::security::auth::Secret;
use distcore::security::tls::TlsFiles;
use distcore::store::tcp::{Proxy, ProxyOptions};
use distcore::store::{Store, TcpStore, TcpStoreOptions};
use distcore::Status;

mod common;
use common::Serve;

const SECRET: &str = "the proxy test's secret";

fn pem(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/tls")
        .join(name)
}

fn secret_file() -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "{SECRET}").unwrap();
    file
}

/// A server requiring the secret and TLS from everyone.
fn secured_server(secret: &tempfile::NamedTempFile) -> Serve {
    let (cert, key) = (pem("server.pem"), pem("server.key"));
    Serve::start_with(
        None,
        &[
            "--port",
            "0",
            "--secret-file",
            secret.path().to_str().unwrap(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
}

/// A proxy on a free loopback port to the server at `port`, with `secret`.
fn proxy(port: u16, secret: &str) -> distcore::Result<Proxy> {
    let (_, tls_client) = TlsFiles {
        ca: Some(pem("ca.pem")),
        server_name: Some("localhost".into()),
        ..TlsFiles::default()
    }
    .load(false)?;
    Proxy::start(ProxyOptions {
        port: 0,
        upstream_host: "127.0.0.1".into(),
        upstream_port: port,
        secret: Some(Secret::new(secret.as_bytes().to_vec()).unwrap()),
        tls_client,
        connect_timeout: Duration::from_secs(3),
        ..ProxyOptions::default()
    })
}

/// A client of the secured server itself, with the secret and TLS.
fn direct(port: u16) -> TcpStore {
    TcpStore::new(TcpStoreOptions {
        host: "127.0.0.1".into(),
        port,
        timeout: Duration::from_secs(10),
        secret: Some(Secret::new(SECRET.as_bytes().to_vec()).unwrap()),
        tls_client: TlsFiles {
            ca: Some(pem("ca.pem")),
            server_name: Some("localhost".into()),
            ..TlsFiles::default()
        }
        .load(false)
        .unwrap()
        .1,
        ..TcpStoreOptions::default()
    })
    .unwrap()
}

/// Waits (up to 30 s) until the server `direct` talks to has a wait
/// pending: a client's blocking call has reached it.
fn until_a_wait_is_pending(direct: &TcpStore) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = direct.server_metrics().unwrap();
        let waiters = metrics
            .lines()
            .find_map(|l| l.strip_prefix("distcore_waiters "))
            .and_then(|n| n.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if waiters >= 1.0 {
            return;
        }
        assert!(Instant::now() < deadline, "no wait reached the server");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn client(port: u16, timeout: Duration) -> distcore::Result<TcpStore> {
    TcpStore::new(TcpStoreOptions {
        host: "127.0.0.1".into(),
        port,
        timeout,
        ..TcpStoreOptions::default()
    })
}

/// PyTorch's VALIDATE, then SET `key` = `value`, on a raw connection.
fn validate_and_set(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0x00];
    bytes.extend_from_slice(&0x3C85_F7CEu32.to_le_bytes());
    bytes.push(0x01);
    for field in [key, value] {
        bytes.extend_from_slice(&(field.len() as u64).to_le_bytes());
        bytes.extend_from_slice(field);
    }
    bytes
}

#[test]
fn a_pytorch_protocol_client_gets_the_secured_store_through_the_proxy() {
    let secret = secret_file();
    let server = secured_server(&secret);
    let proxy = proxy(server.port, SECRET).unwrap();
    let store = client(proxy.port(), Duration::from_secs(10)).unwrap();
    assert!(
        !store.peer_is_distcore(),
        "the proxy serves PyTorch's protocol"
    );
    store.set("k", b"v").unwrap();
    assert_eq!(store.get("k").unwrap(), b"v");
    assert_eq!(store.add("n", 5).unwrap(), 5);
    assert_eq!(store.compare_set("k", b"v", b"w").unwrap(), b"w".to_vec());
    let big: Vec<u8> = (0..(5 << 20)).map(|i| (i % 253) as u8).collect();
    store.set("big", &big).unwrap();
    let other = client(proxy.port(), Duration::from_secs(10)).unwrap();
    assert_eq!(other.get("big").unwrap(), big);
    // A wait that times out is cancelled through the proxy, and the
    // connection stays in step.
    let started = Instant::now();
    let e = store
        .wait(&["never"], Some(Duration::from_millis(300)))
        .unwrap_err();
    assert_eq!(e.status(), Status::Timeout, "{e}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(store.get("k").unwrap(), b"w");
    // The writes are on the secured server itself.
    assert_eq!(direct(server.port).add("n", 0).unwrap(), 5);
}

#[test]
fn a_client_that_closes_right_after_a_set_loses_nothing() {
    let secret = secret_file();
    let server = secured_server(&secret);
    let proxy = proxy(server.port, SECRET).unwrap();
    let value = vec![7u8; 3 << 20];
    for i in 0..20 {
        let mut raw = TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
        // PyTorch's clients (and distcore's) put keys under "/".
        raw.write_all(&validate_and_set(format!("/k{i}").as_bytes(), &value))
            .unwrap();
        drop(raw);
    }
    let store = client(proxy.port(), Duration::from_secs(10)).unwrap();
    for i in 0..20 {
        assert_eq!(store.get(&format!("k{i}")).unwrap(), value, "k{i}");
    }
}

#[test]
fn a_refused_request_closes_its_connection_and_no_other() {
    let secret = secret_file();
    let server = secured_server(&secret);
    let proxy = proxy(server.port, SECRET).unwrap();
    let bystander = client(proxy.port(), Duration::from_secs(10)).unwrap();
    bystander.set("text", b"not a number").unwrap();
    let mut raw = TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // ADD "/text" 1 (the key the client wrote: PyTorch's clients put keys
    // under "/"): the server refuses it; PyTorch's protocol has no error
    // reply, so the connection is closed.
    let mut add = vec![0x04];
    add.extend_from_slice(&5u64.to_le_bytes());
    add.extend_from_slice(b"/text");
    add.extend_from_slice(&1u64.to_le_bytes());
    raw.write_all(&add).unwrap();
    let mut byte = [0u8; 8];
    assert_eq!(raw.read(&mut byte).unwrap(), 0, "closed without a reply");
    assert_eq!(bystander.get("text").unwrap(), b"not a number");
}

#[test]
fn a_dead_server_fails_the_blocked_clients_at_once() {
    let secret = secret_file();
    let mut server = secured_server(&secret);
    let proxy = proxy(server.port, SECRET).unwrap();
    let store = client(proxy.port(), Duration::from_secs(60)).unwrap();
    store.set("up", b"1").unwrap();
    let waiting = std::thread::spawn(move || {
        let started = Instant::now();
        (store.get("never"), started.elapsed())
    });
    until_a_wait_is_pending(&direct(server.port));
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let (got, took) = waiting.join().unwrap();
    assert_eq!(got.unwrap_err().status(), Status::Network);
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn a_wrong_secret_stops_the_proxy_at_start() {
    let secret = secret_file();
    let server = secured_server(&secret);
    let e = proxy(server.port, "not the secret").err().unwrap();
    assert_eq!(e.status(), Status::PermissionDenied, "{e}");
}

/// CPU time the proxy on `port` has used: its event loop thread's, so
/// that the other tests running in this process meanwhile do not count.
fn proxy_cpu_time(port: u16) -> Duration {
    let name = format!("dc-proxy-{port}");
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.join("stat")).unwrap();
        // After the command's closing parenthesis: fields 3 on; utime and
        // stime are fields 14 and 15, in clock ticks.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf reads a constant of the system.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        return Duration::from_millis(ticks * 1000 / per_second);
    }
    panic!("no thread named {name}");
}

#[test]
fn a_client_with_more_waits_pending_than_the_proxy_relays_is_not_spun_on() {
    let secret = secret_file();
    let server = secured_server(&secret);
    let proxy = proxy(server.port, SECRET).unwrap();
    // 6,000 WAITs on a key nobody sets, more than the 4,096 requests the
    // proxy relays before their replies: the rest wait in the socket.
    let mut wait = vec![0x06];
    wait.extend_from_slice(&1u64.to_le_bytes());
    wait.extend_from_slice(&6u64.to_le_bytes());
    wait.extend_from_slice(b"/never");
    let mut raw = TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
    raw.write_all(&wait.repeat(6000)).unwrap();
    until_a_wait_is_pending(&direct(server.port));
    // Relaying 4,096 of them takes milliseconds: a spin would fill most of
    // the second that follows.
    let before = proxy_cpu_time(proxy.port());
    std::thread::sleep(Duration::from_secs(1));
    let spent = proxy_cpu_time(proxy.port()) - before;
    assert!(
        spent < Duration::from_millis(300),
        "the proxy spent {spent:?} of CPU in a second of waiting"
    );
    // The waits are pending, not lost: the key's arrival ends them all.
    let store = client(proxy.port(), Duration::from_secs(10)).unwrap();
    store.set("never", b"now").unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut stops = vec![0u8; 6000];
    raw.read_exact(&mut stops).unwrap();
    assert!(stops.iter().all(|&b| b == 0), "6,000 STOP_WAITINGs");
}
