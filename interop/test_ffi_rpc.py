"""RPC and RRefs from Python through ctypes: worker processes on loopback
meeting through a distcore TCPStore, every fork flow, a killed worker."""
import os
import signal
import subprocess
import sys
import time
import unittest

import distcore_ctypes as dc

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(port, rank, world, mode):
    return subprocess.Popen([sys.executable, os.path.join(HERE, "rpc_worker.py"), str(port), str(rank),
                             str(world), mode], stdout=subprocess.PIPE, text=True)


def echo(args, rrefs):
    return args


def fetch(args, rrefs):
    return rrefs[0].to_here()


class RpcGroup(unittest.TestCase):
    def setUp(self):
        self.api = dc.Api()
        self.server = dc.Store.tcp(self.api, 0, is_server=True)
        self.procs = []

    def tearDown(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(30)
            p.stdout.close()

    def join(self, world, modes):
        self.procs = [worker(self.server.port, r, world, m) for r, m in enumerate(modes, start=1)]
        store = dc.Store.tcp(self.api, self.server.port)
        return dc.Rpc(self.api, store, "py0", 0, world, {"echo": echo, "fetch": fetch})

    def wait_zero(self, rpc):
        deadline = time.monotonic() + 30
        while rpc.debug_info() != (0, 0, 0, 0):
            self.assertLess(time.monotonic(), deadline, rpc.debug_info())
            time.sleep(0.01)

    def test_every_flow_across_processes(self):
        rpc = self.join(3, ["serve", "serve"])
        self.assertEqual(rpc.sync("py1", "echo", b"hi"), b"hi")
        with self.assertRaises(dc.DistcoreError) as e:
            rpc.sync("py2", "fail")
        self.assertEqual((e.exception.status, e.exception.message), (dc.REMOTE, "python function failed"))
        user = rpc.remote("py1", "echo", b"on py1")
        self.assertFalse(user.is_owner())
        self.assertEqual(user.to_here(), b"on py1")
        self.assertEqual(rpc.sync("py2", "fetch", rrefs=[user]), b"on py1")  # user -> third
        self.assertEqual(rpc.sync("py1", "fetch", rrefs=[user]), b"on py1")  # back to the owner
        mine = rpc.rref(b"on py0")
        self.assertEqual(rpc.sync("py2", "fetch", rrefs=[mine]), b"on py0")  # owner shares
        self.assertEqual(rpc.sync("py0", "fetch", rrefs=[mine]), b"on py0")  # owner to itself
        for r in (user, mine):
            r.close()
        rpc.shutdown(True, 30000)
        self.wait_zero(rpc)
        for p in self.procs:
            out, _ = p.communicate(timeout=60)
            self.assertEqual(p.returncode, 0)
            self.assertIn("settled (0, 0, 0, 0)", out)
        rpc.close()

    def test_a_killed_worker_fails_its_calls_and_the_others_shut_down(self):
        rpc = self.join(3, ["serve", "hold"])
        doomed = self.procs[1]
        self.assertEqual(doomed.stdout.readline().strip(), "holding")
        owned_by_doomed = rpc.remote("py2", "echo", b"lost with py2")
        self.assertEqual(owned_by_doomed.to_here(), b"lost with py2")
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(30)
        with self.assertRaises(dc.DistcoreError) as e:
            rpc.sync("py2", "echo", b"anyone?", timeout_ms=5000)
        self.assertEqual(e.exception.status, dc.NETWORK)
        with self.assertRaises(dc.DistcoreError) as e:
            owned_by_doomed.to_here(timeout_ms=5000)
        self.assertEqual(e.exception.status, dc.NETWORK)
        self.assertEqual(rpc.sync("py1", "echo", b"alive"), b"alive")
        owned_by_doomed.close()
        # The survivors stop without waiting for the dead worker.
        rpc.shutdown(False)
        self.procs[0].kill()
        rpc.close()


if __name__ == "__main__":
    unittest.main()
