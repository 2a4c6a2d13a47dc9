//! VALIDATE and HELLO: what a connection is before and after.

use super::*;

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
    let mut plain = ServerCore::new(
        MemoryBackend::new(VALUE_LIMIT),
        limits(),
        false,
        Instant::now(),
    );
    open(&mut plain, 0);
    send(&mut plain, 0, &hello);
    assert_eq!(replies(&mut plain, 0), HELLO_NONCE.to_le_bytes());
}
