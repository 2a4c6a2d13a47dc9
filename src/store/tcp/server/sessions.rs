//! Liveness sessions (docs/liveness.md), socket-free, time passed in: which
//! processes are members of which group (a job), on which connections,
//! when each was last heard from, and which groups have lost a member.
//!
//! A session is opened on a connection by one process: a rank of a group,
//! with its incarnation (new for every process start), host, pid and an
//! optional TTL. Its other connections (the client's spares, which carry
//! its waits) attach to it. It ends:
//! - gracefully, when it is closed: never a failure;
//! - when the connection it was opened on is lost (a crash, at once);
//! - when nothing arrives from it within its TTL (a frozen or cut-off
//!   process), judged against the server's own progress: after a turn
//!   of the event loop that came late (a stalled or starved server) every
//!   session has its whole TTL again, so the server never blames a member
//!   for its own silence;
//! - when the process reports an error of its own;
//! - when a newer incarnation of the same rank opens (fenced).
//!
//! A session may hold keys ([`leases`]): written through it, they are
//! deleted when it ends, however it ends.
//!
//! Groups share fate: the first failure of a member fails the group, and
//! the core tells every other member's connections (their blocked calls
//! fail at once with [`Status::PeerFailed`], naming who and why); later
//! calls fail the same way. The failure is forgotten when the group has no
//! member left, so the job's next run starts clean.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use super::state::ConnId;
use crate::error::{Error, Status};
use crate::printable::printable;
use crate::store::tcp::failure::{Cause, Failure};
use crate::store::tcp::listing::{GroupFailure, GroupMembers, Member, SessionInfo, SessionListing};
use crate::store::tcp::protocol::{Key, SessionSpec};

mod leases;

use leases::Leases;

/// Identifies a session for the server's lifetime (what attaching names).
pub(crate) type SessionId = u64;

/// How late a turn of the server's event loop may come (after the
/// deadline it slept until) before the delay is the server's own stall,
/// which moves every session's deadline.
pub(crate) const STALL_GRACE: Duration = Duration::from_millis(100);

/// A failure the core must deliver, now: to `tell` (every other member's
/// connections), and by closing `close` (the failed member's own that are
/// still open, so that its process learns its session is over).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Delivery {
    /// The session of this server's that failed (0: none here).
    pub(crate) session: SessionId,
    pub(crate) failure: Failure,
    /// It fails its group: a fate-sharing group's first failure (the one
    /// its members are told).
    pub(crate) first: bool,
    /// It is news: the group's first failure, or any in a recoverable
    /// group (whose membership it changes).
    pub(crate) news: bool,
    pub(crate) tell: Vec<ConnId>,
    pub(crate) close: Vec<ConnId>,
}

/// One open session.
#[derive(Debug)]
struct Live {
    spec: SessionSpec,
    /// The connection it was opened on: losing it ends the session.
    conn: ConnId,
    /// Its other connections.
    attached: Vec<ConnId>,
    /// When it was last heard from as of its opening, its last attach, a
    /// connection of its leaving, or a stall: its connections' own later
    /// times are in [`Sessions::by_conn`] ([`Sessions::last_heard`]).
    heard: Instant,
}

impl Live {
    fn conns(&self) -> impl Iterator<Item = ConnId> + '_ {
        std::iter::once(self.conn).chain(self.attached.iter().copied())
    }
}

/// A connection of a session: which, and when something last arrived on
/// it.
#[derive(Debug, Clone, Copy)]
struct Membership {
    session: SessionId,
    heard: Instant,
    /// The session was opened on it (else attached).
    opener: bool,
}

/// A group with live sessions.
#[derive(Debug, Default)]
struct Group {
    members: BTreeSet<SessionId>,
    /// A member's failure changes the membership rather than failing the
    /// group.
    recoverable: bool,
    /// The last epoch of its membership published.
    epoch: u64,
}

/// A recoverable group's membership to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MembershipChange {
    /// Its members now.
    Now {
        group: Vec<u8>,
        members: GroupMembers,
    },
    /// It has no member left.
    Gone { group: Vec<u8> },
}

/// Every session of a server, and the groups that failed.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    live: HashMap<SessionId, Live>,
    /// The session of each (group, rank).
    by_rank: HashMap<(Vec<u8>, u32), SessionId>,
    /// The session each connection belongs to (opened on it, or attached),
    /// by connection id (dense, as the core's are): hearing from a member,
    /// which every request does, is one store, no lookup.
    by_conn: Vec<Option<Membership>>,
    /// The live sessions of each group.
    groups: HashMap<Vec<u8>, Group>,
    /// Recoverable groups whose membership changed since it was last
    /// published.
    changed: BTreeSet<Vec<u8>>,
    /// TTL deadlines, soonest first, as they were when pushed: a session
    /// heard from since has a later one (checked, and pushed again, when
    /// this one comes due); one that ended has none. At most one entry per
    /// live session, so the heap's cost is per deadline that comes due,
    /// never per request or per turn.
    deadlines: BinaryHeap<Reverse<(Instant, SessionId)>>,
    /// Sessions whose deadline came due this turn, taken off the heap
    /// until [`Sessions::expire`] ends them (or finds them heard from).
    expiring: Vec<SessionId>,
    /// The first failure of each group that has one.
    failed: HashMap<Vec<u8>, Failure>,
    /// The keys each session holds.
    leases: Leases,
    /// Keys of sessions that ended, for the core to delete.
    orphans: Vec<Key>,
    /// The last id given (the first is random: a client attaching with
    /// the id of a session of an earlier server on the same address —
    /// restarted, or replaced by another server of an etcd store — must
    /// not find another session of this one's).
    next_id: SessionId,
    /// The soonest deadline when the event loop last asked: it sleeps
    /// until then at the latest.
    wake_by: Option<Instant>,
    /// Failures are decided elsewhere (a server on etcd, one of several):
    /// a member's failure here is only published ([`Delivery`] with no one
    /// to tell), and each group's first failure, wherever it was decided,
    /// comes back through [`Sessions::group_failed`]; recoverable groups'
    /// memberships are published there too, not by [`Sessions::take_changes`].
    decided_elsewhere: bool,
}

impl Sessions {
    /// Sessions whose groups' failures are decided elsewhere (see
    /// `decided_elsewhere`).
    pub(crate) fn decided_elsewhere() -> Sessions {
        Sessions {
            decided_elsewhere: true,
            ..Sessions::default()
        }
    }

    /// A turn of the event loop begins at `now`: a turn later than the
    /// deadline it slept until, by more than [`STALL_GRACE`], means the
    /// server stalled (stopped, or starved of CPU) and could not hear its
    /// members meanwhile, so every session gets its whole TTL again from
    /// `now`, as etcd extends every lease after a leader change. Call
    /// before reading the turn's input.
    pub(crate) fn turn(&mut self, now: Instant) {
        let Some(wake_by) = self.wake_by.take() else {
            return;
        };
        if now.saturating_duration_since(wake_by) > STALL_GRACE {
            for live in self.live.values_mut() {
                live.heard = live.heard.max(now);
            }
        }
    }

    /// Opens a session on connection `conn` at `now`. Refused when the
    /// connection belongs to a session already, when the group has failed
    /// (the failure's error), or when the rank is live with a newer or the
    /// same incarnation. A rank live with an older incarnation is fenced:
    /// that fails the group, which refuses this session too; the
    /// delivery is returned either way.
    pub(crate) fn open(
        &mut self,
        conn: ConnId,
        spec: SessionSpec,
        now: Instant,
    ) -> (Result<SessionId, Error>, Option<Delivery>) {
        if self.is_member(conn) {
            let e = Error::new(
                Status::InvalidState,
                "this connection belongs to a session already",
            );
            return (Err(e), None);
        }
        // A group whose last member left (its end not yet published) takes
        // whichever mode its next member says.
        if let Some(group) = self.groups.get(&spec.group) {
            if !group.members.is_empty() && group.recoverable != spec.recoverable {
                let e = Error::new(
                    Status::InvalidState,
                    format!(
                        "group '{}' is {}: every member must open its session so",
                        printable(&spec.group),
                        match group.recoverable {
                            true => "recoverable",
                            false => "fate-sharing (not recoverable)",
                        }
                    ),
                );
                return (Err(e), None);
            }
        }
        let rank_key = (spec.group.clone(), spec.rank);
        let mut delivery = None;
        if let Some(&old) = self.by_rank.get(&rank_key) {
            let incarnation = self.live[&old].spec.incarnation;
            if incarnation >= spec.incarnation {
                let e = Error::new(
                    Status::InvalidState,
                    format!(
                        "rank {} of group '{}' is live with incarnation {incarnation}, not older than {}",
                        spec.rank,
                        printable(&spec.group),
                        spec.incarnation
                    ),
                );
                return (Err(e), None);
            }
            let by = spec.incarnation;
            delivery = self.end(old, Some(Cause::Fenced { by }), now);
        }
        if let Some(failure) = self.failed.get(&spec.group) {
            return (Err(failure.error()), delivery);
        }
        if self.next_id == 0 {
            self.next_id = fastrand::u64(1..u64::MAX / 2);
        }
        self.next_id += 1;
        let id = self.next_id;
        self.by_rank.insert(rank_key, id);
        self.join(conn, id, now, true);
        let group = self.groups.entry(spec.group.clone()).or_default();
        group.members.insert(id);
        group.recoverable = spec.recoverable;
        if spec.recoverable && !self.decided_elsewhere {
            self.changed.insert(spec.group.clone());
        }
        let live = Live {
            spec,
            conn,
            attached: Vec::new(),
            heard: now,
        };
        if let Some(deadline) = self.deadline(&live) {
            self.deadlines.push(Reverse((deadline, id)));
        }
        self.live.insert(id, live);
        (Ok(id), delivery)
    }

    /// Attaches connection `conn` to session `id`: its calls are the
    /// member's (failed with its group), and it keeps the session alive,
    /// but losing it does not end the session.
    pub(crate) fn attach(
        &mut self,
        conn: ConnId,
        id: SessionId,
        now: Instant,
    ) -> Result<(), Error> {
        if self.is_member(conn) {
            return Err(Error::new(
                Status::InvalidState,
                "this connection belongs to a session already",
            ));
        }
        let Some(live) = self.live.get_mut(&id) else {
            return Err(Error::new(
                Status::InvalidState,
                format!("no session {id} (it ended)"),
            ));
        };
        live.attached.push(conn);
        live.heard = now;
        self.join(conn, id, now, false);
        Ok(())
    }

    /// Something arrived at `now` on connection `conn`: if it belongs to
    /// a session, the member is alive.
    pub(crate) fn heard(&mut self, conn: ConnId, now: Instant) {
        // Every request of every connection comes here: a store.
        if let Some(Some(membership)) = self.by_conn.get_mut(conn) {
            membership.heard = now;
        }
    }

    /// Connection `conn` belongs to session `id` from `now` (opened on it,
    /// or attached).
    fn join(&mut self, conn: ConnId, id: SessionId, now: Instant, opener: bool) {
        if self.by_conn.len() <= conn {
            self.by_conn.resize(conn + 1, None);
        }
        self.by_conn[conn] = Some(Membership {
            session: id,
            heard: now,
            opener,
        });
    }

    /// When session `live` was last heard from, on any of its connections.
    fn last_heard(&self, live: &Live) -> Instant {
        let conns = live
            .conns()
            .filter_map(|conn| self.by_conn.get(conn)?.as_ref());
        conns.map(|m| m.heard).fold(live.heard, Instant::max)
    }

    /// When session `live`'s TTL runs out, if it has one.
    fn deadline(&self, live: &Live) -> Option<Instant> {
        live.spec.ttl.map(|ttl| self.last_heard(live) + ttl)
    }

    /// Closes the session of connection `conn` gracefully (its own or an
    /// attached connection). Refused if it has none.
    pub(crate) fn close(&mut self, conn: ConnId, now: Instant) -> Result<(), Error> {
        let id = self.session_of(conn)?;
        let none = self.end(id, None, now);
        debug_assert!(none.is_none());
        Ok(())
    }

    /// The process of connection `conn`'s session reported `message`: its
    /// session ends with that error, failing the group.
    pub(crate) fn report(
        &mut self,
        conn: ConnId,
        message: String,
        now: Instant,
    ) -> Result<Option<Delivery>, Error> {
        let id = self.session_of(conn)?;
        Ok(self.end(id, Some(Cause::Reported(message)), now))
    }

    /// Connection `conn` is gone: the end of its session if it was the one
    /// the session was opened on, else only a detach.
    pub(crate) fn disconnect(&mut self, conn: ConnId, now: Instant) -> Option<Delivery> {
        let id = self.session_id(conn)?;
        let live = self.live.get_mut(&id)?;
        if live.conn == conn {
            return self.end(id, Some(Cause::ConnectionLost), now);
        }
        live.attached.retain(|c| *c != conn);
        // What was heard on it still counts.
        if let Some(left) = self.by_conn[conn].take() {
            live.heard = live.heard.max(left.heard);
        }
        None
    }

    /// The connections of the sessions whose TTL has passed at `now`, to
    /// look at before [`Sessions::expire`]: one with input not read yet
    /// (a turn reads a bounded batch) was heard from.
    pub(crate) fn due(&mut self, now: Instant) -> Vec<ConnId> {
        self.take_due(now);
        let expiring = self.expiring.iter().filter_map(|id| self.live.get(id));
        expiring.flat_map(Live::conns).collect()
    }

    /// Takes the deadlines that came due by `now` out of the heap: a
    /// session heard from since gets its later one back, the others wait
    /// in `expiring` for [`Sessions::expire`]. A heap operation per
    /// deadline that came due, nothing while none has.
    fn take_due(&mut self, now: Instant) {
        while let Some(&Reverse((at, id))) = self.deadlines.peek() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            match self.live.get(&id).and_then(|live| self.deadline(live)) {
                Some(deadline) if deadline <= now => self.expiring.push(id),
                Some(deadline) => self.deadlines.push(Reverse((deadline, id))),
                None => {} // it ended
            }
        }
    }

    /// Ends every session whose TTL has passed at `now`; call after the
    /// turn's input was read. Looks only at the deadlines that came due.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<Delivery> {
        self.take_due(now);
        let mut deliveries = Vec::new();
        for id in std::mem::take(&mut self.expiring) {
            let Some(live) = self.live.get(&id) else {
                continue; // it ended
            };
            match (self.deadline(live), live.spec.ttl) {
                (Some(deadline), Some(ttl)) if deadline <= now => {
                    deliveries.extend(self.end(id, Some(Cause::TtlMissed(ttl)), now));
                }
                // Heard from since it came due (input it had not read).
                (Some(deadline), _) => self.deadlines.push(Reverse((deadline, id))),
                _ => {}
            }
        }
        self.wake_by = self.next_deadline();
        deliveries
    }

    /// The soonest TTL deadline (perhaps one that has moved since: the
    /// event loop then wakes early, once).
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((due, _))| *due)
    }

    /// The failure that connection `conn`'s calls fail with: its group's,
    /// if the connection belongs to a member of a failed group.
    pub(crate) fn failure_for(&self, conn: ConnId) -> Option<&Failure> {
        if self.failed.is_empty() {
            return None;
        }
        let live = self.live.get(&self.session_id(conn)?)?;
        self.failed.get(&live.spec.group)
    }

    /// The live sessions of the groups starting with `prefix` and their
    /// failures, at `now`; `waiting_on` gives the keys a connection's
    /// blocked calls wait on.
    pub(crate) fn list<'k>(
        &self,
        prefix: &[u8],
        now: Instant,
        waiting_on: impl Fn(ConnId) -> Vec<&'k [u8]>,
    ) -> SessionListing {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let mut sessions: Vec<SessionInfo> = self
            .live
            .values()
            .filter(|live| live.spec.group.starts_with(prefix))
            .map(|live| SessionInfo {
                group: text(&live.spec.group),
                rank: live.spec.rank,
                world_size: live.spec.world_size,
                incarnation: live.spec.incarnation,
                host: live.spec.host.clone(),
                pid: live.spec.pid,
                silent_for: now.saturating_duration_since(self.last_heard(live)),
                waiting_on: live
                    .conns()
                    .flat_map(&waiting_on)
                    .take(SessionListing::MAX_WAITING)
                    .map(text)
                    .collect(),
            })
            .collect();
        sessions.sort_by(|a, b| (&a.group, a.rank).cmp(&(&b.group, b.rank)));
        let mut failures: Vec<GroupFailure> = self
            .failed
            .iter()
            .filter(|(group, _)| group.starts_with(prefix))
            .map(|(group, failure)| GroupFailure {
                group: text(group),
                message: failure.error().message().to_string(),
            })
            .collect();
        failures.sort_by(|a, b| a.group.cmp(&b.group));
        SessionListing {
            sessions,
            failures,
            truncated: false,
        }
    }

    /// Whether connection `conn` is the one a session was opened on.
    pub(crate) fn is_opener(&self, conn: ConnId) -> bool {
        matches!(self.by_conn.get(conn), Some(Some(m)) if m.opener)
    }

    /// Whether connection `conn` belongs to a session.
    pub(crate) fn is_member(&self, conn: ConnId) -> bool {
        self.session_id(conn).is_some()
    }

    /// The session that a leased write on connection `conn` ties its keys
    /// to: refused if the connection belongs to none.
    pub(crate) fn lessee(&self, conn: ConnId) -> Result<SessionId, Error> {
        self.session_id(conn).ok_or_else(|| {
            Error::new(
                Status::InvalidState,
                "a leased write from a connection in no session (open a session first)",
            )
        })
    }

    /// Ties `key`, just written through session `id`, to it; if the
    /// session ended meanwhile, the key is an orphan at once.
    pub(crate) fn tie(&mut self, id: SessionId, key: &[u8]) {
        match self.live.contains_key(&id) {
            true => self.leases.tie(key, id),
            false => self.orphans.push(key.to_vec()),
        }
    }

    /// Whether any session holds a key.
    pub(crate) fn holds_keys(&self) -> bool {
        !self.leases.is_empty()
    }

    /// `key` was written without a lease, or deleted: no session holds it.
    pub(crate) fn untie(&mut self, key: &[u8]) {
        self.leases.untie(key);
    }

    /// The keys starting with `prefix` were deleted.
    pub(crate) fn untie_prefix(&mut self, prefix: &[u8]) {
        self.leases.untie_prefix(prefix);
    }

    /// The memberships of the recoverable groups that changed since the
    /// last call, each a new epoch: the core publishes them.
    pub(crate) fn take_changes(&mut self) -> Vec<MembershipChange> {
        let changed = std::mem::take(&mut self.changed);
        let mut changes = Vec::with_capacity(changed.len());
        for name in changed {
            let Some(group) = self.groups.get_mut(&name) else {
                continue;
            };
            if group.members.is_empty() || !group.recoverable {
                // Gone, or now fate-sharing: no membership to show.
                if group.members.is_empty() {
                    self.groups.remove(&name);
                }
                changes.push(MembershipChange::Gone { group: name });
                continue;
            }
            group.epoch += 1;
            let epoch = group.epoch;
            let mut members: Vec<Member> = group
                .members
                .iter()
                .filter_map(|id| self.live.get(id))
                .map(|live| Member {
                    rank: live.spec.rank,
                    incarnation: live.spec.incarnation,
                    pid: live.spec.pid,
                    host: live.spec.host.clone(),
                })
                .collect();
            members.sort_by_key(|m| m.rank);
            changes.push(MembershipChange::Now {
                group: name,
                members: GroupMembers { epoch, members },
            });
        }
        changes
    }

    /// The keys of the sessions that ended since the last call: the core
    /// deletes them.
    pub(crate) fn take_orphans(&mut self) -> Vec<Key> {
        std::mem::take(&mut self.orphans)
    }

    /// The first failure of `failure.group`, decided elsewhere (or here,
    /// and published), reported once: the delivery to its members here.
    /// The failed member's session, if it lives here (fenced, or its lease
    /// ran out while this server could not renew it), ends, and its
    /// connections close. With no member here it is still the group's
    /// first failure, for a server that serves one job (its clients
    /// without a session); None when the group was told already.
    pub(crate) fn group_failed(&mut self, failure: Failure, now: Instant) -> Option<Delivery> {
        if self.failed.contains_key(&failure.group) {
            return None;
        }
        let rank_key = (failure.group.clone(), failure.rank);
        let failed_here = self.by_rank.get(&rank_key).copied().filter(|id| {
            self.live
                .get(id)
                .is_some_and(|live| live.spec.incarnation == failure.incarnation)
        });
        let (session, close) = match failed_here.and_then(|id| Some((id, self.live.get(&id)?))) {
            Some((id, live)) => (id, live.conns().collect()),
            None => (0, Vec::new()),
        };
        if failed_here.is_some() {
            self.end(session, None, now);
        }
        let members = self.groups.get(&failure.group);
        let members = members.filter(|g| !g.recoverable && !g.members.is_empty());
        let Some(members) = members else {
            // No member here to tell; the failed member's connections
            // close, and a one-job server's clients without a session are
            // told.
            return Some(Delivery {
                session,
                failure,
                first: true,
                news: true,
                tell: Vec::new(),
                close,
            });
        };
        let tell = members
            .members
            .iter()
            .filter_map(|id| self.live.get(id))
            .flat_map(Live::conns)
            .collect();
        self.failed.insert(failure.group.clone(), failure.clone());
        Some(Delivery {
            session,
            failure,
            first: true,
            news: true,
            tell,
            close,
        })
    }

    /// Takes back session `id`, opened here but refused where failures
    /// are decided: it ends as if it had never been.
    pub(crate) fn discard(&mut self, id: SessionId, now: Instant) {
        self.end(id, None, now);
    }

    /// The session connection `conn` belongs to, if any.
    pub(crate) fn session_id(&self, conn: ConnId) -> Option<SessionId> {
        Some(self.by_conn.get(conn)?.as_ref()?.session)
    }

    fn session_of(&self, conn: ConnId) -> Result<SessionId, Error> {
        self.session_id(conn).ok_or_else(|| {
            Error::new(
                Status::InvalidState,
                "this connection belongs to no session",
            )
        })
    }

    /// Ends session `id` at `now`, for `cause` (`None`: closed). A failure
    /// fails its group if it had not failed yet (whom to tell), and closes
    /// the failed member's connections that are still open: the delivery
    /// to make.
    fn end(&mut self, id: SessionId, cause: Option<Cause>, now: Instant) -> Option<Delivery> {
        let live = self.live.remove(&id)?;
        let last_heard = self.last_heard(&live);
        self.orphans.extend(self.leases.take(id));
        let group = live.spec.group.clone();
        let (group_left, recoverable) = match self.groups.get_mut(&group) {
            Some(g) => {
                g.members.remove(&id);
                (g.members.is_empty(), g.recoverable)
            }
            None => (true, false),
        };
        if recoverable && !self.decided_elsewhere {
            // Published (and forgotten once empty) by take_changes.
            self.changed.insert(group.clone());
        } else if group_left {
            self.groups.remove(&group);
        }
        self.by_rank.remove(&(group.clone(), live.spec.rank));
        for conn in live.conns() {
            self.by_conn[conn] = None;
        }
        let delivery = cause.map(|cause| {
            // The failed member's own connections that are still open, so
            // that its process learns its session is over: all of them but
            // the one that was lost, none when it reported the error itself.
            let close = match cause {
                Cause::ConnectionLost => live.attached.clone(),
                Cause::Reported(_) => Vec::new(),
                Cause::TtlMissed(_) | Cause::Fenced { .. } | Cause::LeaseExpired(_) => {
                    live.conns().collect()
                }
            };
            let failure = Failure {
                group: group.clone(),
                rank: live.spec.rank,
                host: live.spec.host.clone(),
                pid: live.spec.pid,
                incarnation: live.spec.incarnation,
                cause,
                silent_for: Some(now.saturating_duration_since(last_heard)),
            };
            // The group's first failure is the one its members are told;
            // a recoverable group is not failed: its membership changes.
            // Decided elsewhere, the first is the one that comes back.
            let first =
                !recoverable && !self.decided_elsewhere && !self.failed.contains_key(&group);
            let tell = match !first {
                true => Vec::new(),
                false => {
                    self.failed.insert(group.clone(), failure.clone());
                    let members = self.groups.get(&group).into_iter();
                    let members = members.flat_map(|g| g.members.iter());
                    members
                        .filter_map(|id| self.live.get(id))
                        .flat_map(Live::conns)
                        .collect()
                }
            };
            Delivery {
                session: id,
                failure,
                first,
                news: first || recoverable || self.decided_elsewhere,
                tell,
                close,
            }
        });
        if group_left {
            self.failed.remove(&group);
        }
        delivery
    }
}

#[cfg(test)]
mod tests;
