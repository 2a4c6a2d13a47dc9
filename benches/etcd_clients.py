"""The store clients the etcd benchmark compares, in a process of their own:

    etcd_clients.py latency    KIND TARGET PREFIX OPS   -> "OP MEDIAN_US P99_US" per op
    etcd_clients.py throughput KIND TARGET PREFIX SECONDS -> "ops N seconds S"

KIND: torchelastic (torch.distributed.elastic's EtcdStore on etcd's v2 API,
through python-etcd; TARGET is HOST:PORT), distcore-etcd (distcore.EtcdStore
on etcd's v3 API; TARGET is HOST:PORT), torch-tcp (PyTorch's TCPStore
client; TARGET is a `distcore serve` HOST:PORT, PREFIX unused). Every client
is driven from Python, so the figures compare stores, not languages."""
import datetime
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")

T = datetime.timedelta


def connect(kind, target, prefix):
    host, port = target.rsplit(":", 1)
    if kind == "torchelastic":
        import etcd
        from torch.distributed.elastic.rendezvous.etcd_store import EtcdStore
        return EtcdStore(etcd.Client(host=host, port=int(port), protocol="http"), prefix, T(seconds=60))
    if kind == "distcore-etcd":
        import distcore
        return distcore.EtcdStore([target], prefix, timeout=T(seconds=60))
    if kind == "torch-tcp":
        import torch.distributed as dist
        return dist.TCPStore(host, int(port), None, False, timeout=T(seconds=60))
    raise SystemExit(f"unknown client kind {kind}")


def latency(store, ops):
    """Each op `ops` times in a row: set (new keys), get, add, check (keys
    that exist); prints the median and p99 in µs."""
    store.set("present", b"x" * 64)
    plans = {
        "set": lambda i: store.set(f"k{i}", b"x" * 64),
        "get": lambda i: store.get("present"),
        "add": lambda i: store.add("counter", 1),
        "check": lambda i: store.check(["present"]),
    }
    for op, call in plans.items():
        samples = []
        for i in range(ops):
            t0 = time.perf_counter()
            call(i)
            samples.append((time.perf_counter() - t0) * 1e6)
        samples.sort()
        print(op, f"{statistics.median(samples):.1f}", f"{samples[int(len(samples) * 0.99) - 1]:.1f}", flush=True)


def throughput(store, seconds):
    """80% get / 20% set over 100 keys for `seconds`."""
    for i in range(100):
        store.set(f"t{i}", b"x" * 64)
    n, end = 0, time.monotonic() + seconds
    t0 = time.monotonic()
    while time.monotonic() < end:
        key = f"t{n % 100}"
        if n % 5 == 0:
            store.set(key, b"y" * 64)
        else:
            store.get(key)
        n += 1
    print("ops", n, "seconds", f"{time.monotonic() - t0:.3f}", flush=True)


if __name__ == "__main__":
    mode, kind, target, prefix, amount = sys.argv[1:6]
    s = connect(kind, target, prefix)
    if mode == "latency":
        latency(s, int(amount))
    else:
        throughput(s, float(amount))
