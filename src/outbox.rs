//! The outgoing bytes of one non-blocking mio connection, shared by the
//! TCPStore server and the RPC agent: written as far as the socket takes
//! them, with the connection's WRITABLE interest kept in step with what is
//! left.
//!
//! Small replies are appended to an owned buffer; large shared values are
//! queued by reference and written from where they are stored, so a value
//! is never copied to be sent.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::bigbuf::LARGE_VALUE_LEN;
use crate::sendv::send_bytes;

/// A buffer larger than this is released once it has been written out.
const MAX_IDLE_CAPACITY: usize = 1 << 20;

/// One run of bytes to send.
enum Segment {
    Owned(Vec<u8>),
    Shared(Arc<[u8]>),
}

impl Segment {
    fn bytes(&self) -> &[u8] {
        match self {
            Segment::Owned(bytes) => bytes,
            Segment::Shared(bytes) => bytes,
        }
    }
}

/// Bytes queued for a connection.
pub(crate) struct Outbox {
    /// What to send, in order; the front one is partly written.
    segments: VecDeque<Segment>,
    /// Bytes of the front segment already written.
    written: usize,
    /// An emptied owned buffer kept for the next reply.
    spare: Vec<u8>,
    wants_writable: bool,
}

impl Outbox {
    /// An empty outbox; `wants_writable` is the interest the connection was
    /// registered with (an outbound connect waits for WRITABLE).
    pub(crate) fn new(wants_writable: bool) -> Outbox {
        Outbox {
            segments: VecDeque::new(),
            written: 0,
            spare: Vec::new(),
            wants_writable,
        }
    }

    /// Whether everything queued has been written.
    pub(crate) fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// The owned buffer at the end of the queue, to append to.
    pub(crate) fn buffer(&mut self) -> &mut Vec<u8> {
        if !matches!(self.segments.back(), Some(Segment::Owned(_))) {
            let spare = std::mem::take(&mut self.spare);
            self.segments.push_back(Segment::Owned(spare));
        }
        match self.segments.back_mut() {
            Some(Segment::Owned(bytes)) => bytes,
            _ => unreachable!("an owned segment was just pushed"),
        }
    }

    /// Appends `value` as a PyTorch byte string (`u64` length, bytes),
    /// queueing a large value by reference instead of copying it.
    pub(crate) fn put_value(&mut self, value: &Arc<[u8]>) {
        let out = self.buffer();
        out.extend_from_slice(&(value.len() as u64).to_le_bytes());
        if value.len() < LARGE_VALUE_LEN {
            out.extend_from_slice(value);
        } else {
            self.segments.push_back(Segment::Shared(value.clone()));
        }
    }

    /// Writes what the socket accepts now, a segment per call (a large
    /// value sent behind a few bytes of header would be copied into the
    /// socket at an odd offset, markedly slower); registers for WRITABLE
    /// while bytes are left and drops that interest once they are gone.
    pub(crate) fn flush(
        &mut self,
        stream: &mut TcpStream,
        registry: &Registry,
        token: Token,
    ) -> io::Result<()> {
        while let Some(front) = self.segments.front() {
            match send_bytes(stream, &front.bytes()[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let pending = !self.is_empty();
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

    /// Drops the first `n` bytes of the queue, keeping one emptied owned
    /// buffer (unless oversized) for reuse.
    fn advance(&mut self, mut n: usize) {
        while let Some(front) = self.segments.front() {
            let left = front.bytes().len() - self.written;
            if n < left {
                self.written += n;
                return;
            }
            n -= left;
            self.written = 0;
            if let Some(Segment::Owned(mut bytes)) = self.segments.pop_front() {
                if bytes.capacity() <= MAX_IDLE_CAPACITY && bytes.capacity() > self.spare.capacity()
                {
                    bytes.clear();
                    self.spare = bytes;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(outbox: &Outbox) -> Vec<u8> {
        let mut all = Vec::new();
        for (i, s) in outbox.segments.iter().enumerate() {
            all.extend_from_slice(&s.bytes()[if i == 0 { outbox.written } else { 0 }..]);
        }
        all
    }

    #[test]
    fn large_values_are_queued_by_reference_in_order() {
        let mut outbox = Outbox::new(false);
        let big: Arc<[u8]> = vec![7u8; LARGE_VALUE_LEN].into();
        outbox.buffer().push(1);
        outbox.put_value(&big);
        outbox.put_value(&Arc::from(&b"ab"[..]));
        assert_eq!(outbox.segments.len(), 3);
        let mut expected = vec![1u8];
        expected.extend_from_slice(&(big.len() as u64).to_le_bytes());
        expected.extend_from_slice(&big);
        expected.extend_from_slice(&2u64.to_le_bytes());
        expected.extend_from_slice(b"ab");
        assert_eq!(queued(&outbox), expected);
        // Partial writes across segment boundaries keep the order.
        for step in [3, LARGE_VALUE_LEN, 7, 5] {
            outbox.advance(step);
            expected.drain(..step);
            assert_eq!(queued(&outbox), expected);
        }
        outbox.advance(expected.len());
        assert!(outbox.is_empty());
        assert!(outbox.spare.capacity() > 0, "the owned buffer is kept");
    }
}
