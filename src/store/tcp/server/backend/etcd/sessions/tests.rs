use super::*;
use crate::store::tcp::failure::Cause;

fn record(rank: u32, incarnation: u64) -> (MemberRecord, i64) {
    let spec = SessionSpec {
        group: b"g/".to_vec(),
        rank,
        world_size: None,
        incarnation,
        ttl: None,
        host: "h".into(),
        pid: 1,
        recoverable: false,
        resume: false,
    };
    let lease_ttl = Duration::from_secs(2);
    (
        MemberRecord {
            lease: 7,
            lease_ttl,
            spec,
        },
        10 + i64::from(rank),
    )
}

fn opened(rank: u32) -> Vec<SessionChange> {
    let group = b"g/".to_vec();
    vec![
        SessionChange::Member {
            group: group.clone(),
            rank,
            record: Some(record(rank, 5)),
        },
        SessionChange::Alive {
            group,
            rank,
            alive: true,
        },
    ]
}

fn failure(rank: u32) -> Failure {
    Failure {
        group: b"g/".to_vec(),
        rank,
        host: "h".into(),
        pid: 1,
        incarnation: 5,
        cause: Cause::ConnectionLost,
        silent_for: None,
    }
}

#[test]
fn a_liveness_key_gone_alone_is_an_expiry_and_an_ended_session_is_not() {
    let (mut view, noticed) = SessionView::new([opened(0), opened(1)].concat());
    assert_eq!(noticed, Noticed::default());
    // Rank 0 ends (closed or failed): both keys go in one revision.
    let ended = vec![
        SessionChange::Member {
            group: b"g/".to_vec(),
            rank: 0,
            record: None,
        },
        SessionChange::Alive {
            group: b"g/".to_vec(),
            rank: 0,
            alive: false,
        },
    ];
    assert_eq!(view.apply(ended), Noticed::default());
    // Rank 1's lease runs out: only its liveness key goes.
    let expired = vec![SessionChange::Alive {
        group: b"g/".to_vec(),
        rank: 1,
        alive: false,
    }];
    let noticed = view.apply(expired);
    assert_eq!(noticed.expired, vec![record(1, 5)]);
    assert!(noticed.failed.is_empty());
}

#[test]
fn a_failure_is_news_once_and_a_snapshot_finds_the_leases_that_ran_out_unwatched() {
    let mut snapshot = opened(0);
    snapshot.push(SessionChange::Member {
        group: b"g/".to_vec(),
        rank: 1,
        record: Some(record(1, 5)),
    });
    let (mut view, noticed) = SessionView::new(snapshot);
    assert_eq!(
        noticed.expired,
        vec![record(1, 5)],
        "no liveness key at start"
    );
    let recorded = || SessionChange::Failure {
        group: b"g/".to_vec(),
        failure: Some(failure(1)),
    };
    assert_eq!(view.apply(vec![recorded()]).failed, vec![failure(1)]);
    assert!(view.apply(vec![recorded()]).failed.is_empty(), "seen again");
}

#[test]
fn leases_are_renewed_while_held_and_ended_once_open() {
    let mut held = HeldSessions::default();
    let session = |lease| HeldSession {
        group: b"g/".to_vec(),
        rank: 0,
        lease,
        revision: 3,
        recoverable: false,
    };
    held.opening(1);
    assert_eq!(held.end(1, Some(failure(0))), Ending::Later);
    assert_eq!(
        held.opened(1, Some(session(11))),
        Some((session(11), Some(failure(0)))),
        "ended as soon as it is open"
    );
    assert!(held.leases().is_empty());
    held.opening(2);
    assert_eq!(held.opened(2, Some(session(22))), None);
    assert_eq!(held.leases(), vec![22]);
    assert_eq!(held.lease_of(2), Some(22));
    assert_eq!(held.end(2, None), Ending::Now(session(22)));
    assert_eq!(held.end(2, None), Ending::Nothing);
    held.opening(3);
    assert_eq!(held.opened(3, None), None, "refused");
    assert_eq!(held.end(3, None), Ending::Nothing);
}

#[test]
fn a_lease_covers_the_session_ttl_in_whole_seconds_and_at_least_the_minimum() {
    let mut spec = record(0, 1).0.spec;
    assert_eq!(lease_ttl(&spec), LEASE_TTL_WITHOUT_TTL);
    spec.ttl = Some(Duration::from_millis(500));
    assert_eq!(lease_ttl(&spec), MIN_LEASE_TTL);
    spec.ttl = Some(Duration::from_millis(7200));
    assert_eq!(lease_ttl(&spec), Duration::from_secs(8));
}

#[test]
fn a_failure_recorded_here_is_not_news_when_the_watch_brings_it_back() {
    let (mut view, _) = SessionView::new(Vec::new());
    assert!(view.learn(&failure(3)), "recorded here: news");
    let echo = SessionChange::Failure {
        group: b"g/".to_vec(),
        failure: Some(failure(3)),
    };
    assert!(view.apply(vec![echo]).failed.is_empty(), "the watch's echo");
    assert!(!view.learn(&failure(3)), "known");
}

#[test]
fn a_recoverable_groups_member_coming_or_going_is_a_membership_to_publish() {
    let recoverable = |rank| {
        let (mut member, revision) = record(rank, 5);
        member.spec.group = b"r/".to_vec();
        member.spec.recoverable = true;
        SessionChange::Member {
            group: b"r/".to_vec(),
            rank,
            record: Some((member, revision)),
        }
    };
    // At start: every recoverable group (its publication may have been
    // lost with the last server watching), not the fate-sharing ones.
    let (mut view, noticed) = SessionView::new([vec![recoverable(0)], opened(1)].concat());
    assert_eq!(noticed.changed, BTreeSet::from([b"r/".to_vec()]));
    assert_eq!(view.apply(opened(2)).changed, BTreeSet::new());
    assert_eq!(
        view.apply(vec![recoverable(1)]).changed,
        BTreeSet::from([b"r/".to_vec()])
    );
    let gone = |group: &[u8], rank| SessionChange::Member {
        group: group.to_vec(),
        rank,
        record: None,
    };
    assert_eq!(
        view.apply(vec![gone(b"r/", 0)]).changed,
        BTreeSet::from([b"r/".to_vec()])
    );
    assert_eq!(view.apply(vec![gone(b"g/", 2)]).changed, BTreeSet::new());
    // A record the view never had (deleted twice) changes nothing.
    assert_eq!(view.apply(vec![gone(b"r/", 0)]).changed, BTreeSet::new());
}
