//! The RPC transport: framed messages over TCP between workers
//! ([`super::frame`]), authenticated by [`super::handshake`], one mio I/O
//! thread reading every socket ([`super::io_loop`]), replies matched to
//! requests by id with their deadlines and the workers lost with their
//! connection ([`super::pending`]), and retried sends for the RRef control
//! messages. Senders write to an idle connection themselves ([`Writer`]);
//! the I/O thread connects, reads, and flushes what the sockets did not
//! take at once. With TLS, every
//! connection is TLS (workers verify each other's certificates).
//!
//! This module is the agent's handle: what the threads that send, and the
//! I/O thread, share.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Poll, Token, Waker};
use parking_lot::Mutex;

use super::frame::{frame, kind};
use super::handshake::HANDSHAKE_TIMEOUT;
use super::io_loop::IoLoop;
use super::message::{Request, Response, WorkerId};
use super::pending::{Pending, PendingRequest};
use super::writer::{Sent, Writer};
use crate::error::{Error, Result, Status};
use crate::net::reactor::WAKER;
use crate::security::auth::Secret;
use crate::security::tls::{TlsClient, TlsServer};
use crate::work::{Promise, Work};

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

/// Receives requests, and news of lost workers, on the I/O thread; must
/// hand real work to a pool.
pub(crate) trait RequestHandler: Send + Sync {
    /// A request from worker `from`, answered through `reply`.
    fn handle(&self, from: WorkerId, request: Request, reply: Replier);
    /// Worker `worker` is lost: its pending requests have failed with
    /// `error`, and later ones will.
    fn worker_lost(&self, worker: WorkerId, error: &Error);
}

/// Sends the one response to a request, on the connection it came from.
pub(crate) struct Replier {
    pub(super) agent: Weak<Shared>,
    pub(super) writer: Arc<Writer>,
    pub(super) token: Token,
    pub(super) id: u64,
}

impl Replier {
    /// Sends the response; one too long for a frame is replaced by an
    /// error response saying so.
    pub(crate) fn send(self, response: Response) {
        if let Some(shared) = self.agent.upgrade() {
            let frame = frame(kind::RESPONSE, self.id, shared.me, &response.encode())
                .unwrap_or_else(|e| {
                    let refusal = Response::Err(e.message().to_string()).encode();
                    frame(kind::RESPONSE, self.id, shared.me, &refusal).unwrap_or_default()
                });
            shared.write(self.token, &self.writer, &frame);
        }
    }
}

pub(super) enum Command {
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

/// What the agent's handle, its senders and its I/O thread share.
pub(super) struct Shared {
    pub(super) me: WorkerId,
    pub(super) peers: Mutex<HashMap<WorkerId, WorkerInfo>>,
    pub(super) commands: Mutex<VecDeque<Command>>,
    pub(super) waker: Waker,
    /// Requests awaiting their response.
    pub(super) pending: Mutex<Pending>,
    /// Our established (or establishing) connection to each peer.
    pub(super) outbound: Mutex<HashMap<WorkerId, (Token, Arc<Writer>)>>,
    next_id: AtomicU64,
    pub(super) handler: Mutex<Option<Arc<dyn RequestHandler>>>,
    pub(super) stopping: AtomicBool,
    /// The group is shutting down gracefully: a worker lost now has most
    /// likely left, and is not worth a warning.
    pub(super) leaving: AtomicBool,
}

impl Shared {
    pub(super) fn command(&self, command: Command) {
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
    pub(super) fn write(&self, token: Token, writer: &Writer, frame: &[u8]) -> Sent {
        let sent = writer.send(frame);
        if sent == Sent::NeedsFlush {
            self.command(Command::Flush(token));
        }
        sent
    }

    /// Records request `id`, sent on connection `token`, as awaiting its
    /// response for `timeout` (zero: forever); wakes the I/O thread when
    /// its deadline comes before the thread's next wake-up.
    pub(super) fn expect_response(
        &self,
        id: u64,
        promise: Promise,
        token: Token,
        timeout: Duration,
    ) {
        let request = PendingRequest {
            promise,
            conn: token.0,
            timeout,
        };
        if self.pending.lock().insert(id, request, Instant::now()) {
            self.wake();
        }
    }

    /// The worker with id `id`.
    pub(super) fn worker(&self, id: WorkerId) -> Option<WorkerInfo> {
        self.peers.lock().get(&id).cloned()
    }
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
        let poll = Poll::new().map_err(|e| Error::internal(format!("RPC poll: {e}")))?;
        let waker = Waker::new(poll.registry(), WAKER)
            .map_err(|e| Error::internal(format!("RPC waker: {e}")))?;
        let shared = Arc::new(Shared {
            me,
            peers: Mutex::new(HashMap::new()),
            commands: Mutex::new(VecDeque::new()),
            waker,
            pending: Mutex::new(Pending::default()),
            outbound: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            handler: Mutex::new(None),
            stopping: AtomicBool::new(false),
            leaving: AtomicBool::new(false),
        });
        let mut io = IoLoop::new(Arc::downgrade(&shared), poll, listener, guard)?;
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
        self.shared.worker(id)
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
    /// bytes, the remote error ([`Status::Remote`]), a timeout, a network
    /// error, or [`Status::PeerFailed`] once `to` is lost (at once for a
    /// request already out, and for every later one). `timeout` zero: none.
    pub(crate) fn send(&self, to: WorkerId, request: &Request, timeout: Duration) -> Work {
        send_on(&self.shared, to, request.encode(), timeout)
    }

    /// Runs `job` on the I/O thread at `when` (or soon after).
    pub(crate) fn schedule(&self, when: Instant, job: Box<dyn FnOnce() + Send>) {
        self.shared.command(Command::At { when, job });
    }

    /// The group is about to stop together (the last barrier of a graceful
    /// shutdown): connections other workers close from now on are logged
    /// quietly. They still fail what is pending on them.
    pub(crate) fn leave(&self) {
        self.shared.leaving.store(true, Ordering::SeqCst);
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
    let frame = match frame(kind::REQUEST, id, shared.me, &payload) {
        Ok(frame) => frame,
        Err(e) => {
            promise.complete(Err(e));
            return work;
        }
    };
    let connection = shared.outbound.lock().get(&to).cloned();
    let promise = match connection {
        Some((token, writer)) => {
            shared.expect_response(id, promise, token, timeout);
            if shared.write(token, &writer, &frame) != Sent::Closed {
                return work;
            }
            // Closed under us: reconnect through the I/O thread, unless the
            // close already failed the request.
            match shared.pending.lock().take(id) {
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

pub(super) fn shut_down() -> Error {
    Error::new(Status::ShutDown, "the RPC agent has shut down")
}
