//! The TCPStore client's connections. A handle has a *primary* connection
//! for every request the server answers at once — in order, as PyTorch's
//! one connection carries them, so a thread reads its own writes and other
//! threads see them in order — and *spare* connections for the requests
//! that wait (get, wait, barrier, a blocking queue pop): a waiting request
//! takes a spare of its own, so it never holds up another thread, and gives
//! it back when it ends in step with the server. Async operations run their
//! spare on the process's waiter thread (`waiter.rs`).
//!
//! A broken connection is dropped and the next operation reconnects
//! (VALIDATE, HELLO again; `init/` is never counted twice: only
//! [`crate::store::TcpStore::new`] counts). An operation that found its
//! connection closed before sending anything reconnects and goes on; one
//! whose request was in flight fails with a network error and is never
//! retried (a SET or ADD may or may not have been applied). Writes with no
//! reply (SET, MULTI_SET, QUEUE_PUSH, APPEND in PyTorch's protocol) are
//! never lost silently: when the connection that carried them breaks
//! before a later reply showed the server had them, the next operation on
//! the handle fails with a network error saying so (reconnecting only for
//! the one after), as PyTorch's own client fails on its dead connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

mod conn;
mod counters;
mod plan;
mod reply;
mod roll_call;
mod session;
mod store;
mod waiter;

pub use counters::OpCounter;
pub use store::{SessionOptions, TcpStore, TcpStoreOptions};

pub(crate) use conn::{deadline_of, Conn, Deadline, Dialect, Endpoint};
pub(crate) use plan::Plan;
use plan::{grace_deadline, Next};
pub(crate) use reply::{Decoder, Reply, Shape};

use self::session::Membership;
use super::protocol::{Limits, SessionSpec};
use crate::error::{Error, Result, Status};
use crate::work::{Promise, Work};

/// Idle spare connections a handle keeps; more are closed when they come back.
const MAX_IDLE_SPARES: usize = 8;

/// The connections of one handle to its server.
pub(crate) struct Connections {
    endpoint: Endpoint,
    primary: Mutex<Option<Conn>>,
    /// The primary has sent reply-less requests since its last reply (its
    /// `unfenced`, published when its lock is released), so that a get
    /// takes the primary's lock only when it has something to fence.
    primary_unfenced: AtomicBool,
    spares: Arc<Mutex<Vec<Conn>>>,
    /// What the last connection learned of the server.
    learned: Mutex<Learned>,
    /// This handle's liveness session (docs/liveness.md). Never locked
    /// while waiting for the primary's lock.
    membership: Mutex<Membership>,
}

/// What a connection learned of the server in its handshake.
struct Learned {
    dialect: Dialect,
    limits: Limits,
    leases: bool,
}

impl From<&Conn> for Learned {
    fn from(conn: &Conn) -> Learned {
        Learned {
            dialect: conn.dialect(),
            limits: *conn.limits(),
            leases: conn.holds_leases(),
        }
    }
}

impl Connections {
    /// Connects the primary connection to `endpoint` by `deadline`.
    pub(crate) fn connect(endpoint: Endpoint, deadline: Deadline) -> Result<Connections> {
        let primary = Conn::connect(&endpoint, deadline)?;
        let learned = Learned::from(&primary);
        Ok(Connections {
            endpoint,
            primary: Mutex::new(Some(primary)),
            primary_unfenced: AtomicBool::new(false),
            spares: Arc::default(),
            learned: Mutex::new(learned),
            membership: Mutex::default(),
        })
    }

    /// Whether the server speaks distcore's extensions (as of the last
    /// connection made).
    pub(crate) fn dialect(&self) -> Dialect {
        self.learned.lock().dialect
    }

    /// Whether the server lets keys be leased to sessions (as of the last
    /// connection made).
    pub(crate) fn holds_leases(&self) -> bool {
        self.learned.lock().leases
    }

    /// The server these connections go to.
    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn open(&self, deadline: Deadline) -> Result<Conn> {
        let conn = Conn::connect(&self.endpoint, deadline)?;
        *self.learned.lock() = Learned::from(&conn);
        Ok(conn)
    }

    /// The primary connection's slot, waited for no later than `deadline`.
    fn lock_primary(&self, deadline: Deadline) -> Result<MutexGuard<'_, Option<Conn>>> {
        match deadline {
            None => Ok(self.primary.lock()),
            Some(deadline) => self.primary.try_lock_until(deadline).ok_or_else(|| {
                Error::timeout(format!(
                    "timed out waiting for another operation on this handle to the TCPStore at {}:{}",
                    self.endpoint.host, self.endpoint.port
                ))
            }),
        }
    }

    /// Runs `f` on the primary connection, waiting for it (and reconnecting
    /// it) no later than `deadline`. A connection `f` left broken is dropped.
    pub(crate) fn with_primary<T>(
        &self,
        deadline: Deadline,
        f: impl FnOnce(&mut Conn) -> Result<T>,
    ) -> Result<T> {
        self.membership.lock().check()?;
        let mut slot = self.lock_primary(deadline)?;
        // A connection the server closed while idle (a restart) is replaced
        // before anything is sent on it: that is not a retry. Unless it
        // carried writes the server never acknowledged: the caller learns
        // they may be lost instead of reading around them.
        if let Some(conn) = &mut *slot {
            if let Err(closed) = conn.check_open() {
                let writes = conn.unacknowledged();
                let lost = (writes > 0).then(|| conn.lost_writes(writes, &closed));
                *slot = None;
                if let Some(lost) = lost {
                    return Err(lost);
                }
            }
        }
        if slot.is_none() {
            // The session it carried, if any, ended with it, or is resumed
            // on the connection that replaces it.
            if let Some(conn) = self.primary_gone(deadline)? {
                *slot = Some(conn);
            }
        }
        let conn = match &mut *slot {
            Some(conn) => conn,
            empty => empty.insert(self.open(deadline)?),
        };
        let writes = conn.unacknowledged();
        let result = f(conn);
        let result = match result {
            // The operation's own error says what broke; the writes before
            // it may be lost too.
            Err(e) if writes > 0 && conn.is_broken() => Err(conn.lost_writes(writes, &e)),
            other => other,
        };
        self.release_primary(&mut slot);
        result
    }

    /// Before the primary's lock is released: drops it if broken (what it
    /// carried is lost either way) and publishes whether it needs a fence.
    fn release_primary(&self, slot: &mut Option<Conn>) {
        if slot.as_ref().is_some_and(Conn::is_broken) {
            *slot = None;
        }
        let unfenced = slot.as_ref().is_some_and(Conn::is_unfenced);
        self.primary_unfenced.store(unfenced, Ordering::Release);
    }

    /// Makes sure the server applied every request already sent on the
    /// primary connection, so a read on a spare sees them; with nothing to
    /// fence, without touching the primary. A primary that fails meanwhile
    /// is dropped, and the operation fails saying those writes may be
    /// lost (a read would not see them); one that does not answer in time
    /// fails the operation.
    fn fence(&self, deadline: Deadline) -> Result<()> {
        if !self.primary_unfenced.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut slot = self.lock_primary(deadline)?;
        let result = match &mut *slot {
            Some(conn) => {
                let writes = conn.unacknowledged();
                conn.fence(deadline).map_err(|e| match e.status() {
                    Status::Timeout => e,
                    _ if conn.is_broken() => conn.lost_writes(writes, &e),
                    _ => e,
                })
            }
            None => Ok(()),
        };
        self.release_primary(&mut slot);
        result
    }

    /// A spare connection, idle or new, attached to the handle's session if
    /// it has one (so the server fails its waits with the group).
    fn take_spare(&self, deadline: Deadline) -> Result<Conn> {
        let session = {
            let membership = self.membership.lock();
            membership.check()?;
            membership.id()
        };
        let idle = self.spares.lock().pop();
        let mut conn = match idle {
            Some(mut conn) => match conn.check_open() {
                Ok(()) => conn,
                // Closed while idle (a restarted server): nothing was sent yet.
                Err(_) => self.open(deadline)?,
            },
            None => self.open(deadline)?,
        };
        match session::attach(&mut conn, session, deadline) {
            // The server knows no such session: it ended with the
            // primary connection (a restarted server, a lost connection),
            // or lives on where the primary has yet to resume it.
            Err(e) if e.status() == Status::InvalidState => {
                if self.membership.lock().resumable().is_none() {
                    self.session_lost()?;
                    return Err(e);
                }
                self.with_primary(deadline, |_| Ok(()))?;
                let resumed = self.membership.lock().id();
                session::attach(&mut conn, resumed, deadline).map(|()| conn)
            }
            attached => attached.map(|()| conn),
        }
    }

    /// The primary connection is gone (its slot empty, its lock held): a
    /// session the server keeps beyond itself is resumed on a new
    /// connection, returned to become the primary (a network error leaves
    /// it to the next call, within its TTL; a refusal loses it); any other
    /// session is lost (its error); without one, None.
    fn primary_gone(&self, deadline: Deadline) -> Result<Option<Conn>> {
        let Some(spec) = self.membership.lock().resumable() else {
            self.session_lost()?;
            return Ok(None);
        };
        let mut conn = self.open(deadline)?;
        let id = match session::open(&mut conn, &spec, deadline) {
            Ok(id) => id,
            Err(e) if matches!(e.status(), Status::PeerFailed | Status::InvalidState) => {
                *self.membership.lock() = Membership::Lost(e.clone());
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let alive = self.membership.lock().resumed(id);
        log::info!(
            "resumed the session of rank {} in group '{}' on {}:{}",
            spec.rank,
            String::from_utf8_lossy(&spec.group),
            self.endpoint.host,
            self.endpoint.port
        );
        // Its keep-alives stopped with the connection they ran on.
        // (A spare of its own, not take_spare: the primary's lock is held.)
        if let (Some(ttl), Some(alive)) = (spec.ttl, alive) {
            let mut spare = self.open(deadline)?;
            session::attach(&mut spare, Some(id), deadline)?;
            waiter::keep_alive(waiter::KeepAlive {
                conn: spare,
                interval: ttl / 3,
                session: alive,
            })?;
        }
        Ok(Some(conn))
    }

    /// The session's primary connection is gone, and with it the session
    /// (the server ended it): the error of the call that found out, if
    /// there was a session.
    fn session_lost(&self) -> Result<()> {
        let server = format!("{}:{}", self.endpoint.host, self.endpoint.port);
        self.membership.lock().primary_lost(&server)
    }

    /// Whether the handle has an open session (what a leased write needs):
    /// InvalidState if it has none, the lost session's error if it was lost.
    pub(crate) fn check_session(&self) -> Result<()> {
        let membership = self.membership.lock();
        membership.check()?;
        match membership.id() {
            Some(_) => Ok(()),
            None => Err(Error::new(
                Status::InvalidState,
                "this handle has no session: a leased write needs one (open_session first)",
            )),
        }
    }

    /// Whether the handle's session is in a recoverable group.
    pub(crate) fn recoverable(&self) -> bool {
        self.membership.lock().recoverable()
    }

    /// The open session's group and rank, if the handle has one.
    pub(crate) fn member(&self) -> Option<(String, u32)> {
        self.membership.lock().member()
    }

    /// Opens a liveness session of `spec` on the primary connection, by
    /// `deadline`; spares attach as they are taken.
    pub(crate) fn open_session(&self, spec: &SessionSpec, deadline: Deadline) -> Result<()> {
        if !matches!(*self.membership.lock(), Membership::None) {
            return Err(Error::new(
                Status::InvalidState,
                "this handle has a session already: close it first",
            ));
        }
        let (id, outlives) = self.with_primary(deadline, |c| {
            if c.dialect() != Dialect::Distcore {
                return Err(Error::not_supported(
                    "sessions need a distcore server (this one speaks only PyTorch's protocol)",
                ));
            }
            Ok((session::open(c, spec, deadline)?, c.sessions_outlive()))
        })?;
        let alive = Arc::new(());
        *self.membership.lock() = Membership::Open {
            id,
            group: spec.group.clone(),
            rank: spec.rank,
            recoverable: spec.recoverable,
            alive: alive.clone(),
            resumable: outlives.then(|| SessionSpec {
                resume: true,
                ..spec.clone()
            }),
        };
        if let Some(ttl) = spec.ttl {
            // Three keep-alives a TTL, on a spare of their own, from the
            // process's waiter thread.
            let kept = self.take_spare(deadline).and_then(|conn| {
                waiter::keep_alive(waiter::KeepAlive {
                    conn,
                    interval: ttl / 3,
                    session: Arc::downgrade(&alive),
                })
            });
            if let Err(e) = kept {
                let _ = self.end_session(None, deadline);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Ends the handle's session: gracefully, or with the process's own
    /// error `report`, which fails its group. A session lost with its
    /// connection is only forgotten (the server ended it already).
    pub(crate) fn end_session(&self, report: Option<&str>, deadline: Deadline) -> Result<()> {
        let previous = std::mem::take(&mut *self.membership.lock());
        match previous {
            Membership::None => Err(Error::new(
                Status::InvalidState,
                "this handle has no session",
            )),
            Membership::Lost(_) => Ok(()),
            Membership::Open { .. } => {
                self.with_primary(deadline, |c| session::end(c, report, deadline))
            }
        }
    }

    fn recycler(&self) -> Box<dyn FnOnce(Conn) + Send> {
        let spares: Weak<Mutex<Vec<Conn>>> = Arc::downgrade(&self.spares);
        Box::new(move |conn| {
            if let Some(spares) = spares.upgrade() {
                give_back(&spares, conn);
            }
        })
    }

    /// Checks a plan's keys against the server's limits.
    fn check_plan(&self, plan: &Plan) -> Result<()> {
        let limits = self.learned.lock().limits;
        let keys: Vec<&[u8]> = plan.keys().iter().map(|k| k.as_bytes()).collect();
        check_request(&limits, &keys, &[])
    }

    /// Runs a waiting operation on a spare connection from this thread, by
    /// the deadline of `timeout` (plus at most the cancel grace). `fence`:
    /// it reads values, so earlier writes of this handle must be applied.
    pub(crate) fn run(
        &self,
        mut plan: Plan,
        timeout: Duration,
        fence: bool,
    ) -> Result<Vec<Vec<u8>>> {
        self.check_plan(&plan)?;
        let deadline = deadline_of(timeout);
        if fence {
            self.fence(deadline)?;
        }
        let mut conn = self.take_spare(deadline)?;
        let result = run_plan(&mut conn, &mut plan, deadline, timeout);
        give_back(&self.spares, conn);
        result
    }

    /// Starts a waiting operation on the waiter thread; the work completes
    /// with `finish` of the values it read, or its error. Blocks only to
    /// fence and to open a connection when no spare is idle.
    pub(crate) fn start(
        &self,
        plan: Plan,
        timeout: Duration,
        fence: bool,
        finish: waiter::Finish,
    ) -> Result<Work> {
        self.check_plan(&plan)?;
        let deadline = deadline_of(timeout);
        if fence {
            self.fence(deadline)?;
        }
        let conn = self.take_spare(deadline)?;
        let (promise, work) = Promise::new();
        waiter::submit(waiter::AsyncOp {
            conn,
            plan,
            deadline,
            timeout,
            promise,
            finish,
            recycle: self.recycler(),
        })?;
        Ok(work)
    }
}

fn give_back(spares: &Mutex<Vec<Conn>>, conn: Conn) {
    let mut spares = spares.lock();
    if conn.is_idle() && spares.len() < MAX_IDLE_SPARES {
        spares.push(conn);
    }
}

/// Checks a request's keys and value lengths against `limits`, before
/// anything is sent: an oversized request is the caller's error and the
/// connection stays as it was.
pub(crate) fn check_request(limits: &Limits, keys: &[&[u8]], values: &[usize]) -> Result<()> {
    if keys.len() > limits.max_keys_per_request {
        return Err(Error::invalid_argument(format!(
            "{} keys in one request exceed the server's limit of {}",
            keys.len(),
            limits.max_keys_per_request
        )));
    }
    let mut total = 1u64;
    for key in keys {
        if key.len() > limits.max_key_len {
            return Err(Error::invalid_argument(format!(
                "a key of {} bytes exceeds the server's limit of {} bytes",
                key.len(),
                limits.max_key_len
            )));
        }
        total += 8 + key.len() as u64;
    }
    for &len in values {
        if len > limits.max_value_len {
            return Err(Error::invalid_argument(format!(
                "a value of {len} bytes exceeds the server's limit of {} bytes",
                limits.max_value_len
            )));
        }
        total += 8 + len as u64;
    }
    if total > limits.max_request_len as u64 {
        return Err(Error::invalid_argument(format!(
            "a request of {total} bytes exceeds the server's limit of {} bytes",
            limits.max_request_len
        )));
    }
    Ok(())
}

/// Runs `plan` on `conn` from the calling thread, by `deadline` (that of
/// an operation of `timeout`, zero: forever) plus at most the cancel grace. When the time runs out the wait
/// is cancelled; a connection the server does not answer in the grace is
/// broken (to be dropped), never waited on longer.
fn run_plan(
    conn: &mut Conn,
    plan: &mut Plan,
    mut deadline: Deadline,
    timeout: Duration,
) -> Result<Vec<Vec<u8>>> {
    let mut cancelled = false;
    let mut step = plan.first(conn);
    loop {
        conn.send(&[&step.request], deadline)?;
        let outcome = loop {
            match conn.receive(&mut step.exchange, deadline) {
                Ok(outcome) => break outcome,
                Err(e) if e.status() != Status::Timeout => return Err(e),
                Err(_) => {}
            }
            match (cancelled, step.exchange.expire()) {
                (false, Some(cancel)) => {
                    cancelled = true;
                    deadline = grace_deadline(Instant::now(), timeout);
                    conn.send(&[&cancel], deadline)?;
                }
                _ => {
                    conn.mark_broken();
                    return Err(plan.timeout_error(timeout));
                }
            }
        };
        match plan.next(outcome, conn, timeout) {
            Next::Send(next) => step = next,
            Next::Done(result) => return result,
        }
    }
}
