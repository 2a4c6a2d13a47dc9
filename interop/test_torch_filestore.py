"""PyTorch's FileStore and distcore's on one file at the same time."""
import datetime
import os
import tempfile
import threading
import unittest
import warnings

warnings.filterwarnings("ignore")
import torch.distributed as dist  # noqa: E402

import distcore  # noqa: E402
import harness  # noqa: E402


def tearDownModule():
    harness.kill_all()


class SharedFile(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "store")

    def tearDown(self):
        self.dir.cleanup()

    def test_operations_cross_between_pytorch_and_distcore(self):
        torch_store = dist.FileStore(self.path, 2)
        ours = distcore.FileStore(self.path, 2)
        torch_store.set("a", "from-torch")
        self.assertEqual(ours.get("a"), b"from-torch")
        ours.set("b", b"from-distcore")
        self.assertEqual(torch_store.get("b"), b"from-distcore")
        self.assertEqual(torch_store.add("c", 3), 3)
        self.assertEqual(ours.add("c", 4), 7)
        self.assertEqual(torch_store.add("c", 0), 7)
        self.assertEqual(ours.compare_set("cs", b"", b"x"), b"x")
        self.assertEqual(torch_store.compare_set("cs", "x", "y"), b"y")
        self.assertEqual(ours.get("cs"), b"y")
        ours.append("ap", b"1")
        torch_store.append("ap", "2")
        self.assertEqual(ours.get("ap"), b"12")
        self.assertTrue(ours.delete_key("a"))
        self.assertFalse(torch_store.check(["a"]))
        torch_store.delete_key("b")
        self.assertFalse(ours.check(["b"]))
        self.assertEqual(ours.num_keys(), torch_store.num_keys())
        # distcore's queues live in records PyTorch replays as no-op deletes.
        before = torch_store.num_keys()
        ours.queue_push("q", b"job")
        self.assertEqual(torch_store.num_keys(), before)
        self.assertEqual(torch_store.get("c"), b"7")
        self.assertEqual(ours.queue_pop("q", block=False), b"job")
        # A wait in distcore woken by a PyTorch write.
        threading.Timer(0.2, lambda: torch_store.set("late", "L")).start()
        ours.wait(["late"], datetime.timedelta(seconds=10))
        self.assertEqual(sorted(ours.list_keys()), ["ap", "c", "cs", "late"])
        # Refcount: both handles close, world size 2 -> the file is removed.
        del torch_store
        self.assertTrue(os.path.exists(self.path))
        ours.close()
        self.assertFalse(os.path.exists(self.path))

    def test_processes_of_both_kinds_count_and_meet_in_a_barrier(self):
        torch_worker = (
            "import sys, datetime, torch.distributed as d\n"
            "s = d.FileStore(sys.argv[1], 4)\n"
            "s.set_timeout(datetime.timedelta(seconds=60))\n"
            "for _ in range(25): s.add('counter', 1)\n"
            "s.barrier('meet', 4)\n"
            "print(s.get('counter').decode())\n"
            "del s\n"
        )
        # The same script over the distcore package (close() instead of del).
        distcore_worker = torch_worker.replace("torch.distributed as d", "distcore as d").replace(
            "del s", "s.close()")
        self.assertIn("import sys, datetime, distcore as d", distcore_worker)
        procs = [harness.python(torch_worker if i % 2 else distcore_worker, self.path) for i in range(4)]
        outputs = [harness.finish(p).strip() for p in procs]
        self.assertEqual(outputs, ["100"] * 4)
        self.assertFalse(os.path.exists(self.path), "the fourth handle to close removes the file")

    def test_pytorch_reads_a_log_distcore_started(self):
        ours = distcore.FileStore(self.path, -1)
        ours.set("k", b"v")
        ours.multi_set(["m1", "m2"], [b"1", b"2"])
        torch_store = dist.FileStore(self.path, -1)
        torch_store.set_timeout(datetime.timedelta(seconds=10))
        self.assertEqual(torch_store.multi_get(["k", "m1", "m2"]), [b"v", b"1", b"2"])
        del torch_store
        ours.close()
        self.assertTrue(os.path.exists(self.path), "no world size: the file stays, as in PyTorch")


if __name__ == "__main__":
    unittest.main()
