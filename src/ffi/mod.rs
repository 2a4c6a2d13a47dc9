//! The C ABI: every `extern "C"` function of distcore, and nothing else.
//!
//! Conventions (see `include/distcore.h`): fallible functions return a
//! `dc_status`; the message of the last failure on the calling thread is read
//! with `dc_last_error_message()`. Every function runs inside one
//! panic-catching boundary ([`boundary`]); a NULL where a pointer is required
//! is `DC_ERR_INVALID_ARGUMENT`; freeing NULL does nothing.
//!
//! Safety contract of every function here: pointers are NULL or valid for the
//! documented access; handles are ones distcore returned and not yet freed;
//! byte arguments point at `len` readable bytes.

#![allow(clippy::missing_safety_doc, non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use crate::error::{Error, Result, Status};

pub mod buf;
pub mod elastic;
pub mod rpc;
pub mod store;
pub mod tcp;
pub mod work;

/// A status code: `DC_OK` (0) or one of the `DC_ERR_*` codes.
pub type dc_status = i32;

/// Success.
pub const DC_OK: dc_status = 0;
/// A NULL pointer, a bad length, a key that is not UTF-8, an out-of-range value.
pub const DC_ERR_INVALID_ARGUMENT: dc_status = 1;
/// A wait, get or barrier did not finish within its timeout.
pub const DC_ERR_TIMEOUT: dc_status = 2;
/// A connection failed or closed, or the peer is unreachable.
pub const DC_ERR_NETWORK: dc_status = 3;
/// A non-blocking queue pop found the queue empty.
pub const DC_ERR_QUEUE_EMPTY: dc_status = 4;
/// The object does not support the operation.
pub const DC_ERR_NOT_SUPPORTED: dc_status = 5;
/// A remote peer reported an error.
pub const DC_ERR_REMOTE: dc_status = 6;
/// The component has been shut down.
pub const DC_ERR_SHUT_DOWN: dc_status = 7;
/// The operation was aborted.
pub const DC_ERR_ABORTED: dc_status = 8;
/// A peer broke the wire protocol.
pub const DC_ERR_PROTOCOL: dc_status = 9;
/// A local I/O error.
pub const DC_ERR_IO: dc_status = 10;
/// The object is not in a state that allows the call (e.g. not completed yet).
pub const DC_ERR_INVALID_STATE: dc_status = 11;
/// A bug inside distcore, including a caught panic.
pub const DC_ERR_INTERNAL: dc_status = 12;

/// The longest byte argument (a value, a result, RPC arguments) any function
/// accepts: a longer `len` is DC_ERR_INVALID_ARGUMENT before anything is
/// read. Stores have lower limits of their own (a TCPStore: what its server
/// announces, or PyTorch's 8 MiB against a PyTorch server; a FileStore:
/// 4 GiB - 1); a length that fits but cannot be allocated is
/// DC_ERR_INVALID_ARGUMENT too.
/// (1 TiB; written out so that C reads it as a 64-bit constant.)
pub const DC_MAX_BYTES_LEN: u64 = 1_099_511_627_776;

/// Timeout argument: use the handle's own timeout.
pub const DC_TIMEOUT_DEFAULT: i64 = -1;
/// Timeout argument: wait forever (PyTorch's `kNoTimeout`).
pub const DC_TIMEOUT_FOREVER: i64 = 0;

const _: () = {
    assert!(DC_OK == Status::Ok as i32);
    assert!(DC_ERR_INVALID_ARGUMENT == Status::InvalidArgument as i32);
    assert!(DC_ERR_TIMEOUT == Status::Timeout as i32);
    assert!(DC_ERR_NETWORK == Status::Network as i32);
    assert!(DC_ERR_QUEUE_EMPTY == Status::QueueEmpty as i32);
    assert!(DC_ERR_NOT_SUPPORTED == Status::NotSupported as i32);
    assert!(DC_ERR_REMOTE == Status::Remote as i32);
    assert!(DC_ERR_SHUT_DOWN == Status::ShutDown as i32);
    assert!(DC_ERR_ABORTED == Status::Aborted as i32);
    assert!(DC_ERR_PROTOCOL == Status::Protocol as i32);
    assert!(DC_ERR_IO == Status::Io as i32);
    assert!(DC_ERR_INVALID_STATE == Status::InvalidState as i32);
    assert!(DC_ERR_INTERNAL == Status::Internal as i32);
};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(error: &Error) {
    let text = CString::new(error.message().replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|last| *last.borrow_mut() = text);
}

/// Runs the body of an extern function: catches panics (as
/// `DC_ERR_INTERNAL`), records the message of a failure, returns the status.
pub(crate) fn boundary(function: &str, body: impl FnOnce() -> Result<()>) -> dc_status {
    let error = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => return DC_OK,
        Ok(Err(error)) => error,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Error::internal(format!("panic in {function}: {what}"))
        }
    };
    set_last_error(&error);
    error.status().code()
}

/// Runs a void function's body (a `_free`), containing any panic.
pub(crate) fn boundary_void(function: &str, body: impl FnOnce()) {
    let _ = boundary(function, || {
        body();
        Ok(())
    });
}

/// The message of the last failure on the calling thread ("" if none). Valid
/// until the next failing distcore call on this thread; never NULL.
#[no_mangle]
pub extern "C" fn dc_last_error_message() -> *const c_char {
    LAST_ERROR.with(|last| last.borrow().as_ptr())
}

/// A static description of a status code ("timed out", ...); "unknown
/// status" for a code distcore does not define. Never NULL.
#[no_mangle]
pub extern "C" fn dc_status_str(code: dc_status) -> *const c_char {
    Status::from_code(code)
        .map_or(c"unknown status", Status::describe_c)
        .as_ptr()
}

/// The version of the library, "major.minor.patch". Static; never NULL.
#[no_mangle]
pub extern "C" fn dc_version() -> *const c_char {
    static VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    VERSION.as_ptr().cast()
}

/// A required reference argument.
pub(crate) unsafe fn arg_ref<'a, T>(ptr: *const T, name: &str) -> Result<&'a T> {
    // SAFETY: per the module contract, a non-NULL pointer is valid.
    unsafe { ptr.as_ref() }.ok_or_else(|| null_error(name))
}

/// A required out-parameter.
pub(crate) unsafe fn arg_out<'a, T>(ptr: *mut T, name: &str) -> Result<&'a mut T> {
    // SAFETY: per the module contract, a non-NULL pointer is valid.
    unsafe { ptr.as_mut() }.ok_or_else(|| null_error(name))
}

/// A required NUL-terminated UTF-8 string.
pub(crate) unsafe fn arg_str<'a>(ptr: *const c_char, name: &str) -> Result<&'a str> {
    if ptr.is_null() {
        return Err(null_error(name));
    }
    // SAFETY: non-NULL and NUL-terminated per the module contract.
    unsafe { CStr::from_ptr(ptr) }
        .to_str()
        .map_err(|_| Error::invalid_argument(format!("{name} is not valid UTF-8")))
}

/// An optional NUL-terminated UTF-8 string (NULL is `None`).
pub(crate) unsafe fn arg_opt_str<'a>(ptr: *const c_char, name: &str) -> Result<Option<&'a str>> {
    if ptr.is_null() {
        Ok(None)
    } else {
        // SAFETY: forwarded contract.
        unsafe { arg_str(ptr, name) }.map(Some)
    }
}

/// `len` bytes at `data`; NULL is allowed only with `len == 0`.
pub(crate) unsafe fn arg_bytes<'a>(data: *const u8, len: usize, name: &str) -> Result<&'a [u8]> {
    if len as u64 > DC_MAX_BYTES_LEN {
        return Err(Error::invalid_argument(format!(
            "{name}: length {len} exceeds DC_MAX_BYTES_LEN ({DC_MAX_BYTES_LEN})"
        )));
    }
    if len == 0 {
        return Ok(&[]);
    }
    if data.is_null() {
        return Err(null_error(name));
    }
    // SAFETY: `data` points at `len` readable bytes per the module contract.
    Ok(unsafe { std::slice::from_raw_parts(data, len) })
}

/// `count` elements at `items`; NULL is allowed only with `count == 0`.
pub(crate) unsafe fn arg_slice<'a, T>(
    items: *const T,
    count: usize,
    name: &str,
) -> Result<&'a [T]> {
    if count > isize::MAX as usize / std::mem::size_of::<T>().max(1) {
        return Err(Error::invalid_argument(format!(
            "{name}: count {count} is too large"
        )));
    }
    if count == 0 {
        return Ok(&[]);
    }
    if items.is_null() {
        return Err(null_error(name));
    }
    // SAFETY: `items` points at `count` elements per the module contract.
    Ok(unsafe { std::slice::from_raw_parts(items, count) })
}

/// An array of `count` required strings.
pub(crate) unsafe fn arg_strs<'a>(
    keys: *const *const c_char,
    count: usize,
    name: &str,
) -> Result<Vec<&'a str>> {
    // SAFETY: forwarded contract.
    let ptrs = unsafe { arg_slice(keys, count, name) }?;
    ptrs.iter()
        // SAFETY: each element is a valid string per the module contract.
        .map(|&p| unsafe { arg_str(p, name) })
        .collect()
}

/// A timeout argument: `DC_TIMEOUT_DEFAULT` is `None`, 0 waits forever,
/// other negatives are invalid.
pub(crate) fn arg_timeout(ms: i64) -> Result<Option<Duration>> {
    match ms {
        DC_TIMEOUT_DEFAULT => Ok(None),
        ms if ms >= 0 => Ok(Some(Duration::from_millis(ms as u64))),
        ms => Err(Error::invalid_argument(format!(
            "timeout {ms} ms: use -1 (default), 0 (forever) or a positive number"
        ))),
    }
}

/// A timeout that must be given explicitly (0 is forever).
pub(crate) fn arg_duration(ms: i64) -> Result<Duration> {
    u64::try_from(ms)
        .map(Duration::from_millis)
        .map_err(|_| Error::invalid_argument(format!("timeout {ms} ms must not be negative")))
}

/// Milliseconds of a duration, saturating.
pub(crate) fn to_millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn null_error(name: &str) -> Error {
    Error::invalid_argument(format!("{name} must not be NULL"))
}

/// Hands a new handle to C through an out-parameter.
pub(crate) fn give<T>(out: &mut *mut T, value: T) {
    *out = Box::into_raw(Box::new(value));
}

/// Takes back and drops a handle given to C by [`give`]; NULL does nothing.
pub(crate) unsafe fn drop_handle<T>(function: &str, handle: *mut T) {
    boundary_void(function, || {
        if !handle.is_null() {
            // SAFETY: `handle` came from `give` and is freed once.
            drop(unsafe { Box::from_raw(handle) });
        }
    })
}

/// A `void *user_data` given with a callback, moved to whichever thread runs it.
#[derive(Clone, Copy)]
pub(crate) struct UserData(pub(crate) *mut std::ffi::c_void);

// SAFETY: the header documents that callbacks run on other threads; the
// caller owns the synchronisation of what user_data points at.
unsafe impl Send for UserData {}
// SAFETY: as above.
unsafe impl Sync for UserData {}

#[cfg(test)]
mod tests;
