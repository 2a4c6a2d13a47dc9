"""distcore against PyTorch itself (torch from pip, CPU): PyTorch clients on
distcore servers, distcore clients on PyTorch servers (libuv and legacy),
torchelastic's helpers mixed with distcore's, and faults."""
import datetime
import os
import signal
import socket
import struct
import threading
import time
import unittest
import warnings

warnings.filterwarnings("ignore")
import torch.distributed as dist  # noqa: E402

import distcore  # noqa: E402
import harness  # noqa: E402
from distcore import Status  # noqa: E402

T = datetime.timedelta


def torch_client(port, **kw):
    kw.setdefault("timeout", T(seconds=30))
    return dist.TCPStore("127.0.0.1", port, kw.pop("world_size", None), False, **kw)


def tearDownModule():
    harness.kill_all()


class TorchClientsOnDistcoreServer:
    """Every Python TCPStore method, driven by PyTorch's own client."""

    def make_server(self):
        raise NotImplementedError

    def setUp(self):
        self.server = self.make_server()
        self.store = torch_client(self.server.port)

    def tearDown(self):
        del self.store
        self.server.stop()

    def test_every_method(self):
        s = self.store
        s.set("k1", "v1")
        self.assertEqual(s.get("k1"), b"v1")
        self.assertEqual(s.add("cnt", 5), 5)
        self.assertEqual(s.add("cnt", -2), 3)
        self.assertEqual(s.get("cnt"), b"3")
        self.assertEqual(s.compare_set("cs", "x", "y"), b"x")
        self.assertEqual(s.compare_set("cs", "", "first"), b"first")
        self.assertEqual(s.compare_set("cs", "wrong", "z"), b"first")
        self.assertEqual(s.compare_set("cs", "first", "second"), b"second")
        self.assertTrue(s.check(["k1", "cnt"]))
        self.assertFalse(s.check(["k1", "nope"]))
        s.wait(["k1", "cnt"])
        s.wait(["k1"], T(seconds=1))
        s.append("ap", "x")
        s.append("ap", "yz")
        self.assertEqual(s.get("ap"), b"xyz")
        s.multi_set(["m1", "m2"], ["1", "22"])
        self.assertEqual(s.multi_get(["m2", "m1", "ap"]), [b"22", b"1", b"xyz"])
        self.assertEqual(s.num_keys(), 6)
        self.assertTrue(s.delete_key("k1"))
        self.assertFalse(s.delete_key("k1"))
        self.assertEqual(sorted(s.list_keys()), ["ap", "cnt", "cs", "m1", "m2"])
        s.queue_push("q", "a")
        s.queue_push("q", b"\x00b")
        self.assertEqual(s.queue_len("q"), 2)
        self.assertEqual(s.queue_pop("q", block=False), b"a")
        self.assertEqual(s.queue_pop("q"), b"\x00b")
        with self.assertRaises(dist.QueueEmptyError):
            s.queue_pop("q", block=False)
        s.barrier("bar", 1)
        self.assertEqual(s.timeout, T(seconds=30))
        s.set_timeout(T(seconds=7))
        self.assertEqual(s.timeout, T(seconds=7))
        c = s.clone()
        c.set("from-clone", "1")
        self.assertEqual(s.get("from-clone"), b"1")
        self.assertEqual(s.port, self.server.port)

    def test_timeouts_raise_pytorch_errors(self):
        s = self.store
        s.set_timeout(T(milliseconds=200))
        with self.assertRaisesRegex(dist.DistStoreError, r"^wait timeout after 200ms, keys: /never$"):
            s.wait(["never"])
        with self.assertRaisesRegex(dist.DistStoreError, "wait timeout after 200ms"):
            s.get("never")
        with self.assertRaisesRegex(dist.DistStoreError, "^barrier timeout after 100ms, key: b2$"):
            s.barrier("b2", 2, T(milliseconds=100))
        with self.assertRaises(dist.DistStoreError):
            s.queue_pop("empty")
        s.set("after", "ok")  # the connection survived every cancel-wait
        self.assertEqual(s.get("after"), b"ok")

    def test_blocking_queue_pop_is_woken_by_another_client(self):
        other = torch_client(self.server.port)
        threading.Timer(0.3, lambda: other.queue_push("jobs", "job-1")).start()
        self.assertEqual(self.store.queue_pop("jobs"), b"job-1")

    def test_barrier_across_processes(self):
        code = (
            "import sys, datetime, torch.distributed as d\n"
            "s = d.TCPStore('127.0.0.1', int(sys.argv[1]), None, False, timeout=datetime.timedelta(seconds=60))\n"
            "s.barrier('procs', 4)\n"
            "s.add('passed', 1)\n"
        )
        procs = [harness.python(code, self.server.port) for _ in range(3)]
        self.store.barrier("procs", 4, T(seconds=60))
        for p in procs:
            harness.finish(p)
        self.assertEqual(self.store.get("passed"), b"3")


class TorchClientsOnCServer(TorchClientsOnDistcoreServer, unittest.TestCase):
    def make_server(self):
        return harness.CServer()

    def test_wait_for_workers_with_several_clients(self):
        server = harness.CServer(world_size=3)  # the C server counts itself
        code = (
            "import sys, datetime, torch.distributed as d\n"
            "s = d.TCPStore('127.0.0.1', int(sys.argv[1]), 3, False, timeout=datetime.timedelta(seconds=60))\n"
            "s.set('client-' + sys.argv[2], 'here')\n"
        )
        procs = [harness.python(code, server.port, i) for i in range(2)]
        server.wait_joined()
        for p in procs:
            harness.finish(p)
        c = torch_client(server.port)
        self.assertEqual(c.multi_get(["client-0", "client-1"]), [b"here", b"here"])
        server.stop()

    def test_killed_client_mid_wait_leaves_no_waiter(self):
        code = (
            "import sys, datetime, torch.distributed as d\n"
            "s = d.TCPStore('127.0.0.1', int(sys.argv[1]), None, False, timeout=datetime.timedelta(seconds=60))\n"
            "print('waiting', flush=True)\n"
            "s.wait(['never-set'])\n"
        )
        p = harness.python(code, self.server.port)
        self.assertEqual(p.stdout.readline().strip(), "waiting")
        deadline = time.monotonic() + 30
        while self.server.stats()["pending_waits"] != 1:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        while self.server.stats()["pending_waits"] != 0:
            self.assertLess(time.monotonic(), deadline, "the dead client's waiter stayed")
            time.sleep(0.02)
        self.store.set("never-set", "now")  # wakes nobody, breaks nothing
        self.assertEqual(self.store.get("never-set"), b"now")

    def test_bad_input_closes_only_its_connection(self):
        magic = b"\x00" + struct.pack("<I", 0x3C85F7CE)
        cases = {
            "garbage": magic + b"\xfe\xed\xfa\xce" * 4,
            "2^63 length": magic + b"\x03" + struct.pack("<Q", 1 << 63),
            "wrong magic": b"\x00" + struct.pack("<I", 0xDEADBEEF),
            "value over the limit": magic + b"\x01" + struct.pack("<Q", 2) + b"/k" + struct.pack("<Q", 1 << 40),
        }
        for name, payload in cases.items():
            with socket.create_connection(("127.0.0.1", self.server.port), timeout=10) as raw:
                raw.sendall(payload)
                self.assertEqual(raw.recv(1), b"", f"{name}: connection not closed")
            self.store.set(name, "still served")
            self.assertEqual(self.store.get(name), b"still served")
        # A truncated frame, then the peer goes away: nothing is half-applied.
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=10) as raw:
            raw.sendall(magic + b"\x01" + struct.pack("<Q", 4) + b"/tru")
        self.assertFalse(self.store.check(["tru"]))


class TorchClientsOnCliServer(TorchClientsOnDistcoreServer, unittest.TestCase):
    def make_server(self):
        return harness.CliServer()


class DistcoreClientOnTorchServer:
    """distcore's client (the distcore package over the C ABI) against PyTorch's servers."""

    use_libuv = True

    def setUp(self):
        self.server = dist.TCPStore("127.0.0.1", 0, None, True, timeout=T(seconds=30),
                                    wait_for_workers=False, use_libuv=self.use_libuv)
        self.store = distcore.TCPStore("127.0.0.1", self.server.port, timeout=T(seconds=30))

    def tearDown(self):
        self.store.close()

    def test_every_operation(self):
        s = self.store
        s.set("k", b"v")
        self.assertEqual(self.server.get("k"), b"v")  # PyTorch sees our key
        self.server.set("from-torch", "t")
        self.assertEqual(s.get("from-torch"), b"t")
        self.assertEqual(s.add("c", 5), 5)
        self.assertEqual(self.server.add("c", 1), 6)
        self.assertEqual(s.compare_set("cs", b"x", b"y"), b"x")
        self.assertEqual(s.compare_set("cs", b"", b"y"), b"y")
        self.assertEqual(s.compare_set("cs", b"y", b"z"), b"z")
        s.append("ap", b"a")
        s.append("ap", b"b")
        self.assertEqual(s.get("ap"), b"ab")
        s.multi_set(["m1", "m2"], [b"1", b"2"])
        self.assertEqual(s.multi_get(["m2", "m1"]), [b"2", b"1"])
        self.assertTrue(s.check(["k", "m1"]))
        self.assertFalse(s.check(["k", "nope"]))
        s.wait(["k", "m2"], T(seconds=1))
        self.assertEqual(sorted(s.list_keys()), sorted(self.server.list_keys()))
        self.assertEqual(s.num_keys(), self.server.num_keys())
        self.assertTrue(s.delete_key("k"))
        self.assertFalse(s.delete_key("k"))
        s.barrier("bar", 1, T(seconds=5))
        with self.assertRaisesRegex(distcore.DistStoreError, r"^wait timeout after 200ms, keys: /never$") as e:
            s.wait(["never"], T(milliseconds=200))
        self.assertEqual(e.exception.status, Status.TIMEOUT)
        s.set_timeout(T(milliseconds=150))
        with self.assertRaises(TimeoutError):
            s.get("never")
        s.set_timeout(T(seconds=30))
        threading.Timer(0.2, lambda: self.server.set("late", "L")).start()
        self.assertEqual(s.get("late"), b"L")  # woken through WAIT + GET
        clone = s.clone()
        self.assertEqual(clone.get("late"), b"L")

    def test_queues(self):
        if not self.use_libuv:
            self.skipTest("PyTorch's legacy server has no queues")
        s = self.store
        s.queue_push("q", b"1")
        self.assertEqual(self.server.queue_len("q"), 1)
        self.assertEqual(s.queue_pop("q", block=False), b"1")
        with self.assertRaisesRegex(distcore.QueueEmptyError, "^queue is empty$"):
            s.queue_pop("q", block=False)
        threading.Timer(0.2, lambda: self.server.queue_push("q", "2")).start()
        self.assertEqual(s.queue_pop("q", block=True), b"2")


class DistcoreClientOnTorchLibuvServer(DistcoreClientOnTorchServer, unittest.TestCase):
    use_libuv = True


class DistcoreClientOnTorchLegacyServer(DistcoreClientOnTorchServer, unittest.TestCase):
    use_libuv = False


ELASTIC_TORCH = (
    "import sys, datetime, torch.distributed as d\n"
    "from torch.distributed.elastic.utils import store as es\n"
    "port, rank, world = map(int, sys.argv[1:4])\n"
    "s = d.TCPStore('127.0.0.1', port, None, False, timeout=datetime.timedelta(seconds=60))\n"
    "es.barrier(s, world, 'mix/bar', 60)\n"
    "data = es.synchronize(s, b'torch%d' % rank, rank, world, 'mix/sync/', 60)\n"
    "print(b','.join(data).decode())\n"
)
ELASTIC_DISTCORE = (
    "import sys, datetime, distcore\n"
    "from distcore import elastic as es\n"
    "port, rank, world = map(int, sys.argv[1:4])\n"
    "s = distcore.TCPStore('127.0.0.1', port, None, False, timeout=datetime.timedelta(seconds=60))\n"
    "es.barrier(s, world, 'mix/bar', 60)\n"
    "data = es.synchronize(s, b'distcore%d' % rank, rank, world, 'mix/sync/', 60)\n"
    "print(b','.join(data).decode())\n"
)


class MixedElasticHelpers(unittest.TestCase):
    """torchelastic's barrier/synchronize in PyTorch processes and distcore's
    (distcore.elastic, over the C ABI) in others meet on one store: the same
    script but for its imports."""

    def run_mix(self, port):
        world = 4
        procs = [harness.python(ELASTIC_TORCH if r % 2 == 0 else ELASTIC_DISTCORE, port, r, world)
                 for r in range(world)]
        outputs = [harness.finish(p).strip() for p in procs]
        expected = "torch0,distcore1,torch2,distcore3"
        self.assertEqual(outputs, [expected] * world)

    def test_on_a_distcore_server(self):
        server = harness.CServer()
        self.run_mix(server.port)
        server.stop()

    def test_on_a_torch_server(self):
        server = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
        self.run_mix(server.port)


class ServerDeath(unittest.TestCase):
    def test_killed_server_gives_waiting_client_a_network_error(self):
        server = harness.CliServer()
        store = distcore.TCPStore("127.0.0.1", server.port, timeout=T(seconds=30))
        outcome = {}

        def waiter():
            start = time.monotonic()
            try:
                store.wait(["never"], T(seconds=30))
            except distcore.DistNetworkError as e:
                outcome["status"] = e.status
            outcome["elapsed"] = time.monotonic() - start

        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.3)
        os.kill(server.proc.pid, signal.SIGKILL)
        t.join(30)
        self.assertEqual(outcome.get("status"), Status.NETWORK)
        self.assertLess(outcome["elapsed"], 5)


if __name__ == "__main__":
    unittest.main()
