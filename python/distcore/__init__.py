"""distcore: torch.distributed's coordination plane (TCPStore, FileStore,
HashStore, PrefixStore, torchelastic's store helpers, c10d's Work, RPC with
RRefs) over libdistcore's C ABI, without torch.

    import distcore
    store = distcore.TCPStore("127.0.0.1", 29500, world_size=2, is_master=True)
    store.set("key", "value"); store.get("key")  # b"value"

The bundled libdistcore.so is used, or the library $DISTCORE_LIB names.
Where torch is installed, ``distcore.torch`` has these stores as
``torch.distributed.Store`` objects, for ``init_process_group(store=...)``.
"""
import ctypes as _ctypes
import logging as _logging
import threading as _threading
# The annotations here are evaluated at import (`from __future__ import
# annotations` would add a public name): typing's forms, as Python 3.8 has.
import typing as _t

from . import _lib
from ._errors import (DistAbortedError, DistError, DistInternalError, DistIOError, DistNetworkError,
                      DistNotSupportedError, DistPeerError, DistPermissionError, DistProtocolError, DistQuotaError,
                      DistQueueEmptyError, DistRemoteError,
                      DistShutdownError, DistStateError, DistStoreError, DistTimeoutError, DistValueError,
                      QueueEmptyError, Status)
from ._lib import (HEADER_VERSION as _HEADER_VERSION, LIB_PATH as _LIB_PATH, PROFILER_BEGIN as _PROFILER_BEGIN,
                   PROFILER_END as _PROFILER_END, LOG_FN as _LOG_FN, check as _check, lib as _c)
from .store import EtcdStore, FileStore, HashStore, PrefixStore, Store, TCPStore
from .work import Future, OpType, Work
from . import elastic, rpc  # noqa: E402

try:
    from ._build_info import __version__  # written by the package build
except ImportError:  # a source checkout
    __version__ = ".".join(map(str, _HEADER_VERSION))

__all__ = [
    "Store", "TCPStore", "FileStore", "HashStore", "PrefixStore", "EtcdStore", "Work", "Future", "OpType",
    "DistError", "DistStoreError", "DistNetworkError", "QueueEmptyError", "DistQueueEmptyError",
    "DistTimeoutError", "DistValueError", "DistNotSupportedError", "DistRemoteError", "DistShutdownError",
    "DistAbortedError", "DistProtocolError", "DistIOError", "DistStateError", "DistInternalError",
    "DistPermissionError", "DistQuotaError", "DistPeerError", "Status",
    "elastic", "rpc", "library_version", "library_path", "status_str", "op_type_name", "set_log_callback",
    "log_to_python", "set_profiler_hooks", "LogLevel", "TIMEOUT_DEFAULT", "TIMEOUT_FOREVER",
]

for _name in __all__:  # shown as distcore.X (tracebacks, repr)
    _obj = globals().get(_name)
    if isinstance(_obj, type) and _obj.__module__.startswith("distcore._"):
        _obj.__module__ = "distcore"
del _name, _obj

TIMEOUT_DEFAULT = _lib.TIMEOUT_DEFAULT
TIMEOUT_FOREVER = _lib.TIMEOUT_FOREVER


def library_version() -> str:
    """The running library's version, "major.minor.patch" (dc_version)."""
    version: bytes = _c.dc_version()
    return version.decode()


def library_path() -> str:
    """The path of the loaded libdistcore.so."""
    return _LIB_PATH


def status_str(status: int) -> str:
    """A status code's static description ("timed out", ...)."""
    return _lib.status_str(status)


def op_type_name(op_type: int) -> _t.Optional[str]:
    """c10d's name of an op type ("ALLREDUCE", ...), None for a number that is not one."""
    name: _t.Optional[bytes] = _c.dc_op_type_name(int(op_type))
    return None if name is None else name.decode()


class LogLevel:
    """dc_log_level."""
    OFF, ERROR, WARN, INFO, DEBUG, TRACE = range(6)


#: A log callback: ``callback(level, target, message)``.
_LogCallback = _t.Callable[[int, str, str], object]

_log_lock = _threading.Lock()
_log_keep: object = None  # the installed callback, kept alive while distcore may call it

_PY_LEVELS = {LogLevel.ERROR: _logging.ERROR, LogLevel.WARN: _logging.WARNING, LogLevel.INFO: _logging.INFO,
              LogLevel.DEBUG: _logging.DEBUG, LogLevel.TRACE: 5}


def set_log_callback(callback: _t.Optional[_LogCallback], level: int = LogLevel.WARN) -> None:
    """Sends distcore's log lines at `level` or more severe to
    ``callback(level, target, message)`` (process-wide; it runs on the
    thread that logs, must be quick and must not call distcore). None sends
    them to stderr again."""
    global _log_keep
    with _log_lock:
        if callback is None:
            _check(_c.dc_set_log_callback(int(level), _ctypes.cast(None, _LOG_FN), None))  # type: ignore[arg-type]
            _log_keep = None
            return

        def deliver(lvl: int, target: bytes, message: bytes, _user_data: _t.Optional[int]) -> None:
            try:
                callback(lvl, target.decode("utf-8", "replace"), message.decode("utf-8", "replace"))
            except Exception:  # noqa: BLE001 - a C callback must not raise
                pass
        fn = _LOG_FN(deliver)
        _check(_c.dc_set_log_callback(int(level), fn, None))
        _log_keep = fn  # the previous one is no longer running once the call returned


def log_to_python(level: int = LogLevel.WARN) -> None:
    """Sends distcore's log lines to the `logging` module, each to the
    logger named by its target ("distcore.store.tcp.server", ...)."""
    def emit(lvl: int, target: str, message: str) -> None:
        _logging.getLogger(target.replace("::", ".")).log(_PY_LEVELS.get(lvl, _logging.INFO), "%s", message)
    set_log_callback(emit, level)


_profiler_keep: object = None  # every set of hooks installed (see set_profiler_hooks)


def set_profiler_hooks(begin: _t.Optional[_t.Callable[[str], int]],
                       end: _t.Optional[_t.Callable[[str, int], object]]) -> None:
    """Process-wide profiler hooks: ``begin(title) -> int token`` when a
    work with a profiling title is created, ``end(title, token)`` once when
    it finishes. Both None removes them."""
    global _profiler_keep
    if begin is None and end is None:
        _check(_c.dc_set_profiler_hooks(_ctypes.cast(None, _PROFILER_BEGIN),  # type: ignore[arg-type]
                                        _ctypes.cast(None, _PROFILER_END), None))  # type: ignore[arg-type]
        return  # spans already begun end on the old hooks: they stay alive
    if begin is None or end is None:
        raise ValueError("set_profiler_hooks needs both hooks, or neither")

    def b(title: bytes, _ud: _t.Optional[int]) -> int:
        try:
            return int(begin(title.decode())) & 0xFFFFFFFFFFFFFFFF
        except Exception:  # noqa: BLE001
            return 0

    def e(title: bytes, token: int, _ud: _t.Optional[int]) -> None:
        try:
            end(title.decode(), token)
        except Exception:  # noqa: BLE001
            pass
    hooks = (_PROFILER_BEGIN(b), _PROFILER_END(e))
    _check(_c.dc_set_profiler_hooks(hooks[0], hooks[1], None))
    # Spans begun on earlier hooks end on them: keep every set ever installed.
    _profiler_keep = (hooks, _profiler_keep)
