//! Liveness sessions through the core: a member's failure reaches every
//! other member's blocked calls at once, naming it.

use std::time::Duration;

use super::*;
use crate::store::tcp::listing::GroupMembers;
use crate::store::tcp::protocol::SessionSpec;
use crate::Status;

fn spec(rank: u32, ttl: Option<Duration>) -> SessionSpec {
    SessionSpec {
        group: b"job/".to_vec(),
        rank,
        world_size: Some(2),
        incarnation: 9,
        ttl,
        host: "node7".into(),
        pid: 4242 + rank,
        recoverable: false,
        resume: false,
    }
}

fn session_open(spec: &SessionSpec) -> Vec<u8> {
    Encoder::request(Command::SessionOpen)
        .bytes(&spec.encode())
        .finish()
}

/// Opens a version 2 connection `id` and a session of `rank` on it: the
/// session's id.
fn member(c: &mut ServerCore<MemoryBackend>, id: ConnId, rank: u32, ttl: Option<Duration>) -> u64 {
    open_v2(c, id);
    send(c, id, &session_open(&spec(rank, ttl)));
    let reply = replies(c, id);
    assert_eq!(reply[0], REPLY_OK, "{reply:?}");
    u64::from_le_bytes(reply[1..9].try_into().unwrap())
}

/// The status code and message of an ERROR reply.
fn error_of(reply: &[u8]) -> (u8, String) {
    assert_eq!(reply[0], REPLY_ERROR, "{reply:?}");
    let len = u64::from_le_bytes(reply[2..10].try_into().unwrap()) as usize;
    (
        reply[1],
        String::from_utf8(reply[10..10 + len].to_vec()).unwrap(),
    )
}

#[test]
fn a_members_lost_connection_fails_every_other_members_blocked_calls_at_once() {
    let mut c = core();
    let zero = member(&mut c, 0, 0, None);
    member(&mut c, 1, 1, None);
    // Rank 0's spare connection, blocked in a wait; a PyTorch client's too.
    open_v2(&mut c, 2);
    send(
        &mut c,
        2,
        &Encoder::request(Command::SessionAttach).u64(zero).finish(),
    );
    assert_eq!(replies(&mut c, 2), [REPLY_OK]);
    send(&mut c, 2, &wait(&["job/ready"]));
    open(&mut c, 3);
    send(&mut c, 3, &wait(&["job/ready"]));
    c.disconnect(1);
    let (code, message) = error_of(&replies(&mut c, 2));
    assert_eq!(i32::from(code), Status::PeerFailed.code());
    for part in [
        "rank 1",
        "node7",
        "pid 4243",
        "incarnation 9",
        "connection was lost",
    ] {
        assert!(message.contains(part), "{part}: {message}");
    }
    assert!(c.take_woken().contains(&2), "flushed this turn");
    assert!(replies(&mut c, 3).is_empty(), "PyTorch's client waits on");
    // Later calls of the group fail the same way; leaving does not.
    send(&mut c, 0, &get("job/ready"));
    assert_eq!(error_of(&replies(&mut c, 0)).1, message);
    send(&mut c, 0, &set("job/x", b"1"));
    assert_eq!(replies(&mut c, 0)[0], REPLY_DEFERRED_ERROR);
    send(&mut c, 0, &[Command::SessionClose as u8]);
    assert_eq!(replies(&mut c, 0), [REPLY_OK]);
    send(&mut c, 0, &get("job/ready"));
    assert_eq!(replies(&mut c, 0)[0], REPLY_OK, "no longer a member");
}

#[test]
fn a_silent_member_fails_at_its_ttl_unless_the_server_itself_stalled() {
    let ttl = Duration::from_secs(2);
    let t0 = Instant::now();
    let mut c = core();
    c.begin_turn(t0);
    member(&mut c, 0, 0, Some(ttl));
    member(&mut c, 1, 1, Some(ttl));
    send(&mut c, 0, &wait(&["job/never"]));
    c.expire_sessions(t0);
    // Rank 0 keeps alive; rank 1 says nothing.
    c.begin_turn(t0 + Duration::from_millis(1500));
    send(&mut c, 0, &[Command::SessionKeepAlive as u8]);
    assert!(
        replies(&mut c, 0).is_empty(),
        "a keep-alive that succeeds has no reply"
    );
    c.expire_sessions(t0 + Duration::from_millis(1500));
    assert!(replies(&mut c, 0).is_empty());
    // The server stalls past rank 1's deadline: no one is blamed.
    let resumed = t0 + Duration::from_secs(30);
    c.begin_turn(resumed);
    c.expire_sessions(resumed);
    assert!(replies(&mut c, 0).is_empty());
    // A TTL after the stall, rank 1 has still said nothing.
    c.begin_turn(resumed + Duration::from_millis(1900));
    send(&mut c, 0, &[Command::SessionKeepAlive as u8]);
    assert!(
        replies(&mut c, 0).is_empty(),
        "a keep-alive that succeeds has no reply"
    );
    c.expire_sessions(resumed + Duration::from_millis(1900));
    c.begin_turn(resumed + ttl);
    c.expire_sessions(resumed + ttl);
    let (code, message) = error_of(&replies(&mut c, 0));
    assert_eq!(i32::from(code), Status::PeerFailed.code());
    assert!(
        message.contains("rank 1") && message.contains("TTL"),
        "{message}"
    );
    // Rank 1's own connection is closed: its process learns it too.
    let closing = c.take_closing();
    assert_eq!(closing.len(), 1);
    assert_eq!((closing[0].0, closing[0].1 .0), (1, Refusal::SessionFailed));
}

#[test]
fn a_reported_error_reaches_the_others_with_its_message() {
    let mut c = core();
    member(&mut c, 0, 0, None);
    member(&mut c, 1, 1, None);
    send(&mut c, 1, &wait(&["job/never"]));
    let report = Encoder::request(Command::SessionReport)
        .bytes(b"loss is NaN at step 812")
        .finish();
    send(&mut c, 0, &report);
    assert_eq!(replies(&mut c, 0), [REPLY_OK]);
    let (_, message) = error_of(&replies(&mut c, 1));
    assert!(message.contains("rank 0") && message.contains("loss is NaN at step 812"));
}

#[test]
fn sessions_need_version_2_and_a_well_formed_spec() {
    let mut c = core();
    open(&mut c, 0);
    let refused = c.receive(0, &session_open(&spec(0, None))).unwrap_err();
    assert_eq!(refused.0, Refusal::Malformed);
    open_v2(&mut c, 1);
    let garbage = Encoder::request(Command::SessionOpen)
        .bytes(b"not a spec")
        .finish();
    send(&mut c, 1, &garbage);
    let (code, _) = error_of(&replies(&mut c, 1));
    assert_eq!(i32::from(code), Status::InvalidArgument.code());
    let mut out_of_range = spec(5, None);
    out_of_range.world_size = Some(2);
    send(&mut c, 1, &session_open(&out_of_range));
    assert_eq!(error_of(&replies(&mut c, 1)).0, code, "rank 5 of 2");
    send(&mut c, 1, &[Command::SessionKeepAlive as u8]);
    let (code, message) = error_of(&replies(&mut c, 1));
    assert_eq!(i32::from(code), Status::InvalidState.code());
    assert!(message.contains("no session"), "{message}");
    // The connection still serves.
    send(&mut c, 1, &get("job/x"));
    assert_eq!(replies(&mut c, 1)[0], REPLY_OK);
}

#[test]
fn a_spec_round_trips_and_anything_else_is_refused() {
    let full = spec(1, Some(Duration::from_millis(1500)));
    assert_eq!(SessionSpec::decode(&full.encode(), 64), Some(full.clone()));
    assert_eq!(
        SessionSpec::decode(&full.encode(), 3),
        None,
        "group too long"
    );
    let bytes = full.encode();
    // Cut before its flags, it is an older client's spec: not recoverable.
    let flags_at = bytes.len() - 4;
    for cut in (0..bytes.len()).filter(|cut| *cut != flags_at) {
        assert_eq!(SessionSpec::decode(&bytes[..cut], 64), None, "cut at {cut}");
    }
    let recoverable = SessionSpec {
        recoverable: true,
        ..full.clone()
    };
    let older = SessionSpec::decode(&recoverable.encode()[..flags_at], 64);
    assert_eq!(older, Some(full.clone()));
    assert_eq!(
        SessionSpec::decode(&recoverable.encode(), 64),
        Some(recoverable)
    );
    let mut long_host = full;
    long_host.host = "h".repeat(SessionSpec::MAX_HOST_LEN + 1);
    assert_eq!(SessionSpec::decode(&long_host.encode(), 64), None);
}

fn leased(request: Vec<u8>) -> Vec<u8> {
    [vec![Command::SessionLease as u8], request].concat()
}

fn exists(c: &mut ServerCore<MemoryBackend>, id: ConnId, key: &str) -> bool {
    send(
        c,
        id,
        &Encoder::request(Command::Check).keys(&[key]).finish(),
    );
    replies(c, id) == [REPLY_OK, READY]
}

fn list_prefix(c: &mut ServerCore<MemoryBackend>, id: ConnId, prefix: &str) -> Vec<u8> {
    send(
        c,
        id,
        &Encoder::request(Command::ListPrefix)
            .bytes(prefix.as_bytes())
            .finish(),
    );
    replies(c, id)
}

#[test]
fn leased_keys_die_with_their_session_however_it_ends_and_the_last_write_decides() {
    let mut c = core();
    member(&mut c, 0, 0, None);
    member(&mut c, 1, 1, None);
    open_v2(&mut c, 5);
    send(&mut c, 0, &leased(set("job/addr0", b"10.0.0.1")));
    let push = Encoder::request(Command::QueuePush)
        .bytes(b"job/q")
        .bytes(b"x")
        .finish();
    send(&mut c, 0, &leased(push));
    let add = Encoder::request(Command::Add)
        .bytes(b"job/count")
        .u64(2)
        .finish();
    send(&mut c, 0, &leased(add));
    assert_eq!(
        replies(&mut c, 0),
        [&[REPLY_OK][..], &2i64.to_le_bytes()].concat()
    );
    // Rewritten without a lease by someone else: no longer rank 0's.
    send(&mut c, 0, &leased(set("job/shared", b"a")));
    send(&mut c, 5, &set("job/shared", b"b"));
    // Rank 1's lease moves job/moved from rank 0 to rank 1.
    send(&mut c, 0, &leased(set("job/moved", b"0")));
    send(&mut c, 1, &leased(set("job/moved", b"1")));
    for key in ["job/addr0", "job/q", "job/count", "job/shared", "job/moved"] {
        assert!(exists(&mut c, 5, key), "{key}");
    }
    // Graceful close: rank 0's keys go before the close is answered.
    send(&mut c, 0, &[Command::SessionClose as u8]);
    assert_eq!(replies(&mut c, 0), [REPLY_OK]);
    for key in ["job/addr0", "job/q", "job/count"] {
        assert!(!exists(&mut c, 5, key), "{key} outlived its session");
    }
    assert!(exists(&mut c, 5, "job/shared"));
    assert!(exists(&mut c, 5, "job/moved"));
    // A crash: rank 1's keys go with its connection.
    c.disconnect(1);
    assert!(!exists(&mut c, 5, "job/moved"));
    assert!(exists(&mut c, 5, "job/shared"));
}

#[test]
fn a_lease_needs_a_session_and_a_write_after_it() {
    let mut c = core();
    open_v2(&mut c, 0);
    // No session: the SET fails (a deferred error), the lease does not
    // carry over to the next request.
    send(&mut c, 0, &leased(set("k", b"v")));
    let reply = replies(&mut c, 0);
    assert_eq!(reply[0], REPLY_DEFERRED_ERROR, "{reply:?}");
    assert_eq!(i32::from(reply[1]), Status::InvalidState.code());
    send(&mut c, 0, &set("k", b"v"));
    assert!(replies(&mut c, 0).is_empty());
    assert!(exists(&mut c, 0, "k"));
    // A lease before a request that writes no key closes the connection.
    member(&mut c, 1, 0, None);
    c.receive(1, &leased(get("k"))).unwrap_err();
}

#[test]
fn delete_prefix_and_list_prefix_cover_values_queues_and_leases() {
    let mut c = core();
    member(&mut c, 0, 0, None);
    open_v2(&mut c, 1);
    send(&mut c, 0, &leased(set("job/a", b"1")));
    send(&mut c, 1, &set("job/b", b"2"));
    send(&mut c, 1, &set("other/c", b"3"));
    let push = Encoder::request(Command::QueuePush)
        .bytes(b"job/q")
        .bytes(b"x")
        .finish();
    send(&mut c, 1, &push);
    let listed = list_prefix(&mut c, 1, "job/");
    assert_eq!(
        &listed[..9],
        &[&[REPLY_OK][..], &2i64.to_le_bytes()].concat()[..]
    );
    let delete = Encoder::request(Command::DeletePrefix)
        .bytes(b"job/")
        .finish();
    send(&mut c, 1, &delete);
    assert_eq!(
        replies(&mut c, 1),
        [&[REPLY_OK][..], &2i64.to_le_bytes()].concat()
    );
    for (key, left) in [
        ("job/a", false),
        ("job/b", false),
        ("job/q", false),
        ("other/c", true),
    ] {
        assert_eq!(exists(&mut c, 1, key), left, "{key}");
    }
    assert_eq!(
        list_prefix(&mut c, 1, "job/"),
        [&[REPLY_OK][..], &0i64.to_le_bytes()].concat()
    );
    // job/a is no longer rank 0's: written again unleased, it stays when
    // rank 0 leaves.
    send(&mut c, 1, &set("job/a", b"again"));
    c.disconnect(0);
    assert!(exists(&mut c, 1, "job/a"));
}

#[test]
fn a_one_job_server_tells_blocked_connections_without_a_session_too() {
    // The group's only member with a session is rank 1: its failure is
    // the job's all the same.
    let mut c = core().with_one_job(true);
    member(&mut c, 1, 1, None);
    // A PyTorch client and a distcore client without a session, each
    // blocked in a wait; another PyTorch client idle.
    open(&mut c, 3);
    send(&mut c, 3, &wait(&["job/ready"]));
    open_v2(&mut c, 4);
    send(&mut c, 4, &wait(&["job/ready"]));
    open(&mut c, 5);
    c.disconnect(1);
    let (code, message) = error_of(&replies(&mut c, 4));
    assert_eq!(i32::from(code), Status::PeerFailed.code());
    assert!(message.contains("rank 1"), "{message}");
    let closing = c.take_closing();
    assert_eq!(closing.len(), 1, "{closing:?}");
    let (id, Refused(reason, why)) = &closing[0];
    assert_eq!((*id, *reason), (3, Refusal::SessionFailed));
    assert!(why.starts_with("the job failed: rank 1"), "{why}");
    // A later request of a client without a session is served as ever.
    send(&mut c, 5, &set("job/x", b"1"));
    send(&mut c, 4, &get("job/x"));
    assert_eq!(replies(&mut c, 4)[0], REPLY_OK);
}

/// Opens a version 2 connection `id` and a session of `rank` in the
/// recoverable group `job/` on it.
fn recoverable_member(c: &mut ServerCore<MemoryBackend>, id: ConnId, rank: u32) {
    open_v2(c, id);
    let spec = SessionSpec {
        recoverable: true,
        world_size: Some(4),
        ..spec(rank, None)
    };
    send(c, id, &session_open(&spec));
    assert_eq!(replies(c, id)[0], REPLY_OK);
}

/// The membership record of `job/`, read on connection `id`.
fn membership(c: &mut ServerCore<MemoryBackend>, id: ConnId) -> Option<GroupMembers> {
    send(c, id, &get(&GroupMembers::key("job/")));
    let reply = replies(c, id);
    assert_eq!(reply[0], REPLY_OK);
    GroupMembers::decode(&reply[9..])
}

#[test]
fn a_recoverable_group_changes_its_membership_instead_of_failing() {
    let mut c = core();
    for rank in 0..3 {
        recoverable_member(&mut c, rank as ConnId, rank);
    }
    c.publish_memberships();
    let first = membership(&mut c, 0).unwrap();
    assert_eq!(first.epoch, 1, "three arrivals in one turn: one epoch");
    let ranks = |m: &GroupMembers| m.members.iter().map(|m| m.rank).collect::<Vec<_>>();
    assert_eq!(ranks(&first), [0, 1, 2]);
    assert_eq!(first.members[1].pid, 4243);
    // Rank 0 watches for the next epoch; rank 2 waits on rank 1's data.
    let watch = Encoder::request(Command::WaitGet)
        .keys(&[GroupMembers::epoch_key("job/", 2)])
        .finish();
    send(&mut c, 0, &watch);
    send(&mut c, 2, &wait(&["job/data1"]));
    c.disconnect(1);
    assert!(replies(&mut c, 2).is_empty(), "nobody's call fails");
    assert!(
        replies(&mut c, 0).is_empty(),
        "published once the turn is served"
    );
    c.publish_memberships();
    let woken = replies(&mut c, 0);
    assert_eq!(woken[..2], [REPLY_OK, STOP_WAITING], "{woken:?}");
    assert!(woken.ends_with(b"2"), "{woken:?}");
    let second = membership(&mut c, 0).unwrap();
    assert_eq!((second.epoch, ranks(&second)), (2, vec![0, 2]));
    // Later calls of the survivors are served.
    send(&mut c, 0, &set("job/data1", b"again"));
    assert_eq!(replies(&mut c, 2), [REPLY_OK, STOP_WAITING]);
    // Every member must agree on the mode.
    open_v2(&mut c, 5);
    let fate_sharing = SessionSpec {
        world_size: None,
        ..spec(3, None)
    };
    send(&mut c, 5, &session_open(&fate_sharing));
    let (code, message) = error_of(&replies(&mut c, 5));
    assert_eq!(i32::from(code), Status::InvalidState.code());
    assert!(message.contains("is recoverable"), "{message}");
    // The last to leave takes the record with it.
    for id in [0, 2] {
        send(&mut c, id, &[Command::SessionClose as u8]);
        assert_eq!(replies(&mut c, id), [REPLY_OK]);
    }
    c.publish_memberships();
    assert_eq!(membership(&mut c, 5), None);
    assert!(!exists(&mut c, 5, &GroupMembers::epoch_key("job/", 2)));
}

#[test]
fn a_member_whose_input_is_still_unread_at_its_deadline_is_not_silent() {
    let ttl = Duration::from_secs(1);
    let t0 = Instant::now();
    let mut c = core();
    c.begin_turn(t0);
    member(&mut c, 0, 0, Some(ttl));
    member(&mut c, 1, 1, Some(ttl));
    c.expire_sessions(t0);
    let due = t0 + ttl;
    assert!(c.sessions_due(t0).is_empty(), "nothing is due before");
    let mut connections = c.sessions_due(due);
    connections.sort();
    assert_eq!(connections, [0, 1]);
    // Rank 1's keep-alive is in its socket, not read this turn (a turn
    // reads a bounded batch): it was heard, and stays.
    c.heard_unread(1, due);
    c.expire_sessions(due);
    let listing = c.sessions.list(b"", due, |_| Vec::new());
    let live: Vec<u32> = listing.sessions.iter().map(|s| s.rank).collect();
    assert_eq!(live, [1], "rank 0 was silent, rank 1 was not");
    assert!(
        listing.failures[0].message.contains("rank 0"),
        "{listing:?}"
    );
    assert!(c.sessions_due(due + ttl / 2).is_empty());
}

#[test]
fn a_connection_that_only_keeps_a_session_alive_may_be_read_late_until_it_asks_for_more() {
    let mut c = core();
    let id = member(&mut c, 0, 0, Some(Duration::from_secs(2)));
    let keep_alive = Encoder::request(Command::SessionKeepAlive).finish();
    // The connection the session was opened on is read at once: losing it
    // ends the session, and it carries the member's calls.
    send(&mut c, 0, &keep_alive);
    assert!(!c.reads_late(0));
    // An attached connection, once it sends keep-alives only.
    open_v2(&mut c, 1);
    send(
        &mut c,
        1,
        &Encoder::request(Command::SessionAttach).u64(id).finish(),
    );
    assert_eq!(replies(&mut c, 1), [REPLY_OK]);
    assert!(!c.reads_late(1), "attached, no keep-alive yet");
    send(&mut c, 1, &keep_alive);
    assert!(replies(&mut c, 1).is_empty(), "keep-alives have no reply");
    assert!(c.reads_late(1));
    // Any other request moves it back; a blocked call keeps it there.
    send(&mut c, 1, &wait(&["job/k"]));
    assert!(!c.reads_late(1));
    send(&mut c, 1, &keep_alive);
    assert!(!c.reads_late(1), "a call of its waits");
    send(&mut c, 0, &set("job/k", b"v"));
    assert_eq!(replies(&mut c, 1), [REPLY_OK, STOP_WAITING]);
    send(&mut c, 1, &keep_alive);
    assert!(c.reads_late(1));
    // A connection in no session is never read late.
    open_v2(&mut c, 2);
    send(&mut c, 2, &keep_alive);
    assert!(!c.reads_late(2));
}
