//! PyTorch's TCPStore wire protocol (shared/spec/tcpstore-wire.md): command
//! bytes, limits, an incremental request parser for the server and request
//! encoders for the client.

use std::fmt;
use std::sync::Arc;

/// The magic number a connection sends with VALIDATE.
pub const VALIDATE_MAGIC: u32 = 0x3C85_F7CE;

/// Reply byte of WAIT, BARRIER and the extended gets: the keys are there.
pub const STOP_WAITING: u8 = 0;
/// Reply byte of CANCEL_WAIT.
pub const WAIT_CANCELED: u8 = 1;
/// Reply byte of CHECK: every key exists.
pub const READY: u8 = 0;
/// Reply byte of CHECK: some key is missing.
pub const NOT_READY: u8 = 1;

/// The nonce of a PING that asks "are you a distcore server?". PyTorch
/// clients ping with their process id (below 2^22), so they never send it; a
/// PyTorch server echoes it, a distcore server answers [`HELLO_ACK`] and
/// from then on accepts the extension commands on that connection.
pub const HELLO_NONCE: u32 = 0xDC0D_E5A1;
/// A distcore server's answer to [`HELLO_NONCE`].
pub const HELLO_ACK: u32 = 0xDC0D_E5A2;

/// The command byte of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
#[allow(missing_docs)]
pub enum Command {
    Validate = 0x00,
    Set = 0x01,
    CompareSet = 0x02,
    Get = 0x03,
    Add = 0x04,
    Check = 0x05,
    Wait = 0x06,
    GetNumKeys = 0x07,
    DeleteKey = 0x08,
    Append = 0x09,
    MultiGet = 0x0A,
    MultiSet = 0x0B,
    CancelWait = 0x0C,
    Ping = 0x0D,
    QueuePush = 0x0E,
    QueuePop = 0x0F,
    QueueLen = 0x10,
    ListKeys = 0x11,
    Barrier = 0x12,
    /// distcore extension (after HELLO): WAIT for the keys, then reply
    /// STOP_WAITING followed by their values, in one round trip.
    WaitGet = 0x80,
}

impl Command {
    fn from_byte(byte: u8) -> Option<Command> {
        use Command::*;
        Some(match byte {
            0x00 => Validate,
            0x01 => Set,
            0x02 => CompareSet,
            0x03 => Get,
            0x04 => Add,
            0x05 => Check,
            0x06 => Wait,
            0x07 => GetNumKeys,
            0x08 => DeleteKey,
            0x09 => Append,
            0x0A => MultiGet,
            0x0B => MultiSet,
            0x0C => CancelWait,
            0x0D => Ping,
            0x0E => QueuePush,
            0x0F => QueuePop,
            0x10 => QueueLen,
            0x11 => ListKeys,
            0x12 => Barrier,
            0x80 => WaitGet,
            _ => return None,
        })
    }
}

/// Size limits a server enforces; a request over one closes its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest key, in bytes (PyTorch: 8 KiB).
    pub max_key_len: usize,
    /// Longest value, in bytes (PyTorch's libuv server: 8 MiB; ours: 64 MiB by default).
    pub max_value_len: usize,
    /// Most keys in one request (PyTorch: 128 Ki).
    pub max_keys_per_request: usize,
}

/// distcore's default value limit: 64 MiB.
pub const DEFAULT_MAX_VALUE_LEN: usize = 64 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_len: 8 << 10,
            max_value_len: DEFAULT_MAX_VALUE_LEN,
            max_keys_per_request: 128 << 10,
        }
    }
}

/// A key as it travels: bytes.
pub type Key = Vec<u8>;

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Request {
    Validate {
        magic: u32,
    },
    Set {
        key: Key,
        value: Arc<[u8]>,
    },
    CompareSet {
        key: Key,
        expected: Vec<u8>,
        desired: Vec<u8>,
    },
    Get {
        key: Key,
    },
    Add {
        key: Key,
        delta: i64,
    },
    Check {
        keys: Vec<Key>,
    },
    Wait {
        keys: Vec<Key>,
    },
    GetNumKeys,
    DeleteKey {
        key: Key,
    },
    Append {
        key: Key,
        value: Vec<u8>,
    },
    MultiGet {
        keys: Vec<Key>,
    },
    MultiSet {
        pairs: Vec<(Key, Arc<[u8]>)>,
    },
    CancelWait,
    Ping {
        nonce: u32,
    },
    QueuePush {
        key: Key,
        value: Arc<[u8]>,
    },
    QueuePop {
        key: Key,
    },
    QueueLen {
        key: Key,
    },
    ListKeys,
    Barrier {
        key: Key,
        world_size: i64,
    },
    WaitGet {
        keys: Vec<Key>,
    },
}

/// Why a request was refused; its connection is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// The command byte is not one of the protocol's.
    UnknownCommand(u8),
    /// A key, value or key count over the server's limits.
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its announced size.
        len: u64,
        /// The limit.
        limit: usize,
    },
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::UnknownCommand(b) => write!(f, "unknown command byte 0x{b:02x}"),
            ProtocolError::TooLarge { what, len, limit } => {
                write!(f, "{what} of {len} bytes exceeds the limit of {limit}")
            }
        }
    }
}

/// Reads fields from a buffer that may hold only part of a request.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    limits: &'a Limits,
}

/// `None`: the buffer ends before the request does.
type Field<T> = Result<Option<T>, ProtocolError>;

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let bytes = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    }

    fn len_field(&mut self, what: &'static str, limit: usize) -> Field<usize> {
        let Some(len) = self.u64() else {
            return Ok(None);
        };
        if len > limit as u64 {
            return Err(ProtocolError::TooLarge { what, len, limit });
        }
        Ok(Some(len as usize))
    }

    fn key(&mut self) -> Field<Key> {
        let Some(len) = self.len_field("key", self.limits.max_key_len)? else {
            return Ok(None);
        };
        Ok(self.take(len).map(<[u8]>::to_vec))
    }

    fn value(&mut self) -> Field<&'a [u8]> {
        let Some(len) = self.len_field("value", self.limits.max_value_len)? else {
            return Ok(None);
        };
        Ok(self.take(len))
    }

    fn keys(&mut self) -> Field<Vec<Key>> {
        let Some(count) = self.len_field("key count", self.limits.max_keys_per_request)? else {
            return Ok(None);
        };
        let mut keys = Vec::with_capacity(count.min(1024));
        for _ in 0..count {
            match self.key()? {
                Some(key) => keys.push(key),
                None => return Ok(None),
            }
        }
        Ok(Some(keys))
    }
}

/// Unwraps a field or reports "need more bytes".
macro_rules! field {
    ($e:expr) => {
        match $e {
            Some(v) => v,
            None => return Ok(None),
        }
    };
}

/// Parses the first request in `buf`. `Ok(None)`: `buf` holds only part of
/// it; `Ok(Some((request, consumed)))`: a whole request of `consumed` bytes.
pub fn parse_request(
    buf: &[u8],
    limits: &Limits,
) -> Result<Option<(Request, usize)>, ProtocolError> {
    let Some(&byte) = buf.first() else {
        return Ok(None);
    };
    let command = Command::from_byte(byte).ok_or(ProtocolError::UnknownCommand(byte))?;
    let mut c = Cursor {
        buf,
        pos: 1,
        limits,
    };
    let request = match command {
        Command::Validate => Request::Validate {
            magic: field!(c.u32()),
        },
        Command::Set => {
            let key = field!(c.key()?);
            Request::Set {
                key,
                value: field!(c.value()?).into(),
            }
        }
        Command::CompareSet => {
            let key = field!(c.key()?);
            let expected = field!(c.value()?).to_vec();
            Request::CompareSet {
                key,
                expected,
                desired: field!(c.value()?).to_vec(),
            }
        }
        Command::Get => Request::Get {
            key: field!(c.key()?),
        },
        Command::Add => {
            let key = field!(c.key()?);
            Request::Add {
                key,
                delta: field!(c.u64()) as i64,
            }
        }
        Command::Check => Request::Check {
            keys: field!(c.keys()?),
        },
        Command::Wait => Request::Wait {
            keys: field!(c.keys()?),
        },
        Command::GetNumKeys => Request::GetNumKeys,
        Command::DeleteKey => Request::DeleteKey {
            key: field!(c.key()?),
        },
        Command::Append => {
            let key = field!(c.key()?);
            Request::Append {
                key,
                value: field!(c.value()?).to_vec(),
            }
        }
        Command::MultiGet => Request::MultiGet {
            keys: field!(c.keys()?),
        },
        Command::MultiSet => {
            let count = field!(c.len_field("key count", limits.max_keys_per_request)?);
            let mut pairs = Vec::with_capacity(count.min(1024));
            for _ in 0..count {
                let key = field!(c.key()?);
                pairs.push((key, field!(c.value()?).into()));
            }
            Request::MultiSet { pairs }
        }
        Command::CancelWait => Request::CancelWait,
        Command::Ping => Request::Ping {
            nonce: field!(c.u32()),
        },
        Command::QueuePush => {
            let key = field!(c.key()?);
            Request::QueuePush {
                key,
                value: field!(c.value()?).into(),
            }
        }
        Command::QueuePop => Request::QueuePop {
            key: field!(c.key()?),
        },
        Command::QueueLen => Request::QueueLen {
            key: field!(c.key()?),
        },
        Command::ListKeys => Request::ListKeys,
        Command::Barrier => {
            let key = field!(c.key()?);
            Request::Barrier {
                key,
                world_size: field!(c.u64()) as i64,
            }
        }
        Command::WaitGet => Request::WaitGet {
            keys: field!(c.keys()?),
        },
    };
    Ok(Some((request, c.pos)))
}

/// The start of a SET or QUEUE_PUSH whose value is still arriving: what a
/// server needs to read the value straight into the buffer that will hold
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueHeader {
    /// SET or QUEUE_PUSH.
    pub command: Command,
    /// The key.
    pub key: Key,
    /// The announced length of the value.
    pub value_len: usize,
    /// Bytes before the value: command, key and value length.
    pub header_len: usize,
}

impl ValueHeader {
    /// The whole request, once `value` (of `value_len` bytes) has arrived.
    pub fn into_request(self, value: Arc<[u8]>) -> Request {
        match self.command {
            Command::QueuePush => Request::QueuePush {
                key: self.key,
                value,
            },
            _ => Request::Set {
                key: self.key,
                value,
            },
        }
    }
}

/// If `buf` starts with the complete header of a SET or QUEUE_PUSH (command,
/// key, value length), its parts; `Ok(None)` for any other request or a
/// shorter buffer.
pub fn parse_value_header(
    buf: &[u8],
    limits: &Limits,
) -> Result<Option<ValueHeader>, ProtocolError> {
    let command = match buf.first() {
        Some(&byte) if byte == Command::Set as u8 => Command::Set,
        Some(&byte) if byte == Command::QueuePush as u8 => Command::QueuePush,
        _ => return Ok(None),
    };
    let mut c = Cursor {
        buf,
        pos: 1,
        limits,
    };
    let key = field!(c.key()?);
    let value_len = field!(c.len_field("value", limits.max_value_len)?);
    Ok(Some(ValueHeader {
        command,
        key,
        value_len,
        header_len: c.pos,
    }))
}

/// Builds the bytes of one request or reply.
#[derive(Default)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// An encoder starting with `command`.
    pub fn request(command: Command) -> Encoder {
        let mut e = Encoder::default();
        e.buf.push(command as u8);
        e
    }

    /// Appends a `u8`.
    pub fn u8(mut self, v: u8) -> Self {
        self.buf.push(v);
        self
    }

    /// Appends a little-endian `u32`.
    pub fn u32(mut self, v: u32) -> Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a little-endian `u64`.
    pub fn u64(mut self, v: u64) -> Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a length-prefixed byte string.
    pub fn bytes(mut self, v: &[u8]) -> Self {
        put_bytes(&mut self.buf, v);
        self
    }

    /// Appends a key count and the keys.
    pub fn keys<K: AsRef<[u8]>>(mut self, keys: &[K]) -> Self {
        self = self.u64(keys.len() as u64);
        for key in keys {
            put_bytes(&mut self.buf, key.as_ref());
        }
        self
    }

    /// The encoded bytes.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Appends `v` as `u64 length` + bytes.
pub fn put_bytes(out: &mut Vec<u8>, v: &[u8]) {
    // One exact reservation instead of a chain of doublings for big values.
    out.reserve(8 + v.len());
    out.extend_from_slice(&(v.len() as u64).to_le_bytes());
    out.extend_from_slice(v);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn parses_the_spec_example_and_pytorch_captures() {
        let l = Limits::default();
        let set = hex("01 0300000000000000 2f6b31 0200000000000000 7631");
        let (r, n) = parse_request(&set, &l).unwrap().unwrap();
        assert_eq!(n, set.len());
        assert_eq!(
            r,
            Request::Set {
                key: b"/k1".to_vec(),
                value: Arc::from(&b"v1"[..])
            }
        );
        let add = hex("04 0500000000000000 696e69742f 0100000000000000");
        assert_eq!(
            parse_request(&add, &l).unwrap().unwrap().0,
            Request::Add {
                key: b"init/".to_vec(),
                delta: 1
            }
        );
        let validate_ping = hex("00 cef7853c 0d e0080000");
        let (r, n) = parse_request(&validate_ping, &l).unwrap().unwrap();
        assert_eq!(
            (r, n),
            (
                Request::Validate {
                    magic: VALIDATE_MAGIC
                },
                5
            )
        );
        assert_eq!(
            parse_request(&validate_ping[5..], &l).unwrap().unwrap().0,
            Request::Ping { nonce: 0x08e0 }
        );
        let mset = hex("0b 0200000000000000 0200000000000000 2f61 0100000000000000 31 0200000000000000 2f62 0100000000000000 32");
        assert_eq!(
            parse_request(&mset, &l).unwrap().unwrap().0,
            Request::MultiSet {
                pairs: vec![
                    (b"/a".to_vec(), Arc::from(&b"1"[..])),
                    (b"/b".to_vec(), Arc::from(&b"2"[..]))
                ]
            }
        );
    }

    #[test]
    fn every_prefix_of_a_request_needs_more() {
        let l = Limits::default();
        let req = Encoder::request(Command::CompareSet)
            .bytes(b"/key")
            .bytes(b"old")
            .bytes(b"new")
            .finish();
        for cut in 0..req.len() {
            assert_eq!(
                parse_request(&req[..cut], &l).unwrap(),
                None,
                "cut at {cut}"
            );
        }
        assert!(parse_request(&req, &l).unwrap().is_some());
    }

    #[test]
    fn value_headers_of_set_and_queue_push() {
        let l = Limits::default();
        let set = Encoder::request(Command::Set)
            .bytes(b"/k")
            .bytes(b"value")
            .finish();
        let header = parse_value_header(&set[..19], &l).unwrap().unwrap();
        assert_eq!(
            header,
            ValueHeader {
                command: Command::Set,
                key: b"/k".to_vec(),
                value_len: 5,
                header_len: 19
            }
        );
        assert_eq!(
            header.into_request(Arc::from(&b"value"[..])),
            parse_request(&set, &l).unwrap().unwrap().0
        );
        assert_eq!(parse_value_header(&set[..18], &l).unwrap(), None);
        let push = Encoder::request(Command::QueuePush)
            .bytes(b"q")
            .u64(3)
            .finish();
        let header = parse_value_header(&push, &l).unwrap().unwrap();
        assert!(matches!(
            header.into_request(Arc::from(&b"abc"[..])),
            Request::QueuePush { .. }
        ));
        let get = Encoder::request(Command::Get).bytes(b"/k").finish();
        assert_eq!(parse_value_header(&get, &l).unwrap(), None);
        let too_big = Encoder::request(Command::Set)
            .bytes(b"k")
            .u64(1 << 40)
            .finish();
        assert!(parse_value_header(&too_big, &l).is_err());
    }

    #[test]
    fn limits_and_unknown_commands_are_errors() {
        let l = Limits {
            max_key_len: 4,
            max_value_len: 8,
            max_keys_per_request: 2,
        };
        assert_eq!(
            parse_request(&[0x42], &l),
            Err(ProtocolError::UnknownCommand(0x42))
        );
        let long_key = Encoder::request(Command::Get).bytes(b"12345").finish();
        assert!(matches!(
            parse_request(&long_key, &l),
            Err(ProtocolError::TooLarge { what: "key", .. })
        ));
        let huge = Encoder::request(Command::Get).u64(1 << 63).finish();
        assert!(parse_request(&huge, &l).is_err());
        let big_value = Encoder::request(Command::Set).bytes(b"k").u64(9).finish();
        assert!(parse_request(&big_value, &l).is_err());
        let many = Encoder::request(Command::Wait).u64(3).finish();
        assert!(parse_request(&many, &l).is_err());
    }
}
