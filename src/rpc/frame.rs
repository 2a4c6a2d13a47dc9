//! The RPC agent's frame codec, socket-free: `u32 length` (of the rest),
//! `u8 kind`, `u64 id`, `u16 sender`, payload (an encoded request or
//! response, or a handshake message).

use super::message::WorkerId;
use crate::error::{Error, Result};

/// Bytes of a frame's header: length, kind, id and sender.
pub(crate) const HEADER: usize = 4 + 1 + 8 + 2;
/// Largest frame, header included, sent or accepted: a longer message is
/// refused before it is sent (`DC_ERR_INVALID_ARGUMENT`), and a peer that
/// announces one is closed. Frame lengths are `u32`s.
pub(crate) const MAX_FRAME: usize = 1 << 30;

/// A frame's kind.
pub(crate) mod kind {
    /// A request, answered by a response with the same id.
    pub(crate) const REQUEST: u8 = 0;
    /// The response to the request with its id.
    pub(crate) const RESPONSE: u8 = 1;
    /// The connecting worker will authenticate (empty).
    pub(crate) const HELLO: u8 = 2;
    /// The accepting worker's challenge.
    pub(crate) const CHALLENGE: u8 = 3;
    /// The connecting worker's answer: its nonce and proof.
    pub(crate) const AUTH: u8 = 4;
    /// The accepting worker's proof.
    pub(crate) const PROOF: u8 = 5;
    /// The highest kind there is.
    pub(crate) const LAST: u8 = PROOF;
}

/// One frame of `kind` with `payload`; an error when the payload does not
/// fit under [`MAX_FRAME`].
pub(crate) fn frame(kind: u8, id: u64, sender: WorkerId, payload: &[u8]) -> Result<Vec<u8>> {
    let len = HEADER - 4 + payload.len();
    if HEADER + payload.len() > MAX_FRAME {
        return Err(Error::invalid_argument(format!(
            "an RPC message of {} bytes exceeds the limit of {MAX_FRAME} bytes per message",
            payload.len()
        )));
    }
    let mut f = Vec::new();
    f.try_reserve_exact(HEADER + payload.len())
        .map_err(|_| Error::invalid_argument("cannot allocate an RPC message"))?;
    f.extend_from_slice(&(len as u32).to_le_bytes());
    f.push(kind);
    f.extend_from_slice(&id.to_le_bytes());
    f.extend_from_slice(&sender.to_le_bytes());
    f.extend_from_slice(payload);
    Ok(f)
}

/// A frame read in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame<'a> {
    pub(crate) kind: u8,
    pub(crate) id: u64,
    pub(crate) sender: WorkerId,
    pub(crate) payload: &'a [u8],
}

/// What the start of a buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Head {
    /// Not even the length yet.
    Nothing,
    /// A frame whose length field says `len` bytes follow, and its kind
    /// if that has arrived; the frame itself once all of it has.
    Frame {
        len: usize,
        kind: Option<u8>,
        whole: Option<usize>,
    },
}

/// Reads what starts `input`: check `len` and `kind` (see
/// [`super::handshake::Handshake::screen`]) before waiting for the body, then
/// [`decode`] the frame, `whole` bytes long.
pub(crate) fn head(input: &[u8]) -> Head {
    let Some(length) = input.get(..4) else {
        return Head::Nothing;
    };
    let len = u32::from_le_bytes([length[0], length[1], length[2], length[3]]) as usize;
    let whole = (input.len() >= 4 + len).then_some(4 + len);
    Head::Frame {
        len,
        kind: input.get(4).copied(),
        whole,
    }
}

/// The frame that is the whole of `bytes` (its length checked by
/// [`head`], at least [`HEADER`]).
pub(crate) fn decode(bytes: &[u8]) -> Frame<'_> {
    let body = &bytes[4..];
    Frame {
        kind: body[0],
        id: u64::from_le_bytes(body[1..9].try_into().unwrap_or_default()),
        sender: u16::from_le_bytes([body[9], body[10]]),
        payload: &body[11..],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_too_long_for_a_frame_is_refused_before_it_is_sent() {
        // Zeroed by the allocator: no page is touched.
        let payload = vec![0u8; MAX_FRAME];
        let e = frame(0, 1, 0, &payload).unwrap_err();
        assert_eq!(e.status(), crate::Status::InvalidArgument);
        assert!(e.message().contains("exceeds the limit"), "{}", e.message());
        let f = frame(1, 7, 3, b"ok").unwrap();
        assert_eq!(f.len(), HEADER + 2);
        assert_eq!(
            u32::from_le_bytes(f[..4].try_into().unwrap()) as usize,
            f.len() - 4
        );
    }

    #[test]
    fn frames_are_read_back_as_they_arrive() {
        let f = frame(kind::RESPONSE, 7, 3, b"ok").unwrap();
        assert_eq!(head(&f[..3]), Head::Nothing);
        let len = f.len() - 4;
        let partial = Head::Frame {
            len,
            kind: None,
            whole: None,
        };
        assert_eq!(head(&f[..4]), partial);
        let whole = Head::Frame {
            len,
            kind: Some(kind::RESPONSE),
            whole: Some(f.len()),
        };
        let mut two = f.clone();
        two.extend_from_slice(&f);
        assert_eq!(head(&two), whole);
        let read = decode(&f);
        assert_eq!((read.kind, read.id, read.sender), (kind::RESPONSE, 7, 3));
        assert_eq!(read.payload, b"ok");
    }
}
