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

use super::super::parser::RequestParser;
use super::super::protocol::{
    put_bytes, Key, Limits, Request, ServerInfo, HELLO_ACK, HELLO_NONCE, HELLO_V2_ACK,
    HELLO_V2_NONCE, NOT_READY, READY, REPLY_DEFERRED_ERROR, REPLY_ERROR, REPLY_OK, STOP_WAITING,
    VALIDATE_MAGIC, WAIT_CANCELED,
};
use super::backend::{Backend, Outcome, Present, Report, Ticket};
use super::waits::{WaitId, WaitReply, Waits};
use super::ServerStats;
use crate::error::Result as OpResult;
use crate::outbox::Outbox;

/// A connection's id: dense, chosen by whoever drives the core.
pub(crate) type ConnId = usize;

/// Unsent reply bytes above which a connection's requests are no longer
/// read (one reply may take it past; it resumes once under again).
pub(crate) const OUTPUT_CAP: usize = 256 << 10;

/// Why the core refuses a connection; it is to be closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused(pub(crate) String);

/// One connection's state.
struct Session {
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
}

/// A request a backend completes later.
struct InFlight {
    ticket: Ticket,
    request: Request,
    /// A BARRIER's own wait, registered before its arrival is counted.
    barrier: Option<WaitId>,
}

impl Session {
    fn paused(&self) -> bool {
        self.in_flight.is_some() || self.output.queued() > OUTPUT_CAP
    }
}

/// The server's state: sessions, waits, and the backend holding the keys.
pub(crate) struct ServerCore<B> {
    limits: Limits,
    extensions: bool,
    backend: B,
    sessions: Vec<Option<Session>>,
    open: usize,
    waits: Waits,
    /// Connections given output by another connection's request (woken
    /// waits) or by a backend, to flush.
    woken: Vec<ConnId>,
    /// The last ticket handed to the backend.
    tickets: Ticket,
}

impl<B: Backend> ServerCore<B> {
    /// A core over `backend`, enforcing `limits`; `extensions`: answer
    /// distcore's HELLO (off: behave exactly as PyTorch's server).
    pub(crate) fn new(backend: B, limits: Limits, extensions: bool) -> ServerCore<B> {
        ServerCore {
            limits,
            extensions,
            backend,
            sessions: Vec::new(),
            open: 0,
            waits: Waits::default(),
            woken: Vec::new(),
            tickets: 0,
        }
    }

    /// A new connection `id` (not in use).
    pub(crate) fn connect(&mut self, id: ConnId) {
        if self.sessions.len() <= id {
            self.sessions.resize_with(id + 1, || None);
        }
        let previous = self.sessions[id].replace(Session {
            parser: RequestParser::default(),
            stash: Vec::new(),
            output: Outbox::new(false),
            validated: false,
            extended: false,
            status_replies: false,
            waits: Vec::new(),
            in_flight: None,
        });
        if previous.is_none() {
            self.open += 1;
        }
    }

    /// Connection `id` is gone: its waits are cancelled and its state
    /// dropped.
    pub(crate) fn disconnect(&mut self, id: ConnId) {
        self.cancel_waits(id);
        if let Some(slot) = self.sessions.get_mut(id) {
            if slot.take().is_some() {
                self.open -= 1;
            }
        }
    }

    fn session(&mut self, id: ConnId) -> Option<&mut Session> {
        self.sessions.get_mut(id)?.as_mut()
    }

    /// Whether to read more of `id`'s requests now (false while it is
    /// paused or holds received bytes not yet processed).
    pub(crate) fn wants_input(&self, id: ConnId) -> bool {
        self.sessions
            .get(id)
            .and_then(Option::as_ref)
            .is_some_and(|s| s.stash.is_empty() && !s.paused())
    }

    /// The unsent replies of `id`, for the event loop to write.
    pub(crate) fn output(&mut self, id: ConnId) -> Option<&mut Outbox> {
        Some(&mut self.session(id)?.output)
    }

    /// Connections that got replies from other connections' requests
    /// since the last call.
    pub(crate) fn take_woken(&mut self) -> Vec<ConnId> {
        std::mem::take(&mut self.woken)
    }

    /// Bytes `data` arrived on `id`: handles every request they complete,
    /// keeping the rest while the connection is paused.
    pub(crate) fn receive(&mut self, id: ConnId, data: &[u8]) -> std::result::Result<(), Refused> {
        let Some(session) = self.session(id) else {
            return Ok(());
        };
        if !session.stash.is_empty() || session.paused() {
            session.stash.extend_from_slice(data);
            return self.resume(id);
        }
        self.process(id, data)
    }

    /// Processes what `id` received while paused, if it no longer is
    /// (call after its output drained).
    pub(crate) fn resume(&mut self, id: ConnId) -> std::result::Result<(), Refused> {
        let Some(session) = self.session(id) else {
            return Ok(());
        };
        if session.stash.is_empty() || session.paused() {
            return Ok(());
        }
        let stash = std::mem::take(&mut session.stash);
        self.process(id, &stash)
    }

    fn process(&mut self, id: ConnId, mut data: &[u8]) -> std::result::Result<(), Refused> {
        while !data.is_empty() {
            let limits = self.limits;
            let Some(session) = self.session(id) else {
                return Ok(());
            };
            if session.paused() {
                session.stash.extend_from_slice(data);
                return Ok(());
            }
            let (n, request) = session
                .parser
                .parse(data, &limits)
                .map_err(|e| Refused(e.to_string()))?;
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
        let session = self.session(id)?;
        if !session.stash.is_empty() || session.paused() {
            return None;
        }
        session.parser.direct_target()
    }

    /// `n` bytes were received into [`ServerCore::direct_target`].
    pub(crate) fn direct_filled(
        &mut self,
        id: ConnId,
        n: usize,
    ) -> std::result::Result<(), Refused> {
        let limits = self.limits;
        let Some(session) = self.session(id) else {
            return Ok(());
        };
        match session.parser.direct_filled(n, &limits) {
            Ok(Some(request)) => self.execute(id, request),
            Ok(None) => Ok(()),
            Err(e) => Err(Refused(e.to_string())),
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
            .session(id)
            .and_then(|s| s.in_flight.take_if(|f| f.ticket == ticket))
        else {
            return Ok(());
        };
        let InFlight {
            request, barrier, ..
        } = *in_flight;
        self.settle(id, ticket, outcome.map(Some), request, barrier)?;
        self.resume(id)
    }

    /// The server's load.
    pub(crate) fn stats(&self) -> ServerStats {
        ServerStats {
            connections: self.open,
            pending_waits: self.waits.len(),
            keys: self.backend.num_keys().unwrap_or(0),
        }
    }

    fn execute(&mut self, id: ConnId, request: Request) -> std::result::Result<(), Refused> {
        let extensions = self.extensions;
        let Some(session) = self.session(id) else {
            return Ok(());
        };
        if !session.validated {
            return match request {
                Request::Validate {
                    magic: VALIDATE_MAGIC,
                } => {
                    session.validated = true;
                    Ok(())
                }
                Request::Validate { magic } => Err(Refused(format!("bad magic 0x{magic:08x}"))),
                // PyTorch's server ignores everything until VALIDATE.
                _ => Ok(()),
            };
        }
        match request {
            Request::Validate { .. } => {}
            Request::Ping { nonce } if extensions && nonce == HELLO_NONCE => {
                session.extended = true;
                session.output.put(&HELLO_ACK.to_le_bytes());
            }
            Request::Ping { nonce } if extensions && nonce == HELLO_V2_NONCE => {
                session.extended = true;
                session.status_replies = true;
                session.output.put(&HELLO_V2_ACK.to_le_bytes());
                let info = ServerInfo {
                    limits: self.limits,
                };
                self.put(id, &info.encode());
            }
            Request::Ping { nonce } => self.put_reply(id, &nonce.to_le_bytes()),
            Request::CancelWait => {
                self.cancel_waits(id);
                self.put_reply(id, &[WAIT_CANCELED]);
            }
            Request::WaitGet { .. } if !session.extended => {
                return Err(Refused("extension command before HELLO".into()))
            }
            // Started once the backend's view shows this connection's
            // acknowledged writes (at once for a local backend): see finish.
            Request::Wait { .. } | Request::WaitGet { .. } => {
                let ticket = self.next_ticket();
                let applied = self.backend.apply(id, ticket, &request);
                self.settle(id, ticket, applied, request, None)?;
            }
            Request::Barrier {
                ref key,
                world_size,
            } => {
                // Waiting before arriving: an arrival reported before this
                // one's answer still counts (a remote backend).
                let wait =
                    self.waits
                        .register(id, vec![key.clone()], WaitReply::Barrier { world_size });
                if let Some(session) = self.session(id) {
                    session.waits.push(wait);
                }
                let arrive = Request::Add {
                    key: key.clone(),
                    delta: 1,
                };
                let ticket = self.next_ticket();
                let applied = self.backend.apply(id, ticket, &arrive);
                self.settle(id, ticket, applied, request, Some(wait))?;
            }
            data => {
                let ticket = self.next_ticket();
                let applied = self.backend.apply(id, ticket, &data);
                self.settle(id, ticket, applied, data, None)?;
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
        applied: OpResult<Option<Outcome>>,
        request: Request,
        barrier: Option<WaitId>,
    ) -> std::result::Result<(), Refused> {
        match applied {
            Ok(Some(outcome)) => self.finish(id, request, outcome),
            Ok(None) => {
                if let Some(session) = self.session(id) {
                    session.in_flight = Some(Box::new(InFlight {
                        ticket,
                        request,
                        barrier,
                    }));
                }
            }
            Err(e) => {
                if let Some(wait) = barrier {
                    self.drop_wait(id, wait);
                }
                self.fail(id, &request, &e)?;
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
        request: &Request,
        error: &crate::Error,
    ) -> std::result::Result<(), Refused> {
        let Some(session) = self.session(id) else {
            return Ok(());
        };
        if !session.status_replies {
            return Err(Refused(error.message().to_string()));
        }
        let status = match request {
            Request::Set { .. } | Request::MultiSet { .. } | Request::QueuePush { .. } => {
                REPLY_DEFERRED_ERROR
            }
            _ => REPLY_ERROR,
        };
        let mut reply = vec![status, error.status().code() as u8];
        put_bytes(&mut reply, error.message().as_bytes());
        session.output.put(&reply);
        Ok(())
    }

    /// Replies to `request` with its `outcome` and wakes what it wrote.
    fn finish(&mut self, id: ConnId, request: Request, outcome: Outcome) {
        // A wait the backend let start takes its keys.
        let request = match request {
            Request::Wait { keys } => return self.start_wait(id, keys, WaitReply::StopWaiting),
            Request::WaitGet { keys } => {
                let values = vec![None; keys.len()];
                let reply = WaitReply::Values {
                    keys: keys.clone(),
                    values,
                };
                return self.start_wait(id, keys, reply);
            }
            other => other,
        };
        match (&request, outcome) {
            // Its own wait answers (this arrival's count releases it, or a
            // later one).
            (Request::Barrier { key, .. }, Outcome::Int(arrived)) => {
                let released = self.waits.released_barriers(key, arrived);
                self.complete_waits(released);
            }
            // Acknowledged on a version 2 connection: it may be refused.
            (Request::Append { .. }, Outcome::Silent) => self.put_reply(id, &[]),
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
        let Some(session) = self.session(id) else {
            return;
        };
        let out = &mut session.output;
        if matches!(outcome, Outcome::Silent) {
            // SET, MULTI_SET, QUEUE_PUSH: no reply when they succeed, even
            // on a version 2 connection, so a client that closes right
            // after them leaves no unread byte (which would reset the
            // connection and could lose them).
            return;
        }
        if session.status_replies {
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
        if let Some(session) = self.session(id) {
            session.output.put(bytes);
        }
    }

    /// Queues a reply on `id`, after the status byte where it has them.
    fn put_reply(&mut self, id: ConnId, bytes: &[u8]) {
        if let Some(session) = self.session(id) {
            if session.status_replies {
                session.output.put(&[REPLY_OK]);
            }
            session.output.put(bytes);
        }
    }

    /// Starts a wait of `id` for `keys`: answered at once when they all
    /// exist, registered for the missing ones otherwise.
    fn start_wait(&mut self, id: ConnId, mut keys: Vec<Key>, mut reply: WaitReply) {
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
            self.send_wait_reply(id, &reply);
            return;
        }
        let wait = self.waits.register(id, keys, reply);
        if let Some(session) = self.session(id) {
            session.waits.push(wait);
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
                let conn = wait.conn;
                if let Some(session) = self.session(conn) {
                    session.waits.retain(|w| *w != id);
                }
                self.send_wait_reply(conn, &wait.reply);
                self.woken.push(conn);
            }
        }
    }

    /// Takes back the wait `wait` of `id`, unanswered.
    fn drop_wait(&mut self, id: ConnId, wait: WaitId) {
        self.waits.remove(wait);
        if let Some(session) = self.session(id) {
            session.waits.retain(|w| *w != wait);
        }
    }

    fn send_wait_reply(&mut self, id: ConnId, reply: &WaitReply) {
        match reply {
            WaitReply::StopWaiting | WaitReply::Barrier { .. } => {
                self.put_reply(id, &[STOP_WAITING])
            }
            WaitReply::Values { keys, values } => {
                // The latest values (as each was seen if deleted since).
                let values = keys
                    .iter()
                    .zip(values)
                    .map(|(k, seen)| match self.backend.peek(k) {
                        Some(present) => present.value(),
                        None => seen.clone(),
                    })
                    .collect();
                self.put_reply(id, &[STOP_WAITING]);
                if let Some(session) = self.session(id) {
                    session.output.put_values(values);
                }
            }
        }
    }

    fn cancel_waits(&mut self, id: ConnId) {
        let waits = self
            .session(id)
            .map(|s| std::mem::take(&mut s.waits))
            .unwrap_or_default();
        for wait in waits {
            self.waits.remove(wait);
        }
    }
}

#[cfg(test)]
mod tests;
