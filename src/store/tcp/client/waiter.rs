//! The async store operations of the whole process on one thread: each is a
//! [`Plan`] on a connection of its own, driven by an event loop (mio) with
//! its deadline, and completes a [`Promise`]. A thousand pending async gets
//! cost a thousand sockets and one thread. An operation its observers give
//! up on (abort, or every handle dropped) is released at once: its
//! connection closes, which drops its waiter on the server.
//!
//! The same thread keeps the process's liveness sessions alive
//! ([`KeepAlive`]): a SESSION_KEEPALIVE every interval on a connection
//! attached to the session, until the session's handle lets go.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::runtime::fork::PerProcess;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use parking_lot::Mutex;

use super::super::protocol::{Command, Encoder};
use super::conn::{Conn, Deadline};
use super::plan::{grace_deadline, Next, Plan, Step};
use super::reply::{Exchange, Outcome, Shape};
use crate::error::{Error, Result};
use crate::work::Promise;

/// Turns the values a plan read into the work's result.
pub(crate) type Finish = fn(Vec<Vec<u8>>) -> Option<Vec<u8>>;

/// An operation handed to the waiter.
pub(crate) struct AsyncOp {
    /// A connection of its own, idle and in step.
    pub(crate) conn: Conn,
    /// What to do on it.
    pub(crate) plan: Plan,
    /// When it must end (the cancel grace aside).
    pub(crate) deadline: Deadline,
    /// Its timeout (zero: none), for messages and the cancel grace.
    pub(crate) timeout: Duration,
    /// Completed with the outcome.
    pub(crate) promise: Promise,
    /// The work's result from the values read.
    pub(crate) finish: Finish,
    /// Takes the connection back when the operation ends in step with the
    /// server (a store's pool of idle connections).
    pub(crate) recycle: Box<dyn FnOnce(Conn) + Send>,
}

/// An operation in progress.
struct Running {
    op: AsyncOp,
    step: Step,
    /// Bytes of the current request not sent yet.
    out: Vec<u8>,
    deadline: Deadline,
    cancelled: bool,
}

/// A liveness session to keep alive: a SESSION_KEEPALIVE every `interval`
/// on `conn`, a spare attached to the session, for as long as `session`
/// lives (the handle holds it while the session is open). A refusal (the
/// session ended, its group failed) or a broken connection ends it: the
/// handle's own calls learn why.
pub(crate) struct KeepAlive {
    pub(crate) conn: Conn,
    pub(crate) interval: Duration,
    pub(crate) session: Weak<()>,
}

/// A keep-alive in progress.
struct Keeping {
    job: KeepAlive,
    /// When the next keep-alive goes.
    next_at: Instant,
    /// Bytes of the keep-alive not sent yet.
    out: Vec<u8>,
    /// Its reply, while awaited.
    exchange: Option<Exchange>,
}

#[derive(Default)]
struct Inbox {
    next_id: usize,
    submitted: Vec<(usize, AsyncOp)>,
    released: Vec<usize>,
    keep_alive: Vec<(usize, KeepAlive)>,
}

struct Waiter {
    inbox: Arc<Mutex<Inbox>>,
    waker: Arc<Waker>,
}

const WAKER: Token = Token(usize::MAX);

static WAITER: PerProcess<Waiter> = PerProcess::new();

fn start() -> std::io::Result<Waiter> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let inbox = Arc::new(Mutex::new(Inbox::default()));
    let thread_inbox = inbox.clone();
    std::thread::Builder::new()
        .name("dc-store-waits".into())
        .spawn(move || EventLoop::new(poll, thread_inbox).run())?;
    Ok(Waiter { inbox, waker })
}

fn waiter() -> Result<&'static Waiter> {
    WAITER
        .get_or_try_init(|| start().map_err(|e| e.to_string()))
        .map_err(|e| Error::internal(format!("starting the store's async thread: {e}")))
}

/// Hands the keep-alives of a session to the waiter thread.
pub(crate) fn keep_alive(job: KeepAlive) -> Result<()> {
    let waiter = waiter()?;
    {
        let mut inbox = waiter.inbox.lock();
        inbox.next_id += 1;
        let id = inbox.next_id;
        inbox.keep_alive.push((id, job));
    }
    waiter
        .waker
        .wake()
        .map_err(|e| Error::internal(format!("waking the store's async thread: {e}")))
}

/// Hands `op` to the waiter thread.
pub(crate) fn submit(op: AsyncOp) -> Result<()> {
    let waiter = waiter()?;
    let id = {
        let mut inbox = waiter.inbox.lock();
        inbox.next_id += 1;
        inbox.next_id
    };
    let (inbox, waker) = (waiter.inbox.clone(), waiter.waker.clone());
    op.promise.on_release(Box::new(move || {
        inbox.lock().released.push(id);
        let _ = waker.wake();
    }));
    waiter.inbox.lock().submitted.push((id, op));
    waiter
        .waker
        .wake()
        .map_err(|e| Error::internal(format!("waking the store's async thread: {e}")))
}

struct EventLoop {
    poll: Poll,
    inbox: Arc<Mutex<Inbox>>,
    running: HashMap<usize, Running>,
    keeping: HashMap<usize, Keeping>,
}

impl EventLoop {
    fn new(poll: Poll, inbox: Arc<Mutex<Inbox>>) -> EventLoop {
        EventLoop {
            poll,
            inbox,
            running: HashMap::new(),
            keeping: HashMap::new(),
        }
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = self
                .next_deadline()
                .map(|d| d.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != ErrorKind::Interrupted {
                    log::error!("the store's async thread cannot poll: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            for event in events.iter() {
                match event.token() {
                    WAKER => self.take_inbox(),
                    Token(id) if self.keeping.contains_key(&id) => self.keep(id),
                    Token(id) => self.progress(id),
                }
            }
            self.expire_due();
            self.keep_due();
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let ops = self.running.values().filter_map(|r| r.deadline);
        ops.chain(self.keeping.values().map(|k| k.next_at)).min()
    }

    fn take_inbox(&mut self) {
        let (submitted, released, keep_alive) = {
            let mut inbox = self.inbox.lock();
            (
                std::mem::take(&mut inbox.submitted),
                std::mem::take(&mut inbox.released),
                std::mem::take(&mut inbox.keep_alive),
            )
        };
        for (id, job) in keep_alive {
            self.begin_keeping(id, job);
        }
        for (id, op) in submitted {
            self.begin(id, op);
        }
        for id in released {
            if let Some(running) = self.running.remove(&id) {
                // The socket closes with the connection: the server drops the waiter.
                self.forget(&running);
            }
        }
    }

    fn begin(&mut self, id: usize, mut op: AsyncOp) {
        let mut step = op.plan.first(&op.conn);
        let fd = op.conn.fd();
        let running = Running {
            out: std::mem::take(&mut step.request),
            deadline: op.deadline,
            step,
            op,
            cancelled: false,
        };
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&fd),
            Token(id),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            running
                .op
                .promise
                .complete(Err(Error::internal(format!("registering a socket: {e}"))));
            return;
        }
        self.running.insert(id, running);
        self.progress(id);
    }

    /// Sends what is pending and reads what arrived for operation `id`.
    fn progress(&mut self, id: usize) {
        let Some(mut running) = self.running.remove(&id) else {
            return;
        };
        loop {
            match advance(&mut running) {
                Ok(Some(Next::Send(mut step))) => {
                    running.out = std::mem::take(&mut step.request);
                    running.step = step;
                }
                Ok(Some(Next::Done(result))) => return self.finish(running, result),
                Ok(None) => break,
                Err(e) => return self.finish(running, Err(e)),
            }
        }
        self.running.insert(id, running);
    }

    fn expire_due(&mut self) {
        let now = Instant::now();
        let due: Vec<usize> = self
            .running
            .iter()
            .filter(|(_, r)| r.deadline.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(mut running) = self.running.remove(&id) else {
                continue;
            };
            let cancel = (!running.cancelled && running.out.is_empty())
                .then(|| running.step.exchange.expire())
                .flatten();
            match cancel {
                Some(cancel) => {
                    running.cancelled = true;
                    running.out = cancel;
                    running.deadline = grace_deadline(Instant::now(), running.op.timeout);
                    self.running.insert(id, running);
                    self.progress(id);
                }
                None => {
                    running.op.conn.mark_broken();
                    let error = running.op.plan.timeout_error(running.op.timeout);
                    self.finish(running, Err(error));
                }
            }
        }
    }

    fn begin_keeping(&mut self, id: usize, job: KeepAlive) {
        let fd = job.conn.fd();
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&fd),
            Token(id),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("a session's keep-alives cannot start: registering a socket: {e}");
            return;
        }
        let next_at = Instant::now() + job.interval;
        let keeping = Keeping {
            job,
            next_at,
            out: Vec::new(),
            exchange: None,
        };
        self.keeping.insert(id, keeping);
    }

    /// Sends the keep-alives that are due: one a period per session, never
    /// a second while the last is still unsent (a server not reading).
    fn keep_due(&mut self) {
        let now = Instant::now();
        let due: Vec<usize> = self
            .keeping
            .iter()
            .filter(|(_, k)| k.next_at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(keeping) = self.keeping.get_mut(&id) else {
                continue;
            };
            keeping.next_at = now + keeping.job.interval;
            if keeping.job.session.strong_count() == 0 {
                self.stop_keeping(id, None);
                continue;
            }
            // Reply-less while the session lives: one request a period,
            // unless the last has not left yet; an error is read whenever
            // it comes.
            if keeping.out.is_empty() {
                keeping.out = Encoder::request(Command::SessionKeepAlive).finish();
            }
            if keeping.exchange.is_none() {
                keeping.exchange = Some(keeping.job.conn.exchange(Shape::Ack));
            }
            self.keep(id);
        }
    }

    /// Sends what is pending of session `id`'s keep-alive and reads what
    /// the server said: nothing while the session lives, an error when it
    /// ends.
    fn keep(&mut self, id: usize) {
        let Some(keeping) = self.keeping.get_mut(&id) else {
            return;
        };
        let conn = &mut keeping.job.conn;
        let progress = (|| -> Result<Option<Outcome>> {
            while !keeping.out.is_empty() {
                let sent = conn.send_now(&keeping.out)?;
                if sent == 0 {
                    return Ok(None);
                }
                keeping.out.drain(..sent);
            }
            conn.flush_now()?;
            match &mut keeping.exchange {
                Some(exchange) => conn.pump(exchange),
                None => Ok(None),
            }
        })();
        match progress {
            Ok(None) => {}
            Ok(Some(Outcome::Refused(e))) => self.stop_keeping(id, Some(e)),
            // A server from before reply-less keep-alives answers each.
            Ok(Some(_)) => keeping.exchange = None,
            Err(e) => self.stop_keeping(id, Some(e)),
        }
    }

    /// Ends the keep-alives of session `id`: its handle let go, or `why`.
    fn stop_keeping(&mut self, id: usize, why: Option<Error>) {
        if let Some(keeping) = self.keeping.remove(&id) {
            let fd = keeping.job.conn.fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
            if let Some(why) = why.filter(|_| keeping.job.session.strong_count() > 0) {
                log::warn!("a session's keep-alives stopped: {}", why.message());
            }
        }
    }

    fn finish(&mut self, running: Running, result: Result<Vec<Vec<u8>>>) {
        self.forget(&running);
        let Running { op, .. } = running;
        op.promise.complete(result.map(op.finish));
        if op.conn.is_idle() {
            (op.recycle)(op.conn);
        }
    }

    fn forget(&self, running: &Running) {
        let fd = running.op.conn.fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
    }
}

/// Sends what is pending, then reads: the next step once the current
/// exchange is over, `None` while it waits for the socket.
fn advance(running: &mut Running) -> Result<Option<Next>> {
    while !running.out.is_empty() {
        let sent = running.op.conn.send_now(&running.out)?;
        if sent == 0 {
            return Ok(None);
        }
        running.out.drain(..sent);
    }
    running.op.conn.flush_now()?;
    let outcome = match running.op.conn.pump(&mut running.step.exchange)? {
        Some(outcome) => outcome,
        None => return Ok(None),
    };
    Ok(Some(running.op.plan.next(
        outcome,
        &running.op.conn,
        running.op.timeout,
    )))
}
