//! The RPC transport: framed messages over TCP between workers, one mio
//! I/O thread reading every socket, replies matched to requests by id,
//! timeouts, and retried sends for the RRef control messages. Senders write
//! to an idle connection themselves ([`Writer`]); the I/O thread connects,
//! reads, and flushes what the sockets did not take at once.
//!
//! Frame: `u32 length` (of the rest), `u8 kind` (0 request, 1 response),
//! `u64 id`, `u16 sender`, payload (an encoded [`Request`] or [`Response`]).
//!
//! Workers with a shared secret authenticate each connection before any
//! request, by the challenge-response of [`crate::security::auth`]: the connecting
//! worker announces it will (HELLO, kind 2, empty), the accepting worker
//! sends a CHALLENGE (kind 3, a fresh 32-byte challenge) as soon as it
//! accepts, the connecting one answers AUTH (kind 4: its nonce and proof),
//! and the accepting one proves itself in turn (PROOF, kind 5). The
//! connecting worker sends no request before that proof checks out; the
//! accepting one closes a connection that sends anything else first, and
//! one without a secret closes on HELLO, so a mismatch fails at once
//! either way. With TLS, every connection is TLS (workers verify each
//! other's certificates).
//!
//! Until its handshake is done, a connection reads nothing but the
//! handshake's frames, one at a time, each of at most 79 bytes
//! (`MAX_HANDSHAKE_FRAME`): a longer frame or one of another kind closes it
//! as soon as its length or kind arrives, before any of its body is
//! buffered (`screen`). A connection whose handshake (TLS, the secret's, or
//! both) is not done 10 s (`HANDSHAKE_TIMEOUT`) after it was accepted or
//! opened is closed, failing the calls waiting on it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use parking_lot::Mutex;

use super::message::{Request, Response, WorkerId};
use super::writer::{Sent, Writer};
use crate::error::{Error, Result, Status};
use crate::net::reactor::{Acceptor, ConnTable, LISTENER, WAKER};
use crate::net::wire;
use crate::security::auth::{as_nonce, Nonce, Secret, NONCE_LEN, PROOF_LEN};
use crate::security::tls::{TlsClient, TlsServer};
use crate::work::{Promise, Work};

/// Bytes of a frame's header: length, kind, id and sender.
pub(crate) const HEADER: usize = 4 + 1 + 8 + 2;
/// Frame kinds.
const REQUEST: u8 = 0;
const RESPONSE: u8 = 1;
const HELLO: u8 = 2;
const CHALLENGE: u8 = 3;
const AUTH: u8 = 4;
const PROOF: u8 = 5;
/// Size of the shared read buffer.
const SCRATCH_LEN: usize = 256 << 10;
/// The longest frame of the handshake, header included: AUTH, a nonce and
/// a proof. Until its handshake is done, a connection reads no longer one.
const MAX_HANDSHAKE_FRAME: usize = HEADER + NONCE_LEN + PROOF_LEN;
/// How long a connection has, from when it is accepted or opened, to finish
/// its handshake (TLS, the secret's, or both) before it is closed.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest frame, header included, sent or accepted: a longer message is
/// refused before it is sent (`DC_ERR_INVALID_ARGUMENT`), and a peer that
/// announces one is closed. Frame lengths are `u32`s.
pub(crate) const MAX_FRAME: usize = 1 << 30;

/// A worker of the group: its id (rank), name and address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// The rank.
    pub id: WorkerId,
    /// The unique name.
    pub name: String,
    /// Where its agent listens.
    pub addr: SocketAddr,
}

/// Receives requests on the I/O thread; must hand real work to a pool.
pub(crate) trait RequestHandler: Send + Sync {
    fn handle(&self, from: WorkerId, request: Request, reply: Replier);
}

/// Sends the one response to a request, on the connection it came from.
pub(crate) struct Replier {
    agent: Weak<Shared>,
    writer: Arc<Writer>,
    token: Token,
    id: u64,
}

impl Replier {
    /// Sends the response; one too long for a frame is replaced by an
    /// error response saying so.
    pub(crate) fn send(self, response: Response) {
        if let Some(shared) = self.agent.upgrade() {
            let frame =
                frame(RESPONSE, self.id, shared.me, &response.encode()).unwrap_or_else(|e| {
                    let refusal = Response::Err(e.message().to_string()).encode();
                    frame(RESPONSE, self.id, shared.me, &refusal).unwrap_or_default()
                });
            shared.write(self.token, &self.writer, &frame);
        }
    }
}

enum Command {
    Send {
        to: WorkerId,
        id: u64,
        frame: Vec<u8>,
        promise: Promise,
        timeout: Duration,
    },
    /// Write out what a sender left queued on this connection.
    Flush(Token),
    At {
        when: Instant,
        job: Box<dyn FnOnce() + Send>,
    },
}

/// Deadlines of requests, and when the I/O thread will next wake up.
#[derive(Default)]
struct Deadlines {
    /// (deadline, request id), soonest first; answered requests are
    /// skipped when their deadline comes up.
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    /// The I/O thread's next timed wake-up (`None`: none).
    armed: Option<Instant>,
}

struct Shared {
    me: WorkerId,
    peers: Mutex<HashMap<WorkerId, WorkerInfo>>,
    commands: Mutex<VecDeque<Command>>,
    waker: Waker,
    /// Requests awaiting their response, by id.
    pending: Mutex<HashMap<u64, PendingRequest>>,
    deadlines: Mutex<Deadlines>,
    /// Our established (or establishing) connection to each peer.
    outbound: Mutex<HashMap<WorkerId, (Token, Arc<Writer>)>>,
    next_id: AtomicU64,
    handler: Mutex<Option<Arc<dyn RequestHandler>>>,
    stopping: AtomicBool,
}

impl Shared {
    fn command(&self, command: Command) {
        self.commands.lock().push_back(command);
        self.wake();
    }

    fn wake(&self) {
        if let Err(e) = self.waker.wake() {
            log::error!("waking the RPC I/O thread: {e}");
        }
    }

    /// Writes `frame` on a connection from this thread, asking the I/O
    /// thread to flush whatever the socket left queued.
    fn write(&self, token: Token, writer: &Writer, frame: &[u8]) -> Sent {
        let sent = writer.send(frame);
        if sent == Sent::NeedsFlush {
            self.command(Command::Flush(token));
        }
        sent
    }

    /// Records request `id` as awaiting its response; wakes the I/O thread
    /// when the request's deadline comes before its next wake-up.
    fn expect_response(&self, id: u64, pending: PendingRequest) {
        let timeout = pending.timeout;
        self.pending.lock().insert(id, pending);
        if timeout.is_zero() {
            return;
        }
        let at = Instant::now() + timeout;
        let mut deadlines = self.deadlines.lock();
        deadlines.heap.push(Reverse((at, id)));
        if deadlines.armed.is_none_or(|armed| at < armed) {
            deadlines.armed = Some(at);
            drop(deadlines);
            self.wake();
        }
    }
}

/// One frame: `u32` length, kind, id, sender, payload; an error when the
/// payload does not fit under [`MAX_FRAME`].
pub(super) fn frame(kind: u8, id: u64, sender: WorkerId, payload: &[u8]) -> Result<Vec<u8>> {
    let len = HEADER - 4 + payload.len();
    if HEADER + payload.len() > MAX_FRAME {
        return Err(Error::invalid_argument(format!(
            "an RPC message of {} bytes exceeds the limit of {MAX_FRAME} bytes per message",
            payload.len()
        )));
    }
    let mut f = Vec::new();
    f.try_reserve_exact(HEADER + payload.len())
        .map_err(|_| Error::invalid_argument("cannot allocate an RPC message"))?;
    f.extend_from_slice(&(len as u32).to_le_bytes());
    f.push(kind);
    f.extend_from_slice(&id.to_le_bytes());
    f.extend_from_slice(&sender.to_le_bytes());
    f.extend_from_slice(payload);
    Ok(f)
}

/// The message of an RPC that ran out of time (PyTorch's wording).
fn rpc_timeout(timeout: Duration) -> Error {
    Error::timeout(format!(
        "RPC ran for more than set timeout ({} ms) and will now be marked with an error",
        timeout.as_millis()
    ))
}

/// What a worker's connections must prove: the shared secret, and TLS.
#[derive(Debug, Clone)]
pub(crate) struct Guard {
    /// Every connection authenticates with it before any request.
    pub(crate) secret: Option<Secret>,
    /// Accepted connections are TLS with this certificate.
    pub(crate) tls_server: Option<TlsServer>,
    /// Outbound connections are TLS, trusting these CAs.
    pub(crate) tls_client: Option<TlsClient>,
    /// How long a connection has to finish its handshake:
    /// [`HANDSHAKE_TIMEOUT`] (shorter in tests).
    pub(crate) handshake_timeout: Duration,
}

impl Default for Guard {
    fn default() -> Self {
        Guard {
            secret: None,
            tls_server: None,
            tls_client: None,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        }
    }
}

/// The RPC agent of one worker.
pub struct Agent {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Agent {
    /// Starts the I/O thread of worker `me` on an already-bound listener;
    /// its connections prove what `guard` says.
    pub(crate) fn start(
        me: WorkerId,
        listener: std::net::TcpListener,
        guard: Guard,
    ) -> Result<Agent> {
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::network(format!("RPC listener: {e}")))?;
        let poll = Poll::new().map_err(|e| Error::internal(format!("RPC poll: {e}")))?;
        let waker = Waker::new(poll.registry(), WAKER)
            .map_err(|e| Error::internal(format!("RPC waker: {e}")))?;
        let mut acceptor = Acceptor::new(TcpListener::from_std(listener), "RPC agent");
        poll.registry()
            .register(acceptor.listener(), LISTENER, Interest::READABLE)
            .map_err(|e| Error::internal(format!("RPC listener: {e}")))?;
        let shared = Arc::new(Shared {
            me,
            peers: Mutex::new(HashMap::new()),
            commands: Mutex::new(VecDeque::new()),
            waker,
            pending: Mutex::new(HashMap::new()),
            deadlines: Mutex::new(Deadlines::default()),
            outbound: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            handler: Mutex::new(None),
            stopping: AtomicBool::new(false),
        });
        let mut io = IoLoop {
            shared: Arc::downgrade(&shared),
            poll,
            acceptor,
            accept_retry: None,
            conns: ConnTable::default(),
            timers: BinaryHeap::new(),
            timer_jobs: HashMap::new(),
            next_timer: 0,
            scratch: vec![0; SCRATCH_LEN],
            guard,
        };
        let thread = std::thread::Builder::new()
            .name(format!("dc-rpc-io-{me}"))
            .spawn(move || io.run())
            .map_err(|e| Error::internal(format!("spawning the RPC I/O thread: {e}")))?;
        Ok(Agent {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// This worker's id.
    pub fn id(&self) -> WorkerId {
        self.shared.me
    }

    pub(crate) fn set_peers(&self, peers: Vec<WorkerInfo>) {
        *self.shared.peers.lock() = peers.into_iter().map(|p| (p.id, p)).collect();
    }

    pub(crate) fn set_handler(&self, handler: Arc<dyn RequestHandler>) {
        *self.shared.handler.lock() = Some(handler);
    }

    /// The worker with id `id`.
    pub fn worker(&self, id: WorkerId) -> Option<WorkerInfo> {
        self.shared.peers.lock().get(&id).cloned()
    }

    /// The worker named `name`.
    pub fn worker_by_name(&self, name: &str) -> Option<WorkerInfo> {
        self.shared
            .peers
            .lock()
            .values()
            .find(|p| p.name == name)
            .cloned()
    }

    /// Every worker, by id.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        let mut all: Vec<_> = self.shared.peers.lock().values().cloned().collect();
        all.sort_by_key(|w| w.id);
        all
    }

    /// Sends `request` to worker `to`; the work completes with the response
    /// bytes, the remote error ([`Status::Remote`]), a timeout, or a network
    /// error. `timeout` zero: none.
    pub(crate) fn send(&self, to: WorkerId, request: &Request, timeout: Duration) -> Work {
        send_on(&self.shared, to, request.encode(), timeout)
    }

    /// Runs `job` on the I/O thread at `when` (or soon after).
    pub(crate) fn schedule(&self, when: Instant, job: Box<dyn FnOnce() + Send>) {
        self.shared.command(Command::At { when, job });
    }

    /// Stops the I/O thread: pending requests fail with [`Status::ShutDown`],
    /// connections close.
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = self.shared.waker.wake();
        if let Some(t) = self.thread.lock().take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
        *self.shared.handler.lock() = None;
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn send_on(shared: &Arc<Shared>, to: WorkerId, payload: Vec<u8>, timeout: Duration) -> Work {
    let (promise, work) = Promise::new();
    if shared.stopping.load(Ordering::SeqCst) {
        promise.complete(Err(shut_down()));
        return work;
    }
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let frame = match frame(REQUEST, id, shared.me, &payload) {
        Ok(frame) => frame,
        Err(e) => {
            promise.complete(Err(e));
            return work;
        }
    };
    let connection = shared.outbound.lock().get(&to).cloned();
    let promise = match connection {
        Some((token, writer)) => {
            shared.expect_response(
                id,
                PendingRequest {
                    promise,
                    token,
                    to,
                    timeout,
                },
            );
            if shared.write(token, &writer, &frame) != Sent::Closed {
                return work;
            }
            // Closed under us: reconnect through the I/O thread, unless the
            // close already failed the request.
            match shared.pending.lock().remove(&id) {
                Some(pending) => pending.promise,
                None => return work,
            }
        }
        None => promise,
    };
    shared.command(Command::Send {
        to,
        id,
        frame,
        promise,
        timeout,
    });
    work
}

fn shut_down() -> Error {
    Error::new(Status::ShutDown, "the RPC agent has shut down")
}

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
}

impl Conn {
    /// Connected, authenticated, and past the TLS handshake.
    fn established(&self) -> bool {
        self.connected && self.handshake == Handshake::Done && !self.writer.tls_handshaking()
    }
}

/// Where a connection's authentication stands (see the module's doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handshake {
    /// Authenticated, or nothing to prove: requests and responses flow.
    Done,
    /// Accepted, and sent this challenge: the peer's HELLO comes first.
    AwaitingHello(Nonce),
    /// Accepted: the peer must answer this challenge next.
    AwaitingProof(Nonce),
    /// Outbound: the peer's challenge comes first.
    AwaitingChallenge,
    /// Outbound: answered `challenge` with `nonce`; the peer's proof is due.
    AwaitingServerProof { challenge: Nonce, nonce: Nonce },
}

/// Why a connection failed: its status and what happened.
type Failure = (Status, String);

/// What the I/O thread does when a timer comes up.
enum Timer {
    /// Runs a job of [`Agent::schedule`].
    Job(Box<dyn FnOnce() + Send>),
    /// Closes the connection with this token if its handshake is not done
    /// by its deadline.
    Handshake(Token),
}

struct PendingRequest {
    promise: Promise,
    token: Token,
    to: WorkerId,
    timeout: Duration,
}

struct IoLoop {
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
    fn run(&mut self) {
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
        let mut deadlines = shared.deadlines.lock();
        let d = deadlines.heap.peek().map(|Reverse((at, _))| *at);
        let t = self.timers.peek().map(|Reverse((at, _))| *at);
        let next = [d, t, self.accept_retry].into_iter().flatten().min();
        deadlines.armed = next;
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
            let mut expired = Vec::new();
            {
                let mut deadlines = shared.deadlines.lock();
                while let Some(Reverse((at, id))) = deadlines.heap.peek().copied() {
                    if at > now {
                        break;
                    }
                    deadlines.heap.pop();
                    expired.push(id);
                }
            }
            for id in expired {
                let timed_out = shared.pending.lock().remove(&id);
                if let Some(p) = timed_out {
                    p.promise.complete(Err(rpc_timeout(p.timeout)));
                }
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
    /// connects (unless another request did meanwhile) and queues it.
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
        shared.expect_response(
            id,
            PendingRequest {
                promise,
                token,
                to,
                timeout,
            },
        );
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
        let handshake = match self.guard.secret {
            Some(_) => Handshake::AwaitingChallenge,
            None => Handshake::Done,
        };
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
        let registry = self.poll.registry();
        let (conns, guard) = (&mut self.conns, &self.guard);
        let me = self.shared.upgrade().map_or(0, |s| s.me);
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
            let handshake = match guard
                .secret
                .as_ref()
                .map(|_| crate::security::auth::nonce())
            {
                None => Handshake::Done,
                Some(Ok(challenge)) => {
                    let frame = frame(CHALLENGE, 0, me, &challenge).unwrap_or_default();
                    writer.send_handshake(&frame);
                    Handshake::AwaitingHello(challenge)
                }
                Some(Err(e)) => return unusable(&e),
            };
            let token = conns.next_token();
            if let Err(e) = registry.register(&mut stream, token, Interest::READABLE) {
                log::warn!("RPC agent: registering {peer}: {e}");
                return;
            }
            if handshake != Handshake::Done {
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
        let Some(conn) = self.conn(token) else {
            return;
        };
        if !conn.connected {
            match conn.stream.take_error() {
                Ok(None) if conn.stream.peer_addr().is_ok() => {
                    conn.connected = true;
                    match conn.handshake {
                        Handshake::Done => conn.writer.set_open(),
                        _ => conn
                            .writer
                            .send_handshake(&frame(HELLO, 0, 0, &[]).unwrap_or_default()),
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
    /// handshake is done, each read takes at most [`MAX_HANDSHAKE_FRAME`]
    /// bytes and is dispatched at once, so the input never holds more than
    /// two handshake frames (the socket and the TLS session buffer the
    /// rest, within their own limits); after, a scratch buffer at a time,
    /// dispatched together.
    fn read_frames(&mut self, token: Token) -> std::result::Result<(), Failure> {
        loop {
            let Some((read, handshake)) = self.read_once(token) else {
                return Ok(());
            };
            let authenticating = handshake != Handshake::Done;
            match read {
                Ok(0) => {
                    self.dispatch_frames(token)?;
                    return Err(closed_by_peer(authenticating));
                }
                Ok(_) if authenticating => self.dispatch_frames(token)?,
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
        let limit = match conn.handshake {
            Handshake::Done => SCRATCH_LEN,
            _ => MAX_HANDSHAKE_FRAME,
        };
        let chunk = &mut self.scratch[..limit];
        let read = conn.writer.recv(&mut conn.stream, chunk);
        if let Ok(n) = read {
            conn.input.extend_from_slice(&chunk[..n]);
        }
        Some((read, conn.handshake))
    }

    /// Dispatches every whole frame received on `token`, reading them in
    /// place, then drops them from the input at once. Each frame is
    /// [`screen`]ed as soon as its length and kind are in.
    fn dispatch_frames(&mut self, token: Token) -> std::result::Result<(), Failure> {
        let Some(conn) = self.conn(token) else {
            return Ok(());
        };
        let input = std::mem::take(&mut conn.input);
        let mut at = 0;
        let result = loop {
            let Some(head) = input.get(at..at + 4) else {
                break Ok(());
            };
            let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
            let handshake = self.conn(token).map_or(Handshake::Done, |c| c.handshake);
            if let Err(why) = screen(handshake, len, input.get(at + 4).copied()) {
                break Err(why);
            }
            let Some(body) = input.get(at + 4..at + 4 + len) else {
                break Ok(());
            };
            at += 4 + len;
            let kind = body[0];
            let id = u64::from_le_bytes(body[1..9].try_into().unwrap_or_default());
            let sender = u16::from_le_bytes([body[9], body[10]]);
            let payload = &body[11..];
            let dispatched = match kind {
                REQUEST => self.on_request(token, id, sender, payload),
                RESPONSE => {
                    self.on_response(id, payload);
                    Ok(())
                }
                _ => self.on_handshake(token, kind, handshake, payload),
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

    /// A frame of the authentication handshake, in `state`.
    fn on_handshake(
        &mut self,
        token: Token,
        kind: u8,
        state: Handshake,
        payload: &[u8],
    ) -> std::result::Result<(), Failure> {
        let denied = |why: &str| Err((Status::PermissionDenied, why.to_owned()));
        let Some(secret) = self.guard.secret.clone() else {
            return denied("the peer wants authentication, and this worker has no secret");
        };
        let me = self.shared.upgrade().map_or(0, |s| s.me);
        let (next, reply) = match (kind, state) {
            (HELLO, Handshake::AwaitingHello(challenge)) => {
                (Handshake::AwaitingProof(challenge), None)
            }
            (CHALLENGE, Handshake::AwaitingChallenge) => {
                let Some(challenge) = as_nonce(payload) else {
                    return denied("a malformed challenge");
                };
                let nonce = crate::security::auth::nonce()
                    .map_err(|e| (e.status(), e.message().to_owned()))?;
                let mut answer = nonce.to_vec();
                answer.extend_from_slice(&secret.client_proof(&challenge, &nonce));
                let next = Handshake::AwaitingServerProof { challenge, nonce };
                (next, Some(frame(AUTH, 0, me, &answer)))
            }
            (AUTH, Handshake::AwaitingProof(challenge)) => {
                let (nonce, proof) = payload.split_at(payload.len().min(NONCE_LEN));
                let Some(nonce) =
                    as_nonce(nonce).filter(|n| secret.check_client(&challenge, n, proof))
                else {
                    return denied("authentication failed: wrong secret");
                };
                let proof = secret.server_proof(&challenge, &nonce);
                (Handshake::Done, Some(frame(PROOF, 0, me, &proof)))
            }
            (PROOF, Handshake::AwaitingServerProof { challenge, nonce }) => {
                if !secret.check_server(&challenge, &nonce, payload) {
                    return denied(
                        "the peer does not hold this worker's secret (its proof is wrong)",
                    );
                }
                (Handshake::Done, None)
            }
            _ => {
                return Err((
                    Status::Protocol,
                    format!("an unexpected handshake frame ({kind})"),
                ))
            }
        };
        let Some(conn) = self.conn(token) else {
            return Ok(());
        };
        conn.handshake = next;
        if let Some(reply) = reply {
            let reply = reply.map_err(|e| (e.status(), e.message().to_owned()))?;
            conn.writer.send_handshake(&reply);
        }
        if next == Handshake::Done {
            conn.writer.set_open();
        }
        Ok(())
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
            .and_then(|shared| shared.pending.lock().remove(&id));
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
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        if let Some(peer) = conn.peer {
            let mut outbound = shared.outbound.lock();
            if outbound.get(&peer).is_some_and(|(t, _)| *t == token) {
                outbound.remove(&peer);
            }
        }
        let failed: Vec<PendingRequest> = {
            let mut pending = shared.pending.lock();
            let ids: Vec<u64> = pending
                .iter()
                .filter(|(_, p)| p.token == token)
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| pending.remove(id)).collect()
        };
        for p in failed {
            let name = shared
                .peers
                .lock()
                .get(&p.to)
                .map_or_else(|| p.to.to_string(), |w| w.name.clone());
            p.promise.complete(Err(Error::new(
                status,
                format!("connection to worker '{name}' lost: {why}"),
            )));
        }
    }

    fn fail_everything(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            let pending: Vec<PendingRequest> =
                shared.pending.lock().drain().map(|(_, p)| p).collect();
            for p in pending {
                p.promise.complete(Err(shut_down()));
            }
        }
        self.timer_jobs.clear();
    }
}

/// Checks a frame of `len` bytes after its length field, and of `kind` once
/// that has arrived, before its body is waited for. After the handshake any
/// frame up to [`MAX_FRAME`] of a known kind goes; before it, only frames of
/// the handshake, up to [`MAX_HANDSHAKE_FRAME`].
fn screen(handshake: Handshake, len: usize, kind: Option<u8>) -> std::result::Result<(), Failure> {
    if let Some((status, when)) = before_handshake(handshake) {
        if len > MAX_HANDSHAKE_FRAME - 4 {
            let why = format!(
                "a frame of {} bytes, longer than any of the handshake ({MAX_HANDSHAKE_FRAME}), {when}",
                len + 4
            );
            return Err((status, why));
        }
        if let Some(REQUEST | RESPONSE) = kind {
            return Err((status, format!("a message {when}")));
        }
    }
    if !(HEADER - 4..=MAX_FRAME - 4).contains(&len) {
        return Err((Status::Protocol, format!("bad frame length {len}")));
    }
    match kind {
        Some(k) if k > PROOF => Err((Status::Protocol, format!("bad frame kind {k}"))),
        _ => Ok(()),
    }
}

/// Until a connection's handshake is done, what a frame it may not read
/// yet fails it with: the status, and when the frame came (for the
/// message). `None` once done.
fn before_handshake(handshake: Handshake) -> Option<(Status, &'static str)> {
    match handshake {
        Handshake::Done => None,
        // From a peer that has not authenticated.
        Handshake::AwaitingHello(_) | Handshake::AwaitingProof(_) => Some((
            Status::PermissionDenied,
            "before authenticating (this worker has a secret)",
        )),
        // From a worker that has not proved itself to this one.
        Handshake::AwaitingChallenge | Handshake::AwaitingServerProof { .. } => {
            Some((Status::Protocol, "before the peer authenticated"))
        }
    }
}

/// Why a connection the peer closed is gone: before the handshake was
/// done, most likely for a secret it does not share.
fn closed_by_peer(authenticating: bool) -> Failure {
    if authenticating {
        let why = "the peer closed the connection before authenticating: \
                   does it hold the group's secret?";
        (Status::PermissionDenied, why.to_string())
    } else {
        (
            Status::Network,
            "the peer closed the connection".to_string(),
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_too_long_for_a_frame_is_refused_before_it_is_sent() {
        // Zeroed by the allocator: no page is touched.
        let payload = vec![0u8; MAX_FRAME];
        let e = frame(0, 1, 0, &payload).unwrap_err();
        assert_eq!(e.status(), Status::InvalidArgument);
        assert!(e.message().contains("exceeds the limit"), "{}", e.message());
        let f = frame(1, 7, 3, b"ok").unwrap();
        assert_eq!(f.len(), HEADER + 2);
        assert_eq!(
            u32::from_le_bytes(f[..4].try_into().unwrap()) as usize,
            f.len() - 4
        );
    }

    #[test]
    fn before_the_handshake_only_its_own_short_frames_are_read() {
        assert_eq!(MAX_HANDSHAKE_FRAME, 79, "docs/security.md says so");
        let accepted = Handshake::AwaitingHello([0; NONCE_LEN]);
        let longest = MAX_HANDSHAKE_FRAME - 4;
        assert!(screen(accepted, longest, Some(AUTH)).is_ok());
        assert!(screen(accepted, longest, None).is_ok(), "no kind yet");
        let (status, why) = screen(accepted, longest + 1, None).unwrap_err();
        assert_eq!(status, Status::PermissionDenied);
        assert!(why.contains("a frame of 80 bytes"), "{why}");
        let (status, _) = screen(accepted, HEADER - 4, Some(REQUEST)).unwrap_err();
        assert_eq!(status, Status::PermissionDenied);
        // A worker that has not proved itself to this one.
        let outbound = Handshake::AwaitingChallenge;
        let (status, _) = screen(outbound, 256 << 20, Some(CHALLENGE)).unwrap_err();
        assert_eq!(status, Status::Protocol);
        assert!(screen(Handshake::Done, 256 << 20, Some(REQUEST)).is_ok());
        let (_, why) = screen(Handshake::Done, HEADER - 4, Some(PROOF + 1)).unwrap_err();
        assert!(why.contains("bad frame kind"), "{why}");
    }
}
