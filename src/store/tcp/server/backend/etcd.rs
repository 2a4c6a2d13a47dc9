//! A server backend on etcd, for `distcore serve --backend etcd://...`: the
//! server keeps no keys of its own, so any number of servers on one etcd
//! cluster serve the same store, and killing one loses nothing.
//!
//! - **Writes** run on a pool of [`WORKERS`] threads making blocking etcd
//!   requests (an EtcdStore shared by all); a connection has at most one
//!   request in flight (the core holds back its next ones), so requests
//!   queued never outnumber connections.
//! - **Reads and waits** are answered from a [`Mirror`] of the job's keys:
//!   a snapshot taken at start, then every change etcd streams to one
//!   watcher thread, whichever server made it. A read waits until the
//!   mirror shows every write this server has acknowledged (its revision),
//!   so a client reads its own writes, and another server's within the
//!   stream's delay (about a millisecond on one machine). Waits end when
//!   the watcher reports the write they wait for. Reads go on while etcd
//!   is unreachable; writes then fail after the operation timeout.
//!
//! Results go back to the event loop through a list it drains when woken.
//! When the backend goes, the workers make the writes already received
//! (giving up on those still queued after the operation timeout) and are
//! joined; the watcher exits on its own within [`WATCH_SLICE`].

mod mirror;
mod sessions;

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::Waker;
use once_cell::sync::OnceCell;
use parking_lot::Mutex;

use self::mirror::{is_read, Mirror};
use self::sessions::{
    lease_ttl, Ending, HeldSessions, Noticed, SessionView, RENEW_EVERY, RENEW_PER_MEMBER,
    RENEW_TIMEOUT,
};
use super::{Backend, Present, Report, SessionEvent, Ticket, Usage};
use crate::error::{Error, Result, Status};
use crate::printable::printable;
use crate::store::etcd::{
    Change, Ended, EtcdStore, EtcdStoreOptions, HeldSession, MemberRecord, Seen, WatchEnd,
};
use crate::store::tcp::failure::Failure;
use crate::store::tcp::protocol::{Key, Outcome, Request, SessionSpec};
use crate::store::tcp::server::sessions::SessionId;
use crate::store::tcp::server::state::ConnId;
use crate::store::tcp::server::waits::WaitId;
use crate::store::Store as _;

/// Threads making etcd requests.
pub(crate) const WORKERS: usize = 16;

/// How long one watch request lasts before the next takes over (from the
/// revision after the last change seen): how soon the watcher notices the
/// backend is gone.
const WATCH_SLICE: Duration = Duration::from_millis(500);

/// The pause after a failed watch (the cluster unreachable) before the
/// next.
const WATCH_RETRY: Duration = Duration::from_millis(100);

/// A write for a worker (or a read waiting for the mirror).
struct Job {
    conn: ConnId,
    ticket: Ticket,
    request: Request,
    /// What the mirror says each key the write names holds.
    guess: Option<Vec<Seen>>,
    /// The session whose lease the keys it puts are attached to.
    leased_to: Option<SessionId>,
}

/// Work on the liveness sessions kept in etcd, for a worker.
enum SessionTask {
    /// Opens (or resumes) the core's session `session` for connection
    /// `conn`, answering `ticket`.
    Open {
        conn: ConnId,
        ticket: Ticket,
        session: SessionId,
        spec: SessionSpec,
    },
    /// Ends it: closed (`conn` waits for `ticket`), or failed.
    End {
        reply_to: Option<(ConnId, Ticket)>,
        session: SessionId,
        failure: Option<Failure>,
    },
    /// Records that the member's lease ran out.
    Expired { record: MemberRecord, revision: i64 },
    /// Publishes the membership of a recoverable group whose members
    /// changed.
    Publish { group: Vec<u8> },
}

/// What the workers take: session work first (failures are urgent, and
/// there is at most one per session), then writes in arrival order.
#[derive(Default)]
struct Queue {
    sessions: VecDeque<SessionTask>,
    /// The groups with a [`SessionTask::Publish`] queued: one publication
    /// covers every change before it, so a change shown while one is
    /// queued needs no other.
    publishing: HashSet<Vec<u8>>,
    writes: VecDeque<Job>,
}

/// The mirror, and the requests waiting for it to catch up.
struct View {
    mirror: Mirror,
    /// Reads, waits and read-modify-writes that arrived before the mirror
    /// showed the writes acknowledged then (`fence`), in arrival order,
    /// which is fence order (only the event loop adds, and acknowledged
    /// writes only grow), with when each arrived.
    fenced: VecDeque<(Job, i64, Instant)>,
    /// The liveness sessions kept in etcd.
    sessions: SessionView,
}

/// What the mirror catching up released: answers, and read-modify-writes
/// for the workers (with their guess).
type Released = (Vec<Report>, Vec<Job>);

impl View {
    /// Takes the fenced requests the mirror has caught up with.
    fn caught_up(&mut self) -> Released {
        if self.fenced.is_empty() {
            return Released::default();
        }
        let revision = self.mirror.revision;
        let caught_up = self
            .fenced
            .iter()
            .take_while(|(_, fence, _)| *fence <= revision)
            .count();
        let ready: Vec<_> = self.fenced.drain(..caught_up).collect();
        let (mut answers, mut writes) = (Vec::new(), Vec::new());
        for (mut job, _, _) in ready {
            if let Some(keys) = named_keys(&job.request) {
                job.guess = Some(keys.iter().map(|key| self.mirror.seen(key)).collect());
                writes.push(job);
            } else {
                answers.push(Report::Completed {
                    conn: job.conn,
                    ticket: job.ticket,
                    // A wait: the core starts it now.
                    outcome: Ok(self.mirror.read(&job.request).unwrap_or(Outcome::Silent)),
                });
            }
        }
        (answers, writes)
    }

    /// Fails the fenced requests that arrived `timeout` or more before
    /// `now` (etcd, or the watch, stopped answering): none waits longer.
    fn expire(&mut self, now: Instant, timeout: Duration) -> Vec<Report> {
        let mut expired = Vec::new();
        while let Some((_, _, arrived)) = self.fenced.front() {
            if timeout.is_zero() || now.saturating_duration_since(*arrived) < timeout {
                break;
            }
            let Some((job, _, _)) = self.fenced.pop_front() else {
                break;
            };
            expired.push(Report::Completed {
                conn: job.conn,
                ticket: job.ticket,
                outcome: Err(Error::timeout(format!(
                    "etcd did not show this server's own writes within {} ms (is it reachable?)",
                    timeout.as_millis()
                ))),
            });
        }
        expired
    }
}

/// Adds in one transaction, at most.
const MAX_ADDS_AT_ONCE: usize = 4096;

/// `job`, and when it is an ADD, the ADDs to the same key queued behind it
/// (a rendezvous: every rank counts itself in), taken out of `queue`.
fn with_same_adds(job: Job, queue: &mut VecDeque<Job>) -> Vec<Job> {
    let Request::Add { key, .. } = &job.request else {
        return vec![job];
    };
    let lease = job.leased_to;
    let same = |j: &Job| {
        j.leased_to == lease && matches!(&j.request, Request::Add { key: k, .. } if k == key)
    };
    if !queue.iter().any(same) {
        return vec![job];
    }
    let mut batch = Vec::new();
    let mut rest = VecDeque::with_capacity(queue.len());
    for queued in queue.drain(..) {
        if batch.len() + 1 < MAX_ADDS_AT_ONCE && same(&queued) {
            batch.push(queued);
        } else {
            rest.push_back(queued);
        }
    }
    *queue = rest;
    batch.insert(0, job);
    batch
}

/// The keys a write of values names (SET, ADD, COMPARE_SET, APPEND,
/// DELETE_KEY, MULTI_SET): its guarded transaction compares the revisions
/// the mirror shows them at.
fn named_keys(request: &Request) -> Option<Vec<&Key>> {
    match request {
        Request::Set { key, .. }
        | Request::Add { key, .. }
        | Request::CompareSet { key, .. }
        | Request::Append { key, .. }
        | Request::DeleteKey { key } => Some(vec![key]),
        Request::MultiSet { pairs } => Some(pairs.iter().map(|(key, _)| key).collect()),
        _ => None,
    }
}

/// What the backend, its workers and its watcher share.
struct Shared {
    store: EtcdStore,
    max_value_len: usize,
    /// Writes for the workers, who sleep on std's condvar (see
    /// `crate::runtime::timer` on parking_lot's and fork).
    jobs: std::sync::Mutex<Queue>,
    job_ready: std::sync::Condvar,
    view: Mutex<View>,
    /// The revision of the latest write this server acknowledged.
    written: AtomicI64,
    reports: Mutex<Vec<Report>>,
    /// The sessions this server holds in etcd.
    held: Mutex<HeldSessions>,
    waker: Arc<Waker>,
    stop: AtomicBool,
    /// Once stopped: writes still queued after this are not made (etcd
    /// not answering would otherwise hold the stop for every one of them).
    give_up_at: OnceCell<Instant>,
}

impl Shared {
    /// The writes queued.
    fn lock_jobs(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues writes for the workers.
    fn queue(&self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let one = jobs.len() == 1;
        self.lock_jobs().writes.extend(jobs);
        if one {
            self.job_ready.notify_one();
        } else {
            self.job_ready.notify_all();
        }
    }

    /// Queues work on sessions for the workers.
    fn queue_sessions(&self, tasks: impl IntoIterator<Item = SessionTask>) {
        let mut queue = self.lock_jobs();
        let before = queue.sessions.len();
        queue.sessions.extend(tasks);
        let added = queue.sessions.len() - before;
        drop(queue);
        match added {
            0 => {}
            1 => self.job_ready.notify_one(),
            _ => self.job_ready.notify_all(),
        }
    }

    /// Acts on what the session keys' changes showed: tells the core of
    /// the failures recorded, records the expiries, publishes the
    /// memberships that changed.
    fn act_on(&self, noticed: Noticed) {
        self.report(noticed.failed.into_iter().map(Report::GroupFailed));
        let expired = noticed.expired.into_iter();
        let expired = expired.map(|(record, revision)| SessionTask::Expired { record, revision });
        let publish: Vec<SessionTask> = {
            let mut queue = self.lock_jobs();
            let changed = noticed.changed.into_iter();
            let news = changed.filter(|group| queue.publishing.insert(group.clone()));
            news.map(|group| SessionTask::Publish { group }).collect()
        };
        self.queue_sessions(expired.chain(publish));
    }

    /// Sends on what the mirror catching up released.
    fn release(&self, (answers, writes): Released) {
        self.queue(writes);
        self.report(answers);
    }

    /// Hands `reports` to the event loop, waking it if it had nothing.
    fn report(&self, reports: impl IntoIterator<Item = Report>) {
        let mut queued = self.reports.lock();
        let was_empty = queued.is_empty();
        queued.extend(reports);
        if was_empty && !queued.is_empty() {
            if let Err(e) = self.waker.wake() {
                log::error!("etcd backend: waking the server: {e}");
            }
        }
    }

    fn worker(&self) {
        loop {
            let batch = {
                let mut jobs = self.lock_jobs();
                loop {
                    // Writes received before the stop are still made,
                    // within the operation timeout.
                    if self
                        .give_up_at
                        .get()
                        .is_some_and(|at| Instant::now() >= *at)
                    {
                        let left = jobs.writes.len() + jobs.sessions.len();
                        if left > 0 {
                            log::warn!(
                                "etcd backend: stopped with {left} writes not made (etcd did not answer in time)",
                            );
                            *jobs = Queue::default();
                        }
                        return;
                    }
                    if let Some(task) = jobs.sessions.pop_front() {
                        if let SessionTask::Publish { group } = &task {
                            jobs.publishing.remove(group);
                        }
                        drop(jobs);
                        self.run(task);
                        jobs = self.lock_jobs();
                        continue;
                    }
                    if let Some(job) = jobs.writes.pop_front() {
                        break with_same_adds(job, &mut jobs.writes);
                    }
                    if self.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    jobs = self
                        .job_ready
                        .wait(jobs)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
            };
            let answers = match &batch[..] {
                [job] => vec![self.write(job, job.guess.clone())],
                _ => self.add_all(&batch),
            };
            self.report(
                batch
                    .into_iter()
                    .zip(answers)
                    .map(|(job, outcome)| Report::Completed {
                        conn: job.conn,
                        ticket: job.ticket,
                        outcome,
                    }),
            );
        }
    }

    /// Makes the write of `job` in etcd (with `guess`), its keys attached
    /// to its session's lease if it is leased.
    fn write(&self, job: &Job, guess: Option<Vec<Seen>>) -> Result<Outcome> {
        self.write_request(&job.request, job.leased_to, guess)
    }

    fn write_request(
        &self,
        request: &Request,
        leased_to: Option<SessionId>,
        guess: Option<Vec<Seen>>,
    ) -> Result<Outcome> {
        let (outcome, revision) = match leased_to {
            None => self.store.write(request, self.max_value_len, guess)?,
            Some(session) => {
                let lease = self.held.lock().lease_of(session).ok_or_else(|| {
                    Error::new(
                        Status::PeerFailed,
                        "the session this write's keys were leased to has ended",
                    )
                })?;
                let leased = self.store.with_lease(lease);
                leased.write(request, self.max_value_len, guess)?
            }
        };
        match (request, &outcome) {
            // The queue was empty at that revision: the mirror forgets the
            // elements created until then (a revision that is not a write
            // of this job's, which the mirror may never reach: no fence).
            (Request::QueuePop { key }, Outcome::Popped { value: None, .. }) => {
                let released = {
                    let mut view = self.view.lock();
                    view.mirror.saw_empty(key, revision);
                    view.caught_up()
                };
                self.release(released);
            }
            // Before the answer: the connection's next read waits for the
            // mirror to show this write.
            _ => {
                self.written.fetch_max(revision, Ordering::SeqCst);
            }
        }
        Ok(outcome)
    }

    /// Makes ADDs to one key (from different connections) as one ADD of
    /// their sum: each gets the value it would have had in that order.
    /// Each job gets an answer, so no connection waits forever: ADDs
    /// whose sum overflows are made one by one (each then fails or not on
    /// its own), and a count that would pass the 64-bit range on the way
    /// fails that ADD, as it would have alone.
    fn add_all(&self, adds: &[Job]) -> Vec<Result<Outcome>> {
        let one_by_one = || {
            adds.iter()
                .map(|job| self.write(job, job.guess.clone()))
                .collect()
        };
        let deltas: Option<Vec<i64>> = adds
            .iter()
            .map(|job| match job.request {
                Request::Add { delta, .. } => Some(delta),
                _ => None,
            })
            .collect();
        let total = deltas
            .as_ref()
            .and_then(|d| d.iter().try_fold(0i64, |a, d| a.checked_add(*d)));
        let (Some(first), Some(deltas), Some(total)) = (adds.first(), deltas, total) else {
            return one_by_one();
        };
        let Request::Add { key, .. } = &first.request else {
            return one_by_one();
        };
        let sum = Request::Add {
            key: key.clone(),
            delta: total,
        };
        match self.write_request(&sum, first.leased_to, first.guess.clone()) {
            Ok(Outcome::Int(after)) => {
                let mut value = after.checked_sub(total);
                deltas
                    .iter()
                    .map(|delta| {
                        value = value.and_then(|v| v.checked_add(*delta));
                        value.map(Outcome::Int).ok_or_else(|| {
                            Error::invalid_argument(format!(
                                "add: {delta} overflows a 64-bit counter at key '{}'",
                                printable(key)
                            ))
                        })
                    })
                    .collect()
            }
            Ok(other) => vec![Ok(other); adds.len()],
            // The sum overflows (nothing was written): each on its own
            // answers as it would alone.
            Err(e) if e.status() == Status::InvalidArgument => one_by_one(),
            Err(e) => vec![Err(e); adds.len()],
        }
    }

    /// Applies every change from revision `next` on to the mirror, and
    /// reports the writes (they end waits) and the reads now answered.
    fn watcher(&self, mut next: i64) {
        while !self.stop.load(Ordering::SeqCst) {
            let deadline = Instant::now() + WATCH_SLICE;
            let watched = self.store.watch_changes(&mut next, deadline, |changes| {
                // A revision is applied whole before any read waiting
                // for it is let go: it never sees half a transaction.
                let (written, released, noticed) = {
                    let mut view = self.view.lock();
                    let written = view.mirror.apply(&changes);
                    let sessions = changes.into_iter().filter_map(|(change, _)| match change {
                        Change::Session(change) => Some(change),
                        _ => None,
                    });
                    let noticed = view.sessions.apply(sessions.collect());
                    (written, view.caught_up(), noticed)
                };
                self.act_on(noticed);
                let written = written
                    .into_iter()
                    .map(|(key, present)| Report::Written { key, present });
                self.report(written);
                self.release(released);
                !self.stop.load(Ordering::SeqCst)
            });
            match watched {
                Ok(WatchEnd::Stopped | WatchEnd::Deadline) => {}
                // Compacted past what the mirror has: start again from a
                // snapshot, and let every wait look again.
                Ok(WatchEnd::Canceled) => {
                    match self.store.snapshot() {
                        Ok(mut snapshot) => {
                            log::warn!("etcd backend: the watch fell behind a compaction; reloading the keys");
                            next = snapshot.revision + 1;
                            let (sessions, mut noticed) =
                                SessionView::new(std::mem::take(&mut snapshot.sessions));
                            let released = {
                                let mut view = self.view.lock();
                                view.mirror = Mirror::new(snapshot);
                                noticed.failed = sessions.failures_since(&view.sessions);
                                view.sessions = sessions;
                                view.caught_up()
                            };
                            self.release(released);
                            self.act_on(noticed);
                            self.report([Report::Missed]);
                        }
                        Err(e) => self.watch_failed(&e),
                    }
                }
                Err(e) => self.watch_failed(&e),
            }
            let timeout = self.store.timeout();
            let expired = self.view.lock().expire(Instant::now(), timeout);
            self.report(expired);
        }
    }

    /// Does `task` in etcd, and reports what the core waits for.
    fn run(&self, task: SessionTask) {
        match task {
            SessionTask::Open {
                conn,
                ticket,
                session,
                spec,
            } => {
                let opened = self.store.open_member(&spec, lease_ttl(&spec));
                if opened.is_ok() && spec.recoverable {
                    self.publish_holding(&spec);
                }
                let ended = self
                    .held
                    .lock()
                    .opened(session, opened.as_ref().ok().cloned());
                if let Some((held, failure)) = ended {
                    let _ = self.end(&held, failure.as_ref()); // logged
                }
                let outcome = opened.map(|_| Outcome::Silent);
                self.report([Report::Completed {
                    conn,
                    ticket,
                    outcome,
                }]);
            }
            SessionTask::End {
                reply_to,
                session,
                failure,
            } => {
                let ending = self.held.lock().end(session, failure.clone());
                let outcome = match ending {
                    Ending::Now(held) => self.end(&held, failure.as_ref()),
                    Ending::Later | Ending::Nothing => Ok(()),
                };
                if let Some((conn, ticket)) = reply_to {
                    let outcome = outcome.map(|()| Outcome::Silent);
                    self.report([Report::Completed {
                        conn,
                        ticket,
                        outcome,
                    }]);
                }
            }
            SessionTask::Expired { record, revision } => {
                if let Err(e) = self.store.record_expiry(&record, revision) {
                    log::warn!(
                        "etcd backend: recording that rank {} of group '{}' lost its lease: {}",
                        record.spec.rank,
                        printable(&record.spec.group),
                        e.message()
                    );
                }
            }
            SessionTask::Publish { group } => {
                if let Err(e) = self.store.publish_members(&group, None) {
                    log::warn!(
                        "etcd backend: publishing the membership of group '{}': {}",
                        printable(&group),
                        e.message()
                    );
                }
            }
        }
    }

    /// Publishes the membership of the recoverable group of `spec`, just
    /// opened, until it holds the member, before its open is answered: a
    /// `members()` that follows shows it (a read waits for the mirror to
    /// show the publication). A failure is logged: the publications that
    /// follow the change the watch shows make up for it.
    fn publish_holding(&self, spec: &SessionSpec) {
        let member = (spec.rank, spec.incarnation);
        match self.store.publish_members(&spec.group, Some(member)) {
            Ok(revision) => {
                self.written.fetch_max(revision, Ordering::SeqCst);
            }
            Err(e) => log::warn!(
                "etcd backend: publishing the membership of group '{}': {}",
                printable(&spec.group),
                e.message()
            ),
        }
    }

    /// Ends `held` in etcd: closed, or failed for `failure`. A failure it
    /// recorded as its group's first is told here at once (other servers
    /// learn it from the watch); then the lease is revoked, its keys gone.
    fn end(&self, held: &HeldSession, failure: Option<&Failure>) -> Result<()> {
        let ended = self.store.end_session(held, failure);
        let (group, rank) = (printable(&held.group), held.rank);
        match &ended {
            // Told here at once; the watch, bringing it back, finds it
            // known: each failure is reported once.
            Ok(Ended::Recorded) => {
                let failure = failure
                    .cloned()
                    .filter(|f| self.view.lock().sessions.learn(f));
                self.report(failure.map(Report::GroupFailed));
            }
            Ok(Ended::Elsewhere) => {
                log::info!("etcd backend: rank {rank} of group '{group}' lives on another server");
                return Ok(());
            }
            Ok(Ended::Now | Ended::Already) => {}
            Err(e) => {
                log::warn!(
                    "etcd backend: ending the session of rank {rank} of group '{group}': {} (its \
                     lease runs out unrenewed)",
                    e.message()
                );
            }
        }
        ended?;
        self.store.revoke_lease(held.lease)
    }

    /// Renews the leases of the sessions this server holds, every
    /// [`RENEW_EVERY`], in one request, until the backend goes.
    fn keeper(&self) {
        loop {
            std::thread::sleep(RENEW_EVERY);
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let leases = self.held.lock().leases();
            let started = Instant::now();
            match self
                .store
                .keep_leases_alive(&leases, RENEW_TIMEOUT, RENEW_PER_MEMBER)
            {
                Ok(gone) if gone.is_empty() => log::trace!(
                    "etcd backend: renewed {} session leases in {:?}",
                    leases.len(),
                    started.elapsed()
                ),
                // The watcher sees their liveness keys go: failures.
                Ok(gone) => log::warn!(
                    "etcd backend: {} session leases ran out before they were renewed",
                    gone.len()
                ),
                Err(e) => log::warn!("etcd backend: renewing session leases: {}", e.message()),
            }
        }
    }

    fn watch_failed(&self, e: &Error) {
        log::warn!("etcd backend: watching for changes: {}", e.message());
        std::thread::sleep(WATCH_RETRY);
    }
}

/// The keys of a server in an etcd cluster (see the module doc).
pub(crate) struct EtcdBackend {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl EtcdBackend {
    /// Connects to the cluster (a member must answer within the timeout),
    /// takes a snapshot of the job's keys, starts the workers and the
    /// watcher; reports wake `waker`.
    pub(crate) fn start(
        options: EtcdStoreOptions,
        max_value_len: usize,
        waker: Arc<Waker>,
    ) -> Result<EtcdBackend> {
        if options.timeout.is_zero() {
            return Err(Error::invalid_argument(
                "a server on etcd needs a timeout for its etcd requests (--backend-timeout): \
                 without one, an etcd that does not answer would hold a client's request, \
                 and the server's stop, forever",
            ));
        }
        let store = EtcdStore::new(options)?;
        let mut snapshot = store.snapshot()?;
        let next = snapshot.revision + 1;
        let (sessions, noticed) = SessionView::new(std::mem::take(&mut snapshot.sessions));
        let shared = Arc::new(Shared {
            store,
            max_value_len,
            jobs: std::sync::Mutex::new(Queue::default()),
            job_ready: std::sync::Condvar::new(),
            view: Mutex::new(View {
                mirror: Mirror::new(snapshot),
                fenced: VecDeque::new(),
                sessions,
            }),
            written: AtomicI64::new(0),
            reports: Mutex::new(Vec::new()),
            held: Mutex::default(),
            waker,
            stop: AtomicBool::new(false),
            give_up_at: OnceCell::new(),
        });
        let mut backend = EtcdBackend {
            shared: shared.clone(),
            workers: Vec::with_capacity(WORKERS),
        };
        for i in 0..WORKERS {
            let shared = shared.clone();
            let worker = spawn(format!("dc-etcd-work-{i}"), move || shared.worker())?;
            backend.workers.push(worker);
        }
        shared.act_on(noticed);
        let keeper = shared.clone();
        spawn("dc-etcd-leases".into(), move || keeper.keeper())?;
        spawn("dc-etcd-watch".into(), move || shared.watcher(next))?;
        Ok(backend)
    }
}

fn spawn(name: String, run: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name)
        .spawn(run)
        .map_err(|e| Error::internal(format!("spawning an etcd backend thread: {e}")))
}

impl Drop for EtcdBackend {
    /// Stops the threads once the writes received are made (those still
    /// queued after the operation timeout are given up, and counted in the
    /// log): a request a client sent before the server stopped is not lost
    /// while etcd answers.
    fn drop(&mut self) {
        // Never zero: `start` refuses a server without a timeout.
        let timeout = self.shared.store.timeout();
        let _ = self.shared.give_up_at.set(Instant::now() + timeout);
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.job_ready.notify_all();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

impl EtcdBackend {
    /// Applies `request` of `conn` (see [`Backend::apply`]), its keys
    /// attached to the lease of session `leased_to` if it is leased.
    fn apply_to(
        &mut self,
        conn: ConnId,
        ticket: Ticket,
        request: &Request,
        leased_to: Option<SessionId>,
    ) -> Result<Option<Outcome>> {
        let job = |guess| Job {
            conn,
            ticket,
            request: request.clone(),
            guess,
            leased_to,
        };
        let read = is_read(request);
        let modified = named_keys(request);
        let mut guess = None;
        if read || modified.is_some() {
            // Reads, waits before they start, and the guesses of writes
            // come from a mirror showing every write acknowledged so far.
            let fence = self.shared.written.load(Ordering::SeqCst);
            let mut view = self.shared.view.lock();
            if view.mirror.revision < fence {
                view.fenced.push_back((job(None), fence, Instant::now()));
                return Ok(None);
            }
            if read {
                return Ok(view.mirror.read(request));
            }
            guess = modified.map(|keys| keys.iter().map(|key| view.mirror.seen(key)).collect());
        }
        self.shared.queue(vec![job(guess)]);
        Ok(None)
    }
}

impl Backend for EtcdBackend {
    fn apply(
        &mut self,
        conn: ConnId,
        ticket: Ticket,
        request: &Request,
    ) -> Result<Option<Outcome>> {
        self.apply_to(conn, ticket, request, None)
    }

    fn apply_leased(
        &mut self,
        conn: ConnId,
        ticket: Ticket,
        request: &Request,
        session: SessionId,
    ) -> Result<Option<Outcome>> {
        self.apply_to(conn, ticket, request, Some(session))
    }

    fn keeps_sessions(&self) -> bool {
        true
    }

    fn session(
        &mut self,
        conn: ConnId,
        ticket: Ticket,
        event: SessionEvent,
    ) -> Result<Option<Outcome>> {
        let task = match event {
            SessionEvent::Opened { session, spec } => {
                self.shared.held.lock().opening(session);
                SessionTask::Open {
                    conn,
                    ticket,
                    session,
                    spec: spec.clone(),
                }
            }
            SessionEvent::Closed { session } => SessionTask::End {
                reply_to: Some((conn, ticket)),
                session,
                failure: None,
            },
            SessionEvent::Failed { session, failure } => SessionTask::End {
                reply_to: None,
                session,
                failure: Some(failure.clone()),
            },
        };
        self.shared.queue_sessions([task]);
        Ok(None)
    }

    /// Leased keys are attached to their session's etcd lease: they go
    /// when it ends, or runs out with the server that renewed it.
    fn holds_leased_keys(&self) -> bool {
        true
    }

    fn delete_leased(&mut self, keys: Vec<Key>) {
        log::error!(
            "etcd backend: asked to delete {} leased keys (their leases carry them)",
            keys.len()
        );
    }

    fn peek(&self, key: &[u8]) -> Option<Present> {
        self.shared.view.lock().mirror.peek(key)
    }

    fn look(&mut self, wait: WaitId, keys: Vec<Key>) {
        let found = {
            let view = self.shared.view.lock();
            keys.into_iter()
                .filter_map(|key| Some((view.mirror.peek(&key)?, key)))
                .map(|(present, key)| (key, present))
                .collect()
        };
        self.shared.report([Report::Looked { wait, found }]);
    }

    fn reports_writes(&self) -> bool {
        true
    }

    fn take_reports(&mut self) -> Vec<Report> {
        std::mem::take(&mut *self.shared.reports.lock())
    }

    fn value_len(&self, key: &[u8]) -> Option<usize> {
        self.shared.view.lock().mirror.value_len(key)
    }

    fn holds_queue(&self, key: &[u8]) -> bool {
        self.shared.view.lock().mirror.holds_queue(key)
    }

    fn usage(&self) -> Usage {
        self.shared.view.lock().mirror.usage()
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod batching {
    use super::*;

    fn job(ticket: Ticket, request: Request) -> Job {
        Job {
            conn: ticket as ConnId,
            ticket,
            request,
            guess: None,
            leased_to: None,
        }
    }

    fn add(key: &str) -> Request {
        Request::Add {
            key: key.into(),
            delta: 1,
        }
    }

    #[test]
    fn adds_to_the_same_key_are_taken_together_and_the_rest_keeps_its_order() {
        let set = Request::Set {
            key: b"b".to_vec(),
            value: b"1".as_slice().into(),
        };
        let mut queue: VecDeque<Job> = [
            job(2, set),
            job(3, add("a")),
            job(4, add("c")),
            job(5, add("a")),
        ]
        .into();
        let batch = with_same_adds(job(1, add("a")), &mut queue);
        let tickets =
            |jobs: &mut dyn Iterator<Item = &Job>| jobs.map(|j| j.ticket).collect::<Vec<_>>();
        assert_eq!(tickets(&mut batch.iter()), [1, 3, 5]);
        assert_eq!(tickets(&mut queue.iter()), [2, 4]);
        let alone = with_same_adds(job(6, add("z")), &mut queue);
        assert_eq!(alone.len(), 1);
        assert_eq!(queue.len(), 2);
    }
}

#[cfg(test)]
mod fences {
    use super::*;

    #[test]
    fn a_fenced_request_fails_once_it_has_waited_its_timeout() {
        let mut view = View {
            mirror: Mirror::default(),
            fenced: VecDeque::new(),
            sessions: SessionView::default(),
        };
        let start = Instant::now();
        for (ticket, arrived) in [(1, start), (2, start + Duration::from_secs(2))] {
            let job = Job {
                conn: 0,
                ticket,
                request: Request::GetNumKeys,
                guess: None,
                leased_to: None,
            };
            view.fenced.push_back((job, 5, arrived));
        }
        let timeout = Duration::from_secs(3);
        assert!(view
            .expire(start + Duration::from_secs(1), timeout)
            .is_empty());
        let expired = view.expire(start + Duration::from_secs(4), timeout);
        assert!(
            matches!(&expired[..], [Report::Completed { ticket: 1, outcome: Err(e), .. }]
                if e.status() == Status::Timeout),
            "{expired:?}"
        );
        assert_eq!(view.fenced.len(), 1, "the later one waits on");
        assert!(
            view.expire(start + Duration::from_secs(60), Duration::ZERO)
                .is_empty(),
            "no timeout: forever"
        );
    }
}
