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


# The C structures the package declares, by their name in distcore.h.
STRUCTS = {"dc_buf": _lib.Buf, "dc_buf_array": _lib.BufArray, "dc_tcp_store_options": _lib.TcpStoreOptions,
           "dc_server_stats": _lib.ServerStats, "dc_client_counter": _lib.ClientCounter,
           "dc_rpc_function_entry": _lib.RpcFunctionEntry, "dc_rpc_options": _lib.RpcOptions,
           "dc_rref_debug_info": _lib.RRefDebugInfo, "dc_etcd_store_options": _lib.EtcdStoreOptions,
           "dc_session_options": _lib.SessionOptions, "dc_member": _lib.MemberInfo}


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


# -- the declarations' C types against distcore.h's -----------------------

# Scalar C types and the ctypes type of each (a pointer to one is a POINTER
# of it). ctypes' sized names are aliases: on LP64 Linux c_int32 is c_int,
# c_int64 is c_long, and c_size_t and c_uint64 are both c_ulong, so types of
# one size and signedness are one type here, as they are to the ABI.
C_SCALARS = {
    "bool": ctypes.c_bool,
    "int": ctypes.c_int,
    "int32_t": ctypes.c_int32,
    "int64_t": ctypes.c_int64,
    "uint8_t": ctypes.c_uint8,
    "uint16_t": ctypes.c_uint16,
    "uint32_t": ctypes.c_uint32,
    "uint64_t": ctypes.c_uint64,
    "size_t": ctypes.c_size_t,
    "double": ctypes.c_double,
    # int32_t typedefs (and int32_t enums)
    "dc_status": ctypes.c_int32,
    "dc_op_type": ctypes.c_int32,
    "dc_log_level": ctypes.c_int32,
}

# Pointers not passed as a POINTER of their pointee: text, bytes, arrays of
# them, untyped pointers.
C_POINTERS = {
    "const char *": {ctypes.c_char_p},
    "const char *const *": {ctypes.POINTER(ctypes.c_char_p)},
    # Bytes with their length alongside: the package passes Python bytes
    # (c_char_p); a callback receives a pointer.
    "const uint8_t *": {ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint8)},
    "const uint8_t *const *": {ctypes.POINTER(ctypes.c_char_p)},
    "void *": {ctypes.c_void_p},
}

# The function pointer typedefs and the prototype the package has for each.
C_CALLBACKS = {"dc_log_fn": _lib.LOG_FN, "dc_rpc_function": _lib.RPC_FUNCTION, "dc_work_callback": _lib.WORK_CALLBACK,
               "dc_profiler_begin_fn": _lib.PROFILER_BEGIN, "dc_profiler_end_fn": _lib.PROFILER_END}


def _ctypes_for(c_type, opaque):
    """The ctypes types that pass `c_type` (as _c_type spells it; `opaque`:
    the header's opaque handle types), or an empty set for one this table
    does not know. Opaque handles are c_void_p, their addresses (out
    parameters, arrays of handles) POINTER(c_void_p); a structure pointer is
    a POINTER of its Structure class."""
    if c_type == "void":
        return {None}
    if c_type in C_POINTERS:
        return C_POINTERS[c_type]
    words = [w for w in c_type.replace("*", " ").split() if w != "const"]
    depth = c_type.count("*")
    if len(words) != 1:
        return set()
    base = words[0]
    if base in opaque:
        return {1: {ctypes.c_void_p}, 2: {ctypes.POINTER(ctypes.c_void_p)}}.get(depth, set())
    if base in STRUCTS:
        return {ctypes.POINTER(STRUCTS[base])} if depth == 1 else set()
    if base in C_CALLBACKS:
        return {C_CALLBACKS[base]} if depth == 0 else set()
    if base in C_SCALARS:
        return {0: {C_SCALARS[base]}, 1: {ctypes.POINTER(C_SCALARS[base])}}.get(depth, set())
    return set()


_SIZED = ["c_int8", "c_int16", "c_int32", "c_int64", "c_uint8", "c_uint16", "c_uint32", "c_uint64", "c_size_t",
          "c_ssize_t"]


def _describe(t):
    """A ctypes type as the messages show it, with the sized names that
    are the same class ("c_long (= c_int64, c_ssize_t)")."""
    if t is None:
        return "None"
    for name, prototype in C_CALLBACKS.items():
        if t is prototype:
            return f"the {name} prototype"
    if issubclass(t, ctypes._Pointer):
        return f"POINTER({_describe(t._type_)})"
    aliases = [name for name in _SIZED if getattr(ctypes, name) is t and name != t.__name__]
    return f"{t.__name__} (= {', '.join(aliases)})" if aliases else t.__name__


def _c_type(declaration, named=True):
    """The C type of a parameter or field declaration ("const char *const
    *keys" -> "const char *const *"), or of a return type (`named` False)."""
    tokens = re.findall(r"\w+|\*", declaration)
    if named and len(tokens) > 1:
        tokens = tokens[:-1]
    out = ""
    for token in tokens:
        if token == "*":
            out += "*" if out.endswith("*") else " *"
        else:
            out += token if not out or out.endswith("*") else " " + token
    return out


def _c_params(text):
    """(C type, name) of each parameter of a parameter list."""
    params = [p.strip() for p in text.split(",")]
    if params == ["void"]:
        return []
    assert all(p and "(" not in p for p in params), text  # function pointers are typedefs
    return [(_c_type(p), re.findall(r"\w+", p)[-1]) for p in params]


def _read_header():
    """distcore.h's functions and function pointer typedefs, name ->
    (return type, [(parameter type, name)]), its structures, name -> [(field
    type, name)], and its opaque handle types."""
    text = open(HEADER).read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"^\s*#[^\n]*", "", text, flags=re.M)
    functions = {name: (_c_type(ret, named=False), _c_params(params)) for ret, name, params in
                 re.findall(r"^(?!typedef)([\w *]+?)\b(dc_\w+)\(([^()]*)\);", text, flags=re.M)}
    callbacks = {name: (_c_type(ret, named=False), _c_params(params)) for ret, name, params in
                 re.findall(r"\btypedef ([\w *]+?)\(\*(\w+)\)\(([^()]*)\);", text)}
    structs = {name: [(_c_type(f), re.findall(r"\w+", f)[-1]) for f in body.split(";") if f.strip()]
               for body, name in re.findall(r"\btypedef struct \{([^{}]*)\} (\w+);", text)}
    opaque = set(re.findall(r"\btypedef struct (\w+) \1;", text))
    return functions, callbacks, structs, opaque


def _mismatches(what, c_params, argtypes, c_restype, restype, opaque):
    """What differs between a C prototype and its ctypes declaration, one
    message each (the function, the parameter's index, both types)."""
    if len(c_params) != len(argtypes):
        return [f"{what}: {len(c_params)} parameters in distcore.h, {len(argtypes)} argtypes"]
    checks = [(f"argtypes[{i}] ({c_type}{'' if c_type.endswith('*') else ' '}{name})", c_type, t)
              for i, ((c_type, name), t) in enumerate(zip(c_params, argtypes))]
    checks.append((f"restype ({c_restype})", c_restype, restype))
    problems = []
    for where, c_type, t in checks:
        allowed = _ctypes_for(c_type, opaque)
        if not allowed:
            problems.append(f"{what}: {where}: no ctypes type for `{c_type}` in this test's tables")
        elif t not in allowed:
            problems.append(f"{what}: {where} is {_describe(t)}, expected "
                            + " or ".join(sorted(_describe(a) for a in allowed)))
    return problems


@in_repo
def test_every_declared_function_is_exported_with_the_headers_signature():
    exported = {line.strip() for line in open(ABI_SYMBOLS) if line.strip() and not line.startswith("#")}
    functions, _, _, opaque = _read_header()
    problems = []
    for name, (argtypes, restype) in _lib.SIGNATURES.items():
        assert name in exported, name
        assert name in functions, f"{name} not declared in distcore.h"
        c_restype, c_params = functions[name]
        problems += _mismatches(name, c_params, argtypes, c_restype, restype, opaque)
    assert not problems, "\n".join(problems)


@in_repo
def test_callback_prototypes_match_the_headers_typedefs():
    _, callbacks, _, opaque = _read_header()
    problems = []
    for name, prototype in C_CALLBACKS.items():
        c_restype, c_params = callbacks[name]
        problems += _mismatches(name, c_params, prototype._argtypes_, c_restype, prototype._restype_, opaque)
    assert not problems, "\n".join(problems)


@in_repo
def test_struct_field_types_match_the_header():
    _, _, structs, opaque = _read_header()
    problems = []
    for cname, cls in STRUCTS.items():
        fields = structs[cname]
        assert [name for _, name in fields] == [name for name, _ in cls._fields_], cname
        for (c_type, name), (_, t) in zip(fields, cls._fields_):
            allowed = _ctypes_for(c_type, opaque)
            if t not in allowed:
                problems.append(f"{cname}.{name} ({c_type}) is {_describe(t)}, expected "
                                + " or ".join(sorted(_describe(a) for a in allowed)))
    assert not problems, "\n".join(problems)


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
