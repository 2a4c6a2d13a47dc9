"""Drives distcore's stores and works through ctypes, as a Python FFI user."""
import ctypes
import select
import threading
import time
import unittest

import distcore_ctypes as dc


class CtypesStoreTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.api = dc.Api()

    def setUp(self):
        self.store = dc.Store.hash(self.api)

    def test_version_and_status_strings(self):
        self.assertRegex(self.api.lib.dc_version().decode(), r"^\d+\.\d+\.\d+$")
        self.assertEqual(self.api.lib.dc_status_str(dc.TIMEOUT), b"timed out")

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
        with self.assertRaises(dc.DistcoreError) as e:
            s.queue_pop("q", block=False)
        self.assertEqual(e.exception.status, dc.QUEUE_EMPTY)

    def test_timeouts_map_to_timeout_status_with_pytorch_message(self):
        with self.assertRaises(dc.DistcoreError) as e:
            self.store.wait(["never"], 50)
        self.assertEqual(e.exception.status, dc.TIMEOUT)
        self.assertEqual(e.exception.message, "wait timeout after 50ms, keys: never")
        self.store.set_timeout(20)
        with self.assertRaises(dc.DistcoreError) as e:
            self.store.get("missing")
        self.assertEqual(e.exception.status, dc.TIMEOUT)

    def test_null_and_bad_arguments(self):
        lib = self.api.lib
        self.assertEqual(lib.dc_store_set(None, b"k", b"v", 1), dc.INVALID_ARGUMENT)
        self.assertIn(b"NULL", lib.dc_last_error_message())
        self.assertEqual(lib.dc_store_set(self.store.handle, None, b"v", 1), dc.INVALID_ARGUMENT)
        self.assertEqual(lib.dc_store_set(self.store.handle, b"k", None, 4), dc.INVALID_ARGUMENT)
        self.assertEqual(lib.dc_store_set(self.store.handle, b"\xff", b"v", 1), dc.INVALID_ARGUMENT)
        self.assertEqual(lib.dc_store_wait(self.store.handle, None, 0, -7), dc.INVALID_ARGUMENT)

    def test_prefix_store_and_clone(self):
        p = self.store.prefixed("job")
        p.set("a", b"1")
        self.assertEqual(self.store.get("job/a"), b"1")
        self.assertEqual(p.list_keys(), ["a"])
        self.assertEqual(self.store.clone().get("job/a"), b"1")

    def test_threads_rendezvous_with_elastic_helpers(self):
        world, results, errors = 4, {}, []

        def worker(rank):
            try:
                s = self.store.clone()
                s.elastic_barrier(world, "py/bar", 10000)
                s.barrier("py/native", world, 10000)
                results[rank] = s.elastic_synchronize(f"d{rank}".encode(), rank, world, "py/sync/", 10000)
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
    @classmethod
    def setUpClass(cls):
        cls.api = dc.Api()

    def test_async_get_with_fd_and_callback(self):
        store = dc.Store.hash(self.api)
        work = store.get_async("later")
        fired = []
        cb = dc.WORK_CALLBACK(lambda w, ud: fired.append(ud))
        self.api.check(self.api.lib.dc_work_add_done_callback(work.handle, cb, 42))
        fd = work.fd()
        self.assertEqual(select.select([fd], [], [], 0.02)[0], [])
        store.set("later", b"value")
        self.assertEqual(select.select([fd], [], [], 10)[0], [fd])
        work.wait(10000)
        self.assertEqual(work.result(), b"value")
        # Callbacks run on the completing thread right after waiters wake.
        deadline = time.monotonic() + 10
        while not fired and time.monotonic() < deadline:
            time.sleep(0.001)
        self.assertEqual(fired, [42])

    def test_failed_and_timed_out_work(self):
        h = ctypes.c_void_p()
        self.api.check(self.api.lib.dc_work_new(0, 1, b"py-title", 30, ctypes.byref(h)))
        work = dc.Work(self.api, h)
        with self.assertRaises(dc.DistcoreError) as e:
            work.wait()
        self.assertEqual((e.exception.status, e.exception.message), (dc.TIMEOUT, "Operation timed out!"))
        self.api.check(self.api.lib.dc_work_finish(h, dc.REMOTE, b"worker 2 failed"))
        for _ in range(2):
            with self.assertRaises(dc.DistcoreError) as e:
                work.wait()
            self.assertEqual((e.exception.status, e.exception.message), (dc.REMOTE, "worker 2 failed"))
        self.assertTrue(work.is_completed())

    def test_future_work_completed_from_another_thread(self):
        h = ctypes.c_void_p()
        self.api.check(self.api.lib.dc_work_new_future(ctypes.byref(h)))
        work = dc.Work(self.api, h)
        t = threading.Thread(target=lambda: self.api.lib.dc_work_finish_with_result(h, b"abc", 3))
        t.start()
        work.wait(dc.TIMEOUT_FOREVER)
        t.join()
        self.assertEqual(work.result(), b"abc")


if __name__ == "__main__":
    unittest.main()
