"""The anchors of bench.py's liveness scenario (issue 26): how soon other
systems tell the survivors that a member died (SIGKILL, "crash") or froze
(SIGSTOP, "silent"). Each measurement prints

    kill NS            CLOCK_MONOTONIC ns just before the signal (one a trial)
    times NS NS ...    when each survivor learned (0: it never did)
    got TEXT           what the first survivor got

Run with the anchors' venv (bench.py's ensure_anchor_packages: jax, torchft),
which sees the bench venv's packages (torch) through a .pth file:

    liveness_anchors.py etcd TTL_S crash|silent TRIALS [ETCD FLAGS...]
        a holder process keeps a key on a lease of TTL_S (etcd raises it to
        its minimum, printed as "granted"); the watcher here times the DELETE
    liveness_anchors.py jax N crash|silent HEARTBEAT_S
        N processes in jax.distributed.initialize (CPU), each blocked in the
        coordination service's blocking_key_value_get; survivors learn when
        the get raises or the process is aborted
    liveness_anchors.py torchft N crash|silent HEARTBEAT_TIMEOUT_MS JOIN_TIMEOUT_MS
        a torchft lighthouse (min_replicas 1) and N replicas heart-beating
        every 100 ms and asking for quorum in a loop; survivors learn when
        their quorum no longer has the dead one. The lighthouse leaves out a
        replica that still heart-beats once JOIN_TIMEOUT_MS passed without
        it (dead or only late): the torchft_lighthouse command's default is
        60,000, the Python LighthouseServer's 100
"""
import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import timedelta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "interop"))
import harness  # noqa: E402 - the tests' process helpers, from interop/

SELF = os.path.abspath(__file__)


def strike(proc, failure):
    """SIGKILLs (crash) or SIGSTOPs (silent) `proc`; CLOCK_MONOTONIC ns just before."""
    started = time.monotonic_ns()
    os.kill(proc.pid, signal.SIGKILL if failure == "crash" else signal.SIGSTOP)
    return started


def spawn(*args, env=None):
    return harness.track(subprocess.Popen([sys.executable, SELF, *map(str, args)], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, env=env))


def report(kills, times, got):
    print("kill", *kills)
    print("times", *times)
    print("got", " ".join(got.split())[:300], flush=True)


# etcd: a key on a lease, a watcher.

def b64(s):
    return base64.b64encode(s.encode()).decode()


def etcd_post(endpoint, path, body):
    with urllib.request.urlopen(f"http://{endpoint}{path}", data=json.dumps(body).encode(), timeout=10) as r:
        return json.load(r)


def etcd_holder(endpoint, key, ttl_s):
    """Grants a lease, puts `key` on it, and keeps it alive every TTL/3 (as
    etcdctl lease keep-alive does) until killed."""
    lease = etcd_post(endpoint, "/v3/lease/grant", {"TTL": int(ttl_s)})
    etcd_post(endpoint, "/v3/kv/put", {"key": b64(key), "value": b64("alive"), "lease": lease["ID"]})
    print("ready granted", lease["TTL"], flush=True)
    while True:
        time.sleep(int(lease["TTL"]) / 3)
        etcd_post(endpoint, "/v3/lease/keepalive", {"ID": lease["ID"]})


def etcd_deleted(endpoint, key, ready):
    """Watches `key` and returns the CLOCK_MONOTONIC ns of its DELETE (sets
    `ready` once the watch is in place)."""
    import http.client
    host, port = endpoint.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request("POST", "/v3/watch", json.dumps({"create_request": {"key": b64(key)}}))
        response = conn.getresponse()
        while True:
            line = response.readline()
            if not line:
                raise RuntimeError("the watch ended")
            result = json.loads(line)["result"]
            if result.get("created"):
                ready.set()
            if any(e.get("type") == "DELETE" for e in result.get("events", [])):
                return time.monotonic_ns()
    finally:
        conn.close()


def measure_etcd(ttl_s, failure, trials, *flags):
    cluster = harness.EtcdCluster(extra=list(flags))
    endpoint = cluster.endpoints[0]
    kills, times, granted = [], [], None
    try:
        for trial in range(int(trials)):
            key = f"/liveness/{failure}/{trial}"
            holder = spawn("etcd-holder", endpoint, key, ttl_s)
            granted = harness._read_line(holder, "ready", 60).split()[2]
            ready, seen = threading.Event(), []
            watcher = threading.Thread(target=lambda: seen.append(etcd_deleted(endpoint, key, ready)), daemon=True)
            watcher.start()
            ready.wait(30)
            time.sleep(0.2 + 0.1 * trial)  # strike at different points of the keep-alive period
            kills.append(strike(holder, failure))
            watcher.join(60)
            times.append(seen[0] if seen else 0)
            holder.kill()
            holder.wait()
    finally:
        harness.kill_all()
        cluster.stop()
    report(kills, times, f"a DELETE event for the key (lease granted TTL {granted} s)")


# JAX's coordination service.

def jax_member(port, n, rank, heartbeat_s):
    import jax
    jax.distributed.initialize(f"127.0.0.1:{port}", int(n), int(rank), heartbeat_timeout_seconds=int(heartbeat_s))
    from jax._src.distributed import global_state
    print("ready", flush=True)
    try:
        global_state.client.blocking_key_value_get("never-set", 3_600_000)
        outcome = "returned"
    except Exception as e:  # noqa: BLE001 - what the survivor got is the measurement
        outcome = f"{type(e).__name__}: {e}"
    print(f"done {time.monotonic_ns()} {outcome}", flush=True)
    os._exit(0)


def learned(proc, out):
    """Waits for `proc`'s "done" line or its exit, whichever comes first:
    appends (ns, what it got) to `out`."""
    line = proc.stdout.readline()
    t = time.monotonic_ns()
    if line.startswith("done"):
        _, ns, what = line.split(" ", 2)
        out.append((int(ns), what.strip()))
        return
    proc.wait()
    err = [line for line in proc.stderr.read().splitlines() if line.strip()]
    # JAX logs the coordination service's error, then aborts in a stack trace.
    said = [line for line in err if "task" in line.lower() and ("error" in line.lower() or "heartbeat" in line.lower())]
    out.append((t, f"process exited ({proc.returncode}): " + (said or err or [""])[0]))


def measure_members(procs, failure, timeout):
    """Once every process said "ready", the last is struck: when each
    survivor learned."""
    for p in procs:
        harness._read_line(p, "ready", 600)
    time.sleep(1.0)  # every survivor blocked by now
    results = [[] for _ in procs[:-1]]
    watchers = [threading.Thread(target=learned, args=(p, r), daemon=True) for p, r in zip(procs, results)]
    started = strike(procs[-1], failure)
    for w in watchers:
        w.start()
    deadline = time.monotonic() + timeout
    for w in watchers:
        w.join(max(0.0, deadline - time.monotonic()))
    harness.kill_all()
    firsts = sorted((r[0] for r in results if r), key=lambda x: x[0])
    report([started], [r[0][0] if r else 0 for r in results], firsts[0][1] if firsts else "nothing")


def measure_jax(n, failure, heartbeat_s):
    port = harness.free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [spawn("jax-member", port, n, rank, heartbeat_s, env=env) for rank in range(int(n))]
    measure_members(procs, failure, int(heartbeat_s) * 3 + 60)


# torchft's lighthouse.

def torchft_replica(address, replica_id, n):
    """Heart-beats every 100 ms (a ManagerServer's default) and asks for
    quorum in a loop; says "ready" once in a quorum of all `n`, and "done"
    at its first quorum that no longer has replica n-1."""
    from torchft.coordination import LighthouseClient
    client = LighthouseClient(address, connect_timeout=timedelta(seconds=10))

    def beat():
        while True:
            client.heartbeat(replica_id)
            time.sleep(0.1)
    threading.Thread(target=beat, daemon=True).start()
    said_ready = False
    while True:
        quorum = client.quorum(replica_id=replica_id, timeout=timedelta(seconds=120), step=0, world_size=1)
        ids = {m.replica_id for m in quorum.participants}
        if len(ids) == int(n) and not said_ready:
            print("ready", flush=True)
            said_ready = True
        elif said_ready and f"replica{int(n) - 1}" not in ids:
            print(f"done {time.monotonic_ns()} a quorum of {len(ids)} without replica{int(n) - 1}", flush=True)
            os._exit(0)
        time.sleep(0.05)  # a training step


def measure_torchft(n, failure, heartbeat_timeout_ms, join_timeout_ms):
    from torchft.coordination import LighthouseServer
    lighthouse = LighthouseServer(bind="127.0.0.1:0", min_replicas=1, join_timeout_ms=int(join_timeout_ms),
                                  heartbeat_timeout_ms=int(heartbeat_timeout_ms))
    try:
        procs = [spawn("torchft-replica", lighthouse.address(), f"replica{i}", n) for i in range(int(n))]
        measure_members(procs, failure, int(heartbeat_timeout_ms) / 1000 * 3 + 30)
    finally:
        lighthouse.shutdown()


COMMANDS = {"etcd": measure_etcd, "etcd-holder": etcd_holder, "jax": measure_jax, "jax-member": jax_member,
            "torchft": measure_torchft, "torchft-replica": torchft_replica}

if __name__ == "__main__":
    COMMANDS[sys.argv[1]](*sys.argv[2:])
