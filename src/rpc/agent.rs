//! The RPC transport: framed messages over TCP between workers, one mio
//! I/O thread reading every socket, replies matched to requests by id,
//! timeouts, and retried sends for the RRef control messages. Senders write
//! to an idle connection themselves ([`Writer`]); the I/O thread connects,
//! reads, and flushes what the sockets did not take at once.
//!
//! Frame: `u32 length` (of the rest), `u8 kind` (0 request, 1 response),
//! `u64 id`, `u16 sender`, payload (an encoded [`Request`] or [`Response`]).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io::{self, Read};
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
use crate::reactor::{Acceptor, ConnTable, LISTENER, WAKER};
use crate::work::{Promise, Work};

const HEADER: usize = 4 + 1 + 8 + 2;
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
            let frame = frame(1, self.id, shared.me, &response.encode()).unwrap_or_else(|e| {
                let refusal = Response::Err(e.message().to_string()).encode();
                frame(1, self.id, shared.me, &refusal).unwrap_or_default()
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
fn frame(kind: u8, id: u64, sender: WorkerId, payload: &[u8]) -> Result<Vec<u8>> {
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

/// The RPC agent of one worker.
pub struct Agent {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Agent {
    /// Starts the I/O thread of worker `me` on an already-bound listener.
    pub(crate) fn start(me: WorkerId, listener: std::net::TcpListener) -> Result<Agent> {
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
    let frame = match frame(0, id, shared.me, &payload) {
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
    connected: bool,
    input: Vec<u8>,
    writer: Arc<Writer>,
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
    timer_jobs: HashMap<u64, Box<dyn FnOnce() + Send>>,
    next_timer: u64,
    /// The read buffer of every connection, reused.
    scratch: Vec<u8>,
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
        let writer =
            Arc::new(Writer::new(&stream, false).map_err(|e| {
                Error::network(format!("connection to worker '{}': {e}", peer.name))
            })?);
        let token = self.register(&mut stream, Interest::READABLE | Interest::WRITABLE)?;
        self.conns.insert(Conn {
            stream,
            peer: Some(to),
            connected: false,
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
        let conns = &mut self.conns;
        self.accept_retry = self.acceptor.accept(Instant::now(), |mut stream, peer| {
            let _ = stream.set_nodelay(true);
            let writer = match Writer::new(&stream, true) {
                Ok(writer) => Arc::new(writer),
                Err(e) => {
                    log::warn!("RPC agent: connection from {peer} unusable: {e}");
                    return;
                }
            };
            if let Err(e) = registry.register(&mut stream, conns.next_token(), Interest::READABLE) {
                log::warn!("RPC agent: registering {peer}: {e}");
                return;
            }
            conns.insert(Conn {
                stream,
                peer: None,
                connected: true,
                input: Vec::new(),
                writer,
            });
        });
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
                    conn.writer.set_connected();
                }
                Ok(None) => return,
                Ok(Some(e)) | Err(e) => {
                    self.close(token, &format!("connect failed: {e}"));
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
            self.close(token, &format!("write failed: {e}"));
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
                match conn.stream.read(chunk) {
                    Ok(0) => {
                        closed = Some("the peer closed the connection".to_string());
                        break;
                    }
                    Ok(n) => conn.input.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        closed = Some(format!("read failed: {e}"));
                        break;
                    }
                }
            }
        }
        if let Err(why) = self.dispatch_frames(token) {
            closed = Some(why);
        }
        if let Some(why) = closed {
            self.close(token, &why);
        }
    }

    /// Dispatches every whole frame received on `token`, reading them in
    /// place, then drops them from the input at once.
    fn dispatch_frames(&mut self, token: Token) -> std::result::Result<(), String> {
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
                break Err(format!("bad frame length {len}"));
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
                0 => self.on_request(token, id, sender, payload),
                1 => {
                    self.on_response(id, payload);
                    Ok(())
                }
                k => Err(format!("bad frame kind {k}")),
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

    fn on_request(
        &mut self,
        token: Token,
        id: u64,
        sender: WorkerId,
        payload: &[u8],
    ) -> std::result::Result<(), String> {
        let request = Request::decode(payload).map_err(|e| e.message().to_string())?;
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

    fn close(&mut self, token: Token, why: &str) {
        let Some(mut conn) = self.conns.remove(token) else {
            return;
        };
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
            p.promise.complete(Err(Error::network(format!(
                "connection to worker '{name}' lost: {why}"
            ))));
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
