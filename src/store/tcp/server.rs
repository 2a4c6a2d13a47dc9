//! The TCPStore server: one thread running a mio event loop over
//! non-blocking sockets, speaking PyTorch's protocol (see [`super::protocol`]).
//!
//! Waiters are indexed by key and by connection, so a set wakes only the
//! waiters of its key and a cancel or a disconnect costs what it touches.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use super::listen::listen;
use super::protocol::{
    parse_request, parse_value_header, put_bytes, Key, Limits, Request, ValueHeader, HELLO_ACK,
    HELLO_NONCE, NOT_READY, READY, STOP_WAITING, VALIDATE_MAGIC, WAIT_CANCELED,
};
use crate::bigbuf::{zeroed_shared, LARGE_VALUE_LEN};
use crate::error::{Error, Result};
use crate::outbox::Outbox;
use crate::store::kv::{KvTable, Value};

/// How a server gets its listening socket.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The port; 0 picks a free one.
    pub port: u16,
    /// Listen only on this address; `None`: every interface, dual-stack.
    pub bind_address: Option<IpAddr>,
    /// Take over this already-listening socket instead of binding.
    pub listen_fd: Option<RawFd>,
    /// Request size limits.
    pub limits: Limits,
    /// Answer distcore clients' HELLO probe and accept the extension
    /// commands (off: behave exactly as a PyTorch server).
    pub extensions: bool,
}

/// A snapshot of a server's load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Open client connections.
    pub connections: usize,
    /// Pending WAIT, WAIT_GET and BARRIER requests.
    pub pending_waits: usize,
    /// Keys holding values.
    pub keys: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            port: 0,
            bind_address: None,
            listen_fd: None,
            limits: Limits::default(),
            extensions: true,
        }
    }
}

/// A running server. Dropping it stops the event loop and closes every
/// connection.
pub struct Server {
    port: u16,
    stats: Arc<Mutex<ServerStats>>,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;

impl Server {
    /// Binds (or takes over the listening socket) and starts the event loop.
    pub fn start(options: ServerOptions) -> Result<Server> {
        crate::logging::init();
        let std_listener = match options.listen_fd {
            // SAFETY: the caller hands us a listening socket it no longer uses.
            Some(fd) => unsafe { std::net::TcpListener::from_raw_fd(fd) },
            None => listen(options.bind_address, options.port).map_err(|e| {
                Error::network(format!("cannot listen on port {}: {e}", options.port))
            })?,
        };
        std_listener
            .set_nonblocking(true)
            .map_err(|e| Error::network(format!("listening socket: {e}")))?;
        let port = std_listener
            .local_addr()
            .map_err(|e| Error::network(format!("listening socket: {e}")))?
            .port();
        let poll = Poll::new().map_err(io_error)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(io_error)?);
        let mut listener = TcpListener::from_std(std_listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(io_error)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(ServerStats::default()));
        let mut event_loop = EventLoop {
            extensions: options.extensions,
            stats: stats.clone(),
            connections: 0,
            poll,
            listener,
            limits: options.limits,
            conns: Vec::new(),
            free: Vec::new(),
            scratch: vec![0; SCRATCH_LEN],
            table: KvTable::default(),
            waits: Waits::default(),
            dirty: Vec::new(),
            stop: stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("dc-tcpstore-{port}"))
            .spawn(move || event_loop.run())
            .map_err(|e| Error::internal(format!("spawning the server thread: {e}")))?;
        Ok(Server {
            port,
            stats,
            stop,
            waker,
            thread: Some(thread),
        })
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's load as of its last event.
    pub fn stats(&self) -> ServerStats {
        *self.stats.lock()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            log::error!("waking the TCPStore server to stop it: {e}");
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn io_error(e: io::Error) -> Error {
    Error::internal(format!("event loop: {e}"))
}

type WaitId = u64;

/// What a wait sends when it completes.
enum WaitReply {
    /// WAIT: STOP_WAITING.
    StopWaiting,
    /// The WAIT_GET extension: STOP_WAITING then the values of the keys.
    Values(Vec<Key>),
    /// BARRIER: STOP_WAITING once the arrival count reaches `world_size`.
    Barrier { world_size: i64 },
}

struct PendingWait {
    token: Token,
    /// Registrations in `Waits::by_key` still outstanding.
    registrations: Vec<(Key, u64)>,
    reply: WaitReply,
}

/// Pending waits, indexed by id, by key, and (in each connection) by owner.
#[derive(Default)]
struct Waits {
    pending: HashMap<WaitId, PendingWait>,
    /// WAIT / WAIT_GET registrations: key -> sequence -> wait, oldest first.
    by_key: HashMap<Key, BTreeMap<u64, WaitId>>,
    /// BARRIER registrations, the same way.
    barriers: HashMap<Key, BTreeMap<u64, WaitId>>,
    next: u64,
}

impl Waits {
    fn next_id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    fn register(&mut self, token: Token, keys: Vec<Key>, reply: WaitReply) -> WaitId {
        let id = self.next_id();
        let mut registrations = Vec::with_capacity(keys.len());
        for key in keys {
            let seq = self.next_id();
            let index = match reply {
                WaitReply::Barrier { .. } => &mut self.barriers,
                _ => &mut self.by_key,
            };
            index.entry(key.clone()).or_default().insert(seq, id);
            registrations.push((key, seq));
        }
        self.pending.insert(
            id,
            PendingWait {
                token,
                registrations,
                reply,
            },
        );
        id
    }

    /// Removes a wait and whatever registrations it still has.
    fn remove(&mut self, id: WaitId) -> Option<PendingWait> {
        let wait = self.pending.remove(&id)?;
        let index = match wait.reply {
            WaitReply::Barrier { .. } => &mut self.barriers,
            _ => &mut self.by_key,
        };
        for (key, seq) in &wait.registrations {
            if let Some(regs) = index.get_mut(key) {
                regs.remove(seq);
                if regs.is_empty() {
                    index.remove(key);
                }
            }
        }
        Some(wait)
    }

    /// Marks `key` present for the waits registered on it (all of them, or
    /// only the oldest); returns the waits that have nothing left to wait for.
    fn satisfy(&mut self, key: &[u8], only_oldest: bool) -> Vec<WaitId> {
        let Some(regs) = self.by_key.get_mut(key) else {
            return Vec::new();
        };
        let taken: Vec<(u64, WaitId)> = if only_oldest {
            regs.pop_first().into_iter().collect()
        } else {
            std::mem::take(regs).into_iter().collect()
        };
        if regs.is_empty() {
            self.by_key.remove(key);
        }
        let mut done = Vec::new();
        for (seq, id) in taken {
            if let Some(wait) = self.pending.get_mut(&id) {
                wait.registrations.retain(|(_, s)| *s != seq);
                if wait.registrations.is_empty() {
                    done.push(id);
                }
            }
        }
        done
    }

    /// The barrier waits on `key` whose world size `arrived` reaches.
    fn released_barriers(&self, key: &[u8], arrived: i64) -> Vec<WaitId> {
        let Some(regs) = self.barriers.get(key) else {
            return Vec::new();
        };
        regs.values()
            .copied()
            .filter(|id| {
                matches!(self.pending.get(id), Some(PendingWait {
                    reply: WaitReply::Barrier { world_size }, ..
                }) if arrived >= *world_size)
            })
            .collect()
    }
}

struct Conn {
    stream: TcpStream,
    peer: Option<SocketAddr>,
    /// The start of a request whose end has not arrived yet.
    pending: Vec<u8>,
    /// A large value being read straight into its final buffer (boxed:
    /// rare, and idle connections should stay small).
    incoming: Option<Box<IncomingValue>>,
    output: Outbox,
    validated: bool,
    extended: bool,
    waits: Vec<WaitId>,
}

/// The loop's read buffer, shared by every connection.
const SCRATCH_LEN: usize = 64 << 10;
/// A connection's partial-request buffer larger than this is released once
/// empty.
const MAX_IDLE_PENDING: usize = 1 << 20;

/// A SET or QUEUE_PUSH whose large value is still arriving.
struct IncomingValue {
    header: ValueHeader,
    /// Zero-filled, unshared until complete.
    value: Value,
    filled: usize,
}

impl IncomingValue {
    /// Starts reading the value `header` announced; `arrived` is its first
    /// part (shorter than the value).
    fn new(header: ValueHeader, arrived: &[u8]) -> IncomingValue {
        let mut value = zeroed_shared(header.value_len);
        if let Some(buf) = Arc::get_mut(&mut value) {
            buf[..arrived.len()].copy_from_slice(arrived);
        }
        IncomingValue {
            header,
            value,
            filled: arrived.len(),
        }
    }

    /// The part of the value still to read. The value is never shared
    /// before it is complete; were it, the empty slice would read as a
    /// closed connection and close it, never corrupt a value.
    fn rest(&mut self) -> &mut [u8] {
        match Arc::get_mut(&mut self.value) {
            Some(buf) => &mut buf[self.filled..],
            None => &mut [],
        }
    }
}

/// Why a connection is being closed.
enum Close {
    PeerClosed,
    Refused(String),
    Io(io::Error),
}

struct EventLoop {
    extensions: bool,
    stats: Arc<Mutex<ServerStats>>,
    connections: usize,
    poll: Poll,
    listener: TcpListener,
    limits: Limits,
    /// Connections by `token - FIRST_CONN`.
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    scratch: Vec<u8>,
    table: KvTable,
    waits: Waits,
    /// Connections with replies to flush after this event.
    dirty: Vec<Token>,
    stop: Arc<AtomicBool>,
}

impl EventLoop {
    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        while !self.stop.load(Ordering::SeqCst) {
            if let Err(e) = self.poll.poll(&mut events, None) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("TCPStore server: poll failed, stopping: {e}");
                return;
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    token => {
                        let closing = event.is_read_closed() || event.is_error();
                        if event.is_readable() || closing {
                            self.on_readable(token, closing);
                        }
                        if event.is_writable() {
                            self.dirty.push(token);
                        }
                    }
                }
                self.flush_dirty();
            }
            *self.stats.lock() = ServerStats {
                connections: self.connections,
                pending_waits: self.waits.pending.len(),
                keys: self.table.num_keys() as usize,
            };
        }
    }

    fn conn(&mut self, token: Token) -> Option<&mut Conn> {
        self.conns
            .get_mut(token.0.checked_sub(FIRST_CONN)?)?
            .as_mut()
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let index = self.free.pop().unwrap_or_else(|| {
                        self.conns.push(None);
                        self.conns.len() - 1
                    });
                    let token = Token(index + FIRST_CONN);
                    if let Err(e) =
                        self.poll
                            .registry()
                            .register(&mut stream, token, Interest::READABLE)
                    {
                        log::error!("TCPStore server: registering {peer}: {e}");
                        self.free.push(index);
                        continue;
                    }
                    self.connections += 1;
                    self.conns[index] = Some(Conn {
                        stream,
                        peer: Some(peer),
                        pending: Vec::new(),
                        incoming: None,
                        output: Outbox::new(false),
                        validated: false,
                        extended: false,
                        waits: Vec::new(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors and the like: keep serving the others.
                    log::warn!("TCPStore server: accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn on_readable(&mut self, token: Token, closing: bool) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let outcome = self.read_and_process(token, &mut scratch, closing);
        self.scratch = scratch;
        if let Err(reason) = outcome {
            self.close(token, reason);
        }
    }

    /// Reads what the socket holds and handles every complete request. A
    /// large SET / QUEUE_PUSH value goes straight into the buffer that will
    /// keep it; everything else is read into the loop's scratch buffer and
    /// only the bytes of an incomplete request stay on the connection, so an
    /// idle connection holds no buffer and a busy one allocates nothing per
    /// request. `closing`: the event said the peer shut down, so read on to
    /// the end of the stream.
    fn read_and_process(
        &mut self,
        token: Token,
        scratch: &mut [u8],
        closing: bool,
    ) -> std::result::Result<(), Close> {
        loop {
            let Some(conn) = self.conn(token) else {
                return Ok(());
            };
            let target = match conn.incoming.as_mut() {
                Some(incoming) => incoming.rest(),
                None => &mut *scratch,
            };
            let wanted = target.len();
            let n = match conn.stream.read(target) {
                Ok(0) => return Err(Close::PeerClosed),
                Ok(n) => n,
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(()),
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(Close::Io(e)),
                },
            };
            match conn.incoming.as_mut() {
                Some(incoming) => {
                    incoming.filled += n;
                    if incoming.filled == incoming.header.value_len {
                        if let Some(incoming) = conn.incoming.take() {
                            let IncomingValue { header, value, .. } = *incoming;
                            let request = header.into_request(value);
                            self.handle(token, request).map_err(Close::Refused)?;
                        }
                    }
                }
                None => self.process_read(token, &scratch[..n])?,
            }
            // A short read drained the socket; mio reports new data as a
            // new event, so skip the read that would block. A shutdown
            // the event already reported would not be reported again.
            if n < wanted && !closing {
                return Ok(());
            }
        }
    }

    /// Handles the complete requests in what just arrived after the
    /// connection's pending bytes, keeping the incomplete rest.
    fn process_read(&mut self, token: Token, data: &[u8]) -> std::result::Result<(), Close> {
        let Some(conn) = self.conn(token) else {
            return Ok(());
        };
        let mut pending = std::mem::take(&mut conn.pending);
        if pending.is_empty() {
            let consumed = self.process(token, data)?;
            pending.extend_from_slice(&data[consumed..]);
        } else {
            pending.extend_from_slice(data);
            let consumed = self.process(token, &pending)?;
            pending.drain(..consumed);
        }
        let incoming = match parse_value_header(&pending, &self.limits) {
            Ok(Some(header)) if header.value_len >= LARGE_VALUE_LEN => {
                let arrived = &pending[header.header_len..];
                let incoming = Box::new(IncomingValue::new(header, arrived));
                pending.clear();
                Some(incoming)
            }
            Ok(_) => None,
            Err(e) => return Err(Close::Refused(e.to_string())),
        };
        if pending.is_empty() && pending.capacity() > MAX_IDLE_PENDING {
            pending = Vec::new();
        }
        if let Some(conn) = self.conn(token) {
            conn.pending = pending;
            conn.incoming = incoming;
        }
        Ok(())
    }

    /// Handles every complete request at the start of `data`; returns the
    /// bytes they took.
    fn process(&mut self, token: Token, data: &[u8]) -> std::result::Result<usize, Close> {
        let limits = self.limits;
        let mut consumed = 0;
        while let Some((request, n)) =
            parse_request(&data[consumed..], &limits).map_err(|e| Close::Refused(e.to_string()))?
        {
            consumed += n;
            self.handle(token, request).map_err(Close::Refused)?;
        }
        Ok(consumed)
    }

    /// Queues a reply built into the connection's outbox, with the table
    /// at hand (borrowed beside the connection, so values need no copy).
    fn reply_with(&mut self, token: Token, build: impl FnOnce(&mut Outbox, &KvTable)) {
        let conn = token
            .0
            .checked_sub(FIRST_CONN)
            .and_then(|i| self.conns.get_mut(i))
            .and_then(Option::as_mut);
        if let Some(conn) = conn {
            let was_empty = conn.output.is_empty();
            build(&mut conn.output, &self.table);
            if was_empty {
                self.dirty.push(token);
            }
        }
    }

    /// Queues a reply of plain bytes.
    fn reply(&mut self, token: Token, bytes: impl FnOnce(&mut Vec<u8>)) {
        self.reply_with(token, |o, _| bytes(o.buffer()));
    }

    /// Queues `prefix`, then the value of every key (empty when missing, as
    /// PyTorch's server sends it), values shared rather than copied.
    fn reply_values(&mut self, token: Token, prefix: &[u8], keys: &[Key]) {
        self.reply_with(token, |o, table| {
            o.buffer().extend_from_slice(prefix);
            for key in keys {
                match table.get(key) {
                    Some(value) => o.put_value(value),
                    None => put_bytes(o.buffer(), &[]),
                }
            }
        });
    }

    /// Applies one request; `Err` closes the connection with that reason.
    fn handle(&mut self, token: Token, request: Request) -> std::result::Result<(), String> {
        let conn = self.conn(token).ok_or("gone")?;
        if !conn.validated {
            return match request {
                Request::Validate {
                    magic: VALIDATE_MAGIC,
                } => {
                    conn.validated = true;
                    Ok(())
                }
                Request::Validate { magic } => Err(format!("bad magic 0x{magic:08x}")),
                // PyTorch's server ignores everything until VALIDATE.
                _ => Ok(()),
            };
        }
        let extended = conn.extended;
        match request {
            Request::Validate { .. } => {}
            Request::Ping { nonce } => {
                let answer = if nonce == HELLO_NONCE && self.extensions {
                    if let Some(conn) = self.conn(token) {
                        conn.extended = true;
                    }
                    HELLO_ACK
                } else {
                    nonce
                };
                self.reply(token, |o| o.extend_from_slice(&answer.to_le_bytes()));
            }
            Request::Set { key, value } => {
                self.table.set(&key, value);
                self.key_changed(&key, false);
            }
            Request::CompareSet {
                key,
                expected,
                desired,
            } => {
                let (value, written) = self.table.compare_set(&key, &expected, &desired);
                self.reply_with(token, |o, _| o.put_value(&value));
                if written {
                    self.key_changed(&key, false);
                }
            }
            Request::Get { key } => self.reply_values(token, &[], &[key]),
            Request::Add { key, delta } => {
                let value = self
                    .table
                    .add(&key, delta)
                    .map_err(|e| e.message().to_string())?;
                self.reply(token, |o| o.extend_from_slice(&value.to_le_bytes()));
                self.key_changed(&key, false);
            }
            Request::Check { keys } => {
                let ready = keys.iter().all(|k| self.table.contains(k));
                self.reply(token, |o| o.push(if ready { READY } else { NOT_READY }));
            }
            Request::Wait { keys } => self.start_wait(token, keys, WaitReply::StopWaiting),
            Request::WaitGet { keys } if extended => {
                self.start_wait(token, keys.clone(), WaitReply::Values(keys))
            }
            Request::WaitGet { .. } => return Err("extension command before HELLO".into()),
            Request::GetNumKeys => {
                let n = self.table.num_keys();
                self.reply(token, |o| o.extend_from_slice(&n.to_le_bytes()));
            }
            Request::DeleteKey { key } => {
                let deleted = i64::from(self.table.delete(&key));
                self.reply(token, |o| o.extend_from_slice(&deleted.to_le_bytes()));
            }
            Request::Append { key, value } => {
                self.table.append(&key, &value);
                self.key_changed(&key, false);
            }
            Request::MultiGet { keys } => self.reply_values(token, &[], &keys),
            Request::MultiSet { pairs } => {
                for (key, value) in pairs {
                    self.table.set(&key, value);
                    self.key_changed(&key, false);
                }
            }
            Request::CancelWait => {
                self.cancel_waits(token);
                self.reply(token, |o| o.push(WAIT_CANCELED));
            }
            Request::QueuePush { key, value } => {
                self.table.queue_push(&key, value);
                self.key_changed(&key, true);
            }
            Request::QueuePop { key } => {
                let before = self.table.queue_len(&key);
                let value = self.table.queue_pop(&key);
                self.reply_with(token, |o, _| {
                    o.buffer().extend_from_slice(&before.to_le_bytes());
                    if let Some(value) = &value {
                        o.put_value(value);
                    }
                });
            }
            Request::QueueLen { key } => {
                let n = self.table.queue_len(&key);
                self.reply(token, |o| o.extend_from_slice(&n.to_le_bytes()));
            }
            Request::ListKeys => {
                let keys: Vec<Key> = self.table.keys().map(<[u8]>::to_vec).collect();
                self.reply(token, |o| {
                    o.extend_from_slice(&(keys.len() as i64).to_le_bytes());
                    for k in &keys {
                        put_bytes(o, k);
                    }
                });
            }
            Request::Barrier { key, world_size } => {
                let arrived = self
                    .table
                    .add(&key, 1)
                    .map_err(|e| e.message().to_string())?;
                self.key_changed(&key, false);
                if arrived >= world_size {
                    self.reply(token, |o| o.push(STOP_WAITING));
                } else {
                    let id =
                        self.waits
                            .register(token, vec![key], WaitReply::Barrier { world_size });
                    if let Some(conn) = self.conn(token) {
                        conn.waits.push(id);
                    }
                }
            }
        }
        Ok(())
    }

    fn start_wait(&mut self, token: Token, mut keys: Vec<Key>, reply: WaitReply) {
        keys.sort_unstable();
        keys.dedup();
        keys.retain(|k| !self.table.contains(k));
        if keys.is_empty() {
            self.send_wait_reply(token, &reply);
            return;
        }
        let id = self.waits.register(token, keys, reply);
        if let Some(conn) = self.conn(token) {
            conn.waits.push(id);
        }
    }

    /// `key` was written: complete the waits it satisfies (only the oldest
    /// for a queue push) and release the barriers its count reaches.
    fn key_changed(&mut self, key: &[u8], only_oldest: bool) {
        let mut done = self.waits.satisfy(key, only_oldest);
        if self.waits.barriers.contains_key(key) {
            if let Ok(arrived) = self.table.counter(key) {
                done.extend(self.waits.released_barriers(key, arrived));
            }
        }
        for id in done {
            if let Some(wait) = self.waits.remove(id) {
                if let Some(conn) = self.conn(wait.token) {
                    conn.waits.retain(|w| *w != id);
                }
                self.send_wait_reply(wait.token, &wait.reply);
            }
        }
    }

    fn send_wait_reply(&mut self, token: Token, reply: &WaitReply) {
        match reply {
            WaitReply::StopWaiting | WaitReply::Barrier { .. } => {
                self.reply(token, |o| o.push(STOP_WAITING))
            }
            WaitReply::Values(keys) => self.reply_values(token, &[STOP_WAITING], keys),
        }
    }

    fn cancel_waits(&mut self, token: Token) {
        let ids = self
            .conn(token)
            .map(|c| std::mem::take(&mut c.waits))
            .unwrap_or_default();
        for id in ids {
            self.waits.remove(id);
        }
    }

    fn flush_dirty(&mut self) {
        while let Some(token) = self.dirty.pop() {
            if let Err(e) = self.flush(token) {
                self.close(token, Close::Io(e));
            }
        }
    }

    fn flush(&mut self, token: Token) -> io::Result<()> {
        let Some(Some(conn)) = token
            .0
            .checked_sub(FIRST_CONN)
            .and_then(|i| self.conns.get_mut(i))
        else {
            return Ok(());
        };
        conn.output
            .flush(&mut conn.stream, self.poll.registry(), token)
    }

    fn close(&mut self, token: Token, reason: Close) {
        // Replies produced before the close still go out, as far as they can.
        let _ = self.flush(token);
        self.cancel_waits(token);
        let Some(index) = token.0.checked_sub(FIRST_CONN) else {
            return;
        };
        let Some(mut conn) = self.conns.get_mut(index).and_then(Option::take) else {
            return;
        };
        let peer = conn.peer.map_or_else(|| "?".into(), |p| p.to_string());
        match reason {
            Close::PeerClosed => log::debug!("TCPStore server: {peer} disconnected"),
            Close::Io(e) => log::debug!("TCPStore server: closing {peer}: {e}"),
            Close::Refused(why) => {
                log::warn!("TCPStore server: closing connection from {peer}: {why}")
            }
        }
        let _ = self.poll.registry().deregister(&mut conn.stream);
        self.free.push(index);
        self.connections -= 1;
    }
}

#[cfg(test)]
mod tests;
