"""PyTorch's own clients on a distcore server that serves one job
(`distcore serve --one-job`, implied by --world-size; docs/liveness.md,
"PyTorch's clients"): when a member of a session group dies, a PyTorch
client blocked in a get raises at once (also on an etcd store's front-end
other than the member's) — its connection is closed, the one
way PyTorch's protocol allows — instead of after its timeout. Without
--one-job it waits its timeout out, as on PyTorch's own server."""
import datetime
import re
import subprocess
import sys
import threading
import time
import unittest
import warnings

warnings.filterwarnings("ignore")
import torch.distributed as dist  # noqa: E402

import harness  # noqa: E402

T = datetime.timedelta

# Rank 1 of group job/ in a process of its own, killed by the test.
MEMBER = """
import sys, datetime, distcore
store = distcore.TCPStore("127.0.0.1", int(sys.argv[1]), timeout=datetime.timedelta(seconds=60))
store.open_session("job/", 1, world_size=2)
print("ready", flush=True)
sys.stdin.read()
"""


def tearDownModule():
    harness.kill_all()


def until_waiting(port, timeout_s=30):
    """Returns once the server at `port` holds a blocked call (its
    `waiters` gauge, as `distcore inspect` shows it): a get started on a
    thread may take a while to reach it on a loaded machine."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        report = subprocess.run([harness.CLI, "inspect", f"127.0.0.1:{port}"], capture_output=True,
                                text=True, check=True).stdout
        if re.search(r"^\s*waiters\s+[1-9]", report, re.M):
            return
        time.sleep(0.05)
    raise AssertionError(f"no blocked call on the server within {timeout_s} s")


class PyTorchClientsOfOneJob(unittest.TestCase):
    def blocked_get_when_a_member_dies(self, args, timeout_s):
        """A PyTorch client's get, blocked when the member is killed: what
        it raised and how long after the kill."""
        server = harness.CliServer(args=args)
        try:
            return self.blocked_get(server.port, server.port, timeout_s)
        finally:
            server.stop()

    def blocked_get(self, member_port, client_port, timeout_s):
        """The member's session on the server at `member_port`, a PyTorch
        client's get blocked on the one at `client_port` (the same server,
        or another of one etcd store) when the member is killed: what the
        get raised and how long after the kill."""
        member = harness.track(subprocess.Popen([sys.executable, "-c", MEMBER, str(member_port)],
                                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        harness._read_line(member, "ready")
        client = dist.TCPStore("127.0.0.1", client_port, None, False, wait_for_workers=False,
                               timeout=T(seconds=timeout_s))
        outcome = {}

        def get():
            try:
                client.get("job/never-set")
            except Exception as e:  # noqa: BLE001 - what PyTorch raises is the point
                outcome["error"] = e
            outcome["done"] = time.monotonic()

        blocked = threading.Thread(target=get)
        blocked.start()
        until_waiting(client_port)
        killed = time.monotonic()
        member.kill()
        member.wait(30)
        blocked.join(timeout_s + 30)
        return outcome["error"], outcome["done"] - killed

    def test_a_blocked_pytorch_client_raises_at_once_when_a_member_dies(self):
        error, after = self.blocked_get_when_a_member_dies(["--one-job"], 60)
        self.assertIsInstance(error, dist.DistNetworkError, repr(error))
        self.assertLess(after, 5, f"{after:.2f} s after the kill: {error}")
        print(f"\nPyTorch raised {type(error).__name__} {after * 1000:.0f} ms after the kill: {error}")

    def test_on_etcd_a_member_lost_on_one_front_end_ends_a_pytorch_client_blocked_on_another(self):
        """Two `serve --backend etcd` front-ends of one store, the second
        serving one job: the member's session is on the first, the PyTorch
        client on the second; the failure, recorded in etcd, reaches it."""
        cluster = harness.EtcdCluster()
        servers = []
        try:
            url = cluster.url("liveness")
            servers = [harness.CliServer(backend=url), harness.CliServer(backend=url, args=["--one-job"])]
            error, after = self.blocked_get(servers[0].port, servers[1].port, 60)
        finally:
            for server in servers:
                server.stop()
            cluster.stop()
        self.assertIsInstance(error, dist.DistNetworkError, repr(error))
        self.assertLess(after, 5, f"{after:.2f} s after the kill: {error}")
        print(f"\nOn etcd, PyTorch raised {type(error).__name__} {after * 1000:.0f} ms after the kill")

    def test_without_one_job_it_waits_its_timeout(self):
        error, after = self.blocked_get_when_a_member_dies([], 3)
        self.assertIsInstance(error, dist.DistStoreError, repr(error))
        self.assertNotIsInstance(error, dist.DistNetworkError, repr(error))
        self.assertGreater(after, 2)


if __name__ == "__main__":
    unittest.main()
