"""Argument conversion shared by the modules, and the types of the
arguments they take."""
from __future__ import annotations

import math
import os
import threading
import weakref
from ctypes import c_char_p, c_size_t
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Callable, Iterable, Optional, SupportsInt, TypeVar, Union

from ._lib import TIMEOUT_DEFAULT

if TYPE_CHECKING:
    from ctypes import Array

    from ._lib import RpcOptions, TcpStoreOptions

#: A value (or a secret): str, encoded as UTF-8, or bytes-like.
Value = Union[str, bytes, bytearray, memoryview]
#: A file path.
FilePath = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
#: A timeout: a timedelta or a number of seconds; None for the default.
Timeout = Optional[Union[timedelta, float]]


def _path(value: FilePath | None, name: str) -> bytes | None:
    """A file path (str, bytes or os.PathLike) as a C option; None stays None."""
    if value is None:
        return None
    value = os.fsencode(value)
    if b"\0" in value:  # C would read a shorter path: another file
        raise ValueError(f"{name} has an embedded null byte")
    return value


def set_guards(opts: TcpStoreOptions | RpcOptions, secret: Value | None = None, tls_cert: FilePath | None = None,
               tls_key: FilePath | None = None, tls_ca: FilePath | None = None, tls_client_ca: FilePath | None = None,
               tls_server_name: str | None = None) -> None:
    """Sets the shared secret (str or bytes-like) and the TLS files of a C options struct that has them
    (dc_tcp_store_options, dc_rpc_options). The struct keeps the encoded values alive (ctypes holds
    what is assigned to its pointer fields)."""
    if secret is not None:
        if isinstance(secret, str):
            secret = secret.encode()
        elif isinstance(secret, (bytes, bytearray, memoryview)):
            secret = bytes(secret)
        else:
            raise TypeError(f"secret must be str or bytes, not {type(secret).__name__}")
        opts.secret, opts.secret_len = secret, len(secret)
    for field, name, value in (("tls_cert_file", "tls_cert", tls_cert), ("tls_key_file", "tls_key", tls_key),
                               ("tls_ca_file", "tls_ca", tls_ca), ("tls_client_ca_file", "tls_client_ca",
                                                                   tls_client_ca)):
        setattr(opts, field, _path(value, name))
    opts.tls_server_name = None if tls_server_name is None else _path(tls_server_name, "tls_server_name")


def int32_arg(value: SupportsInt, what: str) -> int:
    """An int passed as int32_t (a rank, a world size): out of range is a
    DistValueError, never silently wrapped by ctypes."""
    from ._errors import DistValueError
    value = int(value)
    if not -2**31 <= value < 2**31:
        raise DistValueError(f"{what} {value} is out of range (a 32-bit integer)")
    return value


def key_arg(key: str, what: str = "key") -> bytes:
    """A key: str (UTF-8), as PyTorch's Store takes."""
    if isinstance(key, str):
        return key.encode("utf-8")
    raise TypeError(f"{what} must be str, not {type(key).__name__}")


def value_arg(value: Value, what: str = "value") -> bytes:
    """A value: str (encoded as UTF-8, as PyTorch does) or bytes-like."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be str or bytes, not {type(value).__name__}")


def keys_arg(keys: Iterable[str]) -> tuple[Array[c_char_p], int]:
    """A list of keys as a `const char *const *` array and its length (the
    encoded keys are referenced by the array object, which keeps them alive)."""
    if isinstance(keys, (str, bytes)):
        raise TypeError("keys must be a sequence of str, not a single key")
    encoded = [key_arg(k) for k in keys]
    arr = (c_char_p * max(len(encoded), 1))(*encoded)
    return arr, len(encoded)


def values_arg(values: Iterable[Value]) -> tuple[Array[c_char_p], Array[c_size_t], int]:
    """Values as (array of pointers, array of lengths, count)."""
    if isinstance(values, (str, bytes)):
        raise TypeError("values must be a sequence of str or bytes, not a single value")
    encoded = [value_arg(v) for v in values]
    n = max(len(encoded), 1)
    return (c_char_p * n)(*encoded), (c_size_t * n)(*[len(v) for v in encoded]), len(encoded)


def _ceil_ms(seconds: float) -> int:
    """Whole milliseconds, rounded up; a positive time is at least 1 ms
    (0 would mean forever)."""
    ms = int(math.ceil(seconds * 1000 - 1e-9))
    return max(ms, 1) if seconds > 0 else ms


def store_timeout_ms(timeout: Timeout, allow_none: bool = True) -> int:
    """A store timeout: a timedelta (PyTorch's type; timedelta(0) waits
    forever, as PyTorch's kNoTimeout) or a number of seconds. None: the
    handle's own timeout. A positive timeout under 1 ms is 1 ms (never
    forever)."""
    if timeout is None:
        if allow_none:
            return TIMEOUT_DEFAULT
        raise TypeError("timeout must be a datetime.timedelta, not None")
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise TypeError(f"timeout must be a datetime.timedelta, not {type(timeout).__name__}")
    if seconds < 0 or math.isnan(seconds):
        raise ValueError(f"timeout must not be negative: {timeout!r}")
    if math.isinf(seconds):
        return 0
    return _ceil_ms(seconds)


def rpc_timeout_ms(timeout: Timeout) -> int:
    """An RPC timeout as torch.distributed.rpc takes it: float seconds, a
    negative value (UNSET_RPC_TIMEOUT, -1.0) for the agent's default, 0 for
    none; or a timedelta."""
    if timeout is None:
        return TIMEOUT_DEFAULT
    if isinstance(timeout, timedelta):
        timeout = timeout.total_seconds()
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
        raise TypeError(f"timeout must be a number of seconds or a timedelta, not {type(timeout).__name__}")
    if timeout < 0:
        return TIMEOUT_DEFAULT
    if math.isinf(timeout):
        return 0
    return _ceil_ms(timeout)


def ms_to_timedelta(ms: int) -> timedelta:
    return timedelta(milliseconds=ms)


_take_lock = threading.Lock()

_C = TypeVar("_C", bound="Closable")


class Closable:
    """A handle owner freed by `close()`, at the end of a `with` block, or
    when garbage-collected: a `weakref.finalize` frees the handle then, at
    most once whoever comes first, without resurrecting the object (as a
    `__del__` could) and without touching the object's other state."""

    #: The handle (a C pointer as an int); None once released.
    _h: int | None = None
    _finalizer: weakref.finalize[..., Closable] | None = None

    def _own(self, handle: int | None, release: Callable[..., object], *args: object) -> None:
        """Holds `handle`, released by `release(handle, *args)` once: by
        `_release()` or when this object is collected (nothing for None)."""
        self._h = handle
        self._finalizer = weakref.finalize(self, release, handle, *args) if handle else None

    def _release(self) -> None:
        """Releases the handle now if this object still holds it
        (idempotent and thread-safe: one caller releases it)."""
        with _take_lock:
            self._h = None
            finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None:
            finalizer()

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
