"""Fixtures of the distcore package tests (no torch needed)."""
import os
import sys
from datetime import timedelta

import pytest

import distcore

T = timedelta

# The processes tests start (etcd members) come from the interop harness.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "interop"))


@pytest.fixture
def tcp_server():
    """A TCPStore server on an ephemeral loopback port."""
    with distcore.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=T(seconds=30)) as s:
        yield s


def _hash(tmp_path, server):
    return distcore.HashStore()


def _file(tmp_path, server):
    return distcore.FileStore(os.path.join(tmp_path, "filestore"), -1)


def _tcp(tmp_path, server):
    return distcore.TCPStore("127.0.0.1", server.port, timeout=T(seconds=30))


def _tcp_server(tmp_path, server):
    return distcore.TCPStore("127.0.0.1", 0, is_master=True, timeout=T(seconds=30))


def _prefix(tmp_path, server):
    return distcore.PrefixStore("pre", distcore.HashStore())


STORES = {"hash": _hash, "file": _file, "tcp": _tcp, "tcp_server": _tcp_server, "prefix": _prefix}


@pytest.fixture(params=sorted(STORES))
def store(request, tmp_path, tcp_server):
    """Every kind of store, one at a time."""
    with STORES[request.param](str(tmp_path), tcp_server) as s:
        yield s


@pytest.fixture(autouse=True, scope="session")
def _kill_started_processes():
    """Processes the harness started (etcd members, distcore serve) that a
    failing test left running are killed at the end of the session."""
    import harness
    yield
    harness.kill_all()
