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


MEMBER = """
import sys, time
from datetime import timedelta
import distcore
s = distcore.EtcdStore(sys.argv[1], "/py/sessions", timeout=timedelta(seconds=60))
s.open_session("job/", int(sys.argv[2]), world_size=2, ttl=timedelta(seconds=2))
s.leased().set("job/addr/1", "10.0.0.1:1")
print("ready", flush=True)
time.sleep(600)
"""


def test_a_killed_member_fails_the_others_blocked_get_naming_it(etcd):
    """Sessions on the EtcdStore itself (docs/liveness.md, "On etcd"): the
    killed process's lease runs out, and the survivor's blocked get raises
    DistPeerError naming it; its leased key is gone."""
    import subprocess
    import sys
    import time
    survivor = distcore.EtcdStore(etcd, "/py/sessions", timeout=timedelta(seconds=60))
    survivor.open_session("job/", 0, world_size=2, ttl=timedelta(seconds=2))
    member = subprocess.Popen([sys.executable, "-c", MEMBER, etcd, "1"], stdout=subprocess.PIPE, text=True)
    try:
        assert member.stdout.readline().strip() == "ready"
        assert survivor.get("job/addr/1") == b"10.0.0.1:1"
        outcome = {}

        def blocked():
            try:
                survivor.get("job/never")
            except distcore.DistError as e:
                outcome["error"] = e
                outcome["at"] = time.monotonic()

        waiter = threading.Thread(target=blocked)
        waiter.start()
        time.sleep(0.3)
        member.kill()
        killed = time.monotonic()
        waiter.join(30)
        error = outcome["error"]
        assert isinstance(error, distcore.DistPeerError), error
        assert "rank 1 of group 'job/'" in str(error) and "lease ran out" in str(error)
        assert 1.0 < outcome["at"] - killed < 10.0
        reader = distcore.EtcdStore(etcd, "/py/sessions", timeout=timedelta(seconds=10))
        assert not reader.check(["job/addr/1"])
    finally:
        member.kill()
        member.wait()


def test_a_reported_error_reaches_the_others_and_a_close_fails_nobody(etcd):
    a = distcore.EtcdStore(etcd, "/py/report", timeout=timedelta(seconds=60))
    b = distcore.EtcdStore(etcd, "/py/report", timeout=timedelta(seconds=60))
    c = distcore.EtcdStore(etcd, "/py/report", timeout=timedelta(seconds=60))
    c.open_session("r/", 2)
    c.leased().set("r/c", "x")
    c.close_session()
    assert not a.check(["r/c"])
    a.open_session("r/", 0)
    b.open_session("r/", 1)
    threading.Timer(0.3, lambda: b.report_error("loss is NaN")).start()
    with pytest.raises(distcore.DistPeerError, match="loss is NaN"):
        a.wait(["r/never"])
    with pytest.raises(distcore.DistStateError):
        distcore.EtcdStore(etcd, "/py/report").leased()
