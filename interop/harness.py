"""Processes for the interop tests: distcore servers (embedded in a C
program, or `distcore serve`), PyTorch servers, and Python worker processes.
Everything listens on 127.0.0.1 with ephemeral ports and is killed at the end."""
import os
import signal
import subprocess
import sys
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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process exited before printing {prefix!r}: {proc.args}")
        if line.startswith(prefix):
            return line.strip()
    raise RuntimeError(f"no {prefix!r} within {timeout}s")


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
    """`distcore serve` on an ephemeral loopback port."""

    def __init__(self):
        self.proc = track(subprocess.Popen([CLI, "serve", "--host", "127.0.0.1", "--port", "0"],
                                           stdout=subprocess.PIPE, text=True))
        line = _read_line(self.proc, "distcore TCPStore server listening on")
        self.port = int(line.split()[5].rsplit(":", 1)[1])

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=30) == 0
        self.proc.stdout.close()


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
