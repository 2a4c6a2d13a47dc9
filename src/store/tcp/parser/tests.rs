use super::*;
use crate::store::tcp::protocol::{Encoder, VALIDATE_MAGIC};

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn value(bytes: &[u8]) -> Value {
    Arc::from(bytes)
}

fn one(data: &[u8]) -> Request {
    let (requests, partial) = parse_all(data, Limits::default()).unwrap();
    assert!(!partial);
    assert_eq!(requests.len(), 1);
    requests.into_iter().next().unwrap()
}

#[test]
fn parses_the_spec_example_and_pytorch_captures() {
    let set = hex("01 0300000000000000 2f6b31 0200000000000000 7631");
    assert_eq!(
        one(&set),
        Request::Set {
            key: b"/k1".to_vec(),
            value: value(b"v1")
        }
    );
    let add = hex("04 0500000000000000 696e69742f 0100000000000000");
    assert_eq!(
        one(&add),
        Request::Add {
            key: b"init/".to_vec(),
            delta: 1
        }
    );
    let (requests, _) = parse_all(&hex("00 cef7853c 0d e0080000"), Limits::default()).unwrap();
    assert_eq!(
        requests,
        vec![
            Request::Validate {
                magic: VALIDATE_MAGIC
            },
            Request::Ping { nonce: 0x08e0 }
        ]
    );
    let mset = hex("0b 0200000000000000 0200000000000000 2f61 0100000000000000 31 0200000000000000 2f62 0100000000000000 32");
    assert_eq!(
        one(&mset),
        Request::MultiSet {
            pairs: vec![(b"/a".to_vec(), value(b"1")), (b"/b".to_vec(), value(b"2"))]
        }
    );
    let cas = Encoder::request(Command::CompareSet)
        .bytes(b"/c")
        .bytes(b"")
        .bytes(b"new")
        .finish();
    assert_eq!(
        one(&cas),
        Request::CompareSet {
            key: b"/c".to_vec(),
            expected: value(b""),
            desired: value(b"new")
        }
    );
    assert_eq!(one(&[0x11]), Request::ListKeys);
    let wait = Encoder::request(Command::Wait).keys(&["/a", ""]).finish();
    assert_eq!(
        one(&wait),
        Request::Wait {
            keys: vec![b"/a".to_vec(), Vec::new()]
        }
    );
    assert_eq!(
        one(&Encoder::request(Command::MultiGet).u64(0).finish()),
        Request::MultiGet { keys: vec![] }
    );
}

#[test]
fn every_prefix_of_a_request_needs_more() {
    let req = Encoder::request(Command::CompareSet)
        .bytes(b"/key")
        .bytes(b"old")
        .bytes(b"new")
        .finish();
    for cut in 1..req.len() {
        let mut parser = RequestParser::default();
        assert_eq!(
            parser.parse(&req[..cut], &Limits::default()).unwrap(),
            (cut, None),
            "cut at {cut}"
        );
        assert!(!parser.is_idle());
        let (n, request) = parser.parse(&req[cut..], &Limits::default()).unwrap();
        assert_eq!(n, req.len() - cut);
        assert!(request.is_some(), "cut at {cut}");
        assert!(parser.is_idle());
    }
}

#[test]
fn limits_and_unknown_commands_are_errors() {
    let l = Limits {
        max_key_len: 4,
        max_value_len: 8,
        max_keys_per_request: 2,
        max_request_len: 40,
    };
    let err = |data: &[u8]| parse_all(data, l).unwrap_err();
    assert_eq!(err(&[0x42]), ProtocolError::UnknownCommand(0x42));
    assert!(matches!(
        err(&Encoder::request(Command::Get).bytes(b"12345").finish()),
        ProtocolError::TooLarge { what: "key", .. }
    ));
    assert!(matches!(
        err(&Encoder::request(Command::Get).u64(1 << 63).finish()),
        ProtocolError::TooLarge { what: "key", .. }
    ));
    assert!(matches!(
        err(&Encoder::request(Command::Set).bytes(b"k").u64(9).finish()),
        ProtocolError::TooLarge { what: "value", .. }
    ));
    assert!(matches!(
        err(&Encoder::request(Command::Wait).u64(3).finish()),
        ProtocolError::TooLarge {
            what: "key count",
            ..
        }
    ));
    // Two pairs of 8-byte values: each within limits, the request not.
    let big = Encoder::request(Command::MultiSet)
        .u64(2)
        .bytes(b"a")
        .bytes(b"12345678")
        .bytes(b"b")
        .u64(8)
        .finish();
    assert!(matches!(
        err(&big),
        ProtocolError::TooLarge {
            what: "request",
            ..
        }
    ));
    // Refused from its length alone, before the bytes arrive.
    let mut parser = RequestParser::default();
    assert!(parser
        .parse(
            &Encoder::request(Command::Set)
                .bytes(b"k")
                .u64(1 << 40)
                .finish(),
            &l
        )
        .is_err());
    assert!(parser.is_idle(), "a refused request leaves nothing behind");
}

/// The requests of a varied stream: every command, empty and long keys and
/// values, a large value, and lists.
fn sample_stream(rng: &mut fastrand::Rng) -> Vec<u8> {
    let mut out = Vec::new();
    let mut bytes = |len: usize| -> Vec<u8> { (0..len).map(|_| rng.u8(..)).collect() };
    let big = bytes(LARGE_VALUE_LEN + 1234);
    let k1 = bytes(3);
    let k2 = bytes(300);
    let requests: Vec<Vec<u8>> = vec![
        Encoder::request(Command::Validate)
            .u32(VALIDATE_MAGIC)
            .finish(),
        Encoder::request(Command::Ping).u32(7).finish(),
        Encoder::request(Command::Set)
            .bytes(&k1)
            .bytes(&bytes(40))
            .finish(),
        Encoder::request(Command::Set)
            .bytes(&k2)
            .bytes(&big)
            .finish(),
        Encoder::request(Command::CompareSet)
            .bytes(&k1)
            .bytes(&big)
            .bytes(b"")
            .finish(),
        Encoder::request(Command::Get).bytes(&k1).finish(),
        Encoder::request(Command::Add)
            .bytes(b"c")
            .u64(-5i64 as u64)
            .finish(),
        Encoder::request(Command::Check).keys(&[&k1, &k2]).finish(),
        Encoder::request(Command::Wait).keys(&[&k2]).finish(),
        vec![Command::GetNumKeys as u8],
        Encoder::request(Command::DeleteKey).bytes(b"").finish(),
        Encoder::request(Command::Append)
            .bytes(&k1)
            .bytes(&bytes(9))
            .finish(),
        Encoder::request(Command::MultiGet)
            .keys(&[&k1, &k1, &k2])
            .finish(),
        Encoder::request(Command::MultiSet)
            .u64(3)
            .bytes(&k1)
            .bytes(&big)
            .bytes(b"")
            .bytes(b"")
            .bytes(&k2)
            .bytes(&bytes(17))
            .finish(),
        vec![Command::CancelWait as u8],
        Encoder::request(Command::QueuePush)
            .bytes(&k2)
            .bytes(&big)
            .finish(),
        Encoder::request(Command::QueuePop).bytes(&k2).finish(),
        Encoder::request(Command::QueueLen).bytes(&k2).finish(),
        vec![Command::ListKeys as u8],
        Encoder::request(Command::Barrier)
            .bytes(b"b")
            .u64(3)
            .finish(),
        Encoder::request(Command::WaitGet).keys(&[&k1]).finish(),
    ];
    for _ in 0..3 {
        for r in &requests {
            out.extend_from_slice(r);
        }
    }
    out
}

/// Feeds `data` in the given pieces, taking a large value's rest through
/// the direct path when the parser offers it, as the event loop does.
fn parse_in_pieces(data: &[u8], cuts: &[usize], direct: bool) -> Vec<Request> {
    let mut parser = RequestParser::default();
    let mut requests = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&data.len())) {
        let mut piece = &data[start..end.max(start)];
        start = end.max(start);
        while !piece.is_empty() {
            if direct {
                if let Some(target) = parser.direct_target() {
                    let n = target.len().min(piece.len());
                    target[..n].copy_from_slice(&piece[..n]);
                    piece = &piece[n..];
                    requests.extend(parser.direct_filled(n, &Limits::default()).unwrap());
                    continue;
                }
            }
            let (n, request) = parser.parse(piece, &Limits::default()).unwrap();
            assert!(n > 0 || request.is_some());
            piece = &piece[n..];
            requests.extend(request);
        }
    }
    assert!(parser.is_idle());
    requests
}

#[test]
fn the_same_bytes_split_anywhere_parse_to_the_same_requests() {
    let mut rng = fastrand::Rng::with_seed(0x5EED);
    let data = sample_stream(&mut rng);
    let whole = parse_in_pieces(&data, &[], false);
    assert_eq!(whole.len(), 63);
    for round in 0..300 {
        let pieces = rng.usize(1..64);
        let mut cuts: Vec<usize> = match round % 3 {
            // Anywhere.
            0 => (0..pieces).map(|_| rng.usize(..data.len())).collect(),
            // Small pieces around one place.
            1 => {
                let at = rng.usize(..data.len());
                (0..pieces)
                    .map(|i| (at + i * rng.usize(1..4)).min(data.len()))
                    .collect()
            }
            // Byte by byte through the first requests.
            _ => (1..200).collect(),
        };
        cuts.sort_unstable();
        assert_eq!(
            parse_in_pieces(&data, &cuts, round % 2 == 0),
            whole,
            "round {round}, cuts {cuts:?}"
        );
    }
}

#[test]
fn a_large_value_is_received_straight_into_its_buffer() {
    let big: Vec<u8> = (0..(3 * LARGE_VALUE_LEN)).map(|i| i as u8).collect();
    let req = Encoder::request(Command::QueuePush)
        .bytes(b"q")
        .bytes(&big)
        .finish();
    let mut parser = RequestParser::default();
    let head = 1 + 8 + 1 + 8 + 10;
    assert_eq!(
        parser.parse(&req[..head], &Limits::default()).unwrap(),
        (head, None)
    );
    let target = parser.direct_target().expect("large rest");
    assert_eq!(target.len(), big.len() - 10);
    target.copy_from_slice(&req[head..]);
    let n = target.len();
    assert_eq!(
        parser.direct_filled(n, &Limits::default()).unwrap(),
        Some(Request::QueuePush {
            key: b"q".to_vec(),
            value: Arc::from(&big[..])
        })
    );
    assert!(parser.direct_target().is_none());
}

#[test]
fn a_framing_parser_ends_every_request_where_the_parser_does_keeping_nothing() {
    let mut rng = fastrand::Rng::with_seed(0xF4A3);
    let data = sample_stream(&mut rng);
    let whole = parse_in_pieces(&data, &[], false);
    let shape = |r: &Request| match r {
        Request::MultiGet { keys } | Request::Check { keys } | Request::Wait { keys } => {
            (r.command(), keys.len())
        }
        Request::MultiSet { pairs } => (r.command(), pairs.len()),
        other => (other.command(), 0),
    };
    let expected: Vec<_> = whole.iter().map(shape).collect();
    for _ in 0..100 {
        let mut cuts: Vec<usize> = (0..rng.usize(1..64))
            .map(|_| rng.usize(..data.len()))
            .collect();
        cuts.sort_unstable();
        let mut parser = RequestParser::framing();
        let mut framed = Vec::new();
        let mut start = 0;
        for end in cuts.into_iter().chain(std::iter::once(data.len())) {
            let mut piece = &data[start..end.max(start)];
            start = end.max(start);
            while !piece.is_empty() {
                assert!(
                    parser.direct_target().is_none(),
                    "nothing is received into place"
                );
                let (n, request) = parser.parse(piece, &Limits::default()).unwrap();
                piece = &piece[n..];
                if let Some(request) = request {
                    if let Request::Set { key, value } = &request {
                        assert!(key.is_empty() && value.is_empty(), "nothing is kept");
                    }
                    framed.push(shape(&request));
                }
            }
        }
        assert!(parser.is_idle());
        assert_eq!(framed, expected);
    }
}
