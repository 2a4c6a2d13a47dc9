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
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result, Status};
use crate::runtime::fork::Born;
use crate::security::auth::Secret;
use crate::security::tls::TlsFiles;

pub mod buf;
pub mod elastic;
pub mod etcd;
pub mod log;
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
/// The peer would not let the caller in: a wrong or missing secret, an
/// address outside the server's allow-list.
pub const DC_ERR_PERMISSION_DENIED: dc_status = 13;
/// The server refused to hold more: its quota of keys or stored bytes.
pub const DC_ERR_QUOTA_EXCEEDED: dc_status = 14;

/// The major version of the header: programs built against one major
/// version run with any library of that major version
/// (`libdistcore.so.MAJOR`) at least as new as the header.
pub const DC_VERSION_MAJOR: u32 = 1;
/// The minor version of the header: grows when functions, constants or
/// struct fields are added.
pub const DC_VERSION_MINOR: u32 = 3;
/// The patch version of the header: grows with fixes that change no
/// declaration.
pub const DC_VERSION_PATCH: u32 = 0;

/// `DC_VERSION_*` as Cargo.toml has it (one source of truth: the build
/// fails when they differ).
const _: () = {
    const fn parse(s: &str) -> u32 {
        let (bytes, mut i, mut n) = (s.as_bytes(), 0, 0u32);
        while i < bytes.len() {
            n = n * 10 + (bytes[i] - b'0') as u32;
            i += 1;
        }
        n
    }
    assert!(DC_VERSION_MAJOR == parse(env!("CARGO_PKG_VERSION_MAJOR")));
    assert!(DC_VERSION_MINOR == parse(env!("CARGO_PKG_VERSION_MINOR")));
    assert!(DC_VERSION_PATCH == parse(env!("CARGO_PKG_VERSION_PATCH")));
};

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
    assert!(DC_ERR_PERMISSION_DENIED == Status::PermissionDenied as i32);
    assert!(DC_ERR_QUOTA_EXCEEDED == Status::QuotaExceeded as i32);
};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records the message of a failure for `dc_last_error_message` (lost when
/// the thread's storage is already gone: a call from a thread-local
/// destructor).
fn set_last_error(error: &Error) {
    let text = CString::new(error.message().replace('\0', "\\0")).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|last| *last.borrow_mut() = text);
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

/// Runs the body of a function returning a C string, containing any panic
/// (the function then returns `fallback`).
pub(crate) fn boundary_str(
    function: &str,
    fallback: *const c_char,
    body: impl FnOnce() -> *const c_char,
) -> *const c_char {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|_| {
        ::log::error!("panic in {function}");
        fallback
    })
}

/// The message of the last failure on the calling thread ("" if none).
/// Valid until the next failing distcore call on this thread (copy it to
/// keep it); never NULL; never fails or blocks.
#[no_mangle]
pub extern "C" fn dc_last_error_message() -> *const c_char {
    LAST_ERROR
        .try_with(|last| last.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

/// A static description of a status code ("timed out", ...); "unknown
/// status" for a code distcore does not define. Never NULL; never fails or
/// blocks.
#[no_mangle]
pub extern "C" fn dc_status_str(code: dc_status) -> *const c_char {
    boundary_str("dc_status_str", c"unknown status".as_ptr(), || {
        Status::from_code(code)
            .map_or(c"unknown status", Status::describe_c)
            .as_ptr()
    })
}

/// The version of the library that is running, "major.minor.patch" (compare
/// with the DC_VERSION_* macros the program was built with). Static; never
/// NULL; never fails or blocks.
#[no_mangle]
pub extern "C" fn dc_version() -> *const c_char {
    const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    boundary_str("dc_version", VERSION.as_ptr().cast(), || {
        VERSION.as_ptr().cast()
    })
}

/// A struct that grows: `#[repr(C)]`, its first field is `struct_size`
/// (`size_t`), the `sizeof` the caller's header gave the struct, and fields
/// are only ever appended. The library reads and writes only those bytes,
/// so a program built against an older header keeps working: fields it
/// does not know keep their defaults.
///
/// # Safety
/// The first field must be a `usize`, and `SIZES` must list sizes of the
/// struct that end on a field boundary.
pub(crate) unsafe trait Versioned: Copy {
    /// Every size the struct had in a released header, oldest first; the
    /// current size last. A field appended is a new size appended here
    /// (and a new line in abi/layouts.txt).
    const SIZES: &'static [usize];
    /// How a caller sets `struct_size`, for the error message.
    const HOW_TO_SET: &'static str;
}

fn versioned_size<T: Versioned>(size: usize, name: &str) -> Result<usize> {
    debug_assert_eq!(T::SIZES.last(), Some(&std::mem::size_of::<T>()));
    if T::SIZES.contains(&size) {
        return Ok(size);
    }
    Err(Error::invalid_argument(format!(
        "{name}->struct_size is {size}, which no distcore header gave this struct (this \
         library knows {:?}): {}",
        T::SIZES,
        T::HOW_TO_SET
    )))
}

/// Reads a versioned struct the caller filled: the fields its header knew,
/// over `defaults` for the others.
pub(crate) unsafe fn arg_versioned<T: Versioned>(
    ptr: *const T,
    name: &str,
    defaults: T,
) -> Result<T> {
    if ptr.is_null() {
        return Err(null_error(name));
    }
    // SAFETY: a non-NULL pointer is valid per the module contract, and the
    // first field is a usize (the trait's contract).
    let size = versioned_size::<T>(unsafe { ptr.cast::<usize>().read_unaligned() }, name)?;
    let mut value = defaults;
    // SAFETY: the caller's struct has `size` bytes (its header's sizeof),
    // no more than T's; `value` is a distinct local.
    unsafe {
        std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), (&mut value as *mut T).cast::<u8>(), size)
    };
    Ok(value)
}

/// Writes the first `size` bytes of `value` (the fields a header with that
/// `sizeof` knew) into the caller's struct, and `size` into its
/// `struct_size`.
pub(crate) unsafe fn write_versioned<T: Versioned>(
    ptr: *mut T,
    name: &str,
    size: usize,
    value: T,
) -> Result<()> {
    if ptr.is_null() {
        return Err(null_error(name));
    }
    let size = versioned_size::<T>(size, name)?;
    // SAFETY: the caller's struct has `size` writable bytes; the first
    // field is a usize.
    unsafe {
        std::ptr::copy_nonoverlapping((&value as *const T).cast::<u8>(), ptr.cast::<u8>(), size);
        ptr.cast::<usize>().write_unaligned(size);
    }
    Ok(())
}

/// An output struct whose `struct_size` the caller set: checks it before
/// any work is done, and returns it for [`write_versioned`].
pub(crate) unsafe fn arg_versioned_out<T: Versioned>(ptr: *mut T, name: &str) -> Result<usize> {
    if ptr.is_null() {
        return Err(null_error(name));
    }
    // SAFETY: non-NULL and valid; the first field is a usize.
    versioned_size::<T>(unsafe { ptr.cast::<usize>().read_unaligned() }, name)
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

/// A shared secret of `len` bytes at `data`: NULL with 0 is none; NULL
/// with a length, or an empty secret, is invalid.
pub(crate) unsafe fn arg_secret(data: *const u8, len: usize, name: &str) -> Result<Option<Secret>> {
    match (data.is_null(), len) {
        (true, 0) => Ok(None),
        // SAFETY: forwarded contract.
        _ => Secret::new(unsafe { arg_bytes(data, len, name) }?.to_vec()).map(Some),
    }
}

/// The TLS fields of an options struct that has them (`tls_cert_file`,
/// `tls_key_file`, `tls_ca_file`, `tls_client_ca_file`, `tls_server_name`).
macro_rules! tls_args {
    ($opts:expr) => {
        $crate::ffi::TlsArgs {
            cert: $opts.tls_cert_file,
            key: $opts.tls_key_file,
            ca: $opts.tls_ca_file,
            client_ca: $opts.tls_client_ca_file,
            server_name: $opts.tls_server_name,
        }
    };
}
pub(crate) use tls_args;

/// An options struct's five TLS file fields, named `<prefix>tls_...`.
pub(crate) struct TlsArgs {
    pub(crate) cert: *const c_char,
    pub(crate) key: *const c_char,
    pub(crate) ca: *const c_char,
    pub(crate) client_ca: *const c_char,
    pub(crate) server_name: *const c_char,
}

impl TlsArgs {
    /// The files named (NULL: none), checked as UTF-8 paths; `prefix`
    /// names the struct in errors ("opts->").
    pub(crate) unsafe fn files(&self, prefix: &str) -> Result<TlsFiles> {
        let text = |ptr: *const c_char, field: &str| -> Result<Option<String>> {
            // SAFETY: forwarded contract.
            Ok(unsafe { arg_opt_str(ptr, &format!("{prefix}{field}")) }?.map(str::to_owned))
        };
        Ok(TlsFiles {
            cert: text(self.cert, "tls_cert_file")?.map(PathBuf::from),
            key: text(self.key, "tls_key_file")?.map(PathBuf::from),
            ca: text(self.ca, "tls_ca_file")?.map(PathBuf::from),
            client_ca: text(self.client_ca, "tls_client_ca_file")?.map(PathBuf::from),
            server_name: text(self.server_name, "tls_server_name")?,
        })
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

/// A handle given to C, which remembers the process it was made in.
pub(crate) trait Handle {
    /// What the handle is, for messages ("store", "work", ...).
    const KIND: &'static str;
    /// The process generation the handle was made in.
    fn born(&self) -> Born;
}

/// A required handle argument: `DC_ERR_INVALID_STATE` in a child forked
/// after the handle was made (see [`crate::runtime::fork`]).
pub(crate) unsafe fn arg_handle<'a, T: Handle>(ptr: *const T, name: &str) -> Result<&'a T> {
    // SAFETY: forwarded contract.
    let handle = unsafe { arg_ref(ptr, name) }?;
    handle.born().check(T::KIND)?;
    Ok(handle)
}

/// Hands a new handle to C through an out-parameter (and, on the first,
/// installs distcore's logger).
pub(crate) fn give<T>(out: &mut *mut T, value: T) {
    crate::runtime::logging::init();
    *out = Box::into_raw(Box::new(value));
}

/// Takes back and drops a handle given to C by [`give`]; NULL does
/// nothing. In a child forked after the handle was made, nothing is
/// released: what it holds (threads, sockets, locks) belongs to the parent.
pub(crate) unsafe fn drop_handle<T: Handle>(function: &str, handle: *mut T) {
    boundary_void(function, || {
        // SAFETY: NULL or a handle from `give`, freed once.
        if unsafe { handle.as_ref() }.is_some_and(|h| h.born().is_current()) {
            // SAFETY: as above.
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
