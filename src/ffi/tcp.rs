//! `dc_tcp_store_*`: creating TCPStore handles (server and client) and what
//! only a TCPStore has; everything else goes through `dc_store_*`.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, CString};
use std::net::IpAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use super::buf::dc_buf;
use super::store::{dc_store, store_arg};
use super::{
    arg_duration, arg_opt_str, arg_out, arg_secret, arg_slice, arg_str, arg_versioned,
    arg_versioned_out, boundary, dc_status, give, tls_args, write_versioned, Versioned,
};
use once_cell::sync::Lazy;
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::runtime::timeout::DEFAULT_STORE_TIMEOUT;
use crate::security::access::Network;
use crate::store::tcp::protocol::DEFAULT_MAX_VALUE_LEN;
use crate::store::tcp::Quotas;
use crate::store::{Store, TcpStore, TcpStoreOptions};

/// Options of `dc_tcp_store_new`, mirroring torch.distributed.TCPStore's
/// arguments. Initialise with `dc_tcp_store_options_init(&opts, sizeof
/// opts)`, then change what you need. Fields are only ever appended: a
/// program built against an older header passes its own `struct_size`,
/// and fields it does not know keep their defaults.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct dc_tcp_store_options {
    /// `sizeof(dc_tcp_store_options)` in the caller's header; set by
    /// `dc_tcp_store_options_init`.
    pub struct_size: usize,
    /// Host to connect to (NUL-terminated; a name, an IPv4 or IPv6
    /// literal); read during `dc_tcp_store_new` only.
    pub host: *const c_char,
    /// Port; for a server 0 picks a free one (read it with dc_tcp_store_port).
    pub port: u16,
    /// Start a server in this process (PyTorch's is_master).
    pub is_server: bool,
    /// Number of store handles in the job, server included; -1: unknown
    /// (other negative numbers are DC_ERR_INVALID_ARGUMENT).
    pub world_size: i32,
    /// Count this handle in the job's worker count (PyTorch's key "init/",
    /// which every client adds 1 to once and `dc_store_add(store, "init/",
    /// 0, &n)` reads); a server handle then waits until `world_size` have.
    pub wait_for_workers: bool,
    /// Timeout of connecting and of every call, in ms (0: forever).
    pub timeout_ms: i64,
    /// Share one server among the handles of this process that ask for
    /// the same port (the server stops with the last of them).
    pub multi_tenant: bool,
    /// Serve on this TCP socket, listening or bound and not yet listening
    /// (the server listens on it, as PyTorch's does); -1: bind a new one.
    /// Another kind of descriptor fails with DC_ERR_NETWORK. With
    /// `is_server`, distcore owns the fd from the call on, whatever its
    /// outcome: the server closes it when it stops, a failing call at once
    /// (unless `opts` itself is rejected: NULL or a bad struct_size).
    /// Ignored by clients.
    pub master_listen_fd: c_int,
    /// Listen only on this address (NUL-terminated IP); NULL: every
    /// interface, dual-stack when IPv6 is available.
    pub bind_address: *const c_char,
    /// Largest value the server accepts, in bytes; 0: 64 MiB. Ignored by
    /// clients (they learn the limit from the server).
    pub max_value_size: u64,
    /// Since 1.2. The shared secret (`secret_len` bytes, read during the
    /// call only); NULL with `secret_len` 0: no authentication (NULL with
    /// a length, or an empty secret, is DC_ERR_INVALID_ARGUMENT). A server requires its clients
    /// to prove they hold it (challenge-response: it never travels), except
    /// clients from `allow_unauthenticated`; a client proves it does and
    /// requires the server to prove it too (DC_ERR_PERMISSION_DENIED
    /// otherwise, from dc_tcp_store_new and from any call that reconnects).
    pub secret: *const u8,
    /// Since 1.2. Bytes of `secret`.
    pub secret_len: usize,
    /// Since 1.2. Server: the networks clients may connect from, as
    /// comma-separated CIDR blocks ("10.0.0.0/8,::1"); NULL or "": any.
    /// Others are disconnected as soon as they are accepted.
    pub allow: *const c_char,
    /// Since 1.2. Server with a secret: networks whose clients need not
    /// authenticate (PyTorch's clients cannot), as `allow`.
    pub allow_unauthenticated: *const c_char,
    /// Since 1.2. Server: most open connections being served; 0: no
    /// limit. Further ones are closed as soon as they are accepted. With a
    /// secret or TLS, a connection counts once through its handshake (TLS,
    /// authentication); until then it is one of at most 128 in their
    /// handshake, each closed if not through within 10 s.
    pub max_connections: u64,
    /// Since 1.2. Server: most keys holding a value or a queue; 0: no
    /// limit. A write past it is refused: DC_ERR_QUOTA_EXCEEDED, except
    /// for set, multi_set and queue_push, which have no reply: their
    /// refusal fails a later call of the handle (see `dc_store_set`) and
    /// is counted by the server.
    pub max_keys: u64,
    /// Since 1.2. Server: most bytes of keys, values and queue elements;
    /// 0: no limit. A write past it is refused, as for `max_keys`.
    pub max_stored_bytes: u64,
    /// Since 1.3. A PEM file with a certificate chain (its own certificate
    /// first); NULL: none. Server: serve TLS with it (connections in clear
    /// are then served only from `allow_unauthenticated`; others learn
    /// that TLS is required, DC_ERR_PERMISSION_DENIED). Client: present it
    /// to servers that verify clients. Needs `tls_key_file`.
    pub tls_cert_file: *const c_char,
    /// Since 1.3. The PEM file of `tls_cert_file`'s private key (PKCS#8,
    /// PKCS#1 or SEC1).
    pub tls_key_file: *const c_char,
    /// Since 1.3. Client (a server's own handle included): connect over
    /// TLS, trusting the CA certificates in this PEM file; NULL: in
    /// clear. A server whose certificate does not chain to them, or that
    /// does not serve TLS, is DC_ERR_PERMISSION_DENIED (not retried) or
    /// DC_ERR_NETWORK saying so.
    pub tls_ca_file: *const c_char,
    /// Since 1.3. Server with `tls_cert_file`: require every TLS client to
    /// present a certificate from the CAs in this PEM file (mutual TLS).
    pub tls_client_ca_file: *const c_char,
    /// Since 1.3. Client: check the server's certificate against this name
    /// (a DNS name or an IP address) instead of `host`.
    pub tls_server_name: *const c_char,
}

/// One operation's latency statistics (PyTorch's collectClientCounters).
#[repr(C)]
pub struct dc_client_counter {
    /// The operation: "set", "get", "add", ... (static string).
    pub op: *const c_char,
    /// How many times it ran on this handle.
    pub count: u64,
    /// Mean latency in milliseconds.
    pub mean_ms: f64,
    /// Sample variance of the latency in ms².
    pub variance_ms: f64,
}

/// A snapshot of a TCPStore server's load. Set `struct_size` to
/// `sizeof(dc_server_stats)` before `dc_tcp_store_server_stats` fills it:
/// fields are only ever appended, and the library writes those the
/// caller's header knew.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct dc_server_stats {
    /// `sizeof(dc_server_stats)` in the caller's header.
    pub struct_size: usize,
    /// Open client connections.
    pub connections: u64,
    /// Pending WAIT and BARRIER requests.
    pub pending_waits: u64,
    /// Keys holding values.
    pub keys: u64,
}

// SAFETY: repr(C), `struct_size: usize` first; 1.0 ended with
// max_value_size and 1.2 with max_stored_bytes (8-aligned, so their sizes
// are where the next fields start).
unsafe impl Versioned for dc_tcp_store_options {
    const SIZES: &'static [usize] = &[
        std::mem::offset_of!(dc_tcp_store_options, secret),
        std::mem::offset_of!(dc_tcp_store_options, tls_cert_file),
        std::mem::size_of::<dc_tcp_store_options>(),
    ];
    const HOW_TO_SET: &'static str =
        "initialise the options with dc_tcp_store_options_init(&opts, sizeof opts)";
}

// SAFETY: repr(C), `struct_size: usize` first, one size so far.
unsafe impl Versioned for dc_server_stats {
    const SIZES: &'static [usize] = &[std::mem::size_of::<dc_server_stats>()];
    const HOW_TO_SET: &'static str = "set stats.struct_size = sizeof stats before the call";
}

fn default_options() -> dc_tcp_store_options {
    dc_tcp_store_options {
        struct_size: std::mem::size_of::<dc_tcp_store_options>(),
        host: c"127.0.0.1".as_ptr(),
        port: 0,
        is_server: false,
        world_size: -1,
        wait_for_workers: true,
        timeout_ms: DEFAULT_STORE_TIMEOUT.as_millis() as i64,
        multi_tenant: false,
        master_listen_fd: -1,
        bind_address: std::ptr::null(),
        max_value_size: 0,
        secret: std::ptr::null(),
        secret_len: 0,
        allow: std::ptr::null(),
        allow_unauthenticated: std::ptr::null(),
        max_connections: 0,
        max_keys: 0,
        max_stored_bytes: 0,
        tls_cert_file: std::ptr::null(),
        tls_key_file: std::ptr::null(),
        tls_ca_file: std::ptr::null(),
        tls_client_ca_file: std::ptr::null(),
        tls_server_name: std::ptr::null(),
    }
}

/// Fills `opts` with the defaults: host "127.0.0.1", port 0, client, no
/// world size, wait_for_workers, 300 s timeout, not multi-tenant, no
/// listen fd, every interface, 64 MiB values, no secret, any address, no
/// quotas, no TLS. `struct_size` is
/// `sizeof(dc_tcp_store_options)` as the caller's header has it (pass
/// `sizeof opts`): only that many bytes are written.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for a NULL `opts` or a `struct_size`
/// no distcore header had. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_tcp_store_options_init(
    opts: *mut dc_tcp_store_options,
    struct_size: usize,
) -> dc_status {
    boundary("dc_tcp_store_options_init", || unsafe {
        write_versioned(opts, "opts", struct_size, default_options())
    })
}

unsafe fn options_arg(
    opts: &dc_tcp_store_options,
    master_listen_fd: Option<Arc<OwnedFd>>,
) -> Result<TcpStoreOptions> {
    let host = unsafe { arg_str(opts.host, "opts->host") }?.to_owned();
    let bind_address = unsafe { arg_opt_str(opts.bind_address, "opts->bind_address") }?
        .map(|a| {
            a.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .map_err(|_| {
                    Error::invalid_argument(format!("bind_address '{a}' is not an IP address"))
                })
        })
        .transpose()?;

    let world_size = match opts.world_size {
        -1 => None,
        n => Some(u32::try_from(n).map_err(|_| {
            Error::invalid_argument(format!(
                "opts->world_size {n}: use -1 (unknown) or the number of handles"
            ))
        })?),
    };
    let max_value_len =
        size_or_none(opts.max_value_size, "max_value_size")?.unwrap_or(DEFAULT_MAX_VALUE_LEN);
    let secret = unsafe { arg_secret(opts.secret, opts.secret_len, "opts->secret") }?;
    let networks = |text: *const c_char, name: &str| -> Result<Vec<Network>> {
        unsafe { arg_opt_str(text, name) }?.map_or_else(|| Ok(Vec::new()), Network::parse_list)
    };
    let quotas = Quotas {
        max_connections: size_or_none(opts.max_connections, "max_connections")?,
        max_keys: size_or_none(opts.max_keys, "max_keys")?,
        max_stored_bytes: (opts.max_stored_bytes != 0).then_some(opts.max_stored_bytes),
    };
    let tls = tls_args!(opts);
    let (tls_server, tls_client) = unsafe { tls.files("opts->") }?.load(opts.is_server)?;
    Ok(TcpStoreOptions {
        host,
        port: opts.port,
        is_server: opts.is_server,
        world_size,
        wait_for_workers: opts.wait_for_workers,
        timeout: arg_duration(opts.timeout_ms)?,
        multi_tenant: opts.multi_tenant,
        master_listen_fd,
        bind_address,
        max_value_len,
        secret,
        allow: networks(opts.allow, "opts->allow")?,
        allow_unauthenticated: networks(opts.allow_unauthenticated, "opts->allow_unauthenticated")?,
        quotas,
        tls_server,
        tls_client,
    })
}

/// Creates a TCPStore handle and writes it into `out`: starts the server if
/// `opts->is_server`, connects (retrying with backoff until the timeout), and
/// with a world size and wait_for_workers counts itself in; the server
/// handle then waits until every worker has joined.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for bad options (a NULL host, a
/// bind_address that is not an IP, a negative timeout); DC_ERR_NETWORK when
/// the server's port cannot be bound ("address already in use", with the
/// port) or the server cannot be reached before the timeout; DC_ERR_TIMEOUT
/// ("Timed out after N seconds waiting for clients. x/y clients joined.")
/// when the world did not gather in time. Blocks: connecting, at most
/// `opts->timeout_ms`; a server handle waiting for workers, at most
/// `opts->timeout_ms` more.
///
/// What the handle promises, against our server or PyTorch's:
/// - Threads: a call blocked in one thread (get, wait, barrier, a blocking
///   queue pop) never delays another thread's calls on the handle: waiting
///   calls use connections of their own. Other calls share one connection,
///   in order, so a thread reads its own writes.
/// - Time: every call ends within the timeout (the handle's, or the one
///   given) plus at most 0.5 s (the grace a timed-out wait gives the server
///   to confirm its cancel), whatever the server does: connecting, sending
///   and receiving are all bounded.
/// - Limits: keys, values and key counts are checked before anything is
///   sent, against the limits a distcore server announces, or PyTorch's
///   (keys 8 KiB, values 8 MiB, 128 Ki keys a request) against a PyTorch
///   server: over them is DC_ERR_INVALID_ARGUMENT and the handle lives. A
///   reply over them closes the connection (DC_ERR_PROTOCOL).
/// - Recovery: a broken connection (a timeout mid-reply, a restarted
///   server, a healed partition) is replaced on the next call, which
///   reconnects with backoff within its own timeout; the handle is never
///   counted in "init/" again. A call whose request was in flight fails with
///   DC_ERR_NETWORK or DC_ERR_TIMEOUT and is not retried (a set or an add
///   may or may not have been applied); a call that found its connection
///   closed before sending anything reconnects and goes on — unless that
///   connection carried writes with no reply (set, multi_set, queue_push,
///   and append on a PyTorch server) the server had not yet acknowledged
///   with a later reply: then the call fails with DC_ERR_NETWORK, its
///   message saying those writes may be lost, and the next call
///   reconnects. A thread reads its own writes, or is told it cannot.
/// - Server: the server runs on a thread of its own until the last handle
///   holding it is freed (`dc_store_free` then joins it).
#[no_mangle]
pub unsafe extern "C" fn dc_tcp_store_new(
    opts: *const dc_tcp_store_options,
    out: *mut *mut dc_store,
) -> dc_status {
    boundary("dc_tcp_store_new", || {
        let opts = unsafe { arg_versioned(opts, "opts", default_options()) }?;
        // From here on a server's listening socket is ours: the server
        // closes it when it stops, and it closes at once if this fails.
        let listen_fd = (opts.is_server && opts.master_listen_fd >= 0).then(|| {
            // SAFETY: the caller hands over a socket it no longer uses.
            Arc::new(unsafe { OwnedFd::from_raw_fd(opts.master_listen_fd) })
        });
        let opts = unsafe { options_arg(&opts, listen_fd) }?;
        let out = unsafe { arg_out(out, "out") }?;
        give(out, dc_store::new(Arc::new(TcpStore::new(opts)?)));
        Ok(())
    })
}

/// An option that is a size, 0 meaning none.
fn size_or_none(n: u64, name: &str) -> Result<Option<usize>> {
    match n {
        0 => Ok(None),
        n => usize::try_from(n)
            .map(Some)
            .map_err(|_| Error::invalid_argument(format!("opts->{name} is too large"))),
    }
}

/// The server a TCPStore handle runs.
fn own_server(store: &Arc<dyn Store>) -> Result<&crate::store::tcp::Server> {
    tcp(store)?
        .server()
        .ok_or_else(|| Error::invalid_argument("this TCPStore handle runs no server"))
}

pub(super) fn tcp(store: &Arc<dyn Store>) -> Result<&TcpStore> {
    (**store)
        .as_any()
        .downcast_ref::<TcpStore>()
        .ok_or_else(|| Error::invalid_argument("store is not a TCPStore"))
}

/// Writes into `out_port` the port of the server the TCPStore handle talks
/// to (the chosen one when a server asked for port 0).
///
/// Errors: DC_ERR_INVALID_ARGUMENT when `store` is not a TCPStore (a
/// PrefixStore over one is not either). Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_tcp_store_port(
    store: *const dc_store,
    out_port: *mut u16,
) -> dc_status {
    boundary("dc_tcp_store_port", || {
        let store = unsafe { store_arg(store) }?;
        let out = unsafe { arg_out(out_port, "out_port") }?;
        let store = tcp(&store)?;
        *out = store.port();
        Ok(())
    })
}

/// Counts this handle in "init/" (once per handle) and, on the server
/// handle, waits until the world size is reached (PyTorch's
/// TCPStore::waitForWorkers). Does nothing without a world size.
///
/// Errors: DC_ERR_INVALID_ARGUMENT when `store` is not a TCPStore;
/// DC_ERR_TIMEOUT ("Timed out after N seconds waiting for clients. x/y
/// clients joined.") after the store's timeout. Blocks: on the server
/// handle, until the workers joined, at most the store's timeout.
#[no_mangle]
pub unsafe extern "C" fn dc_tcp_store_wait_for_workers(store: *const dc_store) -> dc_status {
    boundary("dc_tcp_store_wait_for_workers", || {
        tcp(&unsafe { store_arg(store) }?)?.wait_for_workers()
    })
}

/// Writes up to `capacity` per-operation latency counters of this handle
/// into `out` and their total number into `out_len` (call with capacity 0
/// and `out` NULL to size the array). The `op` strings are static.
///
/// Errors: DC_ERR_INVALID_ARGUMENT when `store` is not a TCPStore. Never
/// blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_tcp_store_counters(
    store: *const dc_store,
    out: *mut dc_client_counter,
    capacity: usize,
    out_len: *mut usize,
) -> dc_status {
    boundary("dc_tcp_store_counters", || {
        let store = unsafe { store_arg(store) }?;
        unsafe { arg_slice(out.cast_const(), capacity, "out") }?;
        let out_len = unsafe { arg_out(out_len, "out_len") }?;
        let store = tcp(&store)?;
        let counters = store.counters();
        *out_len = counters.len();
        for (i, c) in counters.iter().take(capacity).enumerate() {
            // SAFETY: `out` has `capacity` elements and `i < capacity`.
            unsafe {
                out.add(i).write(dc_client_counter {
                    op: op_name(c.op),
                    count: c.count,
                    mean_ms: c.mean_ms,
                    variance_ms: c.variance_ms,
                })
            };
        }
        Ok(())
    })
}

/// A C string for an operation name, interned for the life of the process.
fn op_name(op: &'static str) -> *const c_char {
    static NAMES: Lazy<Mutex<HashMap<&'static str, CString>>> = Lazy::new(Default::default);
    let mut names = NAMES.lock();
    names
        .entry(op)
        .or_insert_with(|| CString::new(op).unwrap_or_default())
        .as_ptr()
}

/// Writes the load of the server this handle runs into `out`, whose
/// `struct_size` the caller set to sizeof(dc_server_stats).
///
/// Errors: DC_ERR_INVALID_ARGUMENT when `store` is not a TCPStore, runs no
/// server, or `out->struct_size` is wrong. Never blocks (the server
/// publishes a snapshot after each turn of its event loop).
#[no_mangle]
pub unsafe extern "C" fn dc_tcp_store_server_stats(
    store: *const dc_store,
    out: *mut dc_server_stats,
) -> dc_status {
    boundary("dc_tcp_store_server_stats", || {
        let store = unsafe { store_arg(store) }?;
        let size = unsafe { arg_versioned_out(out, "out") }?;
        let server = own_server(&store)?;
        let stats = server.stats();
        let stats = dc_server_stats {
            struct_size: std::mem::size_of::<dc_server_stats>(),
            connections: stats.connections as u64,
            pending_waits: stats.pending_waits as u64,
            keys: stats.keys as u64,
        };
        unsafe { write_versioned(out, "out", size, stats) }
    })
}

/// Since 1.2. Writes the metrics of the server this handle runs into
/// `out`, as text in Prometheus's exposition format (version 0.0.4): every
/// name prefixed `distcore_` — requests, errors and latency histograms by
/// command, connections by kind, waiters, keys, stored bytes, refused
/// connections by reason, connections throttled by backpressure, quotas
/// and their refusals. Serve it at `/metrics` to let Prometheus scrape an
/// embedded server. Release `out` with dc_buf_free.
///
/// Errors: DC_ERR_INVALID_ARGUMENT when `store` or `out` is NULL, or
/// `store` is not a TCPStore handle that runs a server. Never blocks (the
/// counters are read as the server's thread left them).
#[no_mangle]
pub unsafe extern "C" fn dc_tcp_store_server_metrics(
    store: *const dc_store,
    out: *mut dc_buf,
) -> dc_status {
    boundary("dc_tcp_store_server_metrics", || {
        let store = unsafe { store_arg(store) }?;
        let out = unsafe { arg_out(out, "out") }?;
        let server = own_server(&store)?;
        *out = dc_buf::from_vec(server.metrics_text().into_bytes());
        Ok(())
    })
}
