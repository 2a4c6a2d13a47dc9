"""torchrun --rdzv-backend distcore: real torchrun jobs (two agents of two
workers each) rendezvousing through a `distcore serve` that requires the
shared secret and TLS, and straight on etcd v3; torchrun finds the backend
through the package's entry point, with no patch to torch."""
import os
import pathlib
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import warnings

warnings.filterwarnings("ignore")
import harness  # noqa: E402

TLS = pathlib.Path(harness.ROOT) / "tests" / "tls"
ETCD = None

# Each worker: a gloo group over the whole job; prints its rank, the world
# size and the sum every rank contributed to.
TRAIN = r"""
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(f"worker rank={dist.get_rank()} world={dist.get_world_size()} sum={int(t.item())}", flush=True)
dist.barrier()
dist.destroy_process_group()
"""


# A longer job: STEPS all-reduces a quarter second apart, each printed;
# then "done" with the world size and torchrun's restart count.
STEPS = r"""
import os, sys, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
restart = os.environ["TORCHELASTIC_RESTART_COUNT"]
for step in range(int(sys.argv[1])):
    t = torch.ones(1)
    dist.all_reduce(t)
    print(f"step {step} rank={dist.get_rank()} world={dist.get_world_size()} restart={restart}", flush=True)
    time.sleep(0.25)
print(f"done rank={dist.get_rank()} world={dist.get_world_size()} restart={restart}", flush=True)
dist.destroy_process_group()
"""


def descendants(pid):
    """The processes descended from `pid` (torchrun starts its workers in
    sessions of their own, so a process group does not hold them)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def setUpModule():
    global ETCD
    ETCD = harness.EtcdCluster()


def tearDownModule():
    ETCD.stop()
    harness.kill_all()


class TorchrunJobs(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.script = os.path.join(self.dir.name, "train.py")
        with open(self.script, "w") as f:
            f.write(TRAIN)

    def tearDown(self):
        self.dir.cleanup()

    def agents(self, endpoint, run_id, env=None, conf=None, nodes=2, per_node=2):
        """`nodes` torchrun agents of `per_node` workers each on `endpoint`:
        what their workers printed."""
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node",
                   str(per_node), "--rdzv-backend", "distcore", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
                   "--local-addr", "127.0.0.1", "--max-restarts", "0", "--monitor-interval", "0.5"]
        if conf:
            command += ["--rdzv-conf", conf]
        environment = dict(os.environ, LD_PRELOAD=harness.numeric_names(), GLOO_SOCKET_IFNAME="lo",
                           **(env or {}))
        procs = [harness.track(subprocess.Popen(command + [self.script], stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, text=True, env=environment))
                 for _ in range(nodes)]
        lines = []
        for proc in procs:
            # The workers of an agent share its output: their lines may interleave.
            lines += re.findall(r"worker rank=\d+ world=\d+ sum=\d+", harness.finish(proc, timeout=300))
        return sorted(lines)

    def agent(self, endpoint, run_id, nnodes, steps, restarts):
        """One torchrun agent of one worker running STEPS."""
        script = os.path.join(self.dir.name, "steps.py")
        with open(script, "w") as f:
            f.write(STEPS)
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", nnodes, "--nproc-per-node", "1",
                   "--rdzv-backend", "distcore", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
                   "--rdzv-conf", "last_call_timeout=1,join_timeout=120", "--local-addr", "127.0.0.1",
                   "--max-restarts", str(restarts), "--monitor-interval", "0.5", script, str(steps)]
        environment = dict(os.environ, LD_PRELOAD=harness.numeric_names(), GLOO_SOCKET_IFNAME="lo")
        return harness.track(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                              env=environment))

    @staticmethod
    def read_until(proc, pattern, timeout=240):
        """Lines of `proc` until one matches `pattern` (that line's match)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if ready:
                line = proc.stdout.readline()
                if not line:
                    raise AssertionError(f"the agent exited before {pattern!r}: {proc.stderr.read()[-3000:]}")
                found = re.search(pattern, line)
                if found:
                    return found
        raise AssertionError(f"no {pattern!r} within {timeout} s")

    def test_an_agent_killed_mid_run_and_the_job_rendezvouses_again_with_the_survivor(self):
        server = harness.CliServer()
        try:
            endpoint = f"127.0.0.1:{server.port}"
            survivor = self.agent(endpoint, "killed", "1:2", 40, restarts=3)
            doomed = self.agent(endpoint, "killed", "1:2", 40, restarts=3)
            self.read_until(survivor, r"step 2 rank=\d world=2 restart=0")
            for pid in [doomed.pid, *descendants(doomed.pid)]:  # the node: its agent and its worker
                os.kill(pid, signal.SIGKILL)
            doomed.wait(timeout=30)
            done = self.read_until(survivor, r"done rank=0 world=(\d) restart=(\d)")
            self.assertEqual(done.group(1), "1", "the survivor's job went on alone")
            self.assertGreaterEqual(int(done.group(2)), 1, "after a restart")
            self.assertEqual(survivor.wait(timeout=120), 0)
        finally:
            server.stop()

    def test_a_third_agent_joining_scales_the_job_up(self):
        server = harness.CliServer()
        try:
            endpoint = f"127.0.0.1:{server.port}"
            first = [self.agent(endpoint, "grow", "2:3", 60, restarts=3) for _ in range(2)]
            self.read_until(first[0], r"step 2 rank=\d world=2 restart=0")
            third = self.agent(endpoint, "grow", "2:3", 60, restarts=3)
            for agent in [*first, third]:
                done = self.read_until(agent, r"done rank=\d world=(\d) restart=(\d)")
                self.assertEqual(done.group(1), "3", "every agent ends in the grown job")
            for agent in [*first, third]:
                self.assertEqual(agent.wait(timeout=120), 0)
        finally:
            server.stop()

    def expected(self, world):
        total = world * (world + 1) // 2
        return sorted(f"worker rank={r} world={world} sum={total}" for r in range(world))

    def test_a_job_rendezvouses_through_a_server_that_requires_the_secret_and_tls(self):
        secret = os.path.join(self.dir.name, "secret")
        with open(secret, "w") as f:
            f.write("the-job-secret-shared-by-every-agent\n")
        server = harness.CliServer(args=["--secret-file", secret, "--tls-cert", str(TLS / "server.pem"),
                                         "--tls-key", str(TLS / "server.key")])
        try:
            conf = f"tls_ca={TLS / 'ca.pem'},tls_server_name=localhost"
            lines = self.agents(f"127.0.0.1:{server.port}", "secured", env={"DISTCORE_SECRET_FILE": secret},
                                conf=conf)
            self.assertEqual(lines, self.expected(4))
        finally:
            server.stop()

    def test_an_agent_without_the_secret_is_refused(self):
        secret = os.path.join(self.dir.name, "secret")
        with open(secret, "w") as f:
            f.write("the-job-secret-shared-by-every-agent\n")
        server = harness.CliServer(args=["--secret-file", secret])
        try:
            with self.assertRaises(AssertionError) as failed:
                self.agents(f"127.0.0.1:{server.port}", "refused", nodes=1, per_node=1)
            self.assertIn("secret", str(failed.exception))
        finally:
            server.stop()

    def test_a_job_rendezvouses_straight_on_etcd_v3(self):
        lines = self.agents(f"etcd://{','.join(ETCD.endpoints)}/torchrun-test", "on-etcd")
        self.assertEqual(lines, self.expected(4))


if __name__ == "__main__":
    unittest.main()
