"""distcore's stores as ``torch.distributed.Store`` objects (docs/pytorch.md).

Each class here is a ``torch.distributed.Store`` (a Python subclass, through
PyTorch's own trampoline for Python stores) over the distcore store of the
same name, taking the same arguments::

    import torch.distributed as dist
    from distcore.torch import TCPStore
    store = TCPStore("10.0.0.1", 29500, world_size=8, is_master=rank == 0,
                     secret=open("/run/job-secret", "rb").read(), tls_ca="ca.pem")
    dist.init_process_group("gloo", store=store, rank=rank, world_size=8)

so ``init_process_group(store=...)``, ``new_group``, torch's ``PrefixStore``
and its store-based barrier run on distcore's client: authentication, TLS,
etcd, liveness sessions. Importable only where torch is installed.

- **Methods**: every one c10d calls, under the names its C++ side looks up
  (``getNumKeys``, ``deleteKey``) and the Python ones (``num_keys``,
  ``delete_key``), plus queues, ``list_keys`` and distcore's own
  (``open_session``, ``members``...) where the wrapped store has them.
  Queues and ``list_keys`` reach Python only when called on the adapter
  itself: PyTorch's trampoline does not forward them, so a torch
  ``PrefixStore`` over an adapter raises NotImplementedError for them (use
  :class:`PrefixStore` here).
- **Timeouts**: the store's torch timeout (``timeout``, ``set_timeout``,
  kept by torch's C++ base) is the one every call uses.
- **Errors** are PyTorch's classes and distcore's at once: a timeout is a
  ``torch.distributed.DistStoreError`` and a ``distcore.DistTimeoutError``,
  a broken connection a ``torch.distributed.DistNetworkError``, an empty
  queue a ``torch.distributed.QueueEmptyError``, a failed peer (liveness
  sessions) a ``torch.distributed.DistError`` and a
  ``distcore.DistPeerError``; bad arguments stay ``ValueError`` and
  ``TypeError``.
- **Lifetime**: c10d keeps the stores it is given in C++, where Python
  cannot see them; a Python store collected meanwhile breaks every later
  call (pytorch#115977, #106633). An adapter therefore lives until
  :meth:`close` (or the end of the process), whoever else holds it. Close
  it once the process groups using it are destroyed; a ``with`` block does.
"""
from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any, Callable, Iterable, TypeVar

try:
    import torch.distributed as _dist
    from torch._C._distributed_c10d import Store as _TorchStore  # torch.distributed.Store
except ImportError as _e:  # pragma: no cover - exercised without torch only
    raise ImportError("distcore.torch needs PyTorch with torch.distributed (pip install torch)") from _e

import distcore as _dc

__all__ = ["TCPStore", "EtcdStore", "FileStore", "HashStore", "PrefixStore", "torch_error"]

_A = TypeVar("_A", bound="_Adapter")
_F = TypeVar("_F", bound=Callable[..., Any])

# -- errors -------------------------------------------------------------------

# The torch class a distcore error class also is (the first that applies,
# by issubclass), or None: bad arguments and unsupported calls stay
# ValueError, TypeError and NotImplementedError, as PyTorch raises them.
_TORCH_BASES: list[tuple[type[_dc.DistError], type[BaseException] | None]] = [
    (_dc.DistValueError, None),
    (_dc.DistNotSupportedError, None),
    (_dc.QueueEmptyError, _dist.QueueEmptyError),
    (_dc.DistNetworkError, _dist.DistNetworkError),
    (_dc.DistStoreError, _dist.DistStoreError),
    (_dc.DistError, _dist.DistError),
]

_TORCH_CLASSES: dict[type[_dc.DistError], type[_dc.DistError]] = {}
_classes_lock = threading.Lock()


def _torch_class(cls: type[_dc.DistError]) -> type[_dc.DistError]:
    """`cls` as a subclass of the torch class it stands for too (made once,
    and kept as this module's attribute of the same name, so that it
    pickles)."""
    with _classes_lock:
        made = _TORCH_CLASSES.get(cls)
        if made is not None:
            return made
        base = next((torch_base for dc_base, torch_base in _TORCH_BASES if issubclass(cls, dc_base)), None)
        made = cls if base is None else type(cls.__name__, (base, cls), {"__module__": __name__,
                                                                        "__doc__": cls.__doc__})
        _TORCH_CLASSES[cls] = made
        if made is not cls:
            globals()[cls.__name__] = made
        return made


def torch_error(error: _dc.DistError) -> _dc.DistError:
    """`error` as the exception PyTorch would raise: the same message and
    status, an instance of torch's class and of distcore's."""
    cls = _torch_class(type(error))
    if cls is type(error):
        return error
    return cls(error.message, int(error.status))


def __getattr__(name: str) -> type[_dc.DistError]:
    """distcore.torch.DistTimeoutError and the others: distcore's error
    classes, as this module raises them."""
    cls = getattr(_dc, name, None)
    if isinstance(cls, type) and issubclass(cls, _dc.DistError):
        return _torch_class(cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _translated(method: _F) -> _F:
    """`method`, run with the store's torch timeout, its distcore errors
    raised as PyTorch's (see :func:`torch_error`)."""

    def call(self: _Adapter, *args: Any, **kwargs: Any) -> Any:
        self._sync_timeout()
        try:
            return method(self, *args, **kwargs)
        except _dc.DistError as e:
            raise torch_error(e) from None

    call.__name__, call.__qualname__, call.__doc__ = method.__name__, method.__qualname__, method.__doc__
    return call  # type: ignore[return-value]


# -- the adapters -------------------------------------------------------------

# Every adapter not closed: c10d may hold it in C++ (see the module doc).
_LIVE: set[_Adapter] = set()
_live_lock = threading.Lock()


class _Adapter(_TorchStore):
    """A torch Store over a distcore store (see the module doc)."""

    _inner: _dc.Store
    # torch's C++ base keeps it (a property its stubs leave out); every
    # call runs with it.
    timeout: timedelta

    def __init__(self, inner: _dc.Store, timeout: timedelta | None = None) -> None:
        super().__init__()
        self._inner = inner
        self._timeout = inner.timeout
        self.set_timeout(self._timeout if timeout is None else timeout)
        with _live_lock:
            _LIVE.add(self)

    def _sync_timeout(self) -> None:
        """Gives the distcore store the torch timeout, if it changed."""
        timeout = self.timeout
        if timeout != self._timeout:
            self._inner.set_timeout(timeout)
            self._timeout = timeout

    # -- lifetime ---------------------------------------------------------

    def close(self) -> None:
        """Closes the distcore store (a TCPStore server stops, a FileStore
        is released) and lets the adapter go. Idempotent; later calls raise
        ValueError."""
        with _live_lock:
            _LIVE.discard(self)
        self._inner.close()

    def __enter__(self: _A) -> _A:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def distcore_store(self) -> _dc.Store:
        """The distcore store this adapter runs on."""
        return self._inner

    def _like(self: _A, inner: _dc.Store) -> _A:
        """An adapter of the same class on `inner`, with this one's timeout."""
        other = type(self).__new__(type(self))
        other.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_inner"})
        _Adapter.__init__(other, inner, self.timeout)
        return other

    @_translated
    def clone(self: _A) -> _A:
        """A new handle on the same store (new connections), its own
        adapter."""
        return self._like(self._inner.clone())

    # -- c10d's Store API -------------------------------------------------

    @_translated
    def set(self, key: str, value: str | bytes) -> None:
        self._inner.set(key, value)

    @_translated
    def get(self, key: str) -> bytes:
        return self._inner.get(key)

    @_translated
    def add(self, key: str, value: int) -> int:
        return self._inner.add(key, value)

    @_translated
    def compare_set(self, key: str, expected_value: str | bytes, desired_value: str | bytes) -> bytes:
        return self._inner.compare_set(key, expected_value, desired_value)

    @_translated
    def deleteKey(self, key: str) -> bool:  # noqa: N802 - the name c10d's C++ side calls
        return self._inner.delete_key(key)

    delete_key = deleteKey

    @_translated
    def getNumKeys(self) -> int:  # noqa: N802 - the name c10d's C++ side calls
        return self._inner.num_keys()

    num_keys = getNumKeys

    @_translated
    def check(self, keys: Iterable[str]) -> bool:
        return self._inner.check(keys)

    @_translated
    def wait(self, keys: Iterable[str], timeout: timedelta | None = None) -> None:
        self._inner.wait(keys, self.timeout if timeout is None else timeout)

    @_translated
    def append(self, key: str, value: str | bytes) -> None:
        self._inner.append(key, value)

    @_translated
    def multi_get(self, keys: Iterable[str]) -> list[bytes]:
        return self._inner.multi_get(keys)

    @_translated
    def multi_set(self, keys: Iterable[str], values: Iterable[str | bytes]) -> None:
        self._inner.multi_set(keys, values)

    def has_extended_api(self) -> bool:
        return True

    @_translated
    def queue_push(self, key: str, value: str | bytes) -> None:
        self._inner.queue_push(key, value)

    @_translated
    def queue_pop(self, key: str, block: bool = True) -> bytes:
        return self._inner.queue_pop(key, block)

    @_translated
    def queue_len(self, key: str) -> int:
        return self._inner.queue_len(key)

    @_translated
    def list_keys(self) -> list[str]:
        return self._inner.list_keys()

    # -- distcore's own ---------------------------------------------------

    @_translated
    def list_prefix(self, prefix: str) -> list[str]:
        """The keys starting with `prefix` (distcore.Store.list_prefix)."""
        return self._inner.list_prefix(prefix)

    @_translated
    def delete_prefix(self, prefix: str) -> int:
        """Deletes the keys starting with `prefix` (distcore.Store.delete_prefix)."""
        return self._inner.delete_prefix(prefix)

    def __repr__(self) -> str:
        return f"distcore.torch.{type(self).__name__}({self._inner!r})"


class _SessionMethods(_Adapter):
    """Liveness sessions (docs/liveness.md), for stores that hold them."""

    _inner: Any  # a distcore TCPStore or EtcdStore

    @_translated
    def open_session(self, group: str, rank: int, world_size: int | None = None, **options: Any) -> None:
        """Opens a liveness session on this store: when another member of
        `group` fails, this store's blocked and later calls raise at once,
        naming it (distcore's ``open_session``; same options)."""
        self._inner.open_session(group, rank, world_size, **options)

    @_translated
    def close_session(self) -> None:
        """Closes the session gracefully."""
        self._inner.close_session()

    @_translated
    def report_error(self, message: str) -> None:
        """Ends the session with this process's own error: the group fails,
        naming this rank, with `message`."""
        self._inner.report_error(message)


class TCPStore(_SessionMethods):
    """distcore.TCPStore as a torch Store: the same arguments, PyTorch's
    (`host_name`, `port`, `world_size`, `is_master`, `timeout`,
    `wait_for_workers`, `multi_tenant`, `master_listen_fd`, `use_libuv`)
    and distcore's keyword-only ones (`secret`, `tls_ca`, `tls_cert`,
    `tls_key`, ..., `bind_address`, quotas)."""

    def __init__(self, host_name: str, port: int, world_size: int | None = None, is_master: bool = False,
                 timeout: timedelta | float = timedelta(seconds=300), *args: Any, **kwargs: Any) -> None:
        try:
            inner = _dc.TCPStore(host_name, port, world_size, is_master, timeout, *args, **kwargs)
        except _dc.DistError as e:
            raise torch_error(e) from None
        super().__init__(inner, _timedelta(timeout))

    @property
    def host(self) -> str:
        """The host the store connects to."""
        return str(self._inner.host)

    @property
    def port(self) -> int:
        """The port the store connects to (the server's, once it listens)."""
        return int(self._inner.port)

    @property
    def libuvBackend(self) -> bool:  # noqa: N802 - PyTorch's name
        """False: the server, when this handle hosts one, is distcore's."""
        return False

    @_translated
    def wait_for_workers(self) -> None:
        """Waits until `world_size` handles have joined (the server's)."""
        self._inner.wait_for_workers()

    @_translated
    def members(self) -> Any:
        """The membership of this handle's recoverable group."""
        return self._inner.members()

    @_translated
    def leased(self) -> TCPStore:
        """A view whose writes die with this handle's session."""
        return self._like(self._inner.leased())


class EtcdStore(_SessionMethods):
    """distcore.EtcdStore as a torch Store: keys in an etcd v3 cluster
    under `prefix` (``endpoints``, ``prefix``, ``timeout`` as there)."""

    def __init__(self, endpoints: str | Iterable[str] = ("127.0.0.1:2379",), prefix: str = "/distcore",
                 timeout: timedelta | float | None = None) -> None:
        try:
            inner = _dc.EtcdStore(endpoints, prefix, timeout)
        except _dc.DistError as e:
            raise torch_error(e) from None
        super().__init__(inner, None if timeout is None else _timedelta(timeout))

    @_translated
    def leased(self) -> EtcdStore:
        """A view whose writes die with this handle's session."""
        return self._like(self._inner.leased())


class FileStore(_Adapter):
    """distcore.FileStore as a torch Store (``file_name``, ``world_size``)."""

    _inner: _dc.FileStore

    def __init__(self, file_name: str, world_size: int | None = -1) -> None:
        try:
            inner = _dc.FileStore(file_name, world_size)
        except _dc.DistError as e:
            raise torch_error(e) from None
        super().__init__(inner)

    @property
    def path(self) -> str:
        """The file's path."""
        return str(self._inner.path)


class HashStore(_Adapter):
    """distcore.HashStore as a torch Store: keys in this process."""

    def __init__(self) -> None:
        super().__init__(_dc.HashStore())


class PrefixStore(_Adapter):
    """A view of `store` (an adapter of this module, or a distcore store)
    where every key k is ``prefix + "/" + k``, as torch's PrefixStore, with
    queues and list_keys too."""

    _inner: _dc.PrefixStore

    def __init__(self, prefix: str, store: _Adapter | _dc.Store) -> None:
        if isinstance(store, _Adapter):
            underlying: _dc.Store = store.distcore_store
        elif isinstance(store, _dc.Store):
            underlying = store
        else:
            raise ValueError(f"store must be a distcore.torch or distcore store, not {type(store).__name__}")
        self._underlying = store
        try:
            inner = _dc.PrefixStore(prefix, underlying)
        except _dc.DistError as e:
            raise torch_error(e) from None
        super().__init__(inner, store.timeout)

    @property
    def underlying_store(self) -> _Adapter | _dc.Store:
        """The store this one views."""
        return self._underlying

    @property
    def prefix(self) -> str:
        """The prefix."""
        return str(self._inner.prefix)


def _timedelta(timeout: timedelta | float) -> timedelta:
    return timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))

