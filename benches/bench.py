"""distcore against PyTorch, measured in one run on this machine.

    build/venv/bin/python benches/bench.py [--quick] [--out docs/benchmarks.md]

Builds the drivers (benches/store_bench.cpp twice: distcore's C client and
PyTorch's C++ client from the pip wheel's libtorch; the physical floors
benches/pingpong.c and benches/bulk.c; benches/rpc_bench.c),
starts each server in its own process on 127.0.0.1, and prints one table
per scenario with ratios distcore/PyTorch computed pair by pair. Figures,
not pass/fail: the only failure is a scenario that cannot run.

Every process it starts preloads benches/numeric_names.c: PyTorch looks up
the name of each peer address (reverse DNS) as it connects and accepts, and
where the resolver does not answer, as in a sandbox without network, each
lookup waits 5 s: the figures would measure the resolver, not the store."""
import argparse
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build", "bench")
HERE = os.path.join(ROOT, "benches")
SERVERS = ["distcore", "torch libuv", "torch legacy"]
QUICK_SERVERS = ["distcore", "torch libuv"]
CLIENTS = ["distcore", "torch"]

sys.path.insert(0, os.path.join(ROOT, "interop"))
import harness  # noqa: E402 - the tests' process helpers, from interop/
from liveness_anchors import strike  # noqa: E402 - SIGKILL or SIGSTOP, timed

# The installed build measured: build/prefix, or DISTCORE_PREFIX (another
# build, to compare before and after a change in one sitting).
PREFIX, CLI = harness.PREFIX, harness.CLI


def ensure_python_packages(full):
    """torch.distributed.rpc needs numpy; the plot needs matplotlib;
    torchelastic's EtcdStore needs python-etcd; the Python clients are the
    distcore package (python/, built with cargo)."""
    wanted = {"numpy": "numpy", "distcore": os.path.join(ROOT, "python"), "etcd": "python-etcd"}
    if full:
        wanted["matplotlib"] = "matplotlib"
    missing = [spec for module, spec in wanted.items() if subprocess.run([sys.executable, "-c", f"import {module}"],
                                                                         capture_output=True).returncode]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *missing],
                       check=True)


def torch_dir():
    import torch
    return os.path.dirname(torch.__file__)


NUMERIC_NAMES = os.path.join(BUILD, "numeric_names.so")
ENV = dict(os.environ, LD_PRELOAD=NUMERIC_NAMES)


def build(only=None):
    """Builds the drivers (`only`: those whose output has one of these names; then without torch's if
    bench_torch is not among them)."""
    os.makedirs(BUILD, exist_ok=True)
    t = torch_dir() if not only or "bench_torch" in only else ""
    jobs = [
        ["cc", "-O2", "-shared", "-fPIC", "-o", NUMERIC_NAMES, f"{HERE}/numeric_names.c", "-ldl"],
        ["cc", "-O2", "-o", f"{BUILD}/pingpong", f"{HERE}/pingpong.c", "-pthread"],
        ["c++", "-O2", "-std=c++17", f"-I{PREFIX}/include", "-o", f"{BUILD}/bench_distcore",
         f"{HERE}/store_bench.cpp", f"-L{PREFIX}/lib", "-ldistcore", f"-Wl,-rpath,{PREFIX}/lib", "-pthread"],
        ["c++", "-O2", "-std=c++20", "-DWITH_TORCH", f"-I{t}/include", f"-I{t}/include/torch/csrc/api/include",
         "-o", f"{BUILD}/bench_torch", f"{HERE}/store_bench.cpp", f"-L{t}/lib", "-ltorch_cpu", "-lc10",
         f"-Wl,-rpath,{t}/lib", "-pthread"],
        ["cc", "-O2", "-o", f"{BUILD}/bulk", f"{HERE}/bulk.c", "-pthread"],
        ["cc", "-O2", "-o", f"{BUILD}/ranks", f"{HERE}/ranks.c"],
        ["cc", "-O2", f"-I{PREFIX}/include", "-o", f"{BUILD}/liveness_ranks", f"{HERE}/liveness_ranks.c",
         f"-L{PREFIX}/lib", "-ldistcore", f"-Wl,-rpath,{PREFIX}/lib", "-pthread"],
        ["cc", "-O2", f"-I{PREFIX}/include", "-o", f"{BUILD}/rpc_bench", f"{HERE}/rpc_bench.c",
         f"-L{PREFIX}/lib", "-ldistcore", f"-Wl,-rpath,{PREFIX}/lib"],
        ["cc", "-O2", f"-I{PREFIX}/include", f"-I{ROOT}/c-tests", "-o", f"{BUILD}/dc_waiting_server",
         f"{ROOT}/c-tests/tcp_server_main.c", f"-L{PREFIX}/lib", "-ldistcore", f"-Wl,-rpath,{PREFIX}/lib"],
    ]
    if only:
        jobs = [j for j in jobs if os.path.basename(j[j.index("-o") + 1]).split(".")[0] in only]
    procs = [subprocess.Popen(j) for j in jobs]
    if any(p.wait() for p in procs):
        sys.exit("building the benchmark drivers failed")


def wait_listening(port, timeout=60):
    """Waits until something accepts connections on `port` (a server still
    importing torch does not yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def read_until(proc, prefix, timeout=900):
    """The words of `proc`'s first line starting with `prefix` (an error after `timeout` s)."""
    return harness._read_line(proc, prefix, timeout).split()


class Server:
    """A server in its own process: `distcore serve`, or a PyTorch master."""

    def __init__(self, kind, world=None, port=0, extra=(), stderr=None):
        self.kind = kind
        if kind == "distcore" and world is None:
            self.proc = subprocess.Popen([CLI, "serve", "--host", "127.0.0.1", "--port", str(port), *extra],
                                         stdout=subprocess.PIPE, stdin=subprocess.PIPE, stderr=stderr, text=True,
                                         env=ENV)
            self.port = int(read_until(self.proc, "distcore TCPStore")[5].rsplit(":", 1)[1])
            self.pid = self.proc.pid
        elif kind == "distcore":
            self.proc = subprocess.Popen([f"{BUILD}/dc_waiting_server", str(world)], stdout=subprocess.PIPE,
                                         stdin=subprocess.PIPE, text=True, env=ENV)
            self.port = int(read_until(self.proc, "port")[1])
            self.pid = self.proc.pid
        else:
            backend = kind.split()[1]
            args = [sys.executable, f"{HERE}/torch_server.py", backend, str(port or harness.free_port())]
            self.port = int(args[-1])
            if world:
                args.append(str(world))
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True, env=ENV)
            if not world:
                read_until(self.proc, "port")
                self.pid = int(read_until(self.proc, "pid")[1])

    def wait_ready(self, timeout):
        """For a server waiting for its world: blocks until it has everyone
        (False when `timeout` passed first)."""
        import select
        deadline = time.monotonic() + timeout
        want = "joined" if self.kind == "distcore" else "port"
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            line = self.proc.stdout.readline()
            if not line:
                return False
            if line.startswith(want):
                return True
        return False

    def rss_kib(self):
        with open(f"/proc/{self.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))

    def stop(self):
        if self.proc.poll() is None:
            if self.kind == "distcore" and self.proc.args[0] != CLI:
                self.proc.stdin.close()
            else:
                self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def driver(client, *args, stdin=None):
    return subprocess.Popen([f"{BUILD}/bench_{client}", *map(str, args)], stdout=subprocess.PIPE,
                            stdin=stdin, stderr=subprocess.PIPE, text=True, env=ENV)


def run_driver(client, *args):
    return finished(driver(client, *args), timeout=900)


def table(title, header, rows, note=""):
    lines = [f"### {title}", ""]
    if note:
        lines += [note, ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


def ratio(a, b):
    return f"{a / b:.2f}" if b else "-"


def median_pair(runs):
    """The median of each field over (median, p99) pairs."""
    return tuple(statistics.median(run[i] for run in runs) for i in (0, 1))


def scenario_latency(servers, ops, rounds):
    """Every pair, and the floor, take turns for `rounds` rounds of
    ops/rounds operations; a figure is the median over the rounds (so a
    noisy stretch of this shared machine does not land on one pair)."""
    per_round = ops // rounds
    samples = {}
    for _ in range(rounds):
        samples.setdefault("floor", []).append(run_driver_pingpong(per_round))
        for server, s in servers.items():
            for client in CLIENTS:
                for line in run_driver(client, "latency", "127.0.0.1", s.port, per_round).splitlines():
                    op, med, p99 = line.split()
                    samples.setdefault((client, server, op), []).append((float(med), float(p99)))
    floor = median_pair(samples.pop("floor"))
    results = {key: median_pair(runs) for key, runs in samples.items()}
    ops_names = ["set", "get", "add", "check", "compare_set", "multi_get16"]
    rows = [["loopback floor (C ping-pong)", "-", "rtt", f"{floor[0]:.1f}", f"{floor[1]:.1f}", "-", "-"]]
    for op in ops_names:
        for client in CLIENTS:
            for server in SERVERS:
                med, p99 = results[(client, server, op)]
                ours = results[("distcore", "distcore", op)][0]
                ref = results[("torch", "torch libuv", op)][0]
                is_ours = client == "distcore" and server == "distcore"
                rows.append([f"{client} client", server, op, f"{med:.1f}", f"{p99:.1f}",
                             ratio(ours, ref) if is_ours else "", ratio(med, floor[0])])
    return table(f"1. Latency ({ops} sequential ops each in {rounds} alternating rounds, µs; median and p99 "
                 "are the medians of the rounds')",
                 ["client", "server", "op", "median", "p99", "distcore pair / torch C++ + libuv", "× floor"],
                 rows), results, floor


def run_driver_pingpong(ops):
    out = subprocess.run([f"{BUILD}/pingpong", str(ops)], capture_output=True, text=True, check=True,
                         env=ENV).stdout
    _, med, p99 = out.split()
    return float(med), float(p99)


def scenario_throughput(servers, seconds, conns, procs):
    rows, results = [], {}
    for server, s in servers.items():
        for client in CLIENTS:
            ps = [driver(client, "throughput", "127.0.0.1", s.port, conns // procs, seconds) for _ in range(procs)]
            total = 0.0
            for p in ps:
                out, err = p.communicate(timeout=300)
                m = re.search(r"ops (\d+) seconds ([\d.]+)", out)
                if not m:
                    raise RuntimeError(err)
                total += int(m.group(1)) / float(m.group(2))
            results[(client, server)] = total
    for client in CLIENTS:
        for server in SERVERS:
            v = results[(client, server)]
            rows.append([f"{client} client", server, f"{v:,.0f}", ratio(results[(client, 'distcore')], results[(client, 'torch libuv')]) if server == "distcore" else ""])
    return table(f"2. Throughput ({conns} connections from {procs} processes, 80% get / 20% set over 1k keys, {seconds} s)",
                 ["client", "server", "ops/s", "distcore / torch libuv (same client)"], rows), results


RENDEZVOUS_LIMIT = 120


def scenario_rendezvous(sizes, client="distcore"):
    results = {}
    for server in ["distcore", "torch libuv"]:
        for n in sizes:
            procs = max(1, n // 1024)
            per = n // procs
            s = Server(server, world=n + 1, port=harness.free_port())
            wait_listening(s.port)
            cs = [driver(client, "join", "127.0.0.1", s.port, per, n + 1, stdin=subprocess.PIPE) for _ in range(procs)]
            for c in cs:
                read_until(c, "loaded")
            t0 = time.monotonic()
            for c in cs:
                c.stdin.write("go\n")
                c.stdin.flush()
            ready = time.monotonic() - t0 if s.wait_ready(RENDEZVOUS_LIMIT) else None
            if ready is None:
                for c in cs:
                    c.kill()
                    c.wait()
                s.stop()
                results[(server, n)] = (None, n, None, None)
                continue
            failures = 0
            for c in cs:
                failures += int(read_until(c, "joined")[3])
                c.stdin.close()
                c.wait(60)
            # The libuv tutorial's store barrier at the same N, on the same server.
            bs = [driver(client, "barrier", "127.0.0.1", s.port, per, f"bar{n}", n, stdin=subprocess.PIPE) for _ in range(procs)]
            for b in bs:
                read_until(b, "ready")
            t0 = time.monotonic()
            for b in bs:
                b.stdin.write("go\n")
                b.stdin.flush()
            bfail = 0
            for b in bs:
                bfail += int(read_until(b, "barrier")[5])
                b.stdin.close()
                b.wait(60)
            barrier = time.monotonic() - t0
            s.stop()
            results[(server, n)] = (ready, failures, barrier, bfail)
    rows = []
    for n in sizes:
        for server in ["distcore", "torch libuv"]:
            ready, failures, barrier, bfail = results[(server, n)]
            ours, ref = results[("distcore", n)], results[("torch libuv", n)]
            speedup = ""
            if server == "distcore" and None not in (ours[0], ref[0]):
                speedup = f"{ref[0] / ours[0]:.2f}× / {ref[2] / ours[2]:.2f}×"
            elif server == "distcore" and ref[0] is None:
                speedup = f"> {RENDEZVOUS_LIMIT / ours[0]:.0f}× (PyTorch not ready in {RENDEZVOUS_LIMIT} s)"
            rows.append([n, server, f"{ready:.3f}" if ready is not None else f"> {RENDEZVOUS_LIMIT} (gave up)",
                         failures if ready is not None else "-", f"{barrier:.3f}" if barrier is not None else "-",
                         bfail if bfail is not None else "-", speedup])
    return table(f"3. Rendezvous ({client} clients, world size N+1, server waiting for workers)",
                 ["N", "server", "ready (s)", "failed joins", "store barrier (s)", "barrier failures",
                  "distcore speed-up (ready / barrier)"], rows), results


def scenario_large(servers, sizes, reps):
    rows, results, floors = [], {}, {}
    for mib in sizes:
        out = subprocess.run([f"{BUILD}/bulk", str(mib), str(reps)], capture_output=True, text=True, check=True,
                             env=ENV).stdout.split()
        floors[mib] = (float(out[1]), float(out[3]))
    for server, s in servers.items():
        for mib in sizes:
            for client in CLIENTS:
                out = run_driver(client, "large", "127.0.0.1", s.port, mib, reps).strip()
                results[(client, server, mib)] = out
    for mib in sizes:
        reused, fresh = floors[mib]
        rows.append([f"{mib} MiB", "loopback floor (C echo)", "-", f"{reused:.1f} reused / {fresh:.1f} fresh buffers", "-"])
        for client in CLIENTS:
            for server in SERVERS:
                out = results[(client, server, mib)]
                if out.startswith("mbps"):
                    mbps = float(out.split()[1])
                    rows.append([f"{mib} MiB", f"{client} client", server, f"{mbps:.1f}", ratio(mbps, fresh)])
                else:
                    rows.append([f"{mib} MiB", f"{client} client", server,
                                 "refused: " + out[8:].splitlines()[0][:80], "-"])
    return table(f"4. Large values (set + get, {reps} reps, MB/s counting both directions)",
                 ["value", "client", "server", "MB/s", "/ floor with fresh buffers"], rows,
                 "The floor echoes the value between two threads over loopback TCP, receiving into buffers "
                 "written before (reused) or newly allocated (fresh), as a server keeping the value and a "
                 "client returning it must."), results


def scenario_footprint(conns, keys, procs=2):
    rows, results = [], {}
    for server in SERVERS:
        s = Server(server)
        ps = []
        try:
            base = s.rss_kib()
            ps = [driver("distcore", "idle", "127.0.0.1", s.port, conns // procs, stdin=subprocess.PIPE)
                  for _ in range(procs)]
            held = sum(int(read_until(p, "ready", 600)[1]) for p in ps)
            loader = subprocess.run([sys.executable, "-c", LOAD_KEYS, str(s.port), str(keys)], env=dict(
                ENV, DISTCORE_LIB=f"{PREFIX}/lib/libdistcore.so"),
                capture_output=True, text=True, timeout=300)
            if loader.returncode:
                raise RuntimeError(loader.stderr)
            time.sleep(0.5)
            results[server] = (base, s.rss_kib(), held)
        finally:
            for p in ps:
                p.kill()
                p.wait()
            s.stop()
    for server in SERVERS:
        base, loaded, held = results[server]
        rows.append([server, held, f"{base / 1024:.1f}", f"{loaded / 1024:.1f}", f"{(loaded - base) / 1024:.1f}",
                     ratio(results['distcore'][1] - results['distcore'][0], loaded - base) if server != "distcore" else ""])
    return table(f"5. Footprint ({conns} idle connections and {keys} keys of 100 B)",
                 ["server", "connections held", "RSS before (MiB)", "RSS loaded (MiB)", "growth (MiB)",
                  "distcore growth / this"],
                 rows, "A PyTorch server lives in a Python process with torch loaded; the growth is the comparable part."), results


ATTACK = """
import socket, struct, sys, threading, time
mode, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.sendall(bytes([0]) + struct.pack("<I", 0x3C85F7CE))
if mode == "flood":
    # Pipelined PINGs as fast as the server takes them, replies drained.
    threading.Thread(target=lambda: [None for _ in iter(lambda: s.recv(1 << 20), b"")], daemon=True).start()
    batch = (bytes([0x0D]) + struct.pack("<I", 7)) * 13000
    print("attacking", flush=True)
    while True:
        s.sendall(batch)
else:
    # GETs of a 60 KiB value, never reading a reply.
    key = b"/fair/big"
    get = bytes([0x03]) + struct.pack("<Q", len(key)) + key
    s.settimeout(10)
    sent = 0
    try:
        for _ in range(count // 500):
            s.sendall(get * 500)
            sent += 500
    except OSError:
        pass
    print("attacking", sent, flush=True)
    time.sleep(3600)
"""


def scenario_fairness(ops, gets, seconds):
    """A well-behaved client's get latency while another connection
    attacks (up to `ops` gets, for at most `seconds`), and what the attack
    costs the server in memory."""
    rows, results = [], {}
    for server in ["distcore", "torch libuv"]:
        s = Server(server)
        try:
            seed = socket.create_connection(("127.0.0.1", s.port))
            key, value = b"/fair/big", b"v" * (60 << 10)
            seed.sendall(bytes([0]) + (0x3C85F7CE).to_bytes(4, "little") + bytes([1]) +
                         len(key).to_bytes(8, "little") + key + len(value).to_bytes(8, "little") + value)
            for attack in ["none", "flood", "noread"]:
                base = s.rss_kib()
                attacker = None
                if attack != "none":
                    attacker = subprocess.Popen([sys.executable, "-c", ATTACK, attack, str(s.port), str(gets)],
                                                stdout=subprocess.PIPE, text=True, env=ENV)
                    read_until(attacker, "attacking", 120)
                try:
                    line = run_driver("distcore", "gets", "127.0.0.1", s.port, ops, seconds).strip()
                    grown = (s.rss_kib() - base) / 1024
                finally:
                    if attacker:
                        attacker.kill()
                        attacker.wait()
                _, med, p99, done = line.split()
                results[(server, attack)] = (float(med), float(p99), grown, int(done))
            seed.close()
        finally:
            s.stop()
    names = {"none": "none", "flood": "pipelined PING flood (replies read)",
             "noread": f"{gets:,} GETs of a 60 KiB value, replies never read"}
    for attack in ["none", "flood", "noread"]:
        for server in ["distcore", "torch libuv"]:
            med, p99, grown, done = results[(server, attack)]
            ours, ref = results[("distcore", attack)], results[("torch libuv", attack)]
            rows.append([names[attack], server, f"{done:,}", f"{med:.1f}", f"{p99:.1f}", f"{grown:+.1f}",
                         f"{ratio(ours[1], ref[1])} / {ratio(ours[0], ref[0])}" if server == "distcore" else ""])
    return table(f"7. Fairness (a distcore client's gets, up to {ops:,} in {seconds} s, while another "
                 "connection attacks)",
                 ["attack", "server", "gets done", "get median (µs)", "get p99 (µs)", "server RSS growth (MiB)",
                  "distcore / torch libuv (p99 / median)"], rows,
                 "Each attack runs in its own process for the whole measurement; RSS is the server's, "
                 "measured at the end of it."), results


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scale_run(server, n, prefix, timeout, count_syscalls=False):
    """N simulated ranks join `server` (a fresh one) and pass the store
    barrier; the server's CPU, RSS and (optionally) system calls."""
    s = Server(server)
    strace = None
    try:
        cpu0, rss0 = cpu_seconds(s.pid), s.rss_kib()
        if count_syscalls:
            out = f"{BUILD}/strace-{s.pid}.txt"
            strace = subprocess.Popen(["strace", "-c", "-f", "-p", str(s.pid), "-o", out],
                                      stderr=subprocess.DEVNULL)
            time.sleep(1)
        r = subprocess.Popen([f"{BUILD}/ranks", "127.0.0.1", str(s.port), str(n), prefix, str(timeout)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
        joined = read_until(r, "joined", timeout + 60)
        cpu1 = cpu_seconds(s.pid)
        r.stdin.write("go\n")
        r.stdin.flush()
        barrier = read_until(r, "barrier", timeout + 60)
        time.sleep(0.2)
        cpu2, rss = cpu_seconds(s.pid), s.rss_kib()
        r.stdin.close()
        r.wait(60)
        calls = None
        if strace:
            time.sleep(0.5)
            strace.terminate()
            strace.wait(30)
            strace = None
            with open(out) as f:
                total = [l for l in f if l.strip().endswith("total")]
            calls = int(total[-1].split()[3]) if total else None
        return dict(joined=int(joined[1]), failed=int(joined[3]), refused=int(joined[5]),
                    ready=float(joined[7]), passed=int(barrier[1]), barrier=float(barrier[5]),
                    cpu_join=cpu1 - cpu0, cpu_all=cpu2 - cpu0, rss=(rss - rss0) * 1024, calls=calls)
    finally:
        if strace:
            strace.kill()
        s.stop()


def scenario_scale(sizes, past_limit, syscalls_at):
    """Ranks from an event-driven generator, both servers alternating at
    each N; per-rank server costs, a projection to 100K, and what happens
    to ranks past the descriptor limit."""
    import shutil
    results, rows = {}, []
    for n in sizes:
        for server in ["distcore", "torch libuv"]:
            results[(server, n)] = scale_run(server, n, f"bar{n}/", 120)
    if syscalls_at and shutil.which("strace"):
        for server in ["distcore", "torch libuv"]:
            results[(server, "strace")] = scale_run(server, syscalls_at, "st/", 120, count_syscalls=True)
    for n in sizes:
        for server in ["distcore", "torch libuv"]:
            r = results[(server, n)]
            ours, ref = results[("distcore", n)], results[("torch libuv", n)]
            calls = results.get((server, "strace"), {}).get("calls")
            rows.append([f"{n:,}", server, f"{r['ready']:.2f}", f"{r['barrier']:.2f}",
                         f"{r['failed'] + n - r['passed']}", f"{r['cpu_join'] / n * 1e6:.1f}",
                         f"{r['cpu_all'] / n * 1e6:.1f}", f"{r['rss'] / n:.0f}",
                         f"{calls / syscalls_at:.1f}" if calls and n == sizes[0] else "",
                         ratio(ours['cpu_all'], ref['cpu_all']) if server == "distcore" else ""])
    big = sizes[-1]
    ours, ref = results[("distcore", big)], results[("torch libuv", big)]
    note = (f"Projected to 100,000 ranks from the per-rank costs at N = {big:,} (linear: per-rank work does "
            f"not grow with N on either server; clients on other machines; a descriptor limit above 100K): "
            f"distcore {ours['cpu_all'] / big * 1e5:.1f} s of server CPU and "
            f"{ours['rss'] / big * 1e5 / 2**20:.0f} MiB, PyTorch's libuv server "
            f"{ref['cpu_all'] / big * 1e5:.1f} s and {ref['rss'] / big * 1e5 / 2**20:.0f} MiB. "
            "Wall-clock times here are set by the generator sharing the 2 cores.")
    text = table("8. Scale (ranks simulated by one epoll process: connect with PyTorch's backoff, VALIDATE, PING, "
                 "ADD init/, then the elastic store barrier)",
                 ["N", "server", "all joined (s)", "barrier (s)", "failures", "server CPU µs/rank (join)",
                  "server CPU µs/rank (all)", "server RSS B/rank", f"syscalls/rank (strace, N={syscalls_at:,})" if syscalls_at else "syscalls/rank",
                  "distcore / libuv CPU"], rows, note)
    if past_limit:
        r = scale_run("distcore", past_limit, "past/", 15)
        text += table(f"8b. Past the limit: {past_limit:,} ranks against distcore serve with 20,000 descriptors",
                      ["ranks", "joined", "not joined in 15 s", "connections refused at once and retried",
                       "all answered in (s)"],
                      [[f"{past_limit:,}", f"{r['joined']:,}", f"{r['failed']:,}", f"{r['refused']:,}",
                        f"{r['ready']:.1f}"]],
                      "Excess ranks are accepted and closed at once (their clients retry with backoff) "
                      "instead of waiting in the accept queue; none hangs.")
    return text, results


LOAD_KEYS = """
import sys, distcore
s = distcore.TCPStore("127.0.0.1", int(sys.argv[1]))
n = int(sys.argv[2]); v = b"v" * 100
for start in range(0, n, 1000):
    keys = [f"key{i}" for i in range(start, min(n, start + 1000))]
    s.multi_set(keys, [v] * len(keys))
"""


RPC_CALLS = ["rpc_sync 64 B", "rpc_sync 64 KiB", "rpc_sync 1 MiB", "remote + to_here 64 B"]


def scenario_shared_handle(ops, waiters=63):
    """One handle, `waiters` threads blocked in a get on it, and a set from
    another thread: distcore's gets wait on connections of their own (get
    timeout 300 s, never reached); PyTorch's client holds its one connection
    for the whole get, so the set waits for the gets to time out (given
    0.2 s here, so the run ends; with the default 300 s it would wait that)."""
    rows = []
    results = {}
    for client, timeout_ms, n in [("distcore", 300000, ops), ("torch", 200, 1)]:
        for server in ["distcore", "torch libuv"]:
            s = Server(server)
            try:
                out = run_driver(client, "shared", "127.0.0.1", s.port, waiters, n, timeout_ms)
            finally:
                s.stop()
            _, med, p99 = out.split()
            results[(client, server)] = float(med)
            rows.append([f"{client} client", server, f"{timeout_ms / 1000:g} s", n, f"{float(med):.1f}",
                         f"{float(p99):.1f}"])
    ref = results[("torch", "torch libuv")]
    for row in rows:
        row.append(f"{ref / results[(row[0].split()[0], row[1])]:.3g}")
    return table(f"9. A set on a handle while {waiters} gets block on it (µs)",
                 ["client", "server", "get timeout", "sets", "median", "p99",
                  "torch client + libuv / this (× faster)"], rows,
                 "PyTorch's set waits until every blocked get has timed out (63 × 0.2 s here); "
                 "distcore's gets wait on connections of their own.")


def scenario_rpc(calls, rounds):
    """distcore driven from C (the library's own cost) and from Python
    (ctypes, a Python function on the callee, as torch runs one), against
    torch.distributed.rpc from Python. The systems take turns for `rounds`
    rounds and each figure is the median of its rounds' medians, so that a
    noisy stretch of this shared machine does not land on one system."""
    samples = {}
    for _ in range(rounds):
        py = subprocess.run([sys.executable, f"{HERE}/rpc_bench.py", str(calls)], capture_output=True, text=True,
                            env=dict(ENV, DISTCORE_LIB=f"{PREFIX}/lib/libdistcore.so"), timeout=1800)
        c = subprocess.run([f"{BUILD}/rpc_bench", str(calls)], capture_output=True, text=True, env=ENV, timeout=900)
        for out in (py, c):
            if out.returncode:
                raise RuntimeError(out.stderr[-2000:])
            for line in out.stdout.splitlines():
                system, what, med = line.split("\t")
                samples.setdefault((system, what), []).append(float(med))
    results = {key: statistics.median(values) for key, values in samples.items()}
    rows = []
    for what in RPC_CALLS:
        dc_c, dc_py, t = (results[(s, what)] for s in ("distcore-c", "distcore", "torch"))
        rows.append([what, f"{dc_c:.1f}", f"{dc_py:.1f}", f"{t:.1f}", ratio(t, dc_c), ratio(t, dc_py)])
    return table(f"6. RPC and RRef ({calls} calls each, median µs over {rounds} alternating rounds, "
                 "two processes on loopback)",
                 ["call", "distcore from C", "distcore from Python (ctypes)", "torch.distributed.rpc (TensorPipe, Python)",
                  "torch / distcore C", "torch / distcore Python"], rows), results


ETCD_CLIENTS = [
    # (label, etcd_clients.py kind, what it talks to)
    ("torchelastic EtcdStore (etcd v2 API, python-etcd)", "torchelastic", "etcd"),
    ("distcore.EtcdStore (etcd v3 API)", "distcore-etcd", "etcd"),
    ("PyTorch TCPStore client → distcore serve --backend etcd", "torch-tcp", "front"),
    ("PyTorch TCPStore client → distcore serve (memory)", "torch-tcp", "memory"),
]


# (ops, seconds, processes, ranks) of the etcd scenario, full and --quick.
ETCD_SIZES = {False: (1000, 5, 4, 1024), True: (100, 1, 2, 64)}


def etcd_clients(mode, kind, target, prefix, amount):
    return subprocess.Popen([sys.executable, f"{HERE}/etcd_clients.py", mode, kind, target, prefix, str(amount)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(ENV, DISTCORE_LIB=f"{PREFIX}/lib/libdistcore.so"))


def finished(proc, timeout=1800):
    """The output of `proc` once it exits (killed after `timeout` s); a
    failure raises with the end of its stderr."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    if proc.returncode:
        raise RuntimeError(f"{proc.args[:4]}: {err.strip()[-600:]}")
    return out


def started_on_go(proc, ready, done):
    """Tells a driver to go once it printed `ready`; returns its `done`
    line's fields, then lets it exit."""
    try:
        read_until(proc, ready)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        return read_until(proc, done)
    finally:
        proc.stdin.close()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def scenario_etcd(ops, seconds, procs, ranks):
    """Stores on etcd, from Python clients: torchelastic's EtcdStore (the v2
    API, which etcd 3.4 serves with --enable-v2 and 3.6 removed), distcore's
    EtcdStore (v3), and PyTorch's TCPStore client through `distcore serve
    --backend etcd` (and, for scale, through the in-memory server), all on
    one etcd member on loopback. Then a rendezvous of `ranks` through the
    front-end: N handles join (count themselves in init/), then the store
    barrier (add, the last sets the release key, everyone waits)."""
    cluster = harness.EtcdCluster(extra=["--enable-v2"])
    servers = []
    try:
        front = harness.CliServer(backend=cluster.url("bench-front"))
        memory = harness.CliServer()
        servers += [front, memory]
        targets = {"etcd": cluster.endpoints[0], "front": f"127.0.0.1:{front.port}",
                   "memory": f"127.0.0.1:{memory.port}"}
        lat = {}
        for label, kind, where in ETCD_CLIENTS:
            out = finished(etcd_clients("latency", kind, targets[where], f"/lat-{kind}-{where}", ops))
            for line in out.splitlines():
                op, med, p99 = line.split()
                lat[(label, op)] = (float(med), float(p99))
        thr = {}
        for label, kind, where in ETCD_CLIENTS:
            ps = [etcd_clients("throughput", kind, targets[where], f"/thr-{kind}-{where}", seconds)
                  for _ in range(procs)]
            total = 0.0
            for p in ps:
                m = re.search(r"ops (\d+) seconds ([\d.]+)", finished(p))
                total += int(m.group(1)) / float(m.group(2))
            thr[label] = total
        rdv = {}
        for where in ("front", "memory"):
            server = harness.CliServer(backend=cluster.url("bench-rdv") if where == "front" else None)
            servers.append(server)
            _, _, _, failures, _, join_s = started_on_go(
                driver("distcore", "join", "127.0.0.1", server.port, ranks, ranks, stdin=subprocess.PIPE),
                "loaded", "joined")
            _, _, _, bar_s, _, bar_failures = started_on_go(
                driver("distcore", "barrier", "127.0.0.1", server.port, ranks, "rdv", ranks, stdin=subprocess.PIPE),
                "ready", "barrier")
            rdv[where] = (float(join_s), int(failures), float(bar_s), int(bar_failures))
    finally:
        try:
            for server in servers:
                server.stop()
        finally:
            harness.kill_all()  # whatever a failure left running
            cluster.stop()
    reference = ETCD_CLIENTS[0][0]
    rows = []
    for op in ("set", "get", "add", "check"):
        for label, _, _ in ETCD_CLIENTS:
            med, p99 = lat[(label, op)]
            rows.append([op, label, f"{med:.0f}", f"{p99:.0f}",
                         "" if label == reference else ratio(lat[(reference, op)][0], med)])
    text = table(f"10. Stores on etcd: latency ({ops} sequential ops each, one etcd member on loopback, µs)",
                 ["op", "store", "median", "p99", "torchelastic / this (× faster)"], rows)
    rows = [[label, f"{thr[label]:,.0f}", "" if label == reference else ratio(thr[label], thr[reference])]
            for label, _, _ in ETCD_CLIENTS]
    text += "\n" + table(f"10b. Stores on etcd: throughput ({procs} processes, 80% get / 20% set over 100 keys, "
                         f"{seconds} s)", ["store", "ops/s", "this / torchelastic"], rows)
    rows = [[ranks, "distcore serve --backend etcd" if where == "front" else "distcore serve (memory)",
             f"{j:.3f}", jf, f"{b:.3f}", bf] for where, (j, jf, b, bf) in rdv.items()]
    text += "\n" + table(f"10c. Rendezvous of {ranks} ranks through a server (distcore clients, one process)",
                         ["N", "server", "join (s)", "failed joins", "store barrier (s)", "barrier failures"], rows)
    return text, (lat, thr, rdv)


def scenario_guards(connects, ops, rounds):
    """What each guard costs a distcore client: connecting (handshake,
    authentication, TLS) and a GET, against `distcore serve` with each
    guard, and PyTorch's client on its libuv server for reference, all
    driven from Python (benches/guards_bench.py) in alternating rounds."""
    tls = os.path.join(ROOT, "tests", "tls")
    secret_file = os.path.join(BUILD, "guards-secret")
    with open(secret_file, "w") as f:
        f.write("a shared secret for the benchmark")
    server_tls = ["--tls-cert", f"{tls}/server.pem", "--tls-key", f"{tls}/server.key"]
    client_tls = [f"tls_ca={tls}/ca.pem"]
    secret = ["secret=a shared secret for the benchmark"]
    configs = [  # (name, serve's flags, the client's options)
        ("no guard", [], []),
        ("allow-list and quotas", ["--allow", "127.0.0.0/8", "--max-connections", "10000",
                                   "--max-keys", "1000000", "--max-stored-bytes", str(1 << 30)], []),
        ("shared secret", ["--secret-file", secret_file], secret),
        ("TLS", server_tls, client_tls),
        ("TLS and secret", server_tls + ["--secret-file", secret_file], client_tls + secret),
        ("mutual TLS", server_tls + ["--tls-client-ca", f"{tls}/ca.pem"],
         client_tls + [f"tls_cert={tls}/client.pem", f"tls_key={tls}/client.key"]),
    ]
    servers, samples = {}, {}
    try:
        servers["torch"] = Server("torch libuv")
        for name, flags, _ in configs:
            servers[name] = Server("distcore", extra=flags)
        for _ in range(rounds):
            for name, _, options in [("torch", [], [])] + configs:
                client = "torch" if name == "torch" else "distcore"
                out = finished(subprocess.Popen(
                    [sys.executable, f"{HERE}/guards_bench.py", client, str(servers[name].port), str(connects),
                     str(ops), *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    env=dict(ENV, DISTCORE_LIB=f"{PREFIX}/lib/libdistcore.so", PYTHONPATH=f"{ROOT}/python")))
                for line in out.splitlines():
                    what, us = line.split()
                    samples.setdefault((name, what), []).append(float(us))
    finally:
        for s in servers.values():
            s.stop()
    med = {key: statistics.median(runs) for key, runs in samples.items()}
    rows = [["PyTorch's client, libuv server", "-", f"{med[('torch', 'connect')]:.0f}", "1.00",
             f"{med[('torch', 'get')]:.1f}", "1.00"]]
    for name, flags, _ in configs:
        rows.append([f"distcore, {name}", " ".join(f for f in flags if f.startswith("--")) or "-",
                     f"{med[(name, 'connect')]:.0f}", ratio(med[(name, "connect")], med[("torch", "connect")]),
                     f"{med[(name, 'get')]:.1f}", ratio(med[(name, "get")], med[("torch", "get")])])
    return table(f"11. What guards cost ({connects} connects and {ops} GETs of 64 B per round from Python, "
                 f"{rounds} alternating rounds, medians in µs)",
                 ["client and server", "serve flags", "connect", "/ torch", "get", "/ torch"], rows), med


def liveness_run(kind, port, n, failure, ttl_ms, timeout_s):
    """`n` Python members of one job on the server at `port`, each blocked in
    a get (liveness_member.py); once all are, the last is killed (SIGKILL)
    or frozen (SIGSTOP): the seconds from then until each survivor's get
    returned, and what the first survivor got."""
    group = f"job-{n}-{failure}/"
    env = dict(ENV, DISTCORE_LIB=f"{PREFIX}/lib/libdistcore.so")
    procs = [subprocess.Popen([sys.executable, f"{HERE}/liveness_member.py", kind, str(port), group, str(rank),
                               str(n), str(ttl_ms), str(timeout_s)], stdout=subprocess.PIPE, text=True, env=env)
             for rank in range(n)]
    try:
        for p in procs:
            read_until(p, "ready", 300)
        time.sleep(0.3)  # every get blocked on the server by now
        started = strike(procs[-1], failure)
        times, got = [], ""
        for p in procs[:-1]:
            words = read_until(p, "done", timeout_s + 60)
            times.append((int(words[1]) - started) / 1e9)
            got = got or " ".join(words[2:])
        return times, got
    finally:
        for p in procs:
            p.kill()
            p.wait()


def liveness_ranks(port, group, n, first, count, ttl_ms, call, timeout_s, stderr=None):
    return subprocess.Popen([f"{BUILD}/liveness_ranks", str(port), group, str(n), str(first), str(count),
                             str(ttl_ms), call, str(timeout_s)], stdout=subprocess.PIPE, text=True, env=ENV,
                            stdin=subprocess.PIPE if call == "hold" else None, stderr=stderr)


def liveness_generated(port, n, failure, ttl_ms, call, timeout_s=120):
    """`n` members of one job from benches/liveness_ranks.c: ranks 0..n-2 in
    one process, each with its own handle and session, blocked in `call`
    (get or barrier); rank n-1 in a process of its own, blocked in a get,
    killed or frozen once all are waiting. The seconds from the signal
    until each survivor's call returned, what the first got, how many
    failures named rank n-1, and the survivors' process's descriptors."""
    group = f"gen-{n}-{failure}-{call}/"
    survivors = liveness_ranks(port, group, n, 0, n - 1, ttl_ms, call, timeout_s)
    victim = liveness_ranks(port, group, n, n - 1, 1, ttl_ms, "get", timeout_s)
    try:
        fds = int(read_until(survivors, "ready", 900)[3])
        read_until(victim, "ready", 60)
        time.sleep(0.5 + n * 50e-6)  # every call waiting on the server by now
        started = strike(victim, failure)
        named = int(read_until(survivors, "done", timeout_s + 60)[3])
        got = " ".join(read_until(survivors, "first")[1:])
        times = [(int(t) - started) / 1e9 for t in read_until(survivors, "times")[1:] if int(t)]
        return times, got, named, fds
    finally:
        for p in (survivors, victim):
            p.kill()
            p.wait()


def percentiles_ms(times):
    """p50, p99 (nearest rank) and max of `times` (s), in ms."""
    s = sorted(times)
    return [s[max(0, -(-len(s) * q // 100) - 1)] * 1e3 for q in (50, 99)] + [s[-1] * 1e3]


def ensure_anchor_packages():
    """build/anchors-venv: JAX (CPU) and torchft from PyPI, apart from the
    bench's venv (whose packages it sees through a .pth file, torch among
    them, so torchft brings no second torch). Returns its python."""
    import sysconfig
    venv = os.path.join(ROOT, "build", "anchors-venv")
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        with open(os.path.join(site, "bench-venv.pth"), "w") as f:
            f.write(sysconfig.get_paths()["purelib"] + "\n")
    if subprocess.run([python, "-c", "import jax, torchft"], capture_output=True).returncode:
        subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *ANCHOR_PACKAGES],
                       check=True)
    return python


ANCHOR_PACKAGES = ["jax[cpu]==0.10.2", "torchft==0.2.0"]

# The anchors measured (issue 26): (system, setting, liveness_anchors.py arguments with N, failure
# standing for themselves). etcd's N is one holder and one watcher; its TTL is whole seconds, at least
# 3/2 of the election timeout (default 1 s: 2 s; 1 s with --election-timeout 500).
LIVENESS_ANCHORS = [
    ("etcd 3.4 lease + watch", "TTL 2 s (the minimum, defaults)", 2, ["etcd", 2, "FAILURE", 3]),
    ("etcd 3.4 lease + watch", "TTL 1 s (--election-timeout 500)", 2,
     ["etcd", 1, "FAILURE", 3, "--election-timeout", "500"]),
    ("JAX 0.10.2 coordination service", "defaults (heartbeat timeout 100 s)", 4, ["jax", "N", "FAILURE", 100]),
    ("JAX 0.10.2 coordination service", "heartbeat timeout 1 s", 4, ["jax", "N", "FAILURE", 1]),
    ("JAX 0.10.2 coordination service", "heartbeat timeout 1 s", 16, ["jax", "N", "FAILURE", 1]),
    ("torchft 0.2 lighthouse", "defaults (heartbeat timeout 5 s, join timeout 60 s)", 4,
     ["torchft", "N", "FAILURE", 5000, 60000]),
    ("torchft 0.2 lighthouse", "heartbeat timeout 1 s, join timeout 60 s", 4, ["torchft", "N", "FAILURE", 1000, 60000]),
    ("torchft 0.2 lighthouse", "heartbeat timeout 1 s, join timeout 60 s", 16,
     ["torchft", "N", "FAILURE", 1000, 60000]),
    ("torchft 0.2 lighthouse", "join timeout 100 ms (LighthouseServer's default): late or dead alike", 4,
     ["torchft", "N", "FAILURE", 1000, 100]),
]


def liveness_anchor(python, args, n, failure):
    """One anchor measurement: the seconds from each signal until each
    survivor learned (those that never did left out), how many did, and
    what the first got."""
    args = [str(n) if a == "N" else failure if a == "FAILURE" else str(a) for a in args]
    out = finished(subprocess.Popen([python, f"{HERE}/liveness_anchors.py", *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True, env=ENV), timeout=900)
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1].strip() for line in out.splitlines() if " " in line}
    kills, seen = [int(k) for k in lines["kill"].split()], [int(t) for t in lines["times"].split()]
    if len(kills) > 1:  # one watcher a trial
        pairs = list(zip(kills, seen))
    else:
        pairs = [(kills[0], t) for t in seen]
    times = [(t - k) / 1e9 for k, t in pairs if t]
    return times, len(times), len(pairs), lines.get("got", "")


# scenario_liveness's arguments, full and --quick: C members' N, TTL (ms), Python members' N, PyTorch's N
# and timeout (s), the anchors.
LIVENESS_SIZES = {False: ([16, 256, 1024, "max"], 1000, [16, 256], 16, 5, True, [16, 256, 1024]),
                  True: ([16, 64], 1000, [8], 8, 2, False, [16])}


def largest_n(fds):
    """The most members the descriptor limit allows: every member holds as
    many connections as the generator's descriptors grew per member between
    the first two sizes measured (`fds`: {N: descriptors}), each a
    descriptor in the server too."""
    (a, fa), (b, fb) = sorted(fds.items())[:2]
    per_member = -(-(fb - fa) // (b - a))
    return (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 100) // per_member, per_member


def scenario_liveness(sizes, ttl_ms, python_sizes, torch_size, torch_timeout_s, anchors, etcd_sizes):
    """Time until every survivor knows: N members blocked in a get (or the
    store barrier), one killed or frozen. distcore with liveness sessions
    (docs/liveness.md), members from the C generator at each of `sizes`
    ("max": the most the descriptor limit allows) and as Python processes
    at `python_sizes`; PyTorch's TCPStore, whose survivors wait out their
    timeout; and with `anchors`, etcd, JAX and torchft measured the same
    way (benches/liveness_anchors.py); and at `etcd_sizes`, the C members
    on `distcore serve --backend etcd` (one etcd member), beside the memory
    backend's figures of the same run."""
    rows, ours, held = [], {}, {}

    def row(n, system, what, times, told, got):
        got = re.sub(r"\(host [^)]*\)", "(host, pid, incarnation)", got)
        rows.append([f"{n:,}", system, what, *(f"{v:,.1f}" for v in percentiles_ms(times)), told, got[:120]])

    for failure, ttl, calls in [("crash", 0, ["get", "barrier"]), ("silent", ttl_ms, ["get"])]:
        what = "SIGKILL" if failure == "crash" else f"SIGSTOP, TTL {ttl / 1000:g} s"
        fds = {}
        for n in sizes:
            if n == "max":
                n, held[what] = largest_n(fds)
            for call in calls:
                server = Server("distcore")
                try:
                    times, got, named, descriptors = liveness_generated(server.port, n, failure, ttl, call)
                finally:
                    server.stop()
                fds[n - 1] = descriptors
                ours[(failure, n, call)] = percentiles_ms(times)
                row(n, f"distcore, C members ({call})", what, times, f"{named:,}/{n - 1:,}", got)
        for n in python_sizes:
            server = Server("distcore")
            try:
                times, got = liveness_run("distcore", server.port, n, failure, ttl, 120)
            finally:
                server.stop()
            row(n, "distcore, Python processes (get)", what, times, f"{len(times)}/{n - 1}", got)
    server = Server("torch libuv")
    try:
        times, got = liveness_run("torch", server.port, torch_size, "crash", 0, torch_timeout_s)
    finally:
        server.stop()
    row(torch_size, f"PyTorch TCPStore, Python processes (get, timeout {torch_timeout_s:g} s)", "SIGKILL", times,
        f"{len(times)}/{torch_size - 1} (timed out)", got)
    limit = "; ".join(f"{what}: {per} descriptors a member" for what, per in held.items())
    text = table("12. Time until every survivor knows (N members blocked in a get or the store barrier; the last "
                 "one killed or frozen; ms from the signal until each survivor's call returned)",
                 ["N", "system (members, call)", "failure", "p50", "p99", "max", "told (named the rank)",
                  "what survivors got"], rows,
                 "C members (benches/liveness_ranks.c): one process holds ranks 0..N-2, each with its own "
                 "TCPStore handle, session and async call, completions timed by a callback on the library's "
                 "async thread; rank N-1 is a process of its own, blocked in a get. Python processes: one per "
                 "member, their wake-up on 2 cores included. The largest N: the descriptor limit "
                 f"({resource.getrlimit(resource.RLIMIT_NOFILE)[1]:,}) over what a member holds ({limit}).")
    if etcd_sizes:
        text += "\n" + liveness_on_etcd(etcd_sizes, ttl_ms, ours)
    if anchors:
        text += "\n" + liveness_anchors_table(ours, sizes[0])
    return text, ours


def liveness_on_etcd(sizes, ttl_ms, ours):
    """Table 12e: scenario 12's C members on `distcore serve --backend etcd`
    (sessions kept in etcd: docs/liveness.md, "On etcd"), each p99 beside
    the memory backend's in `ours`."""
    rows = []
    cluster = harness.EtcdCluster()
    try:
        # Discarded: a new etcd member's first commits also pay for its log
        # files (measured up to 200 ms once).
        server = Server("distcore", extra=["--backend", f"etcd://{cluster.endpoints[0]}/liveness-warm-up"])
        try:
            liveness_generated(server.port, 4, "crash", 0, "get")
        finally:
            server.stop()
        for failure, ttl, calls in [("crash", 0, ["get", "barrier"]), ("silent", ttl_ms, ["get"])]:
            what = "SIGKILL" if failure == "crash" else f"SIGSTOP, TTL {ttl / 1000:g} s"
            for n in sizes:
                for call in calls:
                    prefix = f"liveness-{failure}-{n}-{call}"
                    server = Server("distcore", extra=["--backend", f"etcd://{cluster.endpoints[0]}/{prefix}"])
                    try:
                        times, got, named, _ = liveness_generated(server.port, n, failure, ttl, call)
                    finally:
                        server.stop()
                    p50, p99, worst = percentiles_ms(times)
                    memory = ours.get((failure, n, call))
                    rows.append([f"{n:,}", call, what, f"{p50:,.1f}", f"{p99:,.1f}", f"{worst:,.1f}",
                                 f"{memory[1]:,.1f}" if memory else "-", ratio(p99, memory[1]) if memory else "-",
                                 f"{named:,}/{n - 1:,}"])
    finally:
        cluster.stop()
    return table("12e. The same on `distcore serve --backend etcd` (one etcd member; sessions kept in etcd; "
                 "ms from the signal until each survivor's call returned)",
                 ["N", "call", "failure", "p50", "p99", "max", "memory backend p99", "etcd / memory",
                  "told (named the rank)"], rows,
                 "A crash is decided by the front-end that loses the connection: one etcd transaction records "
                 "the group's failure (its commit is most of the time at small N); that front-end then tells "
                 "its members, the others learn it from their watch.")


def liveness_anchors_table(ours, ref_n):
    """The anchors, each beside distcore's C members at `ref_n` with the same failure."""
    try:
        python = ensure_anchor_packages()
    except Exception as e:  # noqa: BLE001 - reported in the table
        return f"### 12b. The anchors\n\nCould not install {' and '.join(ANCHOR_PACKAGES)}: {e}\n"
    rows = []
    for system, setting, n, args in LIVENESS_ANCHORS:
        for failure in ("crash", "silent"):
            if setting.startswith("join timeout 100") and failure == "silent":
                continue
            try:
                times, learned, survivors, got = liveness_anchor(python, args, n, failure)
            except Exception as e:  # noqa: BLE001 - reported in the table
                rows.append([n, system, setting, failure, "-", "-", "-", "-", f"could not run: {e}"[:110], "-"])
                continue
            ref = ours[(failure, ref_n, "get")][2]
            cells = [f"{v:,.0f}" for v in percentiles_ms(times)] if times else ["never"] * 3
            rows.append([n, system, setting, "SIGKILL" if failure == "crash" else "SIGSTOP", *cells,
                         f"{learned}/{survivors}", got[:110],
                         f"{percentiles_ms(times)[2] / ref:.1f}×" if times else "-"])
    return table(f"12b. The anchors, measured the same way in this run (ms from the signal until each survivor "
                 f"learned; the last column: their slowest over distcore's slowest at N = {ref_n}, same failure)",
                 ["N", "system", "setting", "failure", "p50", "p99", "max", "learned", "what survivors got",
                  "slowest / distcore's"], rows,
                 "etcd: 3 trials a row (N: one holder, one watcher), a holder process keeping a key on a lease, a watcher "
                 "timing the DELETE. JAX: N processes in jax.distributed.initialize (CPU), each blocked in "
                 "blocking_key_value_get; a survivor learns when the get raises or JAX aborts the process. "
                 "torchft: a lighthouse (min_replicas 1) and N replicas heart-beating every 100 ms and asking "
                 "for quorum in a loop; a survivor learns when its quorum leaves the dead one out.")


BURNER = "while True: pass"


class Held:
    """`n` members of one group from benches/liveness_ranks.c, all in one
    process, each with its own handle and session (TTL `ttl_ms`) and blocked
    in a get of a key nobody sets, held until `end`."""

    def __init__(self, port, group, n, ttl_ms, timeout_s):
        self.n = n
        # The library's warnings (a keep-alive stopped: one a member once a group failed) to a file.
        self.log = os.path.join(BUILD, f"hold-{group.strip('/')}.log")
        with open(self.log, "w") as log:
            self.proc = liveness_ranks(port, group, n, 0, n, ttl_ms, "hold", timeout_s, stderr=log)
        self.fds = int(read_until(self.proc, "ready", 900)[3])
        self.pid = self.proc.pid

    def end(self):
        """Ends the hold: the calls that returned meanwhile ("early" lines:
        member, rank, CLOCK_MONOTONIC ns, status, message), and how many
        sessions closed cleanly."""
        self.proc.stdin.write("end\n")
        self.proc.stdin.flush()
        out, _ = self.proc.communicate(timeout=300 + self.n / 50)
        lines = {}
        early = []
        for line in out.splitlines():
            word, _, rest = line.partition(" ")
            if word == "early":
                member, rank, ns, rest = rest.split(" ", 3)
                early.append((int(member), int(rank), int(ns), rest))
            else:
                lines[word] = rest
        held = lines["held"].split()
        closed = lines["closed"].split(" ", 4)
        return dict(completed=int(held[2]), early=early, first=lines.get("first", ""), closed=int(closed[0]),
                    close_failed=int(closed[2]), close_first=closed[4] if len(closed) > 4 else "")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def inspect_sessions(port):
    """From `distcore inspect`: the sessions listed, the groups' failures,
    whether the listing was cut, and the server's count of connections it
    closed because their session failed
    (connections_refused_total{reason="session_failed"}; inspect prints
    only counters that are not zero)."""
    out = subprocess.run([CLI, "inspect", f"127.0.0.1:{port}", "--width", "8"], capture_output=True, text=True,
                         timeout=120, env=ENV).stdout
    listed = next((int(l.split()[0]) for l in out.splitlines() if re.match(r"^\d+ sessions$", l)), None)
    failed = [l.strip() for l in out.splitlines() if " FAILED: " in l]
    metric = re.search(r'connections_refused_total\{reason="session_failed"\}\s+(\d+)', out)
    if "server stats:" not in out:
        raise RuntimeError(f"distcore inspect printed no stats: {out[:200]}")
    return listed, failed, "(more sessions than one answer holds" in out, int(metric.group(1)) if metric else 0


def flood_run(n, ttl_ms, seconds, conns, big_mib):
    """`n` live members (TTL `ttl_ms`) blocked in a get for `seconds` while
    benches/liveness_flood.py floods the server and one CPU burner per core
    runs: what returned early (false failures), what the server failed, and
    what each process used."""
    log = []
    server = Server("distcore", stderr=subprocess.PIPE)
    import threading
    threading.Thread(target=lambda: [log.append((time.monotonic_ns(), l.rstrip())) for l in server.proc.stderr],
                     daemon=True).start()
    procs = []
    held = None
    try:
        held = Held(server.port, f"flood-{n}-{ttl_ms}/", n, ttl_ms, seconds + 600)
        time.sleep(3 * ttl_ms / 1000)  # a few keep-alives each before the load
        burners = [subprocess.Popen([sys.executable, "-c", BURNER]) for _ in range(os.cpu_count())]
        procs += burners
        flood = subprocess.Popen([sys.executable, f"{HERE}/liveness_flood.py", str(server.port), str(seconds),
                                  str(conns), str(big_mib)], stdout=subprocess.PIPE, text=True, env=ENV)
        procs.append(flood)
        read_until(flood, "flooding", 60)
        started = time.monotonic_ns()
        before = {p: cpu_seconds(p) for p in [server.pid, held.pid] + [b.pid for b in burners]}
        ops, took, moved, flood_cpu = read_until(flood, "flood", seconds + 120)[1:]
        after = {p: cpu_seconds(p) for p in before}
        wall = (time.monotonic_ns() - started) / 1e9
        for b in burners:
            b.kill()
            b.wait()
        listed, failed, truncated, metric = inspect_sessions(server.port)
        got = held.end()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        if held:
            held.kill()
        server.stop()
    share = {p: (after[p] - before[p]) / wall * 100 for p in before}
    return dict(got, listed=listed, failed=failed, truncated=truncated, metric=metric, wall=wall,
                ops=int(ops) / float(took), mbs=int(moved) / float(took) / 1e6, flood_cpu=float(flood_cpu) / wall * 100,
                server_cpu=share[server.pid], gen_cpu=share[held.pid],
                burner_cpu=sum(share[b.pid] for b in burners), started=started,
                log=[(t, l) for t, l in log if "WARN" in l or "ERROR" in l or "failed" in l])


def keepalive_cost(n, ttl_ms, window_s):
    """`n` idle members (blocked in a get nobody answers) with TTL `ttl_ms`:
    the server's and the generator's CPU over `window_s`, as % of one core."""
    server = Server("distcore")
    held = None
    try:
        held = Held(server.port, f"cost-{n}-{ttl_ms}/", n, ttl_ms, window_s + 600)
        time.sleep(2 + 2 * ttl_ms / 1000)  # past the joins, keep-alives in their stride
        t0, s0, g0 = time.monotonic(), cpu_seconds(server.pid), cpu_seconds(held.pid)
        time.sleep(window_s)
        t1, s1, g1 = time.monotonic(), cpu_seconds(server.pid), cpu_seconds(held.pid)
        got = held.end()
        fds = held.fds
    finally:
        if held:
            held.kill()
        server.stop()
    return dict(got, server_cpu=(s1 - s0) / (t1 - t0) * 100, gen_cpu=(g1 - g0) / (t1 - t0) * 100, fds=fds)


# scenario_liveness_flood's arguments, full and --quick: the flood runs (N, TTL ms, seconds), the flood's
# small-request connections and large value (MiB), the keep-alive cost's N ("max": the descriptor limit),
# TTLs (ms) and window (s).
LIVENESS_FLOOD = {False: ([(1024, 2000, 600), (1024, 500, 600)], 3, 4, [1024, "max"], [2000, 500], 30),
                  True: ([(128, 2000, 20)], 3, 4, [128], [2000], 5)}


def false_failures(r):
    """Live members the server failed: the ranks named by the calls that
    returned early and by the groups inspect lists as failed (a group's
    first failure fails every member's call, and stops their keep-alives:
    one false failure ends the whole group), at least 1 if anything
    returned or the server closed a connection for a failed session."""
    named = {m.group(1) for m in re.finditer(r"(rank \d+ of group '[^']*')", " ".join(
        [e[3] for e in r["early"]] + r["failed"]))}
    return len(named) or int(r["completed"] > 0 or r["metric"] > 0)


def scenario_liveness_flood(runs, conns, big_mib, cost_sizes, cost_ttls, window_s):
    """Issue 26's two remaining targets: no false failure among live members
    while another client floods the server and CPU burners load the
    machine (12c), and what keep-alives cost (12d)."""
    rows, results = [], {}
    for n, ttl_ms, seconds in runs:
        r = results[("flood", n, ttl_ms)] = flood_run(n, ttl_ms, seconds, conns, big_mib)
        for member, rank, ns, what in r["early"][:5]:
            print(f"  FALSE FAILURE? member {member} (rank {rank}) returned {(ns - r['started']) / 1e9:+.3f} s "
                  f"after the flood started: {what}")
        for t, line in r["log"][:20]:
            print(f"  server log {(t - r['started']) / 1e9:+.3f} s: {line}")
        listed = f"{r['listed']:,}" + ("+" if r["truncated"] else "") if r["listed"] is not None else "?"
        rows.append([f"{n:,}", f"{ttl_ms / 1000:g} s", f"{seconds:,} s", f"{false_failures(r)}",
                     f"{r['completed']} / {len(r['failed'])} / {r['metric']}", f"{listed} / {r['closed']:,}",
                     f"{r['ops']:,.0f}", f"{r['mbs']:,.0f}", f"{r['server_cpu']:.0f}", f"{r['gen_cpu']:.1f}",
                     f"{r['flood_cpu']:.0f}", f"{r['burner_cpu']:.0f}", f"{len(r['log'])}"])
    text = table(f"12c. False failures under load (N live members blocked in a get, TTL as given, while {conns} "
                 f"connections pipeline SET/GET/ADD, one sets and gets {big_mib} MiB values, and "
                 f"{os.cpu_count()} CPU burners run)",
                 ["N", "TTL", "for", "false failures (members failed while live)",
                  "calls returned / groups failed / conns closed for a failed session", "sessions listed / closed cleanly", "flood: small requests/s", "flood: large MB/s",
                  "server CPU (% of a core)", "generator CPU (%)", "flood CPU (%)", "burners CPU (%)",
                  "server warnings"], rows,
                 "Members: benches/liveness_ranks.c `hold` (one process, each member its own handle, session and "
                 "keep-alives, 3 a TTL, from the library's one async thread). Flood: benches/liveness_flood.py "
                 "(PyTorch's protocol, another process). Burners: `python -c 'while True: pass'`, one per core, "
                 "normal priority. A false failure: a member's call that returned, a group `distcore inspect` "
                 "lists as failed, or a connection the server closed for a failed session "
                 "(connections_refused_total{reason=\"session_failed\"}); every session is then closed "
                 "gracefully. CPU: /proc/PID/stat over the flood.")
    rows, fds = [], {}
    for n in cost_sizes:
        for ttl_ms in cost_ttls:
            if n == "max":
                n, per = largest_n(fds)
            r = results[("cost", n, ttl_ms)] = keepalive_cost(n, ttl_ms, window_s)
            fds.setdefault(n, r["fds"])
            if len(fds) == 1 and "max" in cost_sizes:  # a second, small size: the descriptors a member holds
                fds[16] = keepalive_cost(16, ttl_ms, 1)["fds"]
            rate = 3 * n / (ttl_ms / 1000)
            rows.append([f"{n:,}", f"{ttl_ms / 1000:g} s", f"{rate:,.0f}", f"{r['server_cpu']:.2f}",
                         f"{r['server_cpu'] / 100 / rate * 1e6:.1f}", f"{r['gen_cpu']:.2f}",
                         "yes" if r["server_cpu"] <= 5 else "no", f"{r['completed']}"])
    text += "\n" + table(f"12d. What keep-alives cost (N idle members blocked in a get, {window_s} s measured)",
                         ["N", "TTL", "keep-alives/s (3 a TTL)", "server CPU (% of one core)",
                          "server CPU µs per keep-alive", "generator CPU (% of one core)",
                          "server ≤ 5% of a core", "calls returned"], rows,
                         "CPU from /proc/PID/stat (utime + stime) over the window, after the joins and two TTLs. "
                         "The largest N: the descriptor limit "
                         f"({resource.getrlimit(resource.RLIMIT_NOFILE)[1]:,}) over the descriptors a member "
                         "holds (3 with a TTL: primary, the get's spare, the keep-alives' spare).")
    return text, results


# scenario_torch_adapter's arguments, full and --quick: ops per round, rounds, gloo group sizes.
TORCH_ADAPTER = {False: (3000, 5, [16, 64]), True: (300, 1, [4])}


# scenario_proxy's arguments, full and --quick: ops per round, rounds.
PROXY = {False: (3000, 5), True: (300, 1)}


def scenario_torch_adapter(ops, rounds, group_sizes):
    """Issue 27: PyTorch's own TCPStore client against distcore.torch's
    adapter from Python, on `distcore serve` and on PyTorch's libuv server
    (benches/torch_adapter.py), and the time a gloo group of N processes
    takes from its store's creation to its first barrier with each store
    (rank 0 hosting the server)."""
    rows = []
    for server_kind in ["distcore", "torch libuv"]:
        server = Server(server_kind)
        try:
            out = subprocess.run([sys.executable, f"{HERE}/torch_adapter.py", "latency", str(server.port),
                                  str(ops), str(rounds)], capture_output=True, text=True, check=True, env=ENV).stdout
        finally:
            server.stop()
        got = {(c, op): float(m) for c, op, m in (line.split() for line in out.splitlines())}
        for op in ["set", "get", "add", "check", "wait"]:
            torch_us, ours_us = got[("torch", op)], got[("distcore", op)]
            rows.append([server_kind, op, f"{torch_us:.1f}", f"{ours_us:.1f}", ratio(ours_us, torch_us)])
    text = table(f"13. PyTorch jobs on distcore: store ops from Python ({ops} sequential ops, median of {rounds} "
                 "alternating rounds, µs)", ["server", "op", "PyTorch's TCPStore client", "distcore.torch.TCPStore",
                                            "adapter / PyTorch"], rows,
                 "Target (issue 27): the adapter no slower than PyTorch's client on get, within 1.3× on the rest.")
    rows = []
    for n in group_sizes:
        took = {}
        for kind in ["torch", "distcore"]:
            port = harness.free_port()
            env = dict(ENV, GLOO_SOCKET_IFNAME="lo")
            procs = [subprocess.Popen([sys.executable, f"{HERE}/torch_adapter.py", "rank", kind, str(port), str(r),
                                       str(n)], stdout=subprocess.PIPE, text=True, env=env) for r in range(n)]
            times = [float(read_until(p, "took", 600)[1]) for p in procs]
            for p in procs:
                p.wait(timeout=120)
            took[kind] = max(times)
        rows.append([n, f"{took['torch'] * 1000:.0f}", f"{took['distcore'] * 1000:.0f}",
                     ratio(took["distcore"], took["torch"])])
    text += table("13b. init_process_group (gloo) with each store: ms from the store's creation to the end of the "
                  "first barrier, slowest rank", ["processes", "PyTorch's TCPStore", "distcore.torch.TCPStore",
                                                  "distcore / PyTorch"], rows)
    return text, {}


def scenario_proxy(ops, rounds):
    """Issue 27: what `distcore proxy` costs PyTorch's own TCPStore client
    per operation: the client on `distcore serve` directly, through a proxy
    to that server, and through a proxy to a server that requires TLS and
    the secret (which the client could not reach by itself), in
    alternating rounds (benches/torch_adapter.py paths); the floor is
    socat relaying the bytes to the same server (one more hop, no
    protocol)."""
    tls = os.path.join(ROOT, "tests", "tls")
    secret_dir = tempfile.mkdtemp()
    secret = os.path.join(secret_dir, "secret")
    with open(secret, "w") as f:
        f.write("the proxy benchmark's secret\n")
    plain = Server("distcore")
    secured = Server("distcore", extra=["--secret-file", secret, "--tls-cert", f"{tls}/server.pem", "--tls-key",
                                        f"{tls}/server.key"])
    proxies = []
    try:
        for upstream, extra in [(plain, []), (secured, ["--secret-file", secret, "--tls-ca", f"{tls}/ca.pem",
                                                        "--tls-server-name", "localhost"])]:
            proc = subprocess.Popen([CLI, "proxy", "--port", "0", "--upstream", f"127.0.0.1:{upstream.port}",
                                     *extra], stdout=subprocess.PIPE, text=True, env=ENV)
            proxies.append(proc)
            proc.port = int(read_until(proc, "distcore proxy listening on")[4].rsplit(":", 1)[1])
        relay_port = harness.free_port()
        proxies.append(subprocess.Popen(["socat", f"TCP-LISTEN:{relay_port},bind=127.0.0.1,fork,reuseaddr,nodelay",
                                         f"TCP:127.0.0.1:{plain.port},nodelay"]))
        wait_listening(relay_port)
        paths = {"direct": plain.port, "socat": relay_port, "proxy": proxies[0].port,
                 "proxy+TLS+secret": proxies[1].port}
        out = subprocess.run([sys.executable, f"{HERE}/torch_adapter.py", "paths", str(ops), str(rounds),
                              *(f"{name}={port}" for name, port in paths.items())],
                             capture_output=True, text=True, check=True, env=ENV).stdout
    finally:
        for proc in proxies:
            proc.terminate()
            proc.wait(30)
        plain.stop()
        secured.stop()
        shutil.rmtree(secret_dir, ignore_errors=True)
    got = {(name, op): float(m) for name, op, m in (line.split() for line in out.splitlines())}
    rows = []
    for op in ["set", "get", "add", "check", "wait"]:
        direct = got[("direct", op)]
        rows.append([op, f"{direct:.1f}", f"{got[('socat', op)]:.1f}", f"{got[('proxy', op)]:.1f}",
                     ratio(got[("proxy", op)], got[("socat", op)]), f"{got[('proxy+TLS+secret', op)]:.1f}",
                     ratio(got[("proxy+TLS+secret", op)], got[("socat", op)])])
    text = table(f"13c. `distcore proxy`: PyTorch's TCPStore client directly on `distcore serve` and through a "
                 f"proxy ({ops} sequential ops, median of {rounds} alternating rounds, µs)",
                 ["op", "direct", "socat relay (floor)", "through the proxy", "proxy / floor",
                  "proxy to a TLS+secret server", "TLS proxy / floor"], rows,
                 "The floor is one more loopback hop each way: socat relaying bytes, knowing no protocol. "
                 "SET has no reply: its time is the client's send.")
    return text, {}


def guarded(name, fn, *args):
    """Runs a scenario; one that cannot run is reported, not fatal."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - reported in the tables
        text = f"### {name}\n\nCould not run: {e}\n"
        print(text, flush=True)
        return text, {}


def plot(rendezvous, sizes, scale, path):
    """Rendezvous time against N, and (when measured) the server's CPU per
    rank against N from the scale scenario."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return False
    scale_sizes = sorted({k[1] for k in scale if isinstance(k[1], int)})
    fig, axes = plt.subplots(1, 2 if scale_sizes else 1, figsize=(12 if scale_sizes else 6, 4), squeeze=False)
    ax = axes[0][0]
    for server in ["distcore", "torch libuv"]:
        points = [(n, rendezvous[(server, n)][0]) for n in sizes if rendezvous[(server, n)][0] is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=server)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("clients N (world size N+1)")
    ax.set_ylabel("time until the server has every worker (s)")
    ax.set_title("Rendezvous time against N")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if scale_sizes:
        ax = axes[0][1]
        for server in ["distcore", "torch libuv"]:
            ax.plot(scale_sizes, [scale[(server, n)]["cpu_all"] / n * 1e6 for n in scale_sizes], marker="o",
                    label=f"{server}: server CPU µs per rank")
            ax.plot(scale_sizes, [scale[(server, n)]["rss"] / n / 10 for n in scale_sizes], marker="s",
                    linestyle="--", label=f"{server}: server RSS per rank (×10 B)")
        ax.set_xlabel("ranks N (one epoll generator)")
        ax.set_title("Server cost per rank (join + store barrier)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


GENERATED = "<!-- Everything below is written by benches/bench.py; edit above this line. -->\n"


def preamble(path):
    """What a human wrote above the generated part of `path` (kept across
    runs), or a title."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    if GENERATED in text:
        return text[:text.index(GENERATED)] + GENERATED + "\n"
    return "# Benchmarks: distcore against PyTorch\n\n" + GENERATED + "\n"


def main():
    global SERVERS
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a smoke run well under 2 minutes")
    ap.add_argument("--out", help="write the tables (and the plot beside them) here")
    ap.add_argument("--only", choices=["footprint", "rpc", "fairness", "scale", "latency", "shared", "etcd",
                                       "guards", "liveness", "liveness-flood", "torch-adapter"],
                    help="run one scenario and print it")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    q = args.quick
    if args.only == "liveness-flood":
        # Tables 12c and 12d alone: C members, a Python flood, no torch.
        build({"numeric_names", "liveness_ranks"})
        guarded("12c. Liveness under load", scenario_liveness_flood, *LIVENESS_FLOOD[q])
        return
    ensure_python_packages(full=not args.quick)
    build()
    if args.only == "footprint":
        guarded("5. Footprint", scenario_footprint, 500 if q else 10000, 5000 if q else 100000)
        return
    if args.only == "scale":
        guarded("8. Scale", scenario_scale, [512] if q else [4096, 8192, 16384, 19500],
                None if q else 21000, None if q else 4096)
        return
    if args.only == "fairness":
        guarded("7. Fairness", scenario_fairness, 500 if q else 5000, 2000 if q else 10000, 3 if q else 10)
        return
    if args.only == "shared":
        guarded("9. Shared handle", scenario_shared_handle, 200 if q else 2000)
        return
    if args.only == "latency":
        servers = {kind: Server(kind) for kind in SERVERS}
        try:
            guarded("1. Latency", scenario_latency, servers, 3000 if q else 21000, 1 if q else 3)
        finally:
            for s in servers.values():
                s.stop()
        return
    if args.only == "etcd":
        guarded("10. Stores on etcd", scenario_etcd, *ETCD_SIZES[q])
        return
    if args.only == "rpc":
        guarded("6. RPC and RRef", scenario_rpc, 100 if q else 2000, 1 if q else 3)
        return
    if args.only == "liveness":
        guarded("12. Liveness", scenario_liveness, *LIVENESS_SIZES[q])
        guarded("12c. Liveness under load", scenario_liveness_flood, *LIVENESS_FLOOD[q])
        return
    if args.only == "guards":
        guarded("11. What guards cost", scenario_guards, 50 if q else 500, 1000 if q else 20000, 1 if q else 3)
        return
    if args.only == "torch-adapter":
        guarded("13. PyTorch jobs on distcore", scenario_torch_adapter, *TORCH_ADAPTER[q])
        guarded("13c. distcore proxy", scenario_proxy, *PROXY[q])
        return
    started = time.monotonic()
    command = "build/venv/bin/python benches/bench.py" + (" --quick" if q else "") + (f" --out {args.out}" if args.out else "")
    head = (f"Run on {platform.node()} ({os.cpu_count()} cores, {platform.release()}), "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {__import__('torch').__version__}; "
            f"reproduce with `{command}`.\n")
    print(head)
    sections = [head]
    sizes = [64] if q else [256, 1024, 4096, 8192]
    if q:
        SERVERS = QUICK_SERVERS
    servers = {kind: Server(kind) for kind in SERVERS}
    try:
        text = guarded("1. Latency", scenario_latency, servers, 1000 if q else 21000, 1 if q else 3)[0]
        sections.append(text)
        for conns, procs in [(16, 1)] if q else [(16, 1), (64, 4)]:
            sections.append(guarded("2. Throughput", scenario_throughput, servers, 0.5 if q else 5, conns, procs)[0])
        large_text = guarded("4. Large values", scenario_large, servers, [1, 8] if q else [1, 8, 64], 2 if q else 5)[0]
    finally:
        for s in servers.values():
            s.stop()
    text, rdv = guarded("3. Rendezvous", scenario_rendezvous, sizes)
    sections.append(text)
    if not q:
        sections.append(guarded("3b. Rendezvous, PyTorch's client", scenario_rendezvous, [256], "torch")[0])
    sections.append(large_text)
    sections.append(guarded("5. Footprint", scenario_footprint, 500 if q else 10000, 5000 if q else 100000)[0])
    sections.append(guarded("6. RPC and RRef", scenario_rpc, 100 if q else 2000, 1 if q else 3)[0])
    sections.append(guarded("7. Fairness", scenario_fairness, 500 if q else 5000, 2000 if q else 10000, 3 if q else 10)[0])
    text, scale = guarded("8. Scale", scenario_scale, [512] if q else [4096, 8192, 16384, 19500],
                          None if q else 21000, None if q else 4096)
    sections.append(text)
    sections.append(guarded("9. Shared handle", scenario_shared_handle, 200 if q else 2000)[0])
    sections.append(guarded("10. Stores on etcd", scenario_etcd, *ETCD_SIZES[q])[0])
    sections.append(guarded("11. What guards cost", scenario_guards, 50 if q else 500, 1000 if q else 20000,
                            1 if q else 3)[0])
    sections.append(guarded("12. Liveness", scenario_liveness, *LIVENESS_SIZES[q])[0])
    sections.append(guarded("12c. Liveness under load", scenario_liveness_flood, *LIVENESS_FLOOD[q])[0])
    sections.append(guarded("13. PyTorch jobs on distcore", scenario_torch_adapter, *TORCH_ADAPTER[q])[0])
    sections.append(guarded("13c. distcore proxy", scenario_proxy, *PROXY[q])[0])
    took = time.monotonic() - started
    print(f"all scenarios in {took:.0f} s")
    if args.out:
        png = os.path.splitext(args.out)[0] + "-rendezvous.png"
        if rdv and plot(rdv, sizes, scale, png):
            sections.insert(5, f"![Rendezvous time and server cost per rank against N]({os.path.basename(png)})\n")
        # Read what a human wrote before opening the file (which truncates it).
        kept = preamble(args.out)
        with open(args.out, "w") as f:
            f.write(kept + "\n".join(sections) + f"\nAll scenarios took {took:.0f} s.\n")


if __name__ == "__main__":
    main()
