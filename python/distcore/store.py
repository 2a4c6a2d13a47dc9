"""Stores: torch.distributed's Store API over distcore's stores.

Names, arguments and defaults follow torch/csrc/distributed/c10d/init.cpp
(the pybind11 definitions of Store, TCPStore, FileStore, HashStore and
PrefixStore). Keys are str; values are str (encoded as UTF-8, as PyTorch
does) or bytes; values come back as bytes. Timeouts are datetime.timedelta
(timedelta(0): no timeout, PyTorch's kNoTimeout); numbers of seconds are
accepted too.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from datetime import timedelta
from ctypes import c_bool, c_int64, c_size_t, c_uint16, c_uint64, c_void_p
from typing import Callable, Iterable, Iterator, NamedTuple, TypeVar

from ._lib import (Buf, BufArray, ClientCounter, EtcdStoreOptions, MemberInfo, ServerStats, SessionOptions,
                   TcpStoreOptions, check, lib, take_array, take_buf)
from ._util import (Closable, FilePath, Timeout, Value, int32_arg, key_arg, keys_arg, ms_to_timedelta, set_guards,
                    store_timeout_ms, value_arg, values_arg)
from .work import Work

__all__ = ["Store", "TCPStore", "FileStore", "HashStore", "PrefixStore", "EtcdStore"]

_S = TypeVar("_S", bound="Store")


class Store(Closable):
    """The store API (torch.distributed.Store) over a dc_store handle.

    Thread-safe: one object may be used from many threads, and a call
    blocked in one thread does not hold up the others. ``close()`` (or the
    end of a ``with`` block, or garbage collection) frees the handle; stores
    built on it (PrefixStore, clones) keep working. A store created before
    ``os.fork()`` refuses every call in the child (DistStateError); create
    a new one there.
    """

    def __init__(self) -> None:
        raise TypeError("distcore.Store is abstract: use TCPStore, FileStore, HashStore or PrefixStore")

    def _adopt(self, handle: int | None) -> None:
        self._own(handle, lib.dc_store_free)

    @property
    def _handle(self) -> int:
        h = self._h
        if not h:
            raise ValueError(f"operation on a closed {type(self).__name__}")
        return h

    # -- lifetime ---------------------------------------------------------

    def close(self) -> None:
        """Frees the handle now (idempotent). Matters for stores whose
        closing has effects: a FileStore's refcount, a TCPStore server."""
        self._release()

    def clone(self: _S) -> _S:
        """A new handle on the same store (c10d's Store::clone; for a
        TCPStore, a new connection), of the same class."""
        h = c_void_p()
        check(lib.dc_store_clone(self._handle, ctypes.byref(h)))
        return self._twin(h.value)

    def _twin(self: _S, handle: int | None) -> _S:
        """A store of the same class and settings as this one, on `handle`."""
        other = type(self).__new__(type(self))
        other.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_h"})
        other._adopt(handle)
        return other

    # -- the Store API ----------------------------------------------------

    def set(self, key: str, value: Value) -> None:
        """Sets `key` to `value` (str or bytes)."""
        value = value_arg(value)
        check(lib.dc_store_set(self._handle, key_arg(key), value, len(value)))

    def get(self, key: str) -> bytes:
        """The value of `key`, waiting up to the store's timeout for it
        (DistTimeoutError, a DistStoreError)."""
        buf = Buf()
        check(lib.dc_store_get(self._handle, key_arg(key), ctypes.byref(buf)))
        return take_buf(buf)

    def add(self, key: str, amount: int) -> int:
        """Adds `amount` to the integer at `key` (missing: 0); returns the new value."""
        if not isinstance(amount, int):
            raise TypeError(f"amount must be int, not {type(amount).__name__}")
        out = c_int64()
        check(lib.dc_store_add(self._handle, key_arg(key), amount, ctypes.byref(out)))
        return out.value

    def compare_set(self, key: str, expected_value: Value, desired_value: Value) -> bytes:
        """Sets `key` to `desired_value` if it holds `expected_value` (a
        missing key matches ""); returns the value now stored."""
        expected, desired = value_arg(expected_value, "expected_value"), value_arg(desired_value, "desired_value")
        buf = Buf()
        check(lib.dc_store_compare_set(self._handle, key_arg(key), expected, len(expected), desired,
                                       len(desired), ctypes.byref(buf)))
        return take_buf(buf)

    def delete_key(self, key: str) -> bool:
        """Deletes `key`; returns whether it existed."""
        out = c_bool()
        check(lib.dc_store_delete_key(self._handle, key_arg(key), ctypes.byref(out)))
        return out.value

    def check(self, keys: Iterable[str]) -> bool:
        """Whether every key exists, without waiting."""
        arr, n = keys_arg(keys)
        out = c_bool()
        check(lib.dc_store_check(self._handle, arr, n, ctypes.byref(out)))
        return out.value

    def wait(self, keys: Iterable[str], timeout: Timeout = None) -> None:
        """Waits until every key exists, for `timeout` (default: the store's)."""
        arr, n = keys_arg(keys)
        check(lib.dc_store_wait(self._handle, arr, n, store_timeout_ms(timeout)))

    def num_keys(self) -> int:
        """The number of keys holding values."""
        out = c_int64()
        check(lib.dc_store_num_keys(self._handle, ctypes.byref(out)))
        return out.value

    def append(self, key: str, value: Value) -> None:
        """Appends `value` to the value of `key` (creating it)."""
        value = value_arg(value)
        check(lib.dc_store_append(self._handle, key_arg(key), value, len(value)))

    def multi_get(self, keys: Iterable[str]) -> list[bytes]:
        """The values of `keys`, waiting up to the store's timeout for them."""
        arr, n = keys_arg(keys)
        bufs = (Buf * max(n, 1))()
        check(lib.dc_store_multi_get(self._handle, arr, n, bufs))
        return [take_buf(bufs[i]) for i in range(n)]

    def multi_set(self, keys: Iterable[str], values: Iterable[Value]) -> None:
        """Sets each key to the value at the same position."""
        arr, n = keys_arg(keys)
        vals, lens, m = values_arg(values)
        if n != m:
            raise ValueError(f"multi_set: {n} keys but {m} values")
        check(lib.dc_store_multi_set(self._handle, arr, vals, lens, n))

    def queue_push(self, key: str, value: Value) -> None:
        """Pushes `value` onto the back of the queue `key`."""
        value = value_arg(value)
        check(lib.dc_store_queue_push(self._handle, key_arg(key), value, len(value)))

    def queue_pop(self, key: str, block: bool = True) -> bytes:
        """Pops the front of the queue `key`: waiting up to the store's
        timeout with `block`, else QueueEmptyError when it is empty."""
        buf = Buf()
        check(lib.dc_store_queue_pop(self._handle, key_arg(key), bool(block), ctypes.byref(buf)))
        return take_buf(buf)

    def queue_len(self, key: str) -> int:
        """The number of elements in the queue `key`."""
        out = c_int64()
        check(lib.dc_store_queue_len(self._handle, key_arg(key), ctypes.byref(out)))
        return out.value

    def list_keys(self) -> list[str]:
        """Every key holding a value."""
        arr = BufArray()
        check(lib.dc_store_list_keys(self._handle, ctypes.byref(arr)))
        return [k.decode("utf-8") for k in take_array(arr)]

    def list_prefix(self, prefix: str) -> list[str]:
        """The keys holding a value that start with `prefix` (since 1.4)."""
        arr = BufArray()
        check(lib.dc_store_list_prefix(self._handle, key_arg(prefix), ctypes.byref(arr)))
        return [k.decode("utf-8") for k in take_array(arr)]

    def delete_prefix(self, prefix: str) -> int:
        """Deletes every key starting with `prefix` (since 1.4); returns how
        many values it deleted. A HashStore, an EtcdStore and a TCPStore on
        a distcore server (in one step) delete the queues under it too; see
        dc_store_delete_prefix."""
        out = c_int64()
        check(lib.dc_store_delete_prefix(self._handle, key_arg(prefix), ctypes.byref(out)))
        return out.value

    def barrier(self, key: str, world_size: int, timeout: Timeout = None) -> None:
        """Waits until `world_size` callers entered the barrier `key`."""
        world_size = int32_arg(world_size, "world_size")
        check(lib.dc_store_barrier(self._handle, key_arg(key), world_size, store_timeout_ms(timeout)))

    def has_extended_api(self) -> bool:
        """True: every distcore store has append, multi_get/multi_set,
        queues and list_keys."""
        return True

    @property
    def timeout(self) -> timedelta:
        """The store's default timeout (timedelta; timedelta(0): none)."""
        out = c_int64()
        check(lib.dc_store_get_timeout(self._handle, ctypes.byref(out)))
        return ms_to_timedelta(out.value)

    def set_timeout(self, timeout: timedelta | float) -> None:
        """Sets the store's default timeout (timedelta; timedelta(0): none)."""
        check(lib.dc_store_set_timeout(self._handle, store_timeout_ms(timeout, allow_none=False)))

    @contextlib.contextmanager
    def timeout_guard(self: _S, timeout: timedelta | float) -> Iterator[_S]:
        """Sets the timeout for the block, then restores the previous one
        (c10d's StoreTimeoutGuard)."""
        g = c_void_p()
        check(lib.dc_store_timeout_guard_new(self._handle, store_timeout_ms(timeout, allow_none=False),
                                             ctypes.byref(g)))
        try:
            yield self
        finally:
            lib.dc_store_timeout_guard_free(g.value)

    # -- asynchronous calls (distcore's) ----------------------------------

    def _work(self, fn: Callable[..., int], *args: object) -> Work:
        h = c_void_p()
        check(fn(self._handle, *args, ctypes.byref(h)))
        return Work._from_handle(h.value)

    def get_async(self, key: str) -> Work:
        """Starts a get: the Work's result() is the value."""
        return self._work(lib.dc_store_get_async, key_arg(key))

    def wait_async(self, keys: Iterable[str], timeout: Timeout = None) -> Work:
        """Starts a wait: the Work completes when the keys exist."""
        arr, n = keys_arg(keys)
        return self._work(lib.dc_store_wait_async, arr, n, store_timeout_ms(timeout))

    def queue_pop_async(self, key: str) -> Work:
        """Starts a blocking queue_pop: the Work's result() is the element."""
        return self._work(lib.dc_store_queue_pop_async, key_arg(key))

    def barrier_async(self, key: str, world_size: int, timeout: Timeout = None) -> Work:
        """Starts a barrier: the Work completes when it releases."""
        world_size = int32_arg(world_size, "world_size")
        return self._work(lib.dc_store_barrier_async, key_arg(key), world_size, store_timeout_ms(timeout))

    def __repr__(self) -> str:
        return f"<distcore.{type(self).__name__}{'' if self._h else ' closed'}>"


class HashStore(Store):
    """An in-process store (c10d's HashStore), shared by its clones. Default timeout 300 s."""

    def __init__(self) -> None:
        h = c_void_p()
        check(lib.dc_hash_store_new(ctypes.byref(h)))
        self._adopt(h.value)


class FileStore(Store):
    """A store in a file shared by processes (c10d's FileStore, same file
    format: torch.distributed.FileStore can use the file at once). With a
    `world_size`, the file is removed when `world_size` handles have closed."""

    def __init__(self, file_name: str | os.PathLike[str], world_size: int | None = -1) -> None:
        self._path = str(file_name)
        h = c_void_p()
        world_size = -1 if world_size is None else int32_arg(world_size, "world_size")
        check(lib.dc_file_store_new(self._path.encode(), world_size, ctypes.byref(h)))
        self._adopt(h.value)

    @property
    def path(self) -> str:
        """The path of the file."""
        return self._path


class EtcdStore(Store):
    """A store whose keys live in an etcd v3 cluster (3.4 or newer), under
    `prefix`, so that a job's rendezvous state outlives any one machine.
    `endpoints`: "host:port" strings (or one, comma-separated); a member
    that is down is skipped. Atomic operations are etcd transactions; waits
    are etcd watches."""

    def __init__(self, endpoints: str | Iterable[str] = ("127.0.0.1:2379",), prefix: str = "/distcore",
                 timeout: timedelta | float | None = None) -> None:
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e]
        opts = EtcdStoreOptions()
        check(lib.dc_etcd_store_options_init(ctypes.byref(opts), ctypes.sizeof(opts)))
        array, opts.num_endpoints = keys_arg([str(e) for e in endpoints])  # alive for the call
        opts.endpoints = array
        self._prefix = str(prefix)
        prefix_bytes = self._prefix.encode()  # alive for the call
        opts.prefix = prefix_bytes
        if timeout is not None:  # None: dc_etcd_store_options_init's default
            opts.timeout_ms = store_timeout_ms(timeout, allow_none=False)
        h = c_void_p()
        check(lib.dc_etcd_store_new(ctypes.byref(opts), ctypes.byref(h)))
        self._adopt(h.value)

    @property
    def prefix(self) -> str:
        """The job's prefix in the cluster."""
        return self._prefix

    def open_session(self, group: str, rank: int, world_size: int | None = None,
                     incarnation: int | None = None, ttl: timedelta | None = None) -> None:
        """Opens a liveness session of this process on the handle
        (docs/liveness.md, "On etcd"): an etcd lease of `ttl` (whole
        seconds, at least 2 s; None: 10 s) that the library renews three
        times a TTL. From then on, when another member of `group` fails —
        its lease runs out (its process died, froze or was cut off), it
        reports an error, a newer `incarnation` of its rank opens — this
        handle's blocked calls raise DistPeerError at once, naming it, and
        its later calls too. Members on `distcore serve --backend etcd`
        servers of the same prefix share the group."""
        opts = _session_options(group, rank, world_size, incarnation, ttl, False)
        check(lib.dc_etcd_store_open_session(self._handle, ctypes.byref(opts)))

    def close_session(self) -> None:
        """Closes the handle's session gracefully: its leased keys go, its
        group is not failed."""
        check(lib.dc_etcd_store_close_session(self._handle))

    def report_error(self, message: str) -> None:
        """Ends the handle's session with this process's own error: every
        other member of the group raises DistPeerError carrying `message`."""
        check(lib.dc_etcd_store_report_error(self._handle, message.encode()))

    def leased(self) -> EtcdStore:
        """A view of this handle whose writes (set, add, compare_set,
        append, multi_set, queue_push) put the keys they write on the
        session's etcd lease: they go when the session ends, however it
        ends. DistStateError without a session."""
        h = c_void_p()
        check(lib.dc_etcd_store_leased(self._handle, ctypes.byref(h)))
        return self._twin(h.value)


def _session_options(group: str, rank: int, world_size: int | None, incarnation: int | None,
                     ttl: timedelta | None, recoverable: bool) -> SessionOptions:
    """dc_session_options for open_session."""
    opts = SessionOptions()
    check(lib.dc_session_options_init(ctypes.byref(opts), ctypes.sizeof(opts)))
    opts.group = group.encode()
    opts.rank = int32_arg(rank, "rank")
    opts.world_size = -1 if world_size is None else int32_arg(world_size, "world_size")
    if incarnation is not None:
        opts.incarnation = incarnation
    if ttl is not None:
        opts.ttl_ms = int(ttl.total_seconds() * 1000)
    opts.recoverable = bool(recoverable)
    return opts


class PrefixStore(Store):
    """A view of `store` where every key k is ``prefix + "/" + k`` (c10d's PrefixStore)."""

    def __init__(self, prefix: str, store: Store) -> None:
        if not isinstance(store, Store):
            raise TypeError(f"store must be a distcore.Store, not {type(store).__name__}")
        self._underlying = store
        self._prefix = prefix
        h = c_void_p()
        check(lib.dc_prefix_store_new(key_arg(prefix, "prefix"), store._handle, ctypes.byref(h)))
        self._adopt(h.value)

    @property
    def underlying_store(self) -> Store:
        """The store this PrefixStore wraps."""
        return self._underlying

    @property
    def _underlying_non_prefix_store(self) -> Store:
        s = self._underlying
        while isinstance(s, PrefixStore):
            s = s.underlying_store
        return s

    @property
    def prefix(self) -> str:
        return self._prefix


def _networks(value: str | Iterable[str] | None) -> bytes | None:
    """A list of CIDR networks (or one "a,b" string) as the C option."""
    if value is None:
        return None
    if not isinstance(value, str):
        value = ",".join(value)
    return value.encode()


def _tcp_defaults() -> TcpStoreOptions:
    """dc_tcp_store_options_init's defaults: the library holds the numbers."""
    opts = TcpStoreOptions()
    check(lib.dc_tcp_store_options_init(ctypes.byref(opts), ctypes.sizeof(opts)))
    return opts


# PyTorch's signature shows the value (timedelta(seconds=300)); the number
# is the library's.
_DEFAULT_TCP_TIMEOUT = ms_to_timedelta(_tcp_defaults().timeout_ms)


class Member(NamedTuple):
    """A member of a recoverable group (TCPStore.members())."""
    rank: int
    pid: int
    incarnation: int


class Members(NamedTuple):
    """A recoverable group's membership at one epoch (TCPStore.members())."""
    epoch: int
    members: list[Member]


class TCPStore(Store):
    """A TCP key-value store (torch.distributed.TCPStore): a client, plus
    the server when `is_master`. Talks to distcore servers and PyTorch's
    (libuv and legacy).

    Arguments as PyTorch's: `world_size` None for an unknown number of
    handles; `timeout` for connecting and for every call (default: the
    library's, 300 s, as PyTorch's); `master_listen_fd`
    an already-listening socket to serve on; `use_libuv` is accepted and
    ignored (the server is distcore's own). distcore's own, keyword-only:
    `bind_address` (listen only on that IP; None: every interface, as
    PyTorch, where anyone who reaches the port can read and write every key
    unless the following say otherwise) and `max_value_size` (bytes the
    server accepts in a value; None: 64 MiB); `secret` (bytes or str: the
    server requires clients to prove they hold it, a client proves it and
    requires the server to prove it too; it never travels;
    DistPermissionError when either side fails); for a server, `allow` (CIDR
    networks clients may connect from, a list or "a,b"),
    `allow_unauthenticated` (networks whose clients need not authenticate:
    PyTorch's), `max_connections`, `max_keys` and `max_stored_bytes`
    (quotas; a write past them raises DistQuotaError, except set,
    multi_set and queue_push, which have no reply: their refusal raises
    DistQuotaError from a later call of the handle). TLS, with paths of PEM files (str, bytes or os.PathLike): `tls_cert` and `tls_key`, a
    certificate chain and its private key, given together (a server serves
    TLS with them, and then serves clients in clear only from
    `allow_unauthenticated`; a client presents them to servers that verify
    clients); `tls_ca` (a client, a server's own handle included, connects
    over TLS trusting these CA certificates; None: in clear); for a server
    with a certificate, `tls_client_ca` (require client certificates from
    these CAs: mutual TLS); for a client, `tls_server_name` (check the
    server's certificate against this name instead of `host_name`). A
    refused certificate or handshake, or a client in clear to a server that
    requires TLS, raises DistPermissionError; files that do not go together
    (a certificate without its key, a client's certificate or server name
    without `tls_ca`, `tls_client_ca` without a serving certificate) or that
    cannot be read raise DistValueError.
    """

    def __init__(self, host_name: str, port: int, world_size: int | None = None, is_master: bool = False,
                 timeout: timedelta | float = _DEFAULT_TCP_TIMEOUT, wait_for_workers: bool = True,
                 multi_tenant: bool = False, master_listen_fd: int | None = None, use_libuv: bool = True, *,
                 bind_address: str | None = None, max_value_size: int | None = None, secret: Value | None = None,
                 allow: str | Iterable[str] | None = None, allow_unauthenticated: str | Iterable[str] | None = None,
                 max_connections: int | None = None, max_keys: int | None = None, max_stored_bytes: int | None = None,
                 tls_cert: FilePath | None = None, tls_key: FilePath | None = None, tls_ca: FilePath | None = None,
                 tls_client_ca: FilePath | None = None, tls_server_name: str | None = None) -> None:
        if not isinstance(host_name, str):
            raise TypeError(f"host_name must be str, not {type(host_name).__name__}")
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int in [0, 65535], not {port!r}")
        opts = TcpStoreOptions()
        check(lib.dc_tcp_store_options_init(ctypes.byref(opts), ctypes.sizeof(opts)))
        host = host_name.encode()
        bind = None if bind_address is None else bind_address.encode()
        opts.host, opts.port, opts.is_server = host, port, bool(is_master)
        opts.world_size = -1 if world_size is None else int32_arg(world_size, "world_size")
        opts.wait_for_workers = bool(wait_for_workers)
        opts.timeout_ms = store_timeout_ms(timeout, allow_none=False)
        opts.multi_tenant = bool(multi_tenant)
        opts.master_listen_fd = -1 if master_listen_fd is None else int(master_listen_fd)
        opts.bind_address = bind
        if max_value_size is not None:
            opts.max_value_size = int(max_value_size)
        opts.allow, opts.allow_unauthenticated = _networks(allow), _networks(allow_unauthenticated)
        for name, value in (("max_connections", max_connections), ("max_keys", max_keys),
                            ("max_stored_bytes", max_stored_bytes)):
            if value is not None:
                if not 0 < int(value) < 1 << 64:  # ctypes would wrap it
                    raise ValueError(f"{name} must be positive (and under 2**64), not {value!r}")
                setattr(opts, name, int(value))
        set_guards(opts, secret, tls_cert, tls_key, tls_ca, tls_client_ca, tls_server_name)
        h = c_void_p()
        check(lib.dc_tcp_store_new(ctypes.byref(opts), ctypes.byref(h)))
        self._host = host_name
        self._adopt(h.value)

    @property
    def host(self) -> str:
        """The host the store connects to."""
        return self._host

    @property
    def port(self) -> int:
        """The server's port (the chosen one when a server asked for port 0)."""
        out = c_uint16()
        check(lib.dc_tcp_store_port(self._handle, ctypes.byref(out)))
        return out.value

    @property
    def libuvBackend(self) -> bool:  # noqa: N802 - PyTorch's name
        """False: distcore's server is its own, not PyTorch's libuv backend."""
        return False

    def wait_for_workers(self) -> None:
        """Counts this handle in and, on the server, waits until the world
        size is reached (PyTorch's TCPStore::waitForWorkers)."""
        check(lib.dc_tcp_store_wait_for_workers(self._handle))

    def open_session(self, group: str, rank: int, world_size: int | None = None,
                     incarnation: int | None = None, ttl: timedelta | None = None,
                     recoverable: bool = False) -> None:
        """Opens a liveness session of this process on the handle
        (docs/liveness.md): from then on, when another member of `group`
        fails (its process dies, reports an error, or is replaced by a newer
        `incarnation` of its rank), every blocked and later call of this
        handle raises DistPeerError at once, naming it; and when this
        process dies, the others are told. `incarnation`: new for every start
        of the process (None: a fresh one). `ttl`: the member is failed when
        nothing arrives from it for this long (a frozen or cut-off process;
        the handle keeps itself alive from the library's async thread);
        None: only the connection tells (a crash). `recoverable`: a member's
        failure fails no other member's calls but changes the group's
        membership (members(), watch_members()); every member must agree."""
        opts = _session_options(group, rank, world_size, incarnation, ttl, recoverable)
        check(lib.dc_tcp_store_open_session(self._handle, ctypes.byref(opts)))

    def members(self) -> Members:
        """The membership of this handle's recoverable group: its epoch
        (counting the changes; every member reads the same set at the same
        epoch) and the live members by rank. DistStateError without a
        session in a recoverable group."""
        epoch, n = c_uint64(), c_size_t()
        check(lib.dc_tcp_store_members(self._handle, ctypes.byref(epoch), None, 0, ctypes.byref(n)))
        while True:
            arr = (MemberInfo * max(n.value, 1))()
            capacity = n.value
            check(lib.dc_tcp_store_members(self._handle, ctypes.byref(epoch), arr, capacity, ctypes.byref(n)))
            if n.value <= capacity:
                break
        return Members(epoch.value, [Member(m.rank, m.pid, m.incarnation) for m in arr[:n.value]])

    def watch_members(self, epoch: int) -> Work:
        """A Work that completes once the membership of this handle's
        recoverable group has passed `epoch` (at once if it has): its value
        is the new epoch (bytes, decimal); members() then reads the members.
        No timeout of its own: wait on it with one, or poll its fd."""
        h = c_void_p()
        check(lib.dc_tcp_store_watch_members(self._handle, int(epoch), ctypes.byref(h)))
        return Work._from_handle(h.value)

    def close_session(self) -> None:
        """Closes the handle's session gracefully: its group is not failed."""
        check(lib.dc_tcp_store_close_session(self._handle))

    def report_error(self, message: str) -> None:
        """Ends the handle's session with this process's own error: every
        other member of the group raises DistPeerError carrying `message`."""
        check(lib.dc_tcp_store_report_error(self._handle, message.encode()))

    def leased(self) -> TCPStore:
        """A view of this handle whose writes (set, add, compare_set,
        append, multi_set, queue_push) tie the keys they write to the
        handle's session: when the session ends, however it ends (closed,
        the process dead or frozen past its TTL, an error reported), the
        server deletes them (docs/liveness.md). The last write of a key
        decides, as with etcd's leases. The view shares the handle's
        connections and session and reads as the handle; its writes raise
        DistStateError while the handle has no session."""
        h = c_void_p()
        check(lib.dc_tcp_store_leased(self._handle, ctypes.byref(h)))
        return self._twin(h.value)

    def collect_client_counters(self) -> dict[str, dict[str, float]]:
        """Per-operation latency counters of this handle: {op: {"count",
        "mean_ms", "variance_ms"}} (PyTorch's collectClientCounters)."""
        n = c_size_t()
        check(lib.dc_tcp_store_counters(self._handle, None, 0, ctypes.byref(n)))
        arr = (ClientCounter * max(n.value, 1))()
        check(lib.dc_tcp_store_counters(self._handle, arr, n.value, ctypes.byref(n)))
        return {c.op.decode(): {"count": c.count, "mean_ms": c.mean_ms, "variance_ms": c.variance_ms}
                for c in arr[:min(n.value, len(arr))]}

    def server_metrics(self) -> str:
        """The metrics of the server this handle runs, in Prometheus's text
        format (DistValueError for a client-only handle)."""
        buf = Buf()
        check(lib.dc_tcp_store_server_metrics(self._handle, ctypes.byref(buf)))
        return take_buf(buf).decode()

    def server_stats(self) -> dict[str, int]:
        """The load of the server this handle runs: {"connections",
        "pending_waits", "keys"} (DistValueError for a client-only handle)."""
        stats = ServerStats(struct_size=ctypes.sizeof(ServerStats))
        check(lib.dc_tcp_store_server_stats(self._handle, ctypes.byref(stats)))
        return {"connections": stats.connections, "pending_waits": stats.pending_waits, "keys": stats.keys}
