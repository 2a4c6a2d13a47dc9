//! `dc_set_log_callback`: routing distcore's log lines to the host.

use std::ffi::{c_char, c_void, CString};

use super::{boundary, dc_status, UserData};
use crate::error::Error;
use crate::runtime::logging::{set_sink, LogLevel};

/// A log level as C passes it: a `dc_log_level` value, checked before use.
pub type LogLevelCode = i32;

/// Receives one log line: its level (DC_LOG_LEVEL_ERROR ... TRACE), its
/// target (the distcore module that wrote it, e.g.
/// "distcore::store::tcp::server") and its text, both NUL-terminated and
/// valid during the call only.
///
/// Runs on the thread that logs: a caller's thread inside a distcore call,
/// or one of distcore's own (a server's event loop, the RPC agent), possibly
/// on several threads at once, so it must be thread-safe. It must return
/// promptly (the thread that logs waits for it) and must not call distcore
/// functions (it may run while distcore holds its locks).
pub type dc_log_fn = Option<
    unsafe extern "C" fn(
        level: LogLevelCode,
        target: *const c_char,
        message: *const c_char,
        user_data: *mut c_void,
    ),
>;

/// Sends distcore's log lines at `level` or more severe to `callback`
/// (`level` DC_LOG_LEVEL_OFF: none), process-wide, replacing any previous
/// callback. A NULL `callback` sends them to stderr again, at `level`.
/// Without a call, lines go to stderr at the level `DISTCORE_LOG` names
/// (off, error, warn, info, debug, trace; default warn).
///
/// Errors: DC_ERR_INVALID_ARGUMENT for a `level` that is not a
/// dc_log_level; DC_ERR_INVALID_STATE when the process installed a Rust
/// `log` logger of its own (distcore then logs through that one), or when
/// called from inside a log callback (lines distcore logs while a callback
/// runs on that thread go to stderr).
/// Blocks only until lines being delivered to the previous callback have
/// been: when it returns, the previous callback is no longer running and
/// its `user_data` may be released. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn dc_set_log_callback(
    level: LogLevelCode,
    callback: dc_log_fn,
    user_data: *mut c_void,
) -> dc_status {
    boundary("dc_set_log_callback", || {
        let level = LogLevel::from_code(level)
            .ok_or_else(|| Error::invalid_argument(format!("unknown log level {level}")))?;
        let user_data = UserData(user_data);
        let sink = callback.map(|callback| {
            Box::new(move |level: LogLevel, target: &str, message: &str| {
                let user_data = user_data;
                let target = CString::new(target.replace('\0', "\\0")).unwrap_or_default();
                let message = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
                // SAFETY: the caller gave a valid function; the strings live
                // for the call.
                unsafe { callback(level as i32, target.as_ptr(), message.as_ptr(), user_data.0) };
            }) as crate::runtime::logging::Sink
        });
        set_sink(level, sink)
    })
}
