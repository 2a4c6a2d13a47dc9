"""RPC and remote references over distcore's agent (torch.distributed.rpc's
names where they apply: init_rpc, rpc_sync, rpc_async, remote, shutdown,
get_worker_info, RRef, WorkerInfo).

Functions are registered by name, so any worker (C, C++, Python) can call
any other. A function is a Python callable ``fn(args: bytes, rrefs:
list[RRef], caller_id: int) -> bytes`` (str is encoded as UTF-8; None is
empty). It runs on one of the agent's worker threads; the RRefs it gets are
valid during the call only (``rref.clone()`` one to keep it). An exception
it raises fails the call: the caller gets DistRemoteError with the
exception's text.

Timeouts are float seconds as in torch.distributed.rpc (a negative value,
UNSET_RPC_TIMEOUT, uses the agent's rpc_timeout; 0: none) or timedeltas.
"""
from __future__ import annotations

import ctypes
import itertools
import sys
import threading
import traceback
import weakref
from ctypes import c_bool, c_int32, c_void_p
from types import TracebackType
from typing import TYPE_CHECKING, Callable, Iterable, List, Mapping, NamedTuple, Optional, TypedDict

from ._errors import DistError, Status
from ._lib import RPC_FUNCTION, Buf, RpcFunctionEntry, RpcOptions, RRefDebugInfo, check, lib, take_buf
from ._util import Closable, FilePath, Timeout, Value, int32_arg, key_arg, rpc_timeout_ms, set_guards, value_arg
from .work import Future

if TYPE_CHECKING:
    from ctypes import Array, _Pointer

    from typing_extensions import Unpack

    from .store import Store

__all__ = ["init_rpc", "shutdown", "rpc_sync", "rpc_async", "remote", "get_worker_info", "RpcAgent",
           "RRef", "WorkerInfo", "UNSET_RPC_TIMEOUT", "DEFAULT_RPC_TIMEOUT_SEC"]

UNSET_RPC_TIMEOUT = -1.0


def _default_options() -> RpcOptions:
    """dc_rpc_options_init's defaults: the library holds the numbers."""
    opts = RpcOptions()
    check(lib.dc_rpc_options_init(ctypes.byref(opts), ctypes.sizeof(opts)))
    return opts


DEFAULT_RPC_TIMEOUT_SEC = _default_options().rpc_timeout_ms / 1000


class WorkerInfo(NamedTuple):
    """A worker of the group: its name and id (rank)."""

    name: str
    id: int


#: A registered function: ``fn(args, rrefs, caller_id)`` returning the reply
#: (bytes, str, or None for none).
RpcFunction = Callable[[bytes, List["RRef"], int], Optional[Value]]


class _Guards(TypedDict, total=False):
    """The guards RpcAgent passes on to the options (see init_rpc)."""

    secret: Value | None
    tls_cert: FilePath | None
    tls_key: FilePath | None
    tls_ca: FilePath | None
    tls_client_ca: FilePath | None
    tls_server_name: str | None


# Registered functions: one C trampoline for all, the function found by the
# token passed as user_data. Entries live until their agent is freed.
_functions: dict[int, tuple[weakref.ref[RpcAgent], RpcFunction]] = {}
_functions_lock = threading.Lock()
_tokens = itertools.count(1)


def _reply_bytes(result: Value | None) -> bytes:
    if result is None:
        return b""
    return value_arg(result, "an RPC function's result")


@RPC_FUNCTION  # type: ignore[untyped-decorator]  # ctypes' prototypes take any callable
def _trampoline(args: _Pointer[ctypes.c_uint8], length: int, rrefs: _Pointer[c_void_p], num_rrefs: int,
                caller_id: int, reply: int | None, user_data: int | None) -> int:
    with _functions_lock:
        entry = _functions.get(user_data or 0)
    if entry is None:
        lib.dc_rpc_reply_set_error(reply, b"function no longer registered")
        return int(Status.INVALID_STATE)
    agent_ref, fn = entry
    agent = agent_ref()
    views = [RRef._borrowed(rrefs[i], agent) for i in range(num_rrefs)]
    try:
        data = ctypes.string_at(args, length) if length else b""
        result = _reply_bytes(fn(data, views, caller_id))
        status: int = lib.dc_rpc_reply_set(reply, result, len(result))
        return status
    except BaseException as e:  # noqa: BLE001 - becomes the caller's DistRemoteError
        message = str(e) or type(e).__name__
        lib.dc_rpc_reply_set_error(reply, message.encode("utf-8", "replace"))
        if not isinstance(e, Exception):
            traceback.print_exc(file=sys.stderr)
        return int(Status.REMOTE)
    finally:
        for v in views:
            v._h = None  # borrowed: valid during the call only


def _unregister_functions(tokens: Iterable[int]) -> None:
    """Forgets the functions an agent registered under `tokens`."""
    with _functions_lock:
        for t in tokens:
            _functions.pop(t, None)


def _free_agent(handle: int, tokens: Iterable[int]) -> None:
    """Frees an agent's handle and forgets its functions (on close, or when
    the agent is collected)."""
    lib.dc_rpc_free(handle)
    _unregister_functions(tokens)


def _to_name(to: str | WorkerInfo) -> bytes:
    if isinstance(to, WorkerInfo):
        return to.name.encode()
    if isinstance(to, str):
        return to.encode()
    raise TypeError(f"to must be a worker name or WorkerInfo, not {type(to).__name__}")


def _func_name(func: str) -> bytes:
    if isinstance(func, str):
        return func.encode()
    raise TypeError(f"func must be the name of a registered function, not {type(func).__name__}")


def _rref_array(rrefs: Iterable[RRef] | None) -> tuple[Array[c_void_p], int]:
    rrefs = list(rrefs or ())
    for r in rrefs:
        if not isinstance(r, RRef):
            raise TypeError(f"rrefs must be RRefs, not {type(r).__name__}")
    arr = (c_void_p * max(len(rrefs), 1))(*[r._handle for r in rrefs])
    return arr, len(rrefs)


class RpcAgent(Closable):
    """A worker of an RPC group (see :func:`init_rpc`). Thread-safe."""

    def __init__(self, name: str, rank: int, world_size: int, store: Store,
                 functions: Mapping[str, RpcFunction] | None = None, rpc_timeout: Timeout = DEFAULT_RPC_TIMEOUT_SEC,
                 num_worker_threads: int | None = None, listen_address: str | None = None,
                 ignore_rref_leak: bool | None = None, **guards: Unpack[_Guards]) -> None:
        from .store import Store
        if not isinstance(store, Store):
            raise TypeError(f"store must be a distcore.Store, not {type(store).__name__}")
        functions = dict(functions or {})
        self._h = None
        self._tokens: list[int] = []
        self._name = name
        entries = (RpcFunctionEntry * max(len(functions), 1))()
        names = []
        for i, (fname, fn) in enumerate(functions.items()):
            if not callable(fn):
                raise TypeError(f"function {fname!r} is not callable")
            names.append(key_arg(fname, "function name"))
            entries[i] = RpcFunctionEntry(names[-1], _trampoline, self._register(fn))
        opts = RpcOptions()
        check(lib.dc_rpc_options_init(ctypes.byref(opts), ctypes.sizeof(opts)))
        # None: dc_rpc_options_init's default.
        if num_worker_threads is not None:
            opts.num_worker_threads = int(num_worker_threads)
        timeout_ms = rpc_timeout_ms(rpc_timeout)
        if timeout_ms >= 0:
            opts.rpc_timeout_ms = timeout_ms
        address = None if listen_address is None else listen_address.encode()  # alive for the call
        if address is not None:
            opts.listen_address = address
        if ignore_rref_leak is not None:
            opts.ignore_rref_leak = bool(ignore_rref_leak)
        opts.functions, opts.num_functions = entries, len(functions)
        set_guards(opts, **guards)
        h = c_void_p()
        try:
            check(lib.dc_rpc_init(store._handle, key_arg(name, "name"), int32_arg(rank, "rank"),
                                  int32_arg(world_size, "world_size"),
                                  ctypes.byref(opts), ctypes.byref(h)))
        except BaseException:
            self._unregister()
            raise
        self._store = store  # the agent's store stays open as long as it
        self._own(h.value, _free_agent, self._tokens)

    def _register(self, fn: RpcFunction) -> int:
        token = next(_tokens)
        with _functions_lock:
            _functions[token] = (weakref.ref(self), fn)  # the agent may be collected
        self._tokens.append(token)
        return token

    def _unregister(self) -> None:
        _unregister_functions(self._tokens)
        self._tokens = []

    @property
    def _handle(self) -> int:
        h = self._h
        if not h:
            raise ValueError("operation on a closed RpcAgent")
        return h

    def register_function(self, name: str, fn: RpcFunction) -> None:
        """Registers (or replaces) `fn` as `name` after init (calls from
        other workers may arrive before this returns on their side: prefer
        init's `functions`)."""
        if not callable(fn):
            raise TypeError("fn must be callable")
        token = self._register(fn)
        check(lib.dc_rpc_register_function(self._handle, key_arg(name, "name"), _trampoline, token))

    # -- calls ------------------------------------------------------------

    def rpc_sync(self, to: str | WorkerInfo, func: str, args: Value = b"", rrefs: Iterable[RRef] | None = None,
                 timeout: Timeout = UNSET_RPC_TIMEOUT) -> bytes:
        """Calls `func` on worker `to` with `args` (bytes or str) and
        `rrefs`, and returns the reply bytes. DistRemoteError when the
        function fails there, DistTimeoutError, DistPeerError naming the
        worker at once when its connection is lost (it died, or cannot be
        reached), and for every call to it after."""
        data = value_arg(args, "args")
        arr, n = _rref_array(rrefs)
        buf = Buf()
        check(lib.dc_rpc_sync(self._handle, _to_name(to), _func_name(func), data, len(data), arr, n,
                              rpc_timeout_ms(timeout), ctypes.byref(buf)))
        return take_buf(buf)

    def rpc_async(self, to: str | WorkerInfo, func: str, args: Value = b"", rrefs: Iterable[RRef] | None = None,
                  timeout: Timeout = UNSET_RPC_TIMEOUT) -> Future:
        """rpc_sync without waiting: a Future whose value is the reply."""
        data = value_arg(args, "args")
        arr, n = _rref_array(rrefs)
        h = c_void_p()
        check(lib.dc_rpc_async(self._handle, _to_name(to), _func_name(func), data, len(data), arr, n,
                               rpc_timeout_ms(timeout), ctypes.byref(h)))
        return Future._from_handle(h.value)

    def remote(self, to: str | WorkerInfo, func: str, args: Value = b"", rrefs: Iterable[RRef] | None = None,
               timeout: Timeout = UNSET_RPC_TIMEOUT) -> RRef:
        """Runs `func` on worker `to`, keeping the result there: an RRef to
        it. A failure (or a timeout) is carried by the RRef: to_here()
        raises it."""
        data = value_arg(args, "args")
        arr, n = _rref_array(rrefs)
        h = c_void_p()
        check(lib.dc_rpc_remote(self._handle, _to_name(to), _func_name(func), data, len(data), arr, n,
                                rpc_timeout_ms(timeout), ctypes.byref(h)))
        return RRef._from_handle(h.value, self)

    def rref(self, value: Value) -> RRef:
        """An RRef owned by this worker holding `value` (PyTorch's RRef(value))."""
        return RRef(value, agent=self)

    # -- workers ----------------------------------------------------------

    @property
    def name(self) -> str:
        """This worker's name."""
        buf = Buf()
        check(lib.dc_rpc_self_name(self._handle, ctypes.byref(buf)))
        return take_buf(buf).decode()

    @property
    def id(self) -> int:
        """This worker's id (rank)."""
        return self.get_worker_info().id

    def get_worker_info(self, worker_name: str | None = None) -> WorkerInfo:
        """WorkerInfo(name, id) of `worker_name`, or of this worker."""
        name = self.name if worker_name is None else worker_name
        out = c_int32()
        check(lib.dc_rpc_worker_id(self._handle, key_arg(name, "worker_name"), ctypes.byref(out)))
        return WorkerInfo(name, out.value)

    def get_debug_info(self) -> dict[str, int]:
        """This worker's RRef counters (PyTorch's names): num_owner_rrefs,
        num_pending_futures, num_pending_users, num_forks."""
        info = RRefDebugInfo(struct_size=ctypes.sizeof(RRefDebugInfo))
        check(lib.dc_rpc_debug_info(self._handle, ctypes.byref(info)))
        return {"num_owner_rrefs": info.num_owner_rrefs, "num_pending_futures": info.num_pending_futures,
                "num_pending_users": info.num_pending_users, "num_forks": info.num_forks}

    # -- lifetime ---------------------------------------------------------

    def shutdown(self, graceful: bool = True, timeout: Timeout = UNSET_RPC_TIMEOUT) -> None:
        """Stops this worker. Graceful: waits for every worker, settles and
        deletes every RRef, waits again (a leaked RRef is a warning, or
        DistStateError with ignore_rref_leak=False). Not graceful: stops at
        once; pending calls fail with DistShutdownError."""
        global _current
        try:
            check(lib.dc_rpc_shutdown(self._handle, bool(graceful), rpc_timeout_ms(timeout)))
        finally:
            if _current is self:
                _current = None

    def close(self) -> None:
        """Stops this worker if it runs, and frees it (idempotent)."""
        global _current
        self._release()
        self._unregister()
        if _current is self:
            _current = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if self._h:
                self.shutdown(graceful=exc_type is None)
        finally:
            self.close()

    def __repr__(self) -> str:
        return f"<distcore.rpc.RpcAgent {self._name!r}{'' if self._h else ' closed'}>"


class RRef(Closable):
    """A remote reference (torch.distributed.rpc.RRef) to bytes held by its
    owner. ``RRef(value)`` creates one owned by this worker (the current
    agent, or `agent`); ``remote()`` returns one owned by the callee.
    Thread-safe; ``close()`` (or garbage collection) releases this handle,
    and the last handle of a user's fork tells the owner."""

    _agent: RpcAgent | None  # None: a borrowed view whose agent is gone
    _borrowed_view: bool

    def __init__(self, value: Value, *, agent: RpcAgent | None = None) -> None:
        agent = agent or _require_current()
        data = value_arg(value)
        h = c_void_p()
        check(lib.dc_rref_new(agent._handle, data, len(data), ctypes.byref(h)))
        self._agent, self._borrowed_view = agent, False
        self._own(h.value, lib.dc_rref_free)

    @classmethod
    def _from_handle(cls, handle: int | None, agent: RpcAgent | None) -> RRef:
        obj = cls.__new__(cls)
        obj._agent, obj._borrowed_view = agent, False
        obj._own(handle, lib.dc_rref_free)
        return obj

    @classmethod
    def _borrowed(cls, handle: int | None, agent: RpcAgent | None) -> RRef:
        obj = cls.__new__(cls)
        obj._agent, obj._borrowed_view = agent, True
        obj._h = handle  # the caller's: never freed here
        return obj

    @property
    def _handle(self) -> int:
        h = self._h
        if not h:
            if self._borrowed_view:
                raise ValueError("an RRef argument is valid during the function call only: clone() it to keep it")
            raise ValueError("operation on a closed RRef")
        return h

    def close(self) -> None:
        """Releases this handle (idempotent)."""
        self._release()

    def clone(self) -> RRef:
        """A new handle on the same reference (to keep an RRef argument)."""
        h = c_void_p()
        check(lib.dc_rref_clone(self._handle, ctypes.byref(h)))
        return RRef._from_handle(h.value, self._agent)

    def to_here(self, timeout: Timeout = UNSET_RPC_TIMEOUT) -> bytes:
        """The value: fetched from the owner (waiting up to `timeout`), or
        local on the owner. Raises the RRef's creation error, if any."""
        buf = Buf()
        check(lib.dc_rref_to_here(self._handle, rpc_timeout_ms(timeout), ctypes.byref(buf)))
        return take_buf(buf)

    def local_value(self) -> bytes:
        """The value of an RRef this worker owns (DistStateError on a user)."""
        buf = Buf()
        check(lib.dc_rref_local_value(self._handle, ctypes.byref(buf)))
        return take_buf(buf)

    def owner(self) -> WorkerInfo:
        """WorkerInfo of the owner."""
        out = c_int32()
        check(lib.dc_rref_owner_id(self._handle, ctypes.byref(out)))
        return WorkerInfo(self.owner_name(), out.value)

    def owner_name(self) -> str:
        """The owner's worker name."""
        buf = Buf()
        check(lib.dc_rref_owner_name(self._handle, ctypes.byref(buf)))
        return take_buf(buf).decode()

    def is_owner(self) -> bool:
        """Whether this handle is on the owner."""
        out = c_bool()
        check(lib.dc_rref_is_owner(self._handle, ctypes.byref(out)))
        return out.value

    def confirmed_by_owner(self) -> bool:
        """Whether the owner has confirmed this reference (True on the owner)."""
        out = c_bool()
        check(lib.dc_rref_confirmed_by_owner(self._handle, ctypes.byref(out)))
        return out.value

    def __repr__(self) -> str:
        if not self._h:
            return "<distcore.rpc.RRef closed>"
        return f"<distcore.rpc.RRef owner={self.owner_name()!r}>"


# -- the module-level API (one current agent, as torch.distributed.rpc) ----

_current: RpcAgent | None = None


def _require_current() -> RpcAgent:
    if _current is None:
        raise DistError("RPC has not been initialized: call distcore.rpc.init_rpc first", Status.INVALID_STATE)
    return _current


def init_rpc(name: str, rank: int, world_size: int, store: Store, functions: Mapping[str, RpcFunction] | None = None,
             rpc_timeout: Timeout = DEFAULT_RPC_TIMEOUT_SEC, num_worker_threads: int | None = None,
             listen_address: str | None = None, ignore_rref_leak: bool | None = None, *, secret: Value | None = None,
             tls_cert: FilePath | None = None, tls_key: FilePath | None = None, tls_ca: FilePath | None = None,
             tls_client_ca: FilePath | None = None, tls_server_name: str | None = None) -> RpcAgent:
    """Joins an RPC group of `world_size` workers through `store` (any
    distcore Store the workers share: a TCPStore, a FileStore, a HashStore
    for threads of one process) and returns the agent, which also becomes
    the current agent of the module-level functions (if none is). Blocks
    until every worker has joined (DistTimeoutError after rpc_timeout).

    `functions` maps names to callables ``fn(args, rrefs, caller_id)``;
    `rpc_timeout` is the default timeout of calls, remote(), to_here and
    control messages (seconds or timedelta, default 60 s);
    `num_worker_threads` (4), `listen_address` ("127.0.0.1") and
    `ignore_rref_leak` (True): None takes the library's default (given in
    parentheses, from dc_rpc_options_init).

    Guards, the same on every worker of the group: `secret` (bytes or str)
    authenticates every connection between workers (challenge-response; it
    never travels; a worker without it fails calls with DistPermissionError);
    `tls_cert`, `tls_key` and `tls_ca` (PEM files) make every connection TLS,
    `tls_client_ca` verifies connecting workers' certificates too, and
    `tls_server_name` checks peers' certificates against that name instead
    of their addresses."""
    global _current
    agent = RpcAgent(name, rank, world_size, store, functions, rpc_timeout, num_worker_threads,
                     listen_address, ignore_rref_leak, secret=secret, tls_cert=tls_cert, tls_key=tls_key,
                     tls_ca=tls_ca, tls_client_ca=tls_client_ca, tls_server_name=tls_server_name)
    if _current is None:
        _current = agent
    return agent


def rpc_sync(to: str | WorkerInfo, func: str, args: Value = b"", rrefs: Iterable[RRef] | None = None,
             timeout: Timeout = UNSET_RPC_TIMEOUT) -> bytes:
    """rpc_sync on the current agent."""
    return _require_current().rpc_sync(to, func, args, rrefs, timeout)


def rpc_async(to: str | WorkerInfo, func: str, args: Value = b"", rrefs: Iterable[RRef] | None = None,
              timeout: Timeout = UNSET_RPC_TIMEOUT) -> Future:
    """rpc_async on the current agent."""
    return _require_current().rpc_async(to, func, args, rrefs, timeout)


def remote(to: str | WorkerInfo, func: str, args: Value = b"", rrefs: Iterable[RRef] | None = None,
           timeout: Timeout = UNSET_RPC_TIMEOUT) -> RRef:
    """remote on the current agent."""
    return _require_current().remote(to, func, args, rrefs, timeout)


def get_worker_info(worker_name: str | None = None) -> WorkerInfo:
    """WorkerInfo from the current agent."""
    return _require_current().get_worker_info(worker_name)


def shutdown(graceful: bool = True, timeout: Timeout = UNSET_RPC_TIMEOUT) -> None:
    """Shuts the current agent down and frees it."""
    agent = _require_current()
    try:
        agent.shutdown(graceful, timeout)
    finally:
        agent.close()
