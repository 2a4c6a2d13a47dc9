"""fork(): a store made in the parent refuses every call in the child
(DistStateError); a store made in the child works; freeing the parent's
object there is safe."""
import os
import signal
import time

import pytest

import distcore

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")


def in_child(fn, timeout=60):
    """Runs fn() in a forked child; returns its exit code (0: passed). A
    child still running after `timeout` s (a deadlock after fork, what these
    tests look for) is killed and fails the test."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if fn() else 2
        except BaseException:  # noqa: BLE001 - reported through the exit code
            import traceback
            traceback.print_exc()
        os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the forked child was still running after {timeout} s")
        time.sleep(0.01)


def test_parent_store_refuses_in_the_child_and_a_new_one_works(tcp_server):
    parent_hash = distcore.HashStore()
    parent_hash.set("k", "parent")
    port = tcp_server.port  # asked in the parent: the child may not use tcp_server at all
    parent_tcp = distcore.TCPStore("127.0.0.1", port)
    parent_tcp.set("k", "parent")

    def child():
        for s in (parent_hash, parent_tcp, tcp_server):
            try:
                s.get("k")
                return False
            except distcore.DistStateError as e:
                assert e.status == distcore.Status.INVALID_STATE
        mine = distcore.TCPStore("127.0.0.1", port)
        mine.set("from-child", "yes")
        assert mine.get("k") == b"parent"
        work = mine.get_async("k")  # the child has its own waiter threads
        assert work.wait() and work.result() == b"parent"
        h = distcore.HashStore()
        h.set("a", "1")
        assert h.get("a") == b"1"
        parent_hash.close()  # freeing a parent's handle in the child is safe
        parent_tcp.close()
        return True

    assert in_child(child) == 0
    assert parent_tcp.get("from-child") == b"yes"
    assert parent_hash.get("k") == b"parent"  # the parent's handles are untouched


def test_parent_work_refuses_in_the_child():
    f = distcore.Future()

    def child():
        try:
            f.is_completed()
        except distcore.DistStateError:
            f.close()
            return True
        return False

    assert in_child(child) == 0
    f.set_result(b"ok")
    assert f.value() == b"ok"
