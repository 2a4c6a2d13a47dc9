//! The outgoing bytes of one non-blocking mio connection, shared by the
//! TCPStore server and the RPC agent: written as far as the socket takes
//! them, with the connection's WRITABLE interest kept in step with what is
//! left.

use std::io::{self, Write};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

/// A buffer larger than this is released once it has been written out.
const MAX_IDLE_CAPACITY: usize = 1 << 20;

/// Bytes queued for a connection.
pub(crate) struct Outbox {
    bytes: Vec<u8>,
    written: usize,
    wants_writable: bool,
}

impl Outbox {
    /// An empty outbox; `wants_writable` is the interest the connection was
    /// registered with (an outbound connect waits for WRITABLE).
    pub(crate) fn new(wants_writable: bool) -> Outbox {
        Outbox {
            bytes: Vec::new(),
            written: 0,
            wants_writable,
        }
    }

    /// Whether everything queued has been written.
    pub(crate) fn is_empty(&self) -> bool {
        self.written == self.bytes.len()
    }

    /// The buffer to append to.
    pub(crate) fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }

    /// Writes what the socket accepts now; registers for WRITABLE while
    /// bytes are left and drops that interest once they are gone.
    pub(crate) fn flush(
        &mut self,
        stream: &mut TcpStream,
        registry: &Registry,
        token: Token,
    ) -> io::Result<()> {
        while self.written < self.bytes.len() {
            match stream.write(&self.bytes[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let pending = !self.is_empty();
        if !pending {
            self.bytes.clear();
            self.written = 0;
            if self.bytes.capacity() > MAX_IDLE_CAPACITY {
                self.bytes = Vec::new();
            }
        }
        if pending != self.wants_writable {
            let interest = if pending {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            registry.reregister(stream, token, interest)?;
            self.wants_writable = pending;
        }
        Ok(())
    }
}
