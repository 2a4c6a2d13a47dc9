//! TCPStore: PyTorch's network store, client and server, byte-compatible
//! with `torch.distributed.TCPStore` (both its libuv and legacy servers).

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use once_cell::sync::Lazy;
use parking_lot::Mutex;

use super::{check_multi_set_lengths, Store};
use crate::error::{Error, Result, Status};
use crate::timeout::DEFAULT_STORE_TIMEOUT;

mod client;
mod counters;
mod listen;
pub mod parser;
pub mod protocol;
pub mod server;

use client::{Connection, WaitOutcome};
use counters::Counters;
pub use counters::OpCounter;
use protocol::{Command, Encoder, Limits};
pub use server::{Server, ServerOptions, ServerStats};

/// The worker-count key, sent without the `/` prefix (PyTorch's `initKey_`).
const INIT_KEY: &str = "init/";

/// How to create a [`TcpStore`]; mirrors `torch.distributed.TCPStore(...)`.
#[derive(Debug, Clone)]
pub struct TcpStoreOptions {
    /// The host to connect to (the server's address; for the server itself, where clients reach it).
    pub host: String,
    /// The port; for a server, 0 picks a free one.
    pub port: u16,
    /// Start a server in this process (PyTorch's `is_master`).
    pub is_server: bool,
    /// The number of store handles in the job (server included), if known.
    pub world_size: Option<u32>,
    /// Count this handle in `init/` and, on the server, wait for the world.
    pub wait_for_workers: bool,
    /// Timeout of connecting and of blocking operations (zero: forever).
    pub timeout: Duration,
    /// Share one server between handles of this process asking for the same port.
    pub multi_tenant: bool,
    /// Serve on this already-listening socket (PyTorch's `master_listen_fd`).
    pub master_listen_fd: Option<RawFd>,
    /// Listen only on this address (default: every interface, dual-stack).
    pub bind_address: Option<IpAddr>,
    /// Largest value the server accepts.
    pub max_value_len: usize,
}

impl Default for TcpStoreOptions {
    fn default() -> Self {
        TcpStoreOptions {
            host: "127.0.0.1".into(),
            port: 0,
            is_server: false,
            world_size: None,
            wait_for_workers: true,
            timeout: DEFAULT_STORE_TIMEOUT,
            multi_tenant: false,
            master_listen_fd: None,
            bind_address: None,
            max_value_len: protocol::DEFAULT_MAX_VALUE_LEN,
        }
    }
}

/// Servers shared by multi-tenant handles, by port.
static TENANT_SERVERS: Lazy<Mutex<HashMap<u16, Weak<Server>>>> = Lazy::new(Default::default);

fn start_server(options: &TcpStoreOptions) -> Result<Arc<Server>> {
    let server_options = ServerOptions {
        port: options.port,
        bind_address: options.bind_address,
        listen_fd: options.master_listen_fd,
        limits: Limits::with_max_value_len(options.max_value_len),
        extensions: true,
    };
    if !options.multi_tenant {
        return Server::start(server_options).map(Arc::new);
    }
    let mut servers = TENANT_SERVERS.lock();
    servers.retain(|_, s| s.strong_count() > 0);
    if let Some(server) = servers.get(&options.port).and_then(Weak::upgrade) {
        return Ok(server);
    }
    let server = Arc::new(Server::start(server_options)?);
    servers.insert(server.port(), Arc::downgrade(&server));
    Ok(server)
}

/// A TCPStore handle: a client connection, and the server when this handle
/// started one. Thread-safe: operations on one handle are serialised.
pub struct TcpStore {
    server: Option<Arc<Server>>,
    host: String,
    port: u16,
    world_size: Option<u32>,
    conn: Mutex<Connection>,
    timeout: Mutex<Duration>,
    counters: Counters,
}

fn user_key(key: &str) -> String {
    format!("/{key}")
}

impl TcpStore {
    /// Creates the store: starts the server if asked, connects (with
    /// retries until the timeout), and with a world size and
    /// `wait_for_workers`, counts itself in and (on the server) waits for
    /// every worker.
    pub fn new(options: TcpStoreOptions) -> Result<TcpStore> {
        if options.is_server {
            warn_if_backlog_too_small(options.world_size);
        }
        let server = options
            .is_server
            .then(|| start_server(&options))
            .transpose()?;
        let port = server.as_ref().map_or(options.port, |s| s.port());
        let conn = Connection::connect(&options.host, port, options.timeout)?;
        let store = TcpStore {
            server,
            host: options.host.clone(),
            port,
            world_size: options.world_size,
            conn: Mutex::new(conn),
            timeout: Mutex::new(options.timeout),
            counters: Counters::default(),
        };
        if options.world_size.is_some() && options.wait_for_workers {
            store.wait_for_workers()?;
        }
        Ok(store)
    }

    /// The port of the server this handle talks to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host this handle connected to.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The server this handle runs (or shares), if any.
    pub fn server(&self) -> Option<&Server> {
        self.server.as_deref()
    }

    /// Whether the server is a distcore server (one-round-trip gets).
    pub fn peer_is_distcore(&self) -> bool {
        self.conn.lock().extended()
    }

    /// Counts this handle in `init/`; on the server, then blocks until the
    /// count reaches the world size or fails with PyTorch's "Timed out after
    /// N seconds waiting for clients. x/y clients joined.".
    pub fn wait_for_workers(&self) -> Result<()> {
        let Some(world_size) = self.world_size else {
            return Ok(());
        };
        self.add_raw(INIT_KEY, 1)?;
        if self.server.is_none() {
            return Ok(());
        }
        let timeout = self.timeout();
        let start = Instant::now();
        loop {
            let joined = self.joined_workers()?;
            if joined >= i64::from(world_size) {
                return Ok(());
            }
            let elapsed = start.elapsed();
            if !timeout.is_zero() && elapsed > timeout {
                return Err(Error::timeout(format!(
                    "Timed out after {} seconds waiting for clients. {joined}/{world_size} clients joined.",
                    elapsed.as_secs_f64().ceil() as u64
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The number of handles counted in `init/` so far.
    pub fn joined_workers(&self) -> Result<i64> {
        let joined = self.get_raw(INIT_KEY)?;
        Ok(String::from_utf8_lossy(&joined).parse().unwrap_or(0))
    }

    /// The value of `key` if it exists, without waiting for it.
    pub fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        if !self.check(&[key])? {
            return Ok(None);
        }
        self.get_raw(&user_key(key)).map(Some)
    }

    /// Latency counters of this handle's operations (PyTorch's
    /// `collectClientCounters`): per operation, count, mean and sample
    /// variance in milliseconds.
    pub fn counters(&self) -> Vec<OpCounter> {
        self.counters.snapshot()
    }

    /// Runs one exchange on the connection, timing it under `op`.
    fn exchange<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Connection, Duration) -> Result<T>,
    ) -> Result<T> {
        let timeout = self.timeout();
        let start = Instant::now();
        let result = f(&mut self.conn.lock(), timeout);
        self.counters.record(op, start.elapsed());
        result
    }

    /// A read timeout for replies that come at once (zero: forever).
    fn reply_timeout(timeout: Duration) -> Option<Duration> {
        (!timeout.is_zero()).then_some(timeout)
    }

    fn add_raw(&self, key: &str, delta: i64) -> Result<i64> {
        let request = Encoder::request(Command::Add)
            .bytes(key.as_bytes())
            .u64(delta as u64)
            .finish();
        self.exchange("add", |c, t| {
            c.send(&request)?;
            c.read_i64(Self::reply_timeout(t))
        })
    }

    /// GET without waiting: empty when the key is missing.
    fn get_raw(&self, key: &str) -> Result<Vec<u8>> {
        let request = Encoder::request(Command::Get)
            .bytes(key.as_bytes())
            .finish();
        self.exchange("get", |c, t| {
            c.send(&request)?;
            c.read_bytes(Self::reply_timeout(t))
        })
    }

    /// Sends a reply-less `command key value` (SET, APPEND, QUEUE_PUSH); the
    /// value goes out from the caller's buffer.
    fn send_keyed_value(
        &self,
        op: &'static str,
        command: Command,
        key: &str,
        value: &[u8],
    ) -> Result<()> {
        let head = Encoder::request(command)
            .bytes(user_key(key).as_bytes())
            .u64(value.len() as u64)
            .finish();
        self.exchange(op, |c, _| c.send_unanswered(&head, value))
    }

    /// WAIT on wire keys; `Ok(false)` when the timeout passed.
    fn wait_wire(conn: &mut Connection, keys: &[String], timeout: Duration) -> Result<bool> {
        conn.send(&Encoder::request(Command::Wait).keys(keys).finish())?;
        Ok(matches!(
            conn.await_stop(timeout, |_| Ok(()))?,
            WaitOutcome::Ready(())
        ))
    }

    /// Waits for wire keys then reads their values: one round trip with a
    /// distcore server (WAIT_GET), WAIT + MULTI_GET with PyTorch's.
    fn wait_and_get(
        &self,
        op: &'static str,
        keys: Vec<String>,
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>> {
        let count = keys.len();
        let outcome = self.exchange(op, |c, _| {
            let read_values = |c: &mut Connection| -> Result<Vec<Vec<u8>>> {
                (0..count)
                    .map(|_| c.read_bytes(Self::reply_timeout(timeout)))
                    .collect()
            };
            if c.extended() {
                c.send(&Encoder::request(Command::WaitGet).keys(&keys).finish())?;
                return match c.await_stop(timeout, read_values)? {
                    WaitOutcome::Ready(values) => Ok(Some(values)),
                    WaitOutcome::TimedOut => Ok(None),
                };
            }
            if !Self::wait_wire(c, &keys, timeout)? {
                return Ok(None);
            }
            c.send(&Encoder::request(Command::MultiGet).keys(&keys).finish())?;
            read_values(c).map(Some)
        })?;
        outcome.ok_or_else(|| wait_timeout(timeout, &keys))
    }
}

/// PyTorch's TCPStore wait timeout, naming the keys as they travel.
fn wait_timeout(timeout: Duration, wire_keys: &[String]) -> Error {
    Error::timeout(format!(
        "wait timeout after {}ms, keys: {}",
        timeout.as_millis(),
        wire_keys.join(", ")
    ))
}

fn warn_if_backlog_too_small(world_size: Option<u32>) {
    if let (Some(world), Some(cap)) = (world_size, listen::somaxconn()) {
        if world > cap {
            log::warn!(
                "TCPStore world size {world} exceeds /proc/sys/net/core/somaxconn ({cap}): \
                 connections may be refused and retried during rendezvous"
            );
        }
    }
}

impl Store for TcpStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.send_keyed_value("set", Command::Set, key, value)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let timeout = self.timeout();
        let mut values = self.wait_and_get("get", vec![user_key(key)], timeout)?;
        Ok(values.pop().unwrap_or_default())
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        self.add_raw(&user_key(key), delta)
    }

    fn compare_set(&self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>> {
        let request = Encoder::request(Command::CompareSet)
            .bytes(user_key(key).as_bytes())
            .bytes(expected)
            .bytes(desired)
            .finish();
        self.exchange("compare_set", |c, t| {
            c.send(&request)?;
            c.read_bytes(Self::reply_timeout(t))
        })
    }

    fn delete_key(&self, key: &str) -> Result<bool> {
        let request = Encoder::request(Command::DeleteKey)
            .bytes(user_key(key).as_bytes())
            .finish();
        self.exchange("delete_key", |c, t| {
            c.send(&request)?;
            Ok(c.read_i64(Self::reply_timeout(t))? == 1)
        })
    }

    fn check(&self, keys: &[&str]) -> Result<bool> {
        let wire: Vec<String> = keys.iter().map(|k| user_key(k)).collect();
        let request = Encoder::request(Command::Check).keys(&wire).finish();
        self.exchange("check", |c, t| {
            c.send(&request)?;
            Ok(c.read_u8(Self::reply_timeout(t))? == protocol::READY)
        })
    }

    fn wait(&self, keys: &[&str], timeout: Option<Duration>) -> Result<()> {
        let timeout = timeout.unwrap_or_else(|| self.timeout());
        let wire: Vec<String> = keys.iter().map(|k| user_key(k)).collect();
        if self.exchange("wait", |c, _| Self::wait_wire(c, &wire, timeout))? {
            Ok(())
        } else {
            Err(wait_timeout(timeout, &wire))
        }
    }

    fn num_keys(&self) -> Result<i64> {
        let request = Encoder::request(Command::GetNumKeys).finish();
        self.exchange("num_keys", |c, t| {
            c.send(&request)?;
            c.read_i64(Self::reply_timeout(t))
        })
    }

    fn append(&self, key: &str, value: &[u8]) -> Result<()> {
        self.send_keyed_value("append", Command::Append, key, value)
    }

    fn multi_get(&self, keys: &[&str]) -> Result<Vec<Vec<u8>>> {
        let timeout = self.timeout();
        self.wait_and_get(
            "multi_get",
            keys.iter().map(|k| user_key(k)).collect(),
            timeout,
        )
    }

    fn multi_set(&self, keys: &[&str], values: &[&[u8]]) -> Result<()> {
        check_multi_set_lengths(keys, values)?;
        let mut e = Encoder::request(Command::MultiSet).u64(keys.len() as u64);
        for (key, value) in keys.iter().zip(values) {
            e = e.bytes(user_key(key).as_bytes()).bytes(value);
        }
        let request = e.finish();
        self.exchange("multi_set", |c, _| c.send_unanswered(&request, &[]))
    }

    fn queue_push(&self, key: &str, value: &[u8]) -> Result<()> {
        self.send_keyed_value("queue_push", Command::QueuePush, key, value)
    }

    fn queue_pop(&self, key: &str, block: bool) -> Result<Vec<u8>> {
        let wire = user_key(key);
        let pop = Encoder::request(Command::QueuePop)
            .bytes(wire.as_bytes())
            .finish();
        let timeout = self.timeout();
        let deadline = (!timeout.is_zero()).then(|| Instant::now() + timeout);
        loop {
            let left = deadline.map_or(Duration::ZERO, |d| {
                d.saturating_duration_since(Instant::now())
            });
            if deadline.is_some() && left.is_zero() {
                return Err(wait_timeout(timeout, &[wire]));
            }
            let popped = self.exchange("queue_pop", |c, t| {
                if block && !Self::wait_wire(c, std::slice::from_ref(&wire), left)? {
                    return Ok(None);
                }
                c.send(&pop)?;
                let before = c.read_i64(Self::reply_timeout(t))?;
                if before > 0 {
                    c.read_bytes(Self::reply_timeout(t)).map(|v| Some(Some(v)))
                } else {
                    Ok(Some(None))
                }
            })?;
            match popped {
                None => return Err(wait_timeout(timeout, &[wire])),
                Some(Some(value)) => return Ok(value),
                // Another client took the element between our WAIT and POP.
                Some(None) if block => continue,
                Some(None) => return Err(Error::new(Status::QueueEmpty, "queue is empty")),
            }
        }
    }

    fn queue_len(&self, key: &str) -> Result<i64> {
        let request = Encoder::request(Command::QueueLen)
            .bytes(user_key(key).as_bytes())
            .finish();
        self.exchange("queue_len", |c, t| {
            c.send(&request)?;
            c.read_i64(Self::reply_timeout(t))
        })
    }

    fn list_keys(&self) -> Result<Vec<String>> {
        let request = Encoder::request(Command::ListKeys).finish();
        let keys = self.exchange("list_keys", |c, t| {
            c.send(&request)?;
            let count = c.read_i64(Self::reply_timeout(t))?;
            (0..count)
                .map(|_| c.read_bytes(Self::reply_timeout(t)))
                .collect::<Result<Vec<_>>>()
        })?;
        Ok(keys
            .into_iter()
            .filter_map(|k| {
                k.strip_prefix(b"/")
                    .map(|k| String::from_utf8_lossy(k).into_owned())
            })
            .collect())
    }

    fn barrier(&self, key: &str, world_size: i64, timeout: Option<Duration>) -> Result<()> {
        let timeout = timeout.unwrap_or_else(|| self.timeout());
        let request = Encoder::request(Command::Barrier)
            .bytes(user_key(key).as_bytes())
            .u64(world_size as u64)
            .finish();
        let released = self.exchange("barrier", |c, _| {
            c.send(&request)?;
            Ok(matches!(
                c.await_stop(timeout, |_| Ok(()))?,
                WaitOutcome::Ready(())
            ))
        })?;
        if released {
            Ok(())
        } else {
            Err(Error::timeout(format!(
                "barrier timeout after {}ms, key: {key}",
                timeout.as_millis()
            )))
        }
    }

    fn timeout(&self) -> Duration {
        *self.timeout.lock()
    }

    fn set_timeout(&self, timeout: Duration) {
        *self.timeout.lock() = timeout;
    }

    fn clone_store(&self) -> Result<Arc<dyn Store>> {
        let timeout = self.timeout();
        let conn = Connection::connect(&self.host, self.port, timeout)?;
        Ok(Arc::new(TcpStore {
            server: self.server.clone(),
            host: self.host.clone(),
            port: self.port,
            world_size: self.world_size,
            conn: Mutex::new(conn),
            timeout: Mutex::new(timeout),
            counters: Counters::default(),
        }))
    }
}

#[cfg(test)]
mod tests;
