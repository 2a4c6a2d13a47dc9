"""Loads libdistcore.so and declares every C function this package uses.

The library is the one bundled in the package (``_libdistcore.so`` next to
this file), or the one the environment variable ``DISTCORE_LIB`` names.
Struct layouts and signatures mirror include/distcore.h of version
``HEADER_VERSION``; the running library must have the same major version
and at least that minor version.
"""
from __future__ import annotations

import ctypes
import os
from ctypes import (CFUNCTYPE, POINTER, Structure, c_bool, c_char_p, c_double, c_int, c_int32,
                    c_int64, c_size_t, c_uint16, c_uint32, c_uint64, c_uint8, c_void_p)
from typing import TYPE_CHECKING

from ._errors import DistError, Status, error_for

if TYPE_CHECKING:
    from _ctypes import CFuncPtr
    from ctypes import Array, _CDataType, _Pointer

    #: A ctypes type, as argtypes and restype take.
    _CType = type[_CDataType]

# The version of include/distcore.h these declarations mirror
# (DC_VERSION_MAJOR, DC_VERSION_MINOR, DC_VERSION_PATCH).
HEADER_VERSION = (1, 4, 0)

TIMEOUT_DEFAULT = -1  # DC_TIMEOUT_DEFAULT: the handle's own timeout
TIMEOUT_FOREVER = 0  # DC_TIMEOUT_FOREVER

BUNDLED_LIB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_libdistcore.so")


# Each structure annotates its fields with the Python types ctypes reads
# (and, for pointers the package fills with arrays, writes) them as.

class Buf(Structure):
    """dc_buf"""
    _fields_ = [("data", POINTER(c_uint8)), ("len", c_size_t)]
    data: _Pointer[c_uint8]
    len: int


class BufArray(Structure):
    """dc_buf_array"""
    _fields_ = [("items", POINTER(Buf)), ("len", c_size_t)]
    items: _Pointer[Buf]
    len: int


class TcpStoreOptions(Structure):
    """dc_tcp_store_options"""
    _fields_ = [("struct_size", c_size_t), ("host", c_char_p), ("port", c_uint16),
                ("is_server", c_bool), ("world_size", c_int32), ("wait_for_workers", c_bool),
                ("timeout_ms", c_int64), ("multi_tenant", c_bool), ("master_listen_fd", c_int),
                ("bind_address", c_char_p), ("max_value_size", c_uint64),
                # since 1.2
                ("secret", c_char_p), ("secret_len", c_size_t), ("allow", c_char_p),
                ("allow_unauthenticated", c_char_p), ("max_connections", c_uint64), ("max_keys", c_uint64),
                ("max_stored_bytes", c_uint64),
                # since 1.3
                ("tls_cert_file", c_char_p), ("tls_key_file", c_char_p), ("tls_ca_file", c_char_p),
                ("tls_client_ca_file", c_char_p), ("tls_server_name", c_char_p)]
    struct_size: int
    host: bytes | None
    port: int
    is_server: bool
    world_size: int
    wait_for_workers: bool
    timeout_ms: int
    multi_tenant: bool
    master_listen_fd: int
    bind_address: bytes | None
    max_value_size: int
    secret: bytes | None
    secret_len: int
    allow: bytes | None
    allow_unauthenticated: bytes | None
    max_connections: int
    max_keys: int
    max_stored_bytes: int
    tls_cert_file: bytes | None
    tls_key_file: bytes | None
    tls_ca_file: bytes | None
    tls_client_ca_file: bytes | None
    tls_server_name: bytes | None


class SessionOptions(Structure):
    """dc_session_options (since 1.4)"""
    _fields_ = [("struct_size", c_size_t), ("group", c_char_p), ("rank", c_int32), ("world_size", c_int32),
                ("incarnation", c_uint64), ("ttl_ms", c_int64), ("recoverable", c_bool)]
    struct_size: int
    group: bytes | None
    rank: int
    world_size: int
    incarnation: int
    ttl_ms: int
    recoverable: bool


class MemberInfo(Structure):
    """dc_member (since 1.4)"""
    _fields_ = [("rank", c_uint32), ("pid", c_uint32), ("incarnation", c_uint64)]
    rank: int
    pid: int
    incarnation: int


class EtcdStoreOptions(Structure):
    """dc_etcd_store_options"""
    _fields_ = [("struct_size", c_size_t), ("endpoints", POINTER(c_char_p)), ("num_endpoints", c_size_t),
                ("prefix", c_char_p), ("timeout_ms", c_int64)]
    struct_size: int
    endpoints: _Pointer[c_char_p] | Array[c_char_p]
    num_endpoints: int
    prefix: bytes | None
    timeout_ms: int


class ServerStats(Structure):
    """dc_server_stats"""
    _fields_ = [("struct_size", c_size_t), ("connections", c_uint64), ("pending_waits", c_uint64),
                ("keys", c_uint64)]
    struct_size: int
    connections: int
    pending_waits: int
    keys: int


class ClientCounter(Structure):
    """dc_client_counter"""
    _fields_ = [("op", c_char_p), ("count", c_uint64), ("mean_ms", c_double), ("variance_ms", c_double)]
    op: bytes  # a static string, never NULL
    count: int
    mean_ms: float
    variance_ms: float


# dc_rpc_function: (args, len, rrefs, num_rrefs, caller_id, reply, user_data) -> dc_status
RPC_FUNCTION = CFUNCTYPE(c_int32, POINTER(c_uint8), c_size_t, POINTER(c_void_p), c_size_t, c_int32,
                         c_void_p, c_void_p)


class RpcFunctionEntry(Structure):
    """dc_rpc_function_entry"""
    _fields_ = [("name", c_char_p), ("function", RPC_FUNCTION), ("user_data", c_void_p)]
    name: bytes | None
    function: CFuncPtr
    user_data: int | None


class RpcOptions(Structure):
    """dc_rpc_options"""
    _fields_ = [("struct_size", c_size_t), ("num_worker_threads", c_uint32), ("rpc_timeout_ms", c_int64),
                ("listen_address", c_char_p), ("ignore_rref_leak", c_bool),
                ("functions", POINTER(RpcFunctionEntry)), ("num_functions", c_size_t),
                ("secret", c_char_p), ("secret_len", c_size_t), ("tls_cert_file", c_char_p),
                ("tls_key_file", c_char_p), ("tls_ca_file", c_char_p), ("tls_client_ca_file", c_char_p),
                ("tls_server_name", c_char_p)]
    struct_size: int
    num_worker_threads: int
    rpc_timeout_ms: int
    listen_address: bytes | None
    ignore_rref_leak: bool
    functions: _Pointer[RpcFunctionEntry] | Array[RpcFunctionEntry]
    num_functions: int
    secret: bytes | None
    secret_len: int
    tls_cert_file: bytes | None
    tls_key_file: bytes | None
    tls_ca_file: bytes | None
    tls_client_ca_file: bytes | None
    tls_server_name: bytes | None


class RRefDebugInfo(Structure):
    """dc_rref_debug_info"""
    _fields_ = [("struct_size", c_size_t), ("num_owner_rrefs", c_uint64), ("num_pending_futures", c_uint64),
                ("num_pending_users", c_uint64), ("num_forks", c_uint64)]
    struct_size: int
    num_owner_rrefs: int
    num_pending_futures: int
    num_pending_users: int
    num_forks: int


WORK_CALLBACK = CFUNCTYPE(None, c_void_p, c_void_p)  # dc_work_callback
LOG_FN = CFUNCTYPE(None, c_int32, c_char_p, c_char_p, c_void_p)  # dc_log_fn
PROFILER_BEGIN = CFUNCTYPE(c_uint64, c_char_p, c_void_p)  # dc_profiler_begin_fn
PROFILER_END = CFUNCTYPE(None, c_char_p, c_uint64, c_void_p)  # dc_profiler_end_fn

_h = c_void_p  # an opaque handle
_out_h = POINTER(c_void_p)
_status = c_int32
_void = None
_keys = POINTER(c_char_p)
_bytes = c_char_p  # const uint8_t * (bytes with their length passed alongside)

# Every function this package calls: name -> (argtypes, restype).
SIGNATURES: dict[str, tuple[list[_CType], _CType | None]] = {
    "dc_last_error_message": ([], c_char_p),
    "dc_status_str": ([c_int32], c_char_p),
    "dc_version": ([], c_char_p),
    "dc_buf_free": ([POINTER(Buf)], _void),
    "dc_buf_array_free": ([POINTER(BufArray)], _void),
    "dc_set_log_callback": ([c_int32, LOG_FN, c_void_p], _status),
    "dc_set_profiler_hooks": ([PROFILER_BEGIN, PROFILER_END, c_void_p], _status),
    # elastic
    "dc_elastic_barrier": ([_h, c_int32, c_char_p, c_int64], _status),
    "dc_elastic_barrier_traced": ([_h, c_int32, c_char_p, c_int64, c_int32, c_int64], _status),
    "dc_elastic_synchronize": ([_h, _bytes, c_size_t, c_int32, c_int32, c_char_p, c_int64,
                                POINTER(BufArray)], _status),
    "dc_elastic_get_all": ([_h, c_int32, c_char_p, c_int32, POINTER(BufArray)], _status),
    # stores
    "dc_hash_store_new": ([_out_h], _status),
    "dc_file_store_new": ([c_char_p, c_int32, _out_h], _status),
    "dc_prefix_store_new": ([c_char_p, _h, _out_h], _status),
    "dc_store_clone": ([_h, _out_h], _status),
    "dc_store_free": ([_h], _void),
    "dc_store_set": ([_h, c_char_p, _bytes, c_size_t], _status),
    "dc_store_get": ([_h, c_char_p, POINTER(Buf)], _status),
    "dc_store_add": ([_h, c_char_p, c_int64, POINTER(c_int64)], _status),
    "dc_store_compare_set": ([_h, c_char_p, _bytes, c_size_t, _bytes, c_size_t, POINTER(Buf)], _status),
    "dc_store_delete_key": ([_h, c_char_p, POINTER(c_bool)], _status),
    "dc_store_check": ([_h, _keys, c_size_t, POINTER(c_bool)], _status),
    "dc_store_wait": ([_h, _keys, c_size_t, c_int64], _status),
    "dc_store_num_keys": ([_h, POINTER(c_int64)], _status),
    "dc_store_append": ([_h, c_char_p, _bytes, c_size_t], _status),
    "dc_store_multi_get": ([_h, _keys, c_size_t, POINTER(Buf)], _status),
    "dc_store_multi_set": ([_h, _keys, POINTER(_bytes), POINTER(c_size_t), c_size_t], _status),
    "dc_store_queue_push": ([_h, c_char_p, _bytes, c_size_t], _status),
    "dc_store_queue_pop": ([_h, c_char_p, c_bool, POINTER(Buf)], _status),
    "dc_store_queue_len": ([_h, c_char_p, POINTER(c_int64)], _status),
    "dc_store_list_keys": ([_h, POINTER(BufArray)], _status),
    "dc_store_list_prefix": ([_h, c_char_p, POINTER(BufArray)], _status),
    "dc_store_delete_prefix": ([_h, c_char_p, POINTER(c_int64)], _status),
    "dc_store_barrier": ([_h, c_char_p, c_int32, c_int64], _status),
    "dc_store_get_timeout": ([_h, POINTER(c_int64)], _status),
    "dc_store_set_timeout": ([_h, c_int64], _status),
    "dc_store_timeout_guard_new": ([_h, c_int64, _out_h], _status),
    "dc_store_timeout_guard_free": ([_h], _void),
    "dc_store_get_async": ([_h, c_char_p, _out_h], _status),
    "dc_store_wait_async": ([_h, _keys, c_size_t, c_int64, _out_h], _status),
    "dc_store_queue_pop_async": ([_h, c_char_p, _out_h], _status),
    "dc_store_barrier_async": ([_h, c_char_p, c_int32, c_int64, _out_h], _status),
    "dc_tcp_store_options_init": ([POINTER(TcpStoreOptions), c_size_t], _status),
    "dc_tcp_store_new": ([POINTER(TcpStoreOptions), _out_h], _status),
    "dc_etcd_store_options_init": ([POINTER(EtcdStoreOptions), c_size_t], _status),
    "dc_etcd_store_new": ([POINTER(EtcdStoreOptions), _out_h], _status),
    "dc_tcp_store_port": ([_h, POINTER(c_uint16)], _status),
    "dc_tcp_store_wait_for_workers": ([_h], _status),
    "dc_tcp_store_counters": ([_h, POINTER(ClientCounter), c_size_t, POINTER(c_size_t)], _status),
    "dc_tcp_store_server_stats": ([_h, POINTER(ServerStats)], _status),
    "dc_tcp_store_server_metrics": ([_h, POINTER(Buf)], _status),
    "dc_session_options_init": ([POINTER(SessionOptions), c_size_t], _status),
    "dc_tcp_store_open_session": ([_h, POINTER(SessionOptions)], _status),
    "dc_tcp_store_close_session": ([_h], _status),
    "dc_tcp_store_report_error": ([_h, c_char_p], _status),
    "dc_tcp_store_leased": ([_h, POINTER(c_void_p)], _status),
    "dc_tcp_store_members": ([_h, POINTER(c_uint64), POINTER(MemberInfo), c_size_t, POINTER(c_size_t)], _status),
    "dc_tcp_store_watch_members": ([_h, c_uint64, POINTER(c_void_p)], _status),
    "dc_etcd_store_open_session": ([_h, POINTER(SessionOptions)], _status),
    "dc_etcd_store_close_session": ([_h], _status),
    "dc_etcd_store_report_error": ([_h, c_char_p], _status),
    "dc_etcd_store_leased": ([_h, POINTER(c_void_p)], _status),
    # works
    "dc_work_new": ([c_int32, c_int32, c_char_p, c_int64, _out_h], _status),
    "dc_work_new_future": ([_out_h], _status),
    "dc_work_free": ([_h], _void),
    "dc_work_is_completed": ([_h, POINTER(c_bool)], _status),
    "dc_work_is_success": ([_h, POINTER(c_bool)], _status),
    "dc_work_error": ([_h, POINTER(c_int32), POINTER(Buf)], _status),
    "dc_work_wait": ([_h, c_int64], _status),
    "dc_work_finish": ([_h, c_int32, c_char_p], _status),
    "dc_work_finish_with_result": ([_h, _bytes, c_size_t], _status),
    "dc_work_abort": ([_h], _status),
    "dc_work_synchronize": ([_h], _status),
    "dc_work_source_rank": ([_h, POINTER(c_int32)], _status),
    "dc_work_set_source_rank": ([_h, c_int32], _status),
    "dc_work_result": ([_h, POINTER(Buf)], _status),
    "dc_work_duration": ([_h, POINTER(c_double)], _status),
    "dc_work_sequence_number": ([_h, POINTER(c_uint64)], _status),
    "dc_work_rank": ([_h, POINTER(c_int32)], _status),
    "dc_work_op_type": ([_h, POINTER(c_int32)], _status),
    "dc_work_timeout": ([_h, POINTER(c_int64)], _status),
    "dc_op_type_name": ([c_int32], c_char_p),
    "dc_work_add_done_callback": ([_h, WORK_CALLBACK, c_void_p], _status),
    "dc_work_fd": ([_h, POINTER(c_int)], _status),
    # RPC and RRefs
    "dc_rpc_options_init": ([POINTER(RpcOptions), c_size_t], _status),
    "dc_rpc_init": ([_h, c_char_p, c_int32, c_int32, POINTER(RpcOptions), _out_h], _status),
    "dc_rpc_register_function": ([_h, c_char_p, RPC_FUNCTION, c_void_p], _status),
    "dc_rpc_free": ([_h], _void),
    "dc_rpc_shutdown": ([_h, c_bool, c_int64], _status),
    "dc_rpc_sync": ([_h, c_char_p, c_char_p, _bytes, c_size_t, POINTER(c_void_p), c_size_t, c_int64,
                     POINTER(Buf)], _status),
    "dc_rpc_async": ([_h, c_char_p, c_char_p, _bytes, c_size_t, POINTER(c_void_p), c_size_t, c_int64,
                      _out_h], _status),
    "dc_rpc_remote": ([_h, c_char_p, c_char_p, _bytes, c_size_t, POINTER(c_void_p), c_size_t, c_int64,
                       _out_h], _status),
    "dc_rpc_worker_id": ([_h, c_char_p, POINTER(c_int32)], _status),
    "dc_rpc_self_name": ([_h, POINTER(Buf)], _status),
    "dc_rpc_debug_info": ([_h, POINTER(RRefDebugInfo)], _status),
    "dc_rpc_reply_set": ([c_void_p, _bytes, c_size_t], _status),
    "dc_rpc_reply_set_error": ([c_void_p, c_char_p], _status),
    "dc_rref_new": ([_h, _bytes, c_size_t, _out_h], _status),
    "dc_rref_clone": ([_h, _out_h], _status),
    "dc_rref_free": ([_h], _void),
    "dc_rref_to_here": ([_h, c_int64, POINTER(Buf)], _status),
    "dc_rref_local_value": ([_h, POINTER(Buf)], _status),
    "dc_rref_owner_id": ([_h, POINTER(c_int32)], _status),
    "dc_rref_owner_name": ([_h, POINTER(Buf)], _status),
    "dc_rref_is_owner": ([_h, POINTER(c_bool)], _status),
    "dc_rref_confirmed_by_owner": ([_h, POINTER(c_bool)], _status),
}


def _parse_version(text: str) -> tuple[int, int, int]:
    try:
        major, minor, patch = (int(p) for p in text.split(".")[:3])
    except ValueError:
        raise ImportError(f"distcore: the library reports an unreadable version {text!r}") from None
    return major, minor, patch


def load(path: str | None = None) -> tuple[ctypes.CDLL, str, tuple[int, int, int]]:
    """Loads the library at `path` (default: $DISTCORE_LIB, else the bundled
    one), declares every function and checks its version."""
    path = path or os.environ.get("DISTCORE_LIB") or BUNDLED_LIB
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        hint = "" if os.environ.get("DISTCORE_LIB") else (
            " (the package bundles it when installed with `pip install ./python`; "
            "set DISTCORE_LIB to use another build)")
        raise ImportError(f"distcore: cannot load {path}: {e}{hint}") from e
    version = _parse_version(_version_of(lib))
    if version[0] != HEADER_VERSION[0] or version[:2] < HEADER_VERSION[:2]:
        want = ".".join(map(str, HEADER_VERSION))
        got = ".".join(map(str, version))
        raise ImportError(f"distcore: {path} is version {got}, but this package was built for "
                          f"{want} (needs major version {HEADER_VERSION[0]}, minor >= {HEADER_VERSION[1]})")
    for name, (argtypes, restype) in SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise ImportError(f"distcore: {path} lacks {name}") from None
        fn.argtypes = argtypes
        fn.restype = restype
    return lib, path, version


def _version_of(lib: ctypes.CDLL) -> str:
    fn = lib.dc_version
    fn.argtypes, fn.restype = [], c_char_p
    version: bytes = fn()
    return version.decode()


lib, LIB_PATH, LIB_VERSION = load()


def check(status: int) -> None:
    """Raises the exception for a non-OK dc_status (with the calling
    thread's last error message)."""
    if status != 0:
        raise error_for(status, lib.dc_last_error_message().decode("utf-8", "replace"))


def take_buf(buf: Buf) -> bytes:
    """The bytes of a dc_buf, which is then freed."""
    try:
        return ctypes.string_at(buf.data, buf.len) if buf.len else b""
    finally:
        lib.dc_buf_free(ctypes.byref(buf))


def take_array(arr: BufArray) -> list[bytes]:
    """The bytes of every buffer of a dc_buf_array, which is then freed."""
    try:
        return [ctypes.string_at(arr.items[i].data, arr.items[i].len) if arr.items[i].len else b""
                for i in range(arr.len)]
    finally:
        lib.dc_buf_array_free(ctypes.byref(arr))


def status_str(status: int) -> str:
    """dc_status_str: a status code's description."""
    text: bytes = lib.dc_status_str(int(status))
    return text.decode()


__all__ = ["lib", "check", "take_buf", "take_array", "DistError", "Status", "HEADER_VERSION"]
