//! The proxy's event loop: it accepts local connections, pairs each with
//! an upstream one (made by the [`Connector`]), and moves bytes between
//! them through their [`Relay`]. It decides nothing about the protocol.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::connector::{Connected, Connector};
use super::relay::Relay;
use super::{MAX_OWED, OUTBOX_LIMIT, READ_CHUNK};
use crate::net::outbox::Outbox;
use crate::net::reactor::{Acceptor, ConnTable, WritableInterest, LISTENER, WAKER};
use crate::net::wire::{Session, Wire};

/// How long a pair whose one side has closed is kept to hand the other
/// what is still owed to it (a local client's last write, replies
/// already relayed).
const LINGER: Duration = Duration::from_secs(5);

/// The token of a pair's local socket.
fn local_token(pair: Token) -> Token {
    Token(pair.0 * 2)
}

/// The token of a pair's upstream socket.
fn upstream_token(pair: Token) -> Token {
    Token(pair.0 * 2 + 1)
}

/// The pair a socket's token belongs to, and whether it is the upstream one.
fn pair_of(token: Token) -> (Token, bool) {
    (Token(token.0 / 2), token.0 % 2 == 1)
}

/// One side of a pair: a socket, what waits to be written to it, and
/// whether it may have more to read.
struct Side {
    socket: TcpStream,
    tls: Option<Session>,
    interest: WritableInterest,
    outbox: Outbox,
    readable: bool,
    /// It has closed (end of stream read).
    closed: bool,
}

impl Side {
    fn new(socket: TcpStream, tls: Option<Session>) -> Side {
        Side {
            socket,
            tls,
            interest: WritableInterest::new(false),
            outbox: Outbox::new(),
            readable: true,
            closed: false,
        }
    }

    fn wire(&mut self) -> Wire<'_> {
        Wire::new(&self.socket, self.tls.as_mut())
    }

    /// Writes what the socket takes; whether bytes are left.
    fn flush(&mut self) -> io::Result<bool> {
        let mut wire = Wire::new(&self.socket, self.tls.as_mut());
        self.outbox.write_to(&mut wire)
    }

    /// Reads one chunk into `buf` if the side may have some: `Some(0)` is
    /// the end of the stream, `None` nothing now.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if !self.readable || self.closed {
            return Ok(None);
        }
        match self.wire().recv_into(buf) {
            Ok(0) => {
                self.closed = true;
                Ok(Some(0))
            }
            Ok(n) => {
                // A short read emptied the socket; a full one may not have.
                self.readable = n == buf.len();
                Ok(Some(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.readable = false;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Keeps the WRITABLE interest in step with what waits.
    fn keep_interest(&mut self, pending: bool, poll: &Poll, token: Token) -> io::Result<()> {
        self.interest
            .keep(pending, &mut self.socket, poll.registry(), token)
    }
}

/// How a pair is ending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The local client closed: its last bytes go upstream, then the end
    /// of the stream, and the pair waits for the server to close.
    LocalClosed,
    /// The upstream side is gone (closed, failed, or the relay refused
    /// what it sent): replies relayed before it go to the local client,
    /// then its connection is closed.
    UpstreamGone,
}

/// A local connection and its upstream one.
struct Pair {
    serial: u64,
    peer: SocketAddr,
    local: Side,
    /// The upstream connection and the relay over it: none until the
    /// connector has made it.
    upstream: Option<(Side, Relay)>,
    ending: Option<(Ending, Instant)>,
    /// The end of what goes upstream (a local client that closed) was
    /// queued to TLS (close_notify)...
    notified_upstream: bool,
    /// ...and sent (the socket shut for writing).
    shut_upstream: bool,
}

/// What the loop does with a pair after serving it.
enum Served {
    Keep { again: bool },
    Drop,
}

/// The proxy's event loop.
pub(super) struct EventLoop {
    pub(super) poll: Poll,
    pub(super) acceptor: Acceptor,
    pub(super) connector: Connector,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) max_connections: usize,
    pairs: ConnTable<Pair>,
    open: usize,
    next_serial: u64,
    /// Pairs with bytes left to read after their turn.
    again: Vec<Token>,
    /// When ending pairs are to be dropped, soonest first (a pair's
    /// serial tells an entry for a slot reused since from its own).
    lingering: BinaryHeap<Reverse<(Instant, Token, u64)>>,
    buf: Box<[u8]>,
    /// Connections refused for the connection limit since it was last logged.
    refused: u64,
}

impl EventLoop {
    pub(super) fn new(
        poll: Poll,
        acceptor: Acceptor,
        connector: Connector,
        stop: Arc<AtomicBool>,
        max_connections: usize,
    ) -> EventLoop {
        EventLoop {
            poll,
            acceptor,
            connector,
            stop,
            max_connections,
            pairs: ConnTable::default(),
            open: 0,
            next_serial: 0,
            again: Vec::new(),
            lingering: BinaryHeap::new(),
            buf: vec![0; READ_CHUNK].into_boxed_slice(),
            refused: 0,
        }
    }

    /// Runs until the stop flag is raised.
    pub(super) fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        let mut accept_retry: Option<Instant> = None;
        while !self.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            let timeout = if self.again.is_empty() {
                self.next_deadline(accept_retry)
                    .map(|at| at.saturating_duration_since(now))
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("proxy: poll failed: {e}; stopping");
                    return;
                }
            }
            let now = Instant::now();
            let mut touched = std::mem::take(&mut self.again);
            for event in events.iter() {
                match event.token() {
                    LISTENER => accept_retry = self.accept(now),
                    WAKER => {}
                    token => {
                        let (pair, upstream) = pair_of(token);
                        if let Some(p) = self.pairs.get_mut(pair) {
                            let side = match upstream {
                                true => p.upstream.as_mut().map(|(side, _)| side),
                                false => Some(&mut p.local),
                            };
                            if let Some(side) = side {
                                side.readable |= event.is_readable()
                                    || event.is_read_closed()
                                    || event.is_error();
                            }
                            touched.push(pair);
                        }
                    }
                }
            }
            if accept_retry.is_some_and(|at| at <= now) {
                accept_retry = self.accept(now);
            }
            for connected in self.connector.take_done() {
                if let Some(pair) = self.connected(connected) {
                    touched.push(pair);
                }
            }
            // Pairs past their linger time are served once more, and dropped.
            while let Some(Reverse((at, pair, serial))) = self.lingering.peek().copied() {
                if at > now {
                    break;
                }
                self.lingering.pop();
                if self.pairs.get_mut(pair).is_some_and(|p| p.serial == serial) {
                    touched.push(pair);
                }
            }
            touched.sort_unstable();
            touched.dedup();
            for pair in touched {
                self.serve(pair, now);
            }
        }
    }

    /// The earliest time something is due: a retried accept, a pair's end.
    fn next_deadline(&self, accept_retry: Option<Instant>) -> Option<Instant> {
        let linger = self.lingering.peek().map(|Reverse((at, _, _))| *at);
        linger.into_iter().chain(accept_retry).min()
    }

    /// Accepts what is queued: each connection waits for its upstream
    /// one, unread; past the connection limit it is closed at once.
    fn accept(&mut self, now: Instant) -> Option<Instant> {
        let mut accepted = Vec::new();
        let retry = self
            .acceptor
            .accept(now, |stream, peer| accepted.push((stream, peer)));
        for (stream, peer) in accepted {
            if self.open >= self.max_connections {
                self.refused += 1;
                if self.refused == 1 {
                    log::warn!(
                        "proxy: {} local connections open, the most allowed: closing new ones",
                        self.open
                    );
                }
                continue;
            }
            if std::mem::take(&mut self.refused) > 0 {
                log::warn!("proxy: accepting local connections again");
            }
            let _ = stream.set_nodelay(true);
            let pair = self.pairs.next_token();
            let mut local = Side::new(stream, None);
            if let Err(e) = self.poll.registry().register(
                &mut local.socket,
                local_token(pair),
                Interest::READABLE,
            ) {
                log::warn!("proxy: cannot register a connection from {peer}: {e}");
                continue;
            }
            self.next_serial += 1;
            let serial = self.next_serial;
            self.pairs.insert(Pair {
                serial,
                peer,
                local,
                upstream: None,
                ending: None,
                notified_upstream: false,
                shut_upstream: false,
            });
            self.open += 1;
            self.connector.request(pair, serial);
        }
        retry
    }

    /// An upstream connection was made (or could not be) for a pair.
    fn connected(&mut self, connected: Connected) -> Option<Token> {
        let Connected {
            pair,
            serial,
            upstream,
        } = connected;
        let p = self
            .pairs
            .get_mut(pair)
            .filter(|p| p.serial == serial && p.upstream.is_none())?;
        match upstream {
            Ok((stream, tls, limits)) => {
                let mut side = Side::new(TcpStream::from_std(stream), tls);
                let registered = self.poll.registry().register(
                    &mut side.socket,
                    upstream_token(pair),
                    Interest::READABLE,
                );
                if let Err(e) = registered {
                    log::warn!("proxy: cannot register an upstream connection: {e}");
                    self.remove(pair);
                    return None;
                }
                p.upstream = Some((side, Relay::new(limits)));
                Some(pair)
            }
            Err(e) => {
                log::warn!(
                    "proxy: closing the connection from {}: no upstream connection: {e}",
                    p.peer
                );
                self.remove(pair);
                None
            }
        }
    }

    /// Serves one pair: moves what can be moved, and drops it once done.
    fn serve(&mut self, pair: Token, now: Instant) {
        let Some(p) = self.pairs.get_mut(pair) else {
            return;
        };
        let was_ending = p.ending.is_some();
        let served = serve_pair(p, &mut self.buf, now);
        if let (false, Some((_, at))) = (was_ending, p.ending) {
            self.lingering.push(Reverse((at, pair, p.serial)));
        }
        let kept = match served {
            Ok(Served::Keep { again }) => {
                let interests = p
                    .local
                    .keep_interest(!p.local.outbox.is_empty(), &self.poll, local_token(pair))
                    .and_then(|()| match p.upstream.as_mut() {
                        Some((up, _)) => {
                            let pending = !up.outbox.is_empty() || up.wire().wants_write();
                            up.keep_interest(pending, &self.poll, upstream_token(pair))
                        }
                        None => Ok(()),
                    });
                match interests {
                    Ok(()) => again,
                    Err(e) => {
                        log::warn!("proxy: cannot poll a connection from {}: {e}", p.peer);
                        self.remove(pair);
                        return;
                    }
                }
            }
            Ok(Served::Drop) => {
                self.remove(pair);
                return;
            }
            Err(e) => {
                log::info!("proxy: closing the connection from {}: {e}", p.peer);
                self.remove(pair);
                return;
            }
        };
        if kept {
            self.again.push(pair);
        }
    }

    fn remove(&mut self, pair: Token) {
        if let Some(mut p) = self.pairs.remove(pair) {
            self.open -= 1;
            let _ = self.poll.registry().deregister(&mut p.local.socket);
            if let Some((up, _)) = p.upstream.as_mut() {
                let _ = self.poll.registry().deregister(&mut up.socket);
            }
        }
    }
}

/// Whether a pair's local side may be read: its requests have room on
/// their way upstream, and not too many await their replies.
fn may_read_local(up: &Side, relay: &Relay) -> bool {
    up.outbox.queued() < OUTBOX_LIMIT && relay.owed() < MAX_OWED
}

/// Moves a pair's bytes as far as its sockets and bounds allow, one read
/// per side. Errors close the pair at once (the local client sent what
/// cannot be relayed, or a socket failed).
fn serve_pair(p: &mut Pair, buf: &mut [u8], now: Instant) -> crate::Result<Served> {
    let net = |what: &str, e: io::Error| crate::Error::network(format!("{what}: {e}"));
    let Some((up, relay)) = p.upstream.as_mut() else {
        // Still connecting: nothing is read until the upstream side is there.
        return Ok(Served::Keep { again: false });
    };
    if let Some((_, at)) = p.ending {
        if at <= now {
            return Ok(Served::Drop);
        }
    }
    up.flush().map_err(|e| net("writing upstream", e))?;
    let local_flushed = p.local.flush();

    // Upstream to local: replies, unless the local side is past caring.
    let upstream_room = p.local.outbox.queued() < OUTBOX_LIMIT;
    if upstream_room || p.ending.is_some() {
        match up.read(buf) {
            Ok(Some(0)) => {
                if p.ending.is_none() {
                    p.ending = Some((Ending::UpstreamGone, now + LINGER));
                }
            }
            Ok(Some(n)) if p.ending.is_none() => {
                // The replies before an error still go to the client.
                if let Err(e) = relay.on_upstream(&buf[..n], &mut p.local.outbox) {
                    log::info!("proxy: the connection from {}: {e}", p.peer);
                    p.ending = Some((Ending::UpstreamGone, now + LINGER));
                }
            }
            Ok(_) => {}
            Err(e) => {
                if p.ending.is_none() {
                    log::info!(
                        "proxy: the connection from {}: reading upstream: {e}",
                        p.peer
                    );
                }
                up.closed = true;
                p.ending = Some((Ending::UpstreamGone, now + LINGER));
            }
        }
    }

    // Local to upstream: requests, within the bounds.
    if p.ending.is_none() && may_read_local(up, relay) {
        match p.local.read(buf).map_err(|e| net("reading", e))? {
            Some(0) => p.ending = Some((Ending::LocalClosed, now + LINGER)),
            Some(n) => relay.on_local(&buf[..n], &mut up.outbox, &mut p.local.outbox)?,
            None => {}
        }
    }

    let upstream_left = up.flush().map_err(|e| net("writing upstream", e));
    let local_left = local_flushed.and_then(|_| p.local.flush());
    match p.ending {
        None => {
            upstream_left?;
            local_left.map_err(|e| net("writing", e))?;
            // Served again next turn only if it could read then: not
            // while a bound holds the reading back (a reply, a write to the
            // socket or an event will).
            let again = (p.local.readable && may_read_local(up, relay))
                || (up.readable && p.local.outbox.queued() < OUTBOX_LIMIT);
            Ok(Served::Keep { again })
        }
        Some((Ending::UpstreamGone, _)) => match local_left {
            Ok(false) => Ok(Served::Drop),
            Ok(true) => Ok(Served::Keep { again: false }),
            Err(_) => Ok(Served::Drop),
        },
        Some((Ending::LocalClosed, _)) => {
            if upstream_left? {
                return Ok(Served::Keep { again: false });
            }
            if !p.notified_upstream {
                p.notified_upstream = true;
                if let Some(tls) = up.tls.as_mut() {
                    tls.close_notify();
                }
            }
            if up.flush().map_err(|e| net("writing upstream", e))? {
                return Ok(Served::Keep { again: false });
            }
            if !p.shut_upstream {
                p.shut_upstream = true;
                let _ = up.socket.shutdown(Shutdown::Write);
            }
            // What the server still sends is read and dropped until it
            // closes too.
            let again = up.readable;
            Ok(match up.closed {
                true => Served::Drop,
                false => Served::Keep { again },
            })
        }
    }
}
