//! A front-end's view of the liveness sessions kept in etcd
//! (`crate::store::etcd::sessions` has the layout), socket-free: which
//! members every server of the store has, which are alive, and which
//! groups failed. The watcher feeds it every change; it notices what the
//! servers must act on: a group's failure recorded (its members here are
//! told), a member whose lease ran out (its failure is to be recorded, by
//! whichever server comes first), and a recoverable group whose members
//! changed (its membership is to be published, by whichever comes first).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use crate::store::etcd::{HeldSession, MemberRecord, SessionChange};
use crate::store::tcp::failure::Failure;
use crate::store::tcp::protocol::SessionSpec;
use crate::store::tcp::server::sessions::SessionId;

/// The shortest lease a session gets: long enough to ride out a leader
/// election and a member that goes silent (the client gives a member
/// [`RENEW_TIMEOUT`] before the next renewal tries another), short enough
/// that a server's death with its members' fails them soon. (etcd's own
/// minimum is about 2 s; its Go client's sessions default to 60 s.)
pub(super) const MIN_LEASE_TTL: Duration = Duration::from_secs(5);

/// The lease of a session without a TTL: how long it outlives its server.
pub(super) const LEASE_TTL_WITHOUT_TTL: Duration = Duration::from_secs(10);

/// How often a server renews the leases of the sessions it holds: well
/// within the shortest lease.
pub(super) const RENEW_EVERY: Duration = Duration::from_millis(500);

/// How long one renewal may take, trying member after member.
pub(super) const RENEW_TIMEOUT: Duration = Duration::from_secs(2);

/// How long one member is given to renew (one frozen or cut off: the
/// renewal goes on to another).
pub(super) const RENEW_PER_MEMBER: Duration = Duration::from_millis(400);

/// The TTL of the etcd lease of a session of `spec`: at least its own TTL
/// (so that it may resume on another server within it), in whole seconds.
pub(super) fn lease_ttl(spec: &SessionSpec) -> Duration {
    let ttl = spec.ttl.unwrap_or(LEASE_TTL_WITHOUT_TTL).max(MIN_LEASE_TTL);
    Duration::from_secs(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0))
}

/// A member's place: its group and rank.
type Place = (Vec<u8>, u32);

/// What a batch of changes showed that the servers must act on.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Noticed {
    /// Failures recorded (each group's first), to tell its members.
    pub failed: Vec<Failure>,
    /// Members whose lease ran out (record and its revision): their
    /// failure is to be recorded.
    pub expired: Vec<(MemberRecord, i64)>,
    /// Recoverable groups whose members changed: their membership is to
    /// be published.
    pub changed: BTreeSet<Vec<u8>>,
}

/// The session keys of the store, as the changes streamed show them.
#[derive(Debug, Default)]
pub(super) struct SessionView {
    members: HashMap<Place, (MemberRecord, i64)>,
    alive: HashSet<Place>,
    failures: HashMap<Vec<u8>, Failure>,
}

impl SessionView {
    /// The view of a snapshot's session keys, and the members it shows
    /// without their liveness key: their leases ran out while no server
    /// watched (failures found at start are not news: their groups have
    /// no member here yet), and its recoverable groups (whose membership
    /// may not have been published when the last server watching went).
    pub(super) fn new(snapshot: Vec<SessionChange>) -> (SessionView, Noticed) {
        let mut view = SessionView::default();
        let changed = view.apply(snapshot).changed;
        let expired = view
            .members
            .iter()
            .filter(|(place, _)| !view.alive.contains(*place))
            .map(|(_, member)| member.clone())
            .collect();
        let noticed = Noticed {
            failed: Vec::new(),
            expired,
            changed,
        };
        (view, noticed)
    }

    /// The failures `self` holds that `before` did not (a view taken again
    /// from a snapshot, after a gap in the changes): news.
    pub(super) fn failures_since(&self, before: &SessionView) -> Vec<Failure> {
        let news = self.failures.iter();
        let news = news.filter(|(group, failure)| before.failures.get(*group) != Some(*failure));
        news.map(|(_, failure)| failure.clone()).collect()
    }

    /// Notes `failure` as its group's, recorded by this server: whether
    /// it is news (the watch may have brought it already).
    pub(super) fn learn(&mut self, failure: &Failure) -> bool {
        let known = self.failures.get(&failure.group) == Some(failure);
        self.failures.insert(failure.group.clone(), failure.clone());
        !known
    }

    /// Applies whole revisions of changes; what they show to act on.
    pub(super) fn apply(&mut self, changes: Vec<SessionChange>) -> Noticed {
        let mut noticed = Noticed::default();
        let mut lost = Vec::new();
        for change in changes {
            match change {
                SessionChange::Member {
                    group,
                    rank,
                    record: Some(record),
                } => {
                    if record.0.spec.recoverable {
                        noticed.changed.insert(group.clone());
                    }
                    self.members.insert((group, rank), record);
                }
                SessionChange::Member { group, rank, .. } => {
                    let gone = self.members.remove(&(group.clone(), rank));
                    if gone.is_some_and(|(record, _)| record.spec.recoverable) {
                        noticed.changed.insert(group);
                    }
                }
                SessionChange::Alive { group, rank, alive } => match alive {
                    true => {
                        self.alive.insert((group, rank));
                    }
                    false => {
                        self.alive.remove(&(group.clone(), rank));
                        lost.push((group, rank));
                    }
                },
                SessionChange::Failure {
                    group,
                    failure: Some(failure),
                } => {
                    if self.failures.get(&group) != Some(&failure) {
                        noticed.failed.push(failure.clone());
                    }
                    self.failures.insert(group, failure);
                }
                SessionChange::Failure { group, .. } => {
                    self.failures.remove(&group);
                }
            }
        }
        // A liveness key gone while its record stays: the lease ran out (a
        // session that ends loses both in one transaction).
        for place in lost {
            if self.alive.contains(&place) {
                continue;
            }
            if let Some(member) = self.members.get(&place) {
                noticed.expired.push(member.clone());
            }
        }
        noticed
    }
}

/// The sessions this server holds in etcd, by the core's session ids.
#[derive(Debug, Default)]
pub(super) struct HeldSessions {
    held: HashMap<SessionId, HeldSession>,
    /// Being opened (or resumed) in etcd.
    opening: HashSet<SessionId>,
    /// Ended (None: closed) while being opened: ended once open.
    ended_while_opening: HashMap<SessionId, Option<Failure>>,
}

/// What to do with a session the core ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Ending {
    /// End it in etcd now.
    Now(HeldSession),
    /// Once its open completes.
    Later,
    /// Nothing: it was never opened in etcd (its open failed).
    Nothing,
}

impl HeldSessions {
    /// Session `id` is being opened.
    pub(super) fn opening(&mut self, id: SessionId) {
        self.opening.insert(id);
    }

    /// The open of session `id` completed (`held`: it succeeded); the
    /// session to end now if it ended meanwhile, and how.
    pub(super) fn opened(
        &mut self,
        id: SessionId,
        held: Option<HeldSession>,
    ) -> Option<(HeldSession, Option<Failure>)> {
        self.opening.remove(&id);
        let ended = self.ended_while_opening.remove(&id);
        let held = held?;
        match ended {
            Some(failure) => Some((held, failure)),
            None => {
                self.held.insert(id, held);
                None
            }
        }
    }

    /// The core ended session `id` (`failure`: how, None: closed).
    pub(super) fn end(&mut self, id: SessionId, failure: Option<Failure>) -> Ending {
        if let Some(held) = self.held.remove(&id) {
            return Ending::Now(held);
        }
        if self.opening.contains(&id) {
            self.ended_while_opening.insert(id, failure);
            return Ending::Later;
        }
        Ending::Nothing
    }

    /// The lease of session `id`, if held here.
    pub(super) fn lease_of(&self, id: SessionId) -> Option<i64> {
        self.held.get(&id).map(|held| held.lease)
    }

    /// The leases to keep alive.
    pub(super) fn leases(&self) -> Vec<i64> {
        self.held.values().map(|held| held.lease).collect()
    }
}

#[cfg(test)]
mod tests;
