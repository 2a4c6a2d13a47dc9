"""Processes for the interop tests: distcore servers (embedded in a C
program, or `distcore serve`), PyTorch servers, and Python worker processes.
Everything listens on 127.0.0.1 with ephemeral ports and is killed at the end."""
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = os.environ.get("DISTCORE_PREFIX", os.path.join(ROOT, "build", "prefix"))
C_SERVER = os.environ.get("DISTCORE_C_SERVER", os.path.join(ROOT, "build", "c-tests", "tcp_server_main"))
CLI = os.path.join(PREFIX, "bin", "distcore")
HERE = os.path.dirname(os.path.abspath(__file__))

_children = []


def track(proc):
    _children.append(proc)
    return proc


def kill_all():
    while _children:
        p = _children.pop()
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)
        for stream in (p.stdin, p.stdout, p.stderr):
            if stream:
                stream.close()


def _read_line(proc, prefix, timeout=60):
    """The first line of `proc`'s output starting with `prefix`; an error
    once `timeout` s have passed, even if the process prints nothing: each
    line is read on a helper thread waited for only as long as the time
    left (one left blocked ends when the caller kills the process)."""
    deadline = time.monotonic() + timeout
    while True:
        got = []
        reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(max(0.0, deadline - time.monotonic()))
        if not got:
            raise RuntimeError(f"no {prefix!r} within {timeout}s: {proc.args}")
        if not got[0]:
            raise RuntimeError(f"process exited before printing {prefix!r}: {proc.args}")
        if got[0].startswith(prefix):
            return got[0].strip()


class CServer:
    """A TCPStore server embedded in a C program (c-tests/tcp_server_main.c)."""

    def __init__(self, world_size=None):
        args = [C_SERVER] + ([str(world_size)] if world_size else [])
        self.proc = track(subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        self.port = int(_read_line(self.proc, "port").split()[1])

    def wait_joined(self, timeout=60):
        _read_line(self.proc, "joined", timeout)

    def stats(self):
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        fields = _read_line(self.proc, "stats").split()[1:]
        return {k: int(v) for k, v in (f.split("=") for f in fields)}

    def stop(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


class CliServer:
    """`distcore serve` on an ephemeral loopback port (or `port`: a server
    replacing one on its port); `backend`: its --backend (an etcd:// URL),
    with `args` more options; `host` None: its default."""

    def __init__(self, backend=None, args=(), host="127.0.0.1", port=0):
        command = [CLI, "serve", "--port", str(port), *args]
        if host is not None:
            command += ["--host", host]
        if backend:
            command += ["--backend", backend]
        self.proc = track(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
        line = _read_line(self.proc, "distcore TCPStore server listening on")
        self.port = int(line.split()[5].rsplit(":", 1)[1])
        self.banner = line

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=30) == 0
        self.proc.stdout.close()

    def kill(self):
        self.proc.kill()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


class CliProxy:
    """`distcore proxy` on an ephemeral loopback port, relaying to the
    `distcore serve` at `upstream_port` with `args` (its secret, TLS)."""

    def __init__(self, upstream_port, args=()):
        command = [CLI, "proxy", "--port", "0", "--upstream", f"127.0.0.1:{upstream_port}", *args]
        self.proc = track(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
        line = _read_line(self.proc, "distcore proxy listening on")
        self.port = int(line.split()[4].rsplit(":", 1)[1])

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=30) == 0
        self.proc.stdout.close()


# A torchrun job's worker: a gloo group over the whole job; prints its
# rank, the world size and the sum every rank contributed to.
TRAIN = r"""
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(f"worker rank={dist.get_rank()} world={dist.get_world_size()} sum={int(t.item())}", flush=True)
dist.barrier()
dist.destroy_process_group()
"""


def torchrun_job(backend, endpoint, run_id, script, started, env=None, conf=None, nodes=2, per_node=2):
    """`nodes` torchrun agents of `per_node` workers each running `script`
    (TRAIN) with rendezvous `backend` on `endpoint`, no restarts: what their
    workers printed, sorted. Each agent is added to `started` (the caller
    kills what is left of them)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node",
               str(per_node), "--rdzv-backend", backend, "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
               "--local-addr", "127.0.0.1", "--max-restarts", "0", "--monitor-interval", "0.5"]
    if conf:
        command += ["--rdzv-conf", conf]
    environment = dict(os.environ, LD_PRELOAD=numeric_names(), GLOO_SOCKET_IFNAME="lo", **(env or {}))
    procs = [track(subprocess.Popen(command + [script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=environment))
             for _ in range(nodes)]
    started += procs
    lines = []
    for proc in procs:
        # The workers of an agent share its output: their lines may interleave.
        lines += re.findall(r"worker rank=\d+ world=\d+ sum=\d+", finish(proc, timeout=300))
    return sorted(lines)


def numeric_names():
    """benches/numeric_names.c built once per process, for LD_PRELOAD in
    processes that run PyTorch: it reverse-resolves every peer address, and
    this sandbox's DNS never answers."""
    global _numeric_names
    if _numeric_names is None:
        out = os.path.join(tempfile.mkdtemp(prefix="dc-interop-"), "numeric_names.so")
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", out,
                        os.path.join(ROOT, "benches", "numeric_names.c"), "-ldl"], check=True)
        _numeric_names = out
    return _numeric_names


_numeric_names = None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdCluster:
    """etcd members (`etcd` from the Debian package etcd-server) on loopback
    ports, in a temporary directory; `extra`: more etcd flags (--enable-v2)."""

    def __init__(self, members=1, extra=()):
        binary = shutil.which("etcd")
        assert binary, "etcd must be installed (apt-get install etcd-server)"
        self.binary, self.extra = binary, list(extra)
        self.names = [f"m{i}" for i in range(members)]
        # A port free_port() found may be taken before etcd binds it (by
        # any connection's ephemeral port): then again, on other ports.
        for attempt in range(3):
            self.dir = tempfile.mkdtemp(prefix="distcore-etcd-")
            self.clients = [free_port() for _ in self.names]
            self.peers = [free_port() for _ in self.names]
            self.procs = [None] * members
            try:
                for i in range(members):
                    self.start(i, "new")
                self.wait_ready()
                return
            except BaseException:
                exited = any(p is not None and p.poll() is not None for p in self.procs)
                self.stop()
                if not exited or attempt == 2:
                    raise

    @property
    def endpoints(self):
        return [f"127.0.0.1:{port}" for port in self.clients]

    def url(self, prefix, first=0):
        """The etcd:// URL of every member, member `first` listed first,
        with `prefix`."""
        endpoints = self.endpoints[first:] + self.endpoints[:first]
        return "etcd://" + ",".join(endpoints) + "/" + prefix.lstrip("/")

    def start(self, i, state="existing"):
        client, peer = f"http://127.0.0.1:{self.clients[i]}", f"http://127.0.0.1:{self.peers[i]}"
        cluster = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(self.names, self.peers))
        self.procs[i] = track(subprocess.Popen(
            [self.binary, "--name", self.names[i], "--data-dir", os.path.join(self.dir, self.names[i]),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", cluster, "--initial-cluster-state", state, *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def kill(self, i):
        self.procs[i].kill()
        self.procs[i].wait(timeout=30)

    def pause(self, i):
        """Freezes member `i` (SIGSTOP): silent, its connections open."""
        self.procs[i].send_signal(signal.SIGSTOP)

    def resume(self, i):
        self.procs[i].send_signal(signal.SIGCONT)

    def _post(self, path, body, timeout=10):
        """POSTs `body` (JSON) to etcd's HTTP gateway on the first member
        that answers; its JSON answer."""
        import urllib.request
        for endpoint in self.endpoints:
            try:
                with urllib.request.urlopen(f"http://{endpoint}{path}", data=json.dumps(body).encode(),
                                            timeout=timeout) as r:
                    return json.load(r)
            except OSError:
                continue
        raise RuntimeError(f"no etcd member answered {path}")

    def transactions(self):
        """Transactions the members have seen, summed (etcd_mvcc_txn_total:
        a write is seen by every member, a read by the one asked)."""
        import urllib.request
        total = 0
        for endpoint in self.endpoints:
            with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("etcd_mvcc_txn_total "):
                        total += int(float(line.split()[1]))
        return total

    def history(self, prefix, last_key):
        """Every change under `prefix` since the cluster began, in revision
        order, up to and including the latest change of `last_key` (bytes):
        dicts with `type` ("PUT" or "DELETE"), `key` and `value` (bytes),
        `revision` and `created` (the key's creation revision). Read with
        a watch from revision 1 (etcd here never compacts)."""
        import http.client
        b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
        start = prefix.encode()
        end = start[:-1] + bytes([start[-1] + 1])
        got = self._post("/v3/kv/range", {"key": b64(last_key)})
        target = int(got["kvs"][0]["mod_revision"])
        for endpoint in self.endpoints:
            host, port = endpoint.rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            try:
                conn.request("POST", "/v3/watch", json.dumps({"create_request": {
                    "key": b64(start), "range_end": b64(end), "start_revision": 1}}))
                response = conn.getresponse()
                events = []
                while not events or events[-1]["revision"] < target:
                    line = response.readline()
                    if not line:
                        raise RuntimeError("the watch ended early")
                    for e in json.loads(line)["result"].get("events", []):
                        kv = e["kv"]
                        events.append(dict(type=e.get("type", "PUT"), key=base64.b64decode(kv["key"]),
                                           value=base64.b64decode(kv.get("value", "")),
                                           revision=int(kv["mod_revision"]),
                                           created=int(kv.get("create_revision", 0))))
                return events
            except OSError:
                continue
            finally:
                conn.close()
        raise RuntimeError("no etcd member answered the watch")

    def leader(self):
        """The index of the member that leads (asked of every member)."""
        import json
        import urllib.request
        for port in self.clients:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v3/maintenance/status",
                                            data=b"{}", timeout=2) as r:
                    status = json.load(r)
                member, leader = status["header"]["member_id"], status["leader"]
                if member == leader:
                    return self.clients.index(port)
            except OSError:
                continue
        return None

    def wait_ready(self, timeout=30):
        import urllib.request
        deadline = time.monotonic() + timeout
        while True:
            if any(p is not None and p.poll() is not None for p in self.procs):
                raise RuntimeError("an etcd member exited while starting")
            try:
                with urllib.request.urlopen(f"http://{self.endpoints[0]}/v3/kv/range",
                                            data=b'{"key":"AA=="}', timeout=2):
                    return
            except OSError:
                assert time.monotonic() < deadline, f"etcd did not start within {timeout} s"
                time.sleep(0.05)

    def stop(self):
        for i, proc in enumerate(self.procs):
            if proc and proc.poll() is None:
                self.kill(i)
        shutil.rmtree(self.dir, ignore_errors=True)


def python(code, *args):
    """Runs `code` in a new Python process (this interpreter, interop/ on the path)."""
    env = dict(os.environ, PYTHONPATH=HERE)
    return track(subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))


def finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"worker failed ({proc.returncode}):\n{out}\n{err}")
    return out
