"""torchrun --rdzv-backend distcore: real torchrun jobs (two agents of two
workers each) rendezvousing through a `distcore serve` that requires the
shared secret and TLS, and straight on etcd v3; torchrun finds the backend
through the package's entry point, with no patch to torch."""
import os
import pathlib
import re
import subprocess
import sys
import tempfile
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
