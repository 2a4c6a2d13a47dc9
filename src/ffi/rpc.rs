//! `dc_rpc_*` and `dc_rref_*`: the RPC agent and remote references.

use std::collections::HashMap;
use std::ffi::{c_char, c_void};
use std::net::IpAddr;
use std::sync::Arc;

use super::buf::dc_buf;
use super::store::store_arg;
use super::work::dc_work;
use super::{
    arg_bytes, arg_duration, arg_handle, arg_opt_str, arg_out, arg_secret, arg_slice, arg_str,
    arg_timeout, arg_versioned, arg_versioned_out, boundary, dc_status, drop_handle, give,
    read_into, tls_args, write_versioned, Handle, UserData, Versioned, DC_OK,
};
use crate::error::{Error, Result, Status};
use crate::rpc::rref::RRef;
use crate::rpc::{CallArgs, Rpc, RpcFunction, RpcOptions};
use crate::runtime::fork::Born;

/// A worker of an RPC group. Thread-safe. Shut down with
/// `dc_rpc_shutdown`, then free with `dc_rpc_free`. Its agent runs threads
/// of its own: one moving bytes and `num_worker_threads` running functions.
pub struct dc_rpc {
    rpc: Arc<Rpc>,
    born: Born,
}

impl dc_rpc {
    fn new(rpc: Arc<Rpc>) -> dc_rpc {
        dc_rpc {
            rpc,
            born: Born::now(),
        }
    }
}

impl Drop for dc_rpc {
    /// Stops the worker if it still runs (as a non-graceful shutdown), so
    /// no registered function runs once the handle is freed.
    fn drop(&mut self) {
        let _ = self.rpc.shutdown(false, None);
    }
}

impl Handle for dc_rpc {
    const KIND: &'static str = "RPC";
    fn born(&self) -> Born {
        self.born
    }
}

/// A remote reference: on its owner (the value is local) or a user's fork.
/// Thread-safe; free with `dc_rref_free` (which, for the last handle of a
/// fork, tells the owner).
pub struct dc_rref {
    rref: RRef,
    rpc: Arc<Rpc>,
    born: Born,
}

impl dc_rref {
    fn new(rref: RRef, rpc: Arc<Rpc>) -> dc_rref {
        dc_rref {
            rref,
            rpc,
            born: Born::now(),
        }
    }
}

impl Handle for dc_rref {
    const KIND: &'static str = "RRef";
    fn born(&self) -> Born {
        self.born
    }
}

/// Where a registered function puts its result (or its error message).
pub struct dc_rpc_reply {
    result: Vec<u8>,
    error: Option<String>,
}

/// A function other workers call by name. Runs on one of the RPC worker
/// threads (`num_worker_threads` of them, so up to that many calls at
/// once) with the argument bytes, the RRefs passed along (borrowed views,
/// all confirmed by their owners; `dc_rref_clone` one to keep it) and the
/// caller's id. `args`, `rrefs` and `reply` are valid during the call only.
/// Puts its result with `dc_rpc_reply_set`; returns DC_OK, or an error
/// status (the message from `dc_rpc_reply_set_error`) that the caller
/// receives as DC_ERR_REMOTE. It may call any distcore function, RPCs to
/// other workers included (each holds its worker thread while it waits),
/// but not `dc_rpc_shutdown` or `dc_rpc_free` of its own worker.
pub type dc_rpc_function = Option<
    unsafe extern "C" fn(
        args: *const u8,
        len: usize,
        rrefs: *const *const dc_rref,
        num_rrefs: usize,
        caller_id: i32,
        reply: *mut dc_rpc_reply,
        user_data: *mut c_void,
    ) -> dc_status,
>;

/// A function to register at init.
#[repr(C)]
pub struct dc_rpc_function_entry {
    /// The name callers use (NUL-terminated).
    pub name: *const c_char,
    /// The function.
    pub function: dc_rpc_function,
    /// Passed to every call.
    pub user_data: *mut c_void,
}

/// Options of `dc_rpc_init`; initialise with `dc_rpc_options_init(&opts,
/// sizeof opts)`. Fields are only ever appended: a program built against
/// an older header passes its own `struct_size`, and fields it does not
/// know keep their defaults.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct dc_rpc_options {
    /// `sizeof(dc_rpc_options)` in the caller's header; set by
    /// `dc_rpc_options_init`.
    pub struct_size: usize,
    /// Threads running functions and RRef handlers (default 4).
    pub num_worker_threads: u32,
    /// Default timeout of calls, remote(), to_here and control messages, ms (default 60000).
    pub rpc_timeout_ms: i64,
    /// Address to listen on and advertise (default "127.0.0.1").
    pub listen_address: *const c_char,
    /// Report leaked RRefs at graceful shutdown as a warning (true, the
    /// default) or fail the shutdown with DC_ERR_INVALID_STATE listing them.
    pub ignore_rref_leak: bool,
    /// Functions registered before this worker becomes reachable.
    pub functions: *const dc_rpc_function_entry,
    /// The number of `functions`.
    pub num_functions: usize,
    /// Since 1.3. The group's shared secret (`secret_len` bytes, read
    /// during the call only); NULL with 0: none (NULL with a length, or an
    /// empty secret, is DC_ERR_INVALID_ARGUMENT). Every connection between
    /// workers then authenticates with it (challenge-response: it never
    /// travels) before any message; a peer without it, or with another,
    /// fails the calls to it with DC_ERR_PERMISSION_DENIED. Every worker
    /// of the group needs the same secret.
    pub secret: *const u8,
    /// Since 1.3. Bytes of `secret`.
    pub secret_len: usize,
    /// Since 1.3. TLS between workers: this worker's certificate chain
    /// (PEM), which its listener serves and its connections present.
    /// With `tls_key_file` and `tls_ca_file`, or none of the three; every
    /// worker of the group needs TLS if one has it. A worker's certificate
    /// must be valid for the address it listens on (or for
    /// `tls_server_name`).
    pub tls_cert_file: *const c_char,
    /// Since 1.3. The PEM private key of `tls_cert_file`.
    pub tls_key_file: *const c_char,
    /// Since 1.3. The CA certificates (PEM) other workers' certificates
    /// must chain to.
    pub tls_ca_file: *const c_char,
    /// Since 1.3. Verify connecting workers' certificates too, against the
    /// CA certificates in this PEM file (mutual TLS); NULL: only the
    /// accepting worker is verified.
    pub tls_client_ca_file: *const c_char,
    /// Since 1.3. Check other workers' certificates against this name
    /// instead of their addresses.
    pub tls_server_name: *const c_char,
}

/// PyTorch's RRef debug counters of one worker. Set `struct_size` to
/// `sizeof(dc_rref_debug_info)` before `dc_rpc_debug_info` fills it: fields
/// are only ever appended, and the library writes those the caller's
/// header knew.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct dc_rref_debug_info {
    /// `sizeof(dc_rref_debug_info)` in the caller's header.
    pub struct_size: usize,
    /// OwnerRRefs held for other workers.
    pub num_owner_rrefs: u64,
    /// RRef control messages in flight.
    pub num_pending_futures: u64,
    /// UserRRefs not yet confirmed by their owner.
    pub num_pending_users: u64,
    /// Forks known to this worker as an owner.
    pub num_forks: u64,
}

// SAFETY: repr(C), `struct_size: usize` first; 1.0 ended with
// num_functions (8-aligned, so its size is where `secret` starts).
unsafe impl Versioned for dc_rpc_options {
    const SIZES: &'static [usize] = &[
        std::mem::offset_of!(dc_rpc_options, secret),
        std::mem::size_of::<dc_rpc_options>(),
    ];
    const HOW_TO_SET: &'static str =
        "initialise the options with dc_rpc_options_init(&opts, sizeof opts)";
}

// SAFETY: repr(C), `struct_size: usize` first, one size so far.
unsafe impl Versioned for dc_rref_debug_info {
    const SIZES: &'static [usize] = &[std::mem::size_of::<dc_rref_debug_info>()];
    const HOW_TO_SET: &'static str = "set info.struct_size = sizeof info before the call";
}

/// Fills `opts` with the defaults: 4 worker threads, a 60 s RPC timeout,
/// listening on 127.0.0.1, RRef leaks a warning, no functions, no secret,
/// no TLS.
/// `struct_size` is `sizeof(dc_rpc_options)` as the caller's header has it
/// (pass `sizeof opts`): only that many bytes are written.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for a NULL `opts` or a `struct_size` no
/// distcore header had. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_rpc_options_init(
    opts: *mut dc_rpc_options,
    struct_size: usize,
) -> dc_status {
    boundary("dc_rpc_options_init", || unsafe {
        write_versioned(opts, "opts", struct_size, default_options())
    })
}

fn default_options() -> dc_rpc_options {
    let defaults = RpcOptions::default();
    dc_rpc_options {
        struct_size: std::mem::size_of::<dc_rpc_options>(),
        num_worker_threads: defaults.num_worker_threads as u32,
        rpc_timeout_ms: defaults.rpc_timeout.as_millis() as i64,
        listen_address: c"127.0.0.1".as_ptr(),
        ignore_rref_leak: defaults.ignore_rref_leak,
        functions: std::ptr::null(),
        secret: std::ptr::null(),
        secret_len: 0,
        tls_cert_file: std::ptr::null(),
        tls_key_file: std::ptr::null(),
        tls_ca_file: std::ptr::null(),
        tls_client_ca_file: std::ptr::null(),
        tls_server_name: std::ptr::null(),
        num_functions: 0,
    }
}

/// The worker a C function belongs to (for the RRef views it is handed),
/// known once init returns; weak, so registered functions do not keep their
/// worker alive. Other workers may call in while init is still finishing:
/// such a call waits for the handle, up to the RPC timeout.
struct RpcSlot {
    rpc: parking_lot::Mutex<Option<std::sync::Weak<Rpc>>>,
    known: parking_lot::Condvar,
    wait: std::time::Duration,
}

impl RpcSlot {
    fn new(rpc: Option<&Arc<Rpc>>, wait: std::time::Duration) -> Arc<RpcSlot> {
        Arc::new(RpcSlot {
            rpc: parking_lot::Mutex::new(rpc.map(Arc::downgrade)),
            known: parking_lot::Condvar::new(),
            wait,
        })
    }

    /// Fills the slot; `None` when init failed (calls then fail as shut down).
    fn fill(&self, rpc: Option<&Arc<Rpc>>) {
        *self.rpc.lock() = Some(rpc.map_or_else(std::sync::Weak::new, Arc::downgrade));
        self.known.notify_all();
    }

    fn get(&self) -> Result<Arc<Rpc>> {
        let deadline = std::time::Instant::now() + self.wait;
        let mut slot = self.rpc.lock();
        while slot.is_none() {
            if self.known.wait_until(&mut slot, deadline).timed_out() {
                return Err(Error::timeout("RPC initialisation did not finish in time"));
            }
        }
        slot.as_ref()
            .and_then(std::sync::Weak::upgrade)
            .ok_or_else(|| Error::new(Status::ShutDown, "RPC is shutting down"))
    }
}

type CFunction = unsafe extern "C" fn(
    *const u8,
    usize,
    *const *const dc_rref,
    usize,
    i32,
    *mut dc_rpc_reply,
    *mut c_void,
) -> dc_status;

/// Wraps a C function as an RpcFunction.
fn c_function(function: CFunction, user_data: UserData, rpc: Arc<RpcSlot>) -> Arc<RpcFunction> {
    Arc::new(move |call: &CallArgs<'_>| {
        let rpc = rpc.get()?;
        let views: Vec<dc_rref> = call
            .rrefs
            .iter()
            .map(|r| dc_rref::new(r.clone(), rpc.clone()))
            .collect();
        let pointers: Vec<*const dc_rref> = views.iter().map(|v| v as *const dc_rref).collect();
        let mut reply = dc_rpc_reply {
            result: Vec::new(),
            error: None,
        };
        let user_data = user_data;
        // SAFETY: the caller registered a valid function; every pointer
        // handed to it lives for the call.
        let status = unsafe {
            function(
                call.args.as_ptr(),
                call.args.len(),
                pointers.as_ptr(),
                pointers.len(),
                i32::from(call.caller),
                &mut reply,
                user_data.0,
            )
        };
        if status == DC_OK {
            Ok(reply.result)
        } else {
            let kind = Status::from_code(status).unwrap_or(Status::Remote);
            Err(Error::new(
                kind,
                reply.error.unwrap_or_else(|| kind.describe().to_owned()),
            ))
        }
    })
}

unsafe fn rpc_options(opts: &dc_rpc_options) -> Result<RpcOptions> {
    let listen =
        unsafe { arg_opt_str(opts.listen_address, "opts->listen_address") }?.unwrap_or("127.0.0.1");
    let listen_address: IpAddr = listen.parse().map_err(|_| {
        Error::invalid_argument(format!("listen_address '{listen}' is not an IP address"))
    })?;
    let tls = tls_args!(opts);
    let (tls_server, tls_client) = unsafe { tls.files("opts->") }?.load(true)?;
    Ok(RpcOptions {
        num_worker_threads: opts.num_worker_threads.max(1) as usize,
        rpc_timeout: arg_duration(opts.rpc_timeout_ms)?,
        listen_address,
        ignore_rref_leak: opts.ignore_rref_leak,
        secret: unsafe { arg_secret(opts.secret, opts.secret_len, "opts->secret") }?,
        tls_server,
        tls_client,
    })
}

/// Joins an RPC group of `world_size` workers through `store` as worker
/// `rank` (0 <= rank < world_size <= 65535) named `name`, and writes the
/// handle into `out`: listens on an ephemeral port of
/// `opts->listen_address`, registers `opts->functions`, publishes its name
/// and address in the store, and learns every other worker. `opts` may be
/// NULL for the defaults. The functions' names are copied; the function
/// pointers and their `user_data` must stay valid until `dc_rpc_free`
/// returned. The store handle may be freed once this returns.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for an empty or multi-line name, a rank
/// or world size out of range, a listen_address that is not an IP, a NULL
/// function; DC_ERR_NETWORK when the listener cannot be bound; DC_ERR_TIMEOUT
/// when not every worker joined within the RPC timeout (60 s when it is
/// 0); the store's errors. Blocks until every worker has joined, at most the
/// RPC timeout.
#[no_mangle]
pub unsafe extern "C" fn dc_rpc_init(
    store: *const super::store::dc_store,
    name: *const c_char,
    rank: i32,
    world_size: i32,
    opts: *const dc_rpc_options,
    out: *mut *mut dc_rpc,
) -> dc_status {
    boundary("dc_rpc_init", || {
        let store = unsafe { store_arg(store) }?.clone();
        let name = unsafe { arg_str(name, "name") }?;
        let out = unsafe { arg_out(out, "out") }?;
        let opts = match opts.is_null() {
            true => default_options(),
            false => unsafe { arg_versioned(opts, "opts", default_options()) }?,
        };
        let options = unsafe { rpc_options(&opts) }?;
        let world_size = u16::try_from(world_size)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                Error::invalid_argument(format!("world size {world_size} is not in [1, 65535]"))
            })?;
        let rank = u16::try_from(rank).map_err(|_| {
            Error::invalid_argument(format!("rank {rank} is not in [0, {world_size})"))
        })?;
        let entries = unsafe { arg_slice(opts.functions, opts.num_functions, "opts->functions") }?;
        // No RPC timeout (0) still bounds this wait.
        let init_wait = Some(options.rpc_timeout)
            .filter(|t| !t.is_zero())
            .unwrap_or(std::time::Duration::from_secs(60));
        let late_rpc = RpcSlot::new(None, init_wait);
        let mut functions: HashMap<String, Arc<RpcFunction>> = HashMap::new();
        for entry in entries {
            let fname = unsafe { arg_str(entry.name, "opts->functions[i].name") }?;
            let f = entry.function.ok_or_else(|| {
                Error::invalid_argument("opts->functions[i].function must not be NULL")
            })?;
            functions.insert(
                fname.to_owned(),
                c_function(f, UserData(entry.user_data), late_rpc.clone()),
            );
        }
        let rpc = Rpc::init(store, name, rank, world_size, options, functions);
        late_rpc.fill(rpc.as_ref().ok());
        let rpc = rpc?;
        give(out, dc_rpc::new(rpc));
        Ok(())
    })
}

/// Registers (or replaces) the function `name` after init. Other workers
/// may call before this returns on their side: prefer `opts->functions`.
/// `function` and `user_data` must stay valid until `dc_rpc_free` returned.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for a NULL function. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_rpc_register_function(
    rpc: *const dc_rpc,
    name: *const c_char,
    function: dc_rpc_function,
    user_data: *mut c_void,
) -> dc_status {
    boundary("dc_rpc_register_function", || {
        let rpc = unsafe { arg_handle(rpc, "rpc") }?.rpc.clone();
        let name = unsafe { arg_str(name, "name") }?;
        let f = function.ok_or_else(|| Error::invalid_argument("function must not be NULL"))?;
        let slot = RpcSlot::new(Some(&rpc), std::time::Duration::ZERO);
        rpc.register(name, c_function(f, UserData(user_data), slot));
        Ok(())
    })
}

/// Stops this worker if it is still running (as a non-graceful
/// `dc_rpc_shutdown`: pending calls fail with DC_ERR_SHUT_DOWN) and frees
/// the handle; once this returns no registered function runs any more. NULL
/// does nothing. RRef handles may outlive it: their calls then fail with
/// DC_ERR_SHUT_DOWN, and they must still be freed. Blocks while the agent's
/// threads stop (running functions finish first).
#[no_mangle]
pub unsafe extern "C" fn dc_rpc_free(rpc: *mut dc_rpc) {
    // SAFETY: NULL or a handle from dc_rpc_init; dropping it stops it.
    unsafe { drop_handle("dc_rpc_free", rpc) }
}

/// Shuts this worker down. Graceful: waits for every worker (through the
/// store), settles and deletes every RRef, waits again, stops. Not
/// graceful: stops at once; pending calls fail with DC_ERR_SHUT_DOWN.
/// `timeout_ms`: DC_TIMEOUT_DEFAULT for the RPC timeout. A second call does
/// nothing.
///
/// Errors: DC_ERR_INVALID_STATE listing leaked RRefs when
/// `ignore_rref_leak` was false (else they are a warning in the log);
/// DC_ERR_TIMEOUT when the other workers did not reach shutdown in time;
/// the store's errors. Blocks: graceful, until every worker arrives, at most
/// `timeout_ms` for each of the two rounds.
#[no_mangle]
pub unsafe extern "C" fn dc_rpc_shutdown(
    rpc: *const dc_rpc,
    graceful: bool,
    timeout_ms: i64,
) -> dc_status {
    boundary("dc_rpc_shutdown", || {
        let rpc = unsafe { arg_handle(rpc, "rpc") }?.rpc.clone();
        rpc.shutdown(graceful, arg_timeout(timeout_ms)?)
    })
}

unsafe fn rref_args(rrefs: *const *const dc_rref, count: usize) -> Result<Vec<RRef>> {
    let ptrs = unsafe { arg_slice(rrefs, count, "rrefs") }?;
    ptrs.iter()
        .map(|&p| unsafe { arg_handle(p, "rrefs[i]") }.map(|r| r.rref.clone()))
        .collect()
}

/// Calls the function `func` on worker `to` with the `len` bytes at `args`
/// and `num_rrefs` RRefs (passed on as forks, as PyTorch does), and writes
/// the reply into `out`.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for an unknown worker ("Unknown
/// destination worker W"); DC_ERR_REMOTE with the remote message when the
/// function fails there or is not registered ("Unknown function 'F' on
/// worker 'W'"); DC_ERR_TIMEOUT after `timeout_ms` (DC_TIMEOUT_DEFAULT: the
/// RPC timeout; DC_TIMEOUT_FOREVER: none); DC_ERR_PEER_FAILED, naming the
/// worker, at once when its connection is lost (it died, or cannot be
/// reached), and for every call to it after (docs/liveness.md, "RPC");
/// DC_ERR_NETWORK when this worker cannot open a connection;
/// DC_ERR_SHUT_DOWN after shutdown. Blocks until the reply, at most
/// `timeout_ms`. Calling from inside a registered function
/// occupies one of the worker threads meanwhile: nested calls deeper than
/// `num_worker_threads` can only end by timing out.
#[no_mangle]
pub unsafe extern "C" fn dc_rpc_sync(
    rpc: *const dc_rpc,
    to: *const c_char,
    func: *const c_char,
    args: *const u8,
    len: usize,
    rrefs: *const *const dc_rref,
    num_rrefs: usize,
    timeout_ms: i64,
    out: *mut dc_buf,
) -> dc_status {
    boundary("dc_rpc_sync", || {
        let rpc = unsafe { arg_handle(rpc, "rpc") }?.rpc.clone();
        let (to, func) = unsafe { (arg_str(to, "to")?, arg_str(func, "func")?) };
        let args = unsafe { arg_bytes(args, len, "args") }?;
        let rrefs = unsafe { rref_args(rrefs, num_rrefs) }?;
        let out = unsafe { arg_out(out, "out") }?;
        *out =
            dc_buf::from_bytes(&rpc.rpc_sync(to, func, args, &rrefs, arg_timeout(timeout_ms)?)?);
        Ok(())
    })
}

/// `dc_rpc_sync` without waiting: writes into `out` a work that completes
/// with the reply as its result (`dc_work_result`) or with the call's error,
/// on the agent's thread (callbacks run there: keep them short).
///
/// Errors: as `dc_rpc_sync` for what is known before sending (an unknown
/// worker, shutdown); the rest comes through the work. Does not wait for
/// the reply.
#[no_mangle]
pub unsafe extern "C" fn dc_rpc_async(
    rpc: *const dc_rpc,
    to: *const c_char,
    func: *const c_char,
    args: *const u8,
    len: usize,
    rrefs: *const *const dc_rref,
    num_rrefs: usize,
    timeout_ms: i64,
    out: *mut *mut dc_work,
) -> dc_status {
    boundary("dc_rpc_async", || {
        let rpc = unsafe { arg_handle(rpc, "rpc") }?.rpc.clone();
        let (to, func) = unsafe { (arg_str(to, "to")?, arg_str(func, "func")?) };
        let args = unsafe { arg_bytes(args, len, "args") }?;
        let rrefs = unsafe { rref_args(rrefs, num_rrefs) }?;
        let out = unsafe { arg_out(out, "out") }?;
        give(
            out,
            dc_work::new(rpc.rpc_async(to, func, args, &rrefs, arg_timeout(timeout_ms)?)?),
        );
        Ok(())
    })
}

/// Runs `func` on worker `to`, keeping its result there, and writes into
/// `out` an RRef to it (the OwnerRRef itself when `to` is this worker). If
/// the function fails, or the call times out, the RRef carries the error:
/// `dc_rref_to_here` and passing it on report it.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for an unknown worker; DC_ERR_SHUT_DOWN
/// after shutdown. Does not wait for the function (to self: it runs on a
/// worker thread).
#[no_mangle]
pub unsafe extern "C" fn dc_rpc_remote(
    rpc: *const dc_rpc,
    to: *const c_char,
    func: *const c_char,
    args: *const u8,
    len: usize,
    rrefs: *const *const dc_rref,
    num_rrefs: usize,
    timeout_ms: i64,
    out: *mut *mut dc_rref,
) -> dc_status {
    boundary("dc_rpc_remote", || {
        let rpc = unsafe { arg_handle(rpc, "rpc") }?.rpc.clone();
        let (to, func) = unsafe { (arg_str(to, "to")?, arg_str(func, "func")?) };
        let args = unsafe { arg_bytes(args, len, "args") }?;
        let rrefs = unsafe { rref_args(rrefs, num_rrefs) }?;
        let out = unsafe { arg_out(out, "out") }?;
        let rref = rpc.remote(to, func, args, &rrefs, arg_timeout(timeout_ms)?)?;
        give(out, dc_rref::new(rref, rpc.clone()));
        Ok(())
    })
}

/// Writes into `out_id` the id (rank) of the worker named `name`.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for an unknown name. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_rpc_worker_id(
    rpc: *const dc_rpc,
    name: *const c_char,
    out_id: *mut i32,
) -> dc_status {
    boundary("dc_rpc_worker_id", || {
        let rpc = unsafe { arg_handle(rpc, "rpc") }?.rpc.clone();
        let name = unsafe { arg_str(name, "name") }?;
        let out = unsafe { arg_out(out_id, "out_id") }?;
        *out = i32::from(rpc.worker(name)?.id);
        Ok(())
    })
}

/// Writes the name of this worker into `out`.
///
/// Errors: only the common ones. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_rpc_self_name(rpc: *const dc_rpc, out: *mut dc_buf) -> dc_status {
    boundary("dc_rpc_self_name", || {
        let rpc = unsafe { arg_handle(rpc, "rpc") }?.rpc.clone();
        let out = unsafe { arg_out(out, "out") }?;
        *out = dc_buf::from_bytes(rpc.worker_info().name.as_bytes());
        Ok(())
    })
}

/// Writes this worker's RRef counters into `out` (all zero once nothing is
/// shared), whose `struct_size` the caller set to sizeof(dc_rref_debug_info).
///
/// Errors: DC_ERR_INVALID_ARGUMENT for a wrong `out->struct_size`. Never
/// blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_rpc_debug_info(
    rpc: *const dc_rpc,
    out: *mut dc_rref_debug_info,
) -> dc_status {
    boundary("dc_rpc_debug_info", || {
        let rpc = unsafe { arg_handle(rpc, "rpc") }?.rpc.clone();
        let size = unsafe { arg_versioned_out(out, "out") }?;
        let info = rpc.debug_info();
        let info = dc_rref_debug_info {
            struct_size: std::mem::size_of::<dc_rref_debug_info>(),
            num_owner_rrefs: info.num_owner_rrefs as u64,
            num_pending_futures: info.num_pending_futures as u64,
            num_pending_users: info.num_pending_users as u64,
            num_forks: info.num_forks as u64,
        };
        unsafe { write_versioned(out, "out", size, info) }
    })
}

/// Puts the result bytes of a function call (a copy). `reply` is the one
/// the function was given, valid until the function returns.
///
/// Errors: DC_ERR_INVALID_ARGUMENT when the bytes cannot be copied. Never
/// blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_rpc_reply_set(
    reply: *mut dc_rpc_reply,
    data: *const u8,
    len: usize,
) -> dc_status {
    boundary("dc_rpc_reply_set", || {
        let reply = unsafe { arg_out(reply, "reply") }?;
        reply.result = unsafe { arg_bytes(data, len, "data") }?.to_vec();
        Ok(())
    })
}

/// Puts the error message of a failing function call (the function then
/// returns a non-OK status). `reply` is valid until the function returns.
///
/// Errors: only the common ones. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_rpc_reply_set_error(
    reply: *mut dc_rpc_reply,
    message: *const c_char,
) -> dc_status {
    boundary("dc_rpc_reply_set_error", || {
        let reply = unsafe { arg_out(reply, "reply") }?;
        reply.error = Some(unsafe { arg_str(message, "message") }?.to_owned());
        Ok(())
    })
}

/// Creates an RRef owned by this worker, holding a copy of the `len` bytes
/// at `data` (PyTorch's `rpc.RRef(value)`), and writes it into `out`.
///
/// Errors: DC_ERR_INVALID_ARGUMENT when the bytes cannot be copied. Never
/// blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_rref_new(
    rpc: *const dc_rpc,
    data: *const u8,
    len: usize,
    out: *mut *mut dc_rref,
) -> dc_status {
    boundary("dc_rref_new", || {
        let rpc = unsafe { arg_handle(rpc, "rpc") }?.rpc.clone();
        let data = unsafe { arg_bytes(data, len, "data") }?;
        let out = unsafe { arg_out(out, "out") }?;
        give(out, dc_rref::new(rpc.rref(data.to_vec()), rpc.clone()));
        Ok(())
    })
}

/// Writes into `out` a new handle on the same reference (not a new fork:
/// the owner is not told).
///
/// Errors: only the common ones. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_rref_clone(rref: *const dc_rref, out: *mut *mut dc_rref) -> dc_status {
    boundary("dc_rref_clone", || {
        let rref = unsafe { arg_handle(rref, "rref") }?;
        let out = unsafe { arg_out(out, "out") }?;
        give(out, dc_rref::new(rref.rref.clone(), rref.rpc.clone()));
        Ok(())
    })
}

/// Releases an RRef handle; the last handle of a user's fork tells the
/// owner (in the background), whose value goes when its last fork does.
/// NULL does nothing. Never fails or blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_rref_free(rref: *mut dc_rref) {
    unsafe { drop_handle("dc_rref_free", rref) }
}

/// Writes the value into `out`: fetched from the owner (waiting up to
/// `timeout_ms`: DC_TIMEOUT_DEFAULT for the RPC timeout), or local on the
/// owner.
///
/// Errors: the RRef's creation error, if its remote() failed;
/// DC_ERR_TIMEOUT, DC_ERR_PEER_FAILED, DC_ERR_SHUT_DOWN as `dc_rpc_sync`. Blocks
/// until the owner answers, at most `timeout_ms`.
#[no_mangle]
pub unsafe extern "C" fn dc_rref_to_here(
    rref: *const dc_rref,
    timeout_ms: i64,
    out: *mut dc_buf,
) -> dc_status {
    unsafe {
        read_into(
            "dc_rref_to_here",
            || arg_handle(rref, "rref"),
            (out, "out"),
            |rref| {
                Ok(dc_buf::from_bytes(
                    &rref.rpc.to_here(&rref.rref, arg_timeout(timeout_ms)?)?,
                ))
            },
        )
    }
}

/// Writes into `out` the value of an RRef this worker owns.
///
/// Errors: DC_ERR_INVALID_STATE on a user (not the owner). Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_rref_local_value(rref: *const dc_rref, out: *mut dc_buf) -> dc_status {
    unsafe {
        read_into(
            "dc_rref_local_value",
            || arg_handle(rref, "rref"),
            (out, "out"),
            |rref| Ok(dc_buf::from_bytes(&rref.rref.local_value()?)),
        )
    }
}

/// Writes into `out_id` the owner's worker id.
///
/// Errors: only the common ones. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_rref_owner_id(rref: *const dc_rref, out_id: *mut i32) -> dc_status {
    unsafe {
        read_into(
            "dc_rref_owner_id",
            || arg_handle(rref, "rref"),
            (out_id, "out_id"),
            |rref| Ok(i32::from(rref.rpc.owner_id(&rref.rref))),
        )
    }
}

/// Writes the owner's worker name into `out`.
///
/// Errors: only the common ones. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_rref_owner_name(rref: *const dc_rref, out: *mut dc_buf) -> dc_status {
    unsafe {
        read_into(
            "dc_rref_owner_name",
            || arg_handle(rref, "rref"),
            (out, "out"),
            |rref| {
                Ok(dc_buf::from_bytes(
                    rref.rpc.owner_name(&rref.rref).as_bytes(),
                ))
            },
        )
    }
}

/// Writes into `out` whether this handle is on the owner.
///
/// Errors: only the common ones. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_rref_is_owner(rref: *const dc_rref, out: *mut bool) -> dc_status {
    unsafe {
        read_into(
            "dc_rref_is_owner",
            || arg_handle(rref, "rref"),
            (out, "out"),
            |rref| Ok(rref.rref.is_owner()),
        )
    }
}

/// Writes into `out` whether the owner has confirmed this reference (true on
/// the owner).
///
/// Errors: only the common ones. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_rref_confirmed_by_owner(
    rref: *const dc_rref,
    out: *mut bool,
) -> dc_status {
    unsafe {
        read_into(
            "dc_rref_confirmed_by_owner",
            || arg_handle(rref, "rref"),
            (out, "out"),
            |rref| Ok(rref.rref.confirmed_by_owner()),
        )
    }
}
