"""Exceptions, matching torch.distributed's where PyTorch has them.

PyTorch (torch/csrc/distributed/c10d/exception.h, exposed by
torch/_C/_distributed_c10d and re-exported by torch.distributed) has
``DistError(RuntimeError)`` with ``DistStoreError``, ``DistNetworkError`` and
``DistBackendError`` under it, and ``QueueEmptyError(DistStoreError)`` (C++
``DistQueueEmptyError``). A store timeout there is a ``DistStoreError``
("Wait timeout"); a bad argument is a ``ValueError`` (``std::invalid_argument``)
or a ``TypeError`` (wrong Python type).

Every exception raised for a failed distcore call is a :class:`DistError`
carrying ``status`` (the ``dc_status`` code, a :class:`Status`) and
``message`` (``dc_last_error_message()``, also ``str(exc)``).
"""
from __future__ import annotations

import enum


class Status(enum.IntEnum):
    """dc_status codes (``DC_OK``, ``DC_ERR_*`` in distcore.h)."""

    OK = 0
    INVALID_ARGUMENT = 1
    TIMEOUT = 2
    NETWORK = 3
    QUEUE_EMPTY = 4
    NOT_SUPPORTED = 5
    REMOTE = 6
    SHUT_DOWN = 7
    ABORTED = 8
    PROTOCOL = 9
    IO = 10
    INVALID_STATE = 11
    INTERNAL = 12
    PERMISSION_DENIED = 13
    QUOTA_EXCEEDED = 14
    PEER_FAILED = 15


class DistError(RuntimeError):
    """A failed distcore call (torch.distributed.DistError)."""

    #: The status of an instance created without one (each subclass has its own).
    default_status = Status.INTERNAL

    #: The dc_status code: a :class:`Status`, or the plain int of a code this
    #: package does not know.
    status: Status | int

    def __init__(self, message: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is None:
            status = self.default_status
        try:
            status = Status(status)
        except ValueError:  # a code this package does not know: kept as is
            pass
        self.status = status

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type[DistError], tuple[str, int]]:
        return (type(self), (self.message, int(self.status)))


class DistStoreError(DistError):
    """A store operation failed (torch.distributed.DistStoreError)."""


class DistNetworkError(DistError):
    """A connection failed or closed, or a peer is unreachable
    (torch.distributed.DistNetworkError). DC_ERR_NETWORK."""

    default_status = Status.NETWORK


class QueueEmptyError(DistStoreError):
    """A non-blocking queue_pop found the queue empty
    (torch.distributed.QueueEmptyError, C++ DistQueueEmptyError).
    DC_ERR_QUEUE_EMPTY."""

    default_status = Status.QUEUE_EMPTY


DistQueueEmptyError = QueueEmptyError


class DistTimeoutError(DistStoreError, TimeoutError):
    """A wait, get, barrier, work or call did not finish within its timeout.
    DC_ERR_TIMEOUT. A DistStoreError, as PyTorch raises for a store timeout,
    and the builtin TimeoutError."""

    default_status = Status.TIMEOUT


class DistValueError(DistError, ValueError):
    """A bad argument (a length over a limit, a key that is not UTF-8, an
    out-of-range value, a value that is not an integer for add).
    DC_ERR_INVALID_ARGUMENT; a ValueError as in PyTorch."""

    default_status = Status.INVALID_ARGUMENT


class DistNotSupportedError(DistError, NotImplementedError):
    """The object does not support the operation. DC_ERR_NOT_SUPPORTED."""

    default_status = Status.NOT_SUPPORTED


class DistRemoteError(DistError):
    """A remote peer (an RPC function) reported an error. DC_ERR_REMOTE."""

    default_status = Status.REMOTE


class DistShutdownError(DistError):
    """The component has been shut down. DC_ERR_SHUT_DOWN."""

    default_status = Status.SHUT_DOWN


class DistAbortedError(DistError):
    """The operation was aborted. DC_ERR_ABORTED."""

    default_status = Status.ABORTED


class DistProtocolError(DistNetworkError):
    """A peer broke the wire protocol. DC_ERR_PROTOCOL."""

    default_status = Status.PROTOCOL


class DistIOError(DistStoreError):
    """A local I/O error (a FileStore path that cannot be opened). DC_ERR_IO;
    a DistStoreError as PyTorch's FileStore raises."""

    default_status = Status.IO


class DistStateError(DistError):
    """The object is not in a state that allows the call: a work not
    completed yet, an RRef read on a user, a handle made before fork() used
    in the child. DC_ERR_INVALID_STATE."""

    default_status = Status.INVALID_STATE


class DistInternalError(DistError):
    """A bug inside distcore, including a caught panic. DC_ERR_INTERNAL."""

    default_status = Status.INTERNAL


class DistPermissionError(DistError):
    """The peer would not let this caller in: a wrong or missing secret, an
    address outside the server's allow-list. DC_ERR_PERMISSION_DENIED."""

    default_status = Status.PERMISSION_DENIED


class DistQuotaError(DistStoreError):
    """The server refused to hold more: its quota of keys or stored bytes.
    DC_ERR_QUOTA_EXCEEDED."""

    default_status = Status.QUOTA_EXCEEDED


class DistPeerError(DistError):
    """A member of this caller's group failed (crashed, went silent past its
    TTL, reported an error, or was replaced); the message names it, why, and
    when it was last heard from. DC_ERR_PEER_FAILED."""

    default_status = Status.PEER_FAILED


_BY_STATUS: dict[int, type[DistError]] = {
    Status.INVALID_ARGUMENT: DistValueError,
    Status.TIMEOUT: DistTimeoutError,
    Status.NETWORK: DistNetworkError,
    Status.QUEUE_EMPTY: QueueEmptyError,
    Status.NOT_SUPPORTED: DistNotSupportedError,
    Status.REMOTE: DistRemoteError,
    Status.SHUT_DOWN: DistShutdownError,
    Status.ABORTED: DistAbortedError,
    Status.PROTOCOL: DistProtocolError,
    Status.IO: DistIOError,
    Status.INVALID_STATE: DistStateError,
    Status.INTERNAL: DistInternalError,
    Status.PERMISSION_DENIED: DistPermissionError,
    Status.QUOTA_EXCEEDED: DistQuotaError,
    Status.PEER_FAILED: DistPeerError,
}


def error_for(status: int, message: str) -> DistError:
    """The exception for a dc_status and its message."""
    cls = _BY_STATUS.get(status, DistError)
    return cls(message, status)
