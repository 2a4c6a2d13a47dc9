//! `distcore proxy`: a node-local sidecar that serves PyTorch's TCPStore
//! protocol on loopback and relays every connection to a remote distcore
//! server over one upstream connection of its own, through TLS and the
//! shared secret. Unmodified PyTorch clients (torchrun, vLLM, SGLang) get
//! encryption, authentication and the server's guards without a change.
//!
//! One upstream connection per local one, not a multiplexed few: the
//! server then sees each client as it is (its waits, its queue pops, its
//! connection closing when the process dies, which the server's one-job
//! mode reads as a failure), and its per-connection guards apply. A
//! connection costs one TLS handshake when it opens; PyTorch's clients
//! open one per store and keep it.
//!
//! The protocol logic is the socket-free [`relay`]; the [`connector`]
//! makes upstream connections with the client's own handshake, off the
//! event loop; the [`event_loop`] moves bytes.
//!
//! # What one local connection can make the proxy hold
//! - requests on their way upstream: at most [`OUTBOX_LIMIT`] (256 KiB)
//!   queued, plus one read ([`READ_CHUNK`], 64 KiB), and its TLS session's
//!   64 KiB; past that the local connection is not read;
//! - replies on their way to the local client: the same bounds, the other
//!   way: past them the upstream connection is not read;
//! - at most [`MAX_OWED`] (4,096) requests sent whose replies have not
//!   come back (plus those of one read): past that it is not read;
//! - a request being framed: a few bytes (keys and values are passed on,
//!   never held), plus 24 bytes per key of a list still arriving.
//!
//! Each turn reads at most one 64 KiB chunk from each side of a pair
//! before serving the others. At most `max_connections` local
//! connections are served (the next are closed as soon as accepted); out
//! of file descriptors the proxy keeps accepting and closing, as the
//! server does.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use mio::net::TcpListener;
use mio::{Interest, Poll, Waker};

use super::client::{deadline_of, Conn, Endpoint};
use crate::error::{Error, Result, Status};
use crate::net::listen::{listen, listen_error, prepare_listener};
use crate::net::reactor::{Acceptor, LoopThread, LISTENER, WAKER};
use crate::security::auth::Secret;
use crate::security::tls::TlsClient;

mod connector;
mod event_loop;
mod relay;

/// Bytes read from one socket per turn.
const READ_CHUNK: usize = 64 << 10;

/// Bytes queued for one socket past which the other side of its pair is
/// not read.
const OUTBOX_LIMIT: usize = 256 << 10;

/// Requests relayed whose replies have not come back, past which a local
/// connection is not read.
const MAX_OWED: usize = 4096;

/// What a proxy serves and where it relays to.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Address to listen on for local clients (loopback by default: the
    /// proxy serves PyTorch's protocol in clear).
    pub bind_address: IpAddr,
    /// Port to listen on (0 picks a free one).
    pub port: u16,
    /// The distcore server relayed to.
    pub upstream_host: String,
    /// Its port.
    pub upstream_port: u16,
    /// The server's shared secret (every upstream connection authenticates
    /// with it, and checks the server's proof).
    pub secret: Option<Secret>,
    /// Connect upstream over TLS, trusting these CAs (and presenting this
    /// client certificate, if it has one).
    pub tls_client: Option<TlsClient>,
    /// How long an upstream connection may take, retries included, before
    /// its local connection is closed.
    pub connect_timeout: Duration,
    /// Most local connections served at once.
    pub max_connections: usize,
    /// Upstream connections being made at once (one thread each).
    pub connect_threads: usize,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            bind_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 29500,
            upstream_host: String::new(),
            upstream_port: 29500,
            secret: None,
            tls_client: None,
            connect_timeout: Duration::from_secs(30),
            max_connections: 4096,
            connect_threads: 4,
        }
    }
}

/// A running proxy; dropping it stops it (local connections are closed).
pub struct Proxy {
    local_addr: SocketAddr,
    _running: LoopThread,
}

/// How long the probe at start may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

impl Proxy {
    /// Binds and starts relaying. One connection to the upstream server
    /// first checks the settings: a server that refuses the secret or the
    /// TLS settings, or that is not a distcore server, fails the start
    /// (`DC_ERR_PERMISSION_DENIED`, `DC_ERR_NOT_SUPPORTED`, ...); one not
    /// reachable yet is only logged (a sidecar may start first).
    pub fn start(options: ProxyOptions) -> Result<Proxy> {
        crate::runtime::logging::init();
        if options.upstream_host.is_empty() {
            return Err(Error::invalid_argument(
                "the proxy needs an upstream server",
            ));
        }
        if options.max_connections == 0 {
            return Err(Error::invalid_argument(
                "max_connections must be at least 1",
            ));
        }
        let endpoint = Endpoint {
            host: options.upstream_host.clone(),
            port: options.upstream_port,
            secret: options.secret.clone(),
            tls: options.tls_client.clone(),
        };
        probe(&endpoint)?;
        let address = Some(options.bind_address);
        let std_listener =
            listen(address, options.port).map_err(|e| listen_error(address, options.port, &e))?;
        prepare_listener(&std_listener)
            .map_err(|e| Error::network(format!("listening socket: {e}")))?;
        let local_addr = std_listener
            .local_addr()
            .map_err(|e| Error::network(format!("listening socket: {e}")))?;
        let poll = Poll::new().map_err(io_error)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(io_error)?);
        let mut acceptor = Acceptor::new(TcpListener::from_std(std_listener), "proxy");
        poll.registry()
            .register(acceptor.listener(), LISTENER, Interest::READABLE)
            .map_err(io_error)?;
        let connector = connector::Connector::start(
            endpoint,
            options.connect_timeout,
            options.connect_threads,
            waker.clone(),
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut event_loop = event_loop::EventLoop::new(
            poll,
            acceptor,
            connector,
            stop.clone(),
            options.max_connections,
        );
        let running = LoopThread::spawn(
            "proxy",
            format!("dc-proxy-{}", local_addr.port()),
            stop,
            waker,
            move || event_loop.run(),
        )?;
        log::info!(
            "proxy on {local_addr} relaying to {}:{}{}{}",
            options.upstream_host,
            options.upstream_port,
            if options.tls_client.is_some() {
                " over TLS"
            } else {
                ""
            },
            if options.secret.is_some() {
                " with the secret"
            } else {
                ""
            },
        );
        Ok(Proxy {
            local_addr,
            _running: running,
        })
    }

    /// The address local clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The port local clients connect to.
    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }
}

/// Connects once: a refusal (the secret, TLS, not a distcore server) is
/// an error; a server not there yet only a warning.
fn probe(endpoint: &Endpoint) -> Result<()> {
    let probed = Conn::connect(endpoint, deadline_of(PROBE_TIMEOUT)).and_then(Conn::into_relayed);
    match probed {
        Ok(_) => Ok(()),
        Err(e) if e.status() == Status::Network => {
            log::warn!(
                "proxy: the upstream server {}:{} is not reachable yet: {e}",
                endpoint.host,
                endpoint.port
            );
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn io_error(e: io::Error) -> Error {
    Error::internal(format!("proxy event loop: {e}"))
}
