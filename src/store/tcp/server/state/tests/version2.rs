//! Version 2 of the extensions: limits announced, status bytes, errors as replies.

use super::remote::deferring_core;
use super::*;

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
    let mut c = deferring_core();
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
