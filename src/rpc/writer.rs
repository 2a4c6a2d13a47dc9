//! The write side of one RPC connection, shared by the I/O thread and the
//! threads that send on it (callers, and pool threads replying), and the
//! connection's TLS session, which reading shares.
//!
//! A frame for an idle, open socket is written by the sending thread
//! itself: no hand-off to the I/O thread and back, which costs a thread
//! wake-up on each side of every call. Whatever the socket does not take at
//! once is queued in the connection's [`Outbox`], and from then on frames
//! queue behind it until the I/O thread has flushed it, so bytes never
//! interleave or reorder. Until the connection is open (connected and, with
//! a secret, authenticated) frames queue; the handshake's own frames go
//! ahead of them.

use std::io;

use mio::net::TcpStream;
use mio::{Registry, Token};
use parking_lot::Mutex;

use crate::net::outbox::Outbox;
use crate::net::reactor::WritableInterest;
use crate::net::wire::{Session, Wire};

/// What became of a frame handed to [`Writer::send`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    /// Written to the socket whole.
    Written,
    /// Queued; the I/O thread must flush the connection.
    NeedsFlush,
    /// Queued until the connection is open (the I/O thread flushes it
    /// then).
    AwaitingConnect,
    /// The connection is closed; nothing was sent.
    Closed,
}

struct State {
    output: Outbox,
    /// The socket is registered for WRITABLE (bytes wait for it).
    writable: WritableInterest,
    /// The connection's TLS session, over TLS.
    tls: Option<Session>,
    /// Handshake frames the socket has not taken yet: before `output`.
    handshake: Vec<u8>,
    /// Frames may go out: connected and, with a secret, authenticated.
    open: bool,
    closed: bool,
}

impl State {
    fn wire<'a>(&'a mut self, socket: &std::net::TcpStream) -> Wire<'a> {
        Wire::new(socket, self.tls.as_mut())
    }
}

/// The shared write side of a connection.
pub(crate) struct Writer {
    /// A duplicate of the connection's (non-blocking) socket for writes
    /// from any thread; the I/O thread keeps the registered original.
    socket: std::net::TcpStream,
    /// Over TLS (reads then go through the session, under the lock).
    tls: bool,
    state: Mutex<State>,
}

impl Writer {
    /// The write side of `stream`, through `tls` if given; `open` false
    /// for a connection still being established or authenticated (an
    /// outbound one is registered for WRITABLE).
    pub(crate) fn new(stream: &TcpStream, open: bool, tls: Option<Session>) -> io::Result<Writer> {
        use std::os::fd::{AsFd, OwnedFd};
        let fd: OwnedFd = stream.as_fd().try_clone_to_owned()?;
        Ok(Writer {
            socket: std::net::TcpStream::from(fd),
            tls: tls.is_some(),
            state: Mutex::new(State {
                output: Outbox::new(),
                writable: WritableInterest::new(!open),
                tls,
                handshake: Vec::new(),
                open,
                closed: false,
            }),
        })
    }

    /// Sends `frame`: written at once when the connection is open and
    /// nothing is queued before it, queued otherwise.
    pub(crate) fn send(&self, frame: &[u8]) -> Sent {
        let mut state = self.state.lock();
        if state.closed {
            return Sent::Closed;
        }
        if !state.open {
            state.output.put(frame);
            return Sent::AwaitingConnect;
        }
        let mut written = 0;
        if state.output.is_empty() && state.handshake.is_empty() {
            let mut wire = state.wire(&self.socket);
            while written < frame.len() {
                match wire.send(&frame[written..]) {
                    Ok(0) => break,
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // Would block, or an error the I/O thread will meet
                    // (and close the connection over) when it flushes.
                    Err(_) => break,
                }
            }
            if written == frame.len() && !wire.wants_write() {
                return Sent::Written;
            }
        }
        state.output.put(&frame[written..]);
        Sent::NeedsFlush
    }

    /// The I/O thread: sends a frame of the handshake, ahead of every
    /// frame queued (call [`Writer::flush`] after it).
    pub(crate) fn send_handshake(&self, frame: &[u8]) {
        self.state.lock().handshake.extend_from_slice(frame);
    }

    /// Whether the connection's TLS handshake is still going on (false
    /// without TLS).
    pub(crate) fn tls_handshaking(&self) -> bool {
        self.state
            .lock()
            .tls
            .as_ref()
            .is_some_and(Session::is_handshaking)
    }

    /// The I/O thread: the connection is established (and authenticated):
    /// frames go out from now on.
    pub(crate) fn set_open(&self) {
        self.state.lock().open = true;
    }

    /// The I/O thread: writes the handshake's frames and, once open, what
    /// is queued, as far as the socket takes them, keeping the
    /// connection's WRITABLE interest in step.
    pub(crate) fn flush(
        &self,
        stream: &mut TcpStream,
        registry: &Registry,
        token: Token,
    ) -> io::Result<()> {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        if state.closed {
            return Ok(());
        }
        let mut wire = Wire::new(&self.socket, state.tls.as_mut());
        while !state.handshake.is_empty() {
            match wire.send(&state.handshake) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => drop(state.handshake.drain(..n)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        let pending = if state.handshake.is_empty() && state.open {
            state.output.write_to(&mut wire)?
        } else {
            match wire.flush() {
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                _ => {}
            }
            !state.handshake.is_empty() || wire.wants_write()
        };
        state.writable.keep(pending, stream, registry, token)
    }

    /// The I/O thread: reads what has arrived (see [`Wire::recv_into`]),
    /// through the TLS session if there is one.
    pub(crate) fn recv(&self, stream: &mut TcpStream, target: &mut [u8]) -> io::Result<usize> {
        if !self.tls {
            return io::Read::read(stream, target);
        }
        let mut state = self.state.lock();
        state.wire(&self.socket).recv_into(target)
    }

    /// The I/O thread: the connection is gone; later sends report
    /// [`Sent::Closed`].
    pub(crate) fn close(&self) {
        let mut state = self.state.lock();
        state.closed = true;
        state.output = Outbox::new();
        state.handshake = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn pair() -> (TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (TcpStream::from_std(server), client)
    }

    #[test]
    fn frames_go_out_directly_queue_while_connecting_and_stop_when_closed() {
        let (mut stream, mut peer) = pair();
        let poll = mio::Poll::new().unwrap();
        let token = Token(7);
        poll.registry()
            .register(&mut stream, token, mio::Interest::READABLE)
            .unwrap();
        let writer = Writer::new(&stream, true, None).unwrap();
        assert_eq!(writer.send(b"abc"), Sent::Written);
        let mut buf = [0u8; 3];
        peer.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"abc");

        let connecting = Writer::new(&stream, false, None).unwrap();
        assert_eq!(connecting.send(b"de"), Sent::AwaitingConnect);
        connecting.set_open();
        assert_eq!(connecting.send(b"f"), Sent::NeedsFlush, "queued behind");
        connecting
            .flush(&mut stream, poll.registry(), token)
            .unwrap();
        peer.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"def");

        writer.close();
        assert_eq!(writer.send(b"x"), Sent::Closed);
    }
}
