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
//! request, by the challenge-response of [`crate::auth`]: the connecting
//! worker announces it will (HELLO, kind 2, empty), the accepting worker
//! sends a CHALLENGE (kind 3, a fresh 32-byte challenge) as soon as it
//! accepts, the connecting one answers AUTH (kind 4: its nonce and proof),
//! and the accepting one proves itself in turn (PROOF, kind 5). The
//! connecting worker sends no request before that proof checks out; the
//! accepting one closes a connection that sends anything else first, and
//! one without a secret closes on HELLO, so a mismatch fails at once
//! either way. With TLS, every connection is TLS (workers verify each
//! other's certificates).

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
use crate::auth::{as_nonce, Nonce, Secret, NONCE_LEN};
use crate::error::{Error, Result, Status};
use crate::reactor::{Acceptor, ConnTable, LISTENER, WAKER};
use crate::tls::{self, TlsClient, TlsServer};
use crate::work::{Promise, Work};

const HEADER: usize = 4 + 1 + 8 + 2;
/// Frame kinds.
const REQUEST: u8 = 0;
const RESPONSE: u8 = 1;
const HELLO: u8 = 2;
const CHALLENGE: u8 = 3;
const AUTH: u8 = 4;
const PROOF: u8 = 5;
/// Size of the shared read buffer.
const SCRATCH_LEN: usize = 256 << 10;
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
#[derive(Debug, Clone, Default)]
pub(crate) struct Guard {
    /// Every connection authenticates with it before any request.
    pub(crate) secret: Option<Secret>,
    /// Accepted connections are TLS with this certificate.
    pub(crate) tls_server: Option<TlsServer>,
    /// Outbound connections are TLS, trusting these CAs.
    pub(crate) tls_client: Option<TlsClient>,
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
    input: Vec<u8>,
    writer: Arc<Writer>,
}

/// Where a connection's authentication stands (see the module's doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handshake {
    /// Authenticated, or nothing to prove: requests and responses flow.
    Done,
    /// Accepted: the peer must answer this challenge first.
    AwaitingProof(Nonce),
    /// Outbound: the peer's challenge comes first.
    AwaitingChallenge,
    /// Outbound: answered `challenge` with `nonce`; the peer's proof is due.
    AwaitingServerProof { challenge: Nonce, nonce: Nonce },
}

/// Why a connection failed: its status and what happened.
type Failure = (Status, String);

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
    timer_jobs: HashMap<u64, Box<dyn FnOnce() + Send>>,
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
                Command::At { when, job } => {
                    self.next_timer += 1;
                    self.timers.push(Reverse((when, self.next_timer)));
                    self.timer_jobs.insert(self.next_timer, job);
                }
            }
        }
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
            if let Some(job) = self.timer_jobs.remove(&id) {
                job();
            }
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
        self.conns.insert(Conn {
            stream,
            peer: Some(to),
            addr: peer.addr,
            connected: false,
            handshake,
            input: Vec::new(),
            writer: writer.clone(),
        });
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
        let mut greet = Vec::new();
        self.accept_retry = self.acceptor.accept(Instant::now(), |mut stream, peer| {
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
            let writer = match Writer::new(&stream, true, tls) {
                Ok(writer) => Arc::new(writer),
                Err(e) => return unusable(&e),
            };
            let handshake = match guard.secret.as_ref().map(|_| crate::auth::nonce()) {
                None => Handshake::Done,
                Some(Ok(challenge)) => {
                    let frame = frame(CHALLENGE, 0, me, &challenge).unwrap_or_default();
                    writer.send_handshake(&frame);
                    Handshake::AwaitingProof(challenge)
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
            conns.insert(Conn {
                stream,
                peer: None,
                addr: peer,
                connected: true,
                handshake,
                input: Vec::new(),
                writer,
            });
        });
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
        let mut closed = None;
        if let Some(conn) = self.conns.get_mut(token) {
            if !conn.connected {
                return;
            }
            let chunk = &mut self.scratch[..];
            loop {
                match conn.writer.recv(&mut conn.stream, chunk) {
                    Ok(0) if conn.handshake != Handshake::Done => {
                        let why = "the peer closed the connection before authenticating: \
                                   does it hold the group's secret?";
                        closed = Some((Status::PermissionDenied, why.to_string()));
                        break;
                    }
                    Ok(0) => {
                        let why = "the peer closed the connection".to_string();
                        closed = Some((Status::Network, why));
                        break;
                    }
                    Ok(n) => conn.input.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        closed = Some(io_failure("read failed", &e));
                        break;
                    }
                }
            }
        }
        if let Err(failure) = self.dispatch_frames(token) {
            closed = Some(failure);
        }
        match closed {
            Some(failure) => self.close(token, failure),
            // TLS records of the handshake, and frames of ours it let out.
            None => self.flush(token),
        }
    }

    /// Dispatches every whole frame received on `token`, reading them in
    /// place, then drops them from the input at once.
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
            if !(HEADER - 4..=MAX_FRAME - 4).contains(&len) {
                break Err((Status::Protocol, format!("bad frame length {len}")));
            }
            let Some(body) = input.get(at + 4..at + 4 + len) else {
                break Ok(());
            };
            at += 4 + len;
            let kind = body[0];
            let id = u64::from_le_bytes(body[1..9].try_into().unwrap_or_default());
            let sender = u16::from_le_bytes([body[9], body[10]]);
            let payload = &body[11..];
            let handshake = self.conn(token).map_or(Handshake::Done, |c| c.handshake);
            let dispatched = match (kind, handshake) {
                (REQUEST, Handshake::Done) => self.on_request(token, id, sender, payload),
                (RESPONSE, Handshake::Done) => {
                    self.on_response(id, payload);
                    Ok(())
                }
                (HELLO | CHALLENGE | AUTH | PROOF, _) => {
                    self.on_handshake(token, kind, handshake, payload)
                }
                (REQUEST | RESPONSE, Handshake::AwaitingProof(_)) => Err((
                    Status::PermissionDenied,
                    "a message before authenticating (this worker has a secret)".into(),
                )),
                (REQUEST | RESPONSE, _) => Err((
                    Status::Protocol,
                    "a message before the peer authenticated".into(),
                )),
                (k, _) => Err((Status::Protocol, format!("bad frame kind {k}"))),
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
            (HELLO, Handshake::AwaitingProof(_)) => return Ok(()),
            (CHALLENGE, Handshake::AwaitingChallenge) => {
                let Some(challenge) = as_nonce(payload) else {
                    return denied("a malformed challenge");
                };
                let nonce =
                    crate::auth::nonce().map_err(|e| (e.status(), e.message().to_owned()))?;
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
        if status == Status::PermissionDenied {
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

/// A failed read or write: a TLS failure (a certificate refused) is
/// `PermissionDenied`, anything else the network's.
fn io_failure(doing: &str, e: &io::Error) -> Failure {
    match tls::failure(e) {
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
}
