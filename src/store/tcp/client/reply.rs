//! What a TCPStore client expects back, decoded from whatever bytes have
//! arrived: no sockets here. A [`Decoder`] reads one reply field by field
//! (checking every length before allocating); an [`Exchange`] is one request's
//! reply, and for the waiting commands the CANCEL_WAIT handshake that ends a
//! wait whose time ran out.

use super::super::protocol::{
    Command, Encoder, HELLO_V2_ACK, REPLY_DEFERRED_ERROR, REPLY_ERROR, REPLY_OK, STOP_WAITING,
    WAIT_CANCELED,
};
use crate::error::{Error, Result, Status};
use crate::net::bigbuf::try_value_buffer;

/// Below this many missing bytes a value is filled from the connection's
/// read buffer; from it on, straight from the socket.
pub(crate) const DIRECT_MIN: usize = 64 << 10;

/// The longest error message a server may send (its messages are a line).
const MAX_MESSAGE_LEN: usize = 64 << 10;

/// Values a reply may preallocate for before they arrive.
const PREALLOCATED_VALUES: usize = 1024;

/// One field of a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Field {
    U8(u8),
    U32(u32),
    I64(i64),
    Bytes(Vec<u8>),
}

/// The shape of a reply, after the status byte of a version 2 connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// Nothing: the acknowledgement of an APPEND (version 2).
    Ack,
    /// One byte (CHECK).
    U8,
    /// A `u32` (PING).
    U32,
    /// An `i64` (ADD, GET_NUM_KEYS, DELETE_KEY, QUEUE_LEN).
    I64,
    /// `n` byte strings (GET, COMPARE_SET: 1; MULTI_GET: n).
    Values(usize),
    /// An `i64` count, then that many byte strings (LIST_KEYS).
    Counted,
    /// An `i64` (the queue's length before), then, if it was positive, the
    /// popped value (QUEUE_POP).
    QueuePop,
    /// The answer to the HELLO probe: a `u32`, then the server's info as a
    /// byte string if it is [`HELLO_V2_ACK`].
    Hello,
    /// A wait's end: STOP_WAITING then `n` values (WAIT, BARRIER: 0;
    /// WAIT_GET: one per key), or WAIT_CANCELED.
    Stop(usize),
}

/// What the next field is.
#[derive(Debug, Clone, Copy)]
enum Kind {
    U8,
    U32,
    I64,
    Bytes { limit: usize },
}

impl Kind {
    fn width(self) -> usize {
        match self {
            Kind::U8 => 1,
            Kind::U32 => 4,
            Kind::I64 | Kind::Bytes { .. } => 8,
        }
    }
}

/// The fields of a reply, after its status byte.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Reply(Vec<Field>);

impl Reply {
    fn field(&self, i: usize) -> Result<&Field> {
        self.0
            .get(i)
            .ok_or_else(|| Error::new(Status::Protocol, "a reply field is missing"))
    }

    /// The byte at field `i`.
    pub(crate) fn u8(&self, i: usize) -> Result<u8> {
        match self.field(i)? {
            Field::U8(v) => Ok(*v),
            other => Err(mismatch("u8", other)),
        }
    }

    /// The `u32` at field `i`.
    pub(crate) fn u32(&self, i: usize) -> Result<u32> {
        match self.field(i)? {
            Field::U32(v) => Ok(*v),
            other => Err(mismatch("u32", other)),
        }
    }

    /// The `i64` at field `i`.
    pub(crate) fn i64(&self, i: usize) -> Result<i64> {
        match self.field(i)? {
            Field::I64(v) => Ok(*v),
            other => Err(mismatch("i64", other)),
        }
    }

    /// Every byte string of the reply, in order.
    pub(crate) fn into_values(self) -> Vec<Vec<u8>> {
        self.0
            .into_iter()
            .filter_map(|f| match f {
                Field::Bytes(b) => Some(b),
                _ => None,
            })
            .collect()
    }

    /// The first byte string of the reply (empty if there is none).
    pub(crate) fn into_value(self) -> Vec<u8> {
        self.into_values().into_iter().next().unwrap_or_default()
    }
}

fn mismatch(wanted: &str, got: &Field) -> Error {
    Error::new(
        Status::Protocol,
        format!("expected a {wanted} in the reply, decoded {got:?}"),
    )
}

/// A byte string being received.
struct Partial {
    /// Its bytes so far (none when the decoder only counts them).
    value: Vec<u8>,
    /// How many of its bytes are still to arrive.
    missing: usize,
}

/// Decodes one reply incrementally.
pub(crate) struct Decoder {
    shape: Shape,
    /// The connection speaks version 2: a status byte leads the reply.
    status_byte: bool,
    /// The longest byte string accepted (the value limit).
    max_value_len: usize,
    /// Byte strings are kept (a client's); a relay's decoder only counts
    /// them, and their fields are empty...
    keep_values: bool,
    /// ...but for an error's message: whether the byte strings being read
    /// now are kept (decided when the status byte is read, so that no
    /// test reads the status before it has one).
    keeps: bool,
    status: Option<u8>,
    fields: Vec<Field>,
    fixed: [u8; 8],
    fixed_len: usize,
    bytes: Option<Partial>,
    done: bool,
    /// Deferred errors read before the reply: earlier reply-less writes
    /// the server failed, the first one and how many.
    deferred: Option<(Error, usize)>,
}

impl Decoder {
    /// A decoder for a reply of `shape`.
    pub(crate) fn new(shape: Shape, status_byte: bool, max_value_len: usize) -> Decoder {
        Decoder {
            shape,
            status_byte,
            max_value_len,
            keep_values: true,
            keeps: true,
            status: None,
            fields: Vec::new(),
            fixed: [0; 8],
            fixed_len: 0,
            bytes: None,
            done: false,
            deferred: None,
        }
    }

    /// A decoder that checks and frames a version 2 reply of `shape`
    /// without keeping its byte strings (a relay passes them on as they
    /// arrive): what it holds does not grow with the reply.
    pub(crate) fn framing(shape: Shape, max_value_len: usize) -> Decoder {
        Decoder {
            keep_values: false,
            keeps: false,
            ..Decoder::new(shape, true, max_value_len)
        }
    }

    /// Whether any byte of the reply has arrived.
    pub(crate) fn started(&self) -> bool {
        self.status.is_some()
            || !self.fields.is_empty()
            || self.fixed_len > 0
            || self.bytes.is_some()
    }

    /// The kind of the next field, or `None` when the reply is complete.
    fn next_kind(&self) -> Result<Option<Kind>> {
        if self.status_byte {
            match self.status {
                None => return Ok(Some(Kind::U8)),
                Some(REPLY_OK) => {}
                Some(REPLY_ERROR | REPLY_DEFERRED_ERROR) => {
                    return Ok(match self.fields.len() {
                        0 => Some(Kind::U8),
                        1 => Some(Kind::Bytes {
                            limit: MAX_MESSAGE_LEN,
                        }),
                        _ => None,
                    })
                }
                Some(other) => {
                    return Err(Error::new(
                        Status::Protocol,
                        format!("unknown reply status byte {other}"),
                    ))
                }
            }
        }
        let f = &self.fields;
        let value = Kind::Bytes {
            limit: self.max_value_len,
        };
        Ok(match self.shape {
            Shape::Ack => None,
            Shape::U8 => (f.is_empty()).then_some(Kind::U8),
            Shape::U32 => (f.is_empty()).then_some(Kind::U32),
            Shape::I64 => (f.is_empty()).then_some(Kind::I64),
            Shape::Values(n) => (f.len() < n).then_some(value),
            Shape::Counted => match f.first() {
                None => Some(Kind::I64),
                Some(Field::I64(count)) => {
                    if *count < 0 || *count > i64::from(i32::MAX) {
                        return Err(Error::new(
                            Status::Protocol,
                            format!("a reply announces {count} keys"),
                        ));
                    }
                    ((f.len() - 1) < *count as usize).then_some(value)
                }
                Some(other) => return Err(mismatch("count", other)),
            },
            Shape::QueuePop => match f.first() {
                None => Some(Kind::I64),
                Some(Field::I64(before)) if *before > 0 && f.len() == 1 => Some(value),
                Some(_) => None,
            },
            Shape::Hello => match f.first() {
                None => Some(Kind::U32),
                Some(Field::U32(HELLO_V2_ACK)) if f.len() == 1 => Some(Kind::Bytes {
                    limit: MAX_MESSAGE_LEN,
                }),
                Some(_) => None,
            },
            Shape::Stop(n) => match f.first() {
                None => Some(Kind::U8),
                Some(Field::U8(STOP_WAITING)) => (f.len() <= n).then_some(value),
                Some(Field::U8(WAIT_CANCELED)) => None,
                Some(Field::U8(other)) => {
                    return Err(Error::new(
                        Status::Protocol,
                        format!("unexpected wait reply byte {other}"),
                    ))
                }
                Some(other) => return Err(mismatch("wait reply byte", other)),
            },
        })
    }

    /// Consumes bytes of `input` (never past the end of the reply); returns
    /// how many. A length over the limits is a protocol error, before any
    /// allocation.
    pub(crate) fn feed(&mut self, input: &[u8]) -> Result<usize> {
        let mut used = 0;
        while !self.done {
            if let Some(partial) = &mut self.bytes {
                let take = partial.missing.min(input.len() - used);
                if self.keeps {
                    partial.value.extend_from_slice(&input[used..used + take]);
                }
                partial.missing -= take;
                used += take;
                if partial.missing > 0 {
                    return Ok(used);
                }
                let value = self.bytes.take().map(|p| p.value).unwrap_or_default();
                self.push(Field::Bytes(value))?;
                continue;
            }
            let Some(kind) = self.next_kind()? else {
                self.done = true;
                break;
            };
            let width = kind.width();
            let take = (width - self.fixed_len).min(input.len() - used);
            self.fixed[self.fixed_len..self.fixed_len + take]
                .copy_from_slice(&input[used..used + take]);
            self.fixed_len += take;
            used += take;
            if self.fixed_len < width {
                return Ok(used);
            }
            self.fixed_len = 0;
            let raw = self.fixed;
            match kind {
                Kind::U8 => self.push(Field::U8(raw[0]))?,
                Kind::U32 => self.push(Field::U32(u32::from_le_bytes([
                    raw[0], raw[1], raw[2], raw[3],
                ])))?,
                Kind::I64 => self.push(Field::I64(i64::from_le_bytes(raw)))?,
                Kind::Bytes { limit } => self.start_bytes(u64::from_le_bytes(raw), limit)?,
            }
        }
        Ok(used)
    }

    fn push(&mut self, field: Field) -> Result<()> {
        if self.status_byte && self.status.is_none() {
            if let Field::U8(status) = field {
                self.status = Some(status);
                self.keeps = self.keep_values || status != REPLY_OK;
            }
            return Ok(());
        }
        if self.status == Some(REPLY_DEFERRED_ERROR) {
            self.fields.push(field);
            if self.fields.len() == 2 {
                // An earlier reply-less request failed: keep it for the
                // caller, then read the reply this decoder is for.
                let error = error_of(&self.fields);
                match &mut self.deferred {
                    Some((_, count)) => *count += 1,
                    None => self.deferred = Some((error, 1)),
                }
                self.status = None;
                self.keeps = self.keep_values;
                self.fields.clear();
            }
            return Ok(());
        }
        if self.fields.is_empty()
            && matches!(self.shape, Shape::Values(n) | Shape::Stop(n) if n > 1)
        {
            self.fields
                .reserve(self.expected_fields().min(PREALLOCATED_VALUES));
        }
        self.fields.push(field);
        Ok(())
    }

    fn expected_fields(&self) -> usize {
        match self.shape {
            Shape::Values(n) => n,
            Shape::Stop(n) => n + 1,
            _ => 1,
        }
    }

    fn start_bytes(&mut self, len: u64, limit: usize) -> Result<()> {
        let len = usize::try_from(len)
            .ok()
            .filter(|l| *l <= limit)
            .ok_or_else(|| {
                Error::new(
                    Status::Protocol,
                    format!(
                        "the server announced a reply of {len} bytes, over the limit of {limit}"
                    ),
                )
            })?;
        let value = match self.keeps {
            true => try_value_buffer(len).ok_or_else(|| {
                Error::new(
                    Status::Protocol,
                    format!("cannot allocate {len} bytes for a reply"),
                )
            })?,
            false => Vec::new(),
        };
        self.bytes = Some(Partial {
            value,
            missing: len,
        });
        Ok(())
    }

    /// A large value being received, for a read straight from the socket
    /// appended to it, and how many bytes it still misses (at least
    /// [`DIRECT_MIN`]), if any.
    pub(crate) fn direct_target(&mut self) -> Option<(&mut Vec<u8>, usize)> {
        let partial = self.bytes.as_mut().filter(|_| self.keeps)?;
        let missing = partial.missing;
        (missing >= DIRECT_MIN).then_some((&mut partial.value, missing))
    }

    /// `n` bytes were appended to the [`Decoder::direct_target`]:
    /// completes the value if they were its last.
    pub(crate) fn direct_appended(&mut self, n: usize) -> Result<()> {
        if let Some(partial) = &mut self.bytes {
            if n > partial.missing {
                return Err(Error::internal("a direct read filled past its value"));
            }
            partial.missing -= n;
            if partial.missing == 0 {
                let value = self.bytes.take().map(|p| p.value).unwrap_or_default();
                self.push(Field::Bytes(value))?;
                if self.next_kind()?.is_none() {
                    self.done = true;
                }
            }
        }
        Ok(())
    }

    /// The failures of reply-less writes the server reported before this
    /// reply (DEFERRED ERROR): the first, and how many.
    pub(crate) fn take_deferred(&mut self) -> Option<(Error, usize)> {
        self.deferred.take()
    }

    /// The decoded reply once complete: its fields, or the error the server
    /// answered with.
    pub(crate) fn take(&mut self) -> Option<std::result::Result<Reply, Error>> {
        if !self.done {
            return None;
        }
        if self.status == Some(REPLY_ERROR) {
            return Some(Err(error_of(&self.fields)));
        }
        Some(Ok(Reply(std::mem::take(&mut self.fields))))
    }
}

/// The error an error reply's fields (code, message) describe.
fn error_of(fields: &[Field]) -> Error {
    let code = match fields.first() {
        Some(Field::U8(code)) => *code,
        _ => 0,
    };
    let message = match fields.get(1) {
        Some(Field::Bytes(m)) => String::from_utf8_lossy(m).into_owned(),
        _ => String::new(),
    };
    let status = Status::from_code(i32::from(code))
        .filter(|s| *s != Status::Ok)
        .unwrap_or(Status::Remote);
    Error::new(status, message)
}

/// How an exchange ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The reply (for a wait: STOP_WAITING and what follows it).
    Reply(Reply),
    /// The server answered with an error; the connection is still in step.
    Refused(Error),
    /// The wait's time ran out and the server confirmed the cancel.
    Canceled,
}

/// Where a wait's cancel handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cancel {
    /// Not cancellable (a plain request), or not cancelled yet.
    No,
    /// CANCEL_WAIT sent; the next reply is WAIT_CANCELED, or STOP_WAITING
    /// and its values if the wait ended first.
    Sent,
}

/// One request's reply: a plain one, or a wait that a timeout may cancel.
pub(crate) struct Exchange {
    decoder: Decoder,
    waits: bool,
    cancel: Cancel,
    /// A wait that ended just before its cancel: kept until WAIT_CANCELED.
    stopped: Option<Reply>,
    outcome: Option<Outcome>,
}

impl Exchange {
    /// The reply to a request of this `shape`.
    pub(crate) fn new(shape: Shape, status_byte: bool, max_value_len: usize) -> Exchange {
        Exchange {
            decoder: Decoder::new(shape, status_byte, max_value_len),
            waits: matches!(shape, Shape::Stop(_)),
            cancel: Cancel::No,
            stopped: None,
            outcome: None,
        }
    }

    /// Consumes reply bytes from `input`; returns how many.
    pub(crate) fn feed(&mut self, input: &[u8]) -> Result<usize> {
        let mut used = 0;
        while self.outcome.is_none() {
            used += self.decoder.feed(&input[used..])?;
            match self.decoder.take() {
                Some(reply) => self.on_reply(reply)?,
                None => break,
            }
        }
        Ok(used)
    }

    fn on_reply(&mut self, reply: std::result::Result<Reply, Error>) -> Result<()> {
        let reply = match reply {
            Ok(reply) => reply,
            Err(refused) => {
                self.outcome = Some(Outcome::Refused(refused));
                return Ok(());
            }
        };
        if !self.waits {
            self.outcome = Some(Outcome::Reply(reply));
            return Ok(());
        }
        let canceled = reply.u8(0)? == WAIT_CANCELED;
        match (self.cancel, canceled) {
            (Cancel::No, false) => self.outcome = Some(Outcome::Reply(reply)),
            (Cancel::No, true) => {
                return Err(Error::new(
                    Status::Protocol,
                    "WAIT_CANCELED for a wait that was not cancelled",
                ))
            }
            (Cancel::Sent, true) => {
                self.outcome = Some(match self.stopped.take() {
                    Some(stopped) => Outcome::Reply(stopped),
                    None => Outcome::Canceled,
                });
            }
            (Cancel::Sent, false) if self.stopped.is_none() => {
                // The wait ended as we cancelled: its values, then WAIT_CANCELED.
                self.stopped = Some(reply);
                self.decoder = Decoder::new(
                    Shape::Stop(0),
                    self.decoder.status_byte,
                    self.decoder.max_value_len,
                );
            }
            (Cancel::Sent, false) => {
                return Err(Error::new(
                    Status::Protocol,
                    "a second STOP_WAITING for one wait",
                ))
            }
        }
        Ok(())
    }

    /// The outcome, once the exchange is over.
    pub(crate) fn take_outcome(&mut self) -> Option<Outcome> {
        self.outcome.take()
    }

    /// The failure of the reply-less writes the server reported before
    /// this reply (DEFERRED ERROR), if any: its status, saying how many.
    pub(crate) fn take_deferred(&mut self) -> Option<Error> {
        let (first, count) = self.decoder.take_deferred()?;
        Some(Error::new(
            first.status(),
            format!(
                "{count} write(s) sent earlier without a reply (set, multi_set, queue_push) \
                 failed on the server: {}",
                first.message()
            ),
        ))
    }

    /// The time of the request ran out: for a wait none of whose reply has
    /// arrived, the CANCEL_WAIT request to send (and the exchange now
    /// expects its answer); `None` when the request cannot be cancelled (the
    /// connection is then out of step and must be dropped).
    pub(crate) fn expire(&mut self) -> Option<Vec<u8>> {
        if !self.waits || self.cancel == Cancel::Sent || self.decoder.started() {
            return None;
        }
        self.cancel = Cancel::Sent;
        Some(Encoder::request(Command::CancelWait).finish())
    }

    /// See [`Decoder::direct_target`].
    pub(crate) fn direct_target(&mut self) -> Option<(&mut Vec<u8>, usize)> {
        self.decoder.direct_target()
    }

    /// Records a direct read of `n` bytes and completes the reply if it
    /// was its end.
    pub(crate) fn direct_appended(&mut self, n: usize) -> Result<()> {
        self.decoder.direct_appended(n)?;
        if let Some(reply) = self.decoder.take() {
            self.on_reply(reply)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
