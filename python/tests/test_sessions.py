"""Liveness sessions from Python (docs/liveness.md): a member process that
dies or reports an error fails the other members' blocked calls at once
with DistPeerError naming it."""
import os
import signal
import subprocess
import sys
import threading
from datetime import timedelta

import pytest

import distcore

# Rank 1 in another process: joins, says "ready", and once told "go",
# kills itself (SIGKILL) or reports the error it was given.
MEMBER = """
import os, signal, sys
from datetime import timedelta
import distcore
port, group, report, ttl_ms = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
store = distcore.TCPStore("127.0.0.1", port, timeout=timedelta(seconds=60))
store.open_session(group, 1, world_size=2, ttl=timedelta(milliseconds=ttl_ms) if ttl_ms else None)
store.leased().set(group + "addr1", "10.0.0.1:29500")
print("ready", flush=True)
sys.stdin.readline()
if report:
    store.report_error(report)
    sys.stdin.readline()
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture
def server():
    with distcore.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=60)) as store:
        yield store


def member(port, group, report="", ttl_ms=0):
    child = subprocess.Popen([sys.executable, "-c", MEMBER, str(port), group, report, str(ttl_ms)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    return child


@pytest.mark.parametrize("report", ["", "loss is NaN at step 812"])
def test_a_failed_member_fails_the_others_blocked_get_at_once_naming_it(server, report):
    group = "reported/" if report else "killed/"
    store = distcore.TCPStore("127.0.0.1", server.port, timeout=timedelta(seconds=60))
    store.open_session(group, 0, world_size=2)
    child = member(server.port, group, report)
    outcome = []
    blocked = threading.Thread(target=lambda: outcome.append(pytest.raises(distcore.DistPeerError,
                                                                         store.get, "never-set")))
    blocked.start()
    try:
        child.stdin.write("go\n")
        child.stdin.flush()
        blocked.join(60)
        assert not blocked.is_alive()
        error = outcome[0].value
        assert error.status == distcore.Status.PEER_FAILED
        assert isinstance(error, distcore.DistError)
        message = str(error)
        assert f"rank 1 of group '{group}'" in message and f"pid {child.pid}" in message, message
        assert (f"it reported: {report}" if report else "connection was lost") in message, message
        # Later calls fail the same way, until the session is closed.
        with pytest.raises(distcore.DistPeerError):
            store.check(["k"])
        store.close_session()
        assert not store.check(["k"])
    finally:
        child.kill()
        child.wait()
        store.close()


def test_sessions_are_checked_and_leaving_fails_nobody(server):
    with pytest.raises(distcore.DistValueError, match="world_size"):
        server.open_session("job/", 2, world_size=2)
    with pytest.raises(distcore.DistValueError, match="rank"):
        server.open_session("job/", -1)
    with pytest.raises(distcore.DistStateError):
        server.close_session()
    server.open_session("job/", 0, world_size=2, incarnation=7)
    with pytest.raises(distcore.DistStateError, match="session already"):
        server.open_session("job/", 1)
    server.close_session()
    server.set("k", "v")
    assert server.get("k") == b"v"


def test_a_frozen_member_fails_the_others_once_its_ttl_passes(server):
    store = distcore.TCPStore("127.0.0.1", server.port, timeout=timedelta(seconds=60))
    store.open_session("frozen/", 0, world_size=2, ttl=timedelta(seconds=1))
    child = member(server.port, "frozen/", ttl_ms=1000)
    try:
        os.kill(child.pid, signal.SIGSTOP)
        with pytest.raises(distcore.DistPeerError, match="within its TTL"):
            store.get("never-set")
    finally:
        child.kill()
        child.wait()
        store.close()


def test_a_members_leased_keys_die_with_it(server):
    child = member(server.port, "leased/")
    assert server.get("leased/addr1") == b"10.0.0.1:29500"
    child.stdin.write("go\n")
    child.stdin.flush()
    child.wait(60)
    for _ in range(200):
        if not server.check(["leased/addr1"]):
            break
        threading.Event().wait(0.01)
    assert not server.check(["leased/addr1"])


def test_a_leased_view_needs_a_session_and_dies_with_a_graceful_close(server):
    handle = distcore.TCPStore("127.0.0.1", server.port, timeout=timedelta(seconds=60))
    leased = handle.leased()
    assert isinstance(leased, distcore.TCPStore)
    with pytest.raises(distcore.DistStateError, match="no session"):
        leased.set("view/k", "v")
    handle.open_session("view/", 0)
    leased.set("view/k", "v")
    assert leased.add("view/n", 2) == 2
    assert sorted(server.list_prefix("view/")) == ["view/k", "view/n"]
    handle.close_session()
    assert server.list_prefix("view/") == []


def test_a_recoverable_group_goes_on_without_a_dead_member(server):
    handle = distcore.TCPStore("127.0.0.1", server.port, timeout=timedelta(seconds=60))
    handle.open_session("recover/", 0, recoverable=True)
    child = subprocess.Popen([sys.executable, "-c", MEMBER.replace("world_size=2,", "world_size=2, recoverable=True,"),
                              str(server.port), "recover/", "", "0"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    before = handle.members()
    assert [m.rank for m in before.members] == [0, 1]
    assert before.members[1].pid == child.pid
    watch = handle.watch_members(before.epoch)
    child.stdin.write("go\n")
    child.stdin.flush()
    child.wait(60)
    watch.wait(timedelta(seconds=10))
    after = handle.members()
    assert int(watch.result()) == after.epoch > before.epoch
    assert [m.rank for m in after.members] == [0]
    handle.set("recover/k", "v")  # the survivor goes on
    handle.close_session()
    with pytest.raises(distcore.DistStateError):
        handle.members()
