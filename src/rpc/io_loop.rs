//! The RPC agent's event loop: one mio thread that accepts, connects,
//! reads and flushes every worker connection, and fires the agent's timers.
//! It only moves bytes: frames are [`super::frame`]'s, the handshake's
//! decisions [`super::handshake`]'s, the requests awaiting responses
//! [`super::pending`]'s.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use super::agent::{shut_down, Command, Guard, Replier, Shared};
use super::frame::{self, kind, Head};
use super::handshake::{Failure, Handshake};
use super::message::{Request, Response, WorkerId};
use super::writer::{Sent, Writer};
use crate::error::{Error, Result, Status};
use crate::net::reactor::{Acceptor, ConnTable, LISTENER, WAKER};
use crate::net::wire;
use crate::security::auth::nonce;
use crate::security::tls::TlsServer;
use crate::work::Promise;

/// Size of the shared read buffer.
const SCRATCH_LEN: usize = 256 << 10;

struct Conn {
    stream: TcpStream,
    /// The worker at the other end, for outbound connections.
    peer: Option<WorkerId>,
    /// The address at the other end, for logs.
    addr: SocketAddr,
    connected: bool,
    /// Where its authentication stands.
    handshake: Handshake,
    /// When its handshake (TLS, the secret's, or both) must be done by;
    /// `None`: it has none.
    handshake_deadline: Option<Instant>,
    input: Vec<u8>,
    writer: Arc<Writer>,
    /// When bytes last arrived on it.
    last_heard: Option<Instant>,
}

impl Conn {
    /// Connected, authenticated, and past the TLS handshake.
    fn established(&self) -> bool {
        self.connected && self.handshake.is_done() && !self.writer.tls_handshaking()
    }
}

/// What the I/O thread does when a timer comes up.
enum Timer {
    /// Runs a job of [`Agent::schedule`].
    Job(Box<dyn FnOnce() + Send>),
    /// Closes the connection with this token if its handshake is not done
    /// by its deadline.
    Handshake(Token),
}

/// The event loop of one worker's agent.
pub(super) struct IoLoop {
    shared: Weak<Shared>,
    poll: Poll,
    acceptor: Acceptor,
    /// When to accept again after running out of descriptors.
    accept_retry: Option<Instant>,
    conns: ConnTable<Conn>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    timer_jobs: HashMap<u64, Timer>,
    next_timer: u64,
    /// The read buffer of every connection, reused.
    scratch: Vec<u8>,
    guard: Guard,
}

impl IoLoop {
    /// The event loop of the agent `shared` on `poll` (whose waker the
    /// agent holds), accepting on `listener` the connections that prove
    /// what `guard` says.
    pub(super) fn new(
        shared: Weak<Shared>,
        poll: Poll,
        listener: std::net::TcpListener,
        guard: Guard,
    ) -> Result<IoLoop> {
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::network(format!("RPC listener: {e}")))?;
        let mut acceptor = Acceptor::new(TcpListener::from_std(listener), "RPC agent");
        poll.registry()
            .register(acceptor.listener(), LISTENER, Interest::READABLE)
            .map_err(|e| Error::internal(format!("RPC listener: {e}")))?;
        Ok(IoLoop {
            shared,
            poll,
            acceptor,
            accept_retry: None,
            conns: ConnTable::default(),
            timers: BinaryHeap::new(),
            timer_jobs: HashMap::new(),
            next_timer: 0,
            scratch: vec![0; SCRATCH_LEN],
            guard,
        })
    }

    /// Runs until the agent stops or is gone.
    pub(super) fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            let Some(shared) = self.shared.upgrade() else {
                break;
            };
            if shared.stopping.load(Ordering::SeqCst) {
                break;
            }
            let wakeup = self.next_wakeup(&shared);
            drop(shared);
            let timeout = wakeup.map(|at| at.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("RPC I/O thread: poll failed: {e}");
                    break;
                }
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    token => {
                        if event.is_writable() {
                            self.on_writable(token);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.on_readable(token);
                        }
                    }
                }
            }
            self.run_commands();
            self.expire();
            if self.accept_retry.is_some_and(|at| at <= Instant::now()) {
                self.accept();
            }
        }
        self.fail_everything();
    }

    /// The soonest deadline, timer or accept retry, recorded as the armed wake-up so
    /// that senders wake the thread only for an earlier deadline.
    fn next_wakeup(&self, shared: &Shared) -> Option<Instant> {
        let mut pending = shared.pending.lock();
        let t = self.timers.peek().map(|Reverse((at, _))| *at);
        let next = [pending.next_deadline(), t, self.accept_retry]
            .into_iter()
            .flatten()
            .min();
        pending.arm(next);
        next
    }

    fn run_commands(&mut self) {
        loop {
            let Some(shared) = self.shared.upgrade() else {
                return;
            };
            let next = shared.commands.lock().pop_front();
            drop(shared);
            let Some(command) = next else {
                return;
            };
            match command {
                Command::Send {
                    to,
                    id,
                    frame,
                    promise,
                    timeout,
                } => self.start_send(to, id, frame, promise, timeout),
                Command::Flush(token) => self.flush(token),
                Command::At { when, job } => self.add_timer(when, Timer::Job(job)),
            }
        }
    }

    fn add_timer(&mut self, when: Instant, timer: Timer) {
        self.next_timer += 1;
        self.timers.push(Reverse((when, self.next_timer)));
        self.timer_jobs.insert(self.next_timer, timer);
    }

    fn expire(&mut self) {
        let now = Instant::now();
        if let Some(shared) = self.shared.upgrade() {
            let expired = shared.pending.lock().expire(now);
            for p in expired {
                let error = p.timed_out();
                p.promise.complete(Err(error));
            }
        }
        while let Some(Reverse((at, id))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            match self.timer_jobs.remove(&id) {
                Some(Timer::Job(job)) => job(),
                Some(Timer::Handshake(token)) => self.handshake_due(token, now),
                None => {}
            }
        }
    }

    /// Closes the connection `token` if its handshake deadline has passed
    /// (the token may have gone to a later connection meanwhile) and the
    /// handshake is not done.
    fn handshake_due(&mut self, token: Token, now: Instant) {
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        if conn.handshake_deadline.is_some_and(|at| at <= now) && !conn.established() {
            let why = format!(
                "its handshake (TLS or the group's secret) did not finish within {:?}",
                self.guard.handshake_timeout
            );
            self.close(token, (Status::Timeout, why));
        }
    }

    /// Sends a request whose sender found no open connection to `to`:
    /// fails it if `to` is lost, else connects (unless another request did
    /// meanwhile) and queues it. A request is never sent again once it may
    /// have gone out: the one that arrives here went out on no connection.
    fn start_send(
        &mut self,
        to: WorkerId,
        id: u64,
        frame: Vec<u8>,
        promise: Promise,
        timeout: Duration,
    ) {
        let Some(shared) = self.shared.upgrade() else {
            promise.complete(Err(shut_down()));
            return;
        };
        if let Some(error) = shared.pending.lock().lost(to) {
            promise.complete(Err(error));
            return;
        }
        let existing = shared.outbound.lock().get(&to).cloned();
        let (token, writer) = match existing {
            Some(connection) => connection,
            None => match self.connect(&shared, to) {
                Ok(connection) => connection,
                Err(e) => {
                    promise.complete(Err(e));
                    return;
                }
            },
        };
        shared.expect_response(id, promise, token, timeout);
        self.queue_frame(token, &writer, &frame);
    }

    fn connect(&mut self, shared: &Shared, to: WorkerId) -> Result<(Token, Arc<Writer>)> {
        let peer = shared
            .peers
            .lock()
            .get(&to)
            .cloned()
            .ok_or_else(|| Error::invalid_argument(format!("unknown worker id {to}")))?;
        let mut stream = TcpStream::connect(peer.addr).map_err(|e| {
            Error::network(format!(
                "connecting to worker '{}' at {}: {e}",
                peer.name, peer.addr
            ))
        })?;
        let _ = stream.set_nodelay(true);
        let tls = match &self.guard.tls_client {
            Some(client) => Some(client.session(&peer.addr.ip().to_string())?),
            None => None,
        };
        let writer =
            Arc::new(Writer::new(&stream, false, tls).map_err(|e| {
                Error::network(format!("connection to worker '{}': {e}", peer.name))
            })?);
        let token = self.register(&mut stream, Interest::READABLE | Interest::WRITABLE)?;
        let handshake = Handshake::connecting(self.guard.secret.is_some());
        let guarded = self.guard.secret.is_some() || self.guard.tls_client.is_some();
        let handshake_deadline = guarded.then(|| Instant::now() + self.guard.handshake_timeout);
        self.conns.insert(Conn {
            stream,
            peer: Some(to),
            addr: peer.addr,
            connected: false,
            handshake,
            handshake_deadline,
            input: Vec::new(),
            writer: writer.clone(),
            last_heard: None,
        });
        if let Some(at) = handshake_deadline {
            self.add_timer(at, Timer::Handshake(token));
        }
        shared.outbound.lock().insert(to, (token, writer.clone()));
        Ok((token, writer))
    }

    /// Registers `stream` under the token the next connection gets.
    fn register(&mut self, stream: &mut TcpStream, interest: Interest) -> Result<Token> {
        let token = self.conns.next_token();
        self.poll
            .registry()
            .register(stream, token, interest)
            .map_err(|e| Error::network(format!("registering a connection: {e}")))?;
        Ok(token)
    }

    fn conn(&mut self, token: Token) -> Option<&mut Conn> {
        self.conns.get_mut(token)
    }

    fn accept(&mut self) {
        let me = self.me();
        let registry = self.poll.registry();
        let (conns, guard) = (&mut self.conns, &self.guard);
        let now = Instant::now();
        let handshake_deadline = now + guard.handshake_timeout;
        let (mut greet, mut watch) = (Vec::new(), Vec::new());
        self.accept_retry = self.acceptor.accept(now, |mut stream, peer| {
            let _ = stream.set_nodelay(true);
            let unusable = |e: &dyn std::fmt::Display| {
                log::warn!("RPC agent: connection from {peer} unusable: {e}");
            };
            let tls = match guard
                .tls_server
                .as_ref()
                .map(TlsServer::session)
                .transpose()
            {
                Ok(tls) => tls,
                Err(e) => return unusable(&e),
            };
            let guarded = tls.is_some() || guard.secret.is_some();
            let writer = match Writer::new(&stream, true, tls) {
                Ok(writer) => Arc::new(writer),
                Err(e) => return unusable(&e),
            };
            let challenge = match guard.secret.as_ref().map(|_| nonce()).transpose() {
                Ok(challenge) => challenge,
                Err(e) => return unusable(&e),
            };
            let (handshake, challenge_frame) = Handshake::accepted(challenge, me);
            if let Some(frame) = challenge_frame {
                writer.send_handshake(&frame);
            }
            let token = conns.next_token();
            if let Err(e) = registry.register(&mut stream, token, Interest::READABLE) {
                log::warn!("RPC agent: registering {peer}: {e}");
                return;
            }
            if !handshake.is_done() {
                greet.push(token);
            }
            if guarded {
                watch.push(token);
            }
            conns.insert(Conn {
                stream,
                peer: None,
                addr: peer,
                connected: true,
                handshake,
                handshake_deadline: guarded.then_some(handshake_deadline),
                input: Vec::new(),
                writer,
                last_heard: None,
            });
        });
        for token in watch {
            self.add_timer(handshake_deadline, Timer::Handshake(token));
        }
        // The challenge goes out at once (over TLS, once the handshake lets
        // it: a flush after each read).
        for token in greet {
            self.flush(token);
        }
    }

    /// Sends a frame from the I/O thread itself.
    fn queue_frame(&mut self, token: Token, writer: &Writer, frame: &[u8]) {
        if writer.send(frame) == Sent::NeedsFlush {
            self.flush(token);
        }
    }

    fn on_writable(&mut self, token: Token) {
        let me = self.me();
        let Some(conn) = self.conn(token) else {
            return;
        };
        if !conn.connected {
            match conn.stream.take_error() {
                Ok(None) if conn.stream.peer_addr().is_ok() => {
                    conn.connected = true;
                    match conn.handshake.on_connected(me) {
                        None => conn.writer.set_open(),
                        Some(hello) => conn.writer.send_handshake(&hello),
                    }
                }
                Ok(None) => return,
                Ok(Some(e)) | Err(e) => {
                    self.close(token, (Status::Network, format!("connect failed: {e}")));
                    return;
                }
            }
        }
        self.flush(token);
    }

    fn flush(&mut self, token: Token) {
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        if let Err(e) = conn
            .writer
            .flush(&mut conn.stream, self.poll.registry(), token)
        {
            self.close(token, io_failure("write failed", &e));
        }
    }

    fn on_readable(&mut self, token: Token) {
        if !self.conns.get_mut(token).is_some_and(|c| c.connected) {
            return;
        }
        match self.read_frames(token) {
            Err(failure) => self.close(token, failure),
            // TLS records of the handshake, and frames of ours it let out.
            Ok(()) => self.flush(token),
        }
    }

    /// Reads what has arrived on `token` and dispatches its frames, until
    /// the socket has nothing more or the connection fails. Until the
    /// handshake is done, each read takes at most a handshake frame's
    /// bytes and is dispatched at once, so the input never holds more than
    /// two handshake frames (the socket and the TLS session buffer the
    /// rest, within their own limits); after, a scratch buffer at a time,
    /// dispatched together.
    fn read_frames(&mut self, token: Token) -> std::result::Result<(), Failure> {
        loop {
            let Some((read, handshake)) = self.read_once(token) else {
                return Ok(());
            };
            match read {
                Ok(0) => {
                    self.dispatch_frames(token)?;
                    return Err(handshake.closed_by_peer());
                }
                Ok(_) if !handshake.is_done() => self.dispatch_frames(token)?,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return self.dispatch_frames(token)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.dispatch_frames(token)?;
                    return Err(io_failure("read failed", &e));
                }
            }
        }
    }

    /// Reads once from connection `token` into its input, as much as a
    /// scratch buffer holds, or a handshake frame before the handshake is
    /// done: what the read returned, and the handshake's state. `None`: no
    /// such connection (any more).
    fn read_once(&mut self, token: Token) -> Option<(io::Result<usize>, Handshake)> {
        let conn = self.conns.get_mut(token)?;
        let chunk = &mut self.scratch[..conn.handshake.read_limit(SCRATCH_LEN)];
        let read = conn.writer.recv(&mut conn.stream, chunk);
        if let Ok(n @ 1..) = read {
            conn.input.extend_from_slice(&chunk[..n]);
            conn.last_heard = Some(Instant::now());
        }
        Some((read, conn.handshake))
    }

    /// Dispatches every whole frame received on `token`, reading them in
    /// place, then drops them from the input at once. Each frame is
    /// screened ([`Handshake::screen`]) as soon as its length and kind are
    /// in.
    fn dispatch_frames(&mut self, token: Token) -> std::result::Result<(), Failure> {
        let Some(conn) = self.conn(token) else {
            return Ok(());
        };
        let input = std::mem::take(&mut conn.input);
        let mut at = 0;
        let result = loop {
            let Head::Frame { len, kind, whole } = frame::head(&input[at..]) else {
                break Ok(());
            };
            let handshake = self.conn(token).map_or(Handshake::Done, |c| c.handshake);
            if let Err(why) = handshake.screen(len, kind) {
                break Err(why);
            }
            let Some(whole) = whole else {
                break Ok(());
            };
            let frame = frame::decode(&input[at..at + whole]);
            at += whole;
            let dispatched = match frame.kind {
                kind::REQUEST => self.on_request(token, frame.id, frame.sender, frame.payload),
                kind::RESPONSE => {
                    self.on_response(frame.id, frame.payload);
                    Ok(())
                }
                _ => self.on_handshake(token, frame.kind, frame.payload),
            };
            if let Err(why) = dispatched {
                break Err(why);
            }
        };
        if let Some(conn) = self.conn(token) {
            let mut input = input;
            input.drain(..at);
            // Keep whatever a handler queued meanwhile after the unread tail.
            input.append(&mut conn.input);
            conn.input = input;
        }
        result
    }

    /// A frame of the authentication handshake: the handshake decides,
    /// this sends its reply and opens the connection once it is done.
    fn on_handshake(
        &mut self,
        token: Token,
        frame_kind: u8,
        payload: &[u8],
    ) -> std::result::Result<(), Failure> {
        let me = self.me();
        let secret = self.guard.secret.clone();
        let Some(conn) = self.conn(token) else {
            return Ok(());
        };
        let reply = conn
            .handshake
            .on_frame(secret.as_ref(), me, frame_kind, payload, nonce)?;
        if let Some(reply) = reply {
            conn.writer.send_handshake(&reply);
        }
        if conn.handshake.is_done() {
            conn.writer.set_open();
        }
        Ok(())
    }

    /// This worker's id.
    fn me(&self) -> WorkerId {
        self.shared.upgrade().map_or(0, |s| s.me)
    }

    fn on_request(
        &mut self,
        token: Token,
        id: u64,
        sender: WorkerId,
        payload: &[u8],
    ) -> std::result::Result<(), Failure> {
        let request =
            Request::decode(payload).map_err(|e| (Status::Protocol, e.message().to_string()))?;
        let Some(writer) = self.conn(token).map(|c| c.writer.clone()) else {
            return Ok(());
        };
        let handler = self.shared.upgrade().and_then(|s| s.handler.lock().clone());
        let replier = Replier {
            agent: self.shared.clone(),
            writer,
            token,
            id,
        };
        match handler {
            Some(handler) => handler.handle(sender, request, replier),
            None => replier.send(Response::Err("the RPC agent is not ready".into())),
        }
        Ok(())
    }

    fn on_response(&mut self, id: u64, payload: &[u8]) {
        let pending = self
            .shared
            .upgrade()
            .and_then(|shared| shared.pending.lock().take(id));
        let Some(pending) = pending else {
            return; // timed out already
        };
        let outcome = match Response::decode(payload) {
            Ok(Response::Ok(bytes)) => Ok(bytes),
            Ok(Response::Err(message)) => Err(Error::new(Status::Remote, message)),
            Err(e) => Err(e),
        };
        pending.promise.complete(outcome.map(Some));
    }

    fn close(&mut self, token: Token, (status, why): Failure) {
        let Some(mut conn) = self.conns.remove(token) else {
            return;
        };
        // Refused, or never finished its handshake (Timeout comes from no
        // other failure of a connection).
        if matches!(status, Status::PermissionDenied | Status::Timeout) {
            log::warn!(
                "RPC agent: closing the connection with {}: {why}",
                conn.addr
            );
        }
        // Closed first: a request registered after the scan below finds
        // the writer closed and takes itself back.
        conn.writer.close();
        let _ = self.poll.registry().deregister(&mut conn.stream);
        // Only our own (outbound) connections carry our requests.
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let Some(peer) = conn.peer.and_then(|id| shared.worker(id)) else {
            return;
        };
        {
            let mut outbound = shared.outbound.lock();
            if outbound.get(&peer.id).is_some_and(|(t, _)| *t == token) {
                outbound.remove(&peer.id);
            }
        }
        let closed = shared.pending.lock().close(
            token.0,
            &peer,
            (status, why),
            conn.last_heard,
            Instant::now(),
        );
        for p in closed.requests {
            p.promise.complete(Err(closed.error.clone()));
        }
        if closed.lost {
            if shared.leaving.load(Ordering::SeqCst) {
                log::debug!("RPC agent: {}", closed.error);
            } else {
                log::warn!("RPC agent: {}", closed.error);
            }
            let handler = shared.handler.lock().clone();
            if let Some(handler) = handler {
                handler.worker_lost(peer.id, &closed.error);
            }
        }
    }

    /// The agent stops: every pending request fails, and every connection
    /// closes at once, as a crash would close them: shut down, not only
    /// dropped, since the threads still running the requests it received
    /// hold duplicates of its socket (their replies never go out).
    fn fail_everything(&mut self) {
        for (_, conn) in self.conns.iter_mut() {
            conn.writer.close();
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        }
        if let Some(shared) = self.shared.upgrade() {
            let pending = shared.pending.lock().drain();
            for p in pending {
                p.promise.complete(Err(shut_down()));
            }
        }
        self.timer_jobs.clear();
    }
}

/// A failed read or write: a TLS failure (a certificate refused) is
/// `PermissionDenied`, anything else the network's.
fn io_failure(doing: &str, e: &io::Error) -> Failure {
    match wire::failure(e) {
        Some(failure) => (Status::PermissionDenied, format!("TLS failed: {failure}")),
        None => (Status::Network, format!("{doing}: {e}")),
    }
}
