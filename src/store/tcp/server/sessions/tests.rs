//! Every way a session ends, with time passed in.

use super::*;

const TTL: Duration = Duration::from_secs(2);

fn spec(rank: u32, incarnation: u64, ttl: Option<Duration>) -> SessionSpec {
    SessionSpec {
        group: b"job/".to_vec(),
        rank,
        world_size: Some(4),
        incarnation,
        ttl,
        host: format!("host{rank}"),
        pid: 100 + rank,
        recoverable: false,
        resume: false,
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Sessions with ranks 0 and 1 of `job/` open on connections 10 and 11
/// at `t0`, with `ttl`; rank 0's spare connection 20 attached.
fn two_members(t0: Instant, ttl: Option<Duration>) -> Sessions {
    let mut sessions = Sessions::default();
    let (zero, none) = sessions.open(10, spec(0, 1, ttl), t0);
    assert!(none.is_none());
    sessions.attach(20, zero.unwrap(), t0).unwrap();
    assert!(sessions.open(11, spec(1, 1, ttl), t0).0.is_ok());
    sessions
}

#[test]
fn a_lost_connection_fails_the_group_and_every_other_member_is_told_who() {
    let t0 = Instant::now();
    let mut sessions = two_members(t0, None);
    let delivery = sessions.disconnect(11, t0 + ms(30)).unwrap();
    assert_eq!(delivery.failure.cause, Cause::ConnectionLost);
    assert_eq!(delivery.failure.silent_for, Some(ms(30)));
    let mut told = delivery.tell.clone();
    told.sort();
    assert_eq!(told, [10, 20], "rank 0's own and attached connections");
    let error = delivery.failure.error();
    assert_eq!(error.status(), Status::PeerFailed);
    for part in ["rank 1", "'job/'", "host host1", "pid 101", "incarnation 1"] {
        assert!(
            error.message().contains(part),
            "{part}: {}",
            error.message()
        );
    }
    assert!(error.message().contains("connection was lost"));
    assert!(delivery.close.is_empty(), "rank 1 had no other connection");
    // Later calls of the survivors fail the same way.
    assert_eq!(sessions.failure_for(10), Some(&delivery.failure));
    assert_eq!(sessions.failure_for(20), Some(&delivery.failure));
    // A newcomer to the failed group is refused with the failure.
    let (refused, _) = sessions.open(12, spec(2, 1, None), t0 + ms(40));
    assert_eq!(refused.unwrap_err(), error);
}

#[test]
fn closing_or_losing_a_spare_connection_fails_nobody() {
    let t0 = Instant::now();
    let mut sessions = two_members(t0, None);
    assert_eq!(sessions.disconnect(20, t0), None, "an attached connection");
    assert!(sessions.is_member(10) && !sessions.is_member(20));
    sessions.close(11, t0).unwrap();
    assert_eq!(sessions.disconnect(11, t0), None, "closed first");
    assert_eq!(sessions.failure_for(10), None);
    assert!(sessions.close(11, t0).is_err(), "no session any more");
    // Rank 1 may come back (a new process, or the same one).
    assert!(sessions.open(11, spec(1, 2, None), t0).0.is_ok());
}

#[test]
fn a_member_silent_past_its_ttl_fails_and_one_heard_from_does_not() {
    let t0 = Instant::now();
    let mut sessions = two_members(t0, Some(TTL));
    assert_eq!(sessions.next_deadline(), Some(t0 + TTL));
    sessions.heard(20, t0 + ms(1500)); // rank 0, on its spare connection
    assert!(sessions.expire(t0 + ms(1999)).is_empty());
    let deliveries = sessions.expire(t0 + TTL);
    assert_eq!(deliveries.len(), 1);
    let failure = &deliveries[0].failure;
    assert_eq!((failure.rank, &failure.cause), (1, &Cause::TtlMissed(TTL)));
    assert_eq!(deliveries[0].tell.len(), 2);
    assert_eq!(deliveries[0].close, [11], "its process learns it too");
    // Rank 0's calls fail with rank 1's failure from now on; when it goes
    // silent too, that tells nobody more (the group has failed already),
    // but its own connections are closed.
    assert!(sessions.failure_for(10).is_some());
    let late = sessions.expire(t0 + ms(3500));
    assert_eq!(late.len(), 1);
    assert!(late[0].tell.is_empty());
    let mut closed = late[0].close.clone();
    closed.sort();
    assert_eq!(closed, [10, 20]);
    assert!(!sessions.is_member(10), "its own TTL ran out");
}

#[test]
fn what_was_heard_on_a_spare_connection_counts_after_it_closed() {
    let t0 = Instant::now();
    let mut sessions = two_members(t0, Some(TTL));
    sessions.heard(11, t0 + ms(1500));
    sessions.heard(20, t0 + ms(1500)); // rank 0, on its spare connection
    assert_eq!(sessions.disconnect(20, t0 + ms(1600)), None);
    assert!(sessions.expire(t0 + ms(3499)).is_empty(), "heard at 1.5 s");
    let deliveries = sessions.expire(t0 + ms(3500));
    let failed = deliveries
        .iter()
        .map(|d| d.failure.rank)
        .collect::<Vec<_>>();
    assert_eq!(failed, [0, 1]);
    assert_eq!(deliveries[0].failure.silent_for, Some(TTL));
}

#[test]
fn a_stalled_server_blames_nobody_for_its_own_silence() {
    let t0 = Instant::now();
    let mut sessions = two_members(t0, Some(TTL));
    assert!(sessions.expire(t0).is_empty()); // the loop sleeps until t0 + 2 s
                                             // ... but runs again only at t0 + 10 s (stopped, or starved): whatever
                                             // the members sent meanwhile is in the sockets, unread.
    sessions.turn(t0 + ms(10_000));
    assert!(
        sessions.expire(t0 + ms(10_000)).is_empty(),
        "the stall gave every session its TTL again"
    );
    sessions.heard(10, t0 + ms(10_001));
    // Rank 1 really is silent: it fails a TTL after the stall ended.
    assert!(sessions.expire(t0 + ms(11_999)).is_empty());
    let deliveries = sessions.expire(t0 + ms(12_000));
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].failure.rank, 1);
    // A turn late by less than the grace is no stall.
    let mut sessions = two_members(t0, Some(TTL));
    assert!(sessions.expire(t0).is_empty());
    sessions.turn(t0 + TTL + STALL_GRACE);
    let deliveries = sessions.expire(t0 + TTL + STALL_GRACE);
    let told = deliveries.iter().filter(|d| !d.tell.is_empty()).count();
    assert_eq!(
        (deliveries.len(), told),
        (2, 1),
        "both silent, one failure told"
    );
}

#[test]
fn a_reported_error_reaches_the_others_as_the_members_own_message() {
    let t0 = Instant::now();
    let mut sessions = two_members(t0, None);
    let delivery = sessions
        .report(20, "CUDA out of memory".into(), t0)
        .unwrap()
        .unwrap();
    assert_eq!(delivery.failure.rank, 0, "reported on rank 0's spare");
    assert_eq!(delivery.tell, [11]);
    assert!(delivery.close.is_empty(), "the reporter knows");
    assert!(delivery
        .failure
        .error()
        .message()
        .contains("it reported: CUDA out of memory"));
    assert!(sessions.report(42, "x".into(), t0).is_err(), "no session");
}

#[test]
fn a_newer_incarnation_fences_the_older_and_an_older_is_refused() {
    let t0 = Instant::now();
    let mut sessions = two_members(t0, None);
    let (stale, none) = sessions.open(12, spec(1, 1, None), t0);
    assert_eq!(stale.unwrap_err().status(), Status::InvalidState);
    assert!(none.is_none(), "refusing fails nobody");
    let (refused, fenced) = sessions.open(12, spec(1, 7, None), t0);
    let fenced = fenced.unwrap();
    assert_eq!(fenced.failure.cause, Cause::Fenced { by: 7 });
    assert_eq!(fenced.failure.incarnation, 1);
    assert_eq!(fenced.close, [11], "the old process learns it was replaced");
    // The restarted rank joins a group that lost a member: refused too.
    assert_eq!(refused.unwrap_err().status(), Status::PeerFailed);
    assert!(!sessions.is_member(11), "the fenced session is gone");
}

#[test]
fn a_group_whose_members_are_all_gone_starts_clean() {
    let t0 = Instant::now();
    let mut sessions = two_members(t0, None);
    assert!(sessions.disconnect(11, t0).is_some());
    sessions.close(10, t0).unwrap();
    assert_eq!(sessions.failure_for(20), None, "detached with its session");
    let (reopened, _) = sessions.open(30, spec(0, 2, None), t0);
    assert!(reopened.is_ok(), "the job's next run");
    assert!(sessions.failure_for(30).is_none());
}

#[test]
fn a_connection_joins_one_session_at_most() {
    let t0 = Instant::now();
    let mut sessions = two_members(t0, None);
    assert!(sessions.open(20, spec(2, 1, None), t0).0.is_err());
    assert!(sessions.attach(10, 1, t0).is_err());
    assert!(sessions.attach(30, 99, t0).is_err(), "no such session");
}
