//! `dc_store_*`: the C face of every [`crate::store::Store`], the in-process
//! stores and the async variants of the blocking calls.

use std::ffi::c_char;
use std::sync::Arc;

use super::buf::{dc_buf, dc_buf_array};
use super::work::dc_work;
use super::{
    arg_bytes, arg_duration, arg_handle, arg_out, arg_slice, arg_str, arg_strs, arg_timeout,
    boundary, dc_status, drop_handle, give, read_into, to_millis, Handle,
};
use crate::error::Result;
use crate::runtime::fork::Born;
use crate::store::{FileStore, HashStore, PrefixStore, Store, TimeoutGuard};

/// A handle on a store: HashStore, FileStore, PrefixStore, TCPStore or
/// EtcdStore.
/// Thread-safe: one handle may be used from many threads, and a call
/// blocked in one thread does not hold up the others (see
/// `dc_tcp_store_new`). Free with `dc_store_free`, also while other threads
/// are inside calls on it (they finish normally); stores built on it keep
/// what they need alive.
///
/// What every `dc_store_*` call may return besides the common errors: on a
/// TCPStore, DC_ERR_NETWORK when the server cannot be reached or the
/// connection breaks (the next call reconnects), DC_ERR_TIMEOUT when the
/// server does not answer within the store's timeout, DC_ERR_PROTOCOL when
/// it breaks the wire protocol; on a FileStore, DC_ERR_IO when the file
/// cannot be read or written; on an EtcdStore, DC_ERR_NETWORK when no
/// member answers within the timeout.
///
/// How long every `dc_store_*` call may block: on a TCPStore, a round trip
/// to the server, bounded by the store's timeout (waiting calls say how
/// long they wait); on a FileStore, reading the file under its lock; on a
/// HashStore, taking its lock; on an EtcdStore, one or a few HTTP requests
/// to a member, bounded by the store's timeout.
pub struct dc_store {
    pub(crate) store: Arc<dyn Store>,
    born: Born,
}

impl dc_store {
    pub(crate) fn new(store: Arc<dyn Store>) -> dc_store {
        dc_store {
            store,
            born: Born::now(),
        }
    }
}

impl Handle for dc_store {
    const KIND: &'static str = "store";
    fn born(&self) -> Born {
        self.born
    }
}

/// A scoped store timeout: `dc_store_timeout_guard_free` restores the
/// timeout the store had before `dc_store_timeout_guard_new`.
pub struct dc_store_timeout_guard {
    _guard: TimeoutGuard<Arc<dyn Store>>,
    born: Born,
}

impl Handle for dc_store_timeout_guard {
    const KIND: &'static str = "timeout guard";
    fn born(&self) -> Born {
        self.born
    }
}

/// The store behind a handle, as a reference of its own: a call that
/// blocks keeps the store alive even if another thread frees the handle
/// meanwhile.
pub(crate) unsafe fn store_arg(store: *const dc_store) -> Result<Arc<dyn Store>> {
    // SAFETY: forwarded contract.
    Ok(unsafe { arg_handle(store, "store") }?.store.clone())
}

/// Creates an empty in-process store (c10d's HashStore), shared by every
/// thread that uses the handle or its clones. Default timeout 300 s.
///
/// Errors: only the common ones. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_hash_store_new(out: *mut *mut dc_store) -> dc_status {
    boundary("dc_hash_store_new", || {
        give(
            unsafe { arg_out(out, "out") }?,
            dc_store::new(Arc::new(HashStore::new())),
        );
        Ok(())
    })
}

/// Opens (creating it if needed) a FileStore at `path`, a file shared by
/// processes on this host or a shared filesystem, in PyTorch's format
/// (torch.distributed.FileStore can use the same file at once).
/// `world_size` -1 (any negative): none. The handle counts in `refcount/`;
/// when the last handle closes and `world_size` handles have closed, the
/// file is removed.
///
/// Errors: DC_ERR_IO for a path that cannot be opened or created;
/// DC_ERR_INVALID_ARGUMENT for an existing file that is not a FileStore log
/// (left untouched). Blocks on the file's lock (other processes hold it for
/// one operation at a time).
#[no_mangle]
pub unsafe extern "C" fn dc_file_store_new(
    path: *const c_char,
    world_size: i32,
    out: *mut *mut dc_store,
) -> dc_status {
    boundary("dc_file_store_new", || {
        let path = unsafe { arg_str(path, "path") }?;
        let out = unsafe { arg_out(out, "out") }?;
        let world_size = u32::try_from(world_size).ok();
        give(
            out,
            dc_store::new(Arc::new(FileStore::new(path, world_size)?)),
        );
        Ok(())
    })
}

/// Creates a view of `store` where every key `k` is `prefix + "/" + k`
/// (c10d's PrefixStore). The new handle keeps `store`'s store alive: either
/// may be freed first.
///
/// Errors: only the common ones. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_prefix_store_new(
    prefix: *const c_char,
    store: *const dc_store,
    out: *mut *mut dc_store,
) -> dc_status {
    boundary("dc_prefix_store_new", || {
        let prefix = unsafe { arg_str(prefix, "prefix") }?;
        let store = unsafe { store_arg(store) }?;
        let out = unsafe { arg_out(out, "out") }?;
        give(
            out,
            dc_store::new(Arc::new(PrefixStore::new(prefix, store))),
        );
        Ok(())
    })
}

/// Creates a new handle on the same store (c10d's Store::clone): for a
/// TCPStore, a client with connections of its own to the same server (never
/// a second server); for a PrefixStore, the same prefix over a clone.
///
/// Errors: a TCPStore's connect errors (DC_ERR_NETWORK after the store's
/// timeout). Blocks: a TCPStore connects (up to the store's timeout).
#[no_mangle]
pub unsafe extern "C" fn dc_store_clone(
    store: *const dc_store,
    out: *mut *mut dc_store,
) -> dc_status {
    boundary("dc_store_clone", || {
        let store = unsafe { store_arg(store) }?;
        let out = unsafe { arg_out(out, "out") }?;
        give(out, dc_store::new(store.clone_store()?));
        Ok(())
    })
}

/// Releases a store handle. NULL does nothing. When the handle is the last
/// one holding a TCPStore server this process started, the server stops:
/// this call closes its clients' connections and joins its thread (a few
/// milliseconds). Other threads' calls in progress on the handle finish
/// first with their own outcome. Never fails.
#[no_mangle]
pub unsafe extern "C" fn dc_store_free(store: *mut dc_store) {
    unsafe { drop_handle("dc_store_free", store) }
}

/// Sets `key` to the `len` bytes at `value`, waking the waiters of `key`.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for a key or value over the store's
/// limits (the handle stays usable). On a TCPStore the server does not
/// acknowledge a set (neither does PyTorch's): a set a distcore server
/// refuses (a quota: DC_ERR_QUOTA_EXCEEDED) comes back with the handle's
/// next reply and fails that call when it only reads (get, check, wait...),
/// or else the call after it, before that one is sent, with the refusal's
/// status and a message saying how many earlier writes failed; and a set
/// lost with its connection (the server died before reading it) fails
/// the handle's next call with DC_ERR_NETWORK saying so (see
/// `dc_tcp_store_new`, Recovery).
#[no_mangle]
pub unsafe extern "C" fn dc_store_set(
    store: *const dc_store,
    key: *const c_char,
    value: *const u8,
    len: usize,
) -> dc_status {
    boundary("dc_store_set", || {
        let store = unsafe { store_arg(store) }?;
        store.set(unsafe { arg_str(key, "key") }?, unsafe {
            arg_bytes(value, len, "value")
        }?)
    })
}

/// Writes the value of `key` into `out`, waiting up to the store's timeout
/// for the key to be set.
///
/// Errors: DC_ERR_TIMEOUT ("wait timeout after Nms, keys: key", PyTorch's
/// words) when the key does not appear in time. Blocks until the key
/// exists, at most the store's timeout.
#[no_mangle]
pub unsafe extern "C" fn dc_store_get(
    store: *const dc_store,
    key: *const c_char,
    out: *mut dc_buf,
) -> dc_status {
    boundary("dc_store_get", || {
        let store = unsafe { store_arg(store) }?;
        let key = unsafe { arg_str(key, "key") }?;
        let out = unsafe { arg_out(out, "out") }?;
        *out = dc_buf::from_vec(store.get(key)?);
        Ok(())
    })
}

/// Adds `delta` to the integer at `key` (stored as decimal text; a missing
/// key counts as 0) and writes the new value into `out`.
///
/// Errors: DC_ERR_INVALID_ARGUMENT when the value is not an integer (a
/// PyTorch server closes the connection instead: DC_ERR_NETWORK, and the
/// next call reconnects).
#[no_mangle]
pub unsafe extern "C" fn dc_store_add(
    store: *const dc_store,
    key: *const c_char,
    delta: i64,
    out: *mut i64,
) -> dc_status {
    boundary("dc_store_add", || {
        let store = unsafe { store_arg(store) }?;
        let key = unsafe { arg_str(key, "key") }?;
        let out = unsafe { arg_out(out, "out") }?;
        *out = store.add(key, delta)?;
        Ok(())
    })
}

/// Replaces the value of `key` with `desired` if it equals `expected` (a
/// missing key matches an empty `expected`), and writes into `out` the value
/// now stored (or `expected` when the key is missing and `expected` is not
/// empty), as c10d's compareSet.
///
/// Errors: only the common ones.
#[no_mangle]
pub unsafe extern "C" fn dc_store_compare_set(
    store: *const dc_store,
    key: *const c_char,
    expected: *const u8,
    expected_len: usize,
    desired: *const u8,
    desired_len: usize,
    out: *mut dc_buf,
) -> dc_status {
    boundary("dc_store_compare_set", || {
        let store = unsafe { store_arg(store) }?;
        let key = unsafe { arg_str(key, "key") }?;
        let expected = unsafe { arg_bytes(expected, expected_len, "expected") }?;
        let desired = unsafe { arg_bytes(desired, desired_len, "desired") }?;
        let out = unsafe { arg_out(out, "out") }?;
        *out = dc_buf::from_vec(store.compare_set(key, expected, desired)?);
        Ok(())
    })
}

/// Deletes `key` and writes whether it existed into `out_deleted`. Queues are
/// not touched.
///
/// Errors: only the common ones.
#[no_mangle]
pub unsafe extern "C" fn dc_store_delete_key(
    store: *const dc_store,
    key: *const c_char,
    out_deleted: *mut bool,
) -> dc_status {
    boundary("dc_store_delete_key", || {
        let store = unsafe { store_arg(store) }?;
        let key = unsafe { arg_str(key, "key") }?;
        let out = unsafe { arg_out(out_deleted, "out_deleted") }?;
        *out = store.delete_key(key)?;
        Ok(())
    })
}

/// Writes into `out` whether all `count` keys exist (as values or non-empty
/// queues), without waiting for them.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for more keys than the store takes in one
/// request (a TCPStore: what its server announces, 128 Ki for PyTorch's).
#[no_mangle]
pub unsafe extern "C" fn dc_store_check(
    store: *const dc_store,
    keys: *const *const c_char,
    count: usize,
    out: *mut bool,
) -> dc_status {
    boundary("dc_store_check", || {
        let store = unsafe { store_arg(store) }?;
        let keys = unsafe { arg_strs(keys, count, "keys") }?;
        let out = unsafe { arg_out(out, "out") }?;
        *out = store.check(&keys)?;
        Ok(())
    })
}

/// Blocks until all `count` keys exist, for at most `timeout_ms`
/// (DC_TIMEOUT_DEFAULT: the store's timeout; DC_TIMEOUT_FOREVER: no limit).
///
/// Errors: DC_ERR_TIMEOUT ("wait timeout after Nms, keys: ...") when a key
/// is still missing at the deadline.
#[no_mangle]
pub unsafe extern "C" fn dc_store_wait(
    store: *const dc_store,
    keys: *const *const c_char,
    count: usize,
    timeout_ms: i64,
) -> dc_status {
    boundary("dc_store_wait", || {
        let store = unsafe { store_arg(store) }?;
        let keys = unsafe { arg_strs(keys, count, "keys") }?;
        store.wait(&keys, arg_timeout(timeout_ms)?)
    })
}

/// Writes into `out` the number of keys holding values (queues are not
/// counted; a TCPStore counts its `init/` key, as PyTorch's).
///
/// Errors: only the common ones.
#[no_mangle]
pub unsafe extern "C" fn dc_store_num_keys(store: *const dc_store, out: *mut i64) -> dc_status {
    unsafe {
        read_into(
            "dc_store_num_keys",
            || store_arg(store),
            (out, "out"),
            |store| store.num_keys(),
        )
    }
}

/// Appends the `len` bytes at `value` to the value of `key` (creating it).
///
/// Errors: DC_ERR_INVALID_ARGUMENT when the value would grow past the
/// store's value limit (the value is left as it was).
#[no_mangle]
pub unsafe extern "C" fn dc_store_append(
    store: *const dc_store,
    key: *const c_char,
    value: *const u8,
    len: usize,
) -> dc_status {
    boundary("dc_store_append", || {
        let store = unsafe { store_arg(store) }?;
        store.append(unsafe { arg_str(key, "key") }?, unsafe {
            arg_bytes(value, len, "value")
        }?)
    })
}

/// Writes the values of `count` keys into `out_values` (an array of `count`
/// dc_buf the caller provides and later frees one by one), waiting up to the
/// store's timeout for all of them. Nothing is written on failure.
///
/// Errors: DC_ERR_TIMEOUT when a key is still missing at the deadline;
/// DC_ERR_INVALID_ARGUMENT for more keys than one request takes. Blocks
/// until every key exists, at most the store's timeout.
#[no_mangle]
pub unsafe extern "C" fn dc_store_multi_get(
    store: *const dc_store,
    keys: *const *const c_char,
    count: usize,
    out_values: *mut dc_buf,
) -> dc_status {
    boundary("dc_store_multi_get", || {
        let store = unsafe { store_arg(store) }?;
        let keys = unsafe { arg_strs(keys, count, "keys") }?;
        // Checked like an input slice; written only after the values arrive.
        unsafe { arg_slice(out_values.cast_const(), count, "out_values") }?;
        let values = store.multi_get(&keys)?;
        for (i, value) in values.into_iter().enumerate() {
            // SAFETY: `out_values` has `count` == `values.len()` elements.
            unsafe { out_values.add(i).write(dc_buf::from_vec(value)) };
        }
        Ok(())
    })
}

/// Sets `keys[i]` to the `value_lens[i]` bytes at `values[i]`, for `count`
/// keys, in order, as one request.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for a key or value over the store's
/// limits, or more keys than one request takes (nothing is set).
#[no_mangle]
pub unsafe extern "C" fn dc_store_multi_set(
    store: *const dc_store,
    keys: *const *const c_char,
    values: *const *const u8,
    value_lens: *const usize,
    count: usize,
) -> dc_status {
    boundary("dc_store_multi_set", || {
        let store = unsafe { store_arg(store) }?;
        let keys = unsafe { arg_strs(keys, count, "keys") }?;
        let ptrs = unsafe { arg_slice(values, count, "values") }?;
        let lens = unsafe { arg_slice(value_lens, count, "value_lens") }?;
        let values = ptrs
            .iter()
            .zip(lens)
            .map(|(&p, &len)| unsafe { arg_bytes(p, len, "values") })
            .collect::<Result<Vec<_>>>()?;
        store.multi_set(&keys, &values)
    })
}

/// Pushes the `len` bytes at `value` onto the back of the queue `key`,
/// waking one waiter.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for a value over the store's limit.
#[no_mangle]
pub unsafe extern "C" fn dc_store_queue_push(
    store: *const dc_store,
    key: *const c_char,
    value: *const u8,
    len: usize,
) -> dc_status {
    boundary("dc_store_queue_push", || {
        let store = unsafe { store_arg(store) }?;
        store.queue_push(unsafe { arg_str(key, "key") }?, unsafe {
            arg_bytes(value, len, "value")
        }?)
    })
}

/// Pops the front of the queue `key` into `out`. With `block`, waits up to
/// the store's timeout for an element; without, returns at once.
///
/// Errors: DC_ERR_TIMEOUT when blocking and the queue stays empty until the
/// deadline; DC_ERR_QUEUE_EMPTY when not blocking and the queue is empty.
#[no_mangle]
pub unsafe extern "C" fn dc_store_queue_pop(
    store: *const dc_store,
    key: *const c_char,
    block: bool,
    out: *mut dc_buf,
) -> dc_status {
    boundary("dc_store_queue_pop", || {
        let store = unsafe { store_arg(store) }?;
        let key = unsafe { arg_str(key, "key") }?;
        let out = unsafe { arg_out(out, "out") }?;
        *out = dc_buf::from_vec(store.queue_pop(key, block)?);
        Ok(())
    })
}

/// Writes into `out` the number of elements in the queue `key` (0 for no
/// queue).
///
/// Errors: only the common ones.
#[no_mangle]
pub unsafe extern "C" fn dc_store_queue_len(
    store: *const dc_store,
    key: *const c_char,
    out: *mut i64,
) -> dc_status {
    boundary("dc_store_queue_len", || {
        let store = unsafe { store_arg(store) }?;
        let key = unsafe { arg_str(key, "key") }?;
        let out = unsafe { arg_out(out, "out") }?;
        *out = store.queue_len(key)?;
        Ok(())
    })
}

/// Writes every key holding a value into `out` (free with
/// `dc_buf_array_free`); each buffer is NUL-terminated.
///
/// Errors: only the common ones.
#[no_mangle]
pub unsafe extern "C" fn dc_store_list_keys(
    store: *const dc_store,
    out: *mut dc_buf_array,
) -> dc_status {
    unsafe {
        read_into(
            "dc_store_list_keys",
            || store_arg(store),
            (out, "out"),
            |store| Ok(dc_buf_array::from_items(&store.list_keys()?)),
        )
    }
}

/// Since 1.4. Writes the keys holding a value that start with `prefix`
/// (NUL-terminated, read during the call only; "" lists every key) into
/// `out` (free with `dc_buf_array_free`); each buffer is NUL-terminated.
/// A TCPStore asks a distcore server for them only; from PyTorch's server
/// it lists every key and filters.
///
/// Errors: only the common ones. Blocks for one request, at most the
/// store's timeout.
#[no_mangle]
pub unsafe extern "C" fn dc_store_list_prefix(
    store: *const dc_store,
    prefix: *const c_char,
    out: *mut dc_buf_array,
) -> dc_status {
    boundary("dc_store_list_prefix", || {
        let store = unsafe { store_arg(store) }?;
        let prefix = unsafe { arg_str(prefix, "prefix") }?;
        let out = unsafe { arg_out(out, "out") }?;
        *out = dc_buf_array::from_items(&store.list_prefix(prefix)?);
        Ok(())
    })
}

/// Since 1.4. Deletes every key starting with `prefix` (NUL-terminated,
/// read during the call only) and writes how many values it deleted into
/// `out_deleted`. Queues under the prefix are deleted too by a HashStore,
/// an EtcdStore and a TCPStore on a distcore server (which deletes them
/// all in one step); a FileStore, or a TCPStore on PyTorch's server,
/// deletes the listed values one at a time (a key written meanwhile may
/// stay), and no queue.
///
/// Errors: only the common ones. Blocks for one request (a TCPStore on a
/// distcore server) or one per key, each within the store's timeout.
#[no_mangle]
pub unsafe extern "C" fn dc_store_delete_prefix(
    store: *const dc_store,
    prefix: *const c_char,
    out_deleted: *mut i64,
) -> dc_status {
    boundary("dc_store_delete_prefix", || {
        let store = unsafe { store_arg(store) }?;
        let prefix = unsafe { arg_str(prefix, "prefix") }?;
        let out = unsafe { arg_out(out_deleted, "out_deleted") }?;
        *out = store.delete_prefix(prefix)?;
        Ok(())
    })
}

/// Blocks until `world_size` callers (this one included) have entered the
/// barrier `key`, for at most `timeout_ms` (DC_TIMEOUT_DEFAULT: the store's
/// timeout; DC_TIMEOUT_FOREVER: no limit). A key serves one barrier.
///
/// Errors: DC_ERR_TIMEOUT when fewer than `world_size` arrived in time;
/// DC_ERR_INVALID_ARGUMENT for a `world_size` below 1.
#[no_mangle]
pub unsafe extern "C" fn dc_store_barrier(
    store: *const dc_store,
    key: *const c_char,
    world_size: i32,
    timeout_ms: i64,
) -> dc_status {
    boundary("dc_store_barrier", || {
        let store = unsafe { store_arg(store) }?;
        store.barrier(
            unsafe { arg_str(key, "key") }?,
            arg_world_size(world_size)?,
            arg_timeout(timeout_ms)?,
        )
    })
}

/// Writes into `out_ms` the store's default timeout in ms (0: forever).
///
/// Errors: only the common ones. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_store_get_timeout(
    store: *const dc_store,
    out_ms: *mut i64,
) -> dc_status {
    unsafe {
        read_into(
            "dc_store_get_timeout",
            || store_arg(store),
            (out_ms, "out_ms"),
            |store| Ok(to_millis(store.timeout())),
        )
    }
}

/// Sets the store's default timeout in ms (DC_TIMEOUT_FOREVER, 0: forever),
/// for every thread using the handle, from its next call on.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for a negative timeout. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_store_set_timeout(
    store: *const dc_store,
    timeout_ms: i64,
) -> dc_status {
    boundary("dc_store_set_timeout", || {
        let store = unsafe { store_arg(store) }?;
        store.set_timeout(arg_duration(timeout_ms)?);
        Ok(())
    })
}

/// Sets the store's timeout to `timeout_ms` until the returned guard is
/// freed, which restores the previous one (c10d's StoreTimeoutGuard). The
/// guard keeps the store alive.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for a negative timeout. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_store_timeout_guard_new(
    store: *const dc_store,
    timeout_ms: i64,
    out: *mut *mut dc_store_timeout_guard,
) -> dc_status {
    boundary("dc_store_timeout_guard_new", || {
        let store = unsafe { store_arg(store) }?;
        let timeout = arg_duration(timeout_ms)?;
        let out = unsafe { arg_out(out, "out") }?;
        give(
            out,
            dc_store_timeout_guard {
                _guard: TimeoutGuard::new(store, timeout),
                born: Born::now(),
            },
        );
        Ok(())
    })
}

/// Restores the timeout the store had before the guard, and frees the
/// guard. NULL does nothing. Never fails or blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_store_timeout_guard_free(guard: *mut dc_store_timeout_guard) {
    unsafe { drop_handle("dc_store_timeout_guard_free", guard) }
}

/// A barrier's world size: at least 1.
fn arg_world_size(world_size: i32) -> Result<i64> {
    crate::store::elastic::check_world(world_size.into(), None)?;
    Ok(world_size.into())
}

/// Gives the caller a new work for a background operation.
pub(super) fn give_work(out: &mut *mut dc_work, work: Result<crate::work::Work>) -> Result<()> {
    give(out, dc_work::new(work?));
    Ok(())
}

/// Starts `dc_store_get` in the background and writes its work into `out`:
/// the work completes with the value as its result (`dc_work_result`) or
/// with the get's error (DC_ERR_TIMEOUT after the store's timeout).
///
/// Threads: on a TCPStore (and a PrefixStore over one) async calls cost no
/// thread: each waits on a connection of its own, driven by one process-wide
/// thread, which also completes the work (its callbacks run there, so they
/// should not block: every async call of the process waits meanwhile). On a
/// HashStore the work completes on the thread whose change satisfies it, or
/// on the process's timer thread for a timeout. On a FileStore, whose
/// changes come from other processes, the blocking call runs on a thread of
/// its own, which completes the work.
///
/// Blocks: on a TCPStore, only to open a connection when none is idle (at
/// most the store's timeout). `dc_work_abort`, or freeing the last handle of
/// the work with no callback registered, releases the operation (TCPStore,
/// HashStore): its connection closes and the server forgets the wait.
///
/// Errors: those of opening a connection (DC_ERR_NETWORK); the get's own
/// errors come through the work.
#[no_mangle]
pub unsafe extern "C" fn dc_store_get_async(
    store: *const dc_store,
    key: *const c_char,
    out: *mut *mut dc_work,
) -> dc_status {
    boundary("dc_store_get_async", || {
        let store = unsafe { store_arg(store) }?;
        let key = unsafe { arg_str(key, "key") }?.to_owned();
        give_work(unsafe { arg_out(out, "out") }?, store.get_async(key))
    })
}

/// Starts `dc_store_wait` in the background and writes its work into `out`:
/// the work completes when the keys exist (no result) or with the wait's
/// error. Threads, blocking and release as `dc_store_get_async`.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for more keys than one request takes;
/// those of opening a connection.
#[no_mangle]
pub unsafe extern "C" fn dc_store_wait_async(
    store: *const dc_store,
    keys: *const *const c_char,
    count: usize,
    timeout_ms: i64,
    out: *mut *mut dc_work,
) -> dc_status {
    boundary("dc_store_wait_async", || {
        let store = unsafe { store_arg(store) }?;
        let keys = unsafe { arg_strs(keys, count, "keys") }?;
        let keys = keys.into_iter().map(str::to_owned).collect();
        let timeout = arg_timeout(timeout_ms)?;
        give_work(
            unsafe { arg_out(out, "out") }?,
            store.wait_async(keys, timeout),
        )
    })
}

/// Starts a blocking `dc_store_queue_pop` in the background and writes its
/// work into `out`: the work's result is the element, or its error
/// DC_ERR_TIMEOUT after the store's timeout. Threads, blocking and release
/// as `dc_store_get_async`.
///
/// Errors: those of opening a connection.
#[no_mangle]
pub unsafe extern "C" fn dc_store_queue_pop_async(
    store: *const dc_store,
    key: *const c_char,
    out: *mut *mut dc_work,
) -> dc_status {
    boundary("dc_store_queue_pop_async", || {
        let store = unsafe { store_arg(store) }?;
        let key = unsafe { arg_str(key, "key") }?.to_owned();
        give_work(unsafe { arg_out(out, "out") }?, store.queue_pop_async(key))
    })
}

/// Starts `dc_store_barrier` in the background and writes its work into
/// `out`: the work completes when the barrier releases (no result) or with
/// its error. Threads, blocking and release as `dc_store_get_async`. On a
/// TCPStore handle with a session (since 1.4), a timeout's message names
/// the ranks of its group that never arrived, as `dc_store_barrier`'s.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for a `world_size` below 1; those of
/// opening a connection.
#[no_mangle]
pub unsafe extern "C" fn dc_store_barrier_async(
    store: *const dc_store,
    key: *const c_char,
    world_size: i32,
    timeout_ms: i64,
    out: *mut *mut dc_work,
) -> dc_status {
    boundary("dc_store_barrier_async", || {
        let store = unsafe { store_arg(store) }?;
        let key = unsafe { arg_str(key, "key") }?.to_owned();
        let timeout = arg_timeout(timeout_ms)?;
        let out = unsafe { arg_out(out, "out") }?;
        give_work(
            out,
            store.barrier_async(key, arg_world_size(world_size)?, timeout),
        )
    })
}
