//! Waits, cancels, barriers, queues and WAIT_GET on the in-memory backend.

use super::*;

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
