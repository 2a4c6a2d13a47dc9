"""One member of a job for bench.py's liveness scenario: connects to the
store at 127.0.0.1:PORT, joins (distcore: a session of RANK in GROUP, with
a TTL of TTL_MS if not 0; torch: nothing to join), says "ready", then
blocks in a get of a key nobody sets. When the get returns, it prints
"done <CLOCK_MONOTONIC ns> <error class> <message>" and exits.

    liveness_member.py distcore|torch PORT GROUP RANK WORLD TTL_MS TIMEOUT_S
"""
import sys
import time
from datetime import timedelta

kind, port, group, rank, world, ttl_ms, timeout_s = sys.argv[1:8]
port, rank, world, ttl_ms, timeout = int(port), int(rank), int(world), int(ttl_ms), timedelta(seconds=float(timeout_s))
if kind == "distcore":
    import distcore
    store = distcore.TCPStore("127.0.0.1", port, timeout=timeout)
    store.open_session(group, rank, world_size=world, ttl=timedelta(milliseconds=ttl_ms) if ttl_ms else None)
else:
    import torch.distributed as dist
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout, use_libuv=True)
print("ready", flush=True)
try:
    store.get(f"{group}never-set")
    outcome = "none returned"
except Exception as e:  # noqa: BLE001 - what the survivor got is the measurement
    outcome = f"{type(e).__name__} {str(e).splitlines()[0] if str(e) else ''}"
print(f"done {time.monotonic_ns()} {outcome}", flush=True)
