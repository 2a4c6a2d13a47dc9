"""distcore.torch: distcore's stores as torch.distributed Stores. Each
adapter runs the generic store cases PyTorch runs on its own stores (the
key counts compared with PyTorch's own store of the same kind, in the same
test), PyTorch's C++ test of Python stores, and gloo jobs with
init_process_group(store=...) on a secret+TLS server and on etcd; a rank
killed fails the others' store waits at once."""
import datetime
import gc
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import warnings
from concurrent.futures import ThreadPoolExecutor

warnings.filterwarnings("ignore")
import torch.distributed as dist  # noqa: E402

import distcore  # noqa: E402
import distcore.torch as dct  # noqa: E402
import harness  # noqa: E402

T = datetime.timedelta
TLS = pathlib.Path(harness.ROOT) / "tests" / "tls"
SECRET = "a-long-shared-secret-for-the-job"
ETCD = None


def setUpModule():
    global ETCD
    ETCD = harness.EtcdCluster()


def tearDownModule():
    ETCD.stop()
    harness.kill_all()


def set_get_check(store):
    """The generic sequence of PyTorch's store tests: the key counts seen
    along the way, and the values read."""
    counts = []
    store.add("key", 1)
    store.add("key", 2)
    store.add("key", 3)
    store.set("key0", "value0")
    store.add("key3", 1)
    store.set("key1", "value1")
    store.add("key3", 2)
    store.set("key2", "value2")
    for n in (3, 4, 5, 6):
        store.add("key3", n)
    counts.append(store.num_keys())
    values = [store.get(k) for k in ("key", "key0", "key1", "key2", "key3")]
    checks = (store.check(["key3"]), store.check(["Randomkey3"]))
    store.set("-key3", "7")
    values.append(store.get("-key3"))
    store.delete_key("-key3")
    counts.append(store.num_keys())
    return counts, values, checks


class StoreCases:
    """Run on every adapter. `make` gives a new adapter (of a new store, or
    a new handle on the test's store); `reference` PyTorch's own store of
    the same kind, or None where PyTorch has none."""

    def reference(self):
        return None

    def test_set_get_check_and_key_counts_are_pytorchs(self):
        counts, values, checks = set_get_check(self.make())
        self.assertEqual(values, [b"6", b"value0", b"value1", b"value2", b"21", b"7"])
        self.assertEqual(checks, (True, False))
        reference = self.reference()
        if reference is not None:
            self.assertEqual(counts, set_get_check(reference)[0], "num_keys as PyTorch's own store counts")

    def test_compare_set_is_pytorchs(self):
        store = self.make()
        self.assertEqual(store.compare_set("cs_key0", "wrong_old_value", "new_value0"), b"wrong_old_value")
        store.set("cs_key0", "value0")
        self.assertEqual(store.compare_set("cs_key0", "wrong_old_value", "new_value0"), b"value0")
        self.assertEqual(store.compare_set("cs_key0", "value0", "new_value0"), b"new_value0")
        self.assertEqual(store.get("cs_key0"), b"new_value0")
        self.assertEqual(store.compare_set("cs_key1", "", "new_value1"), b"new_value1")

    def test_a_wait_times_out_as_pytorchs_does(self):
        store = self.make()
        with self.assertRaisesRegex(RuntimeError, "[t -i]imeout") as caught:
            store.wait(["bad_key"], T(seconds=0.25))
        self.assertIsInstance(caught.exception, dist.DistStoreError)
        self.assertIsInstance(caught.exception, distcore.DistTimeoutError)
        # It pickles as itself (raised again in another process).
        again = pickle.loads(pickle.dumps(caught.exception))
        self.assertIsInstance(again, dist.DistStoreError)
        self.assertEqual(str(again), str(caught.exception))
        store.add("good_key", 1)
        store.wait(["good_key"])

    def test_the_torch_timeout_is_the_one_calls_use(self):
        store = self.make()
        store.set_timeout(T(seconds=0.2))
        started = time.monotonic()
        with self.assertRaisesRegex(dist.DistStoreError, "[Tt]imeout"):
            store.get("never_set")
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(store.timeout, T(seconds=0.2))

    def test_append_multi_get_multi_set(self):
        store = self.make()
        self.assertTrue(store.has_extended_api())
        store.set("foo", "po")
        store.append("foo", "tato")
        store.append("bar", "po")
        store.append("bar", "tato")
        self.assertEqual(store.get("foo"), b"potato")
        self.assertEqual(store.get("bar"), b"potato")
        store.multi_set(["m1", "m2"], ["po", b"tato"])
        self.assertEqual(store.multi_get(["m1", "m2"]), [b"po", b"tato"])

    def test_queues_as_pytorchs(self):
        store = self.make()
        self.assertFalse(store.check(["q"]))
        self.assertEqual(store.queue_len("q"), 0)
        store.queue_push("q", "1")
        store.queue_push("q", b"2")
        self.assertTrue(store.check(["q"]))
        self.assertEqual(store.queue_len("q"), 2)
        store.wait(["q"])
        self.assertEqual([store.queue_pop("q"), store.queue_pop("q")], [b"1", b"2"])
        with self.assertRaisesRegex(dist.QueueEmptyError, "empty"):
            store.queue_pop("q", block=False)
        store.set_timeout(T(seconds=0.05))
        with self.assertRaisesRegex(dist.DistStoreError, "timeout"):
            store.queue_pop("q")

    def test_clones_talk_through_queues_from_two_threads(self):
        store = self.make()

        def a():
            mine = store.clone()
            self.assertIsInstance(mine, dist.Store)
            mine.queue_push("qa", "a1")
            return mine.queue_pop("qb")

        def b():
            mine = store.clone()
            got = mine.queue_pop("qa")
            mine.queue_push("qb", "b1")
            return got

        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = [pool.submit(a), pool.submit(b)]
            self.assertEqual([f.result(timeout=60) for f in futures], [b"b1", b"a1"])

    def test_pytorchs_own_test_of_python_stores_passes_through_its_cpp_side(self):
        dist._test_python_store(self.make())

    def test_c10d_may_hold_it_where_python_cannot_see_it(self):
        # Only torch's C++ PrefixStore holds the adapter (pytorch#115977).
        wrapped = dist.PrefixStore("held", self.make())
        gc.collect()
        wrapped.set("k", "v")
        self.assertEqual(wrapped.get("k"), b"v")
        self.assertEqual(wrapped.add("n", 2), 2)
        self.assertEqual(wrapped.num_keys() >= 2, True)
        self.assertTrue(wrapped.delete_key("k"))
        wrapped.wait(["n"], T(seconds=5))

    def test_list_keys_and_prefixes(self):
        store = self.make()
        store.set("lk/a", "1")
        store.set("lk/b", "2")
        self.assertTrue({"lk/a", "lk/b"} <= set(store.list_keys()))
        self.assertEqual(sorted(store.list_prefix("lk/")), ["lk/a", "lk/b"])
        self.assertEqual(store.delete_prefix("lk/"), 2)


class HashStoreAdapter(StoreCases, unittest.TestCase):
    def make(self):
        return dct.HashStore()

    def reference(self):
        return dist.HashStore()


class FileStoreAdapter(StoreCases, unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.files = iter(range(1000))

    def tearDown(self):
        self.dir.cleanup()

    def path(self):
        return os.path.join(self.dir.name, f"store{next(self.files)}")

    def make(self):
        return dct.FileStore(self.path(), 1)

    def reference(self):
        return dist.FileStore(self.path(), 1)


class TCPStoreAdapter(StoreCases, unittest.TestCase):
    """Each case on a new server hosted by the adapter, as PyTorch's tests
    make theirs."""

    def make(self):
        return dct.TCPStore("127.0.0.1", 0, 1, True, timeout=T(seconds=30))

    def reference(self):
        return dist.TCPStore("127.0.0.1", 0, 1, True, timeout=T(seconds=30))

    def test_a_server_on_a_port_in_use_is_pytorchs_network_error(self):
        first = self.make()
        with self.assertRaises(dist.DistNetworkError):
            dct.TCPStore("127.0.0.1", first.port, 1, True, timeout=T(seconds=5))


class PrefixStoreAdapter(StoreCases, unittest.TestCase):
    def setUp(self):
        self.base = dct.HashStore()

    def make(self):
        return dct.PrefixStore("pre", self.base)

    def reference(self):
        return dist.PrefixStore("pre", dist.HashStore())

    def test_the_underlying_store_is_the_one_given(self):
        self.assertIs(self.make().underlying_store, self.base)
        self.assertEqual(self.make().prefix, "pre")


class GuardedTCPStoreAdapter(StoreCases, unittest.TestCase):
    """Clients of a server that requires the secret and TLS: what
    PyTorch's own client cannot reach."""

    @classmethod
    def setUpClass(cls):
        cls.server = dct.TCPStore("127.0.0.1", 0, None, True, timeout=T(seconds=30), secret=SECRET,
                                  tls_cert=TLS / "server.pem", tls_key=TLS / "server.key", tls_ca=TLS / "ca.pem",
                                  tls_server_name="localhost")
        cls.prefixes = iter(range(1000))

    @classmethod
    def tearDownClass(cls):
        cls.server.close()

    def make(self):
        client = dct.TCPStore("127.0.0.1", self.server.port, timeout=T(seconds=30), secret=SECRET,
                              tls_ca=TLS / "ca.pem", tls_server_name="localhost")
        # A fresh key space per case on the shared server.
        return dct.PrefixStore(f"case{next(self.prefixes)}", client)

    def test_pytorchs_own_client_is_refused(self):
        with self.assertRaises(Exception):
            torch_client = dist.TCPStore("127.0.0.1", self.server.port, None, False, timeout=T(seconds=3))
            torch_client.set("k", "v")
            torch_client.get("k")


class EtcdStoreAdapter(StoreCases, unittest.TestCase):
    def setUp(self):
        self.prefixes = iter(range(1000))

    def make(self):
        return dct.EtcdStore(ETCD.endpoints, prefix=f"/adapter-{self.id()}-{next(self.prefixes)}",
                             timeout=T(seconds=30))


# -- gloo jobs ------------------------------------------------------------------

WORKER = r"""
import datetime, sys, torch, torch.distributed as dist
from distcore.torch import EtcdStore, TCPStore
kind, rank, world, where = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
T = datetime.timedelta
if kind == "tcp":
    tls, port = where.split(",")
    store = TCPStore("127.0.0.1", int(port), world, rank == 0, timeout=T(seconds=60), secret=%(secret)r,
                     tls_ca=tls + "/ca.pem", tls_server_name="localhost",
                     **({"tls_cert": tls + "/server.pem", "tls_key": tls + "/server.key"} if rank == 0 else {}))
else:
    endpoints, prefix = where.split(",")
    store = EtcdStore(endpoints, prefix=prefix, timeout=T(seconds=60))
with store:
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=T(seconds=60))
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    assert t.item() == world * (world + 1) / 2, t
    dist.barrier()
    pair = dist.new_group([0, 1])
    if rank < 2:
        u = torch.tensor([1.0])
        dist.all_reduce(u, group=pair)
        assert u.item() == 2.0, u
    gathered = [None] * world
    dist.all_gather_object(gathered, {"rank": rank})
    assert gathered == [{"rank": r} for r in range(world)], gathered
    sent = ["from rank 0", {"n": 7}] if rank == 0 else [None, None]
    dist.broadcast_object_list(sent, src=0)
    assert sent == ["from rank 0", {"n": 7}], sent
    dist.barrier()
    dist.destroy_process_group()
print("ok", rank)
""" % {"secret": SECRET}


def gloo_env():
    return dict(os.environ, PYTHONPATH=harness.HERE, LD_PRELOAD=harness.numeric_names(), GLOO_SOCKET_IFNAME="lo")


class GlooJobs(unittest.TestCase):
    def run_job(self, kind, where, world=3):
        procs = [harness.track(subprocess.Popen(
            [sys.executable, "-c", WORKER, kind, str(rank), str(world), where], env=gloo_env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for rank in range(world)]
        for rank, proc in enumerate(procs):
            self.assertEqual(harness.finish(proc, timeout=180).split(), ["ok", str(rank)])

    def test_a_gloo_job_on_a_secret_and_tls_server(self):
        self.run_job("tcp", f"{TLS},{harness.free_port()}")

    def test_a_gloo_job_on_etcd(self):
        self.run_job("etcd", f"{ETCD.endpoints[0]},/gloo-job")


# -- liveness -------------------------------------------------------------------

MEMBER = r"""
import datetime, sys, time
from distcore.torch import TCPStore
store = TCPStore("127.0.0.1", int(sys.argv[1]), timeout=datetime.timedelta(seconds=60))
store.open_session("job/", 1, 2)
print("ready", flush=True)
time.sleep(600)
"""


class Liveness(unittest.TestCase):
    def test_a_killed_rank_fails_the_others_store_waits_at_once_naming_it(self):
        store = dct.TCPStore("127.0.0.1", 0, None, True, timeout=T(seconds=60))
        store.open_session("job/", 0, 2)
        member = harness.python(MEMBER, store.port)
        self.assertEqual(member.stdout.readline().strip(), "ready")
        failed = []
        waiter = threading.Thread(target=lambda: failed.append(self.blocked_get(store)))
        waiter.start()
        deadline = time.monotonic() + 30
        while store.distcore_store.server_stats()["pending_waits"] < 1:  # blocked (its timeout: 60 s)
            self.assertLess(time.monotonic(), deadline, "the get never blocked")
            time.sleep(0.01)
        killed = time.monotonic()
        os.kill(member.pid, signal.SIGKILL)
        waiter.join(timeout=30)
        told = time.monotonic() - killed
        (error,) = failed
        self.assertIsInstance(error, dist.DistError)
        self.assertIsInstance(error, distcore.DistPeerError)
        self.assertIn("rank 1 of group 'job/'", str(error))
        self.assertLess(told, 5, "at once, not at the 60 s timeout")
        store.close()

    @staticmethod
    def blocked_get(store):
        try:
            store.get("job/never")
        except Exception as e:  # noqa: BLE001 - the test looks at what it is
            return e
        return None


if __name__ == "__main__":
    unittest.main()
