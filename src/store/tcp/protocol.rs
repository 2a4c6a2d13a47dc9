//! PyTorch's TCPStore wire protocol (docs/wire-protocol.md): command bytes,
//! limits, requests as values, request encoders for the client, and the
//! server info of distcore's extensions (the server's incremental parser
//! is [`super::parser`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::listing::Fields;
use crate::security::auth::{Nonce, NONCE_LEN, PROOF_LEN};
use crate::store::kv::Value;

/// The magic number a connection sends with VALIDATE.
pub(crate) const VALIDATE_MAGIC: u32 = 0x3C85_F7CE;

/// Reply byte of WAIT, BARRIER and the extended gets: the keys are there.
pub(crate) const STOP_WAITING: u8 = 0;
/// Reply byte of CANCEL_WAIT.
pub(crate) const WAIT_CANCELED: u8 = 1;
/// Reply byte of CHECK: every key exists.
pub(crate) const READY: u8 = 0;
/// Reply byte of CHECK: some key is missing.
pub(crate) const NOT_READY: u8 = 1;

/// The nonce of a PING that asks "are you a distcore server?". PyTorch
/// clients ping with their process id (below 2^22), so they never send it; a
/// PyTorch server echoes it, a distcore server answers [`HELLO_ACK`] and
/// from then on accepts the extension commands on that connection.
pub(crate) const HELLO_NONCE: u32 = 0xDC0D_E5A1;
/// A distcore server's answer to [`HELLO_NONCE`].
pub(crate) const HELLO_ACK: u32 = 0xDC0D_E5A2;

/// The nonce of a PING that asks for version 2 of the extensions: those of
/// [`HELLO_NONCE`], the server's limits in the answer, and status-prefixed
/// replies (see [`ServerInfo`] and [`REPLY_OK`]). A PyTorch server echoes
/// it; so does a distcore server with extensions off.
pub(crate) const HELLO_V2_NONCE: u32 = 0xDC0D_E5A3;
/// A distcore server's answer to [`HELLO_V2_NONCE`], followed by its
/// [`ServerInfo`] as a byte string.
pub(crate) const HELLO_V2_ACK: u32 = 0xDC0D_E5A4;

/// On a version 2 connection every reply starts with a status byte: this
/// one, then the reply PyTorch's protocol gives (nothing more for APPEND,
/// which is acknowledged; SET, MULTI_SET and QUEUE_PUSH get no reply when
/// they succeed, as in PyTorch's protocol)...
pub(crate) const REPLY_OK: u8 = 0;
/// ...or this one, then the error: a `u8` status code (`dc_status`:
/// 1 invalid argument, ...) and its message as a byte string. The
/// connection stays usable. An ADD or BARRIER on a non-integer value and an
/// APPEND past the value limit are answered so. A request over the limits
/// the server announced still closes the connection, as PyTorch's server
/// does: the client knew them and checks before sending.
pub(crate) const REPLY_ERROR: u8 = 1;
/// ...or, for a SET, MULTI_SET or QUEUE_PUSH that failed (they have no
/// reply), this one with the same error fields: it comes before the reply
/// of whatever request follows, which the client then reads as usual.
pub(crate) const REPLY_DEFERRED_ERROR: u8 = 2;

/// What a distcore server tells a version 2 client after [`HELLO_V2_ACK`]:
/// a `u32` version (1) and its limits as `u64`s (key, value, keys per
/// request, request); then a `u32` of flags ([`INFO_AUTH_REQUIRED`],
/// [`INFO_CHALLENGE`], [`INFO_TLS_REQUIRED`], [`INFO_LEASES`],
/// [`INFO_SESSIONS_OUTLIVE`]) and, with [`INFO_CHALLENGE`], the 32-byte challenge to
/// authenticate with (see [`Command::Auth`]). Carried as a byte string, so
/// later versions can append fields an older client skips; a server from
/// before authentication sends no flags (read as none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServerInfo {
    /// The limits the server enforces.
    pub(crate) limits: Limits,
    /// The connection may make no request but the handshake's until it
    /// authenticates.
    pub(crate) auth_required: bool,
    /// The connection is in clear where the server requires TLS: it may
    /// make no request but the handshake's.
    pub(crate) tls_required: bool,
    /// The challenge to authenticate with, if the server has a secret.
    pub(crate) challenge: Option<Nonce>,
    /// Keys may be tied to sessions (SESSION_LEASE; since 1.4): its
    /// backend deletes them when their session ends.
    pub(crate) leases: bool,
    /// Sessions outlive this server (since 1.4: a server on etcd): one
    /// whose connection to it broke may be resumed on another server of
    /// the same store ([`SessionSpec::resume`]) within its TTL.
    pub(crate) sessions_outlive: bool,
}

/// [`ServerInfo`] flag: authenticate before any other request.
pub(crate) const INFO_AUTH_REQUIRED: u32 = 1;
/// [`ServerInfo`] flag: a challenge follows (the server has a secret).
pub(crate) const INFO_CHALLENGE: u32 = 2;
/// [`ServerInfo`] flag: connect again over TLS; nothing is served in clear.
pub(crate) const INFO_TLS_REQUIRED: u32 = 4;
/// [`ServerInfo`] flag (since 1.4): keys may be leased to sessions.
pub(crate) const INFO_LEASES: u32 = 8;
/// [`ServerInfo`] flag (since 1.4): sessions outlive this server.
pub(crate) const INFO_SESSIONS_OUTLIVE: u32 = 16;

impl ServerInfo {
    const VERSION: u32 = 1;

    /// The byte string sent after [`HELLO_V2_ACK`].
    pub(crate) fn encode(&self) -> Vec<u8> {
        let l = &self.limits;
        let mut info = Self::VERSION.to_le_bytes().to_vec();
        for n in [
            l.max_key_len,
            l.max_value_len,
            l.max_keys_per_request,
            l.max_request_len,
        ] {
            info.extend_from_slice(&(n as u64).to_le_bytes());
        }
        let mut flags = 0;
        if self.auth_required {
            flags |= INFO_AUTH_REQUIRED;
        }
        if self.challenge.is_some() {
            flags |= INFO_CHALLENGE;
        }
        if self.tls_required {
            flags |= INFO_TLS_REQUIRED;
        }
        if self.leases {
            flags |= INFO_LEASES;
        }
        if self.sessions_outlive {
            flags |= INFO_SESSIONS_OUTLIVE;
        }
        info.extend_from_slice(&flags.to_le_bytes());
        if let Some(challenge) = &self.challenge {
            info.extend_from_slice(challenge);
        }
        let mut out = Vec::with_capacity(8 + info.len());
        put_bytes(&mut out, &info);
        out
    }

    /// Reads the payload of the byte string (without its length); `None`
    /// when it is too short or of an unknown version.
    pub(crate) fn decode(info: &[u8]) -> Option<ServerInfo> {
        let version = u32::from_le_bytes(info.get(..4)?.try_into().ok()?);
        if version != Self::VERSION {
            return None;
        }
        let field = |i: usize| -> Option<usize> {
            let at = 4 + 8 * i;
            let n = u64::from_le_bytes(info.get(at..at + 8)?.try_into().ok()?);
            usize::try_from(n).ok()
        };
        let rest = &info[36.min(info.len())..];
        let flags = match rest.get(..4) {
            Some(bytes) => u32::from_le_bytes(bytes.try_into().ok()?),
            None => 0,
        };
        let challenge = if flags & INFO_CHALLENGE != 0 {
            Some(rest.get(4..4 + NONCE_LEN)?.try_into().ok()?)
        } else {
            None
        };
        Some(ServerInfo {
            limits: Limits {
                max_key_len: field(0)?,
                max_value_len: field(1)?,
                max_keys_per_request: field(2)?,
                max_request_len: field(3)?,
            },
            auth_required: flags & INFO_AUTH_REQUIRED != 0,
            tls_required: flags & INFO_TLS_REQUIRED != 0,
            challenge,
            leases: flags & INFO_LEASES != 0,
            sessions_outlive: flags & INFO_SESSIONS_OUTLIVE != 0,
        })
    }
}

/// What SESSION_OPEN asks for (docs/extensions.md, "Sessions"): carried
/// as one byte string — a `u32` version (1), `u32` rank, `u32` world size
/// (0: not given), `u64` incarnation, `u64` TTL in milliseconds (0: none,
/// only the connection), `u32` pid, then the group and the host as byte
/// strings (`u64` length + bytes), then (since 1.4's recoverable groups)
/// a `u32` of flags, 1: the group is recoverable (a spec without them:
/// none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSpec {
    /// The group: the job's key prefix.
    pub group: Vec<u8>,
    /// The member's rank in it.
    pub rank: u32,
    /// How many members the group has, if known.
    pub world_size: Option<u32>,
    /// New for every start of the process: a newer one fences an older.
    pub incarnation: u64,
    /// Ended when nothing arrives from the member for this long.
    pub ttl: Option<Duration>,
    /// The member's host, for messages (at most [`SessionSpec::MAX_HOST_LEN`] bytes).
    pub host: String,
    /// The member's process id, for messages.
    pub pid: u32,
    /// The group is recoverable: a member's failure fails no other
    /// member's calls; the membership changes instead.
    pub recoverable: bool,
    /// The session is this incarnation's, opened before on another server
    /// of the same store (its server died): it is taken over, not opened
    /// again, if it still lives (a server on etcd, whose sessions outlive
    /// it; see [`ServerInfo`](crate::store::tcp::protocol)'s flags).
    pub resume: bool,
}

impl SessionSpec {
    const VERSION: u32 = 1;
    /// The longest host name carried.
    pub const MAX_HOST_LEN: usize = 255;

    /// The byte string SESSION_OPEN carries.
    pub fn encode(&self) -> Vec<u8> {
        let mut spec = Self::VERSION.to_le_bytes().to_vec();
        spec.extend_from_slice(&self.rank.to_le_bytes());
        spec.extend_from_slice(&self.world_size.unwrap_or(0).to_le_bytes());
        spec.extend_from_slice(&self.incarnation.to_le_bytes());
        let ttl_ms = self
            .ttl
            .map_or(0, |t| t.as_millis().clamp(1, u64::MAX as u128) as u64);
        spec.extend_from_slice(&ttl_ms.to_le_bytes());
        spec.extend_from_slice(&self.pid.to_le_bytes());
        put_bytes(&mut spec, &self.group);
        put_bytes(&mut spec, self.host.as_bytes());
        let flags = u32::from(self.recoverable) | u32::from(self.resume) << 1;
        spec.extend_from_slice(&flags.to_le_bytes());
        spec
    }

    /// The spec in `bytes`, if it is one (a group of at most
    /// `max_group_len` bytes, a host of at most [`Self::MAX_HOST_LEN`]).
    pub fn decode(bytes: &[u8], max_group_len: usize) -> Option<SessionSpec> {
        let mut f = Fields::new(bytes);
        if f.u32()? != Self::VERSION {
            return None;
        }
        let rank = f.u32()?;
        let world_size = Some(f.u32()?).filter(|n| *n > 0);
        let incarnation = f.u64()?;
        let ttl = Some(f.u64()?)
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis);
        let pid = f.u32()?;
        let group = f.bytes(max_group_len)?.to_vec();
        let host = String::from_utf8(f.bytes(Self::MAX_HOST_LEN)?.to_vec()).ok()?;
        // Flags came later: a spec may end before them.
        let flags = if f.is_done() { 0 } else { f.u32()? };
        if world_size.is_some_and(|n| rank >= n) {
            return None;
        }
        Some(SessionSpec {
            group,
            rank,
            world_size,
            incarnation,
            ttl,
            host,
            pid,
            recoverable: flags & 1 != 0,
            resume: flags & 2 != 0,
        })
    }
}

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
    /// distcore extension (version 2): answer the challenge of the server
    /// info with a client nonce and a proof (two byte strings); the reply
    /// is the server's own proof.
    Auth = 0x81,
    /// distcore extension (version 2): the server's metrics, in
    /// Prometheus's text format, as a byte string.
    Stats = 0x82,
    /// distcore extension (version 2, since 1.4): open a liveness session
    /// ([`SessionSpec`], a byte string); the reply is its id (`u64`).
    SessionOpen = 0x83,
    /// distcore extension (version 2, since 1.4): this connection belongs
    /// to the session with this id (`u64`).
    SessionAttach = 0x84,
    /// distcore extension (version 2, since 1.4): the session's member is
    /// alive (no fields).
    SessionKeepAlive = 0x85,
    /// distcore extension (version 2, since 1.4): end the session
    /// gracefully (no fields).
    SessionClose = 0x86,
    /// distcore extension (version 2, since 1.4): end the session with
    /// this error of the process's own (a byte string), failing its group.
    SessionReport = 0x87,
    /// distcore extension (version 2, since 1.4): the request that follows
    /// on this connection (SET, ADD, COMPARE_SET, APPEND, MULTI_SET,
    /// QUEUE_PUSH) ties the keys it writes to the connection's session: they
    /// are deleted when the session ends (no fields, no reply).
    SessionLease = 0x88,
    /// distcore extension (since 1.4): delete every key starting with this
    /// prefix (a key); the reply is how many (`i64`).
    DeletePrefix = 0x89,
    /// distcore extension (since 1.4): the keys starting with this prefix
    /// (a key); the reply is LIST_KEYS's.
    ListPrefix = 0x8A,
    /// distcore extension (version 2, since 1.4): the live sessions of the
    /// groups starting with this prefix (a key) and their failures; the
    /// reply is a byte string, a [`SessionListing`](super::listing::SessionListing).
    SessionList = 0x8B,
}

impl Command {
    /// Every command, with its name in metrics and logs: the one table.
    pub const ALL: [(Command, &'static str); 31] = [
        (Command::Validate, "validate"),
        (Command::Set, "set"),
        (Command::CompareSet, "compare_set"),
        (Command::Get, "get"),
        (Command::Add, "add"),
        (Command::Check, "check"),
        (Command::Wait, "wait"),
        (Command::GetNumKeys, "get_num_keys"),
        (Command::DeleteKey, "delete_key"),
        (Command::Append, "append"),
        (Command::MultiGet, "multi_get"),
        (Command::MultiSet, "multi_set"),
        (Command::CancelWait, "cancel_wait"),
        (Command::Ping, "ping"),
        (Command::QueuePush, "queue_push"),
        (Command::QueuePop, "queue_pop"),
        (Command::QueueLen, "queue_len"),
        (Command::ListKeys, "list_keys"),
        (Command::Barrier, "barrier"),
        (Command::WaitGet, "wait_get"),
        (Command::Auth, "auth"),
        (Command::Stats, "stats"),
        (Command::SessionOpen, "session_open"),
        (Command::SessionAttach, "session_attach"),
        (Command::SessionKeepAlive, "session_keepalive"),
        (Command::SessionClose, "session_close"),
        (Command::SessionReport, "session_report"),
        (Command::SessionLease, "session_lease"),
        (Command::DeletePrefix, "delete_prefix"),
        (Command::ListPrefix, "list_prefix"),
        (Command::SessionList, "session_list"),
    ];

    /// The command with this byte, if it is one.
    pub fn from_byte(byte: u8) -> Option<Command> {
        let (command, _) = Command::ALL.get(Command::place(byte))?;
        (*command as u8 == byte).then_some(*command)
    }

    /// Its position in [`Command::ALL`] (an index for per-command tables).
    pub fn index(self) -> usize {
        Command::place(self as u8)
    }

    /// Where a command byte stands in [`Command::ALL`], which lists
    /// PyTorch's commands (0x00 to 0x12, contiguous), then the extensions
    /// (0x80 on).
    fn place(byte: u8) -> usize {
        const PYTORCH_COMMANDS: usize = 0x13;
        match byte {
            0x80.. => PYTORCH_COMMANDS + usize::from(byte - 0x80),
            _ => usize::from(byte),
        }
    }

    /// Whether it changes the store (a request that only reads may be
    /// answered again, or its answer dropped, with no harm).
    pub fn writes(self) -> bool {
        use Command::*;
        matches!(
            self,
            Set | CompareSet
                | Add
                | DeleteKey
                | Append
                | MultiSet
                | QueuePush
                | QueuePop
                | Barrier
                | SessionOpen
                | SessionClose
                | SessionReport
                | SessionLease
                | DeletePrefix
        )
    }

    /// Its name: `set`, `compare_set`, ...
    pub fn name(self) -> &'static str {
        Command::ALL[self.index()].1
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
    /// Most bytes of one request, all fields counted (PyTorch: none; ours:
    /// twice the value limit, 128 MiB by default). Bounds what a request
    /// still arriving can make the server hold.
    pub max_request_len: usize,
}

/// distcore's default value limit: 64 MiB.
pub(crate) const DEFAULT_MAX_VALUE_LEN: usize = 64 << 20;

impl Limits {
    /// What a connection still in its handshake may send (VALIDATE, PING,
    /// and AUTH with its client nonce and proof): 81 bytes at most.
    pub(crate) const HANDSHAKE: Limits = Limits {
        max_key_len: if NONCE_LEN > PROOF_LEN {
            NONCE_LEN
        } else {
            PROOF_LEN
        },
        max_value_len: 0,
        max_keys_per_request: 0,
        max_request_len: 1 + (8 + NONCE_LEN) + (8 + PROOF_LEN),
    };

    /// The default limits with values up to `max_value_len` bytes (and
    /// requests up to twice that).
    pub fn with_max_value_len(max_value_len: usize) -> Limits {
        Limits {
            max_value_len,
            max_request_len: max_value_len.saturating_mul(2).max(1 << 20),
            ..Limits::default()
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_len: 8 << 10,
            max_value_len: DEFAULT_MAX_VALUE_LEN,
            max_keys_per_request: 128 << 10,
            max_request_len: 2 * DEFAULT_MAX_VALUE_LEN,
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
        expected: Arc<[u8]>,
        desired: Arc<[u8]>,
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
        value: Arc<[u8]>,
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
    Auth {
        nonce: Vec<u8>,
        proof: Vec<u8>,
    },
    Stats,
    DeletePrefix {
        prefix: Key,
    },
    ListPrefix {
        prefix: Key,
    },
    /// A request of the liveness sessions.
    Session(SessionRequest),
}

/// A request of the liveness sessions (docs/extensions.md, "Sessions").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionRequest {
    /// SESSION_OPEN.
    Open {
        /// An encoded [`SessionSpec`].
        spec: Value,
    },
    /// SESSION_ATTACH.
    Attach {
        /// The session this connection belongs to.
        id: u64,
    },
    /// SESSION_KEEPALIVE.
    KeepAlive,
    /// SESSION_CLOSE.
    Close,
    /// SESSION_REPORT.
    Report {
        /// The process's own error.
        message: Value,
    },
    /// SESSION_LEASE: the next request's keys die with the session.
    Lease,
    /// SESSION_LIST.
    List {
        /// The groups listed start with it.
        prefix: Key,
    },
}

/// What a data request produced, before it is encoded as a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// No reply (SET, APPEND, MULTI_SET, QUEUE_PUSH).
    Silent,
    /// A byte string (COMPARE_SET).
    Value(Value),
    /// A byte string per key, empty where missing (GET, MULTI_GET).
    Values(Vec<Option<Value>>),
    /// An `i64` (ADD, GETNUMKEYS, DELETE_KEY, QUEUE_LEN).
    Int(i64),
    /// CHECK's answer: every key exists.
    Ready(bool),
    /// QUEUE_POP: the length before the pop, and the value if there was one.
    Popped { before: i64, value: Option<Value> },
    /// LIST_KEYS, LIST_PREFIX.
    Keys(Vec<Key>),
}

impl Request {
    /// Its command.
    pub fn command(&self) -> Command {
        match self {
            Request::Validate { .. } => Command::Validate,
            Request::Set { .. } => Command::Set,
            Request::CompareSet { .. } => Command::CompareSet,
            Request::Get { .. } => Command::Get,
            Request::Add { .. } => Command::Add,
            Request::Check { .. } => Command::Check,
            Request::Wait { .. } => Command::Wait,
            Request::GetNumKeys => Command::GetNumKeys,
            Request::DeleteKey { .. } => Command::DeleteKey,
            Request::Append { .. } => Command::Append,
            Request::MultiGet { .. } => Command::MultiGet,
            Request::MultiSet { .. } => Command::MultiSet,
            Request::CancelWait => Command::CancelWait,
            Request::Ping { .. } => Command::Ping,
            Request::QueuePush { .. } => Command::QueuePush,
            Request::QueuePop { .. } => Command::QueuePop,
            Request::QueueLen { .. } => Command::QueueLen,
            Request::ListKeys => Command::ListKeys,
            Request::Barrier { .. } => Command::Barrier,
            Request::WaitGet { .. } => Command::WaitGet,
            Request::Auth { .. } => Command::Auth,
            Request::Stats => Command::Stats,
            Request::DeletePrefix { .. } => Command::DeletePrefix,
            Request::ListPrefix { .. } => Command::ListPrefix,
            Request::Session(SessionRequest::Open { .. }) => Command::SessionOpen,
            Request::Session(SessionRequest::Attach { .. }) => Command::SessionAttach,
            Request::Session(SessionRequest::KeepAlive) => Command::SessionKeepAlive,
            Request::Session(SessionRequest::Close) => Command::SessionClose,
            Request::Session(SessionRequest::Report { .. }) => Command::SessionReport,
            Request::Session(SessionRequest::Lease) => Command::SessionLease,
            Request::Session(SessionRequest::List { .. }) => Command::SessionList,
        }
    }
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

/// Builds the bytes of one request or reply.
#[derive(Default, Clone)]
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

    #[test]
    fn command_bytes_and_places_match_the_table() {
        for (i, (command, _)) in Command::ALL.iter().enumerate() {
            assert_eq!(command.index(), i, "{command:?}");
        }
        for byte in 0..=u8::MAX {
            let listed = Command::ALL.iter().find(|(c, _)| *c as u8 == byte);
            assert_eq!(Command::from_byte(byte), listed.map(|(c, _)| *c));
        }
    }

    #[test]
    fn server_info_round_trips_and_tolerates_fields_it_does_not_know() {
        let info = ServerInfo {
            limits: Limits::with_max_value_len(5 << 20),
            auth_required: false,
            tls_required: false,
            challenge: None,
            leases: false,
            sessions_outlive: false,
        };
        let encoded = info.encode();
        let len = u64::from_le_bytes(encoded[..8].try_into().unwrap()) as usize;
        assert_eq!(len, encoded.len() - 8);
        assert_eq!(ServerInfo::decode(&encoded[8..]), Some(info));
        let mut longer = encoded[8..].to_vec();
        longer.extend_from_slice(&[9; 16]);
        assert_eq!(ServerInfo::decode(&longer), Some(info));
        assert_eq!(ServerInfo::decode(&encoded[8..20]), None);
        let mut v2 = encoded[8..].to_vec();
        v2[0] = 2;
        assert_eq!(ServerInfo::decode(&v2), None);
        let before_auth = &encoded[8..8 + 36];
        assert_eq!(
            ServerInfo::decode(before_auth),
            Some(info),
            "a server from before authentication sends no flags"
        );
        let challenged = ServerInfo {
            auth_required: true,
            tls_required: true,
            challenge: Some([7; NONCE_LEN]),
            leases: true,
            ..info
        };
        assert_eq!(
            ServerInfo::decode(&challenged.encode()[8..]),
            Some(challenged)
        );
        assert_eq!(
            ServerInfo::decode(&challenged.encode()[8..50]),
            None,
            "a challenge cut short"
        );
    }
}
