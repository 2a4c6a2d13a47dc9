//! `dc_work_*`: the C face of [`crate::work::Work`], and the profiler hooks.

use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::Arc;

use super::buf::dc_buf;
use super::{
    arg_bytes, arg_handle, arg_opt_str, arg_out, arg_timeout, boundary, boundary_str, dc_status,
    drop_handle, give, read_into, to_millis, Handle, UserData, DC_OK, DC_TIMEOUT_FOREVER,
};
use crate::error::{Error, Result, Status};
use crate::net::bigbuf::try_copy;
use crate::runtime::fork::Born;
use crate::work::profiler::{set_profiler_hooks, ProfilerHooks};
use crate::work::{OpType, Work};

/// The completion handle of an asynchronous operation (c10d's Work).
/// Thread-safe; free with `dc_work_free` (the operation itself goes on).
pub struct dc_work {
    pub(crate) work: Work,
    born: Born,
}

impl dc_work {
    pub(crate) fn new(work: Work) -> dc_work {
        dc_work {
            work,
            born: Born::now(),
        }
    }
}

impl Handle for dc_work {
    const KIND: &'static str = "work";
    fn born(&self) -> Born {
        self.born
    }
}

/// Called once when a work completes, on the thread that completes it (or
/// at once, on the calling thread, if it already had). `work` is a borrowed
/// view valid during the call only: do not free it.
pub type dc_work_callback =
    Option<unsafe extern "C" fn(work: *const dc_work, user_data: *mut c_void)>;

/// Profiler begin hook: a work titled `title` was created; the returned
/// token is passed to the end hook. Runs on the creating thread.
pub type dc_profiler_begin_fn =
    Option<unsafe extern "C" fn(title: *const c_char, user_data: *mut c_void) -> u64>;

/// Profiler end hook: the span `begin` returned `token` for has ended (the
/// work finished or was freed unfinished). Runs on that thread, once per begin.
pub type dc_profiler_end_fn =
    Option<unsafe extern "C" fn(title: *const c_char, token: u64, user_data: *mut c_void)>;

/// The work behind a handle, as a reference of its own: a call that blocks
/// keeps the work alive even if another thread frees the handle meanwhile.
unsafe fn work_arg(work: *const dc_work) -> Result<Work> {
    // SAFETY: forwarded contract.
    Ok(unsafe { arg_handle(work, "work") }?.work.clone())
}

/// An error from a caller-given status and message; `DC_OK` is no error.
unsafe fn error_arg(status: dc_status, message: *const c_char) -> Result<Option<Error>> {
    if status == DC_OK {
        return Ok(None);
    }
    let status = Status::from_code(status)
        .ok_or_else(|| Error::invalid_argument(format!("unknown status code {status}")))?;
    // SAFETY: forwarded contract.
    let message = unsafe { arg_opt_str(message, "error_message") }?.unwrap_or(status.describe());
    Ok(Some(Error::new(status, message)))
}

/// An op type as C passes it: a `dc_op_type` value, checked before use
/// (a number C sends need not be one of the enum's).
pub type OpTypeCode = i32;

/// Creates a pending work of `rank` performing `op_type` (c10d's OpType
/// numbers) and writes it into `out`. `profiling_title` may be NULL; with
/// one, the profiler begin hook runs now, on this thread, and the end hook
/// when the work finishes (or its last handle is freed unfinished).
/// `timeout_ms`: DC_TIMEOUT_DEFAULT or DC_TIMEOUT_FOREVER for none, else the
/// work's own timeout, which `dc_work_timeout` reports and `dc_work_wait`
/// uses by default.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for an `op_type` that is not a
/// dc_op_type or a timeout below -1. Never blocks (beyond the begin hook).
#[no_mangle]
pub unsafe extern "C" fn dc_work_new(
    rank: i32,
    op_type: OpTypeCode,
    profiling_title: *const c_char,
    timeout_ms: i64,
    out: *mut *mut dc_work,
) -> dc_status {
    boundary("dc_work_new", || {
        let out = unsafe { arg_out(out, "out") }?;
        let op_type = OpType::from_code(op_type)
            .ok_or_else(|| Error::invalid_argument(format!("unknown op type {op_type}")))?;
        let title = unsafe { arg_opt_str(profiling_title, "profiling_title") }?;
        let timeout = arg_timeout(timeout_ms)?.filter(|t| !t.is_zero());
        give(out, dc_work::new(Work::new(rank, op_type, title, timeout)));
        Ok(())
    })
}

/// Creates a pending work that wraps a future (c10d's create_from_future):
/// rank -1, op type DC_OP_TYPE_UNKNOWN, no timeout, completed by
/// `dc_work_finish_with_result` or `dc_work_finish`.
///
/// Errors: only the common ones. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_work_new_future(out: *mut *mut dc_work) -> dc_status {
    boundary("dc_work_new_future", || {
        give(
            unsafe { arg_out(out, "out") }?,
            dc_work::new(Work::from_future()),
        );
        Ok(())
    })
}

/// Releases a work handle. NULL does nothing. Safe while other threads are
/// inside calls on the handle (`dc_work_wait` included): they hold the work
/// until they return, and its callbacks still run. Freeing the last handle
/// of a pending async store operation with no callback registered releases
/// the operation (its connection closes; the server forgets the wait).
/// Never fails or blocks (beyond the profiler end hook of an unfinished
/// profiled work).
#[no_mangle]
pub unsafe extern "C" fn dc_work_free(work: *mut dc_work) {
    unsafe { drop_handle("dc_work_free", work) }
}

/// Writes into `out` whether the work has completed (successfully or not).
///
/// Errors: only the common ones. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_work_is_completed(work: *const dc_work, out: *mut bool) -> dc_status {
    unsafe {
        read_into(
            "dc_work_is_completed",
            || work_arg(work),
            (out, "out"),
            |work| Ok(work.is_completed()),
        )
    }
}

/// Writes into `out` whether the work completed without an error (false
/// while pending).
///
/// Errors: only the common ones. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_work_is_success(work: *const dc_work, out: *mut bool) -> dc_status {
    unsafe {
        read_into(
            "dc_work_is_success",
            || work_arg(work),
            (out, "out"),
            |work| Ok(work.is_success()),
        )
    }
}

/// Writes the error of a failed work: its status into `out_status` (DC_OK
/// when the work has not failed) and, if `out_message` is not NULL, its
/// message into a new buffer (empty when there is none).
///
/// Errors: only the common ones. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_work_error(
    work: *const dc_work,
    out_status: *mut dc_status,
    out_message: *mut dc_buf,
) -> dc_status {
    boundary("dc_work_error", || {
        let work = unsafe { work_arg(work) }?;
        let out_status = unsafe { arg_out(out_status, "out_status") }?;
        let error = work.error();
        *out_status = error.as_ref().map_or(DC_OK, |e| e.status().code());
        // SAFETY: NULL or a valid buffer per the contract.
        if let Some(out_message) = unsafe { out_message.as_mut() } {
            *out_message =
                dc_buf::from_bytes(error.as_ref().map_or("", |e| e.message()).as_bytes());
        }
        Ok(())
    })
}

/// Blocks until the work completes, for at most `timeout_ms`
/// (DC_TIMEOUT_DEFAULT: the work's own timeout, or forever without one;
/// DC_TIMEOUT_FOREVER: forever). Any number of threads may wait at once.
///
/// Errors: the work's own error (every time it is waited on, with its
/// message); DC_ERR_TIMEOUT ("Operation timed out!", c10d's words) when it
/// is still pending at the deadline (the work goes on).
#[no_mangle]
pub unsafe extern "C" fn dc_work_wait(work: *const dc_work, timeout_ms: i64) -> dc_status {
    boundary("dc_work_wait", || {
        let work = unsafe { work_arg(work) }?;
        work.wait(arg_timeout(timeout_ms)?)
    })
}

/// Completes the work: successfully when `error_status` is DC_OK, else failed
/// with that status and `error_message` (NULL: the status's description).
/// Waiters wake, the fd becomes readable, and the callbacks run on this
/// thread before this returns.
///
/// Errors: DC_ERR_INVALID_STATE if the work had already completed;
/// DC_ERR_INVALID_ARGUMENT for an `error_status` that is not a dc_status.
/// Blocks while the callbacks run.
#[no_mangle]
pub unsafe extern "C" fn dc_work_finish(
    work: *const dc_work,
    error_status: dc_status,
    error_message: *const c_char,
) -> dc_status {
    boundary("dc_work_finish", || {
        let work = unsafe { work_arg(work) }?;
        work.finish(unsafe { error_arg(error_status, error_message) }?)
    })
}

/// Completes the work like `dc_work_finish`, then returns `error_status`
/// (with its message as the last error): c10d's finishAndThrow.
///
/// Errors: as `dc_work_finish`, else `error_status` itself.
#[no_mangle]
pub unsafe extern "C" fn dc_work_finish_and_throw(
    work: *const dc_work,
    error_status: dc_status,
    error_message: *const c_char,
) -> dc_status {
    boundary("dc_work_finish_and_throw", || {
        let work = unsafe { work_arg(work) }?;
        work.finish_and_throw(unsafe { error_arg(error_status, error_message) }?)
    })
}

/// Completes the work successfully with a copy of the `len` bytes at `data`
/// as its result; callbacks run on this thread before this returns.
///
/// Errors: DC_ERR_INVALID_STATE if the work had already completed;
/// DC_ERR_INVALID_ARGUMENT when the bytes cannot be copied (too long).
#[no_mangle]
pub unsafe extern "C" fn dc_work_finish_with_result(
    work: *const dc_work,
    data: *const u8,
    len: usize,
) -> dc_status {
    boundary("dc_work_finish_with_result", || {
        let work = unsafe { work_arg(work) }?;
        let data = unsafe { arg_bytes(data, len, "data") }?;
        work.finish_with_result(try_copy(data, "dc_work_finish_with_result")?)
    })
}

/// Fails a pending work with DC_ERR_ABORTED ("Work aborted"), running its
/// callbacks on this thread; a completed work is left as it is. Aborting an
/// async store operation also releases what it holds (its connection, the
/// server's waiter).
///
/// Errors: only the common ones. Blocks while the callbacks run.
#[no_mangle]
pub unsafe extern "C" fn dc_work_abort(work: *const dc_work) -> dc_status {
    boundary("dc_work_abort", || {
        unsafe { work_arg(work) }?.abort();
        Ok(())
    })
}

/// Waits for the work's device streams; CPU works have none, so this returns
/// at once (c10d's base Work::synchronize).
///
/// Errors: only the common ones. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_work_synchronize(work: *const dc_work) -> dc_status {
    boundary("dc_work_synchronize", || {
        unsafe { work_arg(work) }?.synchronize();
        Ok(())
    })
}

/// Writes into `out` the rank a receive work got its data from.
///
/// Errors: DC_ERR_NOT_SUPPORTED for works that are not receives (c10d's
/// message); DC_ERR_INVALID_STATE before the source is known. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_work_source_rank(work: *const dc_work, out: *mut i32) -> dc_status {
    unsafe {
        read_into(
            "dc_work_source_rank",
            || work_arg(work),
            (out, "out"),
            |work| work.source_rank(),
        )
    }
}

/// Records the rank a receive work (op type RECV or RECV_ANY_SOURCE) got its
/// data from.
///
/// Errors: DC_ERR_NOT_SUPPORTED for works that are not receives. Never
/// blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_work_set_source_rank(work: *const dc_work, rank: i32) -> dc_status {
    boundary("dc_work_set_source_rank", || {
        unsafe { work_arg(work) }?.set_source_rank(rank)
    })
}

/// Writes a copy of the result bytes of a completed work into `out`.
///
/// Errors: a failed work's own error; DC_ERR_NOT_SUPPORTED ("result() not
/// implemented.") for a work completed without a result; DC_ERR_INVALID_STATE
/// while pending. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_work_result(work: *const dc_work, out: *mut dc_buf) -> dc_status {
    unsafe {
        read_into(
            "dc_work_result",
            || work_arg(work),
            (out, "out"),
            |work| Ok(dc_buf::from_bytes(&work.result()?)),
        )
    }
}

/// Writes into `out_seconds` the seconds from the work's creation to its
/// completion.
///
/// Errors: DC_ERR_INVALID_STATE while pending. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_work_duration(
    work: *const dc_work,
    out_seconds: *mut f64,
) -> dc_status {
    unsafe {
        read_into(
            "dc_work_duration",
            || work_arg(work),
            (out_seconds, "out_seconds"),
            |work| work.duration(),
        )
    }
}

/// Writes into `out` the work's sequence number: process-wide, increasing
/// with creation.
///
/// Errors: only the common ones. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_work_sequence_number(work: *const dc_work, out: *mut u64) -> dc_status {
    unsafe {
        read_into(
            "dc_work_sequence_number",
            || work_arg(work),
            (out, "out"),
            |work| Ok(work.sequence_number()),
        )
    }
}

/// Writes into `out` the rank the work was created with (-1 for a future
/// work).
///
/// Errors: only the common ones. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_work_rank(work: *const dc_work, out: *mut i32) -> dc_status {
    unsafe {
        read_into(
            "dc_work_rank",
            || work_arg(work),
            (out, "out"),
            |work| Ok(work.rank()),
        )
    }
}

/// Writes into `out` the work's op type.
///
/// Errors: only the common ones. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_work_op_type(work: *const dc_work, out: *mut OpTypeCode) -> dc_status {
    unsafe {
        read_into(
            "dc_work_op_type",
            || work_arg(work),
            (out, "out"),
            |work| Ok(work.op_type() as i32),
        )
    }
}

/// Writes into `out_ms` the timeout the work was created with, in ms
/// (DC_TIMEOUT_FOREVER, 0, when it has none).
///
/// Errors: only the common ones. Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_work_timeout(work: *const dc_work, out_ms: *mut i64) -> dc_status {
    unsafe {
        read_into(
            "dc_work_timeout",
            || work_arg(work),
            (out_ms, "out_ms"),
            |work| Ok(work.timeout().map_or(DC_TIMEOUT_FOREVER, to_millis)),
        )
    }
}

/// c10d's name of an op type ("ALLREDUCE", "_ALLGATHER_BASE", ...), static;
/// NULL for a number that is not an op type. Never fails or blocks.
#[no_mangle]
pub extern "C" fn dc_op_type_name(op_type: OpTypeCode) -> *const c_char {
    static NAMES: once_cell::sync::Lazy<Vec<(i32, CString)>> = once_cell::sync::Lazy::new(|| {
        (0..=100)
            .filter_map(OpType::from_code)
            .map(|t| (t as i32, CString::new(t.name()).unwrap_or_default()))
            .collect()
    });
    boundary_str("dc_op_type_name", std::ptr::null(), || {
        NAMES
            .iter()
            .find(|(code, _)| *code == op_type)
            .map_or(std::ptr::null(), |(_, name)| name.as_ptr())
    })
}

/// Runs `callback(work_view, user_data)` once the work completes: on the
/// thread that completes it (see the operation that made the work: for
/// TCPStore async calls, the process's one async thread; for a HashStore
/// async call that times out, the process's one timer thread), or at once on
/// this thread if it already has. Callbacks run in the order they were
/// added, outside distcore's locks: they may call any distcore function, but
/// should return promptly (the completing thread waits for them, and other
/// works' completions on that thread wait too). `work_view` is
/// valid during the call only; `user_data` must stay valid until the
/// callback ran.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for a NULL callback. Blocks only to run
/// the callback when the work has already completed.
#[no_mangle]
pub unsafe extern "C" fn dc_work_add_done_callback(
    work: *const dc_work,
    callback: dc_work_callback,
    user_data: *mut c_void,
) -> dc_status {
    boundary("dc_work_add_done_callback", || {
        let work = unsafe { work_arg(work) }?;
        let callback =
            callback.ok_or_else(|| Error::invalid_argument("callback must not be NULL"))?;
        let user_data = UserData(user_data);
        work.add_done_callback(Box::new(move |done: &Work| {
            let view = dc_work::new(done.clone());
            let user_data = user_data;
            // SAFETY: the caller gave a valid function; `view` lives for the call.
            unsafe { callback(&view, user_data.0) };
        }));
        Ok(())
    })
}

/// Writes into `out_fd` a file descriptor that becomes readable once the
/// work completes (an eventfd; it stays readable). For poll/epoll/libuv/
/// asyncio: do not read or close it; it lives as long as the work.
///
/// Errors: DC_ERR_IO when no eventfd can be made (out of file descriptors).
/// Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_work_fd(work: *const dc_work, out_fd: *mut c_int) -> dc_status {
    unsafe {
        read_into(
            "dc_work_fd",
            || work_arg(work),
            (out_fd, "out_fd"),
            |work| work.ready_fd(),
        )
    }
}

struct CProfilerHooks {
    begin: unsafe extern "C" fn(*const c_char, *mut c_void) -> u64,
    end: unsafe extern "C" fn(*const c_char, u64, *mut c_void),
    user_data: UserData,
}

impl ProfilerHooks for CProfilerHooks {
    fn begin(&self, title: &str) -> u64 {
        let title = CString::new(title).unwrap_or_default();
        // SAFETY: the caller gave valid functions for as long as they are installed.
        unsafe { (self.begin)(title.as_ptr(), self.user_data.0) }
    }

    fn end(&self, title: &str, token: u64) {
        let title = CString::new(title).unwrap_or_default();
        // SAFETY: as above.
        unsafe { (self.end)(title.as_ptr(), token, self.user_data.0) }
    }
}

/// Installs process-wide profiler hooks: `begin` runs when a work with a
/// profiling title is created (on the creating thread), `end` exactly once
/// when it finishes or is freed unfinished (on that thread). Both NULL
/// removes the hooks; spans already begun still end on the hooks that began
/// them, so keep those callable and their `user_data` valid. Hooks must be
/// thread-safe and must not create or finish profiled works.
///
/// Errors: DC_ERR_INVALID_ARGUMENT for one NULL hook without the other.
/// Never blocks.
#[no_mangle]
pub unsafe extern "C" fn dc_set_profiler_hooks(
    begin: dc_profiler_begin_fn,
    end: dc_profiler_end_fn,
    user_data: *mut c_void,
) -> dc_status {
    boundary("dc_set_profiler_hooks", || match (begin, end) {
        (None, None) => {
            set_profiler_hooks(None);
            Ok(())
        }
        (Some(begin), Some(end)) => {
            set_profiler_hooks(Some(Arc::new(CProfilerHooks {
                begin,
                end,
                user_data: UserData(user_data),
            })));
            Ok(())
        }
        _ => Err(Error::invalid_argument(
            "begin and end must both be set or both be NULL",
        )),
    })
}
