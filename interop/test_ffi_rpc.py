"""RPC and RRefs from Python through the distcore package: worker processes
on loopback meeting through a distcore TCPStore, every fork flow, a killed
worker."""
import os
import signal
import subprocess
import sys
import time
import unittest

import distcore
from distcore import Status, rpc

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(port, rank, world, mode):
    return subprocess.Popen([sys.executable, os.path.join(HERE, "rpc_worker.py"), str(port), str(rank),
                             str(world), mode], stdout=subprocess.PIPE, text=True)


def echo(args, rrefs, caller_id):
    return args


def fetch(args, rrefs, caller_id):
    return rrefs[0].to_here()


class RpcGroup(unittest.TestCase):
    def setUp(self):
        self.server = distcore.TCPStore("127.0.0.1", 0, is_master=True)
        self.procs = []

    def tearDown(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(30)
            p.stdout.close()
        self.server.close()

    def join(self, world, modes):
        self.procs = [worker(self.server.port, r, world, m) for r, m in enumerate(modes, start=1)]
        store = distcore.TCPStore("127.0.0.1", self.server.port)
        return rpc.RpcAgent("py0", 0, world, store, {"echo": echo, "fetch": fetch}, rpc_timeout=30)

    def wait_zero(self, agent):
        deadline = time.monotonic() + 30
        while tuple(agent.get_debug_info().values()) != (0, 0, 0, 0):
            self.assertLess(time.monotonic(), deadline, agent.get_debug_info())
            time.sleep(0.01)

    def test_every_flow_across_processes(self):
        agent = self.join(3, ["serve", "serve"])
        self.assertEqual(agent.rpc_sync("py1", "echo", b"hi"), b"hi")
        with self.assertRaises(distcore.DistRemoteError) as e:
            agent.rpc_sync("py2", "fail")
        self.assertEqual((e.exception.status, str(e.exception)), (Status.REMOTE, "python function failed"))
        user = agent.remote("py1", "echo", b"on py1")
        self.assertFalse(user.is_owner())
        self.assertEqual(user.owner(), rpc.WorkerInfo("py1", 1))
        self.assertEqual(user.to_here(), b"on py1")
        self.assertEqual(agent.rpc_sync("py2", "fetch", rrefs=[user]), b"on py1")  # user -> third
        self.assertEqual(agent.rpc_sync("py1", "fetch", rrefs=[user]), b"on py1")  # back to the owner
        mine = agent.rref(b"on py0")
        self.assertEqual(agent.rpc_sync("py2", "fetch", rrefs=[mine]), b"on py0")  # owner shares
        self.assertEqual(agent.rpc_sync("py0", "fetch", rrefs=[mine]), b"on py0")  # owner to itself
        self.assertEqual(agent.rpc_async("py2", "echo", b"async").wait(), b"async")
        for r in (user, mine):
            r.close()
        agent.shutdown(True, 30)
        self.wait_zero(agent)
        for p in self.procs:
            out, _ = p.communicate(timeout=60)
            self.assertEqual(p.returncode, 0)
            self.assertIn("settled (0, 0, 0, 0)", out)
        agent.close()

    def test_a_killed_worker_fails_its_calls_and_the_others_shut_down(self):
        agent = self.join(3, ["serve", "hold"])
        doomed = self.procs[1]
        self.assertEqual(doomed.stdout.readline().strip(), "holding")
        owned_by_doomed = agent.remote("py2", "echo", b"lost with py2")
        self.assertEqual(owned_by_doomed.to_here(), b"lost with py2")
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(30)
        with self.assertRaisesRegex(distcore.DistPeerError, "RPC worker 'py2' .* failed: connection lost"):
            agent.rpc_sync("py2", "echo", b"anyone?", timeout=5)
        with self.assertRaisesRegex(distcore.DistPeerError, "RPC worker 'py2'"):
            owned_by_doomed.to_here(timeout=5)
        self.assertEqual(agent.rpc_sync("py1", "echo", b"alive"), b"alive")
        owned_by_doomed.close()
        # The survivors stop without waiting for the dead worker.
        agent.shutdown(False)
        self.procs[0].kill()
        agent.close()


if __name__ == "__main__":
    unittest.main()
