//! `dc_tcp_store_*_session` and `dc_etcd_store_*_session`: liveness
//! sessions (docs/liveness.md) on a TCPStore or EtcdStore handle, since
//! 1.4.

use std::ffi::c_char;
use std::time::Duration;

use std::sync::Arc;

use super::store::{dc_store, give_work, store_arg};
use super::tcp::tcp;
use super::work::dc_work;
use super::{
    arg_out, arg_slice, arg_str, arg_versioned, boundary, dc_status, give, write_versioned,
    Versioned,
};
use crate::error::{Error, Result};
use crate::store::tcp::SessionOptions;
use crate::store::{EtcdStore, Store};

/// Since 1.4. Options of `dc_tcp_store_open_session`. Initialise with
/// `dc_session_options_init(&opts, sizeof opts)`, then set `group` and
/// `rank`. Fields are only ever appended (see `dc_tcp_store_options`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct dc_session_options {
    /// `sizeof(dc_session_options)` in the caller's header; set by
    /// `dc_session_options_init`.
    pub struct_size: usize,
    /// The group: the job, by convention its key prefix (NUL-terminated
    /// UTF-8, required; read during the call only).
    pub group: *const c_char,
    /// This process's rank in the group (required: 0 or more).
    pub rank: i32,
    /// How many members the group has (the rank must be below it); -1:
    /// unknown.
    pub world_size: i32,
    /// New for every start of the process: a newer one of the same rank
    /// fences an older. 0: a fresh one (the wall clock in nanoseconds).
    pub incarnation: u64,
    /// The member is failed when nothing arrives from it for this many ms
    /// (a frozen or cut-off process); the handle sends three keep-alives
    /// a TTL from the process's async thread. 0: no TTL, only the
    /// connection tells (a crash). At least 300 when set.
    pub ttl_ms: i64,
    /// Since 1.4's recoverable groups. The group is recoverable
    /// (docs/liveness.md): a member's failure fails no other member's
    /// calls; it changes the membership, which `dc_tcp_store_members`
    /// reads and `dc_tcp_store_watch_members` waits for. Every member of a
    /// group must agree. Default false: fate-sharing.
    pub recoverable: bool,
}

// SAFETY: repr(C), `struct_size: usize` first; the first 1.4 layout ended
// with ttl_ms (8-aligned, so its size is where `recoverable` starts).
unsafe impl Versioned for dc_session_options {
    const SIZES: &'static [usize] = &[
        std::mem::offset_of!(dc_session_options, recoverable),
        std::mem::size_of::<dc_session_options>(),
    ];
    const HOW_TO_SET: &'static str =
        "initialise the options with dc_session_options_init(&opts, sizeof opts)";
}

fn default_options() -> dc_session_options {
    dc_session_options {
        struct_size: std::mem::size_of::<dc_session_options>(),
        group: std::ptr::null(),
        rank: -1,
        world_size: -1,
        incarnation: 0,
        ttl_ms: 0,
        recoverable: false,
    }
}

/// Since 1.4. Fills `opts` with the defaults: no group and no rank (both
/// must be set), world size unknown, a fresh incarnation, no TTL. `struct_size` is
/// `sizeof(dc_session_options)` as the caller's header has it.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for a NULL `opts` or a `struct_size`
/// no distcore header had. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_session_options_init(
    opts: *mut dc_session_options,
    struct_size: usize,
) -> dc_status {
    boundary("dc_session_options_init", || unsafe {
        write_versioned(opts, "opts", struct_size, default_options())
    })
}

unsafe fn options_arg(opts: *const dc_session_options) -> Result<SessionOptions> {
    let opts = unsafe { arg_versioned(opts, "opts", default_options()) }?;
    let group = unsafe { arg_str(opts.group, "opts->group") }?;
    let rank = u32::try_from(opts.rank).map_err(|_| {
        Error::invalid_argument(format!(
            "opts->rank {} is not a rank (0 or more)",
            opts.rank
        ))
    })?;
    let world_size = match opts.world_size {
        -1 => None,
        n => Some(u32::try_from(n).ok().filter(|n| *n > rank).ok_or_else(|| {
            Error::invalid_argument(format!(
                "opts->world_size {n} is neither -1 nor above the rank {rank}"
            ))
        })?),
    };
    let mut options = SessionOptions::new(group, rank);
    options.world_size = world_size;
    options.recoverable = opts.recoverable;
    if opts.incarnation != 0 {
        options.incarnation = opts.incarnation;
    }
    options.ttl = match opts.ttl_ms {
        0 => None,
        ms => Some(
            u64::try_from(ms)
                .map(Duration::from_millis)
                .map_err(|_| Error::invalid_argument(format!("opts->ttl_ms {ms} is negative")))?,
        ),
    };
    Ok(options)
}

/// Since 1.4. Opens a liveness session of this process on the TCPStore
/// handle (docs/liveness.md): from then on, when another member of the
/// group fails (its process dies, reports an error, or a newer incarnation
/// of its rank opens), every blocked and later call of this handle fails at
/// once with DC_ERR_PEER_FAILED, its message naming the member (rank,
/// group, host, pid, incarnation), why, and when it was last heard from;
/// and when this process dies, the others are told. If the handle's
/// connection to the server is lost, so is the session: the handle's calls
/// then fail with DC_ERR_PEER_FAILED until dc_tcp_store_close_session.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for a NULL or wrongly sized `opts`, a
/// NULL group, a negative rank, a world size not above the rank, a TTL
/// under 300 ms or negative, or a `store` that is not a TCPStore; DC_ERR_NOT_SUPPORTED from a PyTorch
/// server; DC_ERR_INVALID_STATE if the handle has a session already, or
/// the rank is live in the group with the same or a newer incarnation;
/// DC_ERR_PEER_FAILED if the group has lost a member already; those of a
/// call (DC_ERR_TIMEOUT, DC_ERR_NETWORK). Blocks for one round trip, at
/// most the store's timeout.
#[no_mangle]
pub unsafe extern "C" fn dc_tcp_store_open_session(
    store: *const dc_store,
    opts: *const dc_session_options,
) -> dc_status {
    boundary("dc_tcp_store_open_session", || {
        let store = unsafe { store_arg(store) }?;
        let options = unsafe { options_arg(opts) }?;
        tcp(&store)?.open_session(&options)
    })
}

/// Since 1.4. Closes the handle's session gracefully: the group is not
/// failed. A session lost with the handle's connection is only forgotten.
///
/// Errors: DC_ERR_INVALID_ARGUMENT when `store` is NULL or not a
/// TCPStore; DC_ERR_INVALID_STATE if the handle has no session; those of a
/// call. Blocks for one round trip, at most the store's timeout.
#[no_mangle]
pub unsafe extern "C" fn dc_tcp_store_close_session(store: *const dc_store) -> dc_status {
    boundary("dc_tcp_store_close_session", || {
        tcp(&unsafe { store_arg(store) }?)?.close_session()
    })
}

/// Since 1.4. Ends the handle's session with this process's own error:
/// every other member of the group is told, as a failure of this rank
/// carrying `message` (NUL-terminated UTF-8, read during the call only).
///
/// Errors: DC_ERR_INVALID_ARGUMENT when `store` or `message` is NULL or
/// `store` is not a TCPStore; DC_ERR_INVALID_STATE if the handle has no
/// session; those of a call. Blocks for one round trip, at most the
/// store's timeout.
#[no_mangle]
pub unsafe extern "C" fn dc_tcp_store_report_error(
    store: *const dc_store,
    message: *const c_char,
) -> dc_status {
    boundary("dc_tcp_store_report_error", || {
        let store = unsafe { store_arg(store) }?;
        let message = unsafe { arg_str(message, "message") }?;
        tcp(&store)?.report_error(message)
    })
}

/// Since 1.4. Creates in `*out` a leased view of the TCPStore handle
/// `store` (free it with `dc_store_free`): a store that shares the
/// handle's connections and session, reads as the handle, and whose writes
/// (set, add, compare_set, append, multi_set, queue_push) tie the keys they
/// write to the handle's session: when the session ends, however it ends
/// (closed, its process dead or frozen past its TTL, an error reported,
/// fenced), the server deletes them. The last write of a key decides, as
/// with etcd's leases: written again without a lease, or through another
/// session, it is no longer this session's. The view may be wrapped in a
/// PrefixStore; `dc_store_clone` of it is a new connection with no
/// session, an ordinary handle. The view keeps the connections (and so
/// the session) open until freed, along with the handle.
///
/// The view's writes fail with DC_ERR_INVALID_STATE while the handle has
/// no session, DC_ERR_NOT_SUPPORTED on PyTorch's server. (On an
/// etcd-backed server the keys are put on the session's etcd lease.)
///
/// Errors: DC_ERR_INVALID_ARGUMENT when `store` or `out` is NULL or `store`
/// is not a TCPStore. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_tcp_store_leased(
    store: *const dc_store,
    out: *mut *mut dc_store,
) -> dc_status {
    boundary("dc_tcp_store_leased", || {
        let store = unsafe { store_arg(store) }?;
        let out = unsafe { arg_out(out, "out") }?;
        let view = tcp(&store)?.leased();
        give(out, dc_store::new(Arc::new(view)));
        Ok(())
    })
}

/// Since 1.4. One member of a recoverable group (`dc_tcp_store_members`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct dc_member {
    /// Its rank.
    pub rank: u32,
    /// Its process id.
    pub pid: u32,
    /// Its incarnation.
    pub incarnation: u64,
}

/// Since 1.4. Reads the membership of the handle's recoverable group: the
/// epoch (counting the membership's changes; every member reads the same
/// set at the same epoch) into `out_epoch`, up to `capacity` members, by
/// rank, into `out`, and how many there are into `out_len` (call with
/// capacity 0 and `out` NULL to size the array).
///
/// Errors: DC_ERR_INVALID_ARGUMENT when `store`, `out_epoch` or `out_len`
/// is NULL, `out` is NULL with a capacity, or `store` is not a TCPStore;
/// DC_ERR_INVALID_STATE if the handle has no session or its group is not
/// recoverable; those of a call. Blocks for one round trip, at most the
/// store's timeout.
#[no_mangle]
pub unsafe extern "C" fn dc_tcp_store_members(
    store: *const dc_store,
    out_epoch: *mut u64,
    out: *mut dc_member,
    capacity: usize,
    out_len: *mut usize,
) -> dc_status {
    boundary("dc_tcp_store_members", || {
        let store = unsafe { store_arg(store) }?;
        let out_epoch = unsafe { arg_out(out_epoch, "out_epoch") }?;
        unsafe { arg_slice(out.cast_const(), capacity, "out") }?;
        let out_len = unsafe { arg_out(out_len, "out_len") }?;
        let members = tcp(&store)?.members()?;
        *out_epoch = members.epoch;
        *out_len = members.members.len();
        for (i, m) in members.members.iter().take(capacity).enumerate() {
            // SAFETY: `out` has `capacity` elements and `i < capacity`.
            unsafe {
                out.add(i).write(dc_member {
                    rank: m.rank,
                    pid: m.pid,
                    incarnation: m.incarnation,
                })
            };
        }
        Ok(())
    })
}

/// Since 1.4. Creates in `*out` a work that completes once the membership
/// of the handle's recoverable group has passed `epoch` (at once if it has
/// already); its result is the new epoch in decimal, and
/// `dc_tcp_store_members` then reads the members. It has no timeout of its
/// own: wait on it with one (`dc_work_wait`), or poll its fd. Free it with
/// `dc_work_free`.
///
/// Errors: DC_ERR_INVALID_ARGUMENT when `store` or `out` is NULL, `store`
/// is not a TCPStore, or `epoch` is UINT64_MAX; DC_ERR_INVALID_STATE if
/// the handle has no session or its group is not recoverable; those of
/// connecting. Does not block beyond taking a connection.
#[no_mangle]
pub unsafe extern "C" fn dc_tcp_store_watch_members(
    store: *const dc_store,
    epoch: u64,
    out: *mut *mut dc_work,
) -> dc_status {
    boundary("dc_tcp_store_watch_members", || {
        let store = unsafe { store_arg(store) }?;
        let out = unsafe { arg_out(out, "out") }?;
        give_work(out, tcp(&store)?.watch_members(epoch))
    })
}

/// The EtcdStore a `dc_store` is.
fn etcd(store: &Arc<dyn Store>) -> Result<&EtcdStore> {
    (**store)
        .as_any()
        .downcast_ref::<EtcdStore>()
        .ok_or_else(|| Error::invalid_argument("store is not an EtcdStore"))
}

/// Since 1.4. Opens a liveness session of this process on the EtcdStore
/// handle (docs/liveness.md, "On etcd"): an etcd lease of the session's
/// TTL (`opts->ttl_ms`, rounded up to whole seconds, at least 2 s; 10 s
/// without one) that one process-wide thread renews three times a TTL.
/// From then on, when another member of the group fails — its lease runs
/// out (its process died, froze or was cut off), it reports an error, a
/// newer incarnation of its rank opens — every blocked call of this handle
/// (a get, wait, blocking queue pop or barrier) fails at once with
/// DC_ERR_PEER_FAILED naming it, and its later calls too (within a third
/// of a TTL). Members on `distcore serve --backend etcd` servers of the
/// same prefix share the group. `opts->recoverable` is not supported on
/// an EtcdStore's own session (members on such servers may open
/// recoverable groups).
///
/// Errors: DC_ERR_INVALID_ARGUMENT as `dc_tcp_store_open_session`, or a
/// `store` that is not an EtcdStore; DC_ERR_NOT_SUPPORTED for a
/// recoverable group; DC_ERR_INVALID_STATE if the handle has a session
/// already, or the rank is live with the same or a newer incarnation;
/// DC_ERR_PEER_FAILED if the group has failed while it has members; those
/// of an etcd request (DC_ERR_TIMEOUT, DC_ERR_NETWORK). Blocks for a few
/// etcd requests, at most the store's timeout.
#[no_mangle]
pub unsafe extern "C" fn dc_etcd_store_open_session(
    store: *const dc_store,
    opts: *const dc_session_options,
) -> dc_status {
    boundary("dc_etcd_store_open_session", || {
        let store = unsafe { store_arg(store) }?;
        let options = unsafe { options_arg(opts) }?;
        etcd(&store)?.open_session(&options)
    })
}

/// Since 1.4. Closes the EtcdStore handle's session gracefully: its
/// records deleted and its lease revoked (the keys leased to it go before
/// this returns); the group is not failed. A session that ended already
/// (its lease ran out) is only forgotten.
///
/// Errors: DC_ERR_INVALID_ARGUMENT when `store` is NULL or not an
/// EtcdStore; DC_ERR_INVALID_STATE if the handle has no session; those of
/// an etcd request. Blocks for a few etcd requests, at most the store's
/// timeout.
#[no_mangle]
pub unsafe extern "C" fn dc_etcd_store_close_session(store: *const dc_store) -> dc_status {
    boundary("dc_etcd_store_close_session", || {
        etcd(&unsafe { store_arg(store) }?)?.close_session()
    })
}

/// Since 1.4. Ends the EtcdStore handle's session with this process's own
/// error: the group fails, every other member told with `message`
/// (NUL-terminated UTF-8, read during the call only) as a failure of this
/// rank.
///
/// Errors: DC_ERR_INVALID_ARGUMENT when `store` or `message` is NULL or
/// `store` is not an EtcdStore; DC_ERR_INVALID_STATE if the handle has no
/// session; those of an etcd request. Blocks for a few etcd requests, at
/// most the store's timeout.
#[no_mangle]
pub unsafe extern "C" fn dc_etcd_store_report_error(
    store: *const dc_store,
    message: *const c_char,
) -> dc_status {
    boundary("dc_etcd_store_report_error", || {
        let store = unsafe { store_arg(store) }?;
        let message = unsafe { arg_str(message, "message") }?;
        etcd(&store)?.report_error(message)
    })
}

/// Since 1.4. Creates in `*out` a leased view of the EtcdStore handle
/// `store` (free it with `dc_store_free`): a store sharing the handle's
/// etcd client and session, whose writes (set, add, compare_set, append,
/// multi_set, queue_push) put the keys they write on the session's etcd
/// lease: they go when the session ends, however it ends. As with etcd's
/// leases, the last write of a key decides. `dc_store_clone` of the view
/// is a handle with no session.
///
/// Errors: DC_ERR_INVALID_ARGUMENT when `store` or `out` is NULL or
/// `store` is not an EtcdStore; DC_ERR_INVALID_STATE if the handle has no
/// session. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_etcd_store_leased(
    store: *const dc_store,
    out: *mut *mut dc_store,
) -> dc_status {
    boundary("dc_etcd_store_leased", || {
        let store = unsafe { store_arg(store) }?;
        let out = unsafe { arg_out(out, "out") }?;
        let view = etcd(&store)?.leased()?;
        give(out, dc_store::new(Arc::new(view)));
        Ok(())
    })
}
