"""First latency figures: median microseconds of set, get and add for each
client -> server pair, measured in one run on loopback.

    python interop/latency.py [OPS]

Clients are PyTorch's Python TCPStore and the distcore package (ctypes), so both
include a Python call per operation; the C++-level benchmark suite is
issue 6's."""
import datetime
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")
import torch.distributed as dist  # noqa: E402

import distcore  # noqa: E402
import harness  # noqa: E402


def measure(store, ops):
    store.set("lat/get", b"x" * 64)
    results = {}
    for name, fn in (("set", lambda: store.set("lat/set", b"x" * 64)),
                     ("get", lambda: store.get("lat/get")),
                     ("add", lambda: store.add("lat/add", 1))):
        for _ in range(ops // 10):
            fn()
        samples = []
        for _ in range(ops):
            t0 = time.perf_counter_ns()
            fn()
            samples.append(time.perf_counter_ns() - t0)
        results[name] = statistics.median(samples) / 1e3
    return results


def main():
    ops = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    cli = harness.CliServer()
    torch_uv = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False, use_libuv=True)
    torch_legacy = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False, use_libuv=False)
    servers = {"distcore": cli.port, "torch libuv": torch_uv.port, "torch legacy": torch_legacy.port}
    clients = {
        "torch (python)": lambda port: dist.TCPStore("127.0.0.1", port, None, False,
                                                     timeout=datetime.timedelta(seconds=30)),
        "distcore (ctypes)": lambda port: distcore.TCPStore("127.0.0.1", port,
                                                            timeout=datetime.timedelta(seconds=30)),
    }
    print(f"median µs over {ops} ops each, loopback, one run")
    print(f"{'client':<20} {'server':<14} {'set':>8} {'get':>8} {'add':>8}")
    for cname, make in clients.items():
        for sname, port in servers.items():
            r = measure(make(port), ops)
            print(f"{cname:<20} {sname:<14} {r['set']:>8.1f} {r['get']:>8.1f} {r['add']:>8.1f}")
    cli.stop()
    harness.kill_all()


if __name__ == "__main__":
    main()
