"""torchrun --rdzv-backend distcore: real torchrun jobs (two agents of two
workers each) rendezvousing through a `distcore serve` that requires the
shared secret and TLS, and straight on etcd v3; torchrun finds the backend
through the package's entry point, with no patch to torch."""
import os
import pathlib
import re
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import warnings

warnings.filterwarnings("ignore")
import harness  # noqa: E402

TLS = pathlib.Path(harness.ROOT) / "tests" / "tls"
ETCD = None

# A job that runs until the test says stop: all-reduces a tenth of a
# second apart (the first of each start printed) until rank 0 finds the
# file argv[1] (all ranks stop at the same step: rank 0's finding is
# all-reduced); then "done" with the world size and torchrun's restart
# count.
STEPS = r"""
import os, sys, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
restart = os.environ["TORCHELASTIC_RESTART_COUNT"]
rank, world = dist.get_rank(), dist.get_world_size()
step = 0
while True:
    stop = torch.tensor([1.0 if rank == 0 and os.path.exists(sys.argv[1]) else 0.0])
    dist.all_reduce(stop)
    if step == 0:  # once a start: the test reads it; more could fill the pipe
        print(f"step {step} rank={rank} world={world} restart={restart}", flush=True)
    if stop.item() > 0:
        break
    step += 1
    time.sleep(0.1)
print(f"done rank={rank} world={world} restart={restart}", flush=True)
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


def forward_lines(proc):
    """Puts each line `proc` writes on `proc.lines`, then None."""
    for line in proc.stdout:
        proc.lines.put(line)
    proc.lines.put(None)


def setUpModule():
    global ETCD
    ETCD = harness.EtcdCluster()


def tearDownModule():
    ETCD.stop()
    harness.kill_all()


class TorchrunJobs(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.started = []
        self.script = os.path.join(self.dir.name, "train.py")
        with open(self.script, "w") as f:
            f.write(harness.TRAIN)

    def tearDown(self):
        # Agents a failed test left, and their workers (in sessions of their
        # own, which killing an agent does not end), killed by PID.
        for agent in self.started:
            for pid in [*descendants(agent.pid), agent.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            agent.wait(timeout=30)
        self.dir.cleanup()

    def agents(self, endpoint, run_id, env=None, conf=None, nodes=2, per_node=2):
        """`nodes` torchrun agents of `per_node` workers each on `endpoint`:
        what their workers printed."""
        return harness.torchrun_job("distcore", endpoint, run_id, self.script, self.started, env=env, conf=conf,
                                    nodes=nodes, per_node=per_node)

    def agent(self, endpoint, run_id, nnodes, restarts=3):
        """One torchrun agent of one worker running STEPS until
        :meth:`stop` (its log in the test's directory)."""
        script = os.path.join(self.dir.name, "steps.py")
        with open(script, "w") as f:
            f.write(STEPS)
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", nnodes, "--nproc-per-node", "1",
                   "--rdzv-backend", "distcore", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
                   "--rdzv-conf", "last_call_timeout=1,join_timeout=120", "--local-addr", "127.0.0.1",
                   "--max-restarts", str(restarts), "--monitor-interval", "0.5", script, self.stop_file()]
        environment = dict(os.environ, LD_PRELOAD=harness.numeric_names(), GLOO_SOCKET_IFNAME="lo")
        log = tempfile.NamedTemporaryFile("w+", dir=self.dir.name, suffix=".log", delete=False)
        proc = harness.track(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True,
                                              env=environment))
        proc.log = log.name
        log.close()
        # Its lines, as they come (None: it closed its output), read by a
        # thread: a select() on the pipe misses lines already buffered.
        proc.lines = queue.Queue()
        threading.Thread(target=forward_lines, args=(proc,), daemon=True).start()
        self.started.append(proc)
        return proc

    def stop_file(self):
        return os.path.join(self.dir.name, "stop")

    def stop(self):
        """Every STEPS job stops at its next step."""
        with open(self.stop_file(), "w"):
            pass

    @staticmethod
    def read_until(proc, pattern, timeout=240):
        """Lines of `proc` until one matches `pattern` (that line's match)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = proc.lines.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                raise AssertionError(f"no {pattern!r} within {timeout} s") from None
            if line is None:
                with open(proc.log) as log:
                    raise AssertionError(f"the agent exited before {pattern!r}: {log.read()[-3000:]}")
            found = re.search(pattern, line)
            if found:
                return found

    def test_an_agent_killed_mid_run_and_the_job_rendezvouses_again_with_the_survivor(self):
        server = harness.CliServer()
        try:
            endpoint = f"127.0.0.1:{server.port}"
            survivor = self.agent(endpoint, "killed", "1:2")
            doomed = self.agent(endpoint, "killed", "1:2")
            # Both in the job (after a restart, if one agent came up more
            # than the last call's second after the other).
            before = int(self.read_until(survivor, r"step \d+ rank=\d world=2 restart=(\d)").group(1))
            for pid in [doomed.pid, *descendants(doomed.pid)]:  # the node: its agent and its worker
                os.kill(pid, signal.SIGKILL)
            doomed.wait(timeout=30)
            alone = self.read_until(survivor, r"step \d+ rank=0 world=1 restart=(\d)")
            self.assertGreater(int(alone.group(1)), before, "the survivor went on alone after a restart")
            self.stop()
            self.read_until(survivor, r"done rank=0 world=1 ")
            self.assertEqual(survivor.wait(timeout=120), 0)
        finally:
            server.stop()

    def test_a_third_agent_joining_scales_the_job_up(self):
        server = harness.CliServer()
        try:
            endpoint = f"127.0.0.1:{server.port}"
            first = [self.agent(endpoint, "grow", "2:3") for _ in range(2)]
            self.read_until(first[0], r"step \d+ rank=\d world=2 ")
            third = self.agent(endpoint, "grow", "2:3")
            for agent in [*first, third]:
                self.read_until(agent, r"step \d+ rank=\d world=3 ")
            self.stop()
            for agent in [*first, third]:
                self.read_until(agent, r"done rank=\d world=3 ")
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
