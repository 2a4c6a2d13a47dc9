//! The one error type of distcore and the status codes it maps to at the C ABI.

use std::ffi::CStr;
use std::fmt;

/// The kind of a failure: what a C caller sees as a `dc_status` code.
///
/// The numeric values are part of the ABI and never change; new kinds are
/// appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// A NULL pointer, a bad length, an invalid UTF-8 key, an out-of-range value.
    InvalidArgument = 1,
    /// A wait, a get or a barrier did not finish within its timeout.
    Timeout = 2,
    /// A connection failed, closed, or the peer is unreachable.
    Network = 3,
    /// A non-blocking queue pop found the queue empty.
    QueueEmpty = 4,
    /// The operation is not supported by this object.
    NotSupported = 5,
    /// A remote peer reported an error.
    Remote = 6,
    /// The component has been shut down.
    ShutDown = 7,
    /// The operation was aborted.
    Aborted = 8,
    /// A peer broke the wire protocol.
    Protocol = 9,
    /// A local I/O error (files).
    Io = 10,
    /// The object is not in a state that allows the call (e.g. not completed yet).
    InvalidState = 11,
    /// A bug inside distcore, including a caught panic.
    Internal = 12,
    /// The peer would not let this caller in: a wrong or missing secret, an
    /// address outside the server's allow-list.
    PermissionDenied = 13,
    /// The server refused to hold more: its quota of keys or stored bytes.
    QuotaExceeded = 14,
    /// A member of this caller's group failed (its process crashed, went
    /// silent past its TTL, reported an error, or was replaced): the message
    /// names it, why, and when it was last heard from.
    PeerFailed = 15,
}

impl Status {
    /// Every status, in numeric order.
    pub const ALL: [Status; 16] = [
        Status::Ok,
        Status::InvalidArgument,
        Status::Timeout,
        Status::Network,
        Status::QueueEmpty,
        Status::NotSupported,
        Status::Remote,
        Status::ShutDown,
        Status::Aborted,
        Status::Protocol,
        Status::Io,
        Status::InvalidState,
        Status::Internal,
        Status::PermissionDenied,
        Status::QuotaExceeded,
        Status::PeerFailed,
    ];

    /// The status with this numeric code, if there is one.
    pub fn from_code(code: i32) -> Option<Status> {
        Status::ALL.iter().copied().find(|s| *s as i32 == code)
    }

    /// The numeric code of this status.
    pub fn code(self) -> i32 {
        self as i32
    }

    /// A short, static description of the status, NUL-terminated for C.
    pub fn describe_c(self) -> &'static CStr {
        match self {
            Status::Ok => c"success",
            Status::InvalidArgument => c"invalid argument",
            Status::Timeout => c"timed out",
            Status::Network => c"network error",
            Status::QueueEmpty => c"queue empty",
            Status::NotSupported => c"not supported",
            Status::Remote => c"remote error",
            Status::ShutDown => c"shut down",
            Status::Aborted => c"aborted",
            Status::Protocol => c"protocol error",
            Status::Io => c"I/O error",
            Status::InvalidState => c"invalid state",
            Status::Internal => c"internal error",
            Status::PermissionDenied => c"permission denied",
            Status::QuotaExceeded => c"quota exceeded",
            Status::PeerFailed => c"peer failed",
        }
    }

    /// A short, static description of the status.
    pub fn describe(self) -> &'static str {
        self.describe_c().to_str().unwrap_or("")
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// A failure: its kind and a human-readable message (PyTorch's wording where
/// PyTorch has one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    status: Status,
    message: String,
}

impl Error {
    /// An error of the given kind. `Status::Ok` is not an error and becomes
    /// `Status::Internal`.
    pub fn new(status: Status, message: impl Into<String>) -> Error {
        let status = if status == Status::Ok {
            Status::Internal
        } else {
            status
        };
        Error {
            status,
            message: message.into(),
        }
    }

    /// The kind of the failure.
    pub fn status(&self) -> Status {
        self.status
    }

    /// The message of the failure.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// [`Status::InvalidArgument`].
    pub fn invalid_argument(message: impl Into<String>) -> Error {
        Error::new(Status::InvalidArgument, message)
    }

    /// [`Status::Timeout`].
    pub fn timeout(message: impl Into<String>) -> Error {
        Error::new(Status::Timeout, message)
    }

    /// [`Status::Network`].
    pub fn network(message: impl Into<String>) -> Error {
        Error::new(Status::Network, message)
    }

    /// [`Status::NotSupported`].
    pub fn not_supported(message: impl Into<String>) -> Error {
        Error::new(Status::NotSupported, message)
    }

    /// [`Status::InvalidState`].
    pub fn invalid_state(message: impl Into<String>) -> Error {
        Error::new(Status::InvalidState, message)
    }

    /// [`Status::PermissionDenied`].
    pub fn permission_denied(message: impl Into<String>) -> Error {
        Error::new(Status::PermissionDenied, message)
    }

    /// [`Status::QuotaExceeded`].
    pub fn quota_exceeded(message: impl Into<String>) -> Error {
        Error::new(Status::QuotaExceeded, message)
    }

    /// [`Status::Internal`].
    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(Status::Internal, message)
    }
}

/// The result type of every fallible distcore call.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_dense() {
        for (i, s) in Status::ALL.iter().enumerate() {
            assert_eq!(s.code(), i as i32);
            assert_eq!(Status::from_code(i as i32), Some(*s));
        }
        assert_eq!(Status::from_code(-1), None);
        assert_eq!(Status::from_code(Status::ALL.len() as i32), None);
    }

    #[test]
    fn ok_is_never_an_error() {
        assert_eq!(Error::new(Status::Ok, "x").status(), Status::Internal);
    }
}
