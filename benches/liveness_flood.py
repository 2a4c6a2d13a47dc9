"""The flood of bench.py's table 12c: another client loading the TCPStore
server while liveness sessions must stay alive (issue 26: no false
failures). PyTorch's wire protocol, raw sockets, no distcore:

    liveness_flood.py PORT SECONDS CONNS BIG_MIB

- CONNS connections, each pipelining SET (100 B) / GET / ADD on 64 keys of
  its own as fast as the server takes them (the same batch sent again and
  again, replies drained and counted by a reader thread: GET 8 + 100 B,
  ADD 8 B, SET none);
- one connection setting and getting back a value of BIG_MIB MiB, one
  request at a time (0: none).

Prints "flooding" once every connection sent, and after SECONDS:
    flood OPS SECONDS BIG_BYTES CPU   (small requests answered; bytes of
                                       large values moved, both directions;
                                       this process's CPU seconds)
"""
import os
import socket
import struct
import sys
import threading
import time

MAGIC = struct.pack("<I", 0x3C85F7CE)
KEYS = 64
VALUE = b"v" * 100
REPLY = 8 + len(VALUE) + 8  # a GET's and an ADD's replies: one SET/GET/ADD triple


def key(b):
    return struct.pack("<Q", len(b)) + b


def connect(port):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(bytes([0]) + MAGIC)
    return s


def small(port, c, counts, started):
    s = connect(port)
    batch = b""
    for i in range(KEYS):
        k = key(f"/flood/{c}/{i}".encode())
        batch += (bytes([0x01]) + k + struct.pack("<Q", len(VALUE)) + VALUE + bytes([0x03]) + k +
                  bytes([0x04]) + key(f"/flood/{c}/n".encode()) + struct.pack("<q", 1))

    def drain():
        while True:
            got = s.recv(1 << 20)
            if not got:
                return
            counts[c] += len(got)

    threading.Thread(target=drain, daemon=True).start()
    started.release()
    while True:
        s.sendall(batch)


def read_exactly(s, n):
    got = 0
    while got < n:
        chunk = s.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        got += len(chunk)


def big(port, mib, moved, started):
    s = connect(port)
    value = b"b" * (mib << 20)
    k = key(b"/flood/big")
    set_ = bytes([0x01]) + k + struct.pack("<Q", len(value))
    started.release()
    while True:
        s.sendall(set_)
        s.sendall(value)
        s.sendall(bytes([0x03]) + k)
        read_exactly(s, 8 + len(value))
        moved[0] += 2 * len(value)


def main():
    port, seconds, conns, mib = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    counts, moved = [0] * conns, [0]
    started = threading.Semaphore(0)
    threads = [threading.Thread(target=small, args=(port, c, counts, started), daemon=True) for c in range(conns)]
    if mib:
        threads.append(threading.Thread(target=big, args=(port, mib, moved, started), daemon=True))
    for t in threads:
        t.start()
    for _ in threads:
        started.acquire()
    t0 = time.monotonic()
    print("flooding", flush=True)
    time.sleep(seconds)
    took = time.monotonic() - t0
    cpu = os.times()
    print(f"flood {sum(counts) // REPLY * 3} {took:.3f} {moved[0]} {cpu.user + cpu.system:.2f}", flush=True)


if __name__ == "__main__":
    main()
