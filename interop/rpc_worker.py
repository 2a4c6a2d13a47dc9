"""A Python worker process of an RPC group (through the distcore package):
    rpc_worker.py PORT RANK WORLD MODE
MODE "serve": serve until every worker shuts down gracefully.
MODE "hold": serve, hold an RRef owned by worker 0 and own one it holds,
print "holding", then wait to be killed."""
import sys
import time
from datetime import timedelta

import distcore
from distcore import rpc

port, rank, world, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
store = distcore.TCPStore("127.0.0.1", port, timeout=timedelta(seconds=30))


def fetch(args, rrefs, caller_id):
    return rrefs[0].to_here()


def echo(args, rrefs, caller_id):
    return args


def fail(args, rrefs, caller_id):
    raise ValueError("python function failed")


agent = rpc.init_rpc(f"py{rank}", rank, world, store, {"echo": echo, "fetch": fetch, "fail": fail},
                     rpc_timeout=30)
if mode == "hold":
    held = agent.remote("py0", "echo", b"held by a doomed worker")
    held.to_here()
    print("holding", flush=True)
    time.sleep(3600)
agent.shutdown(True, 30)


def counters():
    return tuple(agent.get_debug_info().values())


deadline = time.monotonic() + 30
while counters() != (0, 0, 0, 0) and time.monotonic() < deadline:
    time.sleep(0.01)
print("settled", counters(), flush=True)
agent.close()
