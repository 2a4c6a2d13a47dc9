//! The TCPStore server as a state machine with no sockets: bytes in per
//! connection, replies out per connection, in the order PyTorch's server
//! gives them. The event loop only moves bytes between sockets and this
//! core, so every behaviour here — waits, cancels, disconnects mid-wait,
//! barriers, queue wake-ups, limits, backpressure — is tested by driving
//! it directly, without threads or sleeps.
//!
//! Per connection the core holds: the incremental parser (a request still
//! arriving, at most [`Limits::max_request_len`]), the replies not yet
//! written (an [`Outbox`]), bytes received while the connection was paused
//! (at most one read), and its pending waits. A connection whose unsent
//! replies exceed [`OUTPUT_CAP`], or whose request a backend is still
//! completing, is paused: the core takes no more of its requests until the
//! replies drain, and the event loop stops reading its socket.
//!
//! A connection that must prove something first (authenticate, use TLS)
//! is in its handshake until it has: it may send VALIDATE, PING and AUTH
//! only, each read within [`Limits::HANDSHAKE`] (81 bytes); the first byte
//! of any other request closes it. It counts against the handshake budget
//! ([`HandshakeLimits::max_pending`]) rather than the connection quota, is
//! paused past [`HANDSHAKE_OUTPUT_CAP`] of unsent replies, is read
//! [`HANDSHAKE_READ`] bytes at a time, and is closed if it has not been
//! admitted within [`HandshakeLimits::timeout`] of its arrival.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::super::handshake;
use super::super::listing::GroupMembers;
use super::super::parser::RequestParser;
use super::super::protocol::{
    put_bytes, Command, Key, Limits, Outcome, Request, SessionRequest, SessionSpec, HELLO_ACK,
    HELLO_NONCE, HELLO_V2_ACK, HELLO_V2_NONCE, NOT_READY, READY, REPLY_DEFERRED_ERROR, REPLY_ERROR,
    REPLY_OK, STOP_WAITING, VALIDATE_MAGIC, WAIT_CANCELED,
};
use super::backend::{Backend, Present, Report, SessionEvent, Ticket};
use super::metrics::{ConnKind, Gauges, Metrics, Quota, Refusal};
use super::sessions::{Delivery, MembershipChange, SessionId, Sessions};
use super::waits::{WaitId, WaitReply, Waits};
use super::Quotas;
#[cfg(test)]
use super::ServerStats;
use crate::error::{Error, Result as OpResult, Status};
use crate::net::outbox::Outbox;
use crate::printable::printable;
use crate::security::access::{Admission, HandshakeLimits};
use crate::security::auth::{Nonce, Secret};
use crate::security::handshake::Challenged;
use crate::store::tcp::failure::Failure;

/// A connection's id: dense, chosen by whoever drives the core.
pub(crate) type ConnId = usize;

/// Unsent reply bytes above which a connection's requests are no longer
/// read (one reply may take it past; it resumes once under again).
pub(crate) const OUTPUT_CAP: usize = 256 << 10;

/// [`OUTPUT_CAP`] for a connection in its handshake, whose replies (the
/// server's info, PING's and AUTH's) are small.
pub(crate) const HANDSHAKE_OUTPUT_CAP: usize = 4 << 10;

/// Bytes to read at a time from a connection in its handshake: more than
/// its requests (VALIDATE, HELLO and AUTH: 91 bytes) need.
pub(crate) const HANDSHAKE_READ: usize = 256;

/// How often the event loop reads the connections that only keep a
/// session alive ([`ServerCore::reads_late`]): it does not wake for each
/// keep-alive. A TTL is still judged from what arrived (see
/// `Sessions::due`), so a silent member is found no later; what was read
/// late counts as heard when read, up to this much after it came.
pub(crate) const LATE_READ_EVERY: Duration = Duration::from_millis(50);

/// The longest value a counter can hold (`i64::MIN` in decimal), which
/// quotas charge an ADD or BARRIER for.
const MAX_COUNTER_LEN: usize = "-9223372036854775808".len();

/// Why the core refuses a connection, and what to log; it is to be closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused(pub(crate) Refusal, pub(crate) String);

impl Refused {
    fn malformed(why: impl Into<String>) -> Refused {
        Refused(Refusal::Malformed, why.into())
    }
}

/// One connection's state.
struct Connection {
    parser: RequestParser,
    /// Bytes received while paused, to process when it resumes.
    stash: Vec<u8>,
    output: Outbox,
    validated: bool,
    /// Negotiated distcore's extensions (HELLO).
    extended: bool,
    /// Negotiated version 2: every reply starts with a status byte, and
    /// errors are replies rather than a closed connection.
    status_replies: bool,
    waits: Vec<WaitId>,
    /// The request a backend is still completing.
    in_flight: Option<Box<InFlight>>,
    /// What it has shown itself to be (in the metrics once admitted).
    kind: ConnKind,
    /// What it must do before any request but the handshake's (`Open`
    /// once it has authenticated).
    admission: Admission,
    /// The challenge it was sent (the server has a secret).
    challenge: Option<Challenged>,
    /// Paused because its unsent replies passed [`OUTPUT_CAP`].
    throttled: bool,
    /// Tells this connection from an earlier one with the same id.
    serial: u64,
    /// SESSION_LEASE came: the next request's keys are leased.
    lease_next: bool,
    /// The session the request being served ties its keys to.
    leasing: Option<SessionId>,
    /// Its requests since the last of another kind were keep-alives of a
    /// session it is attached to (not the connection the session was
    /// opened on): see [`ServerCore::reads_late`].
    keeps_alive_only: bool,
}

/// A request a backend completes later.
struct InFlight {
    ticket: Ticket,
    /// When the request arrived.
    started: Instant,
    request: Request,
    /// A BARRIER's own wait, registered before its arrival is counted.
    barrier: Option<WaitId>,
}

impl Connection {
    fn paused(&self) -> bool {
        self.in_flight.is_some() || self.output.queued() > self.output_cap()
    }

    /// Whether it is through what the server requires (not in its
    /// handshake).
    fn admitted(&self) -> bool {
        self.admission == Admission::Open
    }

    /// The unsent replies past which it is paused.
    fn output_cap(&self) -> usize {
        if self.admitted() {
            OUTPUT_CAP
        } else {
            HANDSHAKE_OUTPUT_CAP
        }
    }

    /// Its kind in the metrics: in its handshake until admitted.
    fn counted_kind(&self) -> ConnKind {
        if self.admitted() {
            self.kind
        } else {
            ConnKind::Handshake
        }
    }
}

/// The server's state: connections, waits, and the backend holding the keys.
pub(crate) struct ServerCore<B> {
    limits: Limits,
    extensions: bool,
    /// The secret clients authenticate with, if any.
    secret: Option<Secret>,
    quotas: Quotas,
    handshakes: HandshakeLimits,
    metrics: Arc<Metrics>,
    backend: B,
    connections: Vec<Option<Connection>>,
    /// Open connections by kind, and those throttled now.
    gauges: Gauges,
    /// Connections in their handshake.
    in_handshake: usize,
    /// When each connection's handshake must have ended, by arrival (its
    /// id and serial; stale once it has ended or closed).
    deadlines: VecDeque<(Instant, ConnId, u64)>,
    /// The last connection serial handed out.
    serials: u64,
    /// The time of the events being handled, as the driver last said
    /// ([`ServerCore::set_time`]); the core reads no clock.
    now: Instant,
    waits: Waits,
    /// Connections given output by another connection's request (woken
    /// waits) or by a backend, to flush.
    woken: Vec<ConnId>,
    /// The last ticket handed to the backend.
    tickets: Ticket,
    /// Liveness sessions, and the groups that lost a member.
    sessions: Sessions,
    /// Connections of failed sessions, to close.
    closing: Vec<(ConnId, Refused)>,
    /// Every client serves one job: a group's failure reaches the blocked
    /// calls of connections without a session too.
    one_job: bool,
}

impl<B: Backend> ServerCore<B> {
    /// A core over `backend`, enforcing `limits`, started at `now`;
    /// `extensions`: answer distcore's HELLO (off: behave exactly as
    /// PyTorch's server).
    pub(crate) fn new(backend: B, limits: Limits, extensions: bool, now: Instant) -> ServerCore<B> {
        let sessions = match backend.keeps_sessions() {
            true => Sessions::decided_elsewhere(),
            false => Sessions::default(),
        };
        ServerCore {
            limits,
            extensions,
            secret: None,
            quotas: Quotas::default(),
            handshakes: HandshakeLimits::default(),
            metrics: Arc::new(Metrics::new(Quotas::default(), None)),
            backend,
            connections: Vec::new(),
            gauges: Gauges::default(),
            in_handshake: 0,
            deadlines: VecDeque::new(),
            serials: 0,
            now,
            waits: Waits::default(),
            woken: Vec::new(),
            tickets: 0,
            sessions,
            closing: Vec::new(),
            one_job: false,
        }
    }

    /// Every client of the server serves one job (see
    /// [`ServerOptions::one_job`](super::ServerOptions::one_job)).
    pub(crate) fn with_one_job(mut self, one_job: bool) -> Self {
        self.one_job = one_job;
        self
    }

    /// Clients authenticate with `secret` (see [`ServerCore::connect_as`]).
    pub(crate) fn with_secret(mut self, secret: Option<Secret>) -> Self {
        self.secret = secret;
        self
    }

    /// Connections and writes are refused past `quotas`.
    pub(crate) fn with_quotas(mut self, quotas: Quotas) -> Self {
        self.quotas = quotas;
        self
    }

    /// Connections in their handshake are held to `limits`.
    pub(crate) fn with_handshake_limits(mut self, limits: HandshakeLimits) -> Self {
        self.handshakes = limits;
        self
    }

    /// Counts into `metrics`.
    pub(crate) fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The events that follow happen at `now` (requests arriving, backend
    /// reports): what request durations are measured with.
    pub(crate) fn set_time(&mut self, now: Instant) {
        self.now = now;
    }

    /// A turn of the event loop begins at `now`, before its input is read:
    /// the time of what follows, and (if the turn came late) the server's
    /// stall, which moves the sessions' deadlines
    /// ([`Sessions::turn`]).
    pub(crate) fn begin_turn(&mut self, now: Instant) {
        self.set_time(now);
        self.sessions.turn(now);
    }

    /// When the next session's TTL runs out, if any has one: the event
    /// loop wakes then.
    pub(crate) fn next_session_deadline(&self) -> Option<Instant> {
        self.sessions.next_deadline()
    }

    /// The connections of the sessions whose TTL has run out by `now`: the
    /// event loop tells, with [`ServerCore::heard_unread`], which of them
    /// have input it has not read yet before [`ServerCore::expire_sessions`].
    pub(crate) fn sessions_due(&mut self, now: Instant) -> Vec<ConnId> {
        self.sessions.due(now)
    }

    /// Connection `id` has input not read yet at `now` (a turn reads a
    /// bounded batch): its member is not silent.
    pub(crate) fn heard_unread(&mut self, id: ConnId, now: Instant) {
        self.sessions.heard(id, now);
    }

    /// Ends the sessions whose TTL ran out by `now` (call once the turn's
    /// input was read), failing their groups.
    pub(crate) fn expire_sessions(&mut self, now: Instant) {
        self.set_time(now);
        for delivery in self.sessions.expire(now) {
            self.deliver(delivery);
        }
        self.delete_orphans();
    }

    /// Tells every connection of `delivery` that a member of its group
    /// failed (each of its blocked calls fails at once with the failure),
    /// and queues the failed member's own connections to close.
    fn deliver(&mut self, delivery: Delivery) {
        let error = delivery.failure.error();
        // A session of this server's ended, for a backend that decides for
        // every server: it records the failure (unless recorded already),
        // and the group's first comes back (take_backend_reports) to tell
        // the members.
        if delivery.session != 0 && self.backend.keeps_sessions() {
            let ticket = self.next_ticket();
            let failed = SessionEvent::Failed {
                session: delivery.session,
                failure: &delivery.failure,
            };
            if let Err(e) = self.backend.session(ConnId::MAX, ticket, failed) {
                log::error!("TCPStore server: recording a failure: {e}");
            }
        }
        // The group's first failure is news; a later one in a failed group
        // tells nobody.
        match delivery.news {
            true => log::warn!("TCPStore server: {}", error.message()),
            false => log::info!("TCPStore server: {}", error.message()),
        }
        for id in delivery.close {
            let why = format!("its session failed: {}", error.message());
            self.closing
                .push((id, Refused(Refusal::SessionFailed, why)));
        }
        let bystanders = match self.one_job && delivery.first {
            true => self.blocked_bystanders(),
            false => Vec::new(),
        };
        for id in delivery.tell {
            self.fail_waits(id, &error);
        }
        // One job: the blocked calls of connections without a session are
        // the job's too. PyTorch's protocol has no error reply: closing
        // the connection is the one way to end its wait now.
        for (id, status_replies) in bystanders {
            match status_replies {
                true => self.fail_waits(id, &error),
                false => {
                    let why = format!("the job failed: {}", error.message());
                    self.closing
                        .push((id, Refused(Refusal::SessionFailed, why)));
                }
            }
        }
    }

    /// Fails every blocked call of connection `id` with `error`.
    fn fail_waits(&mut self, id: ConnId, error: &Error) {
        let waits = self
            .connection(id)
            .map(|conn| std::mem::take(&mut conn.waits))
            .unwrap_or_default();
        for wait in waits {
            if let Some(wait) = self.waits.remove(wait) {
                self.served(wait.reply.command(), wait.started, true);
                self.put(id, &error_reply(REPLY_ERROR, error));
                self.woken.push(id);
            }
        }
    }

    /// The connections in no session that are blocked in a wait or a
    /// barrier, with whether they take error replies (version 2).
    fn blocked_bystanders(&self) -> Vec<(ConnId, bool)> {
        let blocked = self
            .connections
            .iter()
            .enumerate()
            .filter_map(|(id, conn)| {
                let conn = conn.as_ref()?;
                (!conn.waits.is_empty()).then_some((id, conn.status_replies))
            });
        blocked
            .filter(|(id, _)| !self.sessions.is_member(*id))
            .collect()
    }

    /// A new connection `id` (not in use) that need not authenticate, with
    /// no challenge to authenticate against, at the core's time.
    #[cfg(test)]
    pub(crate) fn connect(&mut self, id: ConnId) {
        self.connect_as(id, Admission::Open, None, self.now);
    }

    /// Whether a connection admitted as `admission` may be accepted now:
    /// one to serve at once counts against the connection quota, one in
    /// its handshake against the handshake budget. Counted in the metrics
    /// when refused.
    pub(crate) fn room_for(&self, admission: Admission) -> std::result::Result<(), Refused> {
        if admission == Admission::Open {
            return self.room_to_admit();
        }
        let max = self.handshakes.max_pending;
        if self.in_handshake < max {
            return Ok(());
        }
        self.metrics.over_quota(Quota::Handshakes);
        Err(Refused(
            Refusal::ConnectionQuota,
            format!("{max} connections are in their handshake, the most the server allows (--max-handshakes)"),
        ))
    }

    /// Whether one more connection may be served (the connection quota
    /// counts those admitted).
    fn room_to_admit(&self) -> std::result::Result<(), Refused> {
        let admitted = self.open_connections() - self.in_handshake;
        match self.quotas.max_connections {
            Some(max) if admitted >= max => {
                self.metrics.over_quota(Quota::Connections);
                Err(Refused(
                    Refusal::ConnectionQuota,
                    format!("the server holds its maximum of {max} connections"),
                ))
            }
            _ => Ok(()),
        }
    }

    /// A new connection `id` (not in use) that arrived at `now`, admitted
    /// as `admission` (not `Refused`; see [`ServerCore::room_for`]). One
    /// that must authenticate may make no request but VALIDATE, PING and
    /// AUTH until it proves it holds the secret by answering `challenge`
    /// (fresh and random for each connection of a server with a secret);
    /// one that must use TLS, none but VALIDATE and PING. Either is closed
    /// by [`ServerCore::expire_handshakes`] if not admitted in time.
    pub(crate) fn connect_as(
        &mut self,
        id: ConnId,
        admission: Admission,
        challenge: Option<Nonce>,
        now: Instant,
    ) {
        if self.connections.len() <= id {
            self.connections.resize_with(id + 1, || None);
        }
        self.disconnect(id);
        self.set_time(now);
        self.serials += 1;
        let serial = self.serials;
        let previous = self.connections[id].replace(Connection {
            parser: RequestParser::default(),
            stash: Vec::new(),
            output: Outbox::new(),
            validated: false,
            extended: false,
            status_replies: false,
            waits: Vec::new(),
            in_flight: None,
            kind: ConnKind::Handshake,
            admission,
            challenge: challenge.map(Challenged::new),
            throttled: false,
            serial,
            lease_next: false,
            leasing: None,
            keeps_alive_only: false,
        });
        debug_assert!(previous.is_none());
        *self.gauges.connections_of(ConnKind::Handshake) += 1;
        if admission != Admission::Open {
            self.in_handshake += 1;
            self.deadlines
                .push_back((now + self.handshakes.timeout, id, serial));
        }
    }

    /// What connection `id` is known to be changed (before its first
    /// request: it is in clear, or through its TLS handshake): it is
    /// admitted as `admission` instead (see [`ServerCore::connect_as`]).
    /// Refused when that admits it and the connection quota is full.
    pub(crate) fn secure(
        &mut self,
        id: ConnId,
        admission: Admission,
    ) -> std::result::Result<(), Refused> {
        if admission == Admission::Open {
            self.room_to_admit()?;
        }
        self.update(id, |conn| conn.admission = admission);
        Ok(())
    }

    /// Whether connection `id` is in its handshake (read
    /// [`HANDSHAKE_READ`] bytes at a time).
    pub(crate) fn in_handshake(&self, id: ConnId) -> bool {
        self.connections
            .get(id)
            .and_then(Option::as_ref)
            .is_some_and(|s| !s.admitted())
    }

    /// When the next handshake deadline falls, if any connection is in its
    /// handshake (possibly one that has ended since: an early wake-up).
    pub(crate) fn next_handshake_deadline(&self) -> Option<Instant> {
        self.deadlines.front().map(|(at, ..)| *at)
    }

    /// The connections still in their handshake past their deadline, by
    /// `now`: to close.
    pub(crate) fn expire_handshakes(&mut self, now: Instant) -> Vec<(ConnId, Refused)> {
        self.set_time(now);
        let mut expired = Vec::new();
        while let Some(&(at, id, serial)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            let late = self.connections.get(id).and_then(Option::as_ref);
            if late.is_some_and(|s| s.serial == serial && !s.admitted()) {
                let why = format!(
                    "it did not finish its handshake within {:?} (--handshake-timeout)",
                    self.handshakes.timeout
                );
                expired.push((id, Refused(Refusal::HandshakeTimeout, why)));
            }
        }
        expired
    }

    /// Connection `id` is gone: its waits are cancelled and its state
    /// dropped.
    pub(crate) fn disconnect(&mut self, id: ConnId) {
        self.cancel_waits(id);
        if let Some(delivery) = self.sessions.disconnect(id, self.now) {
            self.deliver(delivery);
        }
        self.delete_orphans();
        let Some(conn) = self.connections.get_mut(id).and_then(Option::take) else {
            return;
        };
        *self.gauges.connections_of(conn.counted_kind()) -= 1;
        if !conn.admitted() {
            self.in_handshake -= 1;
        }
        if conn.throttled {
            self.gauges.throttled -= 1;
        }
    }

    /// Connection `id` is now of `kind`.
    fn set_kind(&mut self, id: ConnId, kind: ConnKind) {
        self.update(id, |conn| conn.kind = kind);
    }

    /// Changes the connection `id` by `change`, keeping the count of
    /// connections by kind and of those in their handshake.
    fn update(&mut self, id: ConnId, change: impl FnOnce(&mut Connection)) {
        let Some(conn) = self.connections.get_mut(id).and_then(Option::as_mut) else {
            return;
        };
        let (kind, admitted) = (conn.counted_kind(), conn.admitted());
        change(conn);
        *self.gauges.connections_of(kind) -= 1;
        *self.gauges.connections_of(conn.counted_kind()) += 1;
        match (admitted, conn.admitted()) {
            (false, true) => self.in_handshake -= 1,
            (true, false) => self.in_handshake += 1,
            _ => {}
        }
    }

    /// Open connections (for the connection quota).
    pub(crate) fn open_connections(&self) -> usize {
        self.gauges.connections.iter().sum::<u64>() as usize
    }

    /// The metrics this core counts into.
    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Sets the metrics' gauges (after each turn of the loop).
    pub(crate) fn publish(&self) {
        let usage = self.backend.usage();
        self.metrics.publish(&Gauges {
            waiters: self.waits.len() as u64,
            keys: usage.keys as u64,
            stored_bytes: usage.bytes,
            ..self.gauges
        });
    }

    fn connection(&mut self, id: ConnId) -> Option<&mut Connection> {
        self.connections.get_mut(id)?.as_mut()
    }

    /// Whether connection `id` may be read late (the event loop reads such
    /// connections every [`LATE_READ_EVERY`], not at each arrival): it
    /// only keeps a session alive — its requests since the last of another
    /// kind were SESSION_KEEPALIVEs, it is attached to the session rather
    /// than the connection the session was opened on (whose loss ends it),
    /// and nothing of its waits, is in flight or is held back. A request
    /// of another kind on it is served up to that much late, once.
    pub(crate) fn reads_late(&self, id: ConnId) -> bool {
        self.connections
            .get(id)
            .and_then(Option::as_ref)
            .is_some_and(|c| {
                c.keeps_alive_only && c.waits.is_empty() && c.stash.is_empty() && !c.paused()
            })
    }

    /// Whether to read more of `id`'s requests now (false while it is
    /// paused or holds received bytes not yet processed).
    pub(crate) fn wants_input(&self, id: ConnId) -> bool {
        self.connections
            .get(id)
            .and_then(Option::as_ref)
            .is_some_and(|s| s.stash.is_empty() && !s.paused())
    }

    /// The unsent replies of `id`, for the event loop to write.
    pub(crate) fn output(&mut self, id: ConnId) -> Option<&mut Outbox> {
        Some(&mut self.connection(id)?.output)
    }

    /// Connections that got replies from other connections' requests
    /// since the last call.
    pub(crate) fn take_woken(&mut self) -> Vec<ConnId> {
        std::mem::take(&mut self.woken)
    }

    /// Connections to close since the last call: those of sessions that
    /// failed (so their processes learn it).
    pub(crate) fn take_closing(&mut self) -> Vec<(ConnId, Refused)> {
        std::mem::take(&mut self.closing)
    }

    /// Bytes `data` arrived on `id`: handles every request they complete,
    /// keeping the rest while the connection is paused.
    pub(crate) fn receive(&mut self, id: ConnId, data: &[u8]) -> std::result::Result<(), Refused> {
        let Some(conn) = self.connection(id) else {
            return Ok(());
        };
        if !conn.stash.is_empty() || conn.paused() {
            conn.stash.extend_from_slice(data);
            self.note_throttled(id);
            return self.resume(id);
        }
        self.process(id, data)
    }

    /// Counts `id` as throttled if what holds back its input is its unsent
    /// replies (once per episode).
    fn note_throttled(&mut self, id: ConnId) {
        let Some(conn) = self.connections.get_mut(id).and_then(Option::as_mut) else {
            return;
        };
        if conn.output.queued() > OUTPUT_CAP && !conn.throttled {
            conn.throttled = true;
            self.gauges.throttled += 1;
            self.metrics.throttled();
        }
    }

    /// Processes what `id` received while paused, if it no longer is
    /// (call after its output drained).
    pub(crate) fn resume(&mut self, id: ConnId) -> std::result::Result<(), Refused> {
        let Some(conn) = self.connections.get_mut(id).and_then(Option::as_mut) else {
            return Ok(());
        };
        if conn.stash.is_empty() || conn.paused() {
            return Ok(());
        }
        if std::mem::take(&mut conn.throttled) {
            self.gauges.throttled -= 1;
        }
        let stash = std::mem::take(&mut conn.stash);
        self.process(id, &stash)
    }

    fn process(&mut self, id: ConnId, mut data: &[u8]) -> std::result::Result<(), Refused> {
        while !data.is_empty() {
            let Some(conn) = self.connections.get_mut(id).and_then(Option::as_mut) else {
                return Ok(());
            };
            if conn.paused() {
                conn.stash.extend_from_slice(data);
                self.note_throttled(id);
                return Ok(());
            }
            let limits = if conn.admitted() {
                self.limits
            } else {
                let refusal = conn
                    .parser
                    .is_idle()
                    .then(|| before_admission(conn.admission, data[0]))
                    .flatten();
                if let Some((kind, message)) = refusal {
                    self.tell(id, &Error::permission_denied(message.clone()));
                    return Err(Refused(kind, message));
                }
                Limits::HANDSHAKE
            };
            let (n, request) = conn
                .parser
                .parse(data, &limits)
                .map_err(|e| Refused::malformed(e.to_string()))?;
            data = &data[n..];
            if let Some(request) = request {
                self.execute(id, request)?;
            }
        }
        Ok(())
    }

    /// Where the rest of a large value of `id` can be received directly
    /// (see [`RequestParser::direct_target`]).
    pub(crate) fn direct_target(&mut self, id: ConnId) -> Option<&mut [u8]> {
        let conn = self.connection(id)?;
        if !conn.stash.is_empty() || conn.paused() {
            return None;
        }
        conn.parser.direct_target()
    }

    /// `n` bytes were received into [`ServerCore::direct_target`].
    pub(crate) fn direct_filled(
        &mut self,
        id: ConnId,
        n: usize,
    ) -> std::result::Result<(), Refused> {
        let limits = self.limits;
        let Some(conn) = self.connection(id) else {
            return Ok(());
        };
        match conn.parser.direct_filled(n, &limits) {
            Ok(Some(request)) => self.execute(id, request),
            Ok(None) => Ok(()),
            Err(e) => Err(Refused::malformed(e.to_string())),
        }
    }

    /// Takes in what the backend reported (completed requests, looks,
    /// writes); returns the connections refused meanwhile, to close. Their
    /// replies, and those of woken waits, are in [`ServerCore::take_woken`].
    pub(crate) fn take_backend_reports(&mut self) -> Vec<(ConnId, Refused)> {
        let mut refused = Vec::new();
        for report in self.backend.take_reports() {
            match report {
                Report::Completed {
                    conn,
                    ticket,
                    outcome,
                } => {
                    if let Err(why) = self.complete(conn, ticket, outcome) {
                        refused.push((conn, why));
                    }
                    self.woken.push(conn);
                }
                Report::Looked { wait, found } => {
                    for (key, present) in found {
                        if self.waits.satisfy_one(wait, &key, &present) {
                            self.complete_waits(vec![wait]);
                            break;
                        }
                    }
                }
                Report::Written { key, present } => self.written(&key, &present),
                Report::GroupFailed(failure) => {
                    if let Some(delivery) = self.sessions.group_failed(failure, self.now) {
                        self.deliver(delivery);
                    }
                }
                Report::Missed => {
                    for (wait, keys) in self.waits.outstanding() {
                        self.backend.look(wait, keys);
                    }
                }
            }
        }
        refused
    }

    /// The backend completed the request with `ticket` that `id` had in
    /// flight (a late answer for a connection since closed is dropped).
    fn complete(
        &mut self,
        id: ConnId,
        ticket: Ticket,
        outcome: OpResult<Outcome>,
    ) -> std::result::Result<(), Refused> {
        let Some(in_flight) = self
            .connection(id)
            .and_then(|s| s.in_flight.take_if(|f| f.ticket == ticket))
        else {
            return Ok(());
        };
        let InFlight {
            request,
            barrier,
            started,
            ..
        } = *in_flight;
        // A session the backend refused to open is taken back here.
        if let (Request::Session(SessionRequest::Open { .. }), Err(_)) = (&request, &outcome) {
            if let Some(session) = self.sessions.session_id(id) {
                self.sessions.discard(session, self.now);
            }
        }
        self.settle(id, ticket, started, outcome.map(Some), request, barrier)?;
        self.resume(id)
    }

    /// The server's load.
    #[cfg(test)]
    pub(crate) fn stats(&self) -> ServerStats {
        ServerStats {
            connections: self.open_connections(),
            pending_waits: self.waits.len(),
            keys: self.backend.usage().keys,
        }
    }

    fn execute(&mut self, id: ConnId, request: Request) -> std::result::Result<(), Refused> {
        let started = self.now;
        // SESSION_LEASE applies to this request only, whatever comes of it.
        let keep_alive = request == Request::Session(SessionRequest::KeepAlive);
        let leased = self.connection(id).is_some_and(|conn| {
            conn.leasing = None;
            conn.keeps_alive_only &= keep_alive;
            std::mem::take(&mut conn.lease_next)
        });
        // A member of a group that lost one: its calls fail as its
        // blocked ones did, but for those that cannot block or that leave
        // (and SESSION_LEASE, which has no reply: what follows it fails).
        self.sessions.heard(id, started);
        if let Some(error) = self.sessions.failure_for(id).map(Failure::error) {
            let exempt = matches!(
                request,
                Request::Validate { .. }
                    | Request::Ping { .. }
                    | Request::Stats
                    | Request::CancelWait
                    | Request::Session(
                        SessionRequest::Close
                            | SessionRequest::KeepAlive
                            | SessionRequest::Lease
                            | SessionRequest::List { .. }
                    )
            );
            if !exempt {
                return self.fail(id, started, &request, &error);
            }
        }
        let (extensions, limits) = (self.extensions, self.limits);
        let leases = self.backend.holds_leased_keys();
        let outlive = self.backend.keeps_sessions();
        let Some(conn) = self.connection(id) else {
            return Ok(());
        };
        if !conn.validated {
            return match request {
                Request::Validate {
                    magic: VALIDATE_MAGIC,
                } => {
                    conn.validated = true;
                    self.set_kind(id, ConnKind::PyTorch);
                    self.served(Command::Validate, started, false);
                    Ok(())
                }
                Request::Validate { magic } => {
                    Err(Refused::malformed(format!("bad magic 0x{magic:08x}")))
                }
                // PyTorch's server ignores everything until VALIDATE.
                _ => Ok(()),
            };
        }
        let command = request.command();
        let extension = matches!(
            command,
            Command::WaitGet
                | Command::Auth
                | Command::Stats
                | Command::DeletePrefix
                | Command::ListPrefix
        );
        if extension && !conn.extended {
            return Err(Refused::malformed(format!(
                "extension command {} before HELLO",
                command.name()
            )));
        }
        if let Request::Session(session) = request {
            if !conn.status_replies {
                return Err(Refused::malformed(format!(
                    "{} before HELLO version 2",
                    command.name()
                )));
            }
            if leased {
                return Err(Refused::malformed("SESSION_LEASE before a session request"));
            }
            return self.execute_session(id, started, session);
        }
        if leased && !leasable(&request) {
            return Err(Refused::malformed(format!(
                "SESSION_LEASE before {}, which writes no key",
                command.name()
            )));
        }
        match request {
            Request::Validate { .. } => {}
            Request::Ping { nonce } if extensions && nonce == HELLO_NONCE => {
                conn.extended = true;
                conn.output.put(&HELLO_ACK.to_le_bytes());
                self.set_kind(id, ConnKind::Distcore);
            }
            Request::Ping { nonce } if extensions && nonce == HELLO_V2_NONCE => {
                conn.extended = true;
                conn.status_replies = true;
                conn.output.put(&HELLO_V2_ACK.to_le_bytes());
                let info = handshake::server_info(
                    limits,
                    conn.admission,
                    conn.challenge.as_ref(),
                    leases,
                    outlive,
                );
                self.put(id, &info.encode());
                self.set_kind(id, ConnKind::Distcore);
            }
            Request::Ping { nonce } => self.put_reply(id, &nonce.to_le_bytes()),
            Request::Auth { nonce, proof } => {
                return self.authenticate(id, started, &nonce, &proof)
            }
            Request::Stats => {
                self.publish();
                let mut reply = vec![REPLY_OK];
                put_bytes(&mut reply, self.metrics.render().as_bytes());
                self.put(id, &reply);
            }
            Request::CancelWait => {
                self.cancel_waits(id);
                self.put_reply(id, &[WAIT_CANCELED]);
            }
            // Started once the backend's view shows this connection's
            // acknowledged writes (at once for a local backend): see finish.
            Request::Wait { .. } | Request::WaitGet { .. } => {
                let ticket = self.next_ticket();
                let applied = self.backend.apply(id, ticket, &request);
                return self.settle(id, ticket, started, applied, request, None);
            }
            Request::Barrier {
                ref key,
                world_size,
            } => {
                if let Err(e) = self.check_quotas(&request) {
                    return self.fail(id, started, &request, &e);
                }
                // Waiting before arriving: an arrival reported before this
                // one's answer still counts (a remote backend).
                let wait = self.waits.register(
                    id,
                    vec![key.clone()],
                    WaitReply::Barrier { world_size },
                    started,
                );
                if let Some(conn) = self.connection(id) {
                    conn.waits.push(wait);
                }
                let arrive = Request::Add {
                    key: key.clone(),
                    delta: 1,
                };
                let ticket = self.next_ticket();
                let applied = self.backend.apply(id, ticket, &arrive);
                return self.settle(id, ticket, started, applied, request, Some(wait));
            }
            data => {
                let checked = match leased {
                    true => self.lease(id),
                    false => Ok(()),
                };
                if let Err(e) = checked.and_then(|()| self.check_quotas(&data)) {
                    return self.fail(id, started, &data, &e);
                }
                let ticket = self.next_ticket();
                let leasing = self.connection(id).and_then(|conn| conn.leasing);
                let applied = match leasing {
                    Some(session) if self.backend.keeps_sessions() => {
                        self.backend.apply_leased(id, ticket, &data, session)
                    }
                    _ => self.backend.apply(id, ticket, &data),
                };
                return self.settle(id, ticket, started, applied, data, None);
            }
        }
        self.served(command, started, false);
        Ok(())
    }

    /// The request being served on `id` came after SESSION_LEASE: the
    /// keys it writes are to be tied to the connection's session, once
    /// written. An error for the request when the connection has no
    /// session or the backend cannot hold leased keys.
    fn lease(&mut self, id: ConnId) -> OpResult<()> {
        if !self.backend.holds_leased_keys() {
            return Err(Error::not_supported(
                "this server's backend cannot tie keys to sessions",
            ));
        }
        let session = self.sessions.lessee(id)?;
        if let Some(conn) = self.connection(id) {
            conn.leasing = Some(session);
        }
        Ok(())
    }

    /// Keeps the leases true once `request` of `id` has written: the keys
    /// it wrote are tied to the session it leased them to, or untied from
    /// any (the last write of a key decides, as with etcd's leases).
    fn note_leases(&mut self, id: ConnId, request: &Request, outcome: &Outcome) {
        let leasing = self.connection(id).and_then(|conn| conn.leasing.take());
        // A backend that keeps sessions keeps their keys too.
        if leasing.is_none() && !self.sessions.holds_keys() || self.backend.keeps_sessions() {
            return;
        }
        let mut note = |key: &[u8]| match leasing {
            Some(session) => self.sessions.tie(session, key),
            None => self.sessions.untie(key),
        };
        match request {
            Request::Set { key, .. }
            | Request::Add { key, .. }
            | Request::Append { key, .. }
            | Request::QueuePush { key, .. }
            | Request::DeleteKey { key } => note(key),
            // Only if it swapped (or the key held its desired value).
            Request::CompareSet { key, desired, .. } => {
                if matches!(outcome, Outcome::Value(v) if v[..] == desired[..]) {
                    note(key);
                }
            }
            Request::MultiSet { pairs } => pairs.iter().for_each(|(key, _)| note(key)),
            Request::DeletePrefix { prefix } => self.sessions.untie_prefix(prefix),
            _ => {}
        }
    }

    /// Publishes the memberships of the recoverable groups that changed
    /// this turn (call once the turn's input was served): each new epoch
    /// is written to the group's membership key and announced on its
    /// epoch key, waking [`watch_members`](crate::store::tcp::TcpStore::watch_members);
    /// a group with no member left loses both.
    pub(crate) fn publish_memberships(&mut self) {
        for change in self.sessions.take_changes() {
            match change {
                MembershipChange::Now { group, members } => {
                    let group = String::from_utf8_lossy(&group).into_owned();
                    let epoch = members.epoch;
                    let record = members.encode().into_bytes();
                    self.write_internal(GroupMembers::key(&group), record);
                    let announced = epoch.to_string().into_bytes();
                    self.write_internal(GroupMembers::epoch_key(&group, epoch), announced);
                }
                MembershipChange::Gone { group } => {
                    let group = String::from_utf8_lossy(&group).into_owned();
                    let prefix = GroupMembers::key(&group).into_bytes();
                    let ticket = self.next_ticket();
                    let gone = Request::DeletePrefix { prefix };
                    if let Err(e) = self.backend.apply(ConnId::MAX, ticket, &gone) {
                        log::warn!("TCPStore server: deleting group '{group}''s membership: {e}");
                    }
                }
            }
        }
    }

    /// Sets `key` to `value` for the server itself (no connection asked),
    /// waking its waits.
    fn write_internal(&mut self, key: String, value: Vec<u8>) {
        let key = key.into_bytes();
        let ticket = self.next_ticket();
        let set = Request::Set {
            key: key.clone(),
            value: value.into(),
        };
        match self.backend.apply(ConnId::MAX, ticket, &set) {
            Ok(_) => self.wake(&key, false),
            Err(e) => log::warn!("TCPStore server: writing '{}': {e}", printable(&key)),
        }
    }

    /// Deletes the keys of the sessions that ended: they die with their
    /// owner, whatever way it ended.
    fn delete_orphans(&mut self) {
        let keys = self.sessions.take_orphans();
        if !keys.is_empty() {
            self.backend.delete_leased(keys);
        }
    }

    /// A request of the liveness sessions (SESSION_OPEN and the others) on
    /// `id`, a version 2 connection.
    fn execute_session(
        &mut self,
        id: ConnId,
        started: Instant,
        session: SessionRequest,
    ) -> std::result::Result<(), Refused> {
        let now = self.now;
        if session == SessionRequest::Lease {
            // A modifier of the next request: no reply of its own.
            if let Some(conn) = self.connection(id) {
                conn.lease_next = true;
            }
            self.served(Command::SessionLease, started, false);
            return Ok(());
        }
        let (reply, delivery) = match &session {
            SessionRequest::Open { spec } => {
                match SessionSpec::decode(spec, self.limits.max_key_len) {
                    None => (
                        Err(Error::invalid_argument("a malformed session spec")),
                        None,
                    ),
                    Some(spec) if spec.resume && !self.backend.keeps_sessions() => (
                        Err(Error::new(
                            Status::InvalidState,
                            "this server's sessions do not outlive it: nothing to resume",
                        )),
                        None,
                    ),
                    Some(spec) => {
                        let (opened, delivery) = self.sessions.open(id, spec.clone(), now);
                        if let Some(delivery) = delivery {
                            self.deliver(delivery);
                        }
                        match opened {
                            Ok(sid) if self.backend.keeps_sessions() => {
                                return self.keep_session(id, started, session, sid, &spec);
                            }
                            opened => (opened.map(|sid| sid.to_le_bytes().to_vec()), None),
                        }
                    }
                }
            }
            SessionRequest::Attach { id: sid } => (
                self.sessions.attach(id, *sid, now).map(|()| Vec::new()),
                None,
            ),
            // Heard already, as every request is (see `execute`).
            SessionRequest::KeepAlive => {
                let failed = self.sessions.failure_for(id).map(Failure::error);
                let alive = self.sessions.is_member(id);
                let reply = match (failed, alive) {
                    (Some(error), _) => Err(error),
                    // No reply: a keep-alive's reply would cost a send (and
                    // its loopback delivery) per keep-alive, on both sides.
                    (None, true) => {
                        let attached = !self.sessions.is_opener(id);
                        if let Some(conn) = self.connection(id) {
                            conn.keeps_alive_only = attached;
                        }
                        self.served(Command::SessionKeepAlive, started, false);
                        return Ok(());
                    }
                    (None, false) => Err(Error::new(
                        Status::InvalidState,
                        "this connection belongs to no session",
                    )),
                };
                (reply, None)
            }
            SessionRequest::Close => {
                let closing = self.sessions.session_id(id);
                let closed = self.sessions.close(id, now);
                if let (Ok(()), Some(sid)) = (&closed, closing) {
                    if self.backend.keeps_sessions() {
                        let ticket = self.next_ticket();
                        let event = SessionEvent::Closed { session: sid };
                        let applied = self.backend.session(id, ticket, event);
                        let request = Request::Session(session);
                        return self.settle(id, ticket, started, applied, request, None);
                    }
                }
                (closed.map(|()| Vec::new()), None)
            }
            SessionRequest::Report { message } => {
                let message = String::from_utf8_lossy(message).into_owned();
                match self.sessions.report(id, message, now) {
                    Ok(delivery) => (Ok(Vec::new()), delivery),
                    Err(e) => (Err(e), None),
                }
            }
            SessionRequest::Lease => unreachable!("handled above"),
            SessionRequest::List { prefix } => {
                let (connections, waits) = (&self.connections, &self.waits);
                let waiting_on = |conn: ConnId| -> Vec<&[u8]> {
                    let Some(Some(conn)) = connections.get(conn) else {
                        return Vec::new();
                    };
                    conn.waits.iter().flat_map(|w| waits.keys_of(*w)).collect()
                };
                let listing = self.sessions.list(prefix, now, waiting_on);
                let mut reply = Vec::new();
                put_bytes(&mut reply, &listing.encode(self.limits.max_value_len));
                (Ok(reply), None)
            }
        };
        if let Some(delivery) = delivery {
            self.deliver(delivery);
        }
        self.delete_orphans();
        let request = Request::Session(session);
        match reply {
            Ok(bytes) => {
                self.put_reply(id, &bytes);
                self.served(request.command(), started, false);
                Ok(())
            }
            Err(error) => self.fail(id, started, &request, &error),
        }
    }

    /// Session `sid`, just opened here on `id` for `spec`, is to be kept
    /// by the backend: its answer waits for the backend's (which may
    /// refuse it: see `complete`).
    fn keep_session(
        &mut self,
        id: ConnId,
        started: Instant,
        request: SessionRequest,
        sid: SessionId,
        spec: &SessionSpec,
    ) -> std::result::Result<(), Refused> {
        let ticket = self.next_ticket();
        let event = SessionEvent::Opened { session: sid, spec };
        let applied = self.backend.session(id, ticket, event);
        if applied.is_err() {
            self.sessions.discard(sid, self.now);
        }
        self.settle(
            id,
            ticket,
            started,
            applied,
            Request::Session(request),
            None,
        )
    }

    /// Counts a request of `command` that arrived at `started` and has
    /// been answered.
    fn served(&self, command: Command, started: Instant, failed: bool) {
        let took = self.now.saturating_duration_since(started);
        self.metrics.served(command, took, failed);
    }

    /// AUTH: checks the proof of `id` against its challenge; on success
    /// answers with the server's own proof, on failure tells the client
    /// and closes the connection. The secret is never logged.
    fn authenticate(
        &mut self,
        id: ConnId,
        started: Instant,
        client_nonce: &[u8],
        proof: &[u8],
    ) -> std::result::Result<(), Refused> {
        let secret = self.secret.clone();
        let Some(conn) = self.connection(id) else {
            return Ok(());
        };
        let answered = handshake::answer_auth(
            secret.as_ref(),
            conn.challenge.as_ref(),
            client_nonce,
            proof,
        );
        let reply = match answered {
            Ok(reply) => reply,
            Err(message) => {
                self.tell(id, &Error::permission_denied(message));
                self.served(Command::Auth, started, true);
                return Err(Refused(Refusal::AuthenticationFailed, message.into()));
            }
        };
        if let Err(refused) = self.room_to_admit() {
            self.tell(id, &Error::quota_exceeded(refused.1.clone()));
            self.served(Command::Auth, started, true);
            return Err(refused);
        }
        self.update(id, |conn| conn.admission = Admission::Open);
        self.put(id, &reply);
        self.served(Command::Auth, started, false);
        Ok(())
    }

    /// Sends `error` to `id` if its client reads errors (version 2), as
    /// an answer to the request it made.
    fn tell(&mut self, id: ConnId, error: &Error) {
        if let Some(conn) = self.connection(id) {
            if conn.status_replies {
                conn.output.put(&error_reply(REPLY_ERROR, error));
            }
        }
    }

    /// Whether a write of `request` stays within the key and stored-byte
    /// quotas, as far as the backend's view of the keys it names tells.
    fn check_quotas(&self, request: &Request) -> OpResult<()> {
        let (max_keys, max_bytes) = (self.quotas.max_keys, self.quotas.max_stored_bytes);
        if max_keys.is_none() && max_bytes.is_none() {
            return Ok(());
        }
        let mut new_keys = 0usize;
        let mut growth = 0i64;
        // `key`, whose value is `old` bytes long (None: it has none), is
        // to hold `len` bytes.
        let mut write = |key: &[u8], old: Option<usize>, len: usize| match old {
            Some(old) => growth += len as i64 - old as i64,
            None => {
                new_keys += 1;
                growth += (key.len() + len) as i64;
            }
        };
        let old = |key: &[u8]| self.backend.value_len(key);
        match request {
            Request::Set { key, value } => write(key, old(key), value.len()),
            // Charged as if it swaps: whether it does is the backend's to
            // decide.
            Request::CompareSet { key, desired, .. } => write(key, old(key), desired.len()),
            // Charged for the longest a counter's value can be (its new
            // value is the backend's to compute).
            Request::Add { key, .. } | Request::Barrier { key, .. } => {
                let before = old(key);
                write(key, before, before.unwrap_or(0).max(MAX_COUNTER_LEN));
            }
            Request::Append { key, value } => {
                let before = old(key);
                write(key, before, before.unwrap_or(0) + value.len());
            }
            // Charged for the state the whole request leaves: a key named
            // again is written once, with its last value (as it applies).
            Request::MultiSet { pairs } => {
                let mut last: HashMap<&[u8], usize> = HashMap::with_capacity(pairs.len());
                for (key, value) in pairs {
                    last.insert(&key[..], value.len());
                }
                for (key, len) in last {
                    write(key, old(key), len);
                }
            }
            Request::QueuePush { key, value } => {
                if !self.backend.holds_queue(key) {
                    new_keys += 1;
                }
                growth += (key.len() + value.len()) as i64;
            }
            _ => return Ok(()),
        }
        let usage = self.backend.usage();
        let key = || match request {
            Request::MultiSet { .. } => "a MULTI_SET".to_owned(),
            Request::Set { key, .. }
            | Request::CompareSet { key, .. }
            | Request::Add { key, .. }
            | Request::Barrier { key, .. }
            | Request::Append { key, .. }
            | Request::QueuePush { key, .. } => format!("key '{}'", printable(key)),
            _ => "the request".to_owned(),
        };
        if let Some(max) = max_keys {
            if new_keys > 0 && usage.keys + new_keys > max {
                self.metrics.over_quota(Quota::Keys);
                return Err(Error::quota_exceeded(format!(
                    "quota exceeded: the server holds its maximum of {max} keys; {} was not written",
                    key()
                )));
            }
        }
        if let Some(max) = max_bytes {
            if growth > 0 && usage.bytes.saturating_add(growth as u64) > max {
                self.metrics.over_quota(Quota::StoredBytes);
                return Err(Error::quota_exceeded(format!(
                    "quota exceeded: the server holds {} of its maximum of {max} stored bytes; {} ({growth} bytes more) was not written",
                    usage.bytes,
                    key()
                )));
            }
        }
        Ok(())
    }

    fn next_ticket(&mut self) -> Ticket {
        self.tickets += 1;
        self.tickets
    }

    /// Finishes `request` with what the backend made of it, or keeps it
    /// in flight with `ticket` (pausing the connection) when the backend
    /// completes it later. A BARRIER that fails takes its wait back.
    fn settle(
        &mut self,
        id: ConnId,
        ticket: Ticket,
        started: Instant,
        applied: OpResult<Option<Outcome>>,
        request: Request,
        barrier: Option<WaitId>,
    ) -> std::result::Result<(), Refused> {
        match applied {
            Ok(Some(outcome)) => self.finish(id, started, request, outcome),
            Ok(None) => {
                if let Some(conn) = self.connection(id) {
                    conn.in_flight = Some(Box::new(InFlight {
                        ticket,
                        started,
                        request,
                        barrier,
                    }));
                }
            }
            Err(e) => {
                if let Some(wait) = barrier {
                    self.drop_wait(id, wait);
                }
                self.fail(id, started, &request, &e)?;
            }
        }
        Ok(())
    }

    /// A request of `id` failed: an error reply on a version 2 connection
    /// (a deferred one for the requests that have no reply), the connection
    /// refused otherwise (as PyTorch's server does).
    fn fail(
        &mut self,
        id: ConnId,
        started: Instant,
        request: &Request,
        error: &crate::Error,
    ) -> std::result::Result<(), Refused> {
        self.served(request.command(), started, true);
        let Some(conn) = self.connection(id) else {
            return Ok(());
        };
        if !conn.status_replies {
            return Err(Refused(Refusal::RequestFailed, error.message().to_string()));
        }
        let status = match request {
            Request::Set { .. } | Request::MultiSet { .. } | Request::QueuePush { .. } => {
                REPLY_DEFERRED_ERROR
            }
            _ => REPLY_ERROR,
        };
        conn.output.put(&error_reply(status, error));
        Ok(())
    }

    /// Replies to `request` with its `outcome` and wakes what it wrote.
    fn finish(&mut self, id: ConnId, started: Instant, request: Request, outcome: Outcome) {
        // A wait the backend let start takes its keys.
        let request = match request {
            Request::Wait { keys } => {
                return self.start_wait(id, keys, WaitReply::StopWaiting, started)
            }
            Request::WaitGet { keys } => {
                let reply = WaitReply::Values {
                    keys: keys.clone(),
                    seen: HashMap::new(),
                };
                return self.start_wait(id, keys, reply, started);
            }
            other => other,
        };
        // A barrier is counted when its wait ends.
        if !matches!(request, Request::Barrier { .. }) {
            self.served(request.command(), started, false);
        }
        self.note_leases(id, &request, &outcome);
        match (&request, outcome) {
            // Its own wait answers (this arrival's count releases it, or a
            // later one).
            (Request::Barrier { key, .. }, Outcome::Int(arrived)) => {
                let released = self.waits.released_barriers(key, arrived);
                self.complete_waits(released);
            }
            // Acknowledged on a version 2 connection: it may be refused.
            (Request::Append { .. }, Outcome::Silent) => self.put_reply(id, &[]),
            // Kept by the backend (its open or close completed).
            (Request::Session(SessionRequest::Open { .. }), _) => {
                let session = self.sessions.session_id(id).unwrap_or_default();
                self.put_reply(id, &session.to_le_bytes());
            }
            (Request::Session(_), _) => self.put_reply(id, &[]),
            (_, outcome) => self.reply(id, outcome),
        }
        match &request {
            Request::Set { key, .. }
            | Request::CompareSet { key, .. }
            | Request::Add { key, .. }
            | Request::Append { key, .. }
            | Request::Barrier { key, .. } => self.wake(key, false),
            Request::QueuePush { key, .. } => self.wake(key, true),
            Request::MultiSet { pairs } => {
                for (key, _) in pairs {
                    self.wake(key, false);
                }
            }
            _ => {}
        }
    }

    /// Encodes `outcome` as PyTorch's reply on `id`.
    fn reply(&mut self, id: ConnId, outcome: Outcome) {
        let Some(conn) = self.connection(id) else {
            return;
        };
        let out = &mut conn.output;
        if matches!(outcome, Outcome::Silent) {
            // SET, MULTI_SET, QUEUE_PUSH: no reply when they succeed, even
            // on a version 2 connection, so a client that closes right
            // after them leaves no unread byte (which would reset the
            // connection and could lose them).
            return;
        }
        if conn.status_replies {
            out.put(&[REPLY_OK]);
        }
        match outcome {
            Outcome::Silent => {}
            Outcome::Value(value) => out.put_value(&value),
            Outcome::Values(values) => out.put_values(values),
            Outcome::Int(n) => out.put(&n.to_le_bytes()),
            Outcome::Ready(ready) => out.put(&[if ready { READY } else { NOT_READY }]),
            Outcome::Popped { before, value } => {
                out.put(&before.to_le_bytes());
                if let Some(value) = &value {
                    out.put_value(value);
                }
            }
            Outcome::Keys(keys) => {
                out.put(&(keys.len() as i64).to_le_bytes());
                out.put_values(keys.into_iter().map(|k| Some(k.into())).collect());
            }
        }
    }

    /// Queues plain bytes on `id`.
    fn put(&mut self, id: ConnId, bytes: &[u8]) {
        if let Some(conn) = self.connection(id) {
            conn.output.put(bytes);
        }
    }

    /// Queues a reply on `id`, after the status byte where it has them.
    fn put_reply(&mut self, id: ConnId, bytes: &[u8]) {
        if let Some(conn) = self.connection(id) {
            if conn.status_replies {
                conn.output.put(&[REPLY_OK]);
            }
            conn.output.put(bytes);
        }
    }

    /// Starts a wait of `id` for `keys`: answered at once when they all
    /// exist, registered for the missing ones otherwise.
    fn start_wait(
        &mut self,
        id: ConnId,
        mut keys: Vec<Key>,
        mut reply: WaitReply,
        started: Instant,
    ) {
        keys.sort_unstable();
        keys.dedup();
        keys.retain(|k| match self.backend.peek(k) {
            Some(present) => {
                reply.record(k, &present);
                false
            }
            None => true,
        });
        if keys.is_empty() {
            self.served(reply.command(), started, false);
            self.send_wait_reply(id, &reply);
            return;
        }
        let wait = self.waits.register(id, keys, reply, started);
        if let Some(conn) = self.connection(id) {
            conn.waits.push(wait);
        }
    }

    /// This server wrote `key` (`pushed`: a queue element): wakes the
    /// waits on it (unless the backend reports every write itself).
    fn wake(&mut self, key: &[u8], pushed: bool) {
        if self.backend.reports_writes() || !self.waits.is_waited(key) {
            return;
        }
        let present = match self.backend.peek(key) {
            Some(_) if pushed => Present::Queued,
            Some(present) => present,
            None => return,
        };
        self.written(key, &present);
    }

    /// `key` was written and is `present`: completes the waits it satisfies
    /// (only the oldest for a queue element) and releases the barriers its
    /// count reaches.
    fn written(&mut self, key: &[u8], present: &Present) {
        let mut done = self.waits.satisfy(key, present);
        if self.waits.has_barrier(key) {
            if let Some(arrived) = present.counter() {
                done.extend(self.waits.released_barriers(key, arrived));
            }
        }
        self.complete_waits(done);
    }

    /// Answers the waits `done` and queues their connections to flush.
    fn complete_waits(&mut self, done: Vec<WaitId>) {
        for id in done {
            if let Some(wait) = self.waits.remove(id) {
                self.served(wait.reply.command(), wait.started, false);
                let conn = wait.conn;
                if let Some(conn) = self.connection(conn) {
                    conn.waits.retain(|w| *w != id);
                }
                self.send_wait_reply(conn, &wait.reply);
                self.woken.push(conn);
            }
        }
    }

    /// Takes back the wait `wait` of `id`, unanswered.
    fn drop_wait(&mut self, id: ConnId, wait: WaitId) {
        self.waits.remove(wait);
        if let Some(conn) = self.connection(id) {
            conn.waits.retain(|w| *w != wait);
        }
    }

    fn send_wait_reply(&mut self, id: ConnId, reply: &WaitReply) {
        match reply {
            WaitReply::StopWaiting | WaitReply::Barrier { .. } => {
                self.put_reply(id, &[STOP_WAITING])
            }
            WaitReply::Values { keys, seen } => {
                // The latest values (as each was seen if deleted since).
                let values = keys
                    .iter()
                    .map(|k| match self.backend.peek(k) {
                        Some(present) => present.value(),
                        None => seen.get(k).cloned(),
                    })
                    .collect();
                self.put_reply(id, &[STOP_WAITING]);
                if let Some(conn) = self.connection(id) {
                    conn.output.put_values(values);
                }
            }
        }
    }

    fn cancel_waits(&mut self, id: ConnId) {
        let waits = self
            .connection(id)
            .map(|s| std::mem::take(&mut s.waits))
            .unwrap_or_default();
        for wait in waits {
            self.waits.remove(wait);
        }
    }
}

/// Whether SESSION_LEASE may come before `request`: it writes keys.
fn leasable(request: &Request) -> bool {
    matches!(
        request,
        Request::Set { .. }
            | Request::Add { .. }
            | Request::CompareSet { .. }
            | Request::Append { .. }
            | Request::MultiSet { .. }
            | Request::QueuePush { .. }
    )
}

/// Why a connection in its handshake, admitted as `admission`, may not
/// make the request whose first byte is `byte`: only VALIDATE and PING,
/// and AUTH where it must authenticate, are read before it is admitted;
/// any other request closes it at its first byte. (An unknown byte is the
/// parser's to refuse.)
fn before_admission(admission: Admission, byte: u8) -> Option<(Refusal, String)> {
    let command = Command::from_byte(byte)?;
    match (admission, command) {
        (_, Command::Validate | Command::Ping) | (Admission::MustAuthenticate, Command::Auth) => {
            None
        }
        (Admission::MustAuthenticate, _) => Some((
            Refusal::Unauthenticated,
            format!(
                "the server requires authentication: {} before authenticating",
                command.name()
            ),
        )),
        _ => Some((
            Refusal::Plaintext,
            format!(
                "the server requires TLS from this address: {} in clear",
                command.name()
            ),
        )),
    }
}

/// A version 2 error reply: `status` (ERROR or DEFERRED ERROR), the
/// error's code and its message.
fn error_reply(status: u8, error: &Error) -> Vec<u8> {
    let mut reply = vec![status, error.status().code() as u8];
    put_bytes(&mut reply, error.message().as_bytes());
    reply
}

#[cfg(test)]
mod tests;
