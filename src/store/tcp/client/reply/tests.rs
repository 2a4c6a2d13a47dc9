//! The reply decoder and the wait exchange, fed by hand: every split of the
//! bytes decodes alike, lengths are checked before allocation, and the
//! cancel handshake ends the way the server's answer says.

use super::*;
use crate::store::tcp::protocol::put_bytes;

fn bytes_field(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_bytes(&mut out, v);
    out
}

/// Feeds `input` in pieces of `chunk` bytes; returns the outcome and how
/// many bytes were consumed.
fn feed_in_chunks(exchange: &mut Exchange, input: &[u8], chunk: usize) -> (Option<Outcome>, usize) {
    let mut used = 0;
    while used < input.len() {
        let end = (used + chunk).min(input.len());
        let n = exchange.feed(&input[used..end]).unwrap();
        used += n;
        if let Some(outcome) = exchange.take_outcome() {
            return (Some(outcome), used);
        }
        assert_eq!(
            n,
            end - (used - n),
            "an unfinished exchange takes every byte offered"
        );
    }
    (exchange.take_outcome(), used)
}

fn reply_of(outcome: Option<Outcome>) -> Reply {
    match outcome {
        Some(Outcome::Reply(reply)) => reply,
        other => panic!("expected a reply, got {other:?}"),
    }
}

#[test]
fn every_shape_decodes_alike_however_the_bytes_are_split() {
    let big = vec![7u8; 3 * DIRECT_MIN + 5];
    let cases: Vec<(Shape, Vec<u8>, Reply)> = vec![
        (Shape::U8, vec![1], Reply(vec![Field::U8(1)])),
        (
            Shape::U32,
            77u32.to_le_bytes().to_vec(),
            Reply(vec![Field::U32(77)]),
        ),
        (
            Shape::I64,
            (-5i64).to_le_bytes().to_vec(),
            Reply(vec![Field::I64(-5)]),
        ),
        (
            Shape::Values(2),
            [bytes_field(b"ab"), bytes_field(&big)].concat(),
            Reply(vec![
                Field::Bytes(b"ab".to_vec()),
                Field::Bytes(big.clone()),
            ]),
        ),
        (
            Shape::Counted,
            [
                2i64.to_le_bytes().to_vec(),
                bytes_field(b"/a"),
                bytes_field(b""),
            ]
            .concat(),
            Reply(vec![
                Field::I64(2),
                Field::Bytes(b"/a".to_vec()),
                Field::Bytes(Vec::new()),
            ]),
        ),
        (
            Shape::QueuePop,
            [3i64.to_le_bytes().to_vec(), bytes_field(b"x")].concat(),
            Reply(vec![Field::I64(3), Field::Bytes(b"x".to_vec())]),
        ),
        (
            Shape::QueuePop,
            0i64.to_le_bytes().to_vec(),
            Reply(vec![Field::I64(0)]),
        ),
        (
            Shape::Stop(1),
            [vec![STOP_WAITING], bytes_field(b"v")].concat(),
            Reply(vec![Field::U8(STOP_WAITING), Field::Bytes(b"v".to_vec())]),
        ),
    ];
    for (shape, wire, expected) in cases {
        for status_byte in [false, true] {
            let wire = if status_byte {
                [vec![REPLY_OK], wire.clone()].concat()
            } else {
                wire.clone()
            };
            // A byte of the next reply follows: it must be left alone.
            let input = [wire.clone(), vec![0xEE]].concat();
            for chunk in [1, 3, 8, 9, 4096, input.len()] {
                let mut exchange = Exchange::new(shape, status_byte, 1 << 30);
                let (outcome, used) = feed_in_chunks(&mut exchange, &input, chunk);
                assert_eq!(used, wire.len(), "{shape:?} chunk {chunk}");
                assert_eq!(reply_of(outcome), expected, "{shape:?} chunk {chunk}");
            }
        }
    }
}

#[test]
fn a_large_value_can_be_received_in_place() {
    let value: Vec<u8> = (0..(2 * DIRECT_MIN + 3)).map(|i| i as u8).collect();
    let mut exchange = Exchange::new(Shape::Values(1), true, 1 << 30);
    assert_eq!(exchange.feed(&[REPLY_OK]).unwrap(), 1);
    let head = (value.len() as u64).to_le_bytes();
    assert_eq!(exchange.feed(&head).unwrap(), 8);
    let mut filled = 0;
    while let Some((target, missing)) = exchange.direct_target() {
        assert_eq!(missing, value.len() - filled);
        let n = missing.min(DIRECT_MIN + 1);
        target.extend_from_slice(&value[filled..filled + n]);
        exchange.direct_appended(n).unwrap();
        filled += n;
    }
    exchange.feed(&value[filled..]).unwrap();
    assert_eq!(reply_of(exchange.take_outcome()).into_value(), value);
}

#[test]
fn a_length_over_the_limit_is_refused_before_allocating() {
    for len in [1u64 << 62, u64::MAX, 1025] {
        let mut exchange = Exchange::new(Shape::Values(1), false, 1024);
        let e = exchange.feed(&len.to_le_bytes()).unwrap_err();
        assert_eq!(e.status(), Status::Protocol);
        assert!(e.message().contains("over the limit"), "{}", e.message());
    }
    let mut exchange = Exchange::new(Shape::Counted, false, 1024);
    let e = exchange.feed(&(1i64 << 40).to_le_bytes()).unwrap_err();
    assert!(e.message().contains("keys"), "{}", e.message());
}

#[test]
fn an_error_reply_carries_the_servers_status_and_message() {
    let wire = [vec![REPLY_ERROR, 1], bytes_field(b"not an integer")].concat();
    for chunk in [1, wire.len()] {
        let mut exchange = Exchange::new(Shape::I64, true, 1024);
        match feed_in_chunks(&mut exchange, &wire, chunk).0 {
            Some(Outcome::Refused(e)) => {
                assert_eq!(e.status(), Status::InvalidArgument);
                assert_eq!(e.message(), "not an integer");
            }
            other => panic!("{other:?}"),
        }
    }
    let mut exchange = Exchange::new(Shape::I64, true, 1024);
    assert!(exchange.feed(&[7]).is_err(), "an unknown status byte");
}

#[test]
fn a_cancelled_wait_ends_as_the_servers_answer_says() {
    for status_byte in [false, true] {
        let ok = |bytes: &[u8]| -> Vec<u8> {
            if status_byte {
                [&[REPLY_OK][..], bytes].concat()
            } else {
                bytes.to_vec()
            }
        };
        // The cancel came first.
        let mut exchange = Exchange::new(Shape::Stop(1), status_byte, 1024);
        assert!(exchange.expire().is_some());
        assert!(exchange.expire().is_none(), "one cancel per wait");
        exchange.feed(&ok(&[WAIT_CANCELED])).unwrap();
        assert!(matches!(exchange.take_outcome(), Some(Outcome::Canceled)));

        // The keys arrived as we cancelled: the values, then WAIT_CANCELED.
        let mut exchange = Exchange::new(Shape::Stop(1), status_byte, 1024);
        exchange.expire().unwrap();
        let wire = [ok(&[STOP_WAITING]), bytes_field(b"v"), ok(&[WAIT_CANCELED])].concat();
        let (outcome, used) = feed_in_chunks(&mut exchange, &wire, 1);
        assert_eq!(used, wire.len());
        assert_eq!(reply_of(outcome).into_value(), b"v");

        // WAIT_CANCELED without a cancel is a protocol error.
        let mut exchange = Exchange::new(Shape::Stop(0), status_byte, 1024);
        assert!(exchange.feed(&ok(&[WAIT_CANCELED])).is_err());
    }
}

#[test]
fn a_wait_whose_reply_started_cannot_be_cancelled() {
    let mut exchange = Exchange::new(Shape::Stop(1), false, 1024);
    exchange.feed(&[STOP_WAITING, 5]).unwrap();
    assert!(exchange.expire().is_none());
    let mut plain = Exchange::new(Shape::I64, false, 1024);
    assert!(plain.expire().is_none());
}

#[test]
fn a_deferred_error_before_a_reply_is_read_past() {
    let wire = [
        vec![REPLY_DEFERRED_ERROR, 1],
        bytes_field(b"a set failed"),
        vec![REPLY_OK],
        7i64.to_le_bytes().to_vec(),
    ]
    .concat();
    for chunk in [1, 5, wire.len()] {
        let mut exchange = Exchange::new(Shape::I64, true, 1024);
        let (outcome, used) = feed_in_chunks(&mut exchange, &wire, chunk);
        assert_eq!(used, wire.len());
        assert_eq!(reply_of(outcome).i64(0).unwrap(), 7);
    }
}
