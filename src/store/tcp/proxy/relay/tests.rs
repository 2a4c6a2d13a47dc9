//! The relay, deterministically: PyTorch's requests in, distcore's
//! version 2 replies back, split at every byte.

use super::*;
use crate::net::outbox::Outbox;
use crate::store::tcp::protocol::{Encoder, REPLY_DEFERRED_ERROR, REPLY_ERROR, STOP_WAITING};

fn limits() -> Limits {
    Limits::with_max_value_len(1 << 20)
}

fn get(key: &str) -> Vec<u8> {
    Encoder::request(Command::Get)
        .bytes(key.as_bytes())
        .finish()
}

fn set(key: &str, value: &[u8]) -> Vec<u8> {
    Encoder::request(Command::Set)
        .bytes(key.as_bytes())
        .bytes(value)
        .finish()
}

fn ping(nonce: u32) -> Vec<u8> {
    Encoder::request(Command::Ping).u32(nonce).finish()
}

fn wait(key: &str) -> Vec<u8> {
    Encoder::request(Command::Wait).keys(&[key]).finish()
}

fn cancel_wait() -> Vec<u8> {
    Encoder::request(Command::CancelWait).finish()
}

/// A version 2 OK reply carrying `body`.
fn ok(body: &[u8]) -> Vec<u8> {
    [&[REPLY_OK][..], body].concat()
}

fn value(v: &[u8]) -> Vec<u8> {
    let mut out = (v.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(v);
    out
}

/// [`Relay::on_local`], its outputs as plain bytes.
fn on_local(
    relay: &mut Relay,
    input: &[u8],
    upstream: &mut Vec<u8>,
    local: &mut Vec<u8>,
) -> Result<()> {
    let (mut up, mut answers) = (Outbox::new(), Outbox::new());
    let relayed = relay.on_local(input, &mut up, &mut answers);
    upstream.extend(up.drain(usize::MAX));
    local.extend(answers.drain(usize::MAX));
    relayed
}

/// [`Relay::on_upstream`], its output as plain bytes.
fn on_upstream(relay: &mut Relay, input: &[u8], local: &mut Vec<u8>) -> Result<()> {
    let mut replies = Outbox::new();
    let relayed = relay.on_upstream(input, &mut replies);
    local.extend(replies.drain(usize::MAX));
    relayed
}

/// Feeds `input` to the relay from the local side, one byte at a time:
/// what went upstream and what was answered locally.
fn local_bytewise(relay: &mut Relay, input: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    let (mut up, mut local) = (Vec::new(), Vec::new());
    for byte in input.chunks(1) {
        on_local(relay, byte, &mut up, &mut local)?;
    }
    Ok((up, local))
}

/// Feeds `input` from upstream one byte at a time: what reached the client.
fn upstream_bytewise(relay: &mut Relay, input: &[u8]) -> Result<Vec<u8>> {
    let mut local = Vec::new();
    for byte in input.chunks(1) {
        on_upstream(relay, byte, &mut local)?;
    }
    Ok(local)
}

#[test]
fn requests_go_upstream_byte_for_byte_and_replies_lose_their_status_byte() {
    let mut relay = Relay::new(limits());
    let requests = [
        set("k", b"v"),
        get("k"),
        Encoder::request(Command::Append)
            .bytes(b"k")
            .bytes(b"w")
            .finish(),
        Encoder::request(Command::MultiGet)
            .keys(&["k", "x"])
            .finish(),
        Encoder::request(Command::Add).bytes(b"n").u64(3).finish(),
    ]
    .concat();
    let (up, local) = local_bytewise(&mut relay, &requests).unwrap();
    assert_eq!(up, requests, "forwarded unchanged");
    assert!(local.is_empty());
    assert_eq!(relay.owed(), 4, "SET owes nothing; APPEND its status byte");
    let replies = [
        ok(&value(b"v")),
        ok(&[]),
        ok(&[value(b"vw"), value(b"")].concat()),
        ok(&3i64.to_le_bytes()),
    ]
    .concat();
    let local = upstream_bytewise(&mut relay, &replies).unwrap();
    let expected = [
        value(b"v"),
        value(b"vw"),
        value(b""),
        3i64.to_le_bytes().to_vec(),
    ]
    .concat();
    assert_eq!(local, expected, "PyTorch's replies, nothing for APPEND");
    assert_eq!(relay.owed(), 0);
}

#[test]
fn validate_and_ping_are_answered_here_in_the_order_of_the_requests() {
    let mut relay = Relay::new(limits());
    let validate = Encoder::request(Command::Validate)
        .u32(VALIDATE_MAGIC)
        .finish();
    let (up, local) = local_bytewise(&mut relay, &[validate, ping(7)].concat()).unwrap();
    assert!(up.is_empty(), "the upstream connection made its own");
    assert_eq!(local, 7u32.to_le_bytes(), "PING echoes its nonce");

    // A PING behind a GET is answered once the GET's reply has been.
    let (up, local) = local_bytewise(&mut relay, &[get("k"), ping(9)].concat()).unwrap();
    assert_eq!(up, get("k"));
    assert!(local.is_empty(), "the PING waits for the GET's reply");
    let local = upstream_bytewise(&mut relay, &ok(&value(b"v"))).unwrap();
    assert_eq!(local, [value(b"v"), 9u32.to_le_bytes().to_vec()].concat());
}

#[test]
fn a_wait_cancelled_before_it_ended_gets_one_wait_canceled() {
    let mut relay = Relay::new(limits());
    local_bytewise(&mut relay, &[wait("k"), cancel_wait()].concat()).unwrap();
    assert_eq!(relay.owed(), 2);
    let local = upstream_bytewise(&mut relay, &ok(&[WAIT_CANCELED])).unwrap();
    assert_eq!(local, [WAIT_CANCELED]);
    assert_eq!(relay.owed(), 0, "the WAIT and its cancel are both answered");
    // The connection is in step: the next request's reply is its own.
    local_bytewise(&mut relay, &get("k")).unwrap();
    let local = upstream_bytewise(&mut relay, &ok(&value(b"v"))).unwrap();
    assert_eq!(local, value(b"v"));
}

#[test]
fn a_wait_that_ended_as_it_was_cancelled_gets_both_replies() {
    let mut relay = Relay::new(limits());
    local_bytewise(&mut relay, &[wait("k"), cancel_wait()].concat()).unwrap();
    let replies = [ok(&[STOP_WAITING]), ok(&[WAIT_CANCELED])].concat();
    let local = upstream_bytewise(&mut relay, &replies).unwrap();
    assert_eq!(local, [STOP_WAITING, WAIT_CANCELED]);
    assert_eq!(relay.owed(), 0);
}

#[test]
fn a_refused_request_ends_the_relay_after_the_replies_before_it() {
    let mut relay = Relay::new(limits());
    let add = Encoder::request(Command::Add).bytes(b"s").u64(1).finish();
    local_bytewise(&mut relay, &[get("k"), add].concat()).unwrap();
    let mut error = vec![REPLY_ERROR, 1];
    error.extend(value(b"add: the value of key 's' is not an integer"));
    let mut local = Vec::new();
    let failed = on_upstream(&mut relay, &[ok(&value(b"v")), error].concat(), &mut local);
    assert_eq!(
        local,
        value(b"v"),
        "the GET's reply still reaches the client"
    );
    let e = failed.unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument);
    assert!(e.message().contains("not an integer"), "{e}");
}

#[test]
fn a_write_that_failed_after_it_was_sent_ends_the_relay_never_hidden() {
    let mut deferred = vec![REPLY_DEFERRED_ERROR, 14];
    deferred.extend(value(b"the store holds its maximum of keys"));
    // Before the reply of a later request...
    let mut relay = Relay::new(limits());
    local_bytewise(&mut relay, &[set("k", b"v"), get("k")].concat()).unwrap();
    let input = [deferred.clone(), ok(&value(b"old"))].concat();
    let mut local = Vec::new();
    let e = on_upstream(&mut relay, &input, &mut local).unwrap_err();
    assert_eq!(e.status(), Status::QuotaExceeded);
    assert!(local.is_empty(), "no reply is relayed past a lost write");
    // ...or with nothing asked since.
    let mut relay = Relay::new(limits());
    local_bytewise(&mut relay, &set("k", b"v")).unwrap();
    let e = upstream_bytewise(&mut relay, &deferred).unwrap_err();
    assert!(e.message().contains("maximum of keys"), "{e}");
}

#[test]
fn what_pytorchs_protocol_does_not_have_is_refused() {
    let cases: [(&str, Vec<u8>); 4] = [
        ("unknown command", vec![0x7f]),
        (
            "an extension",
            Encoder::request(Command::WaitGet).keys(&["k"]).finish(),
        ),
        (
            "a wrong VALIDATE",
            Encoder::request(Command::Validate).u32(1).finish(),
        ),
        ("a value over the limit", {
            let mut head = Encoder::request(Command::Set).bytes(b"k").finish();
            head.extend_from_slice(&((1u64 << 20) + 1).to_le_bytes());
            head
        }),
    ];
    for (what, bytes) in cases {
        let mut relay = Relay::new(limits());
        assert!(
            local_bytewise(&mut relay, &bytes).is_err(),
            "{what} is refused"
        );
    }
}

#[test]
fn a_reply_nobody_asked_for_ends_the_relay() {
    let mut relay = Relay::new(limits());
    assert!(upstream_bytewise(&mut relay, &ok(&3i64.to_le_bytes())).is_err());
}

#[test]
fn large_values_pass_through_in_pieces_both_ways() {
    let big: Vec<u8> = (0..(700 << 10)).map(|i| (i % 251) as u8).collect();
    let mut relay = Relay::new(limits());
    let request = set("big", &big);
    let (mut up, mut local) = (Vec::new(), Vec::new());
    for piece in request.chunks(4093) {
        on_local(&mut relay, piece, &mut up, &mut local).unwrap();
    }
    assert_eq!(up, request);
    local_bytewise(&mut relay, &get("big")).unwrap();
    let reply = ok(&value(&big));
    let mut local = Vec::new();
    for piece in reply.chunks(4093) {
        on_upstream(&mut relay, piece, &mut local).unwrap();
    }
    assert_eq!(local, value(&big));
}

#[test]
fn every_shape_pytorch_uses_is_framed() {
    // LIST_KEYS (a count, then keys), QUEUE_POP (a length, then a value if
    // there was one), CHECK (a byte), GET_NUM_KEYS (an i64).
    let mut relay = Relay::new(limits());
    let requests = [
        Encoder::request(Command::ListKeys).finish(),
        Encoder::request(Command::QueuePop).bytes(b"q").finish(),
        Encoder::request(Command::QueuePop).bytes(b"q").finish(),
        Encoder::request(Command::Check).keys(&["k"]).finish(),
        Encoder::request(Command::GetNumKeys).finish(),
    ]
    .concat();
    local_bytewise(&mut relay, &requests).unwrap();
    let bodies = [
        [2i64.to_le_bytes().to_vec(), value(b"a"), value(b"b")].concat(),
        [1i64.to_le_bytes().to_vec(), value(b"e")].concat(),
        0i64.to_le_bytes().to_vec(),
        vec![1],
        5i64.to_le_bytes().to_vec(),
    ];
    let replies: Vec<u8> = bodies.iter().flat_map(|b| ok(b)).collect();
    let local = upstream_bytewise(&mut relay, &replies).unwrap();
    assert_eq!(local, bodies.concat());
    assert_eq!(relay.owed(), 0);
}

/// One PyTorch request, and what answers it: the server's reply on a
/// version 2 connection and PyTorch's protocol's (None: answered by the
/// proxy, which then sends `v1` itself).
struct Exchange {
    request: Vec<u8>,
    v2: Option<Vec<u8>>,
    v1: Vec<u8>,
}

fn random_exchange(rng: &mut fastrand::Rng) -> Vec<Exchange> {
    let mut bytes = |len: usize| -> Vec<u8> { (0..len).map(|_| rng.u8(..)).collect() };
    let key = bytes(5);
    let short = bytes(30);
    let long = bytes(70_000);
    let i64_reply = |v: i64| v.to_le_bytes().to_vec();
    let plain = |request: Vec<u8>, body: Vec<u8>| Exchange {
        request,
        v2: Some(ok(&body)),
        v1: body,
    };
    let silent = |request: Vec<u8>| Exchange {
        request,
        v2: Some(Vec::new()),
        v1: Vec::new(),
    };
    let n = key.len() as u64;
    match rng.usize(0..14) {
        0 => vec![silent(set("k", &long))],
        1 => vec![plain(get("k"), value(&short))],
        2 => vec![plain(
            Encoder::request(Command::Add).bytes(&key).u64(n).finish(),
            i64_reply(-3),
        )],
        3 => vec![plain(
            Encoder::request(Command::Check)
                .keys(&[&key, &key])
                .finish(),
            vec![0],
        )],
        4 => vec![plain(wait("k"), vec![STOP_WAITING])],
        5 => vec![
            Exchange {
                request: wait("k"),
                v2: Some(ok(&[WAIT_CANCELED])),
                v1: vec![WAIT_CANCELED],
            },
            Exchange {
                request: cancel_wait(),
                v2: Some(Vec::new()),
                v1: Vec::new(),
            },
        ],
        6 => vec![
            plain(wait("k"), vec![STOP_WAITING]),
            plain(cancel_wait(), vec![WAIT_CANCELED]),
        ],
        7 => vec![Exchange {
            request: Encoder::request(Command::Append)
                .bytes(&key)
                .bytes(&short)
                .finish(),
            v2: Some(ok(&[])),
            v1: Vec::new(),
        }],
        8 => vec![plain(
            Encoder::request(Command::MultiGet)
                .keys(&[&key, &key, &key])
                .finish(),
            [value(&long), value(b""), value(&short)].concat(),
        )],
        9 => vec![silent(
            Encoder::request(Command::MultiSet)
                .u64(2)
                .bytes(&key)
                .bytes(&long)
                .bytes(b"")
                .bytes(b"")
                .finish(),
        )],
        10 => vec![plain(
            Encoder::request(Command::QueuePop).bytes(&key).finish(),
            [i64_reply(2), value(&long)].concat(),
        )],
        11 => vec![plain(
            Encoder::request(Command::ListKeys).finish(),
            [i64_reply(2), value(&key), value(&short)].concat(),
        )],
        12 => vec![Exchange {
            request: ping(0xDC0D_E5A3),
            v2: None,
            v1: 0xDC0D_E5A3u32.to_le_bytes().to_vec(),
        }],
        _ => vec![plain(
            Encoder::request(Command::CompareSet)
                .bytes(&key)
                .bytes(b"")
                .bytes(&short)
                .finish(),
            value(&short),
        )],
    }
}

/// Cuts `data` at random places.
fn pieces<'a>(rng: &mut fastrand::Rng, data: &'a [u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = match rng.usize(0..4) {
            0 => 1,
            1 => rng.usize(1..16),
            _ => rng.usize(1..20_000),
        }
        .min(rest.len());
        out.push(&rest[..n]);
        rest = &rest[n..];
    }
    out
}

#[test]
fn random_streams_split_anywhere_relay_exactly_pytorchs_bytes() {
    let mut rng = fastrand::Rng::with_seed(0x9E1A);
    for round in 0..200 {
        let exchanges: Vec<Exchange> = (0..rng.usize(1..40))
            .flat_map(|_| random_exchange(&mut rng))
            .collect();
        let requests: Vec<u8> = exchanges.iter().flat_map(|e| e.request.clone()).collect();
        let relayed: Vec<u8> = exchanges
            .iter()
            .filter(|e| e.v2.is_some())
            .flat_map(|e| e.request.clone())
            .collect();
        let replies: Vec<u8> = exchanges
            .iter()
            .flat_map(|e| e.v2.clone().unwrap_or_default())
            .collect();
        let expected: Vec<u8> = exchanges.iter().flat_map(|e| e.v1.clone()).collect();

        let mut relay = Relay::new(limits());
        let (mut up, mut local) = (Vec::new(), Vec::new());
        for piece in pieces(&mut rng, &requests) {
            on_local(&mut relay, piece, &mut up, &mut local).unwrap();
        }
        assert_eq!(up, relayed, "round {round}: what went upstream");
        for piece in pieces(&mut rng, &replies) {
            on_upstream(&mut relay, piece, &mut local).unwrap();
        }
        assert_eq!(local.len(), expected.len(), "round {round}");
        assert!(local == expected, "round {round}: what the client got");
        assert_eq!(relay.owed(), 0, "round {round}");
    }
}

#[test]
fn an_extension_is_refused_at_its_command_byte_before_anything_goes_upstream() {
    let request = Encoder::request(Command::SessionOpen)
        .bytes(b"a session spec")
        .finish();
    let mut relay = Relay::new(limits());
    let (mut up, mut local) = (Vec::new(), Vec::new());
    assert!(on_local(&mut relay, &request[..1], &mut up, &mut local).is_err());
    assert!(up.is_empty() && local.is_empty());
}
