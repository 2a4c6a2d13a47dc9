//! The `distcore` command line: a standalone store server, an inspector, and
//! a demo of workers that rendezvous, exchange data and report through Works.

#![deny(unsafe_code)]

use std::process::{Child, Command as Process, ExitCode};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use std::path::PathBuf;

mod parameter_server;

use clap::{Parser, Subcommand};
use distcore::printable::printable;
use distcore::runtime::signals::TerminationSignals;
use distcore::security::access::{AccessPolicy, HandshakeLimits, Network};
use distcore::security::auth::Secret;
use distcore::security::tls::{TlsClient, TlsFiles};
use distcore::store::tcp::protocol::Limits;
use distcore::store::tcp::server::{
    raise_open_files_limit, take_inherited_socket, MetricsEndpoint, ServerBackend,
};
use distcore::store::tcp::{Proxy, ProxyOptions, Quotas, Server, ServerOptions};
use distcore::store::tcp::{SessionListing, SessionOptions};
use distcore::store::{
    elastic, EtcdStore, EtcdStoreOptions, FileStore, HashStore, PrefixStore, Store, TcpStore,
    TcpStoreOptions,
};
use distcore::{Error, OpType, Result, Work};

#[derive(Parser)]
#[command(
    name = "distcore",
    version,
    about = "The coordination plane of torch.distributed, without PyTorch"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the demo's workers meet.
#[derive(Clone)]
enum DemoStore {
    /// Worker processes talk TCP to a TCPStore server embedded in this process.
    Tcp,
    /// Worker threads share an in-process HashStore.
    Hash,
    /// Worker processes share a FileStore at this path.
    File(PathBuf),
    /// Worker processes share an EtcdStore: `etcd://HOST:PORT[,...]/PREFIX`.
    Etcd(String),
}

fn parse_demo_store(text: &str) -> std::result::Result<DemoStore, String> {
    match text {
        "tcp" => Ok(DemoStore::Tcp),
        "hash" => Ok(DemoStore::Hash),
        _ if text.starts_with("etcd://") => EtcdStoreOptions::from_url(text)
            .map(|_| DemoStore::Etcd(text.to_owned()))
            .map_err(|e| e.message().to_owned()),
        _ => match text.strip_prefix("file:") {
            Some(path) if !path.is_empty() => Ok(DemoStore::File(path.into())),
            _ => Err(format!(
                "'{text}': expected tcp, hash, file:PATH or etcd://HOST:PORT[,HOST:PORT]/PREFIX"
            )),
        },
    }
}

/// `--listen-fd`: a descriptor of this process that is a TCP socket,
/// listening or bound, taken over (anything else is refused and left
/// alone).
fn parse_listen_fd(text: &str) -> std::result::Result<Arc<std::os::fd::OwnedFd>, String> {
    let fd: std::os::fd::RawFd = text
        .parse()
        .ok()
        .filter(|fd| *fd >= 0)
        .ok_or_else(|| format!("'{text}': expected a descriptor number (0 or more)"))?;
    take_inherited_socket(fd)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// `--backend`: memory, or etcd://HOST:PORT[,HOST:PORT...]/PREFIX.
fn parse_backend(text: &str) -> std::result::Result<ServerBackend, String> {
    match text {
        "memory" => Ok(ServerBackend::Memory),
        _ if text.starts_with("etcd://") => EtcdStoreOptions::from_url(text)
            .map(ServerBackend::Etcd)
            .map_err(|e| e.message().to_owned()),
        _ => Err(format!(
            "'{text}': expected memory or etcd://HOST:PORT[,HOST:PORT]/PREFIX"
        )),
    }
}

/// How a demo worker process reaches the store: `tcp:PORT`, `file:PATH` or
/// an etcd URL.
fn connect_worker_store(spec: &str, world: u32, timeout: Duration) -> Result<Arc<dyn Store>> {
    if let Some(port) = spec.strip_prefix("tcp:") {
        let port = port
            .parse()
            .map_err(|_| Error::invalid_argument(format!("bad port in '{spec}'")))?;
        let store = TcpStore::new(TcpStoreOptions {
            port,
            world_size: Some(world + 1),
            timeout,
            ..TcpStoreOptions::default()
        })?;
        return Ok(Arc::new(store));
    }
    if let Some(path) = spec.strip_prefix("file:") {
        let store = FileStore::new(path, Some(world + 1))?;
        store.set_timeout(timeout);
        return Ok(Arc::new(store));
    }
    if spec.starts_with("etcd://") {
        return Ok(Arc::new(EtcdStore::new(EtcdStoreOptions {
            timeout,
            ..EtcdStoreOptions::from_url(spec)?
        })?));
    }
    Err(Error::invalid_argument(format!(
        "'{spec}': expected tcp:PORT, file:PATH or etcd://..."
    )))
}

#[derive(Subcommand)]
enum Command {
    /// Workers rendezvous through an embedded store with torchelastic's
    /// helpers, exchange data, and hand results back as Works.
    Demo {
        /// Number of workers.
        #[arg(long, default_value_t = 4)]
        workers: u32,
        /// Where the workers meet: tcp (worker processes, embedded TCPStore
        /// server), hash (worker threads, HashStore), file:PATH (worker
        /// processes, FileStore) or etcd://HOST:PORT[,HOST:PORT]/PREFIX
        /// (worker processes, EtcdStore; the run uses PREFIX/demo-PID).
        #[arg(long, value_parser = parse_demo_store, default_value = "tcp")]
        store: DemoStore,
        /// Seconds any step may take before the demo fails.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Run a standalone TCPStore server (PyTorch-compatible) until SIGINT or SIGTERM.
    Serve {
        /// Address to listen on: loopback unless told otherwise; 0.0.0.0
        /// for every IPv4 interface, :: for every interface (dual-stack).
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// Port (0 picks a free one).
        #[arg(long, default_value_t = 29500)]
        port: u16,
        /// Report when this many clients have counted themselves in `init/`
        /// (watched by a client of its own on loopback: with an allow-list
        /// it must admit 127.0.0.1; with TLS it needs --tls-ca).
        #[arg(long)]
        world_size: Option<u32>,
        /// The server serves one job (implied by --world-size): when a
        /// member of a session group fails, clients without a session that
        /// are blocked in a wait are told too — PyTorch's clients by
        /// closing their connection, so they raise at once.
        #[arg(long)]
        one_job: bool,
        /// Largest value accepted, in bytes (requests up to twice that).
        #[arg(long, default_value_t = distcore::store::tcp::protocol::Limits::default().max_value_len)]
        max_value_size: usize,
        /// Serve on this TCP socket, listening or only bound (systemd
        /// socket activation, a launcher that reserved the port) instead
        /// of binding; --host and --port are then ignored.
        #[arg(long, value_parser = parse_listen_fd)]
        listen_fd: Option<Arc<std::os::fd::OwnedFd>>,
        /// Where the keys live: memory (this process), or
        /// etcd://HOST:PORT[,HOST:PORT...]/PREFIX (an etcd cluster's v3
        /// API, under PREFIX: any number of servers on the same cluster and
        /// prefix serve the same store, and a server that dies loses
        /// nothing; values up to 1 MiB).
        #[arg(long, value_parser = parse_backend, default_value = "memory")]
        backend: ServerBackend,
        /// With an etcd backend: seconds an etcd request may take (a member
        /// down, a leader election) before the client's request fails.
        #[arg(long, default_value_t = 30)]
        backend_timeout: u64,
        #[command(flatten)]
        guards: Box<Guards>,
    },
    /// Serve PyTorch's TCPStore protocol on loopback and relay every
    /// connection to a distcore server over TLS and the shared secret
    /// (a sidecar for clients that can do neither), until SIGINT or SIGTERM.
    Proxy {
        /// The distcore server relayed to, as HOST:PORT ([::1]:29500 for IPv6).
        #[arg(long)]
        upstream: String,
        /// Address local clients connect to (loopback unless told otherwise:
        /// what they send travels in clear to the proxy).
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// Port local clients connect to (0 picks a free one).
        #[arg(long, default_value_t = 29500)]
        port: u16,
        /// Seconds an upstream connection may take, retries included,
        /// before its local connection is closed.
        #[arg(long, value_parser = parse_seconds, default_value = "30")]
        connect_timeout: Duration,
        /// Most local connections served at once (further ones are closed
        /// at once).
        #[arg(long, default_value_t = ProxyOptions::default().max_connections)]
        max_connections: usize,
        #[command(flatten)]
        secret: SecretArgs,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Show a TCPStore server's stats and liveness sessions (a distcore
    /// server's), then its keys with their sizes and values.
    Inspect {
        /// The server, as HOST:PORT ([::1]:29500 for IPv6).
        address: String,
        /// Bytes of each value to show.
        #[arg(long, default_value_t = 64)]
        width: usize,
        #[command(flatten)]
        secret: SecretArgs,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// One worker process of `demo` (started by it).
    #[command(hide = true)]
    DemoWorker {
        #[arg(long)]
        connect: String,
        #[command(flatten)]
        place: DemoPlace,
    },
    /// One member process of `demo`'s liveness act (started by it).
    #[command(hide = true)]
    DemoMember {
        #[arg(long)]
        port: u16,
        #[command(flatten)]
        place: DemoPlace,
    },
}

/// Where a process `demo` starts stands: its rank, the number of its
/// kind, and the seconds any step may take.
#[derive(clap::Args, Clone, Copy)]
struct DemoPlace {
    #[arg(long)]
    rank: u32,
    #[arg(long)]
    world: u32,
    #[arg(long)]
    timeout: u64,
}

impl DemoPlace {
    /// Rank `rank` of `world`, each step within `timeout`.
    fn new(rank: u32, world: u32, timeout: Duration) -> DemoPlace {
        DemoPlace {
            rank,
            world,
            timeout: timeout.as_secs(),
        }
    }

    /// The arguments that say it.
    fn args(&self) -> Vec<String> {
        let values = [self.rank, self.world].map(u64::from);
        ["--rank", "--world", "--timeout"]
            .into_iter()
            .zip(values.into_iter().chain([self.timeout]))
            .flat_map(|(flag, value)| [flag.to_owned(), value.to_string()])
            .collect()
    }
}

/// Where the shared secret comes from (never from the command line, which
/// other users of the machine can read).
#[derive(clap::Args, Clone)]
struct SecretArgs {
    /// Read the shared secret from this file (one trailing newline is
    /// dropped): clients must prove they hold it, and the peer must too.
    #[arg(long, conflicts_with = "secret_env")]
    secret_file: Option<PathBuf>,
    /// Read the shared secret from this environment variable.
    #[arg(long)]
    secret_env: Option<String>,
}

impl SecretArgs {
    fn secret(&self) -> Result<Option<Secret>> {
        match (&self.secret_file, &self.secret_env) {
            (Some(path), _) => Secret::from_file(path).map(Some),
            (None, Some(name)) => Secret::from_env(name).map(Some),
            (None, None) => Ok(None),
        }
    }
}

/// TLS: PEM files (see docs/security.md).
#[derive(clap::Args, Clone)]
struct TlsArgs {
    /// A certificate chain (its own certificate first): `serve` serves TLS
    /// with it; a client presents it to servers that verify clients.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A client: connect over TLS, trusting these CA certificates.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// `serve` with --tls-cert: require a client certificate from these CAs.
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
    /// A client: check the server's certificate against this name instead
    /// of the host connected to.
    #[arg(long)]
    tls_server_name: Option<String>,
}

impl TlsArgs {
    fn files(&self) -> TlsFiles {
        TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: self.tls_ca.clone(),
            client_ca: self.tls_client_ca.clone(),
            server_name: self.tls_server_name.clone(),
        }
    }
}

/// Who may connect to `serve`, what they may make it hold, and its metrics.
#[derive(clap::Args)]
struct Guards {
    /// Networks clients may connect from, as CIDR blocks
    /// (10.0.0.0/8,fd00::/8,192.0.2.7); others are disconnected at once,
    /// PyTorch's clients included. Default: any.
    #[arg(long, value_parser = parse_networks)]
    allow: Option<Networks>,
    #[command(flatten)]
    secret: SecretArgs,
    /// With a secret or TLS: networks whose clients need neither
    /// authenticate nor use TLS (PyTorch's clients, which can do neither).
    #[arg(long, value_parser = parse_networks)]
    allow_unauthenticated: Option<Networks>,
    #[command(flatten)]
    tls: TlsArgs,
    /// Most open connections being served (further ones are closed at
    /// once); with a secret or TLS, connections still in their handshake
    /// count against --max-handshakes instead.
    #[arg(long)]
    max_connections: Option<usize>,
    /// With a secret or TLS: most connections in their handshake at once
    /// (not yet through TLS and authentication; further ones are closed at
    /// once).
    #[arg(long, default_value_t = HandshakeLimits::default().max_pending)]
    max_handshakes: usize,
    /// With a secret or TLS: seconds a connection has to finish its
    /// handshake (TLS and authentication) before it is closed.
    #[arg(long, value_parser = parse_seconds, default_value = "10")]
    handshake_timeout: Duration,
    /// Most keys holding a value or a queue (writes past it are refused).
    #[arg(long)]
    max_keys: Option<usize>,
    /// Most bytes of keys, values and queue elements (writes past it are
    /// refused).
    #[arg(long)]
    max_stored_bytes: Option<u64>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (to peers --allow
    /// admits).
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
}

/// A list of networks given as one argument (`a,b,c`).
#[derive(Clone)]
struct Networks(Vec<Network>);

/// A list naming no network is refused: `--allow ""` must not mean
/// "every network" (to let any in, leave the option out).
fn parse_networks(text: &str) -> std::result::Result<Networks, String> {
    match Network::parse_list(text) {
        Ok(list) if list.is_empty() => Err(format!(
            "'{text}' names no network (leave the option out instead)"
        )),
        Ok(list) => Ok(Networks(list)),
        Err(e) => Err(e.message().to_owned()),
    }
}

/// A duration in seconds, fractions allowed (`0.5`), above zero.
fn parse_seconds(text: &str) -> std::result::Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| format!("'{text}' is not a number of seconds above zero"))
}

/// `println!` for a long-running server: a reader that went away (a
/// launcher that read the first line and closed the pipe) must not stop it.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` in the same spirit.
macro_rules! say_err {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

fn main() -> ExitCode {
    let outcome = match Cli::parse().command {
        Command::Demo {
            workers,
            store,
            timeout,
        } => demo(workers, store, Duration::from_secs(timeout)),
        Command::Serve {
            host,
            port,
            world_size,
            one_job,
            max_value_size,
            listen_fd,
            mut backend,
            backend_timeout,
            guards,
        } => guards.secret.secret().and_then(|secret| {
            let (tls, watcher_tls) = guards.tls.files().load(true)?;
            serve(
                ServerOptions {
                    port,
                    // `::` is every interface, IPv4 included (dual-stack).
                    bind_address: (host != std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED))
                        .then_some(host),
                    listen_fd,
                    limits: Limits::with_max_value_len(max_value_size),
                    backend: {
                        if let ServerBackend::Etcd(etcd) = &mut backend {
                            etcd.timeout = Duration::from_secs(backend_timeout);
                        }
                        backend
                    },
                    access: AccessPolicy {
                        allow: guards.allow.map(|n| n.0).unwrap_or_default(),
                        secret,
                        allow_unauthenticated: guards
                            .allow_unauthenticated
                            .map(|n| n.0)
                            .unwrap_or_default(),
                        tls,
                        handshakes: HandshakeLimits {
                            timeout: guards.handshake_timeout,
                            max_pending: guards.max_handshakes,
                        },
                    },
                    quotas: Quotas {
                        max_connections: guards.max_connections,
                        max_keys: guards.max_keys,
                        max_stored_bytes: guards.max_stored_bytes,
                    },
                    one_job: one_job || world_size.is_some(),
                    ..ServerOptions::default()
                },
                world_size.map(|world| (world, watcher_tls)),
                guards.metrics,
            )
        }),
        Command::Proxy {
            upstream,
            host,
            port,
            connect_timeout,
            max_connections,
            secret,
            tls,
        } => secret.secret().and_then(|secret| {
            let (_, tls) = tls.files().load(false)?;
            let (upstream_host, upstream_port) = split_address(&upstream)?;
            proxy(ProxyOptions {
                bind_address: host,
                port,
                upstream_host,
                upstream_port,
                secret,
                tls_client: tls,
                connect_timeout,
                max_connections,
                ..ProxyOptions::default()
            })
        }),
        Command::Inspect {
            address,
            width,
            secret,
            tls,
        } => secret.secret().and_then(|secret| {
            let (_, tls) = tls.files().load(false)?;
            inspect(&address, width, secret, tls)
        }),
        Command::DemoWorker { connect, place } => demo_worker_process(&connect, place),
        Command::DemoMember { port, place } => demo_member_process(port, place),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("distcore: {e} ({})", e.status());
            ExitCode::FAILURE
        }
    }
}

/// One worker's job: join the barrier, publish a shard, gather everyone's,
/// and return the global sum (decimal text).
fn worker(store: Arc<dyn Store>, rank: i64, world: i64, timeout: Duration) -> Result<Vec<u8>> {
    let job: Arc<dyn Store> = Arc::new(PrefixStore::new("demo", store));
    elastic::barrier(&*job, world, "rendezvous", timeout)?;
    let shard: i64 = (1..=100).map(|i| i * (rank + 1)).sum();
    let all = elastic::synchronize(
        &*job,
        shard.to_string().as_bytes(),
        rank,
        world,
        "shards/",
        timeout,
    )?;
    let total: i64 = all
        .iter()
        .map(|v| String::from_utf8_lossy(v).parse::<i64>().unwrap_or(0))
        .sum();
    Ok(total.to_string().into_bytes())
}

fn demo_worker_process(connect: &str, place: DemoPlace) -> Result<()> {
    let DemoPlace { rank, world, .. } = place;
    let timeout = Duration::from_secs(place.timeout);
    let store = connect_worker_store(connect, world, timeout)?;
    let total = worker(store.clone(), i64::from(rank), i64::from(world), timeout)?;
    store.set(&format!("demo/result/{rank}"), &total)?;
    parameter_server::serve(store, rank as u16 + 1, world as u16 + 1, timeout)
}

/// The group of the demo's liveness act.
const DEMO_GROUP: &str = "demo/liveness/";

/// One member of the liveness act: opens a session, says it is ready, and
/// blocks in a get of a key nobody sets, until the server tells it that a
/// member failed (what it prints); anything else fails the demo.
fn demo_member_process(port: u16, place: DemoPlace) -> Result<()> {
    let DemoPlace { rank, world, .. } = place;
    let timeout = Duration::from_secs(place.timeout);
    let store = TcpStore::new(TcpStoreOptions {
        port,
        timeout,
        ..TcpStoreOptions::default()
    })?;
    store.open_session(&SessionOptions {
        world_size: Some(world),
        ..SessionOptions::new(DEMO_GROUP, rank)
    })?;
    store.set(&format!("{DEMO_GROUP}ready/{rank}"), b"1")?;
    match store.get(&format!("{DEMO_GROUP}never-set")) {
        Err(e) if e.status() == distcore::Status::PeerFailed => {
            println!("  rank {rank} told: {}", e.message());
            // Leaving gracefully: this exit is no failure of its own.
            store.close_session()
        }
        Err(e) => Err(e),
        Ok(_) => Err(Error::internal("a key nobody sets was read")),
    }
}

/// The liveness act of the TCP demo: `workers` member processes open
/// sessions and block; the last is killed (SIGKILL); the others are told
/// at once, naming it.
fn liveness_act(store: &Arc<dyn Store>, port: u16, workers: u32, timeout: Duration) -> Result<()> {
    println!("Liveness: {workers} member processes block in a get; the last is killed (SIGKILL)");
    let exe = std::env::current_exe().map_err(|e| Error::internal(format!("own path: {e}")))?;
    let mut members = (0..workers)
        .map(|rank| {
            Process::new(&exe)
                .args(["demo-member", "--port", &port.to_string()])
                .args(DemoPlace::new(rank, workers, timeout).args())
                .spawn()
                .map_err(|e| Error::internal(format!("starting member {rank}: {e}")))
        })
        .collect::<Result<Vec<Child>>>()?;
    let ready: Vec<String> = (0..workers)
        .map(|r| format!("{DEMO_GROUP}ready/{r}"))
        .collect();
    let ready: Vec<&str> = ready.iter().map(String::as_str).collect();
    store.wait(&ready, Some(timeout))?;
    // Each member's get is blocked on the server by now (it set its key
    // just before); one that is not yet finds its group failed.
    thread::sleep(Duration::from_millis(100));
    let Some(mut victim) = members.pop() else {
        return Ok(());
    };
    let killed = Instant::now();
    victim
        .kill()
        .map_err(|e| Error::internal(format!("killing the last member: {e}")))?;
    let _ = victim.wait();
    for mut member in members {
        let status = member
            .wait()
            .map_err(|e| Error::internal(format!("waiting for a member: {e}")))?;
        if !status.success() {
            return Err(Error::internal(format!("a member was not told: {status}")));
        }
    }
    println!(
        "  every survivor was told within {:.1} ms of the kill (PyTorch's would wait their timeout)",
        killed.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

/// Starts `workers` demo worker processes reaching the store through `connect`.
fn spawn_workers(connect: &str, workers: u32, timeout: Duration) -> Result<Vec<Child>> {
    let exe = std::env::current_exe().map_err(|e| Error::internal(format!("own path: {e}")))?;
    (0..workers)
        .map(|rank| {
            Process::new(&exe)
                .args(["demo-worker", "--connect", connect])
                .args(DemoPlace::new(rank, workers, timeout).args())
                .spawn()
                .map_err(|e| Error::internal(format!("starting worker {rank}: {e}")))
        })
        .collect()
}

/// A Work per worker, completed by a background get of its result key.
fn result_works(store: &Arc<dyn Store>, workers: u32) -> Result<Vec<Work>> {
    (0..workers)
        .map(|rank| {
            store
                .clone_store()?
                .get_async(format!("demo/result/{rank}"))
        })
        .collect()
}

fn demo(workers: u32, kind: DemoStore, timeout: Duration) -> Result<()> {
    if workers < 1 {
        return Err(Error::invalid_argument("--workers must be at least 1"));
    }
    let started = Instant::now();
    let (works, store, children): (Vec<Work>, Arc<dyn Store>, Vec<Child>) = match kind {
        DemoStore::Hash => {
            println!(
                "distcore {} demo: {workers} worker threads on an embedded HashStore",
                distcore::VERSION
            );
            let store: Arc<dyn Store> = Arc::new(HashStore::new());
            let works = (0..workers)
                .map(|rank| {
                    let work = Work::new(
                        rank as i32,
                        OpType::Allgather,
                        Some("demo/worker"),
                        Some(timeout),
                    );
                    let (finisher, store) = (work.clone(), store.clone_store()?);
                    thread::spawn(move || {
                        let _ = finisher.finish_with(worker(
                            store,
                            i64::from(rank),
                            i64::from(workers),
                            timeout,
                        ));
                    });
                    Ok(work)
                })
                .collect::<Result<_>>()?;
            (works, store, Vec::new())
        }
        DemoStore::Tcp => {
            let server = TcpStore::new(TcpStoreOptions {
                is_server: true,
                bind_address: Some(std::net::Ipv4Addr::LOCALHOST.into()),
                world_size: Some(workers + 1),
                wait_for_workers: false,
                timeout,
                ..TcpStoreOptions::default()
            })?;
            let port = server.port();
            println!(
                "distcore {} demo: {workers} worker processes, TCPStore server on 127.0.0.1:{port}",
                distcore::VERSION
            );
            let children = spawn_workers(&format!("tcp:{port}"), workers, timeout)?;
            server.wait_for_workers()?;
            println!(
                "  all {workers} workers joined after {:.1} ms",
                started.elapsed().as_secs_f64() * 1e3
            );
            let store: Arc<dyn Store> = Arc::new(server);
            (result_works(&store, workers)?, store, children)
        }
        DemoStore::File(path) => {
            let store = FileStore::new(&path, Some(workers + 1))?;
            store.set_timeout(timeout);
            println!(
                "distcore {} demo: {workers} worker processes sharing the FileStore {}",
                distcore::VERSION,
                path.display()
            );
            let children = spawn_workers(&format!("file:{}", path.display()), workers, timeout)?;
            let store: Arc<dyn Store> = Arc::new(store);
            (result_works(&store, workers)?, store, children)
        }
        DemoStore::Etcd(url) => {
            // A prefix of its own per run, cleared at the end.
            let run = format!("{}/demo-{}", url.trim_end_matches('/'), std::process::id());
            let store = EtcdStore::new(EtcdStoreOptions {
                timeout,
                ..EtcdStoreOptions::from_url(&run)?
            })?;
            store.delete_all()?;
            println!(
                "distcore {} demo: {workers} worker processes sharing the EtcdStore {run}",
                distcore::VERSION
            );
            let children = spawn_workers(&run, workers, timeout)?;
            let store: Arc<dyn Store> = Arc::new(store);
            (result_works(&store, workers)?, store, children)
        }
    };
    let expected: i64 = (1..=i64::from(workers)).map(|r| 5050 * r).sum();
    for (rank, work) in works.iter().enumerate() {
        work.wait(Some(timeout))?;
        let total = String::from_utf8_lossy(&work.result()?).into_owned();
        println!(
            "  rank {rank} (work #{}, done after {:.2} ms): global sum {total}",
            work.sequence_number(),
            work.duration()? * 1e3
        );
        if total != expected.to_string() {
            return Err(Error::internal(format!(
                "rank {rank} computed {total}, expected {expected}"
            )));
        }
    }
    if !children.is_empty() {
        println!("RPC: a parameter server shares its parameters as RRefs with the workers");
        parameter_server::run(store.clone_store()?, workers as u16, timeout)?;
    }
    for mut child in children {
        let status = child
            .wait()
            .map_err(|e| Error::internal(format!("waiting for a worker: {e}")))?;
        if !status.success() {
            return Err(Error::internal(format!(
                "a worker process failed: {status}"
            )));
        }
    }
    let tcp_port = (*store)
        .as_any()
        .downcast_ref::<TcpStore>()
        .map(TcpStore::port);
    if let Some(port) = tcp_port.filter(|_| workers >= 2) {
        liveness_act(&store, port, workers, timeout)?;
    }
    println!(
        "all {workers} workers agree on {expected}; the store holds {} keys; {:.1} ms in all",
        store.num_keys()?,
        started.elapsed().as_secs_f64() * 1e3
    );
    if let Some(etcd) = (*store).as_any().downcast_ref::<EtcdStore>() {
        etcd.delete_all()?;
    }
    Ok(())
}

/// Runs a server until SIGINT or SIGTERM. A server holds a descriptor per
/// client, so it first raises its soft limit on open files to the hard one.
fn serve(
    options: ServerOptions,
    watch_world: Option<(u32, Option<TlsClient>)>,
    metrics: Option<std::net::SocketAddr>,
) -> Result<()> {
    let termination = TerminationSignals::block()?;
    let open_files = raise_open_files_limit();
    let keys_in = match &options.backend {
        ServerBackend::Memory => "memory".to_owned(),
        ServerBackend::Etcd(etcd) => {
            format!("etcd {} under {}", etcd.endpoints.join(","), etcd.prefix)
        }
    };
    let who = options.access.describe();
    let allow = options.access.allow.clone();
    let server_secret = options.access.secret.clone();
    let reach = match options.bind_address {
        Some(ip) if ip.is_loopback() => "loopback only: --host to serve other machines",
        Some(ip) if ip.is_unspecified() => "every IPv4 interface",
        Some(_) => "this address only",
        None if options.listen_fd.is_some() => "a socket handed over",
        None => "every interface, IPv4 and IPv6",
    };
    let server = Server::start(options)?;
    say!(
        "distcore TCPStore server listening on {} ({reach}; keys in {keys_in}; SIGINT or SIGTERM stops it)",
        server.local_addr()
    );
    say!("distcore: serving {who}");
    let _endpoint = match metrics {
        Some(addr) => {
            let endpoint = MetricsEndpoint::start(addr, server.metrics_source(), &allow)?;
            say!(
                "distcore: metrics at http://{}/metrics",
                endpoint.local_addr()
            );
            Some(endpoint)
        }
        None => None,
    };
    match open_files {
        Ok(limit) => say!("distcore: up to {limit} open files (one per client)"),
        Err(e) => say_err!("distcore: cannot raise the open files limit: {e}"),
    }
    if let Some((world, tls)) = watch_world {
        let (port, secret) = (server.port(), server_secret.clone());
        let host = server.local_addr().ip();
        thread::spawn(move || report_workers(host, port, secret, tls, world));
    }
    let signal = termination.wait()?;
    let stats = server.stats();
    drop(server);
    say!(
        "distcore: signal {signal}: stopped ({} connections, {} keys at the end)",
        stats.connections,
        stats.keys
    );
    Ok(())
}

/// Relays until SIGINT or SIGTERM.
fn proxy(options: ProxyOptions) -> Result<()> {
    let termination = TerminationSignals::block()?;
    let open_files = raise_open_files_limit();
    let upstream = format!(
        "{}:{}{}{}",
        options.upstream_host,
        options.upstream_port,
        if options.tls_client.is_some() {
            " over TLS"
        } else {
            " in clear"
        },
        if options.secret.is_some() {
            ", authenticated with the secret"
        } else {
            ""
        }
    );
    let proxy = Proxy::start(options)?;
    say!(
        "distcore proxy listening on {} (PyTorch's protocol), relaying to {upstream} (SIGINT or SIGTERM stops it)",
        proxy.local_addr()
    );
    if let Err(e) = open_files {
        say_err!("distcore: cannot raise the open files limit: {e}");
    }
    let signal = termination.wait()?;
    drop(proxy);
    say!("distcore proxy: signal {signal}: stopped");
    Ok(())
}

/// Prints once `world` clients have counted themselves in `init/`.
fn report_workers(
    host: std::net::IpAddr,
    port: u16,
    secret: Option<Secret>,
    tls: Option<TlsClient>,
    world: u32,
) {
    let watch = || -> Result<()> {
        let host = if host.is_unspecified() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            host
        };
        let store = TcpStore::new(TcpStoreOptions {
            host: host.to_string(),
            port,
            timeout: Duration::ZERO,
            secret,
            tls_client: tls,
            ..TcpStoreOptions::default()
        })?;
        let started = Instant::now();
        loop {
            let joined = store.joined_workers()?;
            if joined >= i64::from(world) {
                say!(
                    "distcore: all {world} workers joined ({:.1} s)",
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
    };
    if let Err(e) = watch() {
        say_err!("distcore: watching init/: {e}");
    }
}

/// HOST:PORT (`[::1]:29500` for IPv6) as its host and port.
fn split_address(address: &str) -> Result<(String, u16)> {
    address
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| Error::invalid_argument(format!("'{address}' is not HOST:PORT")))
}

fn inspect(
    address: &str,
    width: usize,
    secret: Option<Secret>,
    tls: Option<TlsClient>,
) -> Result<()> {
    let (host, port) = split_address(address)?;
    let store = TcpStore::new(TcpStoreOptions {
        host,
        port,
        timeout: Duration::from_secs(10),
        secret,
        tls_client: tls,
        ..TcpStoreOptions::default()
    })?;
    if store.peer_is_distcore() {
        print_stats(&store.server_metrics()?);
        print_sessions(&store.sessions("")?);
    }
    let mut keys = store.list_keys()?;
    keys.sort();
    println!(
        "{} keys ({} counted by the server, init/ included)",
        keys.len(),
        store.num_keys()?
    );
    for key in keys {
        // Any bytes a client chose: never written raw to a terminal.
        let name = printable(key.as_bytes());
        match store.try_get(&key)? {
            Some(value) => println!(
                "{name:<40} {:>10} B  {}",
                value.len(),
                preview(&value, width)
            ),
            None => println!("{name:<40} (deleted meanwhile)"),
        }
    }
    Ok(())
}

/// A summary of a server's metrics: its gauges, and its counters that are
/// not zero.
fn print_stats(metrics: &str) {
    println!("server stats:");
    let samples = metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(name, _)| !name.contains("_bucket") && !name.starts_with("distcore_build_info"));
    for (name, value) in samples {
        if value != "0" || !name.contains("_total") {
            println!("  {:<64} {value}", name.trim_start_matches("distcore_"));
        }
    }
}

/// The server's liveness sessions (who, how long silent, blocked on what)
/// and its groups' failures.
fn print_sessions(listing: &SessionListing) {
    println!("{} sessions", listing.sessions.len());
    for s in &listing.sessions {
        let world = s.world_size.map_or("?".to_string(), |n| n.to_string());
        let waiting: Vec<String> = s
            .waiting_on
            .iter()
            .map(|k| printable(k.strip_prefix('/').unwrap_or(k).as_bytes()))
            .collect();
        println!(
            "  {:<16} rank {:>5}/{world:<5} {}:{} incarnation {} heard {} ms ago{}",
            printable(s.group.as_bytes()),
            s.rank,
            printable(s.host.as_bytes()),
            s.pid,
            s.incarnation,
            s.silent_for.as_millis(),
            match waiting.is_empty() {
                true => String::new(),
                false => format!(", waiting on {}", waiting.join(" ")),
            }
        );
    }
    if listing.truncated {
        println!("  (more sessions than one answer holds: the rest left out)");
    }
    for failure in &listing.failures {
        println!(
            "  group {} FAILED: {}",
            printable(failure.group.as_bytes()),
            printable(failure.message.as_bytes())
        );
    }
}

/// Printable ASCII as is, other bytes as \xNN, cut at `width` bytes.
fn preview(value: &[u8], width: usize) -> String {
    let mut out: String = value[..value.len().min(width)]
        .iter()
        .map(|&b| match b {
            b' '..=b'~' => (b as char).to_string(),
            _ => format!("\\x{b:02x}"),
        })
        .collect();
    if value.len() > width {
        out.push('…');
    }
    out
}
