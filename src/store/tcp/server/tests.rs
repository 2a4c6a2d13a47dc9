//! The server at the byte level, as PyTorch clients and hostile peers drive it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::*;
use crate::store::tcp::protocol::{Command, Encoder, NOT_READY, VALIDATE_MAGIC, WAIT_CANCELED};

fn server() -> Server {
    Server::start(ServerOptions {
        limits: Limits {
            max_value_len: 1 << 20,
            ..Limits::default()
        },
        ..ServerOptions::default()
    })
    .unwrap()
}

fn raw(server: &Server) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn validated(server: &Server) -> TcpStream {
    let mut s = raw(server);
    s.write_all(
        &Encoder::request(Command::Validate)
            .u32(VALIDATE_MAGIC)
            .finish(),
    )
    .unwrap();
    s
}

fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

fn ping(s: &mut TcpStream, nonce: u32) -> u32 {
    s.write_all(&Encoder::request(Command::Ping).u32(nonce).finish())
        .unwrap();
    u32::from_le_bytes(read_n(s, 4).try_into().unwrap())
}

/// True when the server closed the connection (EOF or reset) within 10 s.
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

fn wait_for(server: &Server, what: impl Fn(ServerStats) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !what(server.stats()) {
        assert!(
            Instant::now() < deadline,
            "stats never matched: {:?}",
            server.stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn the_spec_example_byte_for_byte() {
    let srv = server();
    let mut s = raw(&srv);
    let hex = |h: &str| -> Vec<u8> {
        let h: String = h.split_whitespace().collect();
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect()
    };
    s.write_all(&hex("00 cef7853c 0d e0080000")).unwrap();
    assert_eq!(read_n(&mut s, 4), hex("e0080000"));
    s.write_all(&hex("01 0300000000000000 2f6b31 0200000000000000 7631"))
        .unwrap();
    s.write_all(&hex("06 0100000000000000 0300000000000000 2f6b31"))
        .unwrap();
    assert_eq!(read_n(&mut s, 1), hex("00"));
    s.write_all(&hex("03 0300000000000000 2f6b31")).unwrap();
    assert_eq!(read_n(&mut s, 10), hex("0200000000000000 7631"));
    s.write_all(&hex("04 0400000000000000 2f636e74 0500000000000000"))
        .unwrap();
    assert_eq!(read_n(&mut s, 8), hex("0500000000000000"));
    s.write_all(&hex("12 0400000000000000 2f626172 0100000000000000"))
        .unwrap();
    assert_eq!(read_n(&mut s, 1), hex("00"));
}

#[test]
fn pipelined_and_split_requests() {
    let srv = server();
    let mut s = validated(&srv);
    let mut two = Encoder::request(Command::Ping).u32(1).finish();
    two.extend(Encoder::request(Command::Ping).u32(2).finish());
    s.write_all(&two).unwrap();
    assert_eq!(read_n(&mut s, 8), [1, 0, 0, 0, 2, 0, 0, 0]);
    let req = Encoder::request(Command::Set)
        .bytes(b"/split")
        .bytes(b"value")
        .finish();
    for byte in &req {
        s.write_all(&[*byte]).unwrap();
        s.flush().unwrap();
    }
    s.write_all(&Encoder::request(Command::Get).bytes(b"/split").finish())
        .unwrap();
    assert_eq!(read_n(&mut s, 13)[8..], *b"value");
}

#[test]
fn nothing_but_validate_before_validation() {
    let srv = server();
    let mut s = raw(&srv);
    s.write_all(
        &Encoder::request(Command::Set)
            .bytes(b"/x")
            .bytes(b"1")
            .finish(),
    )
    .unwrap();
    s.write_all(
        &Encoder::request(Command::Validate)
            .u32(VALIDATE_MAGIC)
            .finish(),
    )
    .unwrap();
    s.write_all(&Encoder::request(Command::Check).keys(&["/x"]).finish())
        .unwrap();
    assert_eq!(read_n(&mut s, 1), [NOT_READY]);
}

#[test]
fn bad_input_closes_only_that_connection() {
    let srv = server();
    let mut good = validated(&srv);
    let bad_inputs: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "wrong magic",
            Encoder::request(Command::Validate)
                .u32(0x1234_5678)
                .finish(),
            false,
        ),
        ("unknown command", vec![0x42], true),
        (
            "2^63 key length",
            Encoder::request(Command::Get).u64(1 << 63).finish(),
            true,
        ),
        (
            "value over the limit",
            Encoder::request(Command::Set)
                .bytes(b"/k")
                .u64(2 << 20)
                .finish(),
            true,
        ),
        (
            "too many keys",
            Encoder::request(Command::Wait).u64(1 << 20).finish(),
            true,
        ),
        (
            "add to a non-integer",
            {
                let mut v = Encoder::request(Command::Set)
                    .bytes(b"/t")
                    .bytes(b"abc")
                    .finish();
                v.extend(Encoder::request(Command::Add).bytes(b"/t").u64(1).finish());
                v
            },
            true,
        ),
        (
            "extension command without HELLO",
            Encoder::request(Command::WaitGet).keys(&["/k"]).finish(),
            true,
        ),
    ];
    for (what, bytes, validate_first) in bad_inputs {
        let mut s = if validate_first {
            validated(&srv)
        } else {
            raw(&srv)
        };
        s.write_all(&bytes).unwrap();
        assert!(closed(&mut s), "{what}: connection stayed open");
        assert_eq!(
            ping(&mut good, 99),
            99,
            "{what}: the server stopped serving others"
        );
    }
    // A truncated frame followed by a disconnect is simply dropped.
    let mut s = validated(&srv);
    s.write_all(&Encoder::request(Command::Set).bytes(b"/half").finish())
        .unwrap();
    drop(s);
    good.write_all(&Encoder::request(Command::Check).keys(&["/half"]).finish())
        .unwrap();
    assert_eq!(read_n(&mut good, 1), [NOT_READY]);
}

#[test]
fn cancel_and_disconnect_leave_no_waiter() {
    let srv = server();
    let mut s = validated(&srv);
    s.write_all(
        &Encoder::request(Command::Wait)
            .keys(&["/never", "/nope"])
            .finish(),
    )
    .unwrap();
    s.write_all(
        &Encoder::request(Command::Barrier)
            .bytes(b"/bar")
            .u64(5)
            .finish(),
    )
    .unwrap();
    wait_for(&srv, |st| st.pending_waits == 2);
    s.write_all(&Encoder::request(Command::CancelWait).finish())
        .unwrap();
    assert_eq!(read_n(&mut s, 1), [WAIT_CANCELED]);
    wait_for(&srv, |st| st.pending_waits == 0);
    let mut d = validated(&srv);
    d.write_all(&Encoder::request(Command::Wait).keys(&["/never"]).finish())
        .unwrap();
    wait_for(&srv, |st| st.pending_waits == 1 && st.connections == 2);
    drop(d);
    wait_for(&srv, |st| st.pending_waits == 0 && st.connections == 1);
    // A later set finds nobody to wake and nothing breaks.
    s.write_all(
        &Encoder::request(Command::Set)
            .bytes(b"/never")
            .bytes(b"1")
            .finish(),
    )
    .unwrap();
    assert_eq!(ping(&mut s, 5), 5);
}

#[test]
fn takes_over_a_listening_socket() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let srv = Server::start(ServerOptions {
        listen_fd: Some(std::sync::Arc::new(l.into())),
        ..ServerOptions::default()
    })
    .unwrap();
    assert_eq!(srv.port(), port);
    let mut s = validated(&srv);
    assert_eq!(ping(&mut s, 3), 3);
}

#[test]
fn listens_on_a_bound_socket_handed_over_before_it_listens() {
    // PyTorch's own test_take_over_listen_socket hands over such a socket.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let loopback = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0));
    socket.bind(&loopback.into()).unwrap();
    let fd = std::os::fd::OwnedFd::from(socket);
    let srv = Server::start(ServerOptions {
        listen_fd: Some(std::sync::Arc::new(fd)),
        ..ServerOptions::default()
    })
    .unwrap();
    assert_ne!(srv.port(), 0);
    let mut s = validated(&srv);
    assert_eq!(ping(&mut s, 4), 4);
}

#[test]
fn refuses_a_descriptor_that_is_not_a_tcp_socket() {
    let file = std::fs::File::open("/dev/null").unwrap();
    let e = Server::start(ServerOptions {
        listen_fd: Some(std::sync::Arc::new(file.into())),
        ..ServerOptions::default()
    })
    .err()
    .expect("a file is no socket");
    assert!(e.message().contains("not a TCP socket"), "{e}");
}

#[test]
fn dropping_the_server_closes_its_connections() {
    let srv = server();
    let mut s = validated(&srv);
    s.write_all(&Encoder::request(Command::Wait).keys(&["/never"]).finish())
        .unwrap();
    wait_for(&srv, |st| st.pending_waits == 1);
    drop(srv);
    assert!(closed(&mut s));
}

fn set(s: &mut TcpStream, key: &str, value: &[u8]) {
    s.write_all(
        &Encoder::request(Command::Set)
            .bytes(key.as_bytes())
            .bytes(value)
            .finish(),
    )
    .unwrap();
}

fn get(s: &mut TcpStream, key: &str) -> Vec<u8> {
    s.write_all(
        &Encoder::request(Command::Get)
            .bytes(key.as_bytes())
            .finish(),
    )
    .unwrap();
    let len = u64::from_le_bytes(read_n(s, 8).try_into().unwrap());
    read_n(s, len as usize)
}

#[test]
fn large_values_trickling_in_are_stored_whole_and_pipelined_requests_follow() {
    let srv = server();
    let mut writer = validated(&srv);
    let mut reader = validated(&srv);
    set(&mut writer, "/big", b"old");
    assert_eq!(get(&mut reader, "/big"), b"old");
    let value: Vec<u8> = (0..(700 << 10)).map(|i| (i % 251) as u8).collect();
    let mut request = Encoder::request(Command::Set)
        .bytes(b"/big")
        .bytes(&value)
        .finish();
    request.extend(
        Encoder::request(Command::QueuePush)
            .bytes(b"/q")
            .bytes(&value[..crate::net::bigbuf::LARGE_VALUE_LEN])
            .finish(),
    );
    request.extend(Encoder::request(Command::Ping).u32(9).finish());
    // The header and the start of the value, then the rest in pieces: the
    // old value is served until the new one is complete.
    writer.write_all(&request[..1000]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(get(&mut reader, "/big"), b"old");
    for piece in request[1000..].chunks(100 << 10) {
        writer.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        u32::from_le_bytes(read_n(&mut writer, 4).try_into().unwrap()),
        9
    );
    assert_eq!(get(&mut reader, "/big"), value);
    reader
        .write_all(&Encoder::request(Command::QueuePop).bytes(b"/q").finish())
        .unwrap();
    assert_eq!(read_n(&mut reader, 8), 1i64.to_le_bytes());
    let len = u64::from_le_bytes(read_n(&mut reader, 8).try_into().unwrap());
    assert_eq!(
        read_n(&mut reader, len as usize),
        value[..crate::net::bigbuf::LARGE_VALUE_LEN]
    );
}

#[test]
fn a_client_dying_mid_value_loses_only_its_request() {
    let srv = server();
    let mut writer = validated(&srv);
    let request = Encoder::request(Command::Set)
        .bytes(b"/half")
        .bytes(&vec![1u8; 512 << 10])
        .finish();
    writer.write_all(&request[..300 << 10]).unwrap();
    wait_for(&srv, |st| st.connections == 1);
    drop(writer);
    wait_for(&srv, |st| st.connections == 0);
    let mut other = validated(&srv);
    assert_eq!(ping(&mut other, 4), 4);
    other
        .write_all(&Encoder::request(Command::Check).keys(&["/half"]).finish())
        .unwrap();
    assert_eq!(read_n(&mut other, 1), [NOT_READY]);
}

#[test]
fn a_pipelining_client_held_back_by_the_output_cap_gets_every_reply() {
    let srv = server();
    let mut s = validated(&srv);
    set(&mut s, "/v", &[5u8; 1000]);
    // 20,000 GETs in one go: 20 MB of replies, far past the output cap,
    // so the server holds requests back and resumes as the client reads.
    let gets: Vec<u8> = (0..20_000)
        .flat_map(|_| Encoder::request(Command::Get).bytes(b"/v").finish())
        .collect();
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || writer.write_all(&gets).unwrap());
    let reply_len = 8 + 1000;
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0;
    while total < 20_000 * reply_len {
        // Read slowly at first, so the server pauses and resumes often.
        if total < 2 << 20 {
            std::thread::sleep(Duration::from_micros(200));
        }
        let n = s.read(&mut buf).expect("every reply arrives");
        assert!(n > 0, "closed after {total} bytes");
        total += n;
    }
    sender.join().unwrap();
    assert_eq!(ping(&mut s, 3), 3);
}

#[test]
fn members_stay_alive_past_many_ttls_while_their_keep_alives_are_read_late() {
    use crate::store::tcp::{SessionOptions, TcpStore, TcpStoreOptions};
    use crate::store::Store as _;
    // Keep-alives every third of it, each read up to 50 ms late. (Not the
    // shortest TTL, 300 ms: on a machine other tests load, the members'
    // own keep-alive thread can be starved that long.)
    let ttl = Duration::from_secs(1);
    let server = server();
    let members: Vec<TcpStore> = (0..2)
        .map(|rank| {
            let store = TcpStore::new(TcpStoreOptions {
                port: server.port(),
                timeout: Duration::from_secs(10),
                ..TcpStoreOptions::default()
            })
            .unwrap();
            let options = SessionOptions {
                ttl: Some(ttl),
                ..SessionOptions::new("late/", rank)
            };
            store.open_session(&options).unwrap();
            store
        })
        .collect();
    // Five TTLs idle: only the keep-alives (a spare each, read late) speak.
    std::thread::sleep(5 * ttl);
    assert_eq!(members[0].add("late/n", 1).unwrap(), 1, "nobody failed");
    assert_eq!(members[1].sessions("late/").unwrap().sessions.len(), 2);
}
