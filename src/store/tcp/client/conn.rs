//! One client connection to a TCPStore server (ours or PyTorch's): connect
//! with backoff, VALIDATE + PING + the HELLO probe, then requests whose every
//! step (connect, send, receive, cancel) ends by a deadline. Every read and
//! write is non-blocking (`MSG_DONTWAIT`) but one: a call waiting for its
//! reply on a connection in clear sleeps in the read itself, its deadline
//! the socket's receive timeout (as PyTorch's client does: a wake-up in
//! `poll` then a read costs a round trip 4-7 µs more on loopback). Over TLS
//! it waits in `poll`, as a send that the socket cannot take does; the
//! async waiter drives the same connections from its event loop. Over TLS,
//! the bytes go through the connection's session (see [`Wire`]).

use std::io::{ErrorKind, IoSlice};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use super::super::handshake::{self, Greeted};
use super::super::protocol::{Command, Encoder, Limits};
use super::reply::{Exchange, Outcome, Reply, Shape, DIRECT_MIN};
use crate::error::{Error, Result, Status};
use crate::net::bigbuf::LARGE_VALUE_LEN;
use crate::net::wire::{self, Session, Wire};
use crate::os;
use crate::security::auth::{nonce, Nonce, Secret};
use crate::security::tls::TlsClient;

/// When an operation must end; `None`: never (a zero timeout).
pub(crate) type Deadline = Option<Instant>;

/// The deadline of an operation of `timeout` starting now.
pub(crate) fn deadline_of(timeout: Duration) -> Deadline {
    (!timeout.is_zero()).then(|| Instant::now() + timeout)
}

/// Exponential backoff of connection attempts (PyTorch's values).
const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
const BACKOFF_MULTIPLIER: f64 = 1.5;
const BACKOFF_RANDOMIZATION: f64 = 0.5;
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// How long a cancelled wait gives the server to confirm the cancel before
/// the connection is dropped instead: the most any operation runs past its
/// timeout (bounded by the timeout itself too).
pub(crate) const CANCEL_GRACE: Duration = Duration::from_millis(500);

/// The read buffer of a connection.
const READ_BUFFER_LEN: usize = 64 << 10;

/// How far the receive timeout a read waits with may stray from the time
/// left to its deadline before it is set again (a system call): a read
/// ends at most this long after its deadline (plus the kernel's timer
/// granularity).
const RECV_TIMEOUT_SLACK: Duration = Duration::from_millis(2);

/// The limits of a PyTorch server (its libuv server's; the legacy server
/// has none): what a client checks its requests and replies against.
pub(crate) fn pytorch_limits() -> Limits {
    Limits {
        max_key_len: 8 << 10,
        max_value_len: 8 << 20,
        max_keys_per_request: 128 << 10,
        max_request_len: usize::MAX,
    }
}

/// Which protocol the server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// PyTorch's (a PyTorch server, or ours with extensions off).
    PyTorch,
    /// distcore's extensions, version 2: WAIT_GET, limits, status replies.
    Distcore,
}

/// A server and how to prove ourselves to it.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub(crate) host: String,
    pub(crate) port: u16,
    /// Authenticate with this secret, and insist that the server proves it
    /// holds it too.
    pub(crate) secret: Option<Secret>,
    /// Connect over TLS, trusting these CAs.
    pub(crate) tls: Option<TlsClient>,
}

/// A validated connection.
pub(crate) struct Conn {
    stream: TcpStream,
    /// The TLS session, over TLS.
    tls: Option<Session>,
    peer: String,
    dialect: Dialect,
    limits: Limits,
    /// The server lets keys be leased to sessions.
    leases: bool,
    /// The server's sessions outlive it (resumed on another server).
    sessions_outlive: bool,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Reply-less requests sent since the last reply: the server may not
    /// have applied them yet, and they are lost if the connection breaks
    /// before it has.
    unacknowledged: usize,
    /// Out of step with the server, or closed: to be dropped.
    broken: bool,
    /// The server failed reply-less writes, as the reply of a request
    /// that writes told (that request's own outcome was returned): the
    /// next request fails with it before it is sent.
    failed_writes: Option<Error>,
    /// The liveness session this (spare) connection is attached to.
    pub(crate) attached: Option<u64>,
    /// The socket's receive timeout, as last set (`None`: none, or in
    /// clear never set: a read waits without limit).
    recv_timeout: Option<Duration>,
}

fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, port)
        .to_socket_addrs()
        .map(Iterator::collect)
        .map_err(|e| Error::network(format!("cannot resolve {host}:{port}: {e}")))
}

fn left(deadline: Deadline) -> Option<Duration> {
    deadline.map(|d| d.saturating_duration_since(Instant::now()))
}

/// Waits until `fd` is ready for `events` or `deadline` passes; returns
/// whether it is ready.
fn wait_ready(fd: RawFd, events: libc::c_short, deadline: Deadline) -> std::io::Result<bool> {
    loop {
        let timeout_ms = match left(deadline) {
            None => -1,
            Some(left) if left.is_zero() => return Ok(false),
            // Rounded up, so a wait never ends before its deadline.
            Some(left) => left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32,
        };
        match os::poll_one(fd, events, timeout_ms) {
            Ok(0) => {}
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

impl Conn {
    /// Connects to the endpoint, retrying with exponential backoff and
    /// jitter until `deadline`, then validates the connection, asks for the
    /// distcore extensions and authenticates if it has a secret. A refusal
    /// to authenticate (either way) is not retried; a server with no room
    /// for one more connection is, as one that is not listening yet.
    pub(crate) fn connect(endpoint: &Endpoint, deadline: Deadline) -> Result<Conn> {
        let (host, port) = (endpoint.host.as_str(), endpoint.port);
        let started = Instant::now();
        let mut delay = BACKOFF_INITIAL;
        let mut last_error;
        loop {
            match Conn::attempt(endpoint, deadline) {
                Ok(conn) => return Ok(conn),
                // A server holding its maximum of connections says so when
                // this one authenticates (others close it at once): room may
                // come, as for a server not listening yet.
                Err(e) if matches!(e.status(), Status::Network | Status::QuotaExceeded) => {
                    last_error = e
                }
                Err(e) => return Err(e),
            }
            let jitter = 1.0 + BACKOFF_RANDOMIZATION * (2.0 * fastrand::f64() - 1.0);
            let mut sleep = delay.mul_f64(jitter);
            if let Some(left) = left(deadline) {
                if left.is_zero() {
                    break;
                }
                sleep = sleep.min(left);
            }
            std::thread::sleep(sleep);
            if left(deadline).is_some_and(|left| left.is_zero()) {
                break;
            }
            delay = delay.mul_f64(BACKOFF_MULTIPLIER).min(BACKOFF_MAX);
        }
        // PyTorch's words, with the connect timeout (not the time it took,
        // which a loaded machine stretches by a millisecond or so).
        let timeout = deadline.map_or(started.elapsed(), |d| d.saturating_duration_since(started));
        Err(Error::network(format!(
            "The client socket has timed out after {}ms while trying to connect to ({host}, {port}): {}",
            timeout.as_micros().div_ceil(1000),
            last_error.message()
        )))
    }

    fn attempt(endpoint: &Endpoint, deadline: Deadline) -> Result<Conn> {
        let (host, port) = (endpoint.host.as_str(), endpoint.port);
        let mut last = Error::network(format!("no address for {host}:{port}"));
        for addr in resolve(host, port)? {
            let budget = left(deadline).unwrap_or(Duration::from_secs(60));
            if budget.is_zero() {
                last = Error::network(format!("no time left to connect to {addr}"));
                break;
            }
            let stream = match TcpStream::connect_timeout(&addr, budget) {
                Ok(stream) => stream,
                Err(e) => {
                    last = Error::network(format!("connect to {addr}: {e}"));
                    continue;
                }
            };
            // In clear the socket blocks, for a reply's read to wait in
            // the read (every other read and write is MSG_DONTWAIT); TLS
            // reads go through rustls, which does not wait.
            let prepared = stream
                .set_nonblocking(endpoint.tls.is_some())
                .and_then(|()| stream.set_nodelay(true));
            if let Err(e) = prepared {
                last = Error::network(format!("configuring the socket to {addr}: {e}"));
                continue;
            }
            let tls = match &endpoint.tls {
                Some(client) => Some(client.session(host)?),
                None => None,
            };
            let mut conn = Conn {
                stream,
                tls,
                peer: addr.to_string(),
                dialect: Dialect::PyTorch,
                limits: pytorch_limits(),
                leases: false,
                sessions_outlive: false,
                buf: vec![0; READ_BUFFER_LEN].into_boxed_slice(),
                start: 0,
                end: 0,
                unacknowledged: 0,
                broken: false,
                failed_writes: None,
                attached: None,
                recv_timeout: None,
            };
            match conn.handshake(endpoint.secret.as_ref(), deadline) {
                Ok(()) => return Ok(conn),
                Err(e) if e.status() == Status::PermissionDenied => return Err(e),
                Err(e) => last = Error::network(format!("validating {addr}: {}", e.message())),
            }
        }
        Err(last)
    }

    /// The handshake of [`handshake`]: VALIDATE, PING with our pid as
    /// PyTorch's client does, then the HELLO probe; with a secret, then
    /// AUTH, and the server's proof checked. The decisions are
    /// [`handshake`]'s; this moves the bytes.
    fn handshake(&mut self, secret: Option<&Secret>, deadline: Deadline) -> Result<()> {
        let pid = std::process::id();
        self.send(&[&handshake::opening(pid)], deadline)?;
        let pong = self.receive_reply(Shape::U32, false, deadline)?;
        if pong.u32(0)? != pid {
            return Err(Error::network(
                "the server answered PING with a different nonce",
            ));
        }
        let hello = self.receive_reply(Shape::Hello, false, deadline)?;
        let answer = hello.u32(0)?;
        let info = hello.into_value();
        let Greeted::Distcore {
            limits,
            challenge,
            leases,
            sessions_outlive,
        } = handshake::greeted(&self.peer, answer, &info, secret)?
        else {
            return Ok(());
        };
        self.dialect = Dialect::Distcore;
        self.limits = limits;
        self.leases = leases;
        self.sessions_outlive = sessions_outlive;
        match (secret, challenge) {
            (Some(secret), Some(challenge)) => self.authenticate(secret, &challenge, deadline),
            _ => Ok(()),
        }
    }

    /// AUTH: proves we hold `secret` by answering `challenge`, then checks
    /// the server's proof that it holds it too.
    fn authenticate(
        &mut self,
        secret: &Secret,
        challenge: &Nonce,
        deadline: Deadline,
    ) -> Result<()> {
        let (answered, request) = handshake::auth_request(secret, challenge, nonce()?);
        let reply = self
            .call(&[&request], Shape::Values(1), deadline)
            .map(Reply::into_value);
        handshake::authenticated(&self.peer, secret, &answered, reply)
    }

    /// The protocol the server speaks.
    pub(crate) fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Whether the server lets keys be leased to sessions.
    pub(crate) fn holds_leases(&self) -> bool {
        self.leases
    }

    /// Whether the server's sessions outlive it: one whose connection
    /// broke is resumed on the next server at the same address.
    pub(crate) fn sessions_outlive(&self) -> bool {
        self.sessions_outlive
    }

    /// The limits requests are checked against (the server's own, or
    /// PyTorch's).
    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The socket, for the async waiter's event loop.
    pub(crate) fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Whether reply-less requests were sent since the last reply.
    pub(crate) fn is_unfenced(&self) -> bool {
        self.unacknowledged > 0
    }

    /// The reply-less requests sent since the last reply.
    pub(crate) fn unacknowledged(&self) -> usize {
        self.unacknowledged
    }

    /// The error of a connection that broke (`cause`) with `writes`
    /// reply-less writes unacknowledged: the server may never have
    /// applied them.
    pub(crate) fn lost_writes(&self, writes: usize, cause: &Error) -> Error {
        Error::network(format!(
            "{}; {writes} write(s) sent to the TCPStore at {} without a reply (set, \
             multi_set, queue_push, append) since its last reply may be lost; the next \
             call reconnects",
            cause.message(),
            self.peer
        ))
    }

    /// Whether the connection must be dropped.
    pub(crate) fn is_broken(&self) -> bool {
        self.broken
    }

    /// A new exchange for a reply of `shape` on this connection.
    pub(crate) fn exchange(&self, shape: Shape) -> Exchange {
        Exchange::new(
            shape,
            self.dialect == Dialect::Distcore,
            self.limits.max_value_len,
        )
    }

    /// Marks the connection out of step with the server: it is dropped
    /// rather than used again.
    pub(crate) fn mark_broken(&mut self) {
        self.broken = true;
    }

    fn break_with(&mut self, error: Error) -> Error {
        self.broken = true;
        error
    }

    /// Sends every byte of `parts` by `deadline`. A send that ran out of
    /// time or failed breaks the connection (part of a request may be out).
    pub(crate) fn send(&mut self, parts: &[&[u8]], deadline: Deadline) -> Result<()> {
        let result = self.send_parts(parts, deadline);
        result.map_err(|e| self.break_with(e))
    }

    fn send_parts(&mut self, parts: &[&[u8]], deadline: Deadline) -> Result<()> {
        // A large part goes out in a call of its own (see LARGE_VALUE_LEN).
        let mut batch: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len());
        for part in parts.iter().filter(|p| !p.is_empty()) {
            if part.len() >= LARGE_VALUE_LEN && !batch.is_empty() {
                self.send_all(&mut batch, deadline)?;
                batch.clear();
            }
            batch.push(IoSlice::new(part));
        }
        self.send_all(&mut batch, deadline)
    }

    fn wire(&mut self) -> Wire<'_> {
        Wire::new(&self.stream, self.tls.as_mut())
    }

    /// Sends every byte of `parts` (and every TLS record they make) by
    /// `deadline`.
    fn send_all(&mut self, mut parts: &mut [IoSlice<'_>], deadline: Deadline) -> Result<()> {
        loop {
            let sent = match parts.is_empty() {
                false => self.wire().send_vectored(parts),
                true => match self.wire().flush() {
                    Ok(()) => return Ok(()),
                    Err(e) => Err(e),
                },
            };
            match sent {
                Ok(0) => return Err(Error::network("the connection accepts no more bytes")),
                Ok(n) => IoSlice::advance_slices(&mut parts, n),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let ready = wait_ready(self.fd(), libc::POLLOUT, deadline)
                        .map_err(|e| self.io_error("waiting to send to", e))?;
                    if !ready {
                        return Err(Error::timeout(format!(
                            "sending to the TCPStore at {} did not finish in time (the server is not reading)",
                            self.peer
                        )));
                    }
                }
                Err(e) => return Err(self.io_error("sending to", e)),
            }
        }
    }

    /// Sends what the socket takes now, without waiting: how many bytes.
    /// Over TLS, records the socket did not take wait for the next call
    /// (or [`Conn::flush_now`]).
    pub(crate) fn send_now(&mut self, bytes: &[u8]) -> Result<usize> {
        loop {
            match self.wire().send(bytes) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(0),
                Err(e) => {
                    let error = self.io_error("sending to", e);
                    return Err(self.break_with(error));
                }
            }
        }
    }

    /// Sends the TLS records waiting for the socket as far as it takes
    /// them now (nothing to do in clear).
    pub(crate) fn flush_now(&mut self) -> Result<()> {
        match self.wire().flush() {
            Err(e) if !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                let error = self.io_error("sending to", e);
                Err(self.break_with(error))
            }
            _ => Ok(()),
        }
    }

    /// An I/O failure while `doing` something with the server. A TLS
    /// failure (a certificate refused, or no TLS at the other end) is
    /// `PermissionDenied`: trying again would not help.
    fn io_error(&self, doing: &str, e: std::io::Error) -> Error {
        match wire::failure(&e) {
            Some(failure) => Error::permission_denied(format!(
                "TLS with the TCPStore at {} failed: {failure}{}",
                self.peer,
                wire::hint(failure)
            )),
            None => Error::network(format!("{doing} the TCPStore at {}: {e}", self.peer)),
        }
    }

    /// Feeds the exchange what has arrived, reading the socket until it
    /// would block: the outcome once the exchange is over, `None` if more
    /// must arrive. An error breaks the connection.
    pub(crate) fn pump(&mut self, exchange: &mut Exchange) -> Result<Option<Outcome>> {
        let result = self.pump_inner(exchange);
        result.map_err(|e| self.break_with(e))
    }

    fn pump_inner(&mut self, exchange: &mut Exchange) -> Result<Option<Outcome>> {
        loop {
            if let Some(outcome) = self.feed_buffered(exchange)? {
                return Ok(Some(outcome));
            }
            if let Some((value, missing)) = exchange.direct_target() {
                debug_assert!(missing >= DIRECT_MIN);
                let got = self.wire().recv_append(value, missing);
                let Some(n) = self.received(got)? else {
                    return Ok(None);
                };
                exchange.direct_appended(n)?;
                if let Some(outcome) = exchange.take_outcome() {
                    return Ok(Some(outcome));
                }
                continue;
            }
            if self.fill_buf()?.is_none() {
                return Ok(None);
            }
        }
    }

    /// Feeds the exchange the bytes already read, emptying the buffer
    /// (unless the exchange ended before them): its outcome, if it ended.
    fn feed_buffered(&mut self, exchange: &mut Exchange) -> Result<Option<Outcome>> {
        if self.start < self.end {
            let used = exchange.feed(&self.buf[self.start..self.end])?;
            self.start += used;
            if let Some(outcome) = exchange.take_outcome() {
                return Ok(Some(outcome));
            }
            debug_assert_eq!(self.start, self.end);
        }
        self.start = 0;
        self.end = 0;
        Ok(None)
    }

    /// On a connection in clear (a blocking socket), waits in the read
    /// itself for bytes into the (empty) read buffer until `deadline`:
    /// whether any came. The socket's receive timeout is set again only
    /// when it strays from the time left by more than
    /// [`RECV_TIMEOUT_SLACK`].
    fn fill_buf_waiting(&mut self, deadline: Deadline) -> Result<bool> {
        let left = left(deadline);
        if left.is_some_and(|l| l.is_zero()) {
            return Ok(false);
        }
        let stale = match (self.recv_timeout, left) {
            (None, None) => false,
            (Some(set), Some(left)) => set.abs_diff(left) > RECV_TIMEOUT_SLACK,
            _ => true,
        };
        if stale {
            os::set_recv_timeout(self.fd(), left)
                .map_err(|e| self.io_error("setting the receive timeout for", e))?;
            self.recv_timeout = left;
        }
        let got = match os::recv_waiting(self.fd(), &mut self.buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(None),
            got => self.received(got),
        }?;
        if let Some(n) = got {
            (self.start, self.end) = (0, n);
        }
        Ok(got.is_some())
    }

    /// Reads what has arrived into the (empty) read buffer: `Some(n)`
    /// bytes, `None` if none are there yet; the peer closing is an error.
    fn fill_buf(&mut self) -> Result<Option<usize>> {
        let mut buf = std::mem::take(&mut self.buf);
        let got = self.wire().recv_into(&mut buf);
        self.buf = buf;
        let got = self.received(got)?;
        if let Some(n) = got {
            (self.start, self.end) = (0, n);
        }
        Ok(got)
    }

    /// What a read's result means for the connection (see [`Conn::recv`]).
    fn received(&self, got: std::io::Result<usize>) -> Result<Option<usize>> {
        match got {
            Ok(0) => {
                let during_handshake = self.tls.as_ref().is_some_and(Session::is_handshaking);
                Err(Error::network(format!(
                        "the TCPStore at {} closed the connection{}",
                        self.peer,
                        match during_handshake {
                            true => " during the TLS handshake (does it serve TLS, and accept this client's certificate?)",
                            false => "",
                        }
                    )))
            }
            Ok(n) => Ok(Some(n)),
            // Wire retries interrupted reads itself.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                Ok(None)
            }
            Err(e) => Err(self.io_error("reading from", e)),
        }
    }

    /// Reads until the exchange is over or `deadline` passes (a timeout
    /// error; the connection stays as it is, for a wait to cancel).
    pub(crate) fn receive(
        &mut self,
        exchange: &mut Exchange,
        deadline: Deadline,
    ) -> Result<Outcome> {
        loop {
            if self.tls.is_none() {
                if let Some(outcome) = self
                    .feed_buffered(exchange)
                    .map_err(|e| self.break_with(e))?
                {
                    return Ok(outcome);
                }
                // A large value is read straight into place, after a poll.
                if exchange.direct_target().is_none() {
                    let got = self
                        .fill_buf_waiting(deadline)
                        .map_err(|e| self.break_with(e))?;
                    if !got && left(deadline).is_some_and(|l| l.is_zero()) {
                        return Err(self.no_reply_in_time());
                    }
                    continue;
                }
            }
            if let Some(outcome) = self.pump(exchange)? {
                return Ok(outcome);
            }
            // TLS records of the handshake the socket did not take yet.
            self.flush_now()?;
            let events = match self.wire().wants_write() {
                true => libc::POLLIN | libc::POLLOUT,
                false => libc::POLLIN,
            };
            let ready = wait_ready(self.fd(), events, deadline)
                .map_err(|e| self.io_error("waiting for", e))
                .map_err(|e| self.break_with(e))?;
            if !ready {
                return Err(self.no_reply_in_time());
            }
        }
    }

    fn no_reply_in_time(&self) -> Error {
        Error::timeout(format!(
            "no reply from the TCPStore at {} in time",
            self.peer
        ))
    }

    /// Receives a whole reply of `shape` by `deadline`: its fields, or the
    /// server's error (the connection stays usable). A timeout breaks the
    /// connection: the reply may still come.
    ///
    /// Earlier reply-less writes the server reports failed before this
    /// reply fail a request that only reads (`writes` false: discarding
    /// its answer is harmless), since it may read around them; a request
    /// that writes was made, so its own outcome is returned and they fail
    /// the next request instead, before it is sent.
    fn receive_reply(&mut self, shape: Shape, writes: bool, deadline: Deadline) -> Result<Reply> {
        let mut exchange = self.exchange(shape);
        let result = match self.receive(&mut exchange, deadline) {
            Ok(Outcome::Reply(reply)) => Ok(reply),
            Ok(Outcome::Refused(error)) => Err(error),
            Ok(Outcome::Canceled) => Err(Error::internal("a plain request was cancelled")),
            Err(e) => Err(self.break_with(e)),
        };
        match exchange.take_deferred() {
            Some(failed) if !writes => Err(failed),
            Some(failed) => {
                self.failed_writes = Some(failed);
                result
            }
            None => result,
        }
    }

    /// Fails with the failure of earlier reply-less writes a reply told
    /// of, once, before anything more is sent.
    fn report_failed_writes(&mut self) -> Result<()> {
        match self.failed_writes.take() {
            Some(failed) => Err(failed),
            None => Ok(()),
        }
    }

    /// Makes sure the server applied the reply-less requests sent since the
    /// last reply (a PING round trip, by `deadline`), so that a read on
    /// another connection sees them.
    pub(crate) fn fence(&mut self, deadline: Deadline) -> Result<()> {
        if self.is_unfenced() {
            self.call(
                &[&Encoder::request(Command::Ping).u32(0).finish()],
                Shape::U32,
                deadline,
            )?;
        }
        Ok(())
    }

    /// Sends a request and receives its reply, by `deadline`.
    pub(crate) fn call(
        &mut self,
        parts: &[&[u8]],
        shape: Shape,
        deadline: Deadline,
    ) -> Result<Reply> {
        self.report_failed_writes()?;
        self.send(parts, deadline)?;
        let writes = parts
            .first()
            .and_then(|head| Command::from_byte(*head.first()?))
            .is_some_and(Command::writes);
        let reply = self.receive_reply(shape, writes, deadline);
        if !self.broken {
            self.unacknowledged = 0;
        }
        reply
    }

    /// Sends a request that has no reply when it succeeds (SET, MULTI_SET,
    /// QUEUE_PUSH; and APPEND in PyTorch's protocol): nothing is left to
    /// read, so a process may close right after it. Callers check first
    /// that the server has not closed the connection
    /// ([`Conn::check_open`]): with no reply to wait for, a dead server
    /// would otherwise go unnoticed.
    pub(crate) fn post(&mut self, parts: &[&[u8]], deadline: Deadline) -> Result<()> {
        self.report_failed_writes()?;
        self.send(parts, deadline)?;
        self.unacknowledged += 1;
        Ok(())
    }

    /// Checks, without waiting and with one system call, that the server
    /// has not closed the connection. Bytes waiting on an idle connection
    /// can only be a distcore server's deferred error for a request sent
    /// without a reply since the last reply (read before the next one);
    /// anything else breaks it.
    pub(crate) fn check_open(&mut self) -> Result<()> {
        // A failed poll (a signal) says nothing: as if nothing came.
        let revents = os::poll_one(self.fd(), libc::POLLIN | libc::POLLRDHUP, 0).unwrap_or(0);
        let closed = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR;
        if revents & closed != 0 {
            return Err(self.break_with(Error::network(format!(
                "the TCPStore at {} closed the connection",
                self.peer
            ))));
        }
        let mut arrived = revents & libc::POLLIN != 0;
        if arrived && self.tls.is_some() && self.start == self.end {
            // Records that carry no bytes for us (a TLS key update) are
            // no sign of anything.
            arrived = self.read_ahead()?;
        }
        let waiting = self.start < self.end || arrived;
        let deferred_error_possible = self.is_unfenced() && self.dialect == Dialect::Distcore;
        if waiting && !deferred_error_possible {
            return Err(self.break_with(Error::new(
                Status::Protocol,
                format!("unexpected bytes from the TCPStore at {}", self.peer),
            )));
        }
        Ok(())
    }

    /// Reads what has arrived into the (empty) read buffer: whether
    /// anything did.
    fn read_ahead(&mut self) -> Result<bool> {
        match self.fill_buf() {
            Ok(got) => Ok(got.is_some()),
            Err(e) => Err(self.break_with(e)),
        }
    }

    /// The socket (non-blocking) and TLS session of a connection just
    /// through its handshake, with the limits the server announced, for a
    /// relay that moves its bytes itself. Only a distcore server's
    /// (version 2, whose replies a relay frames), with nothing read ahead.
    pub(crate) fn into_relayed(self) -> Result<(TcpStream, Option<Session>, Limits)> {
        if self.dialect != Dialect::Distcore {
            return Err(Error::new(
                Status::NotSupported,
                format!(
                    "the TCPStore at {} is not a distcore server (or serves without extensions): \
                     there is nothing to proxy to",
                    self.peer
                ),
            ));
        }
        if !self.is_idle() || self.is_unfenced() {
            return Err(Error::internal(
                "a connection handed to a relay was not idle",
            ));
        }
        self.stream
            .set_nonblocking(true)
            .map_err(|e| Error::network(format!("configuring the socket to {}: {e}", self.peer)))?;
        Ok((self.stream, self.tls, self.limits))
    }

    /// Whether the connection is idle and in step: nothing unread, not
    /// broken (fit to go back to a pool).
    pub(crate) fn is_idle(&self) -> bool {
        !self.broken && self.start == self.end
    }
}
