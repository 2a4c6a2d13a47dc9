//! A connection's bytes over a non-blocking socket, in clear or through
//! its TLS [`Session`] (made by [`crate::security::tls`]): [`Wire`] gives
//! the event loops and the client one way to read and write either.
//!
//! Each session buffers at most [`BUFFER_LIMIT`] bytes of records to send
//! (what a server holds per connection beyond its outbox), and rustls
//! bounds what it holds of records received.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use rustls::Connection;

use crate::net::outbox::Sink;
use crate::net::sendv::{send_bytes, send_vectored};
use crate::os;

/// Bytes of TLS records a session holds before its socket takes them; a
/// write beyond it waits for the socket (see [`Wire::send`]).
pub(crate) const BUFFER_LIMIT: usize = 64 << 10;

/// The first byte of a TLS connection (a handshake record). No TCPStore
/// request starts with it, so a server serving both tells them apart by
/// this byte.
pub(crate) const HANDSHAKE_RECORD: u8 = 0x16;

/// One connection's TLS state.
pub(crate) struct Session {
    conn: Connection,
}

impl Session {
    /// The session of `conn` (a client's or a server's).
    pub(crate) fn new(mut conn: Connection) -> Session {
        conn.set_buffer_limit(Some(BUFFER_LIMIT));
        Session { conn }
    }

    /// Queues a close_notify alert: the end of what this side sends (sent
    /// by the next [`Wire::flush`]).
    pub(crate) fn close_notify(&mut self) {
        self.conn.send_close_notify();
    }

    /// Whether the handshake is still going on.
    pub(crate) fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }
}

/// A socket's descriptor as rustls's source and sink of records.
struct Fd(RawFd);

impl Read for Fd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        os::recv(self.0, buf, 0)
    }
}

impl Write for Fd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        send_bytes(&self.0, buf)
    }

    /// rustls hands over its queued records together: one `sendmsg`.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        send_vectored(&self.0, bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A TLS failure as an I/O error (`InvalidData`, the rustls error inside).
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The rustls error inside an I/O error from a [`Wire`], if it is one: the
/// peer's certificate or handshake was refused, not the network.
pub(crate) fn failure(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// What a TLS failure most likely means, for a client's error message.
pub(crate) fn hint(failure: &rustls::Error) -> &'static str {
    use rustls::AlertDescription as Alert;
    match failure {
        rustls::Error::InvalidCertificate(_) => {
            " (the server's certificate is not from the CA file's CAs, or not for this host: see tls_server_name)"
        }
        rustls::Error::AlertReceived(Alert::CertificateRequired) => {
            " (the server requires a client certificate: give the client one, with its key)"
        }
        rustls::Error::AlertReceived(Alert::UnknownCA | Alert::BadCertificate) => {
            " (the server does not trust this client's certificate)"
        }
        rustls::Error::InvalidMessage(_) => " (does the server serve TLS?)",
        _ => "",
    }
}

/// Moves bytes over one non-blocking socket: in clear, or through the
/// connection's TLS session. Reads and writes never block; they fail with
/// `WouldBlock` when the socket has nothing for them.
pub(crate) struct Wire<'a> {
    fd: RawFd,
    tls: Option<&'a mut Session>,
}

impl<'a> Wire<'a> {
    /// The wire of `socket`, through `tls` if given.
    pub(crate) fn new(socket: &impl AsRawFd, tls: Option<&'a mut Session>) -> Wire<'a> {
        Wire {
            fd: socket.as_raw_fd(),
            tls,
        }
    }

    /// Sends what the wire takes of `bytes` now: how many it took. Through
    /// TLS, bytes are taken once encrypted, and the records go out as far
    /// as the socket takes them: the rest wait for [`Wire::flush`] (at most
    /// [`BUFFER_LIMIT`] bytes; nothing more is taken until they are out).
    /// A closed peer is an error, never SIGPIPE.
    pub(crate) fn send(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.send_vectored(&[IoSlice::new(bytes)])
    }

    /// [`Wire::send`] for several runs of bytes, in order.
    pub(crate) fn send_vectored(&mut self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        let Some(session) = self.tls.as_deref_mut() else {
            return send_vectored(&self.fd, parts);
        };
        flush_records(self.fd, session)?;
        let taken = session.conn.writer().write_vectored(parts)?;
        if taken == 0 && parts.iter().any(|p| !p.is_empty()) {
            // Held by the handshake, whose buffer is full.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match flush_records(self.fd, session) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
            _ => Ok(taken),
        }
    }

    /// Sends the TLS records waiting for the socket; `WouldBlock` while
    /// some are left.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        match self.tls.as_deref_mut() {
            Some(session) => flush_records(self.fd, session),
            None => Ok(()),
        }
    }

    /// Whether TLS records wait for the socket (the socket's writability
    /// matters even with nothing else to send).
    pub(crate) fn wants_write(&self) -> bool {
        self.tls.as_deref().is_some_and(|s| s.conn.wants_write())
    }

    /// Reads into `target` what has arrived, until it is full or the
    /// socket has nothing more: how many bytes (0: the peer closed). With
    /// nothing there, `WouldBlock`; so a caller woken by an edge-triggered
    /// poller reads on while `target` comes back full.
    pub(crate) fn recv_into(&mut self, target: &mut [u8]) -> io::Result<usize> {
        match self.tls.as_deref_mut() {
            None => os::recv(self.fd, target, 0),
            Some(session) => recv_tls(self.fd, session, target),
        }
    }

    /// [`Wire::recv_into`] appending at most `max` bytes to `buf`: in
    /// clear straight into its spare capacity, through TLS into zeroes a
    /// record's worth at a time (rustls writes only into initialised
    /// memory), so a large value's buffer is never zeroed ahead of its
    /// bytes.
    pub(crate) fn recv_append(&mut self, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
        let Some(session) = self.tls.as_deref_mut() else {
            return os::recv_append(self.fd, buf, max);
        };
        const STEP: usize = 16 << 10;
        let start = buf.len();
        while buf.len() - start < max {
            let before = buf.len();
            let step = STEP.min(max - (before - start));
            buf.resize(before + step, 0);
            match recv_tls(self.fd, session, &mut buf[before..]) {
                Ok(n) => {
                    buf.truncate(before + n);
                    if n < step {
                        break;
                    }
                }
                Err(e) => {
                    buf.truncate(before);
                    if before == start {
                        return Err(e);
                    }
                    break;
                }
            }
        }
        Ok(buf.len() - start)
    }
}

impl Sink for Wire<'_> {
    fn send(&mut self, bytes: &[u8]) -> io::Result<usize> {
        Wire::send(self, bytes)
    }

    fn flush(&mut self) -> io::Result<()> {
        Wire::flush(self)
    }

    fn wants_write(&self) -> bool {
        Wire::wants_write(self)
    }
}

/// One non-blocking `recv` with `flags` into `target` (see [`os::recv`]).
pub(crate) fn recv(
    socket: &impl AsRawFd,
    target: &mut [u8],
    flags: libc::c_int,
) -> io::Result<usize> {
    os::recv(socket.as_raw_fd(), target, flags)
}

fn flush_records(fd: RawFd, session: &mut Session) -> io::Result<()> {
    while session.conn.wants_write() {
        match session.conn.write_tls(&mut Fd(fd)) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads plaintext until `target` is full or the socket has nothing more,
/// feeding rustls records and sending what the handshake answers.
fn recv_tls(fd: RawFd, session: &mut Session, target: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    let mut eof = false;
    while filled < target.len() {
        match session.conn.reader().read(&mut target[filled..]) {
            Ok(0) => return Ok(filled), // close_notify: the end, after what was read
            Ok(n) => {
                filled += n;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // The peer closed without close_notify: an end as good as any
            // for this protocol (every message is framed).
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(filled),
            Err(e) => return Err(e),
        }
        if eof {
            return Ok(filled);
        }
        match session.conn.read_tls(&mut Fd(fd)) {
            Ok(0) => eof = true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && filled > 0 => return Ok(filled),
            Err(e) => return Err(e),
        }
        if let Err(e) = session.conn.process_new_packets() {
            // Tell the peer why (an alert), as far as the socket takes it.
            let _ = flush_records(fd, session);
            return Err(tls_error(e));
        }
        // The handshake answers; a full socket leaves the rest to flush().
        match flush_records(fd, session) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
            _ => {}
        }
    }
    Ok(filled)
}
