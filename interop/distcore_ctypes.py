"""A thin ctypes binding of libdistcore.so, shared by the Python tests.

Load with `load()`; wrap handles in `Store` / `Work` for Pythonic use. Every
failing call raises `DistcoreError` carrying the dc_status and the message
of dc_last_error_message().
"""
import ctypes
import os
from ctypes import (CFUNCTYPE, POINTER, Structure, c_bool, c_char_p, c_double,
                    c_int, c_int32, c_int64, c_size_t, c_uint8, c_uint64,
                    c_void_p)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_LIB = os.path.join(ROOT, "build", "prefix", "lib", "libdistcore.so")

OK, INVALID_ARGUMENT, TIMEOUT, NETWORK, QUEUE_EMPTY, NOT_SUPPORTED = range(6)
REMOTE, SHUT_DOWN, ABORTED, PROTOCOL, IO, INVALID_STATE, INTERNAL = range(6, 13)
TIMEOUT_DEFAULT, TIMEOUT_FOREVER = -1, 0


class Buf(Structure):
    _fields_ = [("data", POINTER(c_uint8)), ("len", c_size_t)]


class BufArray(Structure):
    _fields_ = [("items", POINTER(Buf)), ("len", c_size_t)]


class TcpStoreOptions(Structure):
    _fields_ = [("struct_size", c_size_t), ("host", c_char_p), ("port", ctypes.c_uint16),
                ("is_server", c_bool), ("world_size", c_int32), ("wait_for_workers", c_bool), ("timeout_ms", c_int64),
                ("multi_tenant", c_bool), ("master_listen_fd", c_int), ("bind_address", c_char_p),
                ("max_value_size", c_uint64)]


class ServerStats(Structure):
    _fields_ = [("struct_size", c_size_t), ("connections", c_uint64), ("pending_waits", c_uint64), ("keys", c_uint64)]


RPC_FUNCTION = CFUNCTYPE(c_int32, POINTER(c_uint8), c_size_t, POINTER(c_void_p), c_size_t, c_int32,
                         c_void_p, c_void_p)


class RpcFunctionEntry(Structure):
    _fields_ = [("name", c_char_p), ("function", RPC_FUNCTION), ("user_data", c_void_p)]


class RpcOptions(Structure):
    _fields_ = [("struct_size", c_size_t), ("num_worker_threads", ctypes.c_uint32), ("rpc_timeout_ms", c_int64),
                ("listen_address", c_char_p), ("ignore_rref_leak", c_bool),
                ("functions", POINTER(RpcFunctionEntry)), ("num_functions", c_size_t)]


class RRefDebugInfo(Structure):
    _fields_ = [("struct_size", c_size_t), ("num_owner_rrefs", c_uint64), ("num_pending_futures", c_uint64),
                ("num_pending_users", c_uint64), ("num_forks", c_uint64)]

    def as_tuple(self):
        return (self.num_owner_rrefs, self.num_pending_futures, self.num_pending_users, self.num_forks)


WORK_CALLBACK = CFUNCTYPE(None, c_void_p, c_void_p)
PROFILER_BEGIN = CFUNCTYPE(c_uint64, c_char_p, c_void_p)
PROFILER_END = CFUNCTYPE(None, c_char_p, c_uint64, c_void_p)

_SIGNATURES = {
    # name: (argtypes, restype); restype None means dc_status.
    "dc_last_error_message": ([], c_char_p),
    "dc_status_str": ([c_int32], c_char_p),
    "dc_version": ([], c_char_p),
    "dc_buf_free": ([POINTER(Buf)], "void"),
    "dc_buf_array_free": ([POINTER(BufArray)], "void"),
    "dc_hash_store_new": ([POINTER(c_void_p)], None),
    "dc_file_store_new": ([c_char_p, c_int32, POINTER(c_void_p)], None),
    "dc_prefix_store_new": ([c_char_p, c_void_p, POINTER(c_void_p)], None),
    "dc_store_clone": ([c_void_p, POINTER(c_void_p)], None),
    "dc_store_free": ([c_void_p], "void"),
    "dc_store_set": ([c_void_p, c_char_p, c_char_p, c_size_t], None),
    "dc_store_get": ([c_void_p, c_char_p, POINTER(Buf)], None),
    "dc_store_add": ([c_void_p, c_char_p, c_int64, POINTER(c_int64)], None),
    "dc_store_compare_set": ([c_void_p, c_char_p, c_char_p, c_size_t, c_char_p,
                              c_size_t, POINTER(Buf)], None),
    "dc_store_delete_key": ([c_void_p, c_char_p, POINTER(c_bool)], None),
    "dc_store_check": ([c_void_p, POINTER(c_char_p), c_size_t, POINTER(c_bool)], None),
    "dc_store_wait": ([c_void_p, POINTER(c_char_p), c_size_t, c_int64], None),
    "dc_store_num_keys": ([c_void_p, POINTER(c_int64)], None),
    "dc_store_append": ([c_void_p, c_char_p, c_char_p, c_size_t], None),
    "dc_store_multi_get": ([c_void_p, POINTER(c_char_p), c_size_t, POINTER(Buf)], None),
    "dc_store_multi_set": ([c_void_p, POINTER(c_char_p), POINTER(c_char_p),
                            POINTER(c_size_t), c_size_t], None),
    "dc_store_queue_push": ([c_void_p, c_char_p, c_char_p, c_size_t], None),
    "dc_store_queue_pop": ([c_void_p, c_char_p, c_bool, POINTER(Buf)], None),
    "dc_store_queue_len": ([c_void_p, c_char_p, POINTER(c_int64)], None),
    "dc_store_list_keys": ([c_void_p, POINTER(BufArray)], None),
    "dc_store_barrier": ([c_void_p, c_char_p, c_int32, c_int64], None),
    "dc_store_get_timeout": ([c_void_p, POINTER(c_int64)], None),
    "dc_store_set_timeout": ([c_void_p, c_int64], None),
    "dc_store_get_async": ([c_void_p, c_char_p, POINTER(c_void_p)], None),
    "dc_store_wait_async": ([c_void_p, POINTER(c_char_p), c_size_t, c_int64,
                             POINTER(c_void_p)], None),
    "dc_tcp_store_options_init": ([POINTER(TcpStoreOptions), c_size_t], None),
    "dc_tcp_store_new": ([POINTER(TcpStoreOptions), POINTER(c_void_p)], None),
    "dc_tcp_store_port": ([c_void_p, POINTER(ctypes.c_uint16)], None),
    "dc_tcp_store_server_stats": ([c_void_p, POINTER(ServerStats)], None),
    "dc_rpc_options_init": ([POINTER(RpcOptions), c_size_t], None),
    "dc_rpc_init": ([c_void_p, c_char_p, c_int32, c_int32, POINTER(RpcOptions),
                     POINTER(c_void_p)], None),
    "dc_rpc_free": ([c_void_p], "void"),
    "dc_rpc_shutdown": ([c_void_p, c_bool, c_int64], None),
    "dc_rpc_sync": ([c_void_p, c_char_p, c_char_p, c_char_p, c_size_t, POINTER(c_void_p), c_size_t,
                     c_int64, POINTER(Buf)], None),
    "dc_rpc_remote": ([c_void_p, c_char_p, c_char_p, c_char_p, c_size_t, POINTER(c_void_p), c_size_t,
                       c_int64, POINTER(c_void_p)], None),
    "dc_rpc_debug_info": ([c_void_p, POINTER(RRefDebugInfo)], None),
    "dc_rpc_reply_set": ([c_void_p, c_char_p, c_size_t], None),
    "dc_rpc_reply_set_error": ([c_void_p, c_char_p], None),
    "dc_rref_new": ([c_void_p, c_char_p, c_size_t, POINTER(c_void_p)], None),
    "dc_rref_clone": ([c_void_p, POINTER(c_void_p)], None),
    "dc_rref_free": ([c_void_p], "void"),
    "dc_rref_to_here": ([c_void_p, c_int64, POINTER(Buf)], None),
    "dc_rref_is_owner": ([c_void_p, POINTER(c_bool)], None),
    "dc_rref_confirmed_by_owner": ([c_void_p, POINTER(c_bool)], None),
    "dc_elastic_barrier": ([c_void_p, c_int32, c_char_p, c_int64], None),
    "dc_elastic_synchronize": ([c_void_p, c_char_p, c_size_t, c_int32, c_int32,
                                c_char_p, c_int64, POINTER(BufArray)], None),
    "dc_elastic_get_all": ([c_void_p, c_int32, c_char_p, c_int32, POINTER(BufArray)], None),
    "dc_work_new": ([c_int32, c_int32, c_char_p, c_int64, POINTER(c_void_p)], None),
    "dc_work_new_future": ([POINTER(c_void_p)], None),
    "dc_work_free": ([c_void_p], "void"),
    "dc_work_is_completed": ([c_void_p, POINTER(c_bool)], None),
    "dc_work_is_success": ([c_void_p, POINTER(c_bool)], None),
    "dc_work_wait": ([c_void_p, c_int64], None),
    "dc_work_finish": ([c_void_p, c_int32, c_char_p], None),
    "dc_work_finish_with_result": ([c_void_p, c_char_p, c_size_t], None),
    "dc_work_abort": ([c_void_p], None),
    "dc_work_result": ([c_void_p, POINTER(Buf)], None),
    "dc_work_duration": ([c_void_p, POINTER(c_double)], None),
    "dc_work_add_done_callback": ([c_void_p, WORK_CALLBACK, c_void_p], None),
    "dc_work_fd": ([c_void_p, POINTER(c_int)], None),
    "dc_set_profiler_hooks": ([PROFILER_BEGIN, PROFILER_END, c_void_p], None),
}


class DistcoreError(Exception):
    """A failed distcore call: `status` is the dc_status code."""

    def __init__(self, status, message):
        super().__init__(f"[{status}] {message}")
        self.status = status
        self.message = message


def load(path=None):
    """Loads libdistcore.so (DISTCORE_LIB, else the build/prefix install)."""
    lib = ctypes.CDLL(path or os.environ.get("DISTCORE_LIB", DEFAULT_LIB))
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = None if res == "void" else (c_int32 if res is None else res)
    return lib


class Api:
    """The loaded library plus helpers that raise on failure."""

    def __init__(self, lib=None):
        self.lib = lib or load()

    def check(self, status):
        if status != OK:
            raise DistcoreError(status, self.lib.dc_last_error_message().decode())

    def take_buf(self, buf):
        data = ctypes.string_at(buf.data, buf.len)
        self.lib.dc_buf_free(ctypes.byref(buf))
        return data

    def take_array(self, arr):
        items = [ctypes.string_at(arr.items[i].data, arr.items[i].len) for i in range(arr.len)]
        self.lib.dc_buf_array_free(ctypes.byref(arr))
        return items


def _keys(keys):
    encoded = [k.encode() for k in keys]
    return (c_char_p * max(len(encoded), 1))(*encoded), len(encoded)


class Work:
    """Owns a dc_work handle."""

    def __init__(self, api, handle):
        self.api, self.handle = api, handle

    def __del__(self):
        if self.handle:
            self.api.lib.dc_work_free(self.handle)
            self.handle = None

    def wait(self, timeout_ms=TIMEOUT_DEFAULT):
        self.api.check(self.api.lib.dc_work_wait(self.handle, timeout_ms))

    def result(self):
        buf = Buf()
        self.api.check(self.api.lib.dc_work_result(self.handle, ctypes.byref(buf)))
        return self.api.take_buf(buf)

    def is_completed(self):
        out = c_bool()
        self.api.check(self.api.lib.dc_work_is_completed(self.handle, ctypes.byref(out)))
        return out.value

    def fd(self):
        out = c_int()
        self.api.check(self.api.lib.dc_work_fd(self.handle, ctypes.byref(out)))
        return out.value


class Store:
    """Owns a dc_store handle; methods mirror torch.distributed.Store."""

    def __init__(self, api, handle):
        self.api, self.handle = api, handle

    @classmethod
    def hash(cls, api):
        h = c_void_p()
        api.check(api.lib.dc_hash_store_new(ctypes.byref(h)))
        return cls(api, h)

    @classmethod
    def file(cls, api, path, world_size=-1):
        h = c_void_p()
        api.check(api.lib.dc_file_store_new(path.encode(), world_size, ctypes.byref(h)))
        return cls(api, h)

    def close(self):
        """Releases the handle now (for stores whose closing has effects)."""
        self.__del__()

    @classmethod
    def tcp(cls, api, port, host="127.0.0.1", is_server=False, world_size=-1,
            wait_for_workers=True, timeout_ms=30000):
        opts = TcpStoreOptions()
        api.check(api.lib.dc_tcp_store_options_init(ctypes.byref(opts), ctypes.sizeof(opts)))
        host_bytes = host.encode()  # kept alive for the call
        opts.host, opts.port, opts.is_server = host_bytes, port, is_server
        opts.world_size, opts.wait_for_workers, opts.timeout_ms = world_size, wait_for_workers, timeout_ms
        h = c_void_p()
        api.check(api.lib.dc_tcp_store_new(ctypes.byref(opts), ctypes.byref(h)))
        return cls(api, h)

    @property
    def port(self):
        out = ctypes.c_uint16()
        self.api.check(self.api.lib.dc_tcp_store_port(self.handle, ctypes.byref(out)))
        return out.value

    def prefixed(self, prefix):
        h = c_void_p()
        self.api.check(self.api.lib.dc_prefix_store_new(prefix.encode(), self.handle, ctypes.byref(h)))
        return Store(self.api, h)

    def clone(self):
        h = c_void_p()
        self.api.check(self.api.lib.dc_store_clone(self.handle, ctypes.byref(h)))
        return Store(self.api, h)

    def __del__(self):
        if self.handle:
            self.api.lib.dc_store_free(self.handle)
            self.handle = None

    def set(self, key, value):
        self.api.check(self.api.lib.dc_store_set(self.handle, key.encode(), value, len(value)))

    def get(self, key):
        buf = Buf()
        self.api.check(self.api.lib.dc_store_get(self.handle, key.encode(), ctypes.byref(buf)))
        return self.api.take_buf(buf)

    def add(self, key, delta):
        out = c_int64()
        self.api.check(self.api.lib.dc_store_add(self.handle, key.encode(), delta, ctypes.byref(out)))
        return out.value

    def compare_set(self, key, expected, desired):
        buf = Buf()
        self.api.check(self.api.lib.dc_store_compare_set(
            self.handle, key.encode(), expected, len(expected), desired, len(desired),
            ctypes.byref(buf)))
        return self.api.take_buf(buf)

    def delete_key(self, key):
        out = c_bool()
        self.api.check(self.api.lib.dc_store_delete_key(self.handle, key.encode(), ctypes.byref(out)))
        return out.value

    def check(self, keys):
        arr, n = _keys(keys)
        out = c_bool()
        self.api.check(self.api.lib.dc_store_check(self.handle, arr, n, ctypes.byref(out)))
        return out.value

    def wait(self, keys, timeout_ms=TIMEOUT_DEFAULT):
        arr, n = _keys(keys)
        self.api.check(self.api.lib.dc_store_wait(self.handle, arr, n, timeout_ms))

    def num_keys(self):
        out = c_int64()
        self.api.check(self.api.lib.dc_store_num_keys(self.handle, ctypes.byref(out)))
        return out.value

    def append(self, key, value):
        self.api.check(self.api.lib.dc_store_append(self.handle, key.encode(), value, len(value)))

    def multi_get(self, keys):
        arr, n = _keys(keys)
        bufs = (Buf * max(n, 1))()
        self.api.check(self.api.lib.dc_store_multi_get(self.handle, arr, n, bufs))
        return [self.api.take_buf(bufs[i]) for i in range(n)]

    def multi_set(self, keys, values):
        arr, n = _keys(keys)
        vals = (c_char_p * max(len(values), 1))(*values)
        lens = (c_size_t * max(len(values), 1))(*[len(v) for v in values])
        self.api.check(self.api.lib.dc_store_multi_set(self.handle, arr, vals, lens, n))

    def queue_push(self, key, value):
        self.api.check(self.api.lib.dc_store_queue_push(self.handle, key.encode(), value, len(value)))

    def queue_pop(self, key, block=True):
        buf = Buf()
        self.api.check(self.api.lib.dc_store_queue_pop(self.handle, key.encode(), block, ctypes.byref(buf)))
        return self.api.take_buf(buf)

    def queue_len(self, key):
        out = c_int64()
        self.api.check(self.api.lib.dc_store_queue_len(self.handle, key.encode(), ctypes.byref(out)))
        return out.value

    def list_keys(self):
        arr = BufArray()
        self.api.check(self.api.lib.dc_store_list_keys(self.handle, ctypes.byref(arr)))
        return [k.decode() for k in self.api.take_array(arr)]

    def barrier(self, key, world_size, timeout_ms=TIMEOUT_DEFAULT):
        self.api.check(self.api.lib.dc_store_barrier(self.handle, key.encode(), world_size, timeout_ms))

    @property
    def timeout_ms(self):
        out = c_int64()
        self.api.check(self.api.lib.dc_store_get_timeout(self.handle, ctypes.byref(out)))
        return out.value

    def set_timeout(self, ms):
        self.api.check(self.api.lib.dc_store_set_timeout(self.handle, ms))

    def get_async(self, key):
        h = c_void_p()
        self.api.check(self.api.lib.dc_store_get_async(self.handle, key.encode(), ctypes.byref(h)))
        return Work(self.api, h)

    def elastic_barrier(self, world_size, key_prefix, timeout_ms=TIMEOUT_DEFAULT):
        self.api.check(self.api.lib.dc_elastic_barrier(self.handle, world_size, key_prefix.encode(), timeout_ms))

    def elastic_synchronize(self, data, rank, world_size, key_prefix, timeout_ms=TIMEOUT_DEFAULT):
        arr = BufArray()
        self.api.check(self.api.lib.dc_elastic_synchronize(
            self.handle, data, len(data), rank, world_size, key_prefix.encode(), timeout_ms,
            ctypes.byref(arr)))
        return self.api.take_array(arr)


class RRef:
    """Owns a dc_rref handle."""

    def __init__(self, api, handle):
        self.api, self.handle = api, handle

    def __del__(self):
        self.close()

    def close(self):
        if self.handle:
            self.api.lib.dc_rref_free(self.handle)
            self.handle = None

    def to_here(self, timeout_ms=TIMEOUT_DEFAULT):
        buf = Buf()
        self.api.check(self.api.lib.dc_rref_to_here(self.handle, timeout_ms, ctypes.byref(buf)))
        return self.api.take_buf(buf)

    def is_owner(self):
        out = c_bool()
        self.api.check(self.api.lib.dc_rref_is_owner(self.handle, ctypes.byref(out)))
        return out.value


def _rref_array(rrefs):
    arr = (c_void_p * max(len(rrefs), 1))(*[r.handle for r in rrefs])
    return arr, len(rrefs)


class Rpc:
    """A worker of an RPC group. `functions` maps names to Python callables
    taking (args: bytes, rrefs: list of borrowed RRef views) and returning bytes;
    raising makes the call fail on the caller with the exception's text."""

    def __init__(self, api, store, name, rank, world_size, functions, timeout_ms=30000):
        self.api = api
        self._callbacks = [RPC_FUNCTION(self._wrap(fn)) for fn in functions.values()]
        entries = (RpcFunctionEntry * max(len(functions), 1))(
            *[RpcFunctionEntry(n.encode(), cb, None) for n, cb in zip(functions, self._callbacks)])
        opts = RpcOptions()
        api.check(api.lib.dc_rpc_options_init(ctypes.byref(opts), ctypes.sizeof(opts)))
        opts.rpc_timeout_ms, opts.functions, opts.num_functions = timeout_ms, entries, len(functions)
        h = c_void_p()
        api.check(api.lib.dc_rpc_init(store.handle, name.encode(), rank, world_size, ctypes.byref(opts),
                                      ctypes.byref(h)))
        self.handle = h

    def _wrap(self, fn):
        def call(args, length, rrefs, n, caller, reply, user_data):
            try:
                views = [_BorrowedRRef(self.api, rrefs[i]) for i in range(n)]
                result = fn(ctypes.string_at(args, length) if length else b"", views)
                return self.api.lib.dc_rpc_reply_set(reply, result, len(result))
            except Exception as e:  # becomes the caller's DC_ERR_REMOTE
                self.api.lib.dc_rpc_reply_set_error(reply, str(e).encode())
                return REMOTE
        return call

    def sync(self, to, func, args=b"", rrefs=(), timeout_ms=TIMEOUT_DEFAULT):
        arr, n = _rref_array(rrefs)
        buf = Buf()
        self.api.check(self.api.lib.dc_rpc_sync(self.handle, to.encode(), func.encode(), args, len(args), arr, n,
                                                timeout_ms, ctypes.byref(buf)))
        return self.api.take_buf(buf)

    def remote(self, to, func, args=b"", rrefs=(), timeout_ms=TIMEOUT_DEFAULT):
        arr, n = _rref_array(rrefs)
        h = c_void_p()
        self.api.check(self.api.lib.dc_rpc_remote(self.handle, to.encode(), func.encode(), args, len(args), arr, n,
                                                  timeout_ms, ctypes.byref(h)))
        return RRef(self.api, h)

    def rref(self, value):
        h = c_void_p()
        self.api.check(self.api.lib.dc_rref_new(self.handle, value, len(value), ctypes.byref(h)))
        return RRef(self.api, h)

    def debug_info(self):
        info = RRefDebugInfo(struct_size=ctypes.sizeof(RRefDebugInfo))
        self.api.check(self.api.lib.dc_rpc_debug_info(self.handle, ctypes.byref(info)))
        return info.as_tuple()

    def shutdown(self, graceful=True, timeout_ms=TIMEOUT_DEFAULT):
        self.api.check(self.api.lib.dc_rpc_shutdown(self.handle, graceful, timeout_ms))

    def close(self):
        if self.handle:
            self.api.lib.dc_rpc_free(self.handle)
            self.handle = None


class _BorrowedRRef(RRef):
    """An RRef argument of a function call: valid during the call only."""

    def close(self):
        self.handle = None
