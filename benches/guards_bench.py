"""One client's cost of connecting and of a GET, for bench.py's scenario
"11. What guards cost": `guards_bench.py CLIENT PORT CONNECTS OPS [OPTION=VALUE ...]`
with CLIENT `distcore` (the Python binding; options are its TCPStore's
keyword arguments: secret, tls_ca, tls_cert, tls_key) or `torch` (PyTorch's
TCPStore). Prints `connect MEDIAN_US` and `get MEDIAN_US`: the medians of
CONNECTS connections (handshake, authentication and TLS included) and of OPS
GETs of a 64-byte value on one of them. Both clients are called from Python,
so both figures carry the same few microseconds of interpreter."""
import statistics
import sys
import time
from datetime import timedelta


def main():
    client, port, connects, ops = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    options = dict(arg.split("=", 1) for arg in sys.argv[5:])
    if client == "torch":
        import torch.distributed as dist

        def connect():
            return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
    else:
        import distcore

        def connect():
            return distcore.TCPStore("127.0.0.1", port, timeout=timedelta(seconds=30), **options)
    times = []
    for _ in range(connects):
        started = time.perf_counter()
        store = connect()
        times.append(time.perf_counter() - started)
        del store
    print(f"connect {statistics.median(times) * 1e6:.1f}")
    store = connect()
    store.set("guards/k", b"v" * 64)
    times = []
    for _ in range(ops):
        started = time.perf_counter()
        store.get("guards/k")
        times.append(time.perf_counter() - started)
    print(f"get {statistics.median(times) * 1e6:.1f}")


if __name__ == "__main__":
    main()
