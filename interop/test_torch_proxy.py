"""`distcore proxy` with PyTorch's own clients: a server that requires the
shared secret and TLS (and lets nobody in without them) serves PyTorch's
TCPStore client through a proxy on loopback; the interop scenarios that
run PyTorch's client against `distcore serve`, a torchrun gloo job, a
dead server, and hostile local clients."""
import datetime
import os
import pathlib
import re
import socket
import struct
import subprocess
import tempfile
import threading
import time
import unittest
import warnings

warnings.filterwarnings("ignore")
import torch.distributed as dist  # noqa: E402

import distcore  # noqa: E402
import harness  # noqa: E402
from test_torch_interop import TorchClientsOnDistcoreServer, torch_client  # noqa: E402

T = datetime.timedelta
TLS = pathlib.Path(harness.ROOT) / "tests" / "tls"
SECRET = "the-job-secret-shared-by-every-proxy\n"


def tearDownModule():
    harness.kill_all()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class SecuredServerBehindProxy:
    """`distcore serve` requiring the secret and TLS from everyone, and a
    proxy in front of it: `port` is the proxy's."""

    def __init__(self, proxy_args=()):
        self.dir = tempfile.TemporaryDirectory()
        self.secret = os.path.join(self.dir.name, "secret")
        with open(self.secret, "w") as f:
            f.write(SECRET)
        self.server = harness.CliServer(args=["--secret-file", self.secret, "--tls-cert", str(TLS / "server.pem"),
                                              "--tls-key", str(TLS / "server.key")])
        self.proxy = harness.CliProxy(self.server.port, ["--secret-file", self.secret, "--tls-ca",
                                                         str(TLS / "ca.pem"), "--tls-server-name", "localhost",
                                                         *proxy_args])
        self.port = self.proxy.port

    def direct(self):
        """A distcore client of the server itself, with the secret and TLS."""
        return distcore.TCPStore("127.0.0.1", self.server.port, timeout=T(seconds=10),
                                 secret=SECRET.rstrip("\n").encode(), tls_ca=TLS / "ca.pem",
                                 tls_server_name="localhost")

    def until_a_wait_is_pending(self, timeout=30):
        """Returns once a client's blocking call has reached the server (its
        waiters, as `distcore inspect` shows them)."""
        command = [harness.CLI, "inspect", f"127.0.0.1:{self.server.port}", "--secret-file", self.secret,
                   "--tls-ca", str(TLS / "ca.pem"), "--tls-server-name", "localhost"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            shown = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            waiters = re.search(r"^\s+waiters\s+(\S+)$", shown, re.M)
            if waiters and float(waiters.group(1)) >= 1:
                return
            time.sleep(0.05)
        raise AssertionError("no wait reached the server")

    def stop(self):
        self.proxy.stop()
        self.server.stop()
        self.dir.cleanup()


class TorchClientsThroughProxy(TorchClientsOnDistcoreServer, unittest.TestCase):
    """Every scenario PyTorch's client runs against `distcore serve`, through
    the proxy to a server it could not reach itself."""

    def make_server(self):
        return SecuredServerBehindProxy()

    def test_the_server_itself_refuses_pytorchs_client(self):
        with self.assertRaises((dist.DistNetworkError, RuntimeError)):
            torch_client(self.server.server.port, timeout=T(seconds=3)).get("k")

    def test_large_values_both_ways(self):
        big = os.urandom(20 << 20)
        self.store.set("big", big)
        other = torch_client(self.server.port)
        self.assertEqual(other.get("big"), big)

    def test_a_refused_request_closes_only_its_connection(self):
        self.store.set("text", "not a number")
        other = torch_client(self.server.port)
        with self.assertRaises(dist.DistError):
            other.add("text", 1)
        self.assertEqual(self.store.get("text"), b"not a number")


class ProxyFaults(unittest.TestCase):
    def setUp(self):
        self.secured = SecuredServerBehindProxy(["--connect-timeout", "3"])

    def tearDown(self):
        if self.secured.server.proc.poll() is None:
            self.secured.stop()
        else:
            self.secured.proxy.stop()
            self.secured.dir.cleanup()

    def test_a_dead_server_fails_a_blocked_wait_at_once(self):
        store = torch_client(self.secured.port, timeout=T(seconds=60))
        store.set("up", "1")
        outcome = {}

        def waiter():
            start = time.monotonic()
            try:
                store.wait(["never"])
            except dist.DistError as e:
                outcome["error"] = e
            outcome["elapsed"] = time.monotonic() - start

        t = threading.Thread(target=waiter)
        t.start()
        self.secured.until_a_wait_is_pending()
        self.secured.server.kill()
        t.join(60)
        self.assertIsInstance(outcome.get("error"), dist.DistNetworkError)
        self.assertLess(outcome["elapsed"], 10, "the wait failed with its connection, not at its timeout")

    def test_a_server_that_is_not_there_closes_new_local_connections(self):
        self.secured.server.kill()
        with self.assertRaises((dist.DistNetworkError, RuntimeError)):
            torch_client(self.secured.port, timeout=T(seconds=20)).get("k")

    def test_garbage_and_oversized_requests_close_only_their_own_connection(self):
        store = torch_client(self.secured.port)
        store.set("k", "v")
        attacks = [
            b"\x7f" * 64,  # no such command
            b"\x80" + struct.pack("<Q", 1) + struct.pack("<Q", 1) + b"k",  # a distcore extension
            b"\x01" + struct.pack("<Q", 1) + b"k" + struct.pack("<Q", 1 << 40),  # a value of 1 TiB
        ]
        for attack in attacks:
            with socket.create_connection(("127.0.0.1", self.secured.port)) as s:
                s.settimeout(30)
                s.sendall(attack)
                self.assertEqual(s.recv(1), b"", f"{attack[:9]!r} closes its connection")
        self.assertEqual(store.get("k"), b"v")

    def test_a_client_that_never_reads_cannot_bloat_the_proxy(self):
        store = torch_client(self.secured.port)
        value = os.urandom(1 << 20)
        store.set("mib", value)
        before = rss_kib(self.secured.proxy.proc.pid)
        get = b"\x03" + struct.pack("<Q", 3) + b"mib"
        with socket.create_connection(("127.0.0.1", self.secured.port)) as hog:
            # 2,000 GETs of 1 MiB (2 GiB of replies), never read.
            hog.setblocking(False)
            sent = 0
            deadline = time.monotonic() + 10
            data = get * 2000
            while sent < len(data) and time.monotonic() < deadline:
                try:
                    sent += hog.send(data[sent:])
                except BlockingIOError:
                    time.sleep(0.01)
            # The proxy's size, sampled for 2 s while it relays what the bounds let it.
            grown = 0
            for _ in range(40):
                grown = max(grown, rss_kib(self.secured.proxy.proc.pid) - before)
                time.sleep(0.05)
            self.assertLess(grown, 32 << 10, f"the proxy grew by {grown} KiB for one client that never reads")
            # Everyone else is served meanwhile.
            start = time.monotonic()
            for _ in range(50):
                self.assertEqual(store.get("mib"), value)
            self.assertLess(time.monotonic() - start, 20)


class TorchrunThroughProxy(unittest.TestCase):
    def setUp(self):
        self.secured = SecuredServerBehindProxy()
        self.started = []

    def tearDown(self):
        for agent in self.started:
            if agent.poll() is None:
                agent.kill()
            agent.wait(timeout=30)
        self.secured.stop()

    def test_a_gloo_job_whose_store_is_reached_through_the_proxy(self):
        script = os.path.join(self.secured.dir.name, "train.py")
        with open(script, "w") as f:
            f.write(harness.TRAIN)
        # torchrun's own c10d backend, as a client (is_host=false) of the
        # proxy; its workers share the agents' store, so their gloo group
        # meets through the proxy too.
        lines = harness.torchrun_job("c10d", f"127.0.0.1:{self.secured.port}", "proxied", script, self.started,
                                     conf="is_host=false")
        self.assertEqual(lines, [f"worker rank={r} world=4 sum=10" for r in range(4)])
        with self.secured.direct() as direct:
            self.assertTrue(direct.list_keys(), "the job's keys are on the secured server")


if __name__ == "__main__":
    unittest.main()
