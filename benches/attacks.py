#!/usr/bin/env python3
"""What strangers who never authenticate can do to a guarded `distcore serve`:
the figures issue 24's attacks are judged by, for any build's binary, so a
change can be measured before and after (the tests in
tests/server_preauth.rs assert the bounds; this prints the numbers).

    build/venv/bin/python benches/attacks.py [--distcore PATH]

1. memory: four connections send the head of a 48 MiB SET, then all of its
   body but the last byte, without authenticating; the server's resident
   memory growth, while they are still connected.
2. lockout: --max-connections 4, eight connections that connect and say
   nothing; how long a real client (`distcore inspect` with the secret)
   takes to be served.
3. metrics: 130 connections to the metrics endpoint that say nothing; how
   long a scrape takes.
"""

import argparse
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "interop"))
import harness  # noqa: E402

VALIDATE = bytes([0x00]) + struct.pack("<I", 0x3C85F7CE)
SET = 0x01


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Serve:
    """A `distcore serve` on loopback; its port and metrics address."""

    def __init__(self, distcore, args):
        self.port = harness.free_port()
        self.proc = subprocess.Popen(
            [distcore, "serve", "--host", "127.0.0.1", "--port", str(self.port), *args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.proc.stdout.readline()

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def big_set(port, length, done):
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(10)
    head = VALIDATE + bytes([SET]) + struct.pack("<Q", 3) + b"big" + struct.pack("<Q", length)
    chunk = b"\x07" * (1 << 20)
    # All of the body but its last byte: the request is never complete.
    try:
        s.sendall(head)
        for _ in range(length // len(chunk) - 1):
            s.sendall(chunk)
        s.sendall(chunk[:-1])
    except OSError:
        pass
    done.append(s)


def memory(distcore, secret_file):
    serve = Serve(distcore, ["--secret-file", secret_file])
    try:
        time.sleep(0.3)
        before = rss_mib(serve.proc.pid)
        held = []
        threads = [threading.Thread(target=big_set, args=(serve.port, 48 << 20, held)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(0.5)
        grew = rss_mib(serve.proc.pid) - before
        print(f"1. memory: 4 unauthenticated 48 MiB SETs grew the server by {grew:.1f} MiB")
        for s in held:
            s.close()
    finally:
        serve.stop()


def lockout(distcore, secret_file):
    serve = Serve(distcore, ["--secret-file", secret_file, "--max-connections", "4"])
    try:
        idle = [socket.create_connection(("127.0.0.1", serve.port)) for _ in range(8)]
        time.sleep(0.2)
        started = time.monotonic()
        done = subprocess.run(
            [distcore, "inspect", f"127.0.0.1:{serve.port}", "--secret-file", secret_file],
            capture_output=True, text=True, timeout=60)
        took = time.monotonic() - started
        outcome = "served" if done.returncode == 0 else "refused: " + done.stderr.strip()[:120]
        print(f"2. lockout: with 8 silent strangers and --max-connections 4, a client with the "
              f"secret was {outcome} after {took:.2f} s")
        for s in idle:
            s.close()
    finally:
        serve.stop()


def metrics(distcore, cap=30.0):
    metrics_port = harness.free_port()
    serve = Serve(distcore, ["--metrics", f"127.0.0.1:{metrics_port}"])
    try:
        idle = [socket.create_connection(("127.0.0.1", metrics_port)) for _ in range(130)]
        started = time.monotonic()
        answered = None
        while time.monotonic() - started < cap and answered is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=cap) as r:
                    answered = r.status
            except OSError:
                time.sleep(0.05)
        took = time.monotonic() - started
        if answered is None:
            print(f"3. metrics: with 130 silent connections, no scrape answered within {cap:.0f} s")
        else:
            print(f"3. metrics: with 130 silent connections, a scrape was answered after {took:.2f} s")
        for s in idle:
            s.close()
    finally:
        serve.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distcore", default=harness.CLI, help="the distcore binary to attack")
    args = parser.parse_args()
    print(f"attacking {args.distcore}")
    with tempfile.NamedTemporaryFile("w", suffix=".secret") as secret:
        secret.write("the-shared-secret\n")
        secret.flush()
        memory(args.distcore, secret.name)
        lockout(args.distcore, secret.name)
    metrics(args.distcore)


if __name__ == "__main__":
    main()
