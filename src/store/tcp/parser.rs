//! The server's incremental request parser. PyTorch's requests carry no
//! overall length, so a request may arrive in any number of pieces; this
//! parser keeps its place between pieces (the field it is in and how much
//! of it it has) and copies every byte once, into where the request keeps
//! it. Nothing already parsed is parsed again, whatever the split.
//!
//! A value whose remaining part is large can be received straight into the
//! buffer that will store it ([`RequestParser::direct_target`]).
//!
//! A relay frames requests with the same parser without keeping their keys
//! and values ([`RequestParser::framing`]): it passes their bytes on as
//! they arrive and learns where each request ends and what it asks.
//!
//! Every length is checked against the [`Limits`] when it is read, before
//! anything is allocated for it, and so is the size of the whole request.

use std::sync::Arc;

use super::protocol::{Command, Key, Limits, ProtocolError, Request, SessionRequest};
use crate::net::bigbuf::{zeroed_shared, LARGE_VALUE_LEN};

/// A stored value, shared rather than copied.
type Value = Arc<[u8]>;

/// The fields of a request after its command byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    /// A `u32` (VALIDATE's magic, PING's nonce).
    U32,
    /// A `u64` (ADD's delta, BARRIER's world size).
    U64,
    /// A key: `u64` length + bytes.
    Key,
    /// A value: `u64` length + bytes.
    Value,
    /// A `u64` count, then that many keys.
    Keys,
    /// A `u64` count, then that many (key, value) pairs.
    Pairs,
}

/// The one table of what each command carries.
fn layout(command: Command) -> &'static [Field] {
    use Command::*;
    use Field as F;
    match command {
        Validate | Ping => &[F::U32],
        Set | Append | QueuePush => &[F::Key, F::Value],
        CompareSet => &[F::Key, F::Value, F::Value],
        Get | DeleteKey | QueuePop | QueueLen | DeletePrefix | ListPrefix | SessionList => {
            &[F::Key]
        }
        Add | Barrier => &[F::Key, F::U64],
        Check | Wait | MultiGet | WaitGet => &[F::Keys],
        MultiSet => &[F::Pairs],
        Auth => &[F::Key, F::Key],
        SessionOpen | SessionReport => &[F::Value],
        SessionAttach => &[F::U64],
        GetNumKeys | CancelWait | ListKeys | Stats | SessionKeepAlive | SessionClose
        | SessionLease => &[],
    }
}

/// What a fixed-width integer being read is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IntRole {
    Field,
    Count,
    KeyLen,
    ValueLen,
}

/// The piece of a request being read now.
enum Atom {
    /// A little-endian integer of `need` (4 or 8) bytes.
    Int {
        bytes: [u8; 8],
        have: usize,
        need: usize,
        role: IntRole,
    },
    /// The bytes of a key.
    Key { key: Vec<u8>, need: usize },
    /// The bytes of a value, allocated once the first of them arrives.
    Value {
        value: Option<Value>,
        len: usize,
        filled: usize,
    },
    /// The bytes of a key or value only counted (a framing parser's).
    Skipped { len: usize, got: usize },
}

impl Atom {
    fn int(need: usize, role: IntRole) -> Atom {
        Atom::Int {
            bytes: [0; 8],
            have: 0,
            need,
            role,
        }
    }

    fn is_complete(&self) -> bool {
        match self {
            Atom::Int { have, need, .. } => have == need,
            Atom::Key { key, need } => key.len() == *need,
            Atom::Value { len, filled, .. } => filled == len,
            Atom::Skipped { len, got } => got == len,
        }
    }

    /// Copies what it still needs from the start of `data`; returns how
    /// many bytes it took.
    fn fill(&mut self, data: &[u8]) -> usize {
        match self {
            Atom::Int {
                bytes, have, need, ..
            } => {
                let n = (*need - *have).min(data.len());
                bytes[*have..*have + n].copy_from_slice(&data[..n]);
                *have += n;
                n
            }
            Atom::Key { key, need } => {
                let n = (*need - key.len()).min(data.len());
                key.extend_from_slice(&data[..n]);
                n
            }
            Atom::Value { value, len, filled } => {
                let n = (*len - *filled).min(data.len());
                match value {
                    // The whole value is here: one copy into its own buffer.
                    None if n == *len => *value = Some(Arc::from(&data[..n])),
                    _ => {
                        let buf = value.get_or_insert_with(|| zeroed_shared(*len));
                        if let Some(buf) = Arc::get_mut(buf) {
                            buf[*filled..*filled + n].copy_from_slice(&data[..n]);
                        }
                    }
                }
                *filled += n;
                n
            }
            Atom::Skipped { len, got } => {
                let n = (*len - *got).min(data.len());
                *got += n;
                n
            }
        }
    }
}

/// A request whose end has not arrived yet.
struct Partial {
    command: Command,
    fields: &'static [Field],
    /// The field being read (an index into `fields`).
    next: usize,
    /// In a list field: its count has been read...
    counted: bool,
    /// ...and this many items are still to read. (Two plain fields rather
    /// than an `Option<u64>`: valgrind flags the optimised test of the
    /// latter's payload before its tag.)
    items_left: u64,
    /// In a pair list: the value of the pair comes next.
    pair_value: bool,
    /// Keys and values are kept (else counted only: empty ones stand for
    /// them).
    keep: bool,
    keys: Vec<Key>,
    values: Vec<Value>,
    int: u64,
    /// Wire bytes of the request so far, counting announced lengths.
    size: u64,
    atom: Atom,
}

impl Partial {
    /// The first atom of the field at `self.next`, or `None` when every
    /// field has been read.
    fn next_atom(&mut self) -> Option<Atom> {
        loop {
            let field = *self.fields.get(self.next)?;
            return Some(match field {
                Field::U32 => Atom::int(4, IntRole::Field),
                Field::U64 => Atom::int(8, IntRole::Field),
                Field::Key => Atom::int(8, IntRole::KeyLen),
                Field::Value => Atom::int(8, IntRole::ValueLen),
                Field::Keys | Field::Pairs if !self.counted => Atom::int(8, IntRole::Count),
                Field::Keys | Field::Pairs if self.items_left == 0 => {
                    self.next += 1;
                    self.counted = false;
                    continue;
                }
                Field::Keys | Field::Pairs if self.pair_value => Atom::int(8, IntRole::ValueLen),
                Field::Keys | Field::Pairs => Atom::int(8, IntRole::KeyLen),
            });
        }
    }

    /// A key or value of the current field is complete: on to the next
    /// item of the list, or the next field.
    fn item_done(&mut self) {
        let in_pairs = self.fields[self.next] == Field::Pairs;
        if !self.counted {
            self.next += 1;
        } else if in_pairs && !self.pair_value {
            self.pair_value = true;
        } else {
            self.items_left -= 1;
            self.pair_value = false;
        }
    }

    /// Counts `len` more bytes of request, refusing a request over the limit.
    fn grow(&mut self, len: u64, limits: &Limits) -> Result<(), ProtocolError> {
        self.size = self.size.saturating_add(len);
        if self.size > limits.max_request_len as u64 {
            return Err(ProtocolError::TooLarge {
                what: "request",
                len: self.size,
                limit: limits.max_request_len,
            });
        }
        Ok(())
    }

    /// The current atom is complete: keeps what it read and returns the
    /// next atom, or `None` when the request is complete.
    fn atom_done(&mut self, limits: &Limits) -> Result<Option<Atom>, ProtocolError> {
        let atom = std::mem::replace(&mut self.atom, Atom::int(0, IntRole::Field));
        match atom {
            Atom::Int {
                bytes, need, role, ..
            } => {
                self.grow(need as u64, limits)?;
                let v = if need == 4 {
                    u64::from(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
                } else {
                    u64::from_le_bytes(bytes)
                };
                match role {
                    IntRole::Field => {
                        self.int = v;
                        self.next += 1;
                    }
                    IntRole::Count => {
                        let count = check_len("key count", v, limits.max_keys_per_request)?;
                        self.counted = true;
                        self.items_left = count as u64;
                        // Reserve for what a full list would need, within reason.
                        let reserve = count.min(1024);
                        self.keys.reserve(reserve);
                        if self.fields[self.next] == Field::Pairs {
                            self.values.reserve(reserve);
                        }
                    }
                    IntRole::KeyLen => {
                        let len = check_len("key", v, limits.max_key_len)?;
                        self.grow(v, limits)?;
                        let atom = match self.keep {
                            true => Atom::Key {
                                key: Vec::with_capacity(len),
                                need: len,
                            },
                            false => Atom::Skipped { len, got: 0 },
                        };
                        return self.skip_if_empty(atom, limits);
                    }
                    IntRole::ValueLen => {
                        let len = check_len("value", v, limits.max_value_len)?;
                        self.grow(v, limits)?;
                        let atom = match self.keep {
                            true => Atom::Value {
                                value: None,
                                len,
                                filled: 0,
                            },
                            false => Atom::Skipped { len, got: 0 },
                        };
                        return self.skip_if_empty(atom, limits);
                    }
                }
            }
            Atom::Key { key, .. } => {
                self.keys.push(key);
                self.item_done();
            }
            Atom::Value { value, .. } => {
                self.values
                    .push(value.unwrap_or_else(|| Arc::from(&[][..])));
                self.item_done();
            }
            Atom::Skipped { .. } => {
                // Which of a key or a value it stood for: what the field
                // reads next says (a pair's value follows its key).
                match self.fields[self.next] {
                    Field::Value => self.values.push(Arc::from(&[][..])),
                    Field::Pairs if self.pair_value => self.values.push(Arc::from(&[][..])),
                    _ => self.keys.push(Vec::new()),
                }
                self.item_done();
            }
        }
        Ok(self.next_atom())
    }

    /// An empty key or value is complete as soon as its length is read.
    fn skip_if_empty(
        &mut self,
        atom: Atom,
        limits: &Limits,
    ) -> Result<Option<Atom>, ProtocolError> {
        if atom.is_complete() {
            self.atom = atom;
            return self.atom_done(limits);
        }
        Ok(Some(atom))
    }

    /// The finished request.
    fn into_request(self) -> Request {
        let Partial {
            command,
            mut keys,
            mut values,
            int,
            ..
        } = self;
        let mut key = || keys.pop().unwrap_or_default();
        let mut value = || values.pop().unwrap_or_else(|| Arc::from(&[][..]));
        match command {
            Command::Validate => Request::Validate { magic: int as u32 },
            Command::Ping => Request::Ping { nonce: int as u32 },
            Command::Set => Request::Set {
                value: value(),
                key: key(),
            },
            Command::Append => Request::Append {
                value: value(),
                key: key(),
            },
            Command::QueuePush => Request::QueuePush {
                value: value(),
                key: key(),
            },
            Command::CompareSet => {
                let desired = value();
                Request::CompareSet {
                    expected: value(),
                    desired,
                    key: key(),
                }
            }
            Command::Get => Request::Get { key: key() },
            Command::DeleteKey => Request::DeleteKey { key: key() },
            Command::QueuePop => Request::QueuePop { key: key() },
            Command::QueueLen => Request::QueueLen { key: key() },
            Command::Add => Request::Add {
                key: key(),
                delta: int as i64,
            },
            Command::Barrier => Request::Barrier {
                key: key(),
                world_size: int as i64,
            },
            Command::Check => Request::Check { keys },
            Command::Wait => Request::Wait { keys },
            Command::MultiGet => Request::MultiGet { keys },
            Command::WaitGet => Request::WaitGet { keys },
            Command::MultiSet => Request::MultiSet {
                pairs: keys.into_iter().zip(values).collect(),
            },
            Command::GetNumKeys => Request::GetNumKeys,
            Command::CancelWait => Request::CancelWait,
            Command::ListKeys => Request::ListKeys,
            Command::Auth => {
                let proof = key();
                Request::Auth {
                    nonce: key(),
                    proof,
                }
            }
            Command::Stats => Request::Stats,
            Command::SessionOpen => Request::Session(SessionRequest::Open { spec: value() }),
            Command::SessionAttach => Request::Session(SessionRequest::Attach { id: int }),
            Command::SessionKeepAlive => Request::Session(SessionRequest::KeepAlive),
            Command::SessionClose => Request::Session(SessionRequest::Close),
            Command::SessionReport => Request::Session(SessionRequest::Report { message: value() }),
            Command::SessionLease => Request::Session(SessionRequest::Lease),
            Command::DeletePrefix => Request::DeletePrefix { prefix: key() },
            Command::ListPrefix => Request::ListPrefix { prefix: key() },
            Command::SessionList => Request::Session(SessionRequest::List { prefix: key() }),
        }
    }
}

fn check_len(what: &'static str, len: u64, limit: usize) -> Result<usize, ProtocolError> {
    if len > limit as u64 {
        return Err(ProtocolError::TooLarge { what, len, limit });
    }
    Ok(len as usize)
}

/// Parses the requests of one connection from the pieces it sends. Idle,
/// it is a pointer and a flag; the limits are the caller's, passed in.
pub struct RequestParser {
    partial: Option<Box<Partial>>,
    /// Keys and values are kept (see [`RequestParser::framing`]).
    keep: bool,
}

impl Default for RequestParser {
    fn default() -> Self {
        RequestParser {
            partial: None,
            keep: true,
        }
    }
}

impl RequestParser {
    /// A parser that checks and frames requests without keeping their keys
    /// and values: its requests carry empty ones in their place (as many,
    /// so a MULTI_GET still counts its keys). What it holds does not grow
    /// with a key or value, only by a few bytes per key of a list.
    pub(crate) fn framing() -> RequestParser {
        RequestParser {
            partial: None,
            keep: false,
        }
    }

    /// Reads from the start of `data` up to the end of the first complete
    /// request. Returns the bytes it took and the request, if one was
    /// completed (then call again with the rest of `data`); without a
    /// request it took all of `data` and keeps its place.
    pub fn parse(
        &mut self,
        data: &[u8],
        limits: &Limits,
    ) -> Result<(usize, Option<Request>), ProtocolError> {
        let mut pos = 0;
        loop {
            let partial = match self.partial.as_mut() {
                Some(partial) => partial,
                None => {
                    let Some(&byte) = data.get(pos) else {
                        return Ok((pos, None));
                    };
                    pos += 1;
                    if let Some(request) = self.begin(byte)? {
                        return Ok((pos, Some(request)));
                    }
                    continue;
                }
            };
            pos += partial.atom.fill(&data[pos..]);
            if !partial.atom.is_complete() {
                return Ok((pos, None));
            }
            if let Some(request) = self.atom_done(limits)? {
                return Ok((pos, Some(request)));
            }
        }
    }

    /// When the rest of a large value is expected next: the buffer to
    /// receive it into, straight from the socket (then report the bytes
    /// received with [`RequestParser::direct_filled`]).
    pub fn direct_target(&mut self) -> Option<&mut [u8]> {
        let partial = self.partial.as_mut()?;
        let Atom::Value { value, len, filled } = &mut partial.atom else {
            return None;
        };
        if *len - *filled < LARGE_VALUE_LEN {
            return None;
        }
        let buf = value.get_or_insert_with(|| zeroed_shared(*len));
        Arc::get_mut(buf).map(|buf| &mut buf[*filled..])
    }

    /// `n` bytes were received into [`RequestParser::direct_target`];
    /// returns the request if that completed it.
    pub fn direct_filled(
        &mut self,
        n: usize,
        limits: &Limits,
    ) -> Result<Option<Request>, ProtocolError> {
        let Some(partial) = self.partial.as_mut() else {
            return Ok(None);
        };
        if let Atom::Value { len, filled, .. } = &mut partial.atom {
            *filled = (*filled + n).min(*len);
        }
        if !partial.atom.is_complete() {
            return Ok(None);
        }
        self.atom_done(limits)
    }

    /// Whether the parser is between requests.
    pub fn is_idle(&self) -> bool {
        self.partial.is_none()
    }

    fn begin(&mut self, byte: u8) -> Result<Option<Request>, ProtocolError> {
        let command = Command::from_byte(byte).ok_or(ProtocolError::UnknownCommand(byte))?;
        let mut partial = Box::new(Partial {
            command,
            fields: layout(command),
            next: 0,
            counted: false,
            items_left: 0,
            pair_value: false,
            keep: self.keep,
            keys: Vec::new(),
            values: Vec::new(),
            int: 0,
            size: 1,
            atom: Atom::int(0, IntRole::Field),
        });
        match partial.next_atom() {
            Some(atom) => {
                partial.atom = atom;
                self.partial = Some(partial);
                Ok(None)
            }
            None => Ok(Some(partial.into_request())),
        }
    }

    fn atom_done(&mut self, limits: &Limits) -> Result<Option<Request>, ProtocolError> {
        let Some(partial) = self.partial.as_mut() else {
            return Ok(None);
        };
        match partial.atom_done(limits) {
            Ok(Some(atom)) => {
                partial.atom = atom;
                Ok(None)
            }
            Ok(None) => Ok(self.partial.take().map(|p| p.into_request())),
            Err(e) => {
                self.partial = None;
                Err(e)
            }
        }
    }
}

/// Parses every complete request in `data` with a fresh parser; the
/// requests, and whether bytes of an incomplete one were left.
#[cfg(test)]
pub(crate) fn parse_all(
    data: &[u8],
    limits: Limits,
) -> Result<(Vec<Request>, bool), ProtocolError> {
    let mut parser = RequestParser::default();
    let mut requests = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let (n, request) = parser.parse(&data[pos..], &limits)?;
        pos += n;
        requests.extend(request);
    }
    Ok((requests, !parser.is_idle()))
}

#[cfg(test)]
mod tests;
