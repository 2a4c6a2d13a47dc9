//! `dc_etcd_store_*`: creating EtcdStore handles; everything else goes
//! through `dc_store_*`.

use std::ffi::c_char;
use std::sync::Arc;

use super::store::dc_store;
use super::{
    arg_duration, arg_opt_str, arg_out, arg_strs, arg_versioned, boundary, dc_status, give,
    write_versioned, Versioned,
};
use crate::error::Result;
use crate::runtime::timeout::DEFAULT_STORE_TIMEOUT;
use crate::store::{EtcdStore, EtcdStoreOptions};

/// Options of `dc_etcd_store_new`. Initialise with
/// `dc_etcd_store_options_init(&opts, sizeof opts)`, then change what you
/// need. Fields are only ever appended (see `struct_size`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct dc_etcd_store_options {
    /// `sizeof(dc_etcd_store_options)` in the caller's header; set by
    /// `dc_etcd_store_options_init`.
    pub struct_size: usize,
    /// The cluster's members: `num_endpoints` NUL-terminated "host:port"
    /// or "http://host:port" strings; a member that is down is skipped.
    /// NULL with 0: "127.0.0.1:2379". Read during `dc_etcd_store_new` only.
    pub endpoints: *const *const c_char,
    /// The number of `endpoints`.
    pub num_endpoints: usize,
    /// The job's prefix: every key of the store lives under it, so jobs
    /// share a cluster (NUL-terminated; NULL: "/distcore").
    pub prefix: *const c_char,
    /// Timeout of connecting and of every call, in ms (0: forever).
    pub timeout_ms: i64,
}

// SAFETY: repr(C), `struct_size: usize` first, one size so far.
unsafe impl Versioned for dc_etcd_store_options {
    const SIZES: &'static [usize] = &[std::mem::size_of::<dc_etcd_store_options>()];
    const HOW_TO_SET: &'static str =
        "initialise the options with dc_etcd_store_options_init(&opts, sizeof opts)";
}

fn default_options() -> dc_etcd_store_options {
    dc_etcd_store_options {
        struct_size: std::mem::size_of::<dc_etcd_store_options>(),
        endpoints: std::ptr::null(),
        num_endpoints: 0,
        prefix: std::ptr::null(),
        timeout_ms: DEFAULT_STORE_TIMEOUT.as_millis() as i64,
    }
}

/// Fills `opts` with the defaults: the member at 127.0.0.1:2379, the
/// prefix "/distcore", a 300 s timeout. `struct_size` is
/// `sizeof(dc_etcd_store_options)` as the caller's header has it (pass
/// `sizeof opts`): only that many bytes are written.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for a NULL `opts` or a `struct_size` no
/// distcore header had. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_etcd_store_options_init(
    opts: *mut dc_etcd_store_options,
    struct_size: usize,
) -> dc_status {
    boundary("dc_etcd_store_options_init", || unsafe {
        write_versioned(opts, "opts", struct_size, default_options())
    })
}

unsafe fn options_arg(opts: &dc_etcd_store_options) -> Result<EtcdStoreOptions> {
    let defaults = EtcdStoreOptions::default();
    let endpoints: Vec<String> =
        unsafe { arg_strs(opts.endpoints, opts.num_endpoints, "opts->endpoints") }?
            .into_iter()
            .map(str::to_owned)
            .collect();
    Ok(EtcdStoreOptions {
        endpoints: if endpoints.is_empty() {
            defaults.endpoints
        } else {
            endpoints
        },
        prefix: unsafe { arg_opt_str(opts.prefix, "opts->prefix") }?
            .map_or(defaults.prefix, str::to_owned),
        timeout: arg_duration(opts.timeout_ms)?,
    })
}

/// Creates a handle on an EtcdStore and writes it into `out`: PyTorch's
/// Store on an etcd v3 cluster (3.4 or newer, through its JSON gateway),
/// with every key under `opts->prefix`, so that the job's rendezvous state
/// outlives any one machine. Every `dc_store_*` call works on it, the async
/// ones on a thread each, and so do the elastic helpers and `dc_rpc_init`.
/// Each call is one or a few HTTP requests to a member, made on the
/// calling thread: atomic operations (add, append, compare_set, a queue
/// pop) are transactions, retried when another writer came first; waits
/// watch for the keys (no polling). A member that is down, or a leader
/// change, makes a call move on to the next member, within its timeout.
/// Values are limited by the cluster's request size (etcd's default: 1.5
/// MiB): a larger one is DC_ERR_INVALID_ARGUMENT with etcd's message.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for bad options; DC_ERR_NETWORK ("no
/// etcd member of ... answered") when no member answers within the
/// timeout. Blocks: one request to check that a member answers, at most
/// `opts->timeout_ms`.
#[no_mangle]
pub unsafe extern "C" fn dc_etcd_store_new(
    opts: *const dc_etcd_store_options,
    out: *mut *mut dc_store,
) -> dc_status {
    boundary("dc_etcd_store_new", || {
        let opts = unsafe { arg_versioned(opts, "opts", default_options()) }?;
        let options = unsafe { options_arg(&opts) }?;
        let out = unsafe { arg_out(out, "out") }?;
        give(out, dc_store::new(Arc::new(EtcdStore::new(options)?)));
        Ok(())
    })
}
