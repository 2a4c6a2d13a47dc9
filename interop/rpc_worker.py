"""A Python worker process of an RPC group (through ctypes):
    rpc_worker.py PORT RANK WORLD MODE
MODE "serve": serve until every worker shuts down gracefully.
MODE "hold": serve, hold an RRef owned by worker 0 and own one it holds,
print "holding", then wait to be killed."""
import sys
import time

import distcore_ctypes as dc

port, rank, world, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
api = dc.Api()
store = dc.Store.tcp(api, port, timeout_ms=30000)
rpc = None


def fetch(args, rrefs):
    return rrefs[0].to_here()


def echo(args, rrefs):
    return args


def fail(args, rrefs):
    raise ValueError("python function failed")


rpc = dc.Rpc(api, store, f"py{rank}", rank, world, {"echo": echo, "fetch": fetch, "fail": fail})
if mode == "hold":
    held = rpc.remote("py0", "echo", b"held by a doomed worker")
    held.to_here()
    print("holding", flush=True)
    time.sleep(3600)
rpc.shutdown(True, 30000)
deadline = time.monotonic() + 30
while rpc.debug_info() != (0, 0, 0, 0) and time.monotonic() < deadline:
    time.sleep(0.01)
print("settled", rpc.debug_info(), flush=True)
rpc.close()
