//! The TCPStore handle (`torch.distributed.TCPStore`): a client of a
//! server over its [`Connections`], with the server itself when it is the
//! one that hosts it (`is_server`), shared between handles of a process
//! when `multi_tenant`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use once_cell::sync::Lazy;
use parking_lot::Mutex;

use super::counters::Counters;
use super::roll_call;
use super::{
    check_request, deadline_of, Connections, Deadline, Dialect, Endpoint, Plan, Reply, Shape,
};
use crate::error::{Error, Result, Status};
use crate::runtime::fork::Born;
use crate::runtime::timeout::DEFAULT_STORE_TIMEOUT;
use crate::security::access::{AccessPolicy, Network};
use crate::security::auth::Secret;
use crate::security::tls::{TlsClient, TlsServer};
use crate::store::tcp::listing::{GroupMembers, SessionListing};
use crate::store::tcp::protocol::{self, Command, Encoder, Limits, SessionSpec, READY};
use crate::store::tcp::server::{Quotas, Server, ServerOptions};
use crate::store::tcp::OpCounter;
use crate::store::{
    check_multi_set_lengths, delete_prefix_one_by_one, list_prefix_by_listing, Store,
};
use crate::work::{Promise, Work};

/// The worker-count key, sent without the `/` prefix (PyTorch's `initKey_`).
const INIT_KEY: &str = "init/";

/// The shortest session TTL: keep-alives go every third of it, and a
/// server turn late by its stall grace (100 ms) must not miss one.
pub const MIN_SESSION_TTL: Duration = Duration::from_millis(300);

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
    /// A server started with one serves that one job: a session group's
    /// failure also ends the waits of clients without a session
    /// ([`ServerOptions::one_job`]).
    pub world_size: Option<u32>,
    /// Count this handle in `init/` and, on the server, wait for the world.
    pub wait_for_workers: bool,
    /// Timeout of connecting and of blocking operations (zero: forever).
    pub timeout: Duration,
    /// Share one server between handles of this process asking for the same port.
    pub multi_tenant: bool,
    /// Serve on this socket, listening or only bound (PyTorch's
    /// `master_listen_fd`; see [`ServerOptions::listen_fd`]).
    pub master_listen_fd: Option<Arc<OwnedFd>>,
    /// Listen only on this address (default: every interface, dual-stack,
    /// as PyTorch: anyone who can reach the port can read, write and
    /// delete every key unless `allow` or `secret` say otherwise).
    pub bind_address: Option<IpAddr>,
    /// Largest value the server accepts.
    pub max_value_len: usize,
    /// The shared secret: a server requires its clients to prove they
    /// hold it (except those from `allow_unauthenticated`); a client
    /// proves it does and requires the server to prove it too. It never
    /// travels. `None`: no authentication (PyTorch's protocol).
    pub secret: Option<Secret>,
    /// Server: networks clients may connect from (empty: any).
    pub allow: Vec<Network>,
    /// Server with a secret or TLS: networks whose clients need not
    /// authenticate nor use TLS (PyTorch's clients can do neither).
    pub allow_unauthenticated: Vec<Network>,
    /// Server: serve TLS with this certificate (and, if it has a client
    /// CA, require client certificates). Connections in clear are then
    /// served only from `allow_unauthenticated`. `None`: in clear, as
    /// PyTorch.
    pub tls_server: Option<TlsServer>,
    /// Client (the server's own handle included): connect over TLS,
    /// trusting these CA certificates. `None`: in clear.
    pub tls_client: Option<TlsClient>,
    /// Server: what all clients together may make it hold.
    pub quotas: Quotas,
}

/// A liveness session of a handle's process (docs/liveness.md): when a
/// member of its group fails, the blocked and later calls of every other
/// member fail at once with [`Status::PeerFailed`](crate::Status::PeerFailed),
/// naming it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionOptions {
    /// The group: the job (a key prefix, by convention).
    pub group: String,
    /// This process's rank in it.
    pub rank: u32,
    /// How many members the group has, if known (the rank must be below).
    pub world_size: Option<u32>,
    /// New for every start of the process; a newer one of the same rank
    /// fences an older. Default: the wall clock in nanoseconds.
    pub incarnation: u64,
    /// The member is failed when nothing arrives from it for this long (a
    /// frozen or cut-off process); the handle sends three keep-alives a
    /// TTL from the process's waiter thread. `None` (the default): only
    /// the connection tells (a crash).
    pub ttl: Option<Duration>,
    /// The group is recoverable (docs/liveness.md): a member's failure
    /// fails no other member's calls; it changes the membership, which
    /// [`TcpStore::members`] gives and [`TcpStore::watch_members`] waits
    /// for. Every member of a group must agree. Default: fate-sharing.
    pub recoverable: bool,
}

impl SessionOptions {
    /// A session of `rank` in `group`, with a fresh incarnation.
    pub fn new(group: impl Into<String>, rank: u32) -> SessionOptions {
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |t| t.as_nanos() as u64);
        SessionOptions {
            group: group.into(),
            rank,
            world_size: None,
            incarnation,
            ttl: None,
            recoverable: false,
        }
    }

    /// What SESSION_OPEN carries: these options, this process's pid and
    /// host.
    /// The spec these options open a session with, once checked: a TTL of
    /// at least [`MIN_SESSION_TTL`], a rank below the world size.
    pub(crate) fn checked_spec(&self) -> Result<SessionSpec> {
        let spec = self.spec();
        if spec.ttl.is_some_and(|ttl| ttl < MIN_SESSION_TTL) {
            return Err(Error::invalid_argument(format!(
                "a session's TTL must be at least {MIN_SESSION_TTL:?}"
            )));
        }
        if spec.world_size.is_some_and(|n| spec.rank >= n) {
            return Err(Error::invalid_argument(format!(
                "rank {} is not below the world size {}",
                spec.rank,
                spec.world_size.unwrap_or(0)
            )));
        }
        Ok(spec)
    }

    fn spec(&self) -> SessionSpec {
        let mut host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        // Within the limit, on a character's boundary (truncate panics
        // inside one).
        let mut end = host.len().min(SessionSpec::MAX_HOST_LEN);
        while !host.is_char_boundary(end) {
            end -= 1;
        }
        host.truncate(end);
        SessionSpec {
            group: self.group.as_bytes().to_vec(),
            rank: self.rank,
            world_size: self.world_size,
            incarnation: self.incarnation,
            ttl: self.ttl,
            host,
            pid: std::process::id(),
            recoverable: self.recoverable,
            resume: false,
        }
    }
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
            secret: None,
            allow: Vec::new(),
            allow_unauthenticated: Vec::new(),
            tls_server: None,
            tls_client: None,
            quotas: Quotas::default(),
        }
    }
}

/// Servers shared by multi-tenant handles, by port, with the process
/// generation that started them: a forked child does not share its
/// parent's servers (their threads stayed in the parent).
static TENANT_SERVERS: Lazy<Mutex<HashMap<u16, TenantServer>>> = Lazy::new(Default::default);

/// A multi-tenant server and the process generation that started it.
type TenantServer = (Born, Weak<Server>);

fn start_server(options: &TcpStoreOptions) -> Result<Arc<Server>> {
    let server_options = ServerOptions {
        port: options.port,
        bind_address: options.bind_address,
        listen_fd: options.master_listen_fd.clone(),
        limits: Limits::with_max_value_len(options.max_value_len),
        access: AccessPolicy {
            allow: options.allow.clone(),
            secret: options.secret.clone(),
            allow_unauthenticated: options.allow_unauthenticated.clone(),
            tls: options.tls_server.clone(),
            ..AccessPolicy::default()
        },
        quotas: options.quotas,
        // A store that knows its job's size serves that one job, as
        // `distcore serve --world-size` does.
        one_job: options.world_size.is_some(),
        ..ServerOptions::default()
    };
    if !options.multi_tenant {
        return Server::start(server_options).map(Arc::new);
    }
    let mut servers = TENANT_SERVERS.lock();
    servers.retain(|_, (born, s)| born.is_current() && s.strong_count() > 0);
    if let Some(server) = servers.get(&options.port).and_then(|(_, s)| s.upgrade()) {
        return Ok(server);
    }
    let server = Arc::new(Server::start(server_options)?);
    servers.insert(server.port(), (Born::now(), Arc::downgrade(&server)));
    Ok(server)
}

/// A TCPStore handle: connections to a server (see `client/`), and the
/// server itself when this handle started one. Thread-safe: a waiting
/// operation in one thread never holds up another thread's operations.
pub struct TcpStore {
    /// The server this handle hosts, kept alive with it (visible to the
    /// server's tests, which attach one to a handle).
    pub(in crate::store::tcp) server: Option<Arc<Server>>,
    host: String,
    port: u16,
    world_size: Option<u32>,
    conns: Arc<Connections>,
    timeout: Mutex<Duration>,
    counters: Counters,
    /// Its writes tie their keys to the session ([`TcpStore::leased`]).
    leased: bool,
}

fn user_key(key: &str) -> String {
    format!("/{key}")
}

fn user_keys(keys: &[&str]) -> Vec<String> {
    keys.iter().map(|k| user_key(k)).collect()
}

/// The keys of a LIST_KEYS or LIST_PREFIX reply as the user named them
/// (those without the `/` are PyTorch's own, such as `init/`: left out).
fn user_keys_of(keys: Vec<Vec<u8>>) -> Vec<String> {
    keys.into_iter()
        .filter_map(|k| {
            k.strip_prefix(b"/")
                .map(|k| String::from_utf8_lossy(k).into_owned())
        })
        .collect()
}

fn as_bytes(keys: &[String]) -> Vec<&[u8]> {
    keys.iter().map(|k| k.as_bytes()).collect()
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
        let endpoint = Endpoint {
            host: options.host.clone(),
            port,
            secret: options.secret.clone(),
            tls: options.tls_client.clone(),
        };
        let conns = Connections::connect(endpoint, deadline_of(options.timeout))?;
        let store = TcpStore {
            server,
            host: options.host.clone(),
            port,
            world_size: options.world_size,
            conns: Arc::new(conns),
            timeout: Mutex::new(options.timeout),
            counters: Counters::default(),
            leased: false,
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

    /// Whether the server is a distcore server (one-round-trip gets, its
    /// limits known, errors answered rather than connections closed).
    pub fn peer_is_distcore(&self) -> bool {
        self.conns.dialect() == Dialect::Distcore
    }

    /// The server's metrics in Prometheus's text format, asked over the
    /// connection (the STATS extension): what `distcore inspect` shows.
    /// NotSupported from a PyTorch server.
    pub fn server_metrics(&self) -> Result<String> {
        if !self.peer_is_distcore() {
            return Err(Error::not_supported(
                "the server is not a distcore server: it has no metrics to give",
            ));
        }
        let request = || Encoder::request(Command::Stats).finish();
        let text = self
            .call("server_metrics", &[], &[], request, Shape::Values(1))?
            .into_value();
        Ok(String::from_utf8_lossy(&text).into_owned())
    }

    /// Opens a liveness session of this process on the handle
    /// (docs/liveness.md): from then on, when another member of its group
    /// fails, every blocked and later call of this handle fails at once
    /// with [`Status::PeerFailed`](crate::Status::PeerFailed) naming it;
    /// and when this process dies, the others are told. NotSupported on a
    /// PyTorch server; InvalidState if the handle has a session; PeerFailed
    /// if the group has lost a member already.
    pub fn open_session(&self, options: &SessionOptions) -> Result<()> {
        let spec = options.checked_spec()?;
        self.timed("open_session", || {
            self.conns.open_session(&spec, self.deadline())
        })
    }

    /// Closes the handle's session gracefully: the group is not failed.
    /// InvalidState if it has none.
    pub fn close_session(&self) -> Result<()> {
        self.timed("close_session", || {
            self.conns.end_session(None, self.deadline())
        })
    }

    /// Ends the handle's session with this process's own error: every
    /// other member of the group is told, with `message`, as a failure of
    /// this rank. InvalidState if it has no session.
    pub fn report_error(&self, message: &str) -> Result<()> {
        self.timed("report_error", || {
            self.conns.end_session(Some(message), self.deadline())
        })
    }

    /// A view of this handle whose writes (set, add, compare_set, append,
    /// multi_set, queue_push) tie the keys they write to the handle's
    /// session (docs/liveness.md): when the session ends, however it ends
    /// (closed, its process dead or frozen past its TTL, an error
    /// reported, fenced), the server deletes them. As with etcd's leases,
    /// the last write of a key decides: written again without a lease (or
    /// through another session), it is no longer this session's. The view
    /// shares the handle's connections and session, and reads as the
    /// handle; a clone of it ([`Store::clone_store`]) is a new connection
    /// with no session, so an ordinary handle. Its writes fail with
    /// InvalidState while the handle has no session, NotSupported on a
    /// PyTorch server (or a distcore server from before 1.4). On an
    /// etcd-backed server the keys are put on the session's etcd lease.
    pub fn leased(&self) -> TcpStore {
        TcpStore {
            server: self.server.clone(),
            host: self.host.clone(),
            port: self.port,
            world_size: self.world_size,
            conns: self.conns.clone(),
            timeout: Mutex::new(self.timeout()),
            counters: Counters::default(),
            leased: true,
        }
    }

    /// Whether this is a [`TcpStore::leased`] view.
    pub fn is_leased(&self) -> bool {
        self.leased
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
                let error = Error::timeout(format!(
                    "Timed out after {} seconds waiting for clients. {joined}/{world_size} clients joined.",
                    elapsed.as_secs_f64().ceil() as u64
                ));
                return Err(self.name_the_absent(error, world_size));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `error` (wait_for_workers' timeout) completed, on a handle with a
    /// session, with the ranks below `world_size` that have no session in
    /// its group (the handles that never came, if one per rank).
    fn name_the_absent(&self, error: Error, world_size: u32) -> Error {
        let Some((group, _)) = self.conns.member() else {
            return error;
        };
        let Ok(listing) = self.sessions(&group) else {
            return error;
        };
        let live: std::collections::BTreeSet<u32> = listing
            .sessions
            .iter()
            .filter(|s| s.group == group)
            .map(|s| s.rank)
            .collect();
        let absent: Vec<u32> = (0..world_size).filter(|r| !live.contains(r)).collect();
        if absent.is_empty() {
            return error;
        }
        Error::timeout(format!(
            "{} Ranks with no session in group '{group}': {}.",
            error.message(),
            roll_call::ranges(&absent)
        ))
    }

    /// The number of handles counted in `init/` so far.
    pub fn joined_workers(&self) -> Result<i64> {
        let joined = self.get_raw(INIT_KEY)?;
        Ok(String::from_utf8_lossy(&joined).parse().unwrap_or(0))
    }

    /// The live sessions of the groups starting with `group_prefix` ("":
    /// every group) and the failures of those groups, as the server sees
    /// them now: who, how long silent, and what each is blocked on (what
    /// `distcore inspect` shows). NotSupported from a PyTorch server.
    pub fn sessions(&self, group_prefix: &str) -> Result<SessionListing> {
        if !self.peer_is_distcore() {
            return Err(Error::not_supported(
                "the server is not a distcore server: it has no sessions",
            ));
        }
        let request = || {
            Encoder::request(Command::SessionList)
                .bytes(group_prefix.as_bytes())
                .finish()
        };
        let reply = self.call(
            "sessions",
            &[group_prefix.as_bytes()],
            &[],
            request,
            Shape::Values(1),
        )?;
        SessionListing::decode(&reply.into_value()).ok_or_else(|| {
            Error::new(
                Status::Protocol,
                "the server's session listing is malformed",
            )
        })
    }

    /// The membership of this handle's recoverable group (docs/liveness.md,
    /// "Recoverable groups"): the live members with their incarnations,
    /// and the epoch, which counts the membership's changes. Every member
    /// reads the same set at the same epoch. InvalidState if the handle
    /// has no session or its group is not recoverable.
    pub fn members(&self) -> Result<GroupMembers> {
        let group = self.recoverable_group()?;
        let record = self.get_raw(&GroupMembers::key(&group))?;
        if record.is_empty() {
            return Err(Error::new(
                Status::InvalidState,
                format!("group '{group}' has no membership record: it is not recoverable"),
            ));
        }
        GroupMembers::decode(&record).ok_or_else(|| {
            Error::new(
                Status::Protocol,
                format!("group '{group}''s membership record is malformed"),
            )
        })
    }

    /// A Work that completes once the membership of this handle's
    /// recoverable group has passed `epoch` (at once if it has): its result
    /// is the new epoch, in decimal; [`TcpStore::members`] then reads the
    /// members. Waits on the process's async thread, with no timeout of
    /// its own (a Work can be waited on with one, and its fd polled).
    /// InvalidState if the handle has no session or its group is not
    /// recoverable.
    pub fn watch_members(&self, epoch: u64) -> Result<Work> {
        let group = self.recoverable_group()?;
        let next = epoch
            .checked_add(1)
            .ok_or_else(|| Error::invalid_argument("no epoch comes after u64::MAX"))?;
        let plan = Plan::get(vec![GroupMembers::epoch_key(&group, next)]);
        self.conns.start(plan, Duration::ZERO, false, first_value)
    }

    /// The group of this handle's session, if it is recoverable.
    fn recoverable_group(&self) -> Result<String> {
        match self.conns.member() {
            Some((group, _)) if self.conns.recoverable() => Ok(group),
            Some((group, _)) => Err(Error::new(
                Status::InvalidState,
                format!("group '{group}' is not recoverable: it has no membership to watch"),
            )),
            None => Err(Error::new(
                Status::InvalidState,
                "this handle has no session",
            )),
        }
    }

    /// A member of a session arriving at the barrier on `wire_key`: records
    /// it on its arrival key, leased to its session (see `roll_call.rs`),
    /// reply-less.
    fn note_arrival(&self, wire_key: &str) -> Result<()> {
        let Some((group, rank)) = self.conns.member().filter(|_| self.conns.holds_leases()) else {
            return Ok(());
        };
        let key = roll_call::arrival_key(&group, rank);
        let deadline = self.deadline();
        self.conns.with_primary(deadline, |c| {
            check_request(c.limits(), &[key.as_bytes()], &[wire_key.len()])?;
            let request = Encoder::request(Command::SessionLease)
                .u8(Command::Set as u8)
                .bytes(key.as_bytes())
                .bytes(wire_key.as_bytes())
                .finish();
            c.post(&[&request], deadline)
        })
    }

    /// `error` (a barrier's timeout on `wire_key`) completed with the ranks
    /// of the handle's group that never arrived, if it has a session.
    fn name_the_missing(&self, error: Error, wire_key: &str, world_size: i64) -> Error {
        let Some((group, _)) = self.conns.member() else {
            return error;
        };
        let Ok(world_size) = u32::try_from(world_size) else {
            return error;
        };
        let prefix = roll_call::arrivals_prefix(&group);
        let described = self.list_raw(&prefix).and_then(|keys| {
            let values = self.multi_get_raw(&keys)?;
            let arrived = roll_call::arrived(&prefix, &keys, &values, wire_key);
            let listing = self.sessions(&group)?;
            Ok(roll_call::describe_missing(
                &group, world_size, &arrived, &listing,
            ))
        });
        match described {
            Ok(Some(missing)) => Error::timeout(format!("{}; {missing}", error.message())),
            _ => error,
        }
    }

    /// MULTI_GET of keys as they travel (no `/` added).
    fn multi_get_raw(&self, keys: &[Vec<u8>]) -> Result<Vec<Vec<u8>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let wire: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let request = || Encoder::request(Command::MultiGet).keys(keys).finish();
        let values = self.call("multi_get", &wire, &[], request, Shape::Values(keys.len()))?;
        Ok(values.into_values())
    }

    /// LIST_PREFIX of a prefix as it travels (no `/` added).
    fn list_raw(&self, wire_prefix: &str) -> Result<Vec<Vec<u8>>> {
        let request = || {
            Encoder::request(Command::ListPrefix)
                .bytes(wire_prefix.as_bytes())
                .finish()
        };
        let keys = self.call(
            "list_prefix",
            &[wire_prefix.as_bytes()],
            &[],
            request,
            Shape::Counted,
        )?;
        Ok(keys.into_values())
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

    /// Times `f` under `op`.
    fn timed<T>(&self, op: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let result = f();
        self.counters.record(op, start.elapsed());
        result
    }

    /// Sends a request on the primary connection and reads its reply of
    /// `shape`, within the handle's timeout, after checking `keys` and the
    /// `values` lengths against the server's limits.
    fn call(
        &self,
        op: &'static str,
        keys: &[&[u8]],
        values: &[usize],
        request: impl FnOnce() -> Vec<u8>,
        shape: Shape,
    ) -> Result<Reply> {
        let deadline = self.deadline();
        self.timed(op, || {
            self.conns.with_primary(deadline, |c| {
                check_request(c.limits(), keys, values)?;
                c.call(&[&request()], shape, deadline)
            })
        })
    }

    fn deadline(&self) -> Deadline {
        deadline_of(self.timeout())
    }

    /// The encoder of a request of `command` that writes keys: behind
    /// SESSION_LEASE on a leased view (once the handle's session is
    /// checked).
    fn write_request(&self, command: Command) -> Result<Encoder> {
        if !self.leased {
            return Ok(Encoder::request(command));
        }
        if !self.conns.holds_leases() {
            return Err(Error::not_supported(
                "this server cannot tie keys to sessions (PyTorch's, or a distcore server before 1.4)",
            ));
        }
        self.conns.check_session()?;
        Ok(Encoder::request(Command::SessionLease).u8(command as u8))
    }

    fn add_raw(&self, key: &str, delta: i64) -> Result<i64> {
        let head = self.write_request(Command::Add)?;
        let request = || {
            head.clone()
                .bytes(key.as_bytes())
                .u64(delta as u64)
                .finish()
        };
        self.call("add", &[key.as_bytes()], &[], request, Shape::I64)?
            .i64(0)
    }

    /// GET without waiting: empty when the key is missing.
    fn get_raw(&self, key: &str) -> Result<Vec<u8>> {
        let request = || {
            Encoder::request(Command::Get)
                .bytes(key.as_bytes())
                .finish()
        };
        self.call("get", &[key.as_bytes()], &[], request, Shape::Values(1))
            .map(Reply::into_value)
    }

    /// Sends a reply-less `command key value` (SET, APPEND, QUEUE_PUSH); the
    /// value goes out from the caller's buffer. APPEND waits for the
    /// acknowledgement of a distcore server: the server may refuse it.
    fn send_keyed_value(
        &self,
        op: &'static str,
        command: Command,
        key: &str,
        value: &[u8],
    ) -> Result<()> {
        let wire = user_key(key);
        let deadline = self.deadline();
        let head = self.write_request(command)?;
        self.timed(op, || {
            self.conns.with_primary(deadline, |c| {
                check_request(c.limits(), &[wire.as_bytes()], &[value.len()])?;
                let head = head.bytes(wire.as_bytes()).u64(value.len() as u64).finish();
                if command == Command::Append && c.dialect() == Dialect::Distcore {
                    c.call(&[&head, value], Shape::Ack, deadline).map(drop)
                } else {
                    c.post(&[&head, value], deadline)
                }
            })
        })
    }

    /// Runs a waiting operation on a connection of its own.
    fn run_plan(
        &self,
        op: &'static str,
        plan: Plan,
        timeout: Duration,
        fence: bool,
    ) -> Result<Vec<Vec<u8>>> {
        self.timed(op, || self.conns.run(plan, timeout, fence))
    }
}

fn warn_if_backlog_too_small(world_size: Option<u32>) {
    if let (Some(world), Some(cap)) = (world_size, crate::net::listen::somaxconn()) {
        if world > cap {
            log::warn!(
                "TCPStore world size {world} exceeds /proc/sys/net/core/somaxconn ({cap}): \
                 connections may be refused and retried during rendezvous"
            );
        }
    }
}

/// The first value read, as a work's result.
fn first_value(values: Vec<Vec<u8>>) -> Option<Vec<u8>> {
    Some(values.into_iter().next().unwrap_or_default())
}

/// No result (a wait, a barrier).
fn no_result(_: Vec<Vec<u8>>) -> Option<Vec<u8>> {
    None
}

impl Store for TcpStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.send_keyed_value("set", Command::Set, key, value)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let plan = Plan::get(vec![user_key(key)]);
        let mut values = self.run_plan("get", plan, self.timeout(), true)?;
        Ok(values.pop().unwrap_or_default())
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        self.add_raw(&user_key(key), delta)
    }

    fn compare_set(&self, key: &str, expected: &[u8], desired: &[u8]) -> Result<Vec<u8>> {
        let wire = user_key(key);
        let head = self.write_request(Command::CompareSet)?;
        let request = || {
            head.clone()
                .bytes(wire.as_bytes())
                .bytes(expected)
                .bytes(desired)
                .finish()
        };
        let lengths = [expected.len(), desired.len()];
        self.call(
            "compare_set",
            &[wire.as_bytes()],
            &lengths,
            request,
            Shape::Values(1),
        )
        .map(Reply::into_value)
    }

    fn delete_key(&self, key: &str) -> Result<bool> {
        let wire = user_key(key);
        let request = || {
            Encoder::request(Command::DeleteKey)
                .bytes(wire.as_bytes())
                .finish()
        };
        Ok(self
            .call("delete_key", &[wire.as_bytes()], &[], request, Shape::I64)?
            .i64(0)?
            == 1)
    }

    fn check(&self, keys: &[&str]) -> Result<bool> {
        let wire = user_keys(keys);
        let request = || Encoder::request(Command::Check).keys(&wire).finish();
        Ok(self
            .call("check", &as_bytes(&wire), &[], request, Shape::U8)?
            .u8(0)?
            == READY)
    }

    fn wait(&self, keys: &[&str], timeout: Option<Duration>) -> Result<()> {
        let timeout = timeout.unwrap_or_else(|| self.timeout());
        let plan = Plan::Wait {
            keys: user_keys(keys),
        };
        self.run_plan("wait", plan, timeout, false).map(drop)
    }

    fn num_keys(&self) -> Result<i64> {
        let request = || Encoder::request(Command::GetNumKeys).finish();
        self.call("num_keys", &[], &[], request, Shape::I64)?.i64(0)
    }

    fn append(&self, key: &str, value: &[u8]) -> Result<()> {
        self.send_keyed_value("append", Command::Append, key, value)
    }

    fn multi_get(&self, keys: &[&str]) -> Result<Vec<Vec<u8>>> {
        let plan = Plan::get(user_keys(keys));
        self.run_plan("multi_get", plan, self.timeout(), true)
    }

    fn multi_set(&self, keys: &[&str], values: &[&[u8]]) -> Result<()> {
        check_multi_set_lengths(keys, values)?;
        let wire = user_keys(keys);
        let lengths: Vec<usize> = values.iter().map(|v| v.len()).collect();
        let deadline = self.deadline();
        let head = self.write_request(Command::MultiSet)?;
        self.timed("multi_set", || {
            self.conns.with_primary(deadline, |c| {
                check_request(c.limits(), &as_bytes(&wire), &lengths)?;
                let mut e = head.u64(keys.len() as u64);
                for (key, value) in wire.iter().zip(values) {
                    e = e.bytes(key.as_bytes()).bytes(value);
                }
                c.post(&[&e.finish()], deadline)
            })
        })
    }

    fn queue_push(&self, key: &str, value: &[u8]) -> Result<()> {
        self.send_keyed_value("queue_push", Command::QueuePush, key, value)
    }

    fn queue_pop(&self, key: &str, block: bool) -> Result<Vec<u8>> {
        let wire = user_key(key);
        if block {
            let plan = Plan::queue_pop(wire);
            return self
                .run_plan("queue_pop", plan, self.timeout(), false)
                .map(|values| values.into_iter().next().unwrap_or_default());
        }
        let request = || {
            Encoder::request(Command::QueuePop)
                .bytes(wire.as_bytes())
                .finish()
        };
        let reply = self.call(
            "queue_pop",
            &[wire.as_bytes()],
            &[],
            request,
            Shape::QueuePop,
        )?;
        if reply.i64(0)? > 0 {
            Ok(reply.into_value())
        } else {
            Err(Error::new(Status::QueueEmpty, "queue is empty"))
        }
    }

    fn queue_len(&self, key: &str) -> Result<i64> {
        let wire = user_key(key);
        let request = || {
            Encoder::request(Command::QueueLen)
                .bytes(wire.as_bytes())
                .finish()
        };
        self.call("queue_len", &[wire.as_bytes()], &[], request, Shape::I64)?
            .i64(0)
    }

    fn list_keys(&self) -> Result<Vec<String>> {
        let request = || Encoder::request(Command::ListKeys).finish();
        let keys = self.call("list_keys", &[], &[], request, Shape::Counted)?;
        Ok(user_keys_of(keys.into_values()))
    }

    fn list_prefix(&self, prefix: &str) -> Result<Vec<String>> {
        if !self.peer_is_distcore() {
            return list_prefix_by_listing(self, prefix);
        }
        Ok(user_keys_of(self.list_raw(&user_key(prefix))?))
    }

    fn delete_prefix(&self, prefix: &str) -> Result<i64> {
        if !self.peer_is_distcore() {
            return delete_prefix_one_by_one(self, prefix);
        }
        let wire = user_key(prefix);
        let request = || {
            Encoder::request(Command::DeletePrefix)
                .bytes(wire.as_bytes())
                .finish()
        };
        self.call(
            "delete_prefix",
            &[wire.as_bytes()],
            &[],
            request,
            Shape::I64,
        )?
        .i64(0)
    }

    /// PyTorch's BARRIER. A member of a session records its arrival, so
    /// that a timeout names every rank of its group that never arrived.
    fn barrier(&self, key: &str, world_size: i64, timeout: Option<Duration>) -> Result<()> {
        let timeout = timeout.unwrap_or_else(|| self.timeout());
        let wire = user_key(key);
        self.note_arrival(&wire)?;
        let plan = Plan::Barrier {
            key: wire.clone(),
            world_size,
        };
        match self.run_plan("barrier", plan, timeout, false) {
            Err(e) if e.status() == Status::Timeout => {
                Err(self.name_the_missing(e, &wire, world_size))
            }
            done => done.map(drop),
        }
    }

    fn get_async(self: Arc<Self>, key: String) -> Result<Work> {
        let plan = Plan::get(vec![user_key(&key)]);
        self.conns.start(plan, self.timeout(), true, first_value)
    }

    fn wait_async(self: Arc<Self>, keys: Vec<String>, timeout: Option<Duration>) -> Result<Work> {
        let timeout = timeout.unwrap_or_else(|| self.timeout());
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let plan = Plan::Wait {
            keys: user_keys(&keys),
        };
        self.conns.start(plan, timeout, false, no_result)
    }

    fn queue_pop_async(self: Arc<Self>, key: String) -> Result<Work> {
        let plan = Plan::queue_pop(user_key(&key));
        self.conns.start(plan, self.timeout(), false, first_value)
    }

    /// PyTorch's BARRIER, async. A member of a session records its
    /// arrival, and its work's timeout names the ranks that never arrived,
    /// as [`Store::barrier`]'s does (read on a thread of its own, once it
    /// timed out: the async thread never blocks).
    fn barrier_async(
        self: Arc<Self>,
        key: String,
        world_size: i64,
        timeout: Option<Duration>,
    ) -> Result<Work> {
        let timeout = timeout.unwrap_or_else(|| self.timeout());
        let wire = user_key(&key);
        self.note_arrival(&wire)?;
        let plan = Plan::Barrier {
            key: wire.clone(),
            world_size,
        };
        let barrier = self.conns.start(plan, timeout, false, no_result)?;
        if self.conns.member().is_none() {
            return Ok(barrier);
        }
        let (promise, work) = Promise::new();
        let abandoned = barrier.clone();
        promise.on_release(Box::new(move || abandoned.abort()));
        let promise = Arc::new(promise);
        barrier.add_done_callback(Box::new(move |done: &Work| match done.error() {
            Some(e) if e.status() == Status::Timeout => {
                let named = {
                    let promise = promise.clone();
                    move || promise.complete(Err(self.name_the_missing(e, &wire, world_size)))
                };
                let spawned = std::thread::Builder::new()
                    .name("dc-roll-call".into())
                    .spawn(named);
                if let Err(spawn) = spawned {
                    let why = format!("barrier timeout; naming the missing: {spawn}");
                    promise.complete(Err(Error::timeout(why)));
                }
            }
            Some(e) => promise.complete(Err(e)),
            None => promise.complete(Ok(None)),
        }));
        Ok(work)
    }

    fn timeout(&self) -> Duration {
        *self.timeout.lock()
    }

    fn set_timeout(&self, timeout: Duration) {
        *self.timeout.lock() = timeout;
    }

    fn clone_store(&self) -> Result<Arc<dyn Store>> {
        let timeout = self.timeout();
        let conns = Connections::connect(self.conns.endpoint().clone(), deadline_of(timeout))?;
        Ok(Arc::new(TcpStore {
            server: self.server.clone(),
            host: self.host.clone(),
            port: self.port,
            world_size: self.world_size,
            conns: Arc::new(conns),
            timeout: Mutex::new(timeout),
            counters: Counters::default(),
            // A new connection has no session.
            leased: false,
        }))
    }
}

#[cfg(test)]
mod tests;
