"""distcore.EtcdStore against a real etcd member the test starts (etcd from
the Debian package etcd-server; the test fails without it)."""
import shutil
import socket
import subprocess
import threading
import time
from datetime import timedelta

import pytest

import distcore


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    binary = shutil.which("etcd")
    assert binary, "etcd must be installed (apt-get install etcd-server)"
    client, peer = free_port(), free_port()
    client_url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    proc = subprocess.Popen(
        [binary, "--name", "t", "--data-dir", str(tmp_path_factory.mktemp("etcd") / "data"),
         "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
         "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
         "--initial-cluster", f"t={peer_url}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"127.0.0.1:{client}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                distcore.EtcdStore([endpoint], "/probe", timeout=timedelta(milliseconds=200)).close()
                break
            except distcore.DistError:
                assert time.monotonic() < deadline, "etcd did not start within 30 s"
                time.sleep(0.05)
        yield endpoint
    finally:
        proc.kill()
        proc.wait()


def test_store_operations(etcd):
    with distcore.EtcdStore([etcd], "/py/ops", timeout=timedelta(seconds=30)) as s:
        s.set("k", "v")
        assert s.get("k") == b"v"
        assert s.add("n", 2) == 2
        assert s.compare_set("k", "v", "w") == b"w"
        s.queue_push("q", b"x")
        assert s.queue_len("q") == 1
        assert s.queue_pop("q") == b"x"
        assert s.num_keys() == 2
        assert s.prefix == "/py/ops"


def test_wait_is_released_by_another_handle_and_times_out_as_pytorch(etcd):
    a = distcore.EtcdStore(etcd, "/py/wait", timeout=timedelta(seconds=30))
    b = distcore.EtcdStore(etcd, "/py/wait", timeout=timedelta(seconds=30))
    threading.Timer(0.2, lambda: b.set("late", "1")).start()
    a.wait(["late"])
    with pytest.raises(distcore.DistStoreError) as e:
        a.wait(["never"], timedelta(milliseconds=100))
    assert isinstance(e.value, TimeoutError)
    assert str(e.value).startswith("wait timeout after 100ms")


def test_no_member_is_a_network_error(etcd):
    with pytest.raises(distcore.DistNetworkError, match="no etcd member"):
        distcore.EtcdStore([f"127.0.0.1:{free_port()}"], timeout=timedelta(milliseconds=300))
