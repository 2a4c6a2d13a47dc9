//! The server core driven directly: bytes in, replies out, no sockets.

use super::*;
use crate::net::bigbuf::LARGE_VALUE_LEN;
use crate::store::tcp::protocol::ServerInfo;
use crate::store::tcp::protocol::{Command, Encoder};
use crate::store::tcp::server::backend::{MemoryBackend, Usage};

const VALUE_LIMIT: usize = 1 << 20;

fn limits() -> Limits {
    Limits::with_max_value_len(VALUE_LIMIT)
}

fn core() -> ServerCore<MemoryBackend> {
    ServerCore::new(MemoryBackend::new(VALUE_LIMIT), limits(), true)
}

/// Opens validated connection `id`.
fn open<B: Backend>(core: &mut ServerCore<B>, id: ConnId) {
    core.connect(id);
    validate(core, id);
}

/// Sends VALIDATE on `id`.
fn validate<B: Backend>(core: &mut ServerCore<B>, id: ConnId) {
    send(
        core,
        id,
        &Encoder::request(Command::Validate)
            .u32(VALIDATE_MAGIC)
            .finish(),
    );
}

fn send<B: Backend>(core: &mut ServerCore<B>, id: ConnId, bytes: &[u8]) {
    core.receive(id, bytes).expect("request refused");
}

/// Everything `id` has been sent.
fn replies<B: Backend>(core: &mut ServerCore<B>, id: ConnId) -> Vec<u8> {
    core.output(id)
        .map_or_else(Vec::new, |o| o.drain(usize::MAX))
}

fn set(key: &str, value: &[u8]) -> Vec<u8> {
    Encoder::request(Command::Set)
        .bytes(key.as_bytes())
        .bytes(value)
        .finish()
}

fn get(key: &str) -> Vec<u8> {
    Encoder::request(Command::Get)
        .bytes(key.as_bytes())
        .finish()
}

fn wait(keys: &[&str]) -> Vec<u8> {
    Encoder::request(Command::Wait).keys(keys).finish()
}

fn byte_string(v: &[u8]) -> Vec<u8> {
    let mut out = (v.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(v);
    out
}

#[test]
fn nothing_but_validate_counts_before_validation_and_a_bad_magic_is_refused() {
    let mut c = core();
    c.connect(0);
    send(&mut c, 0, &set("/x", b"1"));
    send(&mut c, 0, &Encoder::request(Command::Ping).u32(5).finish());
    assert!(replies(&mut c, 0).is_empty());
    open(&mut c, 1);
    send(
        &mut c,
        1,
        &Encoder::request(Command::Check).keys(&["/x"]).finish(),
    );
    assert_eq!(replies(&mut c, 1), [NOT_READY]);
    c.connect(2);
    let bad = Encoder::request(Command::Validate).u32(1).finish();
    assert_eq!(
        c.receive(2, &bad),
        Err(Refused::malformed("bad magic 0x00000001"))
    );
}

#[test]
fn hello_turns_on_extensions_only_when_the_server_offers_them() {
    let mut c = core();
    open(&mut c, 0);
    let hello = Encoder::request(Command::Ping).u32(HELLO_NONCE).finish();
    let wait_get = Encoder::request(Command::WaitGet).keys(&["/k"]).finish();
    assert!(c.receive(0, &wait_get).is_err(), "extension before HELLO");
    open(&mut c, 1);
    send(&mut c, 1, &hello);
    assert_eq!(replies(&mut c, 1), HELLO_ACK.to_le_bytes());
    let mut plain = ServerCore::new(MemoryBackend::new(VALUE_LIMIT), limits(), false);
    open(&mut plain, 0);
    send(&mut plain, 0, &hello);
    assert_eq!(replies(&mut plain, 0), HELLO_NONCE.to_le_bytes());
}

#[test]
fn a_wait_completes_when_another_connection_sets_the_last_key() {
    let mut c = core();
    open(&mut c, 0);
    open(&mut c, 1);
    send(&mut c, 1, &set("/a", b"1"));
    send(&mut c, 0, &wait(&["/a", "/b", "/b"]));
    assert_eq!(c.stats().pending_waits, 1);
    assert!(replies(&mut c, 0).is_empty());
    send(&mut c, 1, &set("/c", b"other key"));
    assert!(c.take_woken().is_empty());
    send(&mut c, 1, &set("/b", b"2"));
    assert_eq!(c.take_woken(), vec![0]);
    assert_eq!(replies(&mut c, 0), [STOP_WAITING]);
    assert_eq!(c.stats().pending_waits, 0);
}

#[test]
fn every_writing_command_wakes_waiters_and_a_failed_compare_set_does_not() {
    let mut c = core();
    open(&mut c, 0);
    open(&mut c, 1);
    let writes: Vec<(&str, Vec<u8>)> = vec![
        ("/a", set("/a", b"1")),
        (
            "/b",
            Encoder::request(Command::Add).bytes(b"/b").u64(1).finish(),
        ),
        (
            "/c",
            Encoder::request(Command::Append)
                .bytes(b"/c")
                .bytes(b"x")
                .finish(),
        ),
        (
            "/d",
            Encoder::request(Command::CompareSet)
                .bytes(b"/d")
                .bytes(b"")
                .bytes(b"v")
                .finish(),
        ),
        (
            "/e",
            Encoder::request(Command::QueuePush)
                .bytes(b"/e")
                .bytes(b"v")
                .finish(),
        ),
        (
            "/f",
            Encoder::request(Command::MultiSet)
                .u64(1)
                .bytes(b"/f")
                .bytes(b"v")
                .finish(),
        ),
    ];
    for (key, write) in writes {
        send(&mut c, 0, &wait(&[key]));
        send(&mut c, 1, &write);
        assert_eq!(replies(&mut c, 0), [STOP_WAITING], "{key}");
        replies(&mut c, 1);
    }
    send(&mut c, 0, &wait(&["/g"]));
    let no_write = Encoder::request(Command::CompareSet)
        .bytes(b"/g")
        .bytes(b"expected")
        .bytes(b"v")
        .finish();
    send(&mut c, 1, &no_write);
    assert_eq!(replies(&mut c, 1), byte_string(b"expected"));
    assert!(replies(&mut c, 0).is_empty());
    assert_eq!(c.stats().pending_waits, 1);
}

#[test]
fn cancel_clears_the_connections_waits_and_answers() {
    let mut c = core();
    open(&mut c, 0);
    open(&mut c, 1);
    send(&mut c, 0, &wait(&["/never", "/nope"]));
    send(
        &mut c,
        0,
        &Encoder::request(Command::Barrier)
            .bytes(b"/bar")
            .u64(5)
            .finish(),
    );
    send(&mut c, 1, &wait(&["/never"]));
    assert_eq!(c.stats().pending_waits, 3);
    send(&mut c, 0, &[Command::CancelWait as u8]);
    assert_eq!(replies(&mut c, 0), [WAIT_CANCELED]);
    assert_eq!(
        c.stats().pending_waits,
        1,
        "the other connection's wait stays"
    );
    send(&mut c, 1, &set("/never", b"1"));
    assert!(replies(&mut c, 0).is_empty());
    assert_eq!(replies(&mut c, 1), [STOP_WAITING]);
}

#[test]
fn a_disconnect_mid_wait_leaves_no_waiter_behind() {
    let mut c = core();
    open(&mut c, 0);
    open(&mut c, 1);
    send(&mut c, 0, &wait(&["/k"]));
    send(
        &mut c,
        0,
        &Encoder::request(Command::Barrier)
            .bytes(b"/b")
            .u64(2)
            .finish(),
    );
    c.disconnect(0);
    assert_eq!(
        c.stats(),
        ServerStats {
            connections: 1,
            pending_waits: 0,
            keys: 1
        }
    );
    send(&mut c, 1, &set("/k", b"v"));
    send(
        &mut c,
        1,
        &Encoder::request(Command::Barrier)
            .bytes(b"/b")
            .u64(2)
            .finish(),
    );
    assert_eq!(c.take_woken(), [1], "only the arriving connection answered");
    assert_eq!(replies(&mut c, 1), [STOP_WAITING], "2 arrivals: released");
    // The id is reused by a new connection, which sees nothing of the old.
    open(&mut c, 0);
    assert!(replies(&mut c, 0).is_empty());
}

#[test]
fn a_barrier_releases_everyone_when_the_count_reaches_the_world() {
    let mut c = core();
    let barrier = Encoder::request(Command::Barrier)
        .bytes(b"/b")
        .u64(3)
        .finish();
    for id in 0..3 {
        open(&mut c, id);
    }
    send(&mut c, 0, &barrier);
    send(&mut c, 1, &barrier);
    assert_eq!(c.stats().pending_waits, 2);
    send(&mut c, 2, &barrier);
    let mut woken = c.take_woken();
    woken.sort_unstable();
    assert_eq!(woken, vec![0, 1, 2], "the last to arrive is answered too");
    for id in 0..3 {
        assert_eq!(replies(&mut c, id), [STOP_WAITING], "connection {id}");
    }
    send(&mut c, 0, &get("/b"));
    assert_eq!(replies(&mut c, 0), byte_string(b"3"));
}

#[test]
fn a_queue_push_wakes_only_the_oldest_waiter() {
    let mut c = core();
    for id in 0..3 {
        open(&mut c, id);
    }
    send(&mut c, 0, &wait(&["/q"]));
    send(&mut c, 1, &wait(&["/q"]));
    let push = Encoder::request(Command::QueuePush)
        .bytes(b"/q")
        .bytes(b"1")
        .finish();
    send(&mut c, 2, &push);
    assert_eq!(c.take_woken(), vec![0]);
    assert_eq!(replies(&mut c, 0), [STOP_WAITING]);
    assert!(replies(&mut c, 1).is_empty());
    send(&mut c, 2, &push);
    assert_eq!(c.take_woken(), vec![1]);
    let pop = Encoder::request(Command::QueuePop).bytes(b"/q").finish();
    send(&mut c, 2, &pop);
    let mut expected = 2i64.to_le_bytes().to_vec();
    expected.extend(byte_string(b"1"));
    assert_eq!(replies(&mut c, 2), expected);
}

#[test]
fn wait_get_answers_with_the_values_once_they_exist() {
    let mut c = core();
    open(&mut c, 0);
    open(&mut c, 1);
    send(
        &mut c,
        0,
        &Encoder::request(Command::Ping).u32(HELLO_NONCE).finish(),
    );
    replies(&mut c, 0);
    send(&mut c, 1, &set("/k", b"v"));
    send(
        &mut c,
        0,
        &Encoder::request(Command::WaitGet)
            .keys(&["/k", "/later"])
            .finish(),
    );
    assert!(replies(&mut c, 0).is_empty());
    send(&mut c, 1, &set("/later", b"w"));
    let mut expected = vec![STOP_WAITING];
    expected.extend(byte_string(b"v"));
    expected.extend(byte_string(b"w"));
    assert_eq!(replies(&mut c, 0), expected);
}

#[test]
fn a_request_over_any_limit_refuses_only_its_connection() {
    let l = limits();
    let over: Vec<(&str, Vec<u8>)> = vec![
        ("unknown command", vec![0x42]),
        (
            "key",
            Encoder::request(Command::Get)
                .u64(l.max_key_len as u64 + 1)
                .finish(),
        ),
        (
            "value",
            Encoder::request(Command::Set)
                .bytes(b"/k")
                .u64(VALUE_LIMIT as u64 + 1)
                .finish(),
        ),
        (
            "key count",
            Encoder::request(Command::Wait)
                .u64(l.max_keys_per_request as u64 + 1)
                .finish(),
        ),
        (
            "request",
            // Two values within the value limit: over the request limit.
            Encoder::request(Command::MultiSet)
                .u64(2)
                .bytes(b"a")
                .bytes(&vec![0u8; VALUE_LIMIT])
                .bytes(b"b")
                .u64(VALUE_LIMIT as u64)
                .finish(),
        ),
        ("non-integer add", {
            let mut v = set("/t", b"abc");
            v.extend(Encoder::request(Command::Add).bytes(b"/t").u64(1).finish());
            v
        }),
    ];
    let mut c = core();
    open(&mut c, 0);
    for (i, (what, bytes)) in over.into_iter().enumerate() {
        let id = i + 1;
        open(&mut c, id);
        assert!(c.receive(id, &bytes).is_err(), "{what} was accepted");
        c.disconnect(id);
        send(&mut c, 0, &Encoder::request(Command::Ping).u32(7).finish());
        assert_eq!(replies(&mut c, 0), 7u32.to_le_bytes(), "after {what}");
    }
    assert_eq!(c.stats().connections, 1);
}

#[test]
fn a_client_that_never_reads_is_paused_at_the_output_cap() {
    let mut c = core();
    open(&mut c, 0);
    open(&mut c, 1);
    let value = vec![7u8; 64 << 10];
    send(&mut c, 1, &set("/big", &value));
    // 4,000 GETs of 64 KiB (250 MB of replies) sent in one go.
    let gets: Vec<u8> = (0..4000).flat_map(|_| get("/big")).collect();
    send(&mut c, 0, &gets);
    let output = c.output(0).unwrap();
    assert!(output.queued() > OUTPUT_CAP);
    assert!(output.queued() <= OUTPUT_CAP + 8 + value.len());
    assert!(
        output.owned_bytes() <= OUTPUT_CAP,
        "values are held by reference"
    );
    assert!(!c.wants_input(0));
    assert!(c.wants_input(1), "the other connection is not affected");
    // Draining the replies lets it go on where it stopped, in order.
    let mut served = 0;
    for _ in 0..10_000 {
        let out = replies(&mut c, 0);
        served += out.len() / (8 + value.len());
        c.resume(0).unwrap();
        if c.wants_input(0) {
            break;
        }
    }
    served += replies(&mut c, 0).len() / (8 + value.len());
    assert_eq!(served, 4000);
    assert!(c.wants_input(0));
}

#[test]
fn a_multi_get_naming_one_key_many_times_holds_references_not_copies() {
    let mut c = core();
    open(&mut c, 0);
    send(&mut c, 0, &set("/k", &vec![1u8; 60 << 10]));
    let keys = vec!["/k"; 16_000];
    send(
        &mut c,
        0,
        &Encoder::request(Command::MultiGet).keys(&keys).finish(),
    );
    let output = c.output(0).unwrap();
    assert_eq!(output.queued(), 16_000 * (8 + (60 << 10)));
    assert!(output.owned_bytes() < 1 << 20, "{}", output.owned_bytes());
}

#[test]
fn appends_cost_what_they_append_and_respect_the_value_limit() {
    let mut c = core();
    open(&mut c, 0);
    let chunk = vec![5u8; 64 << 10];
    let append = Encoder::request(Command::Append)
        .bytes(b"/log")
        .bytes(&chunk)
        .finish();
    for _ in 0..(VALUE_LIMIT / chunk.len()) {
        send(&mut c, 0, &append);
    }
    send(&mut c, 0, &get("/log"));
    let reply = replies(&mut c, 0);
    assert_eq!(reply.len(), 8 + VALUE_LIMIT);
    let refused = c.receive(0, &append).unwrap_err();
    assert!(refused.1.contains("over the limit"), "{refused:?}");
}

#[test]
fn pipelined_requests_split_anywhere_get_the_same_replies() {
    let mut stream = Vec::new();
    stream.extend(
        Encoder::request(Command::Validate)
            .u32(VALIDATE_MAGIC)
            .finish(),
    );
    stream.extend(set("/a", &vec![3u8; LARGE_VALUE_LEN + 5]));
    stream.extend(Encoder::request(Command::Add).bytes(b"/n").u64(4).finish());
    stream.extend(get("/a"));
    stream.extend(
        Encoder::request(Command::Check)
            .keys(&["/a", "/n"])
            .finish(),
    );
    stream.extend(vec![Command::GetNumKeys as u8]);
    let mut whole = core();
    whole.connect(0);
    send(&mut whole, 0, &stream);
    let expected = replies(&mut whole, 0);
    let mut rng = fastrand::Rng::with_seed(11);
    for _ in 0..50 {
        let mut c = core();
        c.connect(0);
        let mut pos = 0;
        while pos < stream.len() {
            if let Some(target) = c.direct_target(0) {
                let n = target
                    .len()
                    .min(stream.len() - pos)
                    .min(rng.usize(1..100_000));
                target[..n].copy_from_slice(&stream[pos..pos + n]);
                c.direct_filled(0, n).unwrap();
                pos += n;
                continue;
            }
            let n = rng.usize(1..200).min(stream.len() - pos);
            send(&mut c, 0, &stream[pos..pos + n]);
            pos += n;
        }
        assert!(replies(&mut c, 0) == expected, "replies differ");
    }
}

/// A backend that completes SETs later, as a remote store would.
struct Deferring {
    inner: MemoryBackend,
    deferred: Vec<(ConnId, Ticket, Request)>,
}

impl Backend for Deferring {
    fn apply(
        &mut self,
        conn: ConnId,
        ticket: Ticket,
        request: &Request,
    ) -> OpResult<Option<Outcome>> {
        if let Request::Set { .. } = request {
            self.deferred.push((conn, ticket, request.clone()));
            return Ok(None);
        }
        self.inner.apply(conn, ticket, request)
    }
    fn peek(&self, key: &[u8]) -> Option<Present> {
        self.inner.peek(key)
    }
    fn look(&mut self, _: WaitId, _: Vec<Key>) {}
    fn take_reports(&mut self) -> Vec<Report> {
        self.deferred
            .drain(..)
            .map(|(conn, ticket, request)| Report::Completed {
                conn,
                ticket,
                outcome: self.inner.apply(conn, ticket, &request).map(|o| o.unwrap()),
            })
            .collect()
    }
    fn value_len(&self, key: &[u8]) -> Option<usize> {
        self.inner.value_len(key)
    }

    fn holds_queue(&self, key: &[u8]) -> bool {
        self.inner.holds_queue(key)
    }

    fn usage(&self) -> Usage {
        self.inner.usage()
    }
}

fn deferring_core() -> ServerCore<Deferring> {
    let backend = Deferring {
        inner: MemoryBackend::new(VALUE_LIMIT),
        deferred: Vec::new(),
    };
    ServerCore::new(backend, limits(), true)
}

#[test]
fn a_late_answer_for_a_closed_connection_never_reaches_its_successor() {
    let mut c = deferring_core();
    open(&mut c, 0);
    send(&mut c, 0, &set("/old", b"v"));
    let (conn, ticket, request) = c.backend.deferred.pop().unwrap();
    c.disconnect(0);
    open(&mut c, 0);
    send(&mut c, 0, &set("/new", b"w"));
    assert!(!c.wants_input(0), "the new connection's SET is in flight");
    let late = c.backend.inner.apply(conn, ticket, &request);
    c.complete(conn, ticket, late.map(|o| o.unwrap())).unwrap();
    assert!(!c.wants_input(0), "still waiting for its own answer");
    assert!(c.take_backend_reports().is_empty());
    assert!(c.wants_input(0));
}

#[test]
fn a_request_completed_later_holds_back_only_its_own_connection() {
    let backend = Deferring {
        inner: MemoryBackend::new(VALUE_LIMIT),
        deferred: Vec::new(),
    };
    let mut c = ServerCore::new(backend, limits(), true);
    open(&mut c, 0);
    open(&mut c, 1);
    send(&mut c, 1, &wait(&["/k"]));
    let mut pipelined = set("/k", b"v");
    pipelined.extend(get("/k"));
    send(&mut c, 0, &pipelined);
    assert!(!c.wants_input(0), "paused while its SET is in flight");
    assert!(
        replies(&mut c, 0).is_empty(),
        "the GET waits behind the SET"
    );
    send(&mut c, 1, &Encoder::request(Command::Ping).u32(1).finish());
    assert_eq!(replies(&mut c, 1), 1u32.to_le_bytes(), "others go on");
    assert!(c.take_backend_reports().is_empty(), "nothing refused");
    assert_eq!(
        replies(&mut c, 1),
        [STOP_WAITING],
        "the write woke the waiter"
    );
    assert_eq!(replies(&mut c, 0), byte_string(b"v"), "then the GET ran");
    assert!(c.wants_input(0));
}

/// Opens validated connection `id` speaking version 2 of the extensions;
/// returns the limits the server announced.
fn open_v2<B: Backend>(core: &mut ServerCore<B>, id: ConnId) -> Limits {
    open(core, id);
    hello_v2(core, id).limits
}

/// Asks validated connection `id` for version 2: the server's info.
fn hello_v2<B: Backend>(core: &mut ServerCore<B>, id: ConnId) -> ServerInfo {
    send(
        core,
        id,
        &Encoder::request(Command::Ping).u32(HELLO_V2_NONCE).finish(),
    );
    let reply = replies(core, id);
    assert_eq!(reply[..4], HELLO_V2_ACK.to_le_bytes());
    let len = u64::from_le_bytes(reply[4..12].try_into().unwrap()) as usize;
    assert_eq!(reply.len(), 12 + len);
    ServerInfo::decode(&reply[12..]).unwrap()
}

#[test]
fn version_2_announces_the_limits_and_prefixes_every_reply_with_a_status() {
    let mut c = core();
    assert_eq!(open_v2(&mut c, 0), limits());
    open(&mut c, 1);
    send(&mut c, 0, &set("/k", b"v"));
    assert!(
        replies(&mut c, 0).is_empty(),
        "a SET that succeeds has no reply: a client may close right after it"
    );
    send(&mut c, 0, &get("/k"));
    let mut expected = vec![REPLY_OK];
    expected.extend(byte_string(b"v"));
    assert_eq!(replies(&mut c, 0), expected);
    send(&mut c, 0, &Encoder::request(Command::Ping).u32(3).finish());
    assert_eq!(replies(&mut c, 0), [REPLY_OK, 3, 0, 0, 0]);
    send(&mut c, 0, &wait(&["/later"]));
    assert!(replies(&mut c, 0).is_empty());
    send(&mut c, 1, &set("/later", b"1"));
    assert_eq!(replies(&mut c, 0), [REPLY_OK, STOP_WAITING]);
    send(&mut c, 0, &wait(&["/never"]));
    send(&mut c, 0, &[Command::CancelWait as u8]);
    assert_eq!(replies(&mut c, 0), [REPLY_OK, WAIT_CANCELED]);
    // A plain connection of the same server is untouched.
    send(&mut c, 1, &get("/k"));
    assert_eq!(replies(&mut c, 1), byte_string(b"v"));
}

#[test]
fn version_2_turns_errors_into_replies_and_keeps_the_connection() {
    let mut c = core();
    open_v2(&mut c, 0);
    send(&mut c, 0, &set("/text", b"abc"));
    assert!(replies(&mut c, 0).is_empty());
    send(
        &mut c,
        0,
        &Encoder::request(Command::Add)
            .bytes(b"/text")
            .u64(1)
            .finish(),
    );
    let reply = replies(&mut c, 0);
    assert_eq!(
        reply[..2],
        [REPLY_ERROR, crate::Status::InvalidArgument.code() as u8]
    );
    let message = String::from_utf8_lossy(&reply[10..]).into_owned();
    assert_eq!(message, "add: the value of key '/text' is not an integer");
    let big = vec![0u8; VALUE_LIMIT];
    let append = |v: &[u8]| {
        Encoder::request(Command::Append)
            .bytes(b"/log")
            .bytes(v)
            .finish()
    };
    send(&mut c, 0, &append(&big));
    assert_eq!(replies(&mut c, 0), [REPLY_OK]);
    send(&mut c, 0, &append(b"x"));
    assert_eq!(replies(&mut c, 0)[0], REPLY_ERROR);
    send(&mut c, 0, &Encoder::request(Command::Ping).u32(9).finish());
    assert_eq!(replies(&mut c, 0), [REPLY_OK, 9, 0, 0, 0], "still usable");
    // Over an announced limit: closed, as for PyTorch's clients.
    let over = Encoder::request(Command::Get)
        .u64(limits().max_key_len as u64 + 1)
        .finish();
    assert!(c.receive(0, &over).is_err());
}

#[test]
fn version_2_reports_a_failed_set_as_a_deferred_error_before_the_next_reply() {
    let backend = Deferring {
        inner: MemoryBackend::new(VALUE_LIMIT),
        deferred: Vec::new(),
    };
    let mut c = ServerCore::new(backend, limits(), true);
    open_v2(&mut c, 0);
    let mut pipelined = set("/k", b"v");
    pipelined.extend(Encoder::request(Command::Ping).u32(5).finish());
    send(&mut c, 0, &pipelined);
    let (conn, ticket, _) = c.backend.deferred.pop().unwrap();
    let refusal = crate::Error::invalid_argument("quota exceeded");
    c.complete(conn, ticket, Err(refusal)).unwrap();
    let mut expected = vec![
        REPLY_DEFERRED_ERROR,
        crate::Status::InvalidArgument.code() as u8,
    ];
    expected.extend(byte_string(b"quota exceeded"));
    expected.extend([REPLY_OK, 5, 0, 0, 0]);
    assert_eq!(
        replies(&mut c, 0),
        expected,
        "the error, then the PING's reply"
    );
}

/// A remote backend the test drives: every request completes later, the
/// keys it knows are what the test put in `known`, and the test writes the
/// reports.
#[derive(Default)]
struct Scripted {
    known: std::collections::HashMap<Key, Present>,
    /// Its view lags the writes it acknowledged: waits start when told.
    lagging: bool,
    applied: Vec<(ConnId, Ticket, Request)>,
    looks: Vec<(WaitId, Vec<Key>)>,
    reports: Vec<Report>,
}

impl Backend for Scripted {
    fn apply(
        &mut self,
        conn: ConnId,
        ticket: Ticket,
        request: &Request,
    ) -> OpResult<Option<Outcome>> {
        if let Request::Wait { .. } | Request::WaitGet { .. } = request {
            if !self.lagging {
                return Ok(Some(Outcome::Silent)); // its view is current
            }
        }
        self.applied.push((conn, ticket, request.clone()));
        Ok(None)
    }
    fn peek(&self, key: &[u8]) -> Option<Present> {
        self.known.get(key).cloned()
    }
    fn look(&mut self, wait: WaitId, keys: Vec<Key>) {
        self.looks.push((wait, keys));
    }
    fn reports_writes(&self) -> bool {
        true
    }
    fn take_reports(&mut self) -> Vec<Report> {
        std::mem::take(&mut self.reports)
    }
    fn value_len(&self, _: &[u8]) -> Option<usize> {
        None
    }

    fn holds_queue(&self, _: &[u8]) -> bool {
        false
    }

    fn usage(&self) -> Usage {
        Usage::default()
    }
}

fn scripted() -> ServerCore<Scripted> {
    ServerCore::new(Scripted::default(), limits(), true)
}

fn written(key: &str, value: &[u8]) -> Report {
    Report::Written {
        key: key.as_bytes().to_vec(),
        present: Present::Value(value.into()),
    }
}

#[test]
fn a_remote_write_ends_the_wait_when_reported_not_when_made() {
    let mut c = scripted();
    open(&mut c, 0);
    open(&mut c, 1);
    send(&mut c, 0, &wait(&["/q"]));
    send(&mut c, 1, &wait(&["/q"]));
    assert!(c.wants_input(0), "a wait does not hold the connection");
    // A push through this server completes: nobody is woken yet (the
    // backend reports it like anyone's write, and one push wakes one).
    open(&mut c, 2);
    send(
        &mut c,
        2,
        &Encoder::request(Command::QueuePush)
            .bytes(b"/q")
            .bytes(b"1")
            .finish(),
    );
    let (conn, ticket, _) = c.backend.applied.pop().unwrap();
    c.backend.known.insert(b"/q".to_vec(), Present::Queued);
    c.backend.reports.push(Report::Completed {
        conn,
        ticket,
        outcome: Ok(Outcome::Silent),
    });
    assert!(c.take_backend_reports().is_empty());
    assert_eq!(c.stats().pending_waits, 2);
    c.backend.reports.push(Report::Written {
        key: b"/q".to_vec(),
        present: Present::Queued,
    });
    c.take_backend_reports();
    assert_eq!(replies(&mut c, 0), [STOP_WAITING], "the oldest");
    assert!(replies(&mut c, 1).is_empty());
}

#[test]
fn wait_get_on_a_remote_backend_answers_with_the_values_seen() {
    let mut c = scripted();
    open_v2(&mut c, 0);
    c.backend
        .known
        .insert(b"/a".to_vec(), Present::Value(b"1".as_slice().into()));
    send(
        &mut c,
        0,
        &Encoder::request(Command::WaitGet)
            .keys(&["/b", "/a"])
            .finish(),
    );
    assert!(replies(&mut c, 0).is_empty(), "/b is still missing");
    c.backend.known.remove(b"/a".as_slice());
    c.backend.reports.push(written("/b", b"2"));
    c.take_backend_reports();
    let mut expected = vec![REPLY_OK, STOP_WAITING];
    expected.extend(byte_string(b"2"));
    expected.extend(byte_string(b"1"));
    assert_eq!(
        replies(&mut c, 0),
        expected,
        "in the request's order, /a as seen"
    );
}

#[test]
fn a_barrier_on_a_remote_backend_counts_arrivals_reported_before_its_own() {
    let mut c = scripted();
    open(&mut c, 0);
    send(
        &mut c,
        0,
        &Encoder::request(Command::Barrier)
            .bytes(b"/b")
            .u64(2)
            .finish(),
    );
    let (conn, ticket, arrive) = c.backend.applied.pop().unwrap();
    assert_eq!(
        arrive,
        Request::Add {
            key: b"/b".to_vec(),
            delta: 1
        }
    );
    // The other server's arrival (the second) is reported first.
    c.backend.reports.push(written("/b", b"2"));
    c.backend.reports.push(Report::Completed {
        conn,
        ticket,
        outcome: Ok(Outcome::Int(1)),
    });
    assert!(c.take_backend_reports().is_empty());
    assert_eq!(replies(&mut c, 0), [STOP_WAITING]);
    assert_eq!(c.stats().pending_waits, 0);
    assert!(c.wants_input(0));
}

#[test]
fn a_failed_remote_barrier_takes_its_wait_back() {
    let mut c = scripted();
    open(&mut c, 0);
    let barrier = Encoder::request(Command::Barrier)
        .bytes(b"/b")
        .u64(2)
        .finish();
    send(&mut c, 0, &barrier);
    let (conn, ticket, _) = c.backend.applied.pop().unwrap();
    c.backend.reports.push(Report::Completed {
        conn,
        ticket,
        outcome: Err(crate::Error::network("etcd: no member answered")),
    });
    let refused = c.take_backend_reports();
    assert_eq!(refused.len(), 1, "a PyTorch connection is closed");
    assert_eq!(c.stats().pending_waits, 0);
}

#[test]
fn a_wait_starts_once_the_backends_view_shows_the_connections_writes() {
    let mut c = scripted();
    open_v2(&mut c, 0);
    c.backend.lagging = true;
    let mut pipelined = set("/k", b"new");
    pipelined.extend(Encoder::request(Command::WaitGet).keys(&["/k"]).finish());
    send(&mut c, 0, &pipelined);
    let (conn, ticket, _) = c.backend.applied.remove(0);
    c.backend.reports.push(Report::Completed {
        conn,
        ticket,
        outcome: Ok(Outcome::Silent),
    });
    c.backend
        .known
        .insert(b"/k".to_vec(), Present::Value(b"old".as_slice().into()));
    c.take_backend_reports();
    assert!(
        replies(&mut c, 0).is_empty(),
        "not from a view without the set"
    );
    let (conn, ticket, wait) = c.backend.applied.remove(0);
    assert!(matches!(wait, Request::WaitGet { .. }));
    c.backend
        .known
        .insert(b"/k".to_vec(), Present::Value(b"new".as_slice().into()));
    c.backend.reports.push(Report::Completed {
        conn,
        ticket,
        outcome: Ok(Outcome::Silent),
    });
    c.take_backend_reports();
    let mut expected = vec![REPLY_OK, STOP_WAITING];
    expected.extend(byte_string(b"new"));
    assert_eq!(replies(&mut c, 0), expected);
}

#[test]
fn missed_writes_make_every_pending_wait_look_again() {
    let mut c = scripted();
    open(&mut c, 0);
    open(&mut c, 1);
    c.backend
        .known
        .insert(b"/x".to_vec(), Present::Value(b"1".as_slice().into()));
    send(&mut c, 0, &wait(&["/x", "/y"]));
    send(&mut c, 1, &wait(&["/z"]));
    c.backend.reports.push(Report::Missed);
    c.take_backend_reports();
    let mut looks: Vec<Vec<Key>> = c.backend.looks.drain(..).map(|(_, k)| k).collect();
    looks.sort();
    assert_eq!(looks, [vec![b"/y".to_vec()], vec![b"/z".to_vec()]]);
    let wait_on_z = c
        .waits
        .outstanding()
        .into_iter()
        .find(|(_, k)| k == &[b"/z".to_vec()]);
    c.backend.reports.push(Report::Looked {
        wait: wait_on_z.unwrap().0,
        found: vec![(b"/z".to_vec(), Present::Value(b"3".as_slice().into()))],
    });
    c.take_backend_reports();
    assert_eq!(replies(&mut c, 1), [STOP_WAITING], "the look found it");
    assert_eq!(c.stats().pending_waits, 1);
}

#[test]
fn a_remote_queue_element_wakes_one_waiter() {
    let mut c = scripted();
    open(&mut c, 0);
    open(&mut c, 1);
    send(&mut c, 0, &wait(&["/q"]));
    send(&mut c, 1, &wait(&["/q"]));
    c.backend.reports.push(Report::Written {
        key: b"/q".to_vec(),
        present: Present::Queued,
    });
    c.take_backend_reports();
    assert_eq!(c.take_woken(), [0], "the oldest");
    assert_eq!(c.stats().pending_waits, 1);
}

mod guards;
