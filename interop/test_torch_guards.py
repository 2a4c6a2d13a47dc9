"""PyTorch's clients on guarded distcore servers: a default `distcore serve`
(loopback), one that requires a secret, and one that lets PyTorch's
clients in from the networks it is told."""
import datetime
import os
import tempfile
import unittest
import warnings

warnings.filterwarnings("ignore")
import torch.distributed as dist  # noqa: E402

import distcore  # noqa: E402
import harness  # noqa: E402

T = datetime.timedelta


def tearDownModule():
    harness.kill_all()


def torch_client(port):
    return dist.TCPStore("127.0.0.1", port, None, False, timeout=T(seconds=10))


class GuardedServers(unittest.TestCase):
    def setUp(self):
        fd, self.secret_path = tempfile.mkstemp(prefix="distcore-secret-")
        os.write(fd, b"a-long-shared-secret\n")
        os.close(fd)

    def tearDown(self):
        os.unlink(self.secret_path)

    def test_a_default_server_serves_pytorch_clients_on_loopback(self):
        server = harness.CliServer(host=None)
        try:
            self.assertIn("127.0.0.1:", server.banner)
            self.assertIn("loopback only", server.banner)
            store = torch_client(server.port)
            store.set("k", "v")
            self.assertEqual(store.get("k"), b"v")
            self.assertEqual(store.add("n", 2), 2)
            del store
        finally:
            server.stop()

    def test_pytorch_clients_need_an_unauthenticated_network_on_a_server_with_a_secret(self):
        server = harness.CliServer(args=["--secret-file", self.secret_path])
        try:
            store = torch_client(server.port)  # VALIDATE and PING are let through
            with self.assertRaises(Exception):
                store.set("k", "v")
                store.get("k")
            del store
            ours = distcore.TCPStore("127.0.0.1", server.port, secret="a-long-shared-secret",
                                     timeout=T(seconds=10))
            ours.set("k", "v")
            self.assertEqual(ours.get("k"), b"v")
            with self.assertRaises(distcore.DistPermissionError):
                distcore.TCPStore("127.0.0.1", server.port, timeout=T(seconds=10))
        finally:
            server.stop()
        server = harness.CliServer(args=["--secret-file", self.secret_path,
                                         "--allow-unauthenticated", "127.0.0.1/32"])
        try:
            store = torch_client(server.port)
            store.set("k", "v")
            self.assertEqual(store.get("k"), b"v")
            del store
        finally:
            server.stop()


if __name__ == "__main__":
    unittest.main()
