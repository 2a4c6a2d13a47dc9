//! `dc_elastic_*`: torchelastic's store helpers over any `dc_store`.

use std::ffi::c_char;
use std::time::Duration;

use super::buf::dc_buf_array;
use super::store::dc_store;
use super::store::store_arg;
use super::{arg_bytes, arg_duration, arg_out, arg_str, arg_timeout, boundary, dc_status};
use crate::error::Result;
use crate::store::{elastic, Store};

/// A helper's timeout: DC_TIMEOUT_DEFAULT is the store's current timeout.
fn helper_timeout(store: &dyn Store, timeout_ms: i64) -> Result<Duration> {
    Ok(arg_timeout(timeout_ms)?.unwrap_or_else(|| store.timeout()))
}

/// torchelastic's barrier: blocks until `world_size` members entered the
/// barrier `key_prefix` (keys `<prefix>/num_members`, `<prefix>/last_member`;
/// usable once per prefix), with the store's timeout set to `timeout_ms`
/// meanwhile (DC_TIMEOUT_DEFAULT: keep the store's; DC_TIMEOUT_FOREVER: no
/// limit) and restored after.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for a `world_size` below 1 (or, where
/// there is one, a `rank` outside 0..world_size); DC_ERR_TIMEOUT when fewer
/// than `world_size` arrived in time; the store's errors. Blocks until all
/// arrived, at most the timeout (per store
/// call).
#[no_mangle]
pub unsafe extern "C" fn dc_elastic_barrier(
    store: *const dc_store,
    world_size: i32,
    key_prefix: *const c_char,
    timeout_ms: i64,
) -> dc_status {
    boundary("dc_elastic_barrier", || {
        let store = unsafe { store_arg(store) }?;
        let prefix = unsafe { arg_str(key_prefix, "key_prefix") }?;
        let timeout = helper_timeout(&*store, timeout_ms)?;
        elastic::barrier(&*store, world_size.into(), prefix, timeout)
    })
}

/// `dc_elastic_barrier` that, on a timeout, finds the ranks that never
/// arrived (waiting up to `trace_timeout_ms` for the first) and fails with
/// torchelastic's "Timed out waiting on barrier on rank R, for key prefix:
/// P (world_size=N, missing_ranks=[...], timeout=T)".
///
/// Errors: as `dc_elastic_barrier`. Blocks: as `dc_elastic_barrier`, plus
/// up to `trace_timeout_ms` on a timeout.
#[no_mangle]
pub unsafe extern "C" fn dc_elastic_barrier_traced(
    store: *const dc_store,
    world_size: i32,
    key_prefix: *const c_char,
    timeout_ms: i64,
    rank: i32,
    trace_timeout_ms: i64,
) -> dc_status {
    boundary("dc_elastic_barrier_traced", || {
        let store = unsafe { store_arg(store) }?;
        let prefix = unsafe { arg_str(key_prefix, "key_prefix") }?;
        let timeout = helper_timeout(&*store, timeout_ms)?;
        let trace_timeout = arg_duration(trace_timeout_ms)?;
        elastic::barrier_traced(
            &*store,
            world_size.into(),
            prefix,
            timeout,
            rank.into(),
            trace_timeout,
        )
    })
}

/// torchelastic's synchronize: publishes the `len` bytes at `data` as
/// `<key_prefix><rank>` and writes every rank's data, in rank order, into
/// `out` (free with `dc_buf_array_free`). The store's timeout is
/// `timeout_ms` meanwhile (DC_TIMEOUT_DEFAULT: keep the store's).
///
/// Errors: DC_ERR_INVALID_ARGUMENT for a `world_size` below 1 or a `rank`
/// outside 0..world_size; DC_ERR_TIMEOUT when a rank's data did not arrive
/// in time; the store's errors. Blocks until every rank published, at most the timeout.
#[no_mangle]
pub unsafe extern "C" fn dc_elastic_synchronize(
    store: *const dc_store,
    data: *const u8,
    len: usize,
    rank: i32,
    world_size: i32,
    key_prefix: *const c_char,
    timeout_ms: i64,
    out: *mut dc_buf_array,
) -> dc_status {
    boundary("dc_elastic_synchronize", || {
        let store = unsafe { store_arg(store) }?;
        let data = unsafe { arg_bytes(data, len, "data") }?;
        let prefix = unsafe { arg_str(key_prefix, "key_prefix") }?;
        let out = unsafe { arg_out(out, "out") }?;
        let timeout = helper_timeout(&*store, timeout_ms)?;
        let all = elastic::synchronize(
            &*store,
            data,
            rank.into(),
            world_size.into(),
            prefix,
            timeout,
        )?;
        *out = dc_buf_array::from_items(&all);
        Ok(())
    })
}

/// torchelastic's get_all: writes the values of `<prefix>0` ..
/// `<prefix><world_size-1>` into `out` (waiting for each), then checks in to
/// `<prefix>/finished`; rank 0 waits for every rank to check in.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for a `world_size` below 1 or over
/// 131072 (one key per rank in one request) or a `rank` outside
/// 0..world_size; DC_ERR_TIMEOUT after the store's timeout; the store's
/// errors. Blocks until every value exists (and, on rank 0, every rank checked in),
/// each wait at most the store's timeout.
#[no_mangle]
pub unsafe extern "C" fn dc_elastic_get_all(
    store: *const dc_store,
    rank: i32,
    prefix: *const c_char,
    world_size: i32,
    out: *mut dc_buf_array,
) -> dc_status {
    boundary("dc_elastic_get_all", || {
        let store = unsafe { store_arg(store) }?;
        let prefix = unsafe { arg_str(prefix, "prefix") }?;
        let out = unsafe { arg_out(out, "out") }?;
        *out = dc_buf_array::from_items(&elastic::get_all(
            &*store,
            rank.into(),
            prefix,
            world_size.into(),
        )?);
        Ok(())
    })
}
