//! The server's event loop: moves bytes between non-blocking sockets and
//! the [`ServerCore`], fairly. Each turn reads one bounded chunk from every
//! connection with input, hands it to the core, and writes that
//! connection's replies before the next connection is served; a connection
//! with more input than one chunk waits for the next turn. A connection
//! the core has paused (too many unsent replies) is not read until its
//! replies drain.
//!
//! On a server with TLS, a connection's first byte tells whether it speaks
//! TLS (a handshake record) or TCPStore's protocol in clear; in clear, the
//! core serves it only as the access policy allows, and over TLS once its
//! TLS handshake is through. Connections in their handshake are read a
//! little at a time and closed at their deadline, which the loop wakes
//! for (see the core).
//!
//! Connections that only keep a liveness session alive (the core says
//! which: [`ServerCore::reads_late`]) move to a second poller, read every
//! [`LATE_READ_EVERY`]: the loop does not wake for each keep-alive (at
//! thousands of members, waking for each was most of what keep-alives
//! cost). Any other request on one moves it back, served that much late
//! once.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Registry, Token};

use super::backend::Backend;
use super::metrics::Refusal;
use super::state::{Refused, ServerCore, HANDSHAKE_READ, LATE_READ_EVERY};
use crate::net::outbox::Outbox;
use crate::net::reactor::{Acceptor, ConnTable, WritableInterest, LISTENER, WAKER};
use crate::net::wire::{self, Session, Wire, HANDSHAKE_RECORD};
use crate::runtime::logging::Throttle;
use crate::security::access::{AccessPolicy, Admission};

/// Bytes read from one connection per turn, and the loop's read buffer.
const READ_CHUNK: usize = 64 << 10;
/// Bytes of a large value received straight into place per turn.
const DIRECT_CHUNK: usize = 1 << 20;
/// At most one warning about refused connections per this interval.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Whether a connection speaks TLS.
enum Security {
    /// Not known until its first byte arrives (a server with TLS).
    Undecided,
    Clear,
    /// TLS, its handshake not through yet.
    TlsHandshake(Box<Session>),
    Tls(Box<Session>),
}

/// The socket side of a connection.
struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    security: Security,
    /// The peer shut down its side: read on to the end of the stream (an
    /// edge-triggered poller will not report it again).
    peer_closed: bool,
    /// Queued in `ready` for this turn.
    queued: bool,
    /// Input was left unread because the core paused the connection.
    paused: bool,
    /// Registered for WRITABLE while replies wait for the socket.
    writable: WritableInterest,
    /// Registered with the late poller ([`Polls::late`]).
    late: bool,
}

impl Conn {
    /// The wire of the connection: through its TLS session, if it has one.
    fn wire(&mut self) -> Wire<'_> {
        Wire::new(&self.stream, self.security.session())
    }

    /// Writes what `output` holds for this connection as far as the socket
    /// takes it, registered for WRITABLE while some is left.
    fn flush(&mut self, output: &mut Outbox, registry: &Registry, token: Token) -> io::Result<()> {
        let mut wire = Wire::new(&self.stream, self.security.session());
        let pending = output.write_to(&mut wire)?;
        self.writable
            .keep(pending, &mut self.stream, registry, token)
    }
}

impl Security {
    fn session(&mut self) -> Option<&mut Session> {
        match self {
            Security::Tls(session) | Security::TlsHandshake(session) => Some(session),
            Security::Undecided | Security::Clear => None,
        }
    }
}

/// Why a connection is being closed.
enum Close {
    PeerClosed,
    Refused(Refused),
    Io(io::Error),
}

/// The loop's pollers.
pub(super) struct Polls {
    /// Everything read as it arrives: the listener, the waker, most
    /// connections.
    pub(super) now: Poll,
    /// Connections read every [`LATE_READ_EVERY`].
    pub(super) late: Poll,
}

impl Polls {
    /// The registry of a connection read late, or not.
    fn registry(&self, late: bool) -> &Registry {
        match late {
            true => self.late.registry(),
            false => self.now.registry(),
        }
    }
}

pub(super) struct EventLoop<B> {
    polls: Polls,
    /// Connections registered with the late poller.
    late_conns: usize,
    /// When the late poller is read next (while it has connections).
    next_late_read: Option<Instant>,
    acceptor: Acceptor,
    /// When to accept again after running out of descriptors.
    accept_retry: Option<Instant>,
    conns: ConnTable<Conn>,
    core: ServerCore<B>,
    scratch: Vec<u8>,
    /// Connections to read from this turn.
    ready: Vec<Token>,
    refusals: Throttle,
    stop: Arc<AtomicBool>,
    access: AccessPolicy,
}

impl<B: Backend> EventLoop<B> {
    pub(super) fn new(
        polls: Polls,
        acceptor: Acceptor,
        core: ServerCore<B>,
        stop: Arc<AtomicBool>,
        access: AccessPolicy,
    ) -> EventLoop<B> {
        EventLoop {
            polls,
            late_conns: 0,
            next_late_read: None,
            acceptor,
            accept_retry: None,
            conns: ConnTable::default(),
            core,
            scratch: vec![0; READ_CHUNK],
            ready: Vec::new(),
            refusals: Throttle::new(WARN_INTERVAL),
            stop,
            access,
        }
    }

    pub(super) fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        let mut late_events = Events::with_capacity(1024);
        while !self.stop.load(Ordering::SeqCst) {
            let timeout = if self.ready.is_empty() {
                let handshake = self.core.next_handshake_deadline();
                let session = self.core.next_session_deadline();
                [self.accept_retry, handshake, session, self.next_late_read]
                    .into_iter()
                    .flatten()
                    .min()
                    .map(|at| at.saturating_duration_since(Instant::now()))
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.polls.now.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("TCPStore server: poll failed, stopping: {e}");
                return;
            }
            // The time of everything this turn handles: one clock read.
            let now = Instant::now();
            self.core.begin_turn(now);
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => self.take_backend_reports(),
                    token => self.on_event(token, event),
                }
            }
            if self.next_late_read.is_some_and(|at| at <= now) {
                self.next_late_read = Some(now + LATE_READ_EVERY);
                if let Err(e) = self.take_late_events(&mut late_events) {
                    log::error!("TCPStore server: poll failed, stopping: {e}");
                    return;
                }
            }
            if self.accept_retry.is_some_and(|at| at <= now) {
                self.accept();
            }
            for (id, refused) in self.core.expire_handshakes(now) {
                self.close(conn_token(id), Close::Refused(refused));
            }
            for token in std::mem::take(&mut self.ready) {
                self.serve(token);
            }
            // After the turn's input: keep-alives that arrived count, read or
            // not (a turn reads a bounded batch of events and of input).
            for id in self.core.sessions_due(now) {
                if self.has_unread_input(conn_token(id)) {
                    self.core.heard_unread(id, now);
                }
            }
            self.core.expire_sessions(now);
            self.core.publish_memberships();
            for (id, refused) in self.core.take_closing() {
                self.close(conn_token(id), Close::Refused(refused));
            }
            for id in self.core.take_woken() {
                self.flush(conn_token(id));
            }
            self.core.publish();
        }
    }

    /// Takes every event of the connections read late (batch after batch
    /// while a batch fills `events`: one sweep reads them all, however
    /// many are ready).
    fn take_late_events(&mut self, events: &mut Events) -> io::Result<()> {
        loop {
            match self.polls.late.poll(events, Some(Duration::ZERO)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let mut taken = 0;
            for event in events.iter() {
                self.on_event(event.token(), event);
                taken += 1;
            }
            if taken < events.capacity() {
                return Ok(());
            }
        }
    }

    /// What `event` says of connection `token`: input to read, room to
    /// write.
    fn on_event(&mut self, token: Token, event: &mio::event::Event) {
        if let Some(conn) = self.conns.get_mut(token) {
            conn.peer_closed |= event.is_read_closed() || event.is_error();
        }
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            self.mark_ready(token);
        }
        if event.is_writable() {
            self.flush(token);
        }
    }

    /// Moves connection `token` to the poller it belongs with now: the
    /// late one while the core says it may be read late.
    fn place(&mut self, token: Token, id: usize) {
        let late = self.core.reads_late(id);
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        if conn.late == late {
            return;
        }
        let interest = conn.writable.interest();
        let moved = self
            .polls
            .registry(conn.late)
            .deregister(&mut conn.stream)
            .and_then(|()| {
                self.polls
                    .registry(late)
                    .register(&mut conn.stream, token, interest)
            });
        if let Err(e) = moved {
            return self.close(token, Close::Io(e));
        }
        conn.late = late;
        self.count_late(late);
    }

    /// One more connection is read late (`true`), or one fewer.
    fn count_late(&mut self, more: bool) {
        match more {
            true => self.late_conns += 1,
            false => self.late_conns -= 1,
        }
        match self.late_conns {
            0 => self.next_late_read = None,
            _ => {
                let next = Instant::now() + LATE_READ_EVERY;
                self.next_late_read.get_or_insert(next);
            }
        }
    }

    fn accept(&mut self) {
        let registry = self.polls.now.registry();
        let (conns, core) = (&mut self.conns, &mut self.core);
        let access = &self.access;
        let refusals = &mut self.refusals;
        let now = Instant::now();
        self.accept_retry = self.acceptor.accept(now, |mut stream, peer| {
            let admission = match access.admit(peer.ip(), false) {
                Admission::Refused => {
                    let why = "its address is not in the allow-list (--allow)";
                    return refuse(core, refusals, Refusal::NotAllowed, peer, why);
                }
                // In its handshake until its first byte tells TLS from clear.
                _ if access.tls.is_some() => Admission::MustUseTls,
                admission => admission,
            };
            if let Err(Refused(kind, why)) = core.room_for(admission) {
                return refuse(core, refusals, kind, peer, &why);
            }
            let challenge = match access
                .secret
                .as_ref()
                .map(|_| crate::security::auth::nonce())
            {
                None => None,
                Some(Ok(nonce)) => Some(nonce),
                Some(Err(e)) => {
                    log::error!("TCPStore server: refusing {peer}: no challenge: {e}");
                    return;
                }
            };
            let token = conns.next_token();
            if let Err(e) = registry.register(&mut stream, token, Interest::READABLE) {
                log::error!("TCPStore server: registering {peer}: {e}");
                return;
            }
            let security = match access.tls {
                Some(_) => Security::Undecided,
                None => Security::Clear,
            };
            conns.insert(Conn {
                stream,
                peer,
                security,
                peer_closed: false,
                queued: false,
                paused: false,
                writable: WritableInterest::default(),
                late: false,
            });
            if let Some(id) = ConnTable::<Conn>::index(token) {
                core.connect_as(id, admission, challenge, now);
                core.metrics().accepted();
            }
        });
        let refused = self.acceptor.take_refused();
        self.core
            .metrics()
            .refused_many(Refusal::OutOfDescriptors, refused);
    }

    /// Takes in what a remote backend reported (it wakes the loop):
    /// completed requests, looks, writes. Their replies are flushed with
    /// the woken connections.
    fn take_backend_reports(&mut self) {
        for (id, refused) in self.core.take_backend_reports() {
            self.close(conn_token(id), Close::Refused(refused));
        }
    }

    /// Whether the connection has input this loop has not read: queued for
    /// a later turn, or still in its socket.
    fn has_unread_input(&mut self, token: Token) -> bool {
        let Some(conn) = self.conns.get_mut(token) else {
            return false;
        };
        conn.queued || crate::os::unread_bytes(conn.stream.as_raw_fd()).is_ok_and(|n| n > 0)
    }

    fn mark_ready(&mut self, token: Token) {
        if let Some(conn) = self.conns.get_mut(token) {
            if !conn.queued {
                conn.queued = true;
                self.ready.push(token);
            }
        }
    }

    /// One turn of a connection: one bounded read, handed to the core,
    /// then its replies written.
    fn serve(&mut self, token: Token) {
        let Some(id) = ConnTable::<Conn>::index(token) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        conn.queued = false;
        if !self.core.wants_input(id) {
            conn.paused = true;
            return;
        }
        if matches!(conn.security, Security::Undecided) {
            match first_byte(&conn.stream) {
                Ok(None) => return,
                // Undecided only on a server with TLS.
                Ok(Some(byte)) => match self
                    .access
                    .tls
                    .as_ref()
                    .filter(|_| byte == HANDSHAKE_RECORD)
                {
                    None => {
                        conn.security = Security::Clear;
                        let admission = self.access.admit(conn.peer.ip(), false);
                        if let Err(refused) = self.core.secure(id, admission) {
                            return self.close(token, Close::Refused(refused));
                        }
                    }
                    Some(server) => match server.session() {
                        Ok(session) => conn.security = Security::TlsHandshake(Box::new(session)),
                        Err(e) => {
                            let refused = Refused(Refusal::TlsFailed, e.message().to_owned());
                            return self.close(token, Close::Refused(refused));
                        }
                    },
                },
                Err(e) => return self.close(token, Close::Io(e)),
            }
        }
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        let chunk = if self.core.in_handshake(id) {
            HANDSHAKE_READ
        } else {
            READ_CHUNK
        };
        let mut wire = conn.wire();
        let (read, wanted, direct) = match self.core.direct_target(id) {
            Some(target) => {
                let wanted = target.len().min(DIRECT_CHUNK);
                (wire.recv_into(&mut target[..wanted]), wanted, true)
            }
            None => (wire.recv_into(&mut self.scratch[..chunk]), chunk, false),
        };
        if let Err(refused) = self.tls_handshake_ended(token, id) {
            return self.close(token, Close::Refused(refused));
        }
        let more = match read {
            Ok(0) => return self.close(token, Close::PeerClosed),
            Ok(n) => {
                let handled = if direct {
                    self.core.direct_filled(id, n)
                } else {
                    self.core.receive(id, &self.scratch[..n])
                };
                if let Err(refused) = handled {
                    return self.close(token, Close::Refused(refused));
                }
                n == wanted || conn_peer_closed(&mut self.conns, token)
            }
            Err(e) => match e.kind() {
                io::ErrorKind::WouldBlock => false,
                io::ErrorKind::Interrupted => true,
                _ => match wire::failure(&e) {
                    Some(failure) => {
                        let why = format!("TLS failed: {failure}");
                        return self.close(token, Close::Refused(Refused(Refusal::TlsFailed, why)));
                    }
                    None => return self.close(token, Close::Io(e)),
                },
            },
        };
        self.flush(token);
        if more {
            self.mark_ready(token);
        }
        self.place(token, id);
    }

    /// Admits connection `id` as its TLS handshake allows, once that is
    /// through (before the core sees a byte of what it sent over TLS).
    fn tls_handshake_ended(&mut self, token: Token, id: usize) -> Result<(), Refused> {
        let Some(conn) = self.conns.get_mut(token) else {
            return Ok(());
        };
        let Security::TlsHandshake(session) = &conn.security else {
            return Ok(());
        };
        if session.is_handshaking() {
            return Ok(());
        }
        if let Security::TlsHandshake(session) =
            std::mem::replace(&mut conn.security, Security::Clear)
        {
            conn.security = Security::Tls(session);
        }
        self.core
            .secure(id, self.access.admit(conn.peer.ip(), true))
    }

    /// Writes what `token`'s connection has queued; once its replies have
    /// drained enough, lets the core process what it held back and reads
    /// the connection again.
    fn flush(&mut self, token: Token) {
        let Some(id) = ConnTable::<Conn>::index(token) else {
            return;
        };
        // Write, then let the core process what it held back; again while
        // that produced replies, so the last write sets the WRITABLE
        // interest for whatever is left (ends: each round consumes held-back
        // bytes, at most one read's worth).
        loop {
            let (Some(conn), Some(output)) = (self.conns.get_mut(token), self.core.output(id))
            else {
                return;
            };
            if let Err(e) = conn.flush(output, self.polls.registry(conn.late), token) {
                return self.close(token, Close::Io(e));
            }
            let before = output.queued();
            if let Err(refused) = self.core.resume(id) {
                return self.close(token, Close::Refused(refused));
            }
            if self.core.output(id).is_none_or(|o| o.queued() == before) {
                break;
            }
        }
        if self.core.wants_input(id) {
            if let Some(conn) = self.conns.get_mut(token) {
                if std::mem::take(&mut conn.paused) {
                    self.mark_ready(token);
                }
            }
        }
    }

    fn close(&mut self, token: Token, reason: Close) {
        let Some(id) = ConnTable::<Conn>::index(token) else {
            return;
        };
        // Replies produced before the close still go out, as far as they can.
        if let (Some(conn), Some(output)) = (self.conns.get_mut(token), self.core.output(id)) {
            let _ = conn.flush(output, self.polls.registry(conn.late), token);
        }
        self.core.disconnect(id);
        let Some(conn) = self.conns.remove(token) else {
            return;
        };
        if conn.late {
            self.count_late(false);
        }
        let peer = conn.peer;
        match reason {
            Close::PeerClosed => log::debug!("TCPStore server: {peer} disconnected"),
            Close::Io(e) => log::debug!("TCPStore server: closing {peer}: {e}"),
            Close::Refused(Refused(kind, why)) => {
                self.core.metrics().refused(kind);
                if let Some(more) = allow_warning(&mut self.refusals) {
                    log::warn!("TCPStore server: closing connection from {peer}: {why}{more}");
                }
            }
        }
        // Closing the socket (dropping `conn`) takes it out of the epoll
        // set: nothing else holds its descriptor, so no deregister call.
        drop(conn);
    }
}

/// Closes a connection just accepted from `peer`, for `why`: counted, and
/// logged (at most one line per [`WARN_INTERVAL`]).
fn refuse<B: Backend>(
    core: &ServerCore<B>,
    refusals: &mut Throttle,
    kind: Refusal,
    peer: SocketAddr,
    why: &str,
) {
    core.metrics().refused(kind);
    if let Some(more) = allow_warning(refusals) {
        log::warn!("TCPStore server: refusing a connection from {peer}: {why}{more}");
    }
}

/// Whether to log a refusal now, and what to add about those held back.
fn allow_warning(refusals: &mut Throttle) -> Option<String> {
    let held_back = refusals.allow(Instant::now())?;
    Some(if held_back > 0 {
        format!(" ({held_back} more refused since the last report)")
    } else {
        String::new()
    })
}

/// The first byte a connection sent, left unread: `None` until one comes
/// (or, on a connection closed without sending any, 0).
fn first_byte(stream: &TcpStream) -> io::Result<Option<u8>> {
    let mut byte = [0u8];
    match wire::recv(stream, &mut byte, libc::MSG_PEEK) {
        Ok(_) => Ok(Some(byte[0])),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

fn conn_peer_closed(conns: &mut ConnTable<Conn>, token: Token) -> bool {
    conns.get_mut(token).is_some_and(|c| c.peer_closed)
}

/// The token of core connection `id`.
fn conn_token(id: usize) -> Token {
    ConnTable::<Conn>::token(id)
}
