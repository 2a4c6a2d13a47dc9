//! The outgoing bytes of one connection, shared by the TCPStore server and
//! the RPC agent: a plain queue, written as far as a [`Sink`] (the
//! connection's wire) takes them; the event loops keep the socket's
//! WRITABLE interest in step with what is left.
//!
//! Small replies are appended to an owned buffer; large shared values are
//! queued by reference and written from where they are stored, so a value
//! is never copied to be sent. A long list of values (a MULTI_GET reply) is
//! queued as the list and encoded a little at a time as the socket takes
//! it, so the memory a reply holds is the list, not its bytes.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use crate::net::bigbuf::LARGE_VALUE_LEN;

/// Where an outbox's bytes go: a connection's wire, which takes what it
/// can now and may hold some of its own (TLS records) for later.
pub(crate) trait Sink {
    /// Takes what it can of `bytes` now: how many; `WouldBlock` for none.
    fn send(&mut self, bytes: &[u8]) -> io::Result<usize>;
    /// Sends what it holds of its own; `WouldBlock` while some is left.
    fn flush(&mut self) -> io::Result<()>;
    /// Whether it holds bytes of its own still to send.
    fn wants_write(&self) -> bool;
}

/// A buffer larger than this is released once it has been written out.
const MAX_IDLE_CAPACITY: usize = 1 << 20;

/// Values of a list reply encoded ahead of the socket at most, in bytes.
const ENCODE_AHEAD: usize = 64 << 10;

/// One run of bytes to send.
enum Segment {
    Owned(Vec<u8>),
    Shared(Arc<[u8]>),
    /// Values still to encode as byte strings (`None`: empty), from `next`.
    Values {
        values: Vec<Option<Arc<[u8]>>>,
        next: usize,
    },
}

impl Segment {
    fn bytes(&self) -> &[u8] {
        match self {
            Segment::Owned(bytes) => bytes,
            Segment::Shared(bytes) => bytes,
            Segment::Values { .. } => &[],
        }
    }
}

/// The wire size of `value` as a byte string.
fn encoded_len(value: &Option<Arc<[u8]>>) -> usize {
    8 + value.as_ref().map_or(0, |v| v.len())
}

/// Bytes queued for a connection.
pub(crate) struct Outbox {
    /// What to send, in order; the front one is partly written.
    segments: VecDeque<Segment>,
    /// Bytes of the front segment already written.
    written: usize,
    /// An emptied owned buffer kept for the next reply.
    spare: Vec<u8>,
    /// Bytes queued and not yet written.
    queued: usize,
}

impl Outbox {
    /// An empty outbox.
    pub(crate) fn new() -> Outbox {
        Outbox {
            segments: VecDeque::new(),
            written: 0,
            spare: Vec::new(),
            queued: 0,
        }
    }

    /// Whether everything queued has been written.
    pub(crate) fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Bytes queued and not yet written (what a reply list will encode to
    /// counted in full).
    pub(crate) fn queued(&self) -> usize {
        self.queued
    }

    /// Appends `bytes`.
    pub(crate) fn put(&mut self, bytes: &[u8]) {
        self.queued += bytes.len();
        self.buffer().extend_from_slice(bytes);
    }

    /// The owned buffer at the end of the queue, to append to (callers
    /// count what they append in `queued`).
    fn buffer(&mut self) -> &mut Vec<u8> {
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
        self.queued += 8 + value.len();
        let out = self.buffer();
        out.extend_from_slice(&(value.len() as u64).to_le_bytes());
        if value.len() < LARGE_VALUE_LEN {
            out.extend_from_slice(value);
        } else {
            self.segments.push_back(Segment::Shared(value.clone()));
        }
    }

    /// Appends `values` as byte strings, in order (`None` as an empty
    /// one): encoded now when they are few and small, otherwise as the
    /// socket drains.
    pub(crate) fn put_values(&mut self, values: Vec<Option<Arc<[u8]>>>) {
        let total: usize = values.iter().map(encoded_len).sum();
        if total > ENCODE_AHEAD {
            self.queued += total;
            self.segments.push_back(Segment::Values { values, next: 0 });
            return;
        }
        for value in &values {
            match value {
                Some(value) => self.put_value(value),
                None => self.put(&0u64.to_le_bytes()),
            }
        }
    }

    /// Encodes the front list of values up to [`ENCODE_AHEAD`] bytes into
    /// segments before it; drops it once every value is encoded.
    fn encode_front(&mut self) {
        let Some(Segment::Values { values, next }) = self.segments.front_mut() else {
            return;
        };
        let (mut values, mut next) = (std::mem::take(values), *next);
        self.segments.pop_front();
        let mut encoded = VecDeque::new();
        let mut out = std::mem::take(&mut self.spare);
        let mut size = 0;
        while next < values.len() && size < ENCODE_AHEAD {
            let value = values[next].take();
            next += 1;
            size += encoded_len(&value);
            out.extend_from_slice(&(value.as_ref().map_or(0, |v| v.len()) as u64).to_le_bytes());
            match value {
                Some(v) if v.len() >= LARGE_VALUE_LEN => {
                    encoded.push_back(Segment::Owned(std::mem::take(&mut out)));
                    encoded.push_back(Segment::Shared(v));
                }
                Some(v) => out.extend_from_slice(&v),
                None => {}
            }
        }
        if !out.is_empty() {
            encoded.push_back(Segment::Owned(out));
        }
        if next < values.len() {
            self.segments.push_front(Segment::Values { values, next });
        }
        while let Some(segment) = encoded.pop_back() {
            self.segments.push_front(segment);
        }
    }

    /// Writes what `sink` accepts now, a segment per call (a large value
    /// sent behind a few bytes of header would be copied into the socket
    /// at an odd offset, markedly slower); returns whether bytes are left
    /// for later (the sink's own included: TLS records).
    pub(crate) fn write_to(&mut self, sink: &mut impl Sink) -> io::Result<bool> {
        let mut blocked = match sink.flush() {
            Ok(()) => false,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
            Err(e) => return Err(e),
        };
        while let Some(front) = self.segments.front().filter(|_| !blocked) {
            if let Segment::Values { .. } = front {
                self.encode_front();
                continue;
            }
            let rest = &front.bytes()[self.written..];
            if rest.is_empty() {
                self.pop_front();
                continue;
            }
            match sink.send(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => blocked = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(!self.is_empty() || sink.wants_write())
    }

    /// `n` bytes of the front segment were written.
    fn advance(&mut self, n: usize) {
        self.queued -= n;
        self.written += n;
        if self
            .segments
            .front()
            .is_some_and(|s| self.written >= s.bytes().len())
        {
            self.pop_front();
        }
    }

    /// Drops the front segment, keeping an emptied owned buffer (unless
    /// oversized) for reuse. An emptied queue gives its buffer back: an
    /// idle connection holds none (160 bytes each, at 10k connections).
    fn pop_front(&mut self) {
        self.written = 0;
        if let Some(Segment::Owned(mut bytes)) = self.segments.pop_front() {
            if bytes.capacity() <= MAX_IDLE_CAPACITY && bytes.capacity() > self.spare.capacity() {
                bytes.clear();
                self.spare = bytes;
            }
        }
        if self.segments.is_empty() {
            self.segments = VecDeque::new();
        }
    }
}

/// Test helpers: the outbox as a socket would see it.
/// A sink taking at most `step` bytes per send, for tests.
#[cfg(test)]
struct Stepped {
    out: Vec<u8>,
    step: usize,
}

#[cfg(test)]
impl Sink for Stepped {
    fn send(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let n = bytes.len().min(self.step);
        self.out.extend_from_slice(&bytes[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn wants_write(&self) -> bool {
        false
    }
}

#[cfg(test)]
impl Outbox {
    /// Takes everything queued, written `step` bytes a call.
    pub(crate) fn drain(&mut self, step: usize) -> Vec<u8> {
        let mut sink = Stepped {
            out: Vec::new(),
            step,
        };
        while self.write_to(&mut sink).unwrap_or(false) {}
        sink.out
    }

    /// Bytes of encoded replies held in memory (not counting values held
    /// by reference).
    pub(crate) fn owned_bytes(&self) -> usize {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Owned(b) => b.capacity(),
                _ => 0,
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(outbox: &mut Outbox, step: usize) -> Vec<u8> {
        outbox.drain(step)
    }

    fn byte_string(v: &[u8]) -> Vec<u8> {
        let mut out = (v.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(v);
        out
    }

    #[test]
    fn large_values_are_queued_by_reference_in_order() {
        let mut outbox = Outbox::new();
        let big: Arc<[u8]> = vec![7u8; LARGE_VALUE_LEN].into();
        outbox.put(&[1]);
        outbox.put_value(&big);
        outbox.put_value(&Arc::from(&b"ab"[..]));
        assert_eq!(outbox.segments.len(), 3);
        let mut expected = vec![1u8];
        expected.extend(byte_string(&big));
        expected.extend(byte_string(b"ab"));
        assert_eq!(outbox.queued(), expected.len());
        // Partial writes across segment boundaries keep the order.
        assert_eq!(drain(&mut outbox, 5), expected);
        assert!(outbox.is_empty());
        assert_eq!(outbox.queued(), 0);
        assert!(outbox.spare.capacity() > 0, "the owned buffer is kept");
    }

    #[test]
    fn long_value_lists_are_encoded_as_the_socket_drains() {
        let small: Arc<[u8]> = vec![3u8; 1000].into();
        let big: Arc<[u8]> = vec![9u8; LARGE_VALUE_LEN + 1].into();
        let mut values: Vec<Option<Arc<[u8]>>> = vec![Some(small.clone()); 16_000];
        values[10] = None;
        values[500] = Some(big.clone());
        let mut expected = vec![0u8];
        for v in &values {
            expected.extend(byte_string(v.as_deref().unwrap_or_default()));
        }
        let mut outbox = Outbox::new();
        outbox.put(&[0]);
        outbox.put_values(values);
        assert_eq!(outbox.queued(), expected.len());
        // 16 MB of reply, held as a list of 16,000 references.
        let held = outbox.owned_bytes();
        assert!(held < 1024, "{held} bytes encoded ahead of the socket");
        assert_eq!(drain(&mut outbox, 100_000), expected);
        assert!(outbox.is_empty());
        // A short list is encoded at once.
        outbox.put_values(vec![Some(small), None]);
        assert!(matches!(outbox.segments.front(), Some(Segment::Owned(_))));
    }
}
