"""distcore's client against PyTorch's own TCPStore server (libuv) when the
server stops answering: frozen with SIGSTOP, or cut off by a partition (a
network namespace behind a veth pair whose traffic iptables drops, created
and removed here). Every operation ends within its timeout plus the
documented slack, and the same handle works again once the server does.
The partition needs root, iproute2 and iptables: without them the test
fails saying so (it never passes silently)."""
import datetime
import os
import signal
import subprocess
import sys
import threading
import time
import unittest

import distcore
import harness

TIMEOUT_MS = 3000
# The cancel grace (0.5 s) and scheduling on a busy machine.
SLACK_S = 1.5


SERVER = """
import sys, datetime, torch.distributed as dist
s = dist.TCPStore(sys.argv[1], 0, None, True, wait_for_workers=False, use_libuv=True,
                  timeout=datetime.timedelta(seconds=60))
print("port", s.port, flush=True)
sys.stdin.read()
"""


def torch_server(host, prefix=()):
    env = dict(os.environ, LD_PRELOAD=harness.numeric_names())
    proc = harness.track(subprocess.Popen([*prefix, sys.executable, "-c", SERVER, host], env=env,
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    return proc, int(harness._read_line(proc, "port").split()[1])


def run(*args):
    subprocess.run(args, check=True, capture_output=True, text=True)


class Netns:
    """A network namespace with a veth pair to this one."""

    def __init__(self):
        pid = os.getpid()
        self.name = f"dctorch{pid}"
        net = f"10.232.{pid % 250}"
        self.inside = f"{net}.2"
        outer, inner = f"dct{pid}a", f"dct{pid}b"
        run("ip", "netns", "add", self.name)
        try:
            run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            run("ip", "link", "set", inner, "netns", self.name)
            run("ip", "addr", "add", f"{net}.1/30", "dev", outer)
            run("ip", "link", "set", outer, "up")
            self.exec("ip", "addr", "add", f"{net}.2/30", "dev", inner)
            self.exec("ip", "link", "set", inner, "up")
            self.exec("ip", "link", "set", "lo", "up")
        except Exception:
            self.remove()
            raise

    def exec(self, *args):
        run("ip", "netns", "exec", self.name, *args)

    def partition(self, cut):
        self.exec("iptables", "-A" if cut else "-D", "INPUT", "-j", "DROP")

    def remove(self):
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def client(port, host="127.0.0.1"):
    return distcore.TCPStore(host, port, timeout=datetime.timedelta(milliseconds=TIMEOUT_MS))


class FaultsAgainstPyTorchServer(unittest.TestCase):
    def tearDown(self):
        harness.kill_all()

    def ends_in_time(self, what, op):
        start = time.monotonic()
        with self.assertRaises((distcore.DistTimeoutError, distcore.DistNetworkError), msg=what) as caught:
            op()
        took = time.monotonic() - start
        print(f"{what}: {took:.2f} s -> {type(caught.exception).__name__}: {caught.exception}", flush=True)
        self.assertLessEqual(took, TIMEOUT_MS / 1000 + SLACK_S, what)

    def test_a_frozen_pytorch_server_holds_no_operation_past_its_timeout(self):
        proc, port = torch_server("127.0.0.1")
        store = client(port)
        store.set("k", b"v")
        proc.send_signal(signal.SIGSTOP)
        try:
            self.ends_in_time("get", lambda: store.get("missing"))
            self.ends_in_time("wait", lambda: store.wait(["missing"]))
            self.ends_in_time("add", lambda: store.add("n", 1))

            def sets_until_blocked():
                # PyTorch's limit is 8 MiB a value: fill the socket buffers.
                for _ in range(8):
                    store.set("big", b"x" * (7 << 20))
            self.ends_in_time("7 MiB sets", sets_until_blocked)
        finally:
            proc.send_signal(signal.SIGCONT)
        store.set("after", b"1")
        self.assertEqual(store.get("after"), b"1")
        self.assertEqual(store.get("k"), b"v")

    def test_a_partition_is_timed_out_on_time_and_the_handle_works_after_it_heals(self):
        try:
            netns = Netns()
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", "") or e
            self.fail("network namespaces are unavailable here, so the partition test cannot run "
                      f"(it needs root, iproute2 and iptables): {detail}")
        try:
            proc, port = torch_server(netns.inside, ("ip", "netns", "exec", netns.name))
            store = client(port, netns.inside)
            store.set("k", b"v")
            spanning = {}

            def wait_across():
                try:
                    store.wait(["spanning"], datetime.timedelta(seconds=30))
                    spanning["ok"] = True
                except distcore.DistError as e:
                    spanning["error"] = e
            waiter = threading.Thread(target=wait_across)
            waiter.start()
            time.sleep(0.3)
            netns.partition(True)
            try:
                self.ends_in_time("get during the partition", lambda: store.get("missing"))
                self.ends_in_time("add during the partition", lambda: store.add("n", 1))
            finally:
                netns.partition(False)
            store.set("after", b"1")
            self.assertEqual(store.get("after"), b"1")
            self.assertEqual(store.get("k"), b"v")
            store.set("spanning", b"1")
            waiter.join(60)
            self.assertEqual(spanning, {"ok": True})
            store.close()
        finally:
            harness.kill_all()
            netns.remove()


if __name__ == "__main__":
    unittest.main()
