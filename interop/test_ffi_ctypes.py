"""Drives distcore's stores and works through the `distcore` Python package
(ctypes over the C ABI), as a Python FFI user."""
import select
import threading
import time
import unittest
from datetime import timedelta

import distcore
from distcore import Status, elastic
from distcore._lib import lib

T = timedelta


class CtypesStoreTest(unittest.TestCase):
    def setUp(self):
        self.store = distcore.HashStore()

    def tearDown(self):
        self.store.close()

    def test_version_and_status_strings(self):
        self.assertRegex(distcore.library_version(), r"^\d+\.\d+\.\d+$")
        self.assertEqual(distcore.status_str(Status.TIMEOUT), "timed out")

    def test_every_store_operation(self):
        s = self.store
        s.set("k", b"v")
        self.assertEqual(s.get("k"), b"v")
        self.assertEqual(s.add("c", 5), 5)
        self.assertEqual(s.get("c"), b"5")
        self.assertEqual(s.compare_set("cs", b"x", b"y"), b"x")
        self.assertEqual(s.compare_set("cs", b"", b"y"), b"y")
        s.append("ap", b"a")
        s.append("ap", b"\x00b")
        self.assertEqual(s.get("ap"), b"a\x00b")
        s.multi_set(["m1", "m2"], [b"1", b"2"])
        self.assertEqual(s.multi_get(["m2", "m1"]), [b"2", b"1"])
        self.assertTrue(s.check(["k", "m1"]))
        self.assertFalse(s.check(["k", "nope"]))
        self.assertTrue(s.delete_key("k"))
        self.assertFalse(s.delete_key("k"))
        self.assertEqual(sorted(s.list_keys()), ["ap", "c", "cs", "m1", "m2"])
        self.assertEqual(s.num_keys(), 5)
        s.queue_push("q", b"1")
        self.assertEqual(s.queue_len("q"), 1)
        self.assertEqual(s.queue_pop("q", block=False), b"1")
        with self.assertRaises(distcore.QueueEmptyError) as e:
            s.queue_pop("q", block=False)
        self.assertEqual(e.exception.status, Status.QUEUE_EMPTY)

    def test_timeouts_raise_store_errors_with_pytorch_message(self):
        with self.assertRaises(distcore.DistStoreError) as e:
            self.store.wait(["never"], T(milliseconds=50))
        self.assertIsInstance(e.exception, TimeoutError)
        self.assertEqual(e.exception.status, Status.TIMEOUT)
        self.assertEqual(str(e.exception), "wait timeout after 50ms, keys: never")
        self.store.set_timeout(T(milliseconds=20))
        with self.assertRaises(distcore.DistTimeoutError):
            self.store.get("missing")

    def test_null_and_bad_arguments_at_the_c_abi(self):
        h = self.store._handle
        self.assertEqual(lib.dc_store_set(None, b"k", b"v", 1), Status.INVALID_ARGUMENT)
        self.assertIn(b"NULL", lib.dc_last_error_message())
        self.assertEqual(lib.dc_store_set(h, None, b"v", 1), Status.INVALID_ARGUMENT)
        self.assertEqual(lib.dc_store_set(h, b"k", None, 4), Status.INVALID_ARGUMENT)
        self.assertEqual(lib.dc_store_set(h, b"\xff", b"v", 1), Status.INVALID_ARGUMENT)
        self.assertEqual(lib.dc_store_wait(h, None, 0, -7), Status.INVALID_ARGUMENT)

    def test_prefix_store_and_clone(self):
        p = distcore.PrefixStore("job", self.store)
        p.set("a", b"1")
        self.assertEqual(self.store.get("job/a"), b"1")
        self.assertEqual(p.list_keys(), ["a"])
        self.assertIs(p.underlying_store, self.store)
        with self.store.clone() as c:
            self.assertEqual(c.get("job/a"), b"1")

    def test_threads_rendezvous_with_elastic_helpers(self):
        world, results, errors = 4, {}, []

        def worker(rank):
            try:
                with self.store.clone() as s:
                    elastic.barrier(s, world, "py/bar", 10)
                    s.barrier("py/native", world, T(seconds=10))
                    results[rank] = elastic.synchronize(s, f"d{rank}".encode(), rank, world, "py/sync/", 10)
            except Exception as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertEqual(errors, [])
        expected = [f"d{r}".encode() for r in range(world)]
        self.assertEqual(results, {r: expected for r in range(world)})
        self.assertEqual(self.store.get("py/bar/last_member"), b"<val_ignored>")


class CtypesWorkTest(unittest.TestCase):
    def test_async_get_with_fd_and_callback(self):
        store = distcore.HashStore()
        work = store.get_async("later")
        fired = []
        work.add_done_callback(lambda w: fired.append(w.result()))
        fd = work.fileno()
        self.assertEqual(select.select([fd], [], [], 0.02)[0], [])
        store.set("later", b"value")
        self.assertEqual(select.select([fd], [], [], 10)[0], [fd])
        self.assertTrue(work.wait(T(seconds=10)))
        self.assertEqual(work.result(), b"value")
        # Callbacks run on the completing thread right after waiters wake.
        deadline = time.monotonic() + 10
        while not fired and time.monotonic() < deadline:
            time.sleep(0.001)
        self.assertEqual(fired, [b"value"])

    def test_failed_and_timed_out_work(self):
        work = distcore.Work(0, distcore.OpType.ALLREDUCE, "py-title", T(milliseconds=30))
        with self.assertRaises(distcore.DistTimeoutError) as e:
            work.wait()
        self.assertEqual(str(e.exception), "Operation timed out!")
        work.finish(distcore.DistRemoteError("worker 2 failed"))
        for _ in range(2):
            with self.assertRaises(distcore.DistRemoteError) as e:
                work.wait()
            self.assertEqual((e.exception.status, str(e.exception)), (Status.REMOTE, "worker 2 failed"))
        self.assertTrue(work.is_completed())
        self.assertIsInstance(work.exception(), distcore.DistRemoteError)

    def test_future_completed_from_another_thread(self):
        fut = distcore.Future()
        t = threading.Thread(target=lambda: fut.set_result(b"abc"))
        t.start()
        self.assertEqual(fut.wait(T(0)), b"abc")
        t.join()
        self.assertEqual(fut.value(), b"abc")


if __name__ == "__main__":
    unittest.main()
