"""A PyTorch TCPStore server in its own process, for the benchmarks:
    torch_server.py libuv|legacy PORT [WORLD_SIZE]
prints "port N" (once constructed: with a world size, after every worker
joined), then "pid P", and serves until SIGTERM. (It sleeps rather than
blocking on stdin: a main thread parked in sys.stdin.read() made PyTorch's
server crawl under 32+ connections on this machine.)"""
import datetime
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")
import torch.distributed as dist  # noqa: E402

backend, port = sys.argv[1], int(sys.argv[2])
world = int(sys.argv[3]) if len(sys.argv) > 3 else None
store = dist.TCPStore("127.0.0.1", port, world, True, timeout=datetime.timedelta(seconds=900),
                      wait_for_workers=world is not None, use_libuv=backend == "libuv")
print("port", store.port, flush=True)
print("pid", os.getpid(), flush=True)
while True:
    time.sleep(3600)
