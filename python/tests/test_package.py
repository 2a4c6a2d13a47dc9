"""The package itself: the library it loads, its version check, and its
declarations against the repository's ABI records (abi/, include/)."""
import ctypes
import os
import re
import subprocess
import sys

import pytest

import distcore
from distcore import _lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEADER = os.path.join(ROOT, "include", "distcore.h")
ABI_TYPES = os.path.join(ROOT, "abi", "types.txt")
ABI_SYMBOLS = os.path.join(ROOT, "abi", "symbols.txt")
in_repo = pytest.mark.skipif(not os.path.exists(HEADER), reason="needs the repository checkout")


def test_loads_the_library_named_by_distcore_lib():
    want = os.environ.get("DISTCORE_LIB")
    if want:
        assert distcore.library_path() == want
    else:
        assert distcore.library_path() == _lib.BUNDLED_LIB
    assert re.fullmatch(r"\d+\.\d+\.\d+", distcore.library_version())
    assert int(distcore.library_version().split(".")[0]) == _lib.HEADER_VERSION[0]


def test_installed_package_bundles_its_library():
    pkg = os.path.dirname(distcore.__file__)
    if not os.path.exists(os.path.join(pkg, "_libdistcore.so")):
        pytest.skip("a source tree without the built library")
    env = {k: v for k, v in os.environ.items() if k != "DISTCORE_LIB"}
    out = subprocess.run([sys.executable, "-c", "import distcore; print(distcore.library_path(), "
                          "distcore.__version__, distcore.library_version())"],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == os.path.join(pkg, "_libdistcore.so")
    assert out[1] == out[2]  # the bundled library is the version the package was built as


def run_import(lib):
    return subprocess.run([sys.executable, "-c", "import distcore"], env=dict(os.environ, DISTCORE_LIB=lib),
                          capture_output=True, text=True)


def test_a_missing_library_is_an_import_error(tmp_path):
    r = run_import(str(tmp_path / "nope.so"))
    assert r.returncode != 0
    assert "ImportError: distcore: cannot load" in r.stderr


def test_another_major_version_is_refused(tmp_path):
    src = tmp_path / "fake.c"
    src.write_text('const char *dc_version(void) { return "2.0.0"; }\n')
    so = tmp_path / "libfake.so"
    try:
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(so), str(src)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs a C compiler")
    r = run_import(str(so))
    assert r.returncode != 0
    assert "is version 2.0.0, but this package was built for 1." in r.stderr


@in_repo
def test_the_package_exports_its_api_and_nothing_else():
    public = {name for name in dir(distcore) if not name.startswith("_")}
    assert set(distcore.__all__) <= public
    # Beside __all__, only its own submodules (imported by the package).
    assert public - set(distcore.__all__) <= {"store", "work"}, public - set(distcore.__all__)


def test_header_version_matches_the_header():
    text = open(HEADER).read()
    version = tuple(int(re.search(rf"#define DC_VERSION_{p} (\d+)", text).group(1))
                    for p in ("MAJOR", "MINOR", "PATCH"))
    assert version[:2] == _lib.HEADER_VERSION[:2]


@in_repo
def test_every_declared_function_is_exported_with_the_headers_arity():
    exported = {line.strip() for line in open(ABI_SYMBOLS) if line.strip() and not line.startswith("#")}
    header = open(HEADER).read()
    for name, (argtypes, restype) in _lib.SIGNATURES.items():
        assert name in exported, name
        m = re.search(rf"\b{name}\(([^)]*)\);", header)
        assert m, f"{name} not declared in distcore.h"
        params = [p for p in m.group(1).split(",") if p.strip() and p.strip() != "void"]
        assert len(params) == len(argtypes), name


# The C structures the package declares, by their name in distcore.h.
STRUCTS = {"dc_buf": _lib.Buf, "dc_buf_array": _lib.BufArray, "dc_tcp_store_options": _lib.TcpStoreOptions,
           "dc_server_stats": _lib.ServerStats, "dc_client_counter": _lib.ClientCounter,
           "dc_rpc_function_entry": _lib.RpcFunctionEntry, "dc_rpc_options": _lib.RpcOptions,
           "dc_rref_debug_info": _lib.RRefDebugInfo, "dc_etcd_store_options": _lib.EtcdStoreOptions}


def test_struct_annotations_name_every_field():
    # The annotations type the fields for mypy: one for each field, no other.
    for cname, cls in STRUCTS.items():
        assert list(cls.__annotations__) == [field for field, _ in cls._fields_], cname


@in_repo
def test_struct_layouts_match_the_abi_records():
    records = {}
    for line in open(ABI_TYPES):
        parts = line.split()
        if len(parts) == 3 and parts[1] == "sizeof":
            records[parts[0]] = int(parts[2])
        elif len(parts) == 3 and "." in parts[0]:
            records[parts[0]] = (int(parts[1]), int(parts[2]))
    for cname, cls in STRUCTS.items():
        assert ctypes.sizeof(cls) == records[cname], cname
        for field, _ in cls._fields_:
            desc = getattr(cls, field)
            assert (desc.offset, desc.size) == records[f"{cname}.{field}"], f"{cname}.{field}"


@in_repo
def test_status_codes_match_the_header():
    # The header's codes come from the Rust enum (build.rs): Python has
    # every one of them, with the same number, and an exception for each.
    header = dict(re.findall(r"#define (DC_OK|DC_ERR_\w+) (\d+)\b", open(HEADER).read()))
    python = {"DC_OK" if s == 0 else f"DC_ERR_{s.name}": str(int(s)) for s in distcore.Status}
    assert python == header
    from distcore import _errors
    for status in distcore.Status:
        if status != 0:
            error = _errors.error_for(status, "m")
            assert error.status == status and type(error) is not distcore.DistError, status
    for op in distcore.OpType:
        assert distcore.op_type_name(op) == op.name, op


def test_exception_hierarchy_matches_pytorch():
    assert issubclass(distcore.DistError, RuntimeError)
    assert issubclass(distcore.DistStoreError, distcore.DistError)
    assert issubclass(distcore.DistNetworkError, distcore.DistError)
    assert issubclass(distcore.QueueEmptyError, distcore.DistStoreError)
    assert distcore.DistQueueEmptyError is distcore.QueueEmptyError
    assert issubclass(distcore.DistTimeoutError, distcore.DistStoreError)
    assert issubclass(distcore.DistTimeoutError, TimeoutError)
    assert issubclass(distcore.DistValueError, ValueError)
    assert issubclass(distcore.DistValueError, distcore.DistError)
    e = distcore.DistTimeoutError("wait timeout after 5ms, keys: k")
    assert e.status == distcore.Status.TIMEOUT and str(e) == e.message
    import pickle
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is distcore.DistTimeoutError and again.message == e.message and again.status == e.status


def test_status_strings():
    assert distcore.status_str(distcore.Status.TIMEOUT) == "timed out"
    assert distcore.status_str(999) == "unknown status"


def _disconnect_a_client():
    """Makes the server log "... disconnected" (DEBUG)."""
    with distcore.TCPStore("127.0.0.1", 0, is_master=True) as server:
        distcore.TCPStore("127.0.0.1", server.port).close()
        server.set("k", "v")


def test_log_callback_and_python_logging(caplog):
    import logging
    import time
    seen = []
    distcore.set_log_callback(lambda level, target, message: seen.append((level, target, message)),
                              distcore.LogLevel.DEBUG)
    try:
        _disconnect_a_client()
        deadline = time.monotonic() + 10
        while not any("disconnected" in m for _, _, m in seen) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        distcore.set_log_callback(None, distcore.LogLevel.WARN)
    assert any(level == distcore.LogLevel.DEBUG and target.startswith("distcore::") and "disconnected" in m
               for level, target, m in seen), seen
    with caplog.at_level(logging.DEBUG, logger="distcore"):
        distcore.log_to_python(distcore.LogLevel.DEBUG)
        try:
            _disconnect_a_client()
            deadline = time.monotonic() + 10
            while not any("disconnected" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            distcore.set_log_callback(None, distcore.LogLevel.WARN)
    assert any(r.name.startswith("distcore.store") and "disconnected" in r.getMessage() for r in caplog.records)
    with pytest.raises(distcore.DistValueError):
        distcore.set_log_callback(print, 42)
