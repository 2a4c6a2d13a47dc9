//! The write side of one RPC connection, shared by the I/O thread and the
//! threads that send on it (callers, and pool threads replying).
//!
//! A frame for an idle, connected socket is written by the sending thread
//! itself: no hand-off to the I/O thread and back, which costs a thread
//! wake-up on each side of every call. Whatever the socket does not take at
//! once is queued in the connection's [`Outbox`], and from then on frames
//! queue behind it until the I/O thread has flushed it, so bytes never
//! interleave or reorder.

use std::io;

use mio::net::TcpStream;
use mio::{Registry, Token};
use parking_lot::Mutex;

use crate::outbox::Outbox;
use crate::sendv::send_bytes;
use crate::tls::Wire;

/// What became of a frame handed to [`Writer::send`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    /// Written to the socket whole.
    Written,
    /// Queued; the I/O thread must flush the connection.
    NeedsFlush,
    /// Queued until the connection is established (the I/O thread flushes
    /// it then).
    AwaitingConnect,
    /// The connection is closed; nothing was sent.
    Closed,
}

struct State {
    output: Outbox,
    connected: bool,
    closed: bool,
}

/// The shared write side of a connection.
pub(crate) struct Writer {
    /// A duplicate of the connection's (non-blocking) socket for writes
    /// from any thread; the I/O thread keeps the registered original.
    socket: std::net::TcpStream,
    state: Mutex<State>,
}

impl Writer {
    /// The write side of `stream`; `connected` false for an outbound
    /// connection still being established (registered for WRITABLE).
    pub(crate) fn new(stream: &TcpStream, connected: bool) -> io::Result<Writer> {
        use std::os::fd::{AsFd, OwnedFd};
        let fd: OwnedFd = stream.as_fd().try_clone_to_owned()?;
        Ok(Writer {
            socket: std::net::TcpStream::from(fd),
            state: Mutex::new(State {
                output: Outbox::new(!connected),
                connected,
                closed: false,
            }),
        })
    }

    /// Sends `frame`: written at once when the socket is connected and
    /// nothing is queued before it, queued otherwise.
    pub(crate) fn send(&self, frame: &[u8]) -> Sent {
        let mut state = self.state.lock();
        if state.closed {
            return Sent::Closed;
        }
        if !state.connected {
            state.output.put(frame);
            return Sent::AwaitingConnect;
        }
        let mut written = 0;
        if state.output.is_empty() {
            while written < frame.len() {
                match send_bytes(&self.socket, &frame[written..]) {
                    Ok(0) => break,
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // Would block, or an error the I/O thread will meet
                    // (and close the connection over) when it flushes.
                    Err(_) => break,
                }
            }
        }
        if written == frame.len() {
            return Sent::Written;
        }
        state.output.put(&frame[written..]);
        Sent::NeedsFlush
    }

    /// The I/O thread: the outbound connection is established.
    pub(crate) fn set_connected(&self) {
        self.state.lock().connected = true;
    }

    /// The I/O thread: writes what is queued as far as the socket takes it,
    /// keeping the connection's WRITABLE interest in step.
    pub(crate) fn flush(
        &self,
        stream: &mut TcpStream,
        registry: &Registry,
        token: Token,
    ) -> io::Result<()> {
        let mut state = self.state.lock();
        if !state.connected || state.closed {
            return Ok(());
        }
        let mut wire = Wire::new(stream, None);
        state.output.flush(&mut wire, stream, registry, token)
    }

    /// The I/O thread: the connection is gone; later sends report
    /// [`Sent::Closed`].
    pub(crate) fn close(&self) {
        let mut state = self.state.lock();
        state.closed = true;
        state.output = Outbox::new(false);
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
        let writer = Writer::new(&stream, true).unwrap();
        assert_eq!(writer.send(b"abc"), Sent::Written);
        let mut buf = [0u8; 3];
        peer.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"abc");

        let connecting = Writer::new(&stream, false).unwrap();
        assert_eq!(connecting.send(b"de"), Sent::AwaitingConnect);
        connecting.set_connected();
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
