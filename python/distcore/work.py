"""Work (c10d's Work) and Future: completion handles of asynchronous
operations (``Store.get_async`` and friends, ``rpc_async``), or created here
and completed by the program."""
from __future__ import annotations

import ctypes
import enum
import itertools
import sys
import threading
import traceback
from ctypes import c_bool, c_double, c_int, c_int32, c_int64, c_uint64, c_void_p
from datetime import timedelta
from typing import Any, Callable, Generator, Protocol, TypeVar

from ._errors import DistError, Status, error_for
from ._lib import WORK_CALLBACK, Buf, check, lib, take_buf
from ._util import Closable, Timeout, Value, int32_arg, store_timeout_ms, value_arg

__all__ = ["OpType", "Work", "Future"]


class OpType(enum.IntEnum):
    """c10d's OpType (dc_op_type), same numbers."""

    BROADCAST = 0
    ALLREDUCE = 1
    ALLREDUCE_COALESCED = 2
    REDUCE = 3
    ALLGATHER = 4
    _ALLGATHER_BASE = 5
    ALLGATHER_COALESCED = 6
    GATHER = 7
    SCATTER = 8
    REDUCE_SCATTER = 9
    ALLTOALL_BASE = 10
    ALLTOALL = 11
    SEND = 12
    RECV = 13
    RECVANYSOURCE = 14
    BARRIER = 15
    _REDUCE_SCATTER_BASE = 16
    COALESCED = 17
    _ALLREDUCE_SPARSE = 18
    REDUCE_SCATTER_TENSOR_COALESCED = 19
    ALLGATHER_INTO_TENSOR_COALESCED = 20
    UNKNOWN = 100


# Completion callbacks: one C trampoline for all of them, the callback found
# by the token passed as user_data. An entry holds the Python work (so the
# handle lives until the callback has run) and is removed when it runs; the
# callback takes that work (of its own class: Any here).
_callbacks: dict[int, tuple[Work, Callable[[Any], object]]] = {}
_callbacks_lock = threading.Lock()
_tokens = itertools.count(1)


def _report_callback_error(what: str) -> None:
    print(f"distcore: exception in {what}:", file=sys.stderr)
    traceback.print_exc()


@WORK_CALLBACK  # type: ignore[untyped-decorator]  # ctypes' prototypes take any callable
def _trampoline(_view: int | None, user_data: int | None) -> None:
    with _callbacks_lock:
        entry = _callbacks.pop(user_data or 0, None)
    if entry is None:
        return
    work, fn = entry
    try:
        fn(work)
    except BaseException:  # noqa: BLE001 - a C callback must not raise
        _report_callback_error(f"the done callback {fn!r}")


def _status_of(exc: BaseException) -> int:
    return int(exc.status) if isinstance(exc, DistError) else int(Status.ABORTED)


def _message_of(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


_W = TypeVar("_W", bound="Work")
_R = TypeVar("_R", covariant=True)


class _Awaitable(Protocol[_R]):
    """What ``await`` on a work uses: its wait() returns what the await does
    (True for a Work, the value for a Future)."""

    def is_completed(self) -> bool: ...

    def fileno(self) -> int: ...

    def wait(self, timeout: Timeout = None) -> _R: ...


class Work(Closable):
    """A completion handle (c10d's Work) over a dc_work.

    ``Work(rank, op_type, profiling_title=None, timeout=None)`` creates a
    pending work the program completes with :meth:`finish` or
    :meth:`finish_with_result`; the store's ``*_async`` calls return works
    that distcore completes. Thread-safe. :meth:`close` (or the end of a
    ``with`` block, or garbage collection) frees the handle; the operation
    itself goes on.
    """

    _owner: Work | None
    _py_error: BaseException | None

    def __init__(self, rank: int = -1, op_type: int = OpType.UNKNOWN, profiling_title: str | None = None,
                 timeout: Timeout = None) -> None:
        h = c_void_p()
        title = None if profiling_title is None else str(profiling_title).encode()
        # None: -1, which dc_work_new takes as no timeout.
        ms = store_timeout_ms(timeout)
        check(lib.dc_work_new(int32_arg(rank, "rank"), int(op_type), title, ms, ctypes.byref(h)))
        self._init(h.value)

    def _init(self, handle: int | None, owner: Work | None = None) -> None:
        if owner is None:
            self._own(handle, lib.dc_work_free)
        self._owner = owner  # a work whose handle this object borrows
        self._py_error = None  # a Python exception to raise instead of the C error

    @classmethod
    def _from_handle(cls: type[_W], handle: int | None) -> _W:
        obj = cls.__new__(cls)
        obj._init(handle)
        return obj

    @property
    def _handle(self) -> int:
        owner = self._owner
        if owner is not None:  # a view on another object's handle (get_future)
            return owner._handle
        h = self._h
        if not h:
            raise ValueError(f"operation on a closed {type(self).__name__}")
        return h

    def _is_open(self) -> bool:
        owner = self._owner
        return owner._is_open() if owner is not None else bool(self._h)

    def close(self) -> None:
        """Frees the handle (idempotent). A pending operation goes on; an
        async store operation with no callback registered is released."""
        self._owner = None
        self._release()

    def _bool(self, fn: Callable[..., int]) -> bool:
        out = c_bool()
        check(fn(self._handle, ctypes.byref(out)))
        return out.value

    def _raise_error(self, status: int) -> None:
        if self._py_error is not None:
            raise self._py_error
        check(status)

    def wait(self, timeout: Timeout = None) -> bool:
        """Blocks until the work completes and returns True, or raises its
        error (every time it is waited on); after `timeout` (a timedelta or
        seconds; None: the work's own timeout, or forever without one;
        timedelta(0): forever) raises DistTimeoutError "Operation timed out!"."""
        status = lib.dc_work_wait(self._handle, store_timeout_ms(timeout))
        if status:
            if self._py_error is not None and self.is_completed():
                raise self._py_error
            check(status)
        return True

    def is_completed(self) -> bool:
        """Whether the work has completed (successfully or not)."""
        return self._bool(lib.dc_work_is_completed)

    def is_success(self) -> bool:
        """Whether the work completed without an error (False while pending)."""
        return self._bool(lib.dc_work_is_success)

    def exception(self) -> BaseException | None:
        """The error of a failed work as an exception object, None otherwise."""
        if self._py_error is not None:
            return self._py_error
        status, msg = c_int32(), Buf()
        check(lib.dc_work_error(self._handle, ctypes.byref(status), ctypes.byref(msg)))
        message = take_buf(msg).decode("utf-8", "replace")
        return None if status.value == 0 else error_for(status.value, message)

    def result(self) -> bytes:
        """The result bytes of a completed work (a get's value, an RPC's
        reply). A failed work raises its error; a work completed without a
        result DistNotSupportedError; a pending one DistStateError."""
        buf = Buf()
        status = lib.dc_work_result(self._handle, ctypes.byref(buf))
        if status:
            self._raise_error(status)
        return take_buf(buf)

    def abort(self) -> None:
        """Fails a pending work with DistAbortedError ("Work aborted") and
        releases what an async store operation holds; a completed work is
        left as it is."""
        check(lib.dc_work_abort(self._handle))

    def synchronize(self) -> None:
        """c10d's Work.synchronize: CPU works have no streams; returns at once."""
        check(lib.dc_work_synchronize(self._handle))

    def source_rank(self) -> int:
        """The rank a receive work got its data from."""
        out = c_int32()
        check(lib.dc_work_source_rank(self._handle, ctypes.byref(out)))
        return out.value

    def set_source_rank(self, rank: int) -> None:
        check(lib.dc_work_set_source_rank(self._handle, int32_arg(rank, "rank")))

    # _get_duration, _get_sequence_number and _get_op_type: PyTorch's Work has them.

    def _get_duration(self) -> float:
        """Seconds from creation to completion (DistStateError while pending)."""
        out = c_double()
        check(lib.dc_work_duration(self._handle, ctypes.byref(out)))
        return out.value

    duration = _get_duration

    def _get_sequence_number(self) -> int:
        out = c_uint64()
        check(lib.dc_work_sequence_number(self._handle, ctypes.byref(out)))
        return out.value

    @property
    def sequence_number(self) -> int:
        return self._get_sequence_number()

    def _get_op_type(self) -> OpType | int:
        """The op type: an OpType, or the number of one this package does not know."""
        out = c_int32()
        check(lib.dc_work_op_type(self._handle, ctypes.byref(out)))
        try:
            return OpType(out.value)
        except ValueError:
            return out.value

    @property
    def op_type(self) -> OpType | int:
        return self._get_op_type()

    @property
    def rank(self) -> int:
        out = c_int32()
        check(lib.dc_work_rank(self._handle, ctypes.byref(out)))
        return out.value

    @property
    def timeout(self) -> timedelta | None:
        """The timeout the work was created with (None when it has none)."""
        out = c_int64()
        check(lib.dc_work_timeout(self._handle, ctypes.byref(out)))
        return None if out.value == 0 else timedelta(milliseconds=out.value)

    def finish(self, exception: BaseException | None = None) -> None:
        """Completes the work: successfully, or failed with `exception` (a
        DistError keeps its status; any other exception is DC_ERR_ABORTED
        for C callers and is raised as itself by wait() on this object)."""
        if exception is None:
            check(lib.dc_work_finish(self._handle, 0, None))
            return
        if not isinstance(exception, BaseException):
            raise TypeError("exception must be an exception instance")
        # Set before the call: it runs the callbacks and wakes the waiters,
        # who raise the exception itself.
        before = self._py_error
        if not isinstance(exception, DistError):
            self._py_error = exception
        try:
            check(lib.dc_work_finish(self._handle, _status_of(exception), _message_of(exception).encode()))
        except BaseException:  # already completed: it keeps its first outcome
            self._py_error = before
            raise

    def finish_with_result(self, data: Value) -> None:
        """Completes the work successfully with `data` (bytes or str) as its result."""
        data = value_arg(data, "data")
        check(lib.dc_work_finish_with_result(self._handle, data, len(data)))

    def fileno(self) -> int:
        """A file descriptor that becomes readable once the work completes
        (for select/poll/asyncio; do not read or close it)."""
        out = c_int()
        check(lib.dc_work_fd(self._handle, ctypes.byref(out)))
        return out.value

    def add_done_callback(self: _W, callback: Callable[[_W], object]) -> None:
        """Runs ``callback(self)`` once the work completes: on the completing
        thread (a distcore thread), or at once on this thread if it already
        has. The work is kept alive until then. An exception in the callback
        is printed, not raised."""
        if not callable(callback):
            raise TypeError("callback must be callable")
        handle = self._handle
        token = next(_tokens)
        with _callbacks_lock:
            _callbacks[token] = (self, callback)
        status = lib.dc_work_add_done_callback(handle, _trampoline, token)
        if status:
            with _callbacks_lock:
                _callbacks.pop(token, None)
            check(status)

    def then(self: _W, callback: Callable[[_W], Value | None]) -> Future:
        """A Future completed with ``callback(self)``'s return value (bytes,
        str or None) once this work completes, or failed with what the
        callback raised (torch.futures.Future.then)."""
        nxt = Future()

        def run(done: _W) -> None:
            try:
                value = callback(done)
            except BaseException as e:  # noqa: BLE001 - becomes the future's error
                nxt.set_exception(e)
                return
            nxt.set_result(value)
        self.add_done_callback(run)
        return nxt

    def get_future(self) -> Future:
        """A Future on this work (c10d's Work.get_future): its wait() and
        value() return the result bytes (None for a work without result)."""
        self._handle  # noqa: B018 - raises on a closed work
        fut = Future.__new__(Future)
        fut._init(None, owner=self)
        return fut

    def __await__(self: _Awaitable[_R]) -> Generator[Any, None, _R]:
        """``await work`` in asyncio: waits on fileno() without a thread,
        then returns what wait() (Work) or value() (Future) returns."""
        if not self.is_completed():
            import asyncio
            loop = asyncio.get_running_loop()
            ready = loop.create_future()
            fd = self.fileno()

            def on_readable() -> None:
                if not ready.done():
                    ready.set_result(None)
            loop.add_reader(fd, on_readable)
            try:
                yield from ready.__await__()
            finally:
                loop.remove_reader(fd)
        return self.wait()

    def __repr__(self) -> str:
        if not self._is_open():
            return f"<distcore.{type(self).__name__} closed>"
        state = "completed" if self.is_completed() else "pending"
        return f"<distcore.{type(self).__name__} {state}>"


class Future(Work):
    """A value that becomes available (torch.futures.Future's API): wait()
    and value() return the result bytes, or None when it completed without
    one. ``Future()`` creates one the program completes with set_result or
    set_exception; ``rpc_async`` and ``Work.get_future`` return them."""

    def __init__(self) -> None:
        h = c_void_p()
        check(lib.dc_work_new_future(ctypes.byref(h)))
        self._init(h.value)

    def value(self) -> bytes | None:
        """The result of a completed future (raises its error)."""
        buf = Buf()
        status = lib.dc_work_result(self._handle, ctypes.byref(buf))
        if status == Status.NOT_SUPPORTED and self.is_success():
            return None
        if status:
            self._raise_error(status)
        return take_buf(buf)

    def wait(self, timeout: Timeout = None) -> bytes | None:  # type: ignore[override]  # PyTorch's Future.wait
        """Blocks until the future completes and returns its value (raises its error)."""
        super().wait(timeout)
        return self.value()

    def done(self) -> bool:
        return self.is_completed()

    def set_result(self, result: Value | None) -> None:
        """Completes the future with `result` (bytes, str, or None for none)."""
        if result is None:
            self.finish()
        else:
            self.finish_with_result(result)

    def set_exception(self, exception: BaseException) -> None:
        """Fails the future with `exception`."""
        self.finish(exception)
