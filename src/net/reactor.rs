//! What the TCPStore server, the proxy and the RPC agent share of an event
//! loop: the table of connections by mio token, a listener that keeps
//! accepting when the process runs out of file descriptors, and the
//! loop's thread, stopped when dropped.
//!
//! Out of descriptors (EMFILE/ENFILE), `accept` fails and the connection
//! stays queued; with an edge-triggered listener nothing would report it
//! again, and queued clients would wait forever. Like libuv-based servers,
//! the [`Acceptor`] keeps one descriptor in reserve: it frees it, accepts
//! and closes the queued connections (their clients see a reset at once
//! and retry), and takes the reserve back. When even that is impossible,
//! it asks the loop to retry after [`ACCEPT_RETRY`]. The episode is logged
//! once when it starts and once when accepting works again, with a count;
//! so is one where `accept` fails for any other reason (retried after
//! [`ACCEPT_RETRY`], never in a spin).

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Token, Waker};

/// The listener's token.
pub(crate) const LISTENER: Token = Token(0);
/// The waker's token.
pub(crate) const WAKER: Token = Token(1);
/// The first connection's token.
const FIRST_CONN: usize = 2;

/// How long to wait before accepting again when no descriptor could be
/// freed to refuse queued connections.
pub(crate) const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Connections by token, reusing the slots of closed ones.
pub(crate) struct ConnTable<C> {
    slots: Vec<Option<C>>,
    free: Vec<usize>,
}

impl<C> Default for ConnTable<C> {
    fn default() -> Self {
        ConnTable {
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<C> ConnTable<C> {
    /// The token the next [`ConnTable::insert`] will use (register the
    /// socket with it first).
    pub(crate) fn next_token(&self) -> Token {
        Token(FIRST_CONN + self.free.last().copied().unwrap_or(self.slots.len()))
    }

    /// Stores a connection under [`ConnTable::next_token`].
    pub(crate) fn insert(&mut self, conn: C) -> Token {
        let index = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        self.slots[index] = Some(conn);
        Token(FIRST_CONN + index)
    }

    /// The connection with `token`.
    pub(crate) fn get_mut(&mut self, token: Token) -> Option<&mut C> {
        self.slots
            .get_mut(token.0.checked_sub(FIRST_CONN)?)?
            .as_mut()
    }

    /// Takes the connection with `token` out of the table.
    pub(crate) fn remove(&mut self, token: Token) -> Option<C> {
        let index = token.0.checked_sub(FIRST_CONN)?;
        let conn = self.slots.get_mut(index)?.take()?;
        self.free.push(index);
        Some(conn)
    }

    /// Every connection, with its token.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (Token, &mut C)> {
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(|(i, slot)| Some((Token(FIRST_CONN + i), slot.as_mut()?)))
    }

    /// The index of `token` among connections (0, 1, ...): a dense id for
    /// tables kept beside this one.
    pub(crate) fn index(token: Token) -> Option<usize> {
        token.0.checked_sub(FIRST_CONN)
    }

    /// The token of the connection with index `index`.
    pub(crate) fn token(index: usize) -> Token {
        Token(FIRST_CONN + index)
    }
}

/// Whether a connection's socket is registered for WRITABLE (as well as
/// READABLE): kept in step with whether bytes wait for the socket, with a
/// system call only when that changes.
#[derive(Debug, Default)]
pub(crate) struct WritableInterest(bool);

impl WritableInterest {
    /// The interest a socket was registered with: WRITABLE too if `on`
    /// (an outbound connect waits for WRITABLE).
    pub(crate) fn new(on: bool) -> WritableInterest {
        WritableInterest(on)
    }

    /// The interest the socket is registered with.
    pub(crate) fn interest(&self) -> mio::Interest {
        match self.0 {
            true => mio::Interest::READABLE | mio::Interest::WRITABLE,
            false => mio::Interest::READABLE,
        }
    }

    /// Registers `socket` for WRITABLE if `pending` (bytes wait for it),
    /// for READABLE only otherwise, unless it already is.
    pub(crate) fn keep(
        &mut self,
        pending: bool,
        socket: &mut impl mio::event::Source,
        registry: &mio::Registry,
        token: Token,
    ) -> io::Result<()> {
        if pending != self.0 {
            registry.reregister(socket, token, WritableInterest(pending).interest())?;
            self.0 = pending;
        }
        Ok(())
    }
}

/// A listening socket that accepts until its queue is empty, whatever the
/// descriptor limits.
pub(crate) struct Acceptor {
    listener: TcpListener,
    /// Who is accepting, for log lines.
    name: &'static str,
    /// A descriptor held to be freed when the process runs out.
    reserve: Option<File>,
    /// Connections refused for want of descriptors in this episode.
    refused: u64,
    /// Connections refused for want of descriptors since the last
    /// [`Acceptor::take_refused`].
    unreported: u64,
    /// Accepting fails for another reason (logged when it starts, and
    /// when accepting works again).
    failing: bool,
}

impl Acceptor {
    /// Accepts on `listener`, logging as `name`.
    pub(crate) fn new(listener: TcpListener, name: &'static str) -> Acceptor {
        Acceptor {
            listener,
            name,
            reserve: open_reserve(),
            refused: 0,
            unreported: 0,
            failing: false,
        }
    }

    /// Connections refused for want of descriptors since the last call
    /// (for metrics).
    pub(crate) fn take_refused(&mut self) -> u64 {
        std::mem::take(&mut self.unreported)
    }

    /// The listening socket (to register it).
    pub(crate) fn listener(&mut self) -> &mut TcpListener {
        &mut self.listener
    }

    /// Accepts every queued connection, handing each to `admit`. Returns
    /// when to try again if connections may still be queued that could
    /// not be accepted or refused now.
    pub(crate) fn accept(
        &mut self,
        now: Instant,
        mut admit: impl FnMut(TcpStream, SocketAddr),
    ) -> Option<Instant> {
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    if std::mem::take(&mut self.failing) {
                        log::warn!("{}: accepting connections again", self.name);
                    }
                    if self.refused > 0 {
                        log::warn!(
                            "{}: accepting connections again, after refusing {} for want of file descriptors",
                            self.name,
                            std::mem::take(&mut self.refused)
                        );
                    }
                    admit(stream, peer);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if out_of_descriptors(&e) => {
                    if self.refused == 0 {
                        log::warn!(
                            "{}: out of file descriptors ({e}); refusing new connections until some are freed",
                            self.name
                        );
                    }
                    if !self.refuse_queued() {
                        return Some(now + ACCEPT_RETRY);
                    }
                }
                Err(e) => {
                    // ECONNABORTED and the like concern one connection;
                    // anything else, retry shortly rather than spin.
                    // Logged once per episode, never a line per retry.
                    if e.kind() == io::ErrorKind::ConnectionAborted {
                        continue;
                    }
                    if !std::mem::replace(&mut self.failing, true) {
                        log::warn!(
                            "{}: accept failed: {e}; retrying every {} ms",
                            self.name,
                            ACCEPT_RETRY.as_millis()
                        );
                    }
                    return Some(now + ACCEPT_RETRY);
                }
            }
        }
    }

    /// Frees the reserve descriptor, accepts and closes one queued
    /// connection, and takes the reserve back. False when that was not
    /// possible.
    fn refuse_queued(&mut self) -> bool {
        if self.reserve.take().is_none() {
            self.reserve = open_reserve();
            return false;
        }
        let refused = match self.listener.accept() {
            Ok((stream, _)) => {
                drop(stream);
                self.refused += 1;
                self.unreported += 1;
                true
            }
            Err(_) => false,
        };
        self.reserve = open_reserve();
        refused && self.reserve.is_some()
    }
}

fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

fn open_reserve() -> Option<File> {
    File::open("/dev/null").ok()
}

/// An event loop's thread: dropping it (or [`LoopThread::stop`]) raises
/// the loop's stop flag, wakes it and waits for the thread to end.
pub(crate) struct LoopThread {
    /// What runs, for log lines ("the proxy").
    what: &'static str,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl LoopThread {
    /// Starts `run` on a thread named `name`; it runs until `stop` is
    /// raised, and `waker` wakes its poll.
    pub(crate) fn spawn(
        what: &'static str,
        name: String,
        stop: Arc<AtomicBool>,
        waker: Arc<Waker>,
        run: impl FnOnce() + Send + 'static,
    ) -> crate::Result<LoopThread> {
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(run)
            .map_err(|e| crate::Error::internal(format!("spawning the {what} thread: {e}")))?;
        Ok(LoopThread {
            what,
            stop,
            waker,
            thread: Some(thread),
        })
    }

    /// Stops the loop and waits for its thread (once: later calls return
    /// at once).
    pub(crate) fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            log::error!("waking the {} to stop it: {e}", self.what);
        }
        let _ = thread.join();
    }
}

impl Drop for LoopThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Raises this process's soft limit on open files to its hard limit (a
/// server holds one descriptor per client); returns the limit now in force.
pub fn raise_open_files_limit() -> io::Result<u64> {
    crate::os::raise_open_files_limit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_reuses_slots_and_maps_tokens_to_dense_indices() {
        let mut t = ConnTable::default();
        let a = t.next_token();
        assert_eq!(t.insert("a"), a);
        let b = t.insert("b");
        assert_eq!(ConnTable::<()>::index(b), Some(1));
        assert_eq!(ConnTable::<()>::token(1), b);
        assert_eq!(t.remove(a), Some("a"));
        assert_eq!(t.remove(a), None);
        assert_eq!(t.next_token(), a, "a freed slot is used first");
        assert_eq!(t.insert("c"), a);
        assert_eq!(t.get_mut(a), Some(&mut "c"));
        assert_eq!(t.get_mut(LISTENER), None);
    }
}
