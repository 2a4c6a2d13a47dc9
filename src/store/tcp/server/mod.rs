//! The TCPStore server, speaking PyTorch's protocol (see
//! [`super::protocol`]): a socket-free core ([`state`]) that holds the
//! sessions, waits and keys (in a [`backend`]), driven by one thread
//! running a mio event loop ([`event_loop`]) that only moves bytes.
//!
//! # What one connection can make the server hold
//! - a request still arriving: at most [`Limits::max_request_len`] bytes
//!   (128 MiB by default), plus about 48 bytes of bookkeeping per key it
//!   names (at most [`Limits::max_keys_per_request`], 128 Ki);
//! - replies not yet written: the connection is not read while more than
//!   256 KiB is queued, so at most that plus one reply. A
//!   reply naming many values (MULTI_GET) holds references to them (16
//!   bytes each) and encodes 64 KiB at a time as the socket drains;
//! - bytes read but not yet parsed while paused: at most one read (64 KiB);
//! - each pending wait: its keys.
//!
//! A connection still in its handshake (on a server with a secret or TLS)
//! holds much less: requests of at most 81 bytes, 4 KiB of unsent replies,
//! 256 bytes read at a time, and its TLS session; at most
//! [`max_pending`] of them at once (128 by default), each for at most
//! [`timeout`] (10 s).
//!
//! [`max_pending`]: crate::security::access::HandshakeLimits::max_pending
//! [`timeout`]: crate::security::access::HandshakeLimits::timeout
//!
//! Each turn of the loop reads at most 64 KiB from a connection (1 MiB
//! when receiving a large value straight into place) before serving the
//! others, and writes a connection's replies as soon as its input has
//! been handled.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpListener;
use mio::{Interest, Poll, Waker};

use super::protocol::Limits;
use crate::error::{Error, Result};
pub use crate::net::listen::{check_tcp_socket, take_inherited_socket};
use crate::net::listen::{listen, listen_error, listen_on_socket, prepare_listener};
use crate::net::reactor::{Acceptor, LoopThread, LISTENER, WAKER};
use crate::security::access::AccessPolicy;

pub(crate) mod backend;
mod event_loop;
mod metrics;
mod metrics_http;
pub(crate) mod sessions;
mod state;
mod waits;

pub use crate::net::reactor::raise_open_files_limit;
pub use metrics_http::{MetricsEndpoint, MetricsSource};

/// How a server gets its listening socket.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The port; 0 picks a free one.
    pub port: u16,
    /// Listen only on this address; `None`: every interface, dual-stack.
    pub bind_address: Option<IpAddr>,
    /// Serve on this TCP socket instead of binding: listening, or bound
    /// and not yet listening (the server listens on it, as PyTorch's). The
    /// server keeps a duplicate; the socket closes with the last of them.
    pub listen_fd: Option<Arc<OwnedFd>>,
    /// Request size limits.
    pub limits: Limits,
    /// Answer distcore clients' HELLO probe and accept the extension
    /// commands (off: behave exactly as a PyTorch server).
    pub extensions: bool,
    /// Where the keys live.
    pub backend: ServerBackend,
    /// Who may connect, and what they must prove (default: anyone, with
    /// no authentication, as PyTorch's server).
    pub access: AccessPolicy,
    /// What all clients together may make the server hold (default: no
    /// quotas).
    pub quotas: Quotas,
    /// The server serves one job (docs/liveness.md, "PyTorch's clients"):
    /// when a member of a session group fails, the connections without a
    /// session that are blocked in a wait or barrier are told too — a
    /// distcore client's wait fails with the failure, a PyTorch client's
    /// connection is closed (its protocol has no way to say more), so
    /// PyTorch raises at once instead of after its timeout. Default: off.
    pub one_job: bool,
}

/// What all clients together may make a server hold; `None`: no limit.
/// A connection past its quota is closed as soon as it is accepted; a
/// write past the key or byte quota is refused (DC_ERR_QUOTA_EXCEEDED for
/// distcore clients; PyTorch's clients, which cannot be told, lose their
/// connection as PyTorch's own server does for a refused request) and the
/// server goes on serving. Each refusal is logged and counted in the
/// metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quotas {
    /// Open connections being served; on a server with a secret or TLS,
    /// those still in their handshake count against
    /// [`AccessPolicy::handshakes`] instead, until admitted.
    pub max_connections: Option<usize>,
    /// Keys holding a value or a queue.
    pub max_keys: Option<usize>,
    /// Bytes of keys and values (queue elements included; on etcd, values
    /// only, as far as this server has seen them).
    pub max_stored_bytes: Option<u64>,
}

/// Where a server keeps its keys.
#[derive(Debug, Clone, Default)]
pub enum ServerBackend {
    /// In this process's memory (PyTorch's TCPStore server).
    #[default]
    Memory,
    /// Under a prefix of an etcd cluster, which any number of servers may
    /// share: each sees the others' writes, and a server that dies loses
    /// nothing. Values are limited to 1 MiB (within etcd's request limit),
    /// or less if [`ServerOptions::limits`] says so.
    Etcd(crate::store::etcd::EtcdStoreOptions),
}

/// The largest value a server on etcd accepts: 1 MiB, within etcd's
/// default request limit (`--max-request-bytes`, 1.5 MiB) with room for
/// the key and the transaction around it.
pub(crate) const ETCD_MAX_VALUE_LEN: usize = 1 << 20;

/// A snapshot of a server's load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Open client connections.
    pub connections: usize,
    /// Pending WAIT, WAIT_GET and BARRIER requests.
    pub pending_waits: usize,
    /// Keys holding a value or a queue.
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
            backend: ServerBackend::Memory,
            access: AccessPolicy::default(),
            quotas: Quotas::default(),
            one_job: false,
        }
    }
}

/// A running server. Dropping it stops the event loop and closes every
/// connection.
pub struct Server {
    local_addr: SocketAddr,
    metrics: Arc<metrics::Metrics>,
    running: LoopThread,
}

impl Server {
    /// Binds (or takes over the listening socket) and starts the event loop.
    pub fn start(options: ServerOptions) -> Result<Server> {
        crate::runtime::logging::init();
        options.access.check()?;
        let std_listener = match options.listen_fd {
            Some(fd) => fd
                .try_clone()
                .and_then(listen_on_socket)
                .map_err(|e| Error::network(format!("listening socket: {e}")))?,
            None => listen(options.bind_address, options.port)
                .map_err(|e| listen_error(options.bind_address, options.port, &e))?,
        };
        prepare_listener(&std_listener)
            .map_err(|e| Error::network(format!("listening socket: {e}")))?;
        let local_addr = std_listener
            .local_addr()
            .map_err(|e| Error::network(format!("listening socket: {e}")))?;
        let port = local_addr.port();
        let poll = Poll::new().map_err(io_error)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(io_error)?);
        let mut acceptor = Acceptor::new(TcpListener::from_std(std_listener), "TCPStore server");
        poll.registry()
            .register(acceptor.listener(), LISTENER, Interest::READABLE)
            .map_err(io_error)?;
        let stop = Arc::new(AtomicBool::new(false));
        let access = &options.access;
        let max_handshakes = access
            .requires_handshake()
            .then_some(access.handshakes.max_pending);
        let metrics = Arc::new(metrics::Metrics::new(options.quotas, max_handshakes));
        let holds = match &options.backend {
            ServerBackend::Memory => "keys in memory".to_owned(),
            ServerBackend::Etcd(etcd) => format!(
                "keys on etcd at {} under {:?}",
                etcd.endpoints.join(","),
                etcd.prefix
            ),
        };
        log::info!(
            "TCPStore server listening on {local_addr}, {holds}; {}",
            options.access.describe()
        );
        let run = Running {
            poll,
            acceptor,
            metrics: metrics.clone(),
            stop,
            waker: waker.clone(),
            thread_name: format!("dc-tcpstore-{port}"),
            access: options.access,
            quotas: options.quotas,
            one_job: options.one_job,
        };
        let mut limits = options.limits;
        let running = match options.backend {
            ServerBackend::Memory => run.spawn(
                backend::MemoryBackend::new(limits.max_value_len),
                limits,
                options.extensions,
            )?,
            ServerBackend::Etcd(etcd) => {
                limits.max_value_len = limits.max_value_len.min(ETCD_MAX_VALUE_LEN);
                let backend =
                    backend::etcd::EtcdBackend::start(etcd, limits.max_value_len, waker.clone())?;
                run.spawn(backend, limits, options.extensions)?
            }
        };
        Ok(Server {
            local_addr,
            metrics,
            running,
        })
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The server's load as of its last event.
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            connections: self.metrics.open_connections() as usize,
            pending_waits: self.metrics.waiters() as usize,
            keys: self.metrics.keys() as usize,
        }
    }

    /// The server's metrics in Prometheus's text format (every name
    /// prefixed `distcore_`; the table is in the `metrics` module's doc
    /// and docs/server.md), as of its last event.
    pub fn metrics_text(&self) -> String {
        self.metrics.render()
    }

    /// What renders the metrics from any thread, for as long as it is
    /// kept (for a [`MetricsEndpoint`]).
    pub fn metrics_source(&self) -> MetricsSource {
        MetricsSource(self.metrics.clone())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.running.stop();
        log::info!("TCPStore server on {} stopped", self.local_addr);
    }
}

/// What a server's event loop runs on, before its backend is chosen.
struct Running {
    poll: Poll,
    acceptor: Acceptor,
    metrics: Arc<metrics::Metrics>,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread_name: String,
    access: AccessPolicy,
    quotas: Quotas,
    one_job: bool,
}

impl Running {
    /// Starts the event loop's thread, serving the keys of `backend`.
    fn spawn<B: backend::Backend + 'static>(
        self,
        backend: B,
        limits: Limits,
        extensions: bool,
    ) -> Result<LoopThread> {
        let core = state::ServerCore::new(backend, limits, extensions, Instant::now())
            .with_secret(self.access.secret.clone())
            .with_quotas(self.quotas)
            .with_one_job(self.one_job)
            .with_handshake_limits(self.access.handshakes)
            .with_metrics(self.metrics);
        let polls = event_loop::Polls {
            now: self.poll,
            late: Poll::new().map_err(io_error)?,
        };
        let mut event_loop =
            event_loop::EventLoop::new(polls, self.acceptor, core, self.stop.clone(), self.access);
        LoopThread::spawn(
            "TCPStore server",
            self.thread_name,
            self.stop,
            self.waker,
            move || event_loop.run(),
        )
    }
}

fn io_error(e: io::Error) -> Error {
    Error::internal(format!("event loop: {e}"))
}

#[cfg(test)]
mod tests;
