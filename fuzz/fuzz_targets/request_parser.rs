//! The TCPStore request parser on arbitrary bytes: it never panics, and
//! the same bytes split anywhere parse to the same requests (or the same
//! refusal). The first two bytes choose the split points.
#![no_main]

use distcore::store::tcp::parser::RequestParser;
use distcore::store::tcp::protocol::{Limits, Request};
use libfuzzer_sys::fuzz_target;

/// Small limits, so that the fuzzer reaches them.
fn limits() -> Limits {
    Limits {
        max_key_len: 64,
        max_value_len: 1 << 16,
        max_keys_per_request: 16,
        max_request_len: 1 << 17,
    }
}

/// The requests in `data` fed in pieces of `step` bytes, and whether the
/// stream was refused.
fn parse(data: &[u8], step: usize, direct: bool) -> (Vec<Request>, bool) {
    let limits = limits();
    let mut parser = RequestParser::default();
    let mut requests = Vec::new();
    for mut piece in data.chunks(step.max(1)) {
        while !piece.is_empty() {
            if direct {
                if let Some(target) = parser.direct_target() {
                    let n = target.len().min(piece.len());
                    target[..n].copy_from_slice(&piece[..n]);
                    piece = &piece[n..];
                    match parser.direct_filled(n, &limits) {
                        Ok(request) => requests.extend(request),
                        Err(_) => return (requests, true),
                    }
                    continue;
                }
            }
            match parser.parse(piece, &limits) {
                Ok((n, request)) => {
                    piece = &piece[n..];
                    requests.extend(request);
                }
                Err(_) => return (requests, true),
            }
        }
    }
    (requests, false)
}

fuzz_target!(|data: &[u8]| {
    let Some((&[a, b], data)) = data.split_first_chunk::<2>().map(|(h, t)| (h, t)) else {
        return;
    };
    let whole = parse(data, data.len(), false);
    assert_eq!(parse(data, usize::from(a), false), whole);
    assert_eq!(parse(data, usize::from(b), true), whole);
});
