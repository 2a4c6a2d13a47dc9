//! Limits, backpressure and requests split anywhere: what one connection can make the core hold.

use super::*;

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
