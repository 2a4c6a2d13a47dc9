//! An EtcdStore handle's own liveness session (docs/liveness.md, "On
//! etcd"), for programs that use etcd without a front-end: the session is
//! an etcd lease this process renews (from one process-wide thread, for
//! every handle), kept in the same records as the front-ends' sessions
//! (`super::sessions`), so both kinds of member may share a group.
//!
//! There is no server connection to break, so a member is failed when its
//! lease runs out (its TTL: a crash, a freeze or a partition alike), when
//! it reports an error, or when a newer incarnation of its rank opens. The
//! members told are those blocked in a call (their watch also watches the
//! group's failure record and its members' liveness keys, and the first to
//! see a lease run out records the failure) and, within a renewal period,
//! every member through its renewals, which read the group's failure.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::client::{Client, Event, Op, Read, Resend, WatchEnd, Watched};
use super::sessions::{failure_error, HeldSession, MemberRecord};
use super::EtcdStore;
use crate::error::{Error, Result, Status};
use crate::printable::printable;
use crate::runtime::fork::PerProcess;
use crate::store::tcp::failure::{Cause, Failure};
use crate::store::tcp::protocol::SessionSpec;
use crate::store::tcp::SessionOptions;

/// The shortest lease an EtcdStore session gets: etcd's own minimum with
/// its default election timeout.
const MIN_LEASE_TTL: Duration = Duration::from_secs(2);

/// The lease of a session without a TTL.
const LEASE_TTL_WITHOUT_TTL: Duration = Duration::from_secs(10);

/// How often the renewal thread looks for renewals due.
const RENEWAL_TICK: Duration = Duration::from_millis(100);

/// A handle's session, shared with its leased views.
pub(super) type SessionSlot = Arc<Mutex<Option<Session>>>;

/// An open session of a handle.
pub(super) struct Session {
    held: HeldSession,
    /// What it was opened with (who it is, for a report of its own).
    spec: SessionSpec,
    /// The group's failure (or this session's end), once seen: every
    /// later call fails with it.
    failure: Option<Error>,
    /// Renewed while this lives.
    _renewal: Arc<Renewal>,
}

/// A lease the renewal thread keeps alive, and the group whose failure
/// its renewals look for.
struct Renewal {
    client: Arc<Client>,
    lease: i64,
    every: Duration,
    next: Mutex<Instant>,
    failure_key: Vec<u8>,
    group: Vec<u8>,
    session: Weak<Mutex<Option<Session>>>,
}

/// Every renewal of the process, renewed by one thread of its own (a
/// child process after fork() starts its own: see `runtime::fork`).
type Renewals = Arc<Mutex<Vec<Weak<Renewal>>>>;

static RENEWALS: PerProcess<Renewals> = PerProcess::new();

/// This process's renewals, its renewal thread started on first use.
fn renewals() -> Result<&'static Renewals> {
    RENEWALS
        .get_or_try_init(|| {
            let renewals = Renewals::default();
            let renewed = renewals.clone();
            std::thread::Builder::new()
                .name("dc-etcd-renew".into())
                .spawn(move || renew_forever(&renewed))
                .map_err(|e| e.to_string())?;
            Ok(renewals)
        })
        .map_err(|e| Error::internal(format!("starting the etcd lease renewal thread: {e}")))
}

fn renew_forever(renewals: &Mutex<Vec<Weak<Renewal>>>) {
    loop {
        std::thread::sleep(RENEWAL_TICK);
        let due: Vec<Arc<Renewal>> = {
            let mut renewals = renewals.lock();
            renewals.retain(|r| r.strong_count() > 0);
            let now = Instant::now();
            renewals
                .iter()
                .filter_map(Weak::upgrade)
                .filter(|r| *r.next.lock() <= now)
                .collect()
        };
        for renewal in due {
            renewal.renew();
        }
    }
}

impl Renewal {
    /// Renews the lease within its period, and reads the group's failure:
    /// a lease gone, or a failure recorded, is the session's error.
    fn renew(&self) {
        *self.next.lock() = Instant::now() + self.every;
        let deadline = Instant::now() + self.every;
        let ended = match self.client.lease_keep_alive(&[self.lease], deadline, self.every / 2) {
            Ok(gone) if !gone.is_empty() => Some(Error::new(
                Status::PeerFailed,
                format!(
                    "this process's session in group '{}' ended: its etcd lease ran out (the process \
                     was frozen or cut off from etcd for longer than its TTL)",
                    printable(&self.group)
                ),
            )),
            Ok(_) => self.recorded_failure(deadline),
            Err(e) => {
                log::warn!("etcd sessions: renewing a lease: {}", e.message());
                None
            }
        };
        if let (Some(error), Some(session)) = (ended, self.session.upgrade()) {
            if let Some(session) = session.lock().as_mut() {
                session.failure.get_or_insert(error);
            }
        }
    }

    fn recorded_failure(&self, deadline: Instant) -> Option<Error> {
        let range = self
            .client
            .range(&self.failure_key, false, Read::Values, deadline);
        let kv = range.ok()?.kvs.into_iter().next()?;
        Some(failure_error(&self.group, &kv.value))
    }
}

/// What a watch in a session saw first.
enum Seen {
    /// A write to one of the caller's keys.
    Put(super::client::Kv),
    /// The group's failure.
    Failed(Error),
    /// A member's liveness key went (at this revision): perhaps its lease
    /// ran out.
    Lost { key: Vec<u8>, revision: i64 },
}

impl EtcdStore {
    /// Opens a liveness session of this process on the handle
    /// (docs/liveness.md, "On etcd"): an etcd lease of the session's TTL
    /// (at least 2 s, whole seconds; 10 s without one) that a process-wide
    /// thread renews three times a TTL. From then on, when another member
    /// of the group fails — its lease runs out (a crash, a freeze, a
    /// partition), it reports an error, a newer incarnation of its rank
    /// opens — this handle's blocked calls fail at once with
    /// [`Status::PeerFailed`] naming it, and its later calls too (within a
    /// renewal period). Members on `distcore serve --backend etcd`
    /// front-ends of the same prefix share the group. InvalidState if the
    /// handle has a session, or the rank is live with an incarnation not
    /// older; PeerFailed if the group has failed; NotSupported for a
    /// recoverable group (a front-end's members may open one).
    pub fn open_session(&self, options: &SessionOptions) -> Result<()> {
        let spec = options.checked_spec()?;
        if spec.recoverable {
            return Err(Error::not_supported(
                "a recoverable group on the EtcdStore itself (with no front-end watching, nobody \
                 would notice its members' leases run out): open it through a `distcore serve \
                 --backend etcd` front-end",
            ));
        }
        if self.session.lock().is_some() {
            return Err(Error::new(
                Status::InvalidState,
                "this handle has a session already: close it first",
            ));
        }
        let ttl = spec.ttl.unwrap_or(LEASE_TTL_WITHOUT_TTL).max(MIN_LEASE_TTL);
        let renewals = renewals()?;
        let held = self.open_member(&spec, ttl)?;
        let renewal = Arc::new(Renewal {
            client: self.client.clone(),
            lease: held.lease,
            every: Duration::from_secs(ttl.as_secs().max(1)) / 3,
            next: Mutex::new(Instant::now()),
            failure_key: self.failure_key(&spec.group),
            group: spec.group.clone(),
            session: Arc::downgrade(&self.session),
        });
        renewals.lock().push(Arc::downgrade(&renewal));
        *self.session.lock() = Some(Session {
            held,
            spec,
            failure: None,
            _renewal: renewal,
        });
        Ok(())
    }

    /// Closes the handle's session gracefully: its keys deleted, its lease
    /// revoked (the keys leased to it go), the group not failed.
    /// InvalidState if it has none. A session that ended already (its
    /// lease ran out) is only forgotten.
    pub fn close_session(&self) -> Result<()> {
        self.end_own(None)
    }

    /// Ends the handle's session with this process's own error: the
    /// group fails with `message`, naming this rank. InvalidState if it
    /// has no session.
    pub fn report_error(&self, message: &str) -> Result<()> {
        self.end_own(Some(message))
    }

    /// A view of this handle whose writes (set, add, compare_set, append,
    /// multi_set, queue_push) put the keys they write on the session's
    /// etcd lease: they go when the session ends, however it ends. Shares
    /// the handle's session. InvalidState without one.
    pub fn leased(&self) -> Result<EtcdStore> {
        let lease = match &*self.session.lock() {
            Some(session) => session.held.lease,
            None => {
                return Err(Error::new(
                    Status::InvalidState,
                    "this handle has no session: a leased write needs one (open_session first)",
                ))
            }
        };
        Ok(self.with_lease(lease))
    }

    fn end_own(&self, report: Option<&str>) -> Result<()> {
        let Some(session) = self.session.lock().take() else {
            return Err(Error::new(
                Status::InvalidState,
                "this handle has no session",
            ));
        };
        if session.failure.is_some() && report.is_none() {
            return Ok(()); // ended already
        }
        let failure = report.map(|message| Failure {
            group: session.spec.group.clone(),
            rank: session.spec.rank,
            host: session.spec.host.clone(),
            pid: session.spec.pid,
            incarnation: session.spec.incarnation,
            cause: Cause::Reported(message.to_string()),
            silent_for: Some(Duration::ZERO),
        });
        self.end_and_revoke(&session.held, failure.as_ref())
            .map(drop)
    }

    /// The error every call of a handle in a failed group fails with.
    pub(super) fn check_session(&self) -> Result<()> {
        match self.session.lock().as_ref().and_then(|s| s.failure.clone()) {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Watches `ranges` from `start` for a put, as
    /// [`Client::watch_first_put`] does; in a session, also for the
    /// group's failure (an error) and for members whose lease runs out
    /// (their failure recorded here if no one has).
    pub(super) fn watch_for_put(
        &self,
        ranges: &[(Vec<u8>, bool)],
        start: i64,
        deadline: Instant,
    ) -> Result<Watched> {
        let group = self.session.lock().as_ref().map(|s| s.held.group.clone());
        let Some(group) = group else {
            return self.client.watch_first_put(ranges, start, deadline);
        };
        let failure_key = self.failure_key(&group);
        let alive = self.alive_prefix(&group);
        let mut watched = ranges.to_vec();
        watched.push((failure_key.clone(), false));
        watched.push((alive.clone(), true));
        let revision = self.failed_before(&group, &failure_key, &alive, deadline)?;
        let mut next = start.min(revision + 1);
        // Liveness keys seen gone (key, revision): a watch started again
        // at that revision (another range's events of it may follow)
        // skips them.
        let mut lost: Vec<(Vec<u8>, i64)> = Vec::new();
        loop {
            let mut seen = None;
            let end = self
                .client
                .watch(&watched, next, true, deadline, |events| {
                    let mut events = events.into_iter();
                    seen = events.find_map(|event| {
                        let seen = classify(event, &group, &failure_key, &alive);
                        match &seen {
                            Some(Seen::Lost { key, revision })
                                if lost.iter().any(|(k, r)| k == key && r == revision) =>
                            {
                                None
                            }
                            _ => seen,
                        }
                    });
                    seen.is_none()
                })?;
            match seen {
                Some(Seen::Put(kv)) => return Ok(Watched::Put(kv)),
                Some(Seen::Failed(error)) => {
                    self.note_failure(&error);
                    return Err(error);
                }
                Some(Seen::Lost { key, revision }) => {
                    if let Some(rank) = rank_under(&key, &alive) {
                        self.lease_ran_out(&group, rank)?;
                    }
                    lost.push((key, revision));
                    next = revision;
                }
                None => {
                    return Ok(match end {
                        WatchEnd::Canceled => Watched::Canceled,
                        WatchEnd::Stopped | WatchEnd::Deadline => Watched::Deadline,
                    })
                }
            }
        }
    }

    /// Before a watch in a session: the group's failure if it has one, and
    /// the failures of members whose lease ran out while nobody watched
    /// (their record without its liveness key: recorded here, then the
    /// group's failure). Else the revision it read at. Counts first: the
    /// keys are read only when records outnumber liveness keys.
    fn failed_before(
        &self,
        group: &[u8],
        failure_key: &[u8],
        alive: &[u8],
        deadline: Instant,
    ) -> Result<i64> {
        let members = self.members_prefix(group);
        let reads = |read| {
            [
                Op::Range {
                    key: failure_key.to_vec(),
                    prefix: false,
                    read: Read::Values,
                },
                Op::Range {
                    key: members.clone(),
                    prefix: true,
                    read,
                },
                Op::Range {
                    key: alive.to_vec(),
                    prefix: true,
                    read,
                },
            ]
        };
        // Counts; if need be, the keys (and the expiries recorded); then
        // counts once more, at most: a record that cannot be ended (a
        // malformed one) does not hold the call.
        let mut revision = 0;
        for read in [Read::Count, Read::Keys, Read::Count] {
            let result = self
                .client
                .txn(&[], &reads(read), &[], Resend::Safe, deadline)?;
            let [failure, members_now, alive_now] = &result.ranges[..] else {
                return Err(Error::new(
                    Status::Protocol,
                    "etcd answered a transaction of three reads with fewer",
                ));
            };
            if let Some(kv) = failure.kvs.first() {
                return Err(self.group_failed(group, &kv.value));
            }
            revision = result.revision;
            if members_now.count <= alive_now.count {
                break;
            }
            if read == Read::Keys {
                let living: std::collections::HashSet<u32> = alive_now
                    .kvs
                    .iter()
                    .filter_map(|kv| rank_under(&kv.key, alive))
                    .collect();
                let ranks = members_now.kvs.iter();
                let ranks = ranks.filter_map(|kv| rank_under(&kv.key, &members));
                for rank in ranks.filter(|rank| !living.contains(rank)) {
                    self.lease_ran_out(group, rank)?;
                }
            }
        }
        Ok(revision)
    }

    /// The error of `group`'s failure in `record`, remembered.
    fn group_failed(&self, group: &[u8], record: &[u8]) -> Error {
        let error = failure_error(group, record);
        self.note_failure(&error);
        error
    }

    fn note_failure(&self, error: &Error) {
        if let Some(session) = self.session.lock().as_mut() {
            session.failure.get_or_insert_with(|| error.clone());
        }
    }

    /// The liveness key of rank `rank` of `group` went: if its member
    /// record stays, its lease ran out, and its failure is recorded (once,
    /// whoever comes first).
    fn lease_ran_out(&self, group: &[u8], rank: u32) -> Result<()> {
        let member_key = self.member_key(group, rank);
        let range = self
            .client
            .range(&member_key, false, Read::Values, self.deadline(None))?;
        let Some(kv) = range.kvs.first() else {
            return Ok(()); // it ended: closed, or its failure recorded
        };
        match MemberRecord::decode(&kv.value) {
            Some(record) => self.record_expiry(&record, kv.mod_revision),
            None => Ok(()),
        }
    }
}

/// The rank a key under `prefix` (a group's member records or liveness
/// keys) names.
fn rank_under(key: &[u8], prefix: &[u8]) -> Option<u32> {
    std::str::from_utf8(key.strip_prefix(prefix)?)
        .ok()?
        .parse()
        .ok()
}

/// What `event` is to a watch in a session, if anything.
fn classify(event: Event, group: &[u8], failure_key: &[u8], alive: &[u8]) -> Option<Seen> {
    if event.kv.key == failure_key {
        return (!event.deleted).then(|| Seen::Failed(failure_error(group, &event.kv.value)));
    }
    if event.kv.key.starts_with(alive) {
        return event.deleted.then_some(Seen::Lost {
            revision: event.kv.mod_revision,
            key: event.kv.key,
        });
    }
    (!event.deleted).then_some(Seen::Put(event.kv))
}
