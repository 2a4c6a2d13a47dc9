"""Work and Future: async store calls, completion, errors, callbacks, fds, asyncio."""
import asyncio
import select
import threading
import time
from datetime import timedelta

import pytest

import distcore
from distcore import OpType, Status

T = timedelta


def wait_for(pred, timeout=10):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_async_calls_of_every_store(store):
    get = store.get_async("later")
    wait = store.wait_async(["later", "other"], T(seconds=10))
    pop = store.queue_pop_async("jobs")
    bar = store.barrier_async("bar", 2, T(seconds=10))
    assert not any(w.is_completed() for w in (get, wait, pop, bar))
    store.set("later", "value")
    assert get.wait(T(seconds=10)) is True
    assert get.result() == b"value"
    assert get.is_success() and get.exception() is None
    store.set("other", "x")
    wait.wait(T(seconds=10))
    with pytest.raises(distcore.DistNotSupportedError, match="result"):
        wait.result()  # completed without a result (c10d's message)
    store.queue_push("jobs", b"job")
    assert pop.wait() and pop.result() == b"job"
    store.barrier("bar", 2, T(seconds=10))
    bar.wait(T(seconds=10))
    for w in (get, wait, pop, bar):
        w.close()


def test_async_timeout_and_abort():
    s = distcore.HashStore()
    w = s.wait_async(["never"], T(milliseconds=50))
    with pytest.raises(distcore.DistTimeoutError):
        w.wait()
    assert w.is_completed() and not w.is_success()
    assert isinstance(w.exception(), distcore.DistTimeoutError)
    g = s.get_async("never")
    with pytest.raises(distcore.DistStateError):
        g.result()
    g.abort()
    with pytest.raises(distcore.DistAbortedError, match="Work aborted"):
        g.wait()


def test_wait_with_a_timeout_on_a_pending_work():
    s = distcore.HashStore()
    w = s.get_async("never")
    start = time.monotonic()
    with pytest.raises(distcore.DistTimeoutError, match="Operation timed out!"):
        w.wait(T(milliseconds=30))
    assert time.monotonic() - start < 5
    assert not w.is_completed()  # a wait's timeout does not fail the work
    s.set("never", "now")
    assert w.wait(T(seconds=10))


def test_callbacks_fd_and_then():
    s = distcore.HashStore()
    work = s.get_async("k")
    seen, threads = [], []

    def cb(w):
        seen.append(w.result())
        threads.append(threading.current_thread())
    work.add_done_callback(cb)
    chained = work.then(lambda w: w.result() + b"!")
    failing = work.then(lambda w: 1 / 0)
    fd = work.fileno()
    assert select.select([fd], [], [], 0.02)[0] == []
    s.set("k", "v")
    assert select.select([fd], [], [], 10)[0] == [fd]
    assert isinstance(chained, distcore.Future)
    assert chained.wait(T(seconds=10)) == b"v!"
    with pytest.raises(ZeroDivisionError):  # the callback's own exception
        failing.wait(T(seconds=10))
    assert failing.exception().__class__ is ZeroDivisionError
    wait_for(lambda: seen)
    assert seen == [b"v"]
    # On a completed work a callback runs at once, on this thread.
    work.add_done_callback(lambda w: threads.append(threading.current_thread()))
    assert threads[-1] is threading.current_thread()


def test_callback_keeps_the_work_alive():
    s = distcore.HashStore()
    seen = []
    w = s.get_async("k")
    w.add_done_callback(lambda w: seen.append(w.result()))
    del w  # the callback holds it until it has run
    s.set("k", "v")
    wait_for(lambda: seen)
    assert seen == [b"v"]


def test_callback_exception_is_reported_not_raised(capsys):
    f = distcore.Future()
    f.add_done_callback(lambda w: 1 / 0)
    f.set_result(b"x")
    assert f.value() == b"x"
    assert "ZeroDivisionError" in capsys.readouterr().err


def test_user_work_finish_and_errors():
    w = distcore.Work(3, OpType.ALLREDUCE, "py-title", T(milliseconds=30))
    assert w.rank == 3
    assert w.op_type is OpType.ALLREDUCE
    assert distcore.op_type_name(w.op_type) == "ALLREDUCE"
    assert w.timeout == T(milliseconds=30)
    assert w.sequence_number >= 0
    with pytest.raises(distcore.DistTimeoutError, match="^Operation timed out!$"):
        w.wait()
    w.finish(distcore.DistRemoteError("worker 2 failed"))
    for _ in range(2):  # the error every time it is waited on
        with pytest.raises(distcore.DistRemoteError, match="^worker 2 failed$") as e:
            w.wait()
        assert e.value.status == Status.REMOTE
    with pytest.raises(distcore.DistStateError):
        w.finish()  # already completed
    assert w.duration() >= 0
    w.synchronize()
    with pytest.raises(distcore.DistNotSupportedError):
        w.source_rank()  # not a receive
    recv = distcore.Work(0, OpType.RECVANYSOURCE)
    recv.set_source_rank(5)
    assert recv.source_rank() == 5
    recv.finish_with_result("data")
    assert recv.result() == b"data"
    assert recv.timeout is None


def test_future_from_another_thread_and_get_future():
    fut = distcore.Future()
    assert not fut.done()
    threading.Thread(target=lambda: fut.set_result(b"abc")).start()
    assert fut.wait(T(0)) == b"abc"  # timedelta(0): forever
    assert fut.done() and fut.value() == b"abc"
    none = distcore.Future()
    none.set_result(None)
    assert none.wait() is None
    failed = distcore.Future()
    failed.set_exception(distcore.DistNetworkError("gone"))
    with pytest.raises(distcore.DistNetworkError, match="gone"):
        failed.wait()
    s = distcore.HashStore()
    w = s.get_async("x")
    f = w.get_future()
    w.abort()
    with pytest.raises(distcore.DistAbortedError):
        f.wait()
    w.close()  # the future was a view on w's handle
    with pytest.raises(ValueError, match="closed"):
        f.done()
    assert "closed" in repr(f)


def test_asyncio_awaits_on_the_fd():
    s = distcore.HashStore()

    async def main():
        work = s.get_async("k")
        fut = distcore.Future()
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, lambda: s.set("k", "v"))
        loop.call_later(0.05, lambda: fut.set_result(b"f"))
        done = await work
        return done, work.result(), await fut

    assert asyncio.run(asyncio.wait_for(main(), 10)) == (True, b"v", b"f")


def test_closed_work():
    w = distcore.Future()
    with w:
        pass
    with pytest.raises(ValueError, match="closed"):
        w.is_completed()


def test_profiler_hooks():
    events = []
    distcore.set_profiler_hooks(lambda title: events.append(("begin", title)) or len(events),
                                lambda title, token: events.append(("end", title, token)))
    try:
        w = distcore.Work(0, OpType.BARRIER, "profiled")
        w.finish()
    finally:
        distcore.set_profiler_hooks(None, None)
    assert events == [("begin", "profiled"), ("end", "profiled", 1)]
    with pytest.raises(ValueError):
        distcore.set_profiler_hooks(lambda t: 0, None)


def test_callbacks_see_the_python_exception_a_work_finished_with():
    w = distcore.Work(0, OpType.UNKNOWN)
    seen = []
    w.add_done_callback(lambda work: seen.append(work.exception()))
    w.finish(KeyError("boom"))
    assert isinstance(seen[0], KeyError), seen
    with pytest.raises(distcore.DistStateError):
        w.finish(ValueError("again"))
    with pytest.raises(KeyError):
        w.wait()


def test_ranks_and_world_sizes_out_of_32_bits_are_refused_not_wrapped():
    with pytest.raises(distcore.DistValueError, match="out of range"):
        distcore.HashStore().barrier("b", 2**32 + 1)
    with pytest.raises(distcore.DistValueError, match="out of range"):
        distcore.Work(rank=2**32 + 5)
