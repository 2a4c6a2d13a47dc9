"""PyTorch clients on `distcore serve --backend etcd://...`: the TCPStore
interop tests against servers that keep no keys (a real etcd the tests
start), two servers serving one store, a server killed and replaced, and
etcd members killed under a workload from several processes."""
import datetime
import itertools
import json
import threading
import time
import unittest
import warnings

warnings.filterwarnings("ignore")

import harness  # noqa: E402
from test_torch_interop import TorchClientsOnDistcoreServer, torch_client  # noqa: E402

T = datetime.timedelta
ETCD = None
PREFIXES = itertools.count()


def setUpModule():
    global ETCD
    ETCD = harness.EtcdCluster()


def tearDownModule():
    ETCD.stop()
    harness.kill_all()


def etcd_server(prefix=None, cluster=None, args=()):
    """`distcore serve` on `cluster` (the module's etcd), under `prefix` (a new one)."""
    cluster = cluster or ETCD
    prefix = prefix or f"job{next(PREFIXES)}"
    return harness.CliServer(backend=cluster.url(prefix), args=args)


class TorchClientsOnEtcdServer(TorchClientsOnDistcoreServer, unittest.TestCase):
    def make_server(self):
        return etcd_server()


class TwoServersOnOneStore(unittest.TestCase):
    def setUp(self):
        prefix = f"shared{next(PREFIXES)}"
        self.prefix = prefix
        self.a, self.b = etcd_server(prefix), etcd_server(prefix)

    def tearDown(self):
        for server in (self.a, self.b):
            if server.proc.poll() is None:
                server.stop()

    def test_each_sees_the_others_writes_waits_and_barriers(self):
        on_a, on_b = torch_client(self.a.port), torch_client(self.b.port)
        on_a.set("k", "v")
        self.assertEqual(on_b.get("k"), b"v")
        threading.Timer(0.3, lambda: on_a.set("late", "1")).start()
        on_b.wait(["late"], T(seconds=20))
        code = (
            "import sys, datetime, torch.distributed as d\n"
            "s = d.TCPStore('127.0.0.1', int(sys.argv[1]), None, False, timeout=datetime.timedelta(seconds=60))\n"
            "s.barrier('across', 4)\n"
            "s.add('passed', 1)\n"
        )
        procs = [harness.python(code, server.port) for server in (self.a, self.a, self.b, self.b)]
        for p in procs:
            harness.finish(p)
        self.assertEqual(on_a.get("passed"), b"4")

    def test_a_killed_server_loses_no_acknowledged_write(self):
        on_a = torch_client(self.a.port)
        for i in range(50):
            on_a.set(f"k{i}", str(i))
        self.assertEqual(on_a.add("n", 50), 50)  # acknowledges the sets before it
        on_a.queue_push("q", "x")
        self.assertEqual(on_a.queue_len("q"), 1)
        self.a.kill()
        c = etcd_server(self.prefix)
        on_c = torch_client(c.port)
        self.assertEqual(on_c.multi_get([f"k{i}" for i in range(50)]), [str(i).encode() for i in range(50)])
        self.assertEqual(on_c.add("n", 0), 50)
        self.assertEqual(on_c.queue_pop("q"), b"x")
        c.stop()


WORKER = """
import datetime, json, sys, time, torch.distributed as d
port, me, workers, seconds = map(int, sys.argv[1:5])
T = datetime.timedelta
def connect():
    return d.TCPStore('127.0.0.1', port, None, False, timeout=T(seconds=20))
s = connect()
acked_sets, acked_adds, failed_adds, failures, wait_timeouts = [], 0, 0, 0, 0
longest_write = longest_wait = 0.0
end = time.monotonic() + seconds
n = 0
while time.monotonic() < end:
    n += 1
    step = 'set'
    began = time.monotonic()
    try:
        s.set(f'w{me}-{n}', str(n))
        step = 'add'
        s.add('counter', 1)
        acked_adds += 1
        acked_sets.append(n)
        longest_write = max(longest_write, time.monotonic() - began)
        step = 'wait'
        waited = time.monotonic()
        try:
            s.wait([f'w{(me + 1) % workers}-{n}'], T(seconds=3))
        except d.DistStoreError as e:
            if 'timeout' not in str(e):
                raise
            wait_timeouts += 1
        longest_wait = max(longest_wait, time.monotonic() - waited)
    except Exception as e:
        failures += 1
        failed_adds += step == 'add'
        print(f'worker {me}: {step} failed: {e}', file=sys.stderr)
        longest_write = max(longest_write, time.monotonic() - began)
        s = connect()
print(json.dumps(dict(acked_sets=acked_sets, acked_adds=acked_adds, failed_adds=failed_adds,
                      failures=failures, wait_timeouts=wait_timeouts,
                      longest_write=longest_write, longest_wait=longest_wait)))
"""


class EtcdMembersKilled(unittest.TestCase):
    def test_killing_a_member_then_the_leader_loses_no_acknowledged_write(self):
        cluster = harness.EtcdCluster(members=3)
        try:
            self.run_workload(cluster)
        finally:
            cluster.stop()

    def run_workload(self, cluster):
        workers, seconds = 4, 14
        servers = [etcd_server("faults", cluster, ["--backend-timeout", "20"]) for _ in range(2)]
        procs = [harness.python(WORKER, servers[i % 2].port, i, workers, seconds) for i in range(workers)]
        time.sleep(3)
        leader = cluster.leader()
        self.assertIsNotNone(leader, "no member says it leads")
        follower = next(i for i in range(3) if i != leader)
        cluster.kill(follower)
        time.sleep(3)
        cluster.kill(leader)  # one member of three left: no quorum
        time.sleep(2)
        cluster.start(follower)
        cluster.start(leader)
        results = [json.loads(harness.finish(p, timeout=120).strip().splitlines()[-1]) for p in procs]
        check = torch_client(servers[1].port)
        counter = int(check.get("counter"))
        acked = sum(r["acked_adds"] for r in results)
        failed = sum(r["failed_adds"] for r in results)
        self.assertGreater(acked, 0)
        self.assertTrue(acked <= counter <= acked + failed, (counter, acked, failed))
        keys = [f"w{i}-{n}" for i, r in enumerate(results) for n in r["acked_sets"]]
        values = [str(n).encode() for r in results for n in r["acked_sets"]]
        found = sum(check.multi_get(keys[j:j + 100]) == values[j:j + 100] for j in range(0, len(keys), 100))
        self.assertEqual(found, (len(keys) + 99) // 100, "every acknowledged set is there")
        longest_write = max(r["longest_write"] for r in results)
        longest_wait = max(r["longest_wait"] for r in results)
        self.assertLess(longest_write, 2 * 20 + 5, "a set and an add end within their timeouts")
        self.assertLess(longest_wait, 3 + 20, "a wait ends within its timeout plus one etcd request")
        print(f"\nfault test: {len(keys)} acknowledged sets all found; counter {counter} "
              f"= {acked} acknowledged adds (+{failed} failed); "
              f"{sum(r['failures'] for r in results)} failed calls, "
              f"{sum(r['wait_timeouts'] for r in results)} wait timeouts (3 s each); "
              f"longest set+add {longest_write:.2f} s, longest wait {longest_wait:.2f} s")
        for server in servers:
            server.stop()


if __name__ == "__main__":
    unittest.main()
