//! Where a server keeps its keys: the backend behind the protocol core.
//!
//! The core hands a backend the requests that read or write data and gets
//! back an [`Outcome`](super::super::protocol::Outcome) to encode as the
//! reply. Waits and barriers are the core's own, resolved from what the
//! backend says of the keys they are on. Two kinds of backend fit behind it:
//! - **local** (the keys in this process: [`MemoryBackend`]): every request
//!   completes at once; the core wakes waits after the writes it made;
//! - **remote** (a store other servers write too, such as etcd): a request
//!   may complete later (`apply` answers `Ok(None)`), and the backend
//!   reports, through [`Backend::take_reports`], completed requests and
//!   every write anyone made ([`Backend::reports_writes`]), in the order
//!   its view of the keys took them in.
//!
//! Either way [`Backend::peek`] tells at once whether a key exists (as far
//! as the backend has seen), so a wait is answered at once or registered
//! before any later write is reported. A backend that lost track of writes
//! says so ([`Report::Missed`]) and the core asks it to look again at the
//! keys of every pending wait.

use super::super::protocol::{Key, Outcome, Request, SessionSpec};
use super::sessions::SessionId;
use super::state::ConnId;
use super::waits::WaitId;
use crate::error::Result;
use crate::store::kv::Value;
use crate::store::tcp::failure::Failure;

pub(crate) mod etcd;
mod memory;

pub(crate) use memory::MemoryBackend;

/// Identifies one request a backend completes later (unique for the
/// core's lifetime, so a late answer never reaches a connection that
/// reused the id).
pub(crate) type Ticket = u64;

/// A key that exists, as a wait sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Present {
    /// It holds this value.
    Value(Value),
    /// It is a non-empty queue (a push: one element more).
    Queued,
}

impl Present {
    /// The value, for a WAIT_GET reply (a queue has none).
    pub(crate) fn value(&self) -> Option<Value> {
        match self {
            Present::Value(v) => Some(v.clone()),
            Present::Queued => None,
        }
    }

    /// The integer it holds (a barrier's arrivals), if it holds one.
    pub(crate) fn counter(&self) -> Option<i64> {
        match self {
            Present::Value(v) => std::str::from_utf8(v).ok()?.trim().parse().ok(),
            Present::Queued => None,
        }
    }
}

/// What a remote backend reports (see [`Backend::take_reports`]).
#[derive(Debug)]
pub(crate) enum Report {
    /// A request `apply` deferred has completed.
    Completed {
        conn: ConnId,
        ticket: Ticket,
        outcome: Result<Outcome>,
    },
    /// The keys a look found for `wait` (those missing are left out).
    Looked {
        wait: WaitId,
        found: Vec<(Key, Present)>,
    },
    /// `key` was written, by this server or another.
    Written { key: Key, present: Present },
    /// Writes may have gone unreported (the backend lost track of them):
    /// every pending wait is to look again.
    Missed,
    /// A group's first failure, wherever it was decided (a backend that
    /// [keeps sessions](Backend::keeps_sessions)): its members here are
    /// told.
    GroupFailed(Failure),
}

/// What the core did to a liveness session, for a backend that
/// [keeps sessions](Backend::keeps_sessions).
#[derive(Debug)]
pub(crate) enum SessionEvent<'a> {
    /// Opened here (tentatively: the backend may refuse it), or resumed
    /// (`spec.resume`).
    Opened {
        session: SessionId,
        spec: &'a SessionSpec,
    },
    /// Closed gracefully.
    Closed { session: SessionId },
    /// Failed, as decided here: the backend records it, and reports the
    /// group's first failure ([`Report::GroupFailed`]).
    Failed {
        session: SessionId,
        failure: &'a Failure,
    },
}

/// A store of keys for the protocol core.
pub(crate) trait Backend: Send {
    /// Applies a data request (SET, GET, ADD, ...); `Ok(None)`: it
    /// completes later, reported with `ticket` from the connection `conn`.
    /// An error refuses the request (ADD to a non-integer, a value over the
    /// limit). WAIT and WAIT_GET come here before the core starts them:
    /// [`Outcome::Silent`] once what `peek` answers from shows every write
    /// the backend has acknowledged (a remote backend's view may lag).
    fn apply(&mut self, conn: ConnId, ticket: Ticket, request: &Request)
        -> Result<Option<Outcome>>;

    /// [`Backend::apply`] for a write whose keys are tied to `session`
    /// (SESSION_LEASE), on a backend that [keeps sessions](Backend::keeps_sessions);
    /// any other backend's leases are the core's.
    fn apply_leased(
        &mut self,
        conn: ConnId,
        ticket: Ticket,
        request: &Request,
        _session: SessionId,
    ) -> Result<Option<Outcome>> {
        self.apply(conn, ticket, request)
    }

    /// Whether liveness sessions are kept in the backend, shared by every
    /// server of the same store (etcd): a session's failure is decided
    /// there once for all of them, its leased keys are the backend's, and
    /// it may outlive this server (resumed on another). Then the core
    /// hands the backend every [`SessionEvent`].
    fn keeps_sessions(&self) -> bool {
        false
    }

    /// Applies a session event (only called when [`Backend::keeps_sessions`]):
    /// `Ok(None)`: it completes later, reported with `ticket` for `conn`
    /// (an open or a close, which its connection waits for).
    fn session(
        &mut self,
        _conn: ConnId,
        _ticket: Ticket,
        _event: SessionEvent,
    ) -> Result<Option<Outcome>> {
        Ok(Some(Outcome::Silent))
    }

    /// Whether keys may be tied to liveness sessions: the backend deletes
    /// them at once when their session ends ([`Backend::delete_leased`]),
    /// whatever becomes of this server afterwards.
    fn holds_leased_keys(&self) -> bool;

    /// Deletes `keys`, values and queues: what sessions that ended held.
    fn delete_leased(&mut self, keys: Vec<Key>);

    /// What `key` holds now (None: it does not exist).
    fn peek(&self, key: &[u8]) -> Option<Present>;

    /// Looks up `keys` for `wait` again (after [`Report::Missed`]), to be
    /// reported as [`Report::Looked`].
    fn look(&mut self, wait: WaitId, keys: Vec<Key>);

    /// Whether the backend reports every write ([`Report::Written`]), the
    /// core's own included: the core then wakes no wait itself.
    fn reports_writes(&self) -> bool {
        false
    }

    /// What happened since the last call (a local backend: nothing).
    fn take_reports(&mut self) -> Vec<Report>;

    /// The length of the value `key` holds (None: it holds none), for
    /// quotas.
    fn value_len(&self, key: &[u8]) -> Option<usize>;

    /// Whether `key` holds a non-empty queue, for quotas.
    fn holds_queue(&self, key: &[u8]) -> bool;

    /// What the backend holds.
    fn usage(&self) -> Usage;
}

/// What a backend holds: what quotas and metrics count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    /// Keys holding a value, plus keys holding a non-empty queue (a key
    /// holding both counts twice).
    pub(crate) keys: usize,
    /// Bytes of keys and values (and, where the backend knows them, of
    /// queue elements).
    pub(crate) bytes: u64,
}
