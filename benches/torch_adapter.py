"""Scenario 13's processes (benches/bench.py): PyTorch's own TCPStore
client against distcore.torch's adapter, from Python.

    torch_adapter.py latency PORT OPS ROUNDS   medians of set/get/add/check/wait (µs), both clients
                                               in alternating rounds: lines "CLIENT OP MEDIAN"
    torch_adapter.py paths OPS ROUNDS NAME=PORT...
                                               the same for PyTorch's client alone on each PORT (a
                                               server directly, or through `distcore proxy`): lines
                                               "NAME OP MEDIAN"
    torch_adapter.py rank KIND PORT RANK WORLD one rank of a gloo group whose store is KIND ("torch":
                                               PyTorch's TCPStore, "distcore": distcore.torch's;
                                               rank 0 hosts the server): "took SECONDS" from the
                                               store's creation to the end of the first barrier
"""
import datetime
import statistics
import sys
import time

import torch.distributed as dist

import distcore.torch as dct

T = datetime.timedelta


def client(kind, port, world=None, is_master=False):
    cls = dist.TCPStore if kind == "torch" else dct.TCPStore
    return cls("127.0.0.1", port, world, is_master, timeout=T(seconds=120))


def latency(stores, ops, rounds):
    """Medians of each op on each of `stores` (by name), in alternating rounds."""
    for store in stores.values():
        store.set("k", b"v" * 16)
    calls = {
        "set": lambda s: s.set("k", b"v" * 16),
        "get": lambda s: s.get("k"),
        "add": lambda s: s.add("n", 1),
        "check": lambda s: s.check(["k"]),
        "wait": lambda s: s.wait(["k"]),
    }
    medians = {}
    for _ in range(rounds):
        for op, call in calls.items():
            for kind, store in stores.items():
                for _ in range(ops // 10):  # warm
                    call(store)
                took = []
                for _ in range(ops):
                    t0 = time.perf_counter_ns()
                    call(store)
                    took.append(time.perf_counter_ns() - t0)
                medians.setdefault((kind, op), []).append(statistics.median(took) / 1000)
    for (kind, op), runs in medians.items():
        print(kind, op, f"{statistics.median(runs):.2f}", flush=True)


def rank(kind, port, rank_, world):
    started = time.monotonic()
    store = client(kind, port, world, rank_ == 0)
    dist.init_process_group("gloo", store=store, rank=rank_, world_size=world, timeout=T(seconds=300))
    dist.barrier()
    took = time.monotonic() - started
    dist.barrier()  # nobody's store goes before every rank measured
    dist.destroy_process_group()
    print(f"took {took:.4f}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "latency":
        port = int(sys.argv[2])
        latency({kind: client(kind, port) for kind in ("torch", "distcore")}, int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "paths":
        paths = dict(arg.split("=") for arg in sys.argv[4:])
        latency({name: client("torch", int(port)) for name, port in paths.items()}, int(sys.argv[2]),
                int(sys.argv[3]))
    else:
        rank(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
