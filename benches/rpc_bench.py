"""rpc_sync and remote()+to_here latency: distcore (its Python package, over
the C ABI via ctypes) against torch.distributed.rpc (TensorPipe), both driven from Python,
two processes on loopback.
    rpc_bench.py CALLS            -> "system<TAB>call<TAB>median_us" lines
    rpc_bench.py worker SYSTEM RANK PORT CALLS   (internal)"""
import os
import socket
import statistics
import subprocess
import sys
import time
import warnings

warnings.filterwarnings("ignore")
SIZES = [("64 B", 64), ("64 KiB", 64 << 10), ("1 MiB", 1 << 20)]


def echo(x):
    return x


def timed(calls, fn):
    for _ in range(max(calls // 10, 20)):
        fn()
    samples = []
    for _ in range(calls):
        t = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t)
    return statistics.median(samples) / 1e3


def torch_worker(rank, port, calls):
    import torch.distributed.rpc as rpc
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TP_SOCKET_IFNAME="lo",
                      GLOO_SOCKET_IFNAME="lo")
    opts = rpc.TensorPipeRpcBackendOptions(rpc_timeout=120, init_method=f"tcp://127.0.0.1:{port}")
    rpc.init_rpc(f"w{rank}", rank=rank, world_size=2, rpc_backend_options=opts)
    if rank == 0:
        for name, size in SIZES:
            payload = b"x" * size
            print(f"torch\trpc_sync {name}\t{timed(calls, lambda: rpc.rpc_sync('w1', echo, args=(payload,))):.1f}",
                  flush=True)
        payload = b"x" * 64
        print(f"torch\tremote + to_here 64 B\t{timed(calls, lambda: rpc.remote('w1', echo, args=(payload,)).to_here()):.1f}",
              flush=True)
    rpc.shutdown()


def distcore_worker(rank, port, calls):
    import distcore
    from distcore import rpc
    store = distcore.TCPStore("127.0.0.1", port, is_master=rank == 0)
    r = rpc.RpcAgent(f"w{rank}", rank, 2, store, {"echo": lambda args, rrefs, caller_id: args}, rpc_timeout=120)
    if rank == 0:
        for name, size in SIZES:
            payload = b"x" * size
            print(f"distcore\trpc_sync {name}\t{timed(calls, lambda: r.rpc_sync('w1', 'echo', payload)):.1f}",
                  flush=True)
        payload = b"x" * 64

        def remote_to_here():
            ref = r.remote("w1", "echo", payload)
            ref.to_here()
            ref.close()
        print(f"distcore\tremote + to_here 64 B\t{timed(calls, remote_to_here):.1f}", flush=True)
    r.shutdown(True, 120)
    r.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    if sys.argv[1] == "worker":
        system, rank, port, calls = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        (torch_worker if system == "torch" else distcore_worker)(rank, port, calls)
        return
    calls = int(sys.argv[1])
    for system in ["distcore", "torch"]:
        port = free_port()
        procs = [subprocess.Popen([sys.executable, __file__, "worker", system, str(r), str(port), str(calls)],
                                  stdout=subprocess.PIPE, text=True) for r in range(2)]
        out = procs[0].communicate(timeout=900)[0]
        procs[1].wait(900)
        if procs[0].returncode or procs[1].returncode:
            sys.exit(f"{system} RPC benchmark failed")
        sys.stdout.write(out)


if __name__ == "__main__":
    main()
