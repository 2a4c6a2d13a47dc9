//! Authentication, quotas and metrics, driven through the core.

use super::*;
use crate::security::access::{Admission, HandshakeLimits};
use crate::security::auth::{Nonce, Secret};
use crate::security::handshake::Answered;
use crate::store::tcp::server::Quotas;
use crate::Status;
use std::time::Duration;

const CHALLENGE: Nonce = [7; 32];
const CLIENT_NONCE: Nonce = [9; 32];

fn secret() -> Secret {
    Secret::new(b"the-shared-secret".to_vec()).unwrap()
}

/// A core whose clients authenticate with [`secret`].
fn guarded() -> ServerCore<MemoryBackend> {
    core().with_secret(Some(secret()))
}

/// Validates `id` (which must authenticate) and says HELLO v2: the info.
fn hello(c: &mut ServerCore<MemoryBackend>, id: ConnId) -> ServerInfo {
    c.connect_as(
        id,
        Admission::MustAuthenticate,
        Some(CHALLENGE),
        Instant::now(),
    );
    validate(c, id);
    hello_v2(c, id)
}

/// What a client holding `secret` answers to `challenge` with
/// [`CLIENT_NONCE`]: what checks the server's proof, and its own proof.
fn answer(secret: &Secret, challenge: &Nonce) -> (Answered, Vec<u8>) {
    let (answered, answer) = Answered::answer(secret, challenge, CLIENT_NONCE);
    (answered, answer.proof)
}

fn auth(proof: &[u8]) -> Vec<u8> {
    Encoder::request(Command::Auth)
        .bytes(&CLIENT_NONCE)
        .bytes(proof)
        .finish()
}

/// The status code and message of an error reply.
fn error_of(reply: &[u8]) -> (u8, String) {
    assert_eq!(reply[0], REPLY_ERROR, "{reply:?}");
    (reply[1], String::from_utf8_lossy(&reply[10..]).into_owned())
}

#[test]
fn a_client_that_must_authenticate_gets_the_challenge_and_nothing_else_before_it() {
    let mut c = guarded();
    let info = hello(&mut c, 0);
    assert!(info.auth_required);
    assert_eq!(info.challenge, Some(CHALLENGE));
    send(&mut c, 0, &Encoder::request(Command::Ping).u32(5).finish());
    assert_eq!(replies(&mut c, 0), [REPLY_OK, 5, 0, 0, 0], "PING is fine");
    let refused = c.receive(0, &get("/k")).unwrap_err();
    assert_eq!(refused.0, Refusal::Unauthenticated);
    let (status, message) = error_of(&replies(&mut c, 0));
    assert_eq!(status, Status::PermissionDenied as u8);
    assert!(message.contains("requires authentication"), "{message}");
}

#[test]
fn a_connection_in_clear_where_tls_is_required_is_told_so_and_served_nothing() {
    let mut c = guarded();
    c.connect_as(0, Admission::MustUseTls, Some(CHALLENGE), Instant::now());
    validate(&mut c, 0);
    let info = hello_v2(&mut c, 0);
    assert!(info.tls_required && !info.auth_required);
    let refused = c.receive(0, &auth(&[0; 32])).unwrap_err();
    assert_eq!(refused.0, Refusal::Plaintext, "not even AUTH in clear");
    let (status, message) = error_of(&replies(&mut c, 0));
    assert_eq!(status, Status::PermissionDenied as u8);
    assert!(message.contains("requires TLS"), "{message}");

    // The same client over TLS: admitted as the policy says then.
    c.connect_as(1, Admission::MustUseTls, Some(CHALLENGE), Instant::now());
    c.secure(1, Admission::MustAuthenticate).unwrap();
    validate(&mut c, 1);
    let info = hello_v2(&mut c, 1);
    assert!(info.auth_required && !info.tls_required);
    let proof = answer(&secret(), &CHALLENGE).1;
    send(&mut c, 1, &auth(&proof));
    assert_eq!(replies(&mut c, 1)[0], REPLY_OK);
    send(&mut c, 1, &set("/k", b"v"));
    send(&mut c, 1, &get("/k"));
    assert!(
        replies(&mut c, 1).ends_with(b"\x01\0\0\0\0\0\0\0v"),
        "served"
    );
}

#[test]
fn a_wrong_proof_is_refused_without_a_word_of_the_secret() {
    let mut c = guarded();
    hello(&mut c, 0);
    let wrong = Secret::new(b"a-guess".to_vec()).unwrap();
    let refused = c
        .receive(0, &auth(&answer(&wrong, &CHALLENGE).1))
        .unwrap_err();
    assert_eq!(refused.0, Refusal::AuthenticationFailed);
    assert!(!refused.1.contains("the-shared-secret"));
    let (status, message) = error_of(&replies(&mut c, 0));
    assert_eq!(status, Status::PermissionDenied as u8);
    assert_eq!(message, "authentication failed: wrong secret");
    // A proof for another challenge (a replay from another connection).
    hello(&mut c, 1);
    let replayed = answer(&secret(), &[8; 32]).1;
    assert!(c.receive(1, &auth(&replayed)).is_err());
    hello(&mut c, 2);
    assert!(c.receive(2, &auth(b"short")).is_err());
}

#[test]
fn the_right_proof_opens_the_connection_and_the_server_proves_itself() {
    let mut c = guarded();
    hello(&mut c, 0);
    send(&mut c, 0, &auth(&answer(&secret(), &CHALLENGE).1));
    let reply = replies(&mut c, 0);
    assert_eq!(reply[0], REPLY_OK);
    assert!(answer(&secret(), &CHALLENGE)
        .0
        .server_proved(&secret(), &reply[9..]));
    send(&mut c, 0, &set("/k", b"v"));
    send(&mut c, 0, &get("/k"));
    let mut expected = vec![REPLY_OK];
    expected.extend(byte_string(b"v"));
    assert_eq!(replies(&mut c, 0), expected);
}

#[test]
fn pytorch_clients_are_refused_unless_let_in_unauthenticated() {
    let mut c = guarded();
    c.connect_as(
        0,
        Admission::MustAuthenticate,
        Some(CHALLENGE),
        Instant::now(),
    );
    validate(&mut c, 0);
    send(
        &mut c,
        0,
        &Encoder::request(Command::Ping).u32(1234).finish(),
    );
    assert_eq!(replies(&mut c, 0), 1234u32.to_le_bytes());
    let refused = c.receive(0, &set("/k", b"v")).unwrap_err();
    assert_eq!(refused.0, Refusal::Unauthenticated);
    assert!(
        replies(&mut c, 0).is_empty(),
        "PyTorch's protocol has no error"
    );
    // From a network let in unauthenticated.
    c.connect_as(1, Admission::Open, Some(CHALLENGE), Instant::now());
    validate(&mut c, 1);
    send(&mut c, 1, &set("/k", b"v"));
    send(&mut c, 1, &get("/k"));
    assert_eq!(replies(&mut c, 1), byte_string(b"v"));
}

#[test]
fn auth_without_a_secret_or_hello_is_refused() {
    let mut c = core();
    open_v2(&mut c, 0);
    let refused = c.receive(0, &auth(&[0; 32])).unwrap_err();
    assert_eq!(refused.0, Refusal::AuthenticationFailed);
    open(&mut c, 1);
    let refused = c.receive(1, &auth(&[0; 32])).unwrap_err();
    assert_eq!(refused.0, Refusal::Malformed, "an extension before HELLO");
}

#[test]
fn before_authenticating_a_request_is_refused_at_its_first_byte() {
    let mut c = guarded();
    hello(&mut c, 0);
    // The head of a SET announcing 48 MiB: refused at its command byte,
    // before its length is read.
    let refused = c.receive(0, &[Command::Set as u8]).unwrap_err();
    assert_eq!(refused.0, Refusal::Unauthenticated);
    assert!(
        refused.1.contains("set before authenticating"),
        "{}",
        refused.1
    );
    // Even before VALIDATE (which PyTorch's server would skip it for).
    c.connect_as(
        1,
        Admission::MustAuthenticate,
        Some(CHALLENGE),
        Instant::now(),
    );
    assert!(c.receive(1, &[Command::MultiSet as u8]).is_err());
    // AUTH itself is read within the handshake's limits: a longer proof
    // is refused when its length arrives.
    hello(&mut c, 2);
    let mut long = vec![Command::Auth as u8];
    long.extend_from_slice(&32u64.to_le_bytes());
    long.extend_from_slice(&CLIENT_NONCE);
    long.extend_from_slice(&(48u64 << 20).to_le_bytes());
    let refused = c.receive(2, &long).unwrap_err();
    assert_eq!(refused.0, Refusal::Malformed, "{}", refused.1);
    // Once authenticated, the server's own limits apply.
    hello(&mut c, 3);
    let proof = answer(&secret(), &CHALLENGE).1;
    send(&mut c, 3, &auth(&proof));
    send(&mut c, 3, &set("/big", &vec![1; 1 << 20]));
    assert_eq!(c.stats().keys, 1);
}

#[test]
fn a_flood_of_pings_before_authenticating_is_paused_at_a_few_kib() {
    let mut c = guarded();
    hello(&mut c, 0);
    let ping = Encoder::request(Command::Ping).u32(1).finish();
    let flood: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 4000)
        .collect();
    c.receive(0, &flood[..HANDSHAKE_READ]).unwrap();
    let mut fed = HANDSHAKE_READ;
    while c.wants_input(0) {
        c.receive(0, &flood[fed..fed + HANDSHAKE_READ]).unwrap();
        fed += HANDSHAKE_READ;
    }
    let held = c.output(0).unwrap().queued();
    assert!(held <= HANDSHAKE_OUTPUT_CAP + 64, "{held} bytes of replies");
    assert!(fed < flood.len(), "paused before the flood ended");
}

#[test]
fn connections_in_their_handshake_have_a_budget_of_their_own() {
    let limits = HandshakeLimits {
        max_pending: 2,
        ..HandshakeLimits::default()
    };
    let mut c = quota_core(Quotas {
        max_connections: Some(1),
        ..Quotas::default()
    })
    .with_secret(Some(secret()))
    .with_handshake_limits(limits);
    let now = Instant::now();
    for id in 0..2 {
        c.room_for(Admission::MustAuthenticate).unwrap();
        c.connect_as(id, Admission::MustAuthenticate, Some(CHALLENGE), now);
    }
    let refused = c.room_for(Admission::MustAuthenticate).unwrap_err();
    assert_eq!(refused.0, Refusal::ConnectionQuota);
    assert!(refused.1.contains("--max-handshakes"), "{}", refused.1);
    // Strangers in their handshake do not take the connection quota from
    // a client let in unauthenticated...
    c.room_for(Admission::Open).unwrap();
    c.connect_as(2, Admission::Open, None, now);
    assert!(
        c.room_for(Admission::Open).is_err(),
        "the quota is full now"
    );
    // ...and a client that authenticates once it is full is told why.
    validate(&mut c, 0);
    hello_v2(&mut c, 0);
    let proof = answer(&secret(), &CHALLENGE).1;
    let refused = c.receive(0, &auth(&proof)).unwrap_err();
    assert_eq!(refused.0, Refusal::ConnectionQuota);
    let (status, message) = error_of(&replies(&mut c, 0));
    assert_eq!(status, Status::QuotaExceeded as u8);
    assert!(message.contains("maximum of 1 connections"), "{message}");
    c.disconnect(0);
    c.disconnect(2);
    // Room again: the other one authenticates and is served.
    validate(&mut c, 1);
    hello_v2(&mut c, 1);
    send(&mut c, 1, &auth(&proof));
    assert_eq!(replies(&mut c, 1)[0], REPLY_OK);
    let text = c.metrics().render();
    for line in [
        "distcore_quota_refusals_total{quota=\"handshakes\"} 1",
        "distcore_quota_refusals_total{quota=\"connections\"} 2",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
}

#[test]
fn a_handshake_not_finished_in_time_ends_the_connection() {
    let limits = HandshakeLimits {
        timeout: Duration::from_secs(10),
        ..HandshakeLimits::default()
    };
    let mut c = guarded().with_handshake_limits(limits);
    let t0 = Instant::now();
    c.connect_as(0, Admission::MustAuthenticate, Some(CHALLENGE), t0);
    c.connect_as(1, Admission::MustAuthenticate, Some(CHALLENGE), t0);
    c.connect_as(2, Admission::MustUseTls, None, t0 + Duration::from_secs(1));
    c.connect_as(3, Admission::Open, None, t0);
    assert_eq!(c.next_handshake_deadline(), Some(t0 + limits.timeout));
    // 1 authenticates in time; 0 only validated and said HELLO.
    validate(&mut c, 0);
    hello_v2(&mut c, 0);
    validate(&mut c, 1);
    hello_v2(&mut c, 1);
    let proof = answer(&secret(), &CHALLENGE).1;
    send(&mut c, 1, &auth(&proof));
    let just_before = t0 + limits.timeout - Duration::from_millis(1);
    assert!(c.expire_handshakes(just_before).is_empty());
    let expired = c.expire_handshakes(t0 + limits.timeout);
    assert_eq!(expired.len(), 1, "{expired:?}");
    assert_eq!(expired[0].0, 0);
    assert_eq!(expired[0].1 .0, Refusal::HandshakeTimeout);
    c.disconnect(0);
    // A new connection with 0's id is not hit by its old deadline.
    c.connect_as(
        0,
        Admission::MustAuthenticate,
        Some(CHALLENGE),
        t0 + limits.timeout,
    );
    let expired = c.expire_handshakes(t0 + limits.timeout + Duration::from_secs(1));
    assert_eq!(expired.iter().map(|e| e.0).collect::<Vec<_>>(), [2]);
    assert_eq!(c.next_handshake_deadline(), Some(t0 + 2 * limits.timeout));
}

fn quota_core(quotas: Quotas) -> ServerCore<MemoryBackend> {
    core().with_quotas(quotas)
}

#[test]
fn the_key_quota_refuses_new_keys_and_lets_existing_ones_change() {
    let mut c = quota_core(Quotas {
        max_keys: Some(2),
        ..Quotas::default()
    });
    open_v2(&mut c, 0);
    send(&mut c, 0, &set("/a", b"1"));
    send(&mut c, 0, &set("/b", b"2"));
    send(&mut c, 0, &set("/c", b"3"));
    send(&mut c, 0, &set("/a", b"overwritten"));
    send(&mut c, 0, &get("/c"));
    let reply = replies(&mut c, 0);
    assert_eq!(reply[0], REPLY_DEFERRED_ERROR, "the SET of /c: {reply:?}");
    assert_eq!(reply[1], Status::QuotaExceeded as u8);
    let len = u64::from_le_bytes(reply[2..10].try_into().unwrap()) as usize;
    let message = String::from_utf8_lossy(&reply[10..10 + len]);
    assert!(message.contains("maximum of 2 keys; key '/c'"), "{message}");
    let mut rest = vec![REPLY_OK];
    rest.extend(byte_string(b""));
    assert_eq!(reply[10 + len..], rest, "/c was not stored");
    let add = Encoder::request(Command::Add)
        .bytes(b"/counter")
        .u64(1)
        .finish();
    let refused = c.receive(0, &add);
    assert!(refused.is_ok());
    assert_eq!(error_of(&replies(&mut c, 0)).0, Status::QuotaExceeded as u8);
    send(
        &mut c,
        0,
        &Encoder::request(Command::DeleteKey).bytes(b"/b").finish(),
    );
    replies(&mut c, 0);
    send(&mut c, 0, &add);
    assert_eq!(
        replies(&mut c, 0),
        [&[REPLY_OK][..], &1i64.to_le_bytes()].concat()
    );
    assert!(c
        .metrics()
        .render()
        .contains("distcore_quota_refusals_total{quota=\"keys\"} 2"));
}

#[test]
fn the_byte_quota_counts_growth_and_a_pytorch_client_over_it_is_closed() {
    let mut c = quota_core(Quotas {
        max_stored_bytes: Some(100),
        ..Quotas::default()
    });
    open_v2(&mut c, 0);
    send(&mut c, 0, &set("/a", &[0; 60]));
    send(&mut c, 0, &set("/a", &[0; 90]));
    send(&mut c, 0, &set("/b", &[0; 20]));
    send(&mut c, 0, &Encoder::request(Command::Ping).u32(1).finish());
    let reply = replies(&mut c, 0);
    assert_eq!(reply[0], REPLY_DEFERRED_ERROR, "/b: 92 + 22 > 100");
    assert!(String::from_utf8_lossy(&reply).contains("maximum of 100 stored bytes"));
    open(&mut c, 1);
    let refused = c.receive(1, &set("/c", &[0; 50])).unwrap_err();
    assert_eq!(refused.0, Refusal::RequestFailed);
    send(&mut c, 0, &set("/a", b"small"));
    send(&mut c, 0, &set("/b", &[0; 20]));
    send(&mut c, 0, &get("/b"));
    let mut expected = vec![REPLY_OK];
    expected.extend(byte_string(&[0; 20]));
    assert_eq!(replies(&mut c, 0), expected, "room again after shrinking");
}

#[test]
fn metrics_count_requests_connections_by_kind_and_backpressure() {
    let mut c = core();
    c.connect(0);
    open(&mut c, 1);
    open_v2(&mut c, 2);
    send(&mut c, 1, &set("/k", b"v"));
    send(&mut c, 1, &get("/k"));
    send(&mut c, 2, &wait(&["/never"]));
    c.publish();
    let text = c.metrics().render();
    for line in [
        "distcore_connections{kind=\"handshake\"} 1",
        "distcore_connections{kind=\"pytorch\"} 1",
        "distcore_connections{kind=\"distcore\"} 1",
        "distcore_requests_total{command=\"set\"} 1",
        "distcore_requests_total{command=\"get\"} 1",
        "distcore_requests_total{command=\"wait\"} 0",
        "distcore_waiters 1",
        "distcore_keys 1",
        "distcore_stored_bytes 3",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
    }
    c.disconnect(2);
    c.disconnect(0);
    // A client that never reads is throttled once, however much it sends.
    send(&mut c, 1, &set("/big", &[1; 200 << 10]));
    for _ in 0..4 {
        send(&mut c, 1, &get("/big"));
    }
    c.publish();
    let text = c.metrics().render();
    assert!(
        text.contains("distcore_connections_throttled_total 1\n"),
        "{text}"
    );
    assert!(text.contains("distcore_connections_throttled 1\n"));
    assert!(text.contains("distcore_connections{kind=\"distcore\"} 0\n"));
    replies(&mut c, 1);
    c.resume(1).unwrap();
    c.publish();
    assert!(c
        .metrics()
        .render()
        .contains("distcore_connections_throttled 0\n"));
}

#[test]
fn stats_answers_with_the_metrics_text() {
    let mut c = core();
    open_v2(&mut c, 0);
    send(&mut c, 0, &[Command::Stats as u8]);
    let reply = replies(&mut c, 0);
    assert_eq!(reply[0], REPLY_OK);
    let text = String::from_utf8_lossy(&reply[9..]);
    assert!(
        text.contains("# TYPE distcore_requests_total counter"),
        "{text}"
    );
}

#[test]
fn queues_count_against_both_quotas_whatever_else_the_key_holds() {
    let mut c = quota_core(Quotas {
        max_keys: Some(2),
        max_stored_bytes: Some(200),
        ..Quotas::default()
    });
    open_v2(&mut c, 0);
    let push = |key: &str, value: &[u8]| {
        Encoder::request(Command::QueuePush)
            .bytes(key.as_bytes())
            .bytes(value)
            .finish()
    };
    send(&mut c, 0, &push("/q", b"1"));
    // A COMPARE_SET that would store a value beside the queue is charged.
    let swap = Encoder::request(Command::CompareSet)
        .bytes(b"/q")
        .bytes(b"")
        .bytes(&[0; 500])
        .finish();
    send(&mut c, 0, &swap);
    assert_eq!(error_of(&replies(&mut c, 0)).0, Status::QuotaExceeded as u8);
    send(&mut c, 0, &set("/a", b"1"));
    // A push on a key that holds a value starts a queue: one key more.
    send(&mut c, 0, &push("/a", b"2"));
    send(&mut c, 0, &Encoder::request(Command::Ping).u32(1).finish());
    let reply = replies(&mut c, 0);
    assert_eq!(reply[0], REPLY_DEFERRED_ERROR, "{reply:?}");
    assert_eq!(reply[1], Status::QuotaExceeded as u8);
    c.publish();
    assert!(c.metrics().render().contains("distcore_keys 2\n"));
}

/// A random write over a few keys: every writing command, with keys
/// repeated within a MULTI_SET, values from empty to past the quota.
fn random_write(rng: &mut fastrand::Rng) -> Vec<u8> {
    let key = |rng: &mut fastrand::Rng| format!("/{}", ["a", "b", "c", "q"][rng.usize(..4)]);
    let value = |rng: &mut fastrand::Rng| vec![7u8; [0, 1, 10, 60, 200][rng.usize(..5)]];
    match rng.usize(..7) {
        0 => set(&key(rng), &value(rng)),
        1 => {
            let n = rng.usize(1..=6);
            let mut e = Encoder::request(Command::MultiSet).u64(n as u64);
            for _ in 0..n {
                e = e.bytes(key(rng).as_bytes()).bytes(&value(rng));
            }
            e.finish()
        }
        2 => Encoder::request(Command::Append)
            .bytes(key(rng).as_bytes())
            .bytes(&value(rng))
            .finish(),
        3 => Encoder::request(Command::Add)
            .bytes(key(rng).as_bytes())
            .u64([1, 1 << 20, 1 << 60][rng.usize(..3)])
            .finish(),
        4 => Encoder::request(Command::CompareSet)
            .bytes(key(rng).as_bytes())
            .bytes(b"")
            .bytes(&value(rng))
            .finish(),
        5 => Encoder::request(Command::QueuePush)
            .bytes(key(rng).as_bytes())
            .bytes(&value(rng))
            .finish(),
        _ => Encoder::request(Command::DeleteKey)
            .bytes(key(rng).as_bytes())
            .finish(),
    }
}

/// Whatever writes clients send, in any order and with keys repeated in
/// one request, the store never ends a request above a quota.
#[test]
fn no_sequence_of_writes_ends_above_a_quota() {
    let mut rng = fastrand::Rng::with_seed(0x0071_756f_7461);
    for _ in 0..300 {
        let (max_keys, max_bytes) = (rng.usize(1..=3), rng.u64(50..=300));
        let mut c = quota_core(Quotas {
            max_keys: Some(max_keys),
            max_stored_bytes: Some(max_bytes),
            ..Quotas::default()
        });
        open_v2(&mut c, 0);
        for _ in 0..40 {
            let request = random_write(&mut rng);
            c.receive(0, &request)
                .expect("served or refused in a reply");
            replies(&mut c, 0);
            let usage = c.backend.usage();
            assert!(
                usage.keys <= max_keys && usage.bytes <= max_bytes,
                "{usage:?} over {max_keys} keys / {max_bytes} bytes after {request:?}"
            );
        }
    }
}
