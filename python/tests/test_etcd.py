"""distcore.EtcdStore against a real etcd member the test starts (etcd from
the Debian package etcd-server; the test fails without it)."""
import threading
from datetime import timedelta

import pytest

import distcore
import harness  # interop/harness.py (conftest puts interop/ on the path)


@pytest.fixture(scope="module")
def etcd():
    cluster = harness.EtcdCluster()
    try:
        yield cluster.endpoints[0]
    finally:
        cluster.stop()


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
        distcore.EtcdStore([f"127.0.0.1:{harness.free_port()}"], timeout=timedelta(milliseconds=300))
