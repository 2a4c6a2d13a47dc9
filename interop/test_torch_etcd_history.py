"""What `serve --backend etcd` promises, checked the way Jepsen would:
against etcd's own history of every change, under real faults.

A 3-member etcd cluster, two front-ends on one prefix (each listing a
different member first), and client processes, PyTorch's and distcore's,
writing registers (sets of unique values to shared keys), a queue of
unique elements (pushes and pops), a counter and a compare_set chain,
while members are frozen with SIGSTOP for longer than every internal
timeout (the etcd client gives up on a silent member after 5 s), the
leader is killed, quorum is lost and a front-end is killed and restarted
on its port. Then etcd's history (a watch from revision 1) must show:

- every acknowledged write applied, and no value applied twice;
- writes to a key applied in real-time order: one whose call ended
  (acknowledged or failed) before another began never lands after it;
- every queue element created once and deleted once at most, in FIFO
  order, none returned to two poppers, every acknowledged push either
  popped or still queued, and a blocking pop on the empty queue waiting
  without spinning on etcd;
- the counter within [acknowledged adds, + adds whose outcome is unknown],
  and each compare_set applied on the value it expected;
- both front-ends agreeing with etcd, key by key and on the queue.

A set, multi_set or queue_push has no reply in PyTorch's protocol: it is
acknowledged by the next reply on its connection (a check here).
DISTCORE_HISTORY_ROUNDS=N runs the workload N times."""
import datetime
import json
import os
import subprocess
import sys
import time
import unittest
import warnings

warnings.filterwarnings("ignore")

import harness  # noqa: E402

T = datetime.timedelta
PREFIX = "history"
# The etcd keys of etcd://.../history, and of a TCPStore client's key k
# (PyTorch's clients, and distcore's, send it as "/k").
ETCD_PREFIX = f"/{PREFIX}"
VALUES = f"{ETCD_PREFIX}/v//".encode()
QUEUE = f"{ETCD_PREFIX}/q//q\xff".encode("latin-1")
REGISTERS = [f"r{i}" for i in range(3)]
CLIENT_TIMEOUT_S = 25
# Shorter than the quorum loss below: front-ends fail requests they could
# not make, which etcd may still apply once quorum is back.
BACKEND_TIMEOUT_S = 8
QUORUM_LOSS_S = 10
SECONDS = 36

# One client process: `kind` (torch or distcore) on the front-end at
# `port`, until `seconds` have passed; prints its operations as JSON, each
# with `ok` True (acknowledged), False (refused: a compare_set that lost)
# or None (unknown: the call failed, the write may or may not be made).
WORKER = """
import datetime, json, sys, time
kind, port, me, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
registers = sys.argv[5].split(",")
T = datetime.timedelta(seconds=%(timeout)d)
if kind == "torch":
    import torch.distributed as d
else:
    import distcore as d

def connect(until):
    while True:
        try:
            return d.TCPStore("127.0.0.1", port, None, False, timeout=T)
        except Exception:
            if time.monotonic() > until:
                raise
            time.sleep(0.2)

end = time.monotonic() + seconds
s = connect(end + 30)
ops, n = [], 0
while time.monotonic() < end:
    n += 1
    kind_of_op = ("set", "push", "pop", "add", "set", "cas", "pop")[n %% 7]
    value = f"{me}.{n}"
    op = dict(op=kind_of_op, start=time.monotonic(), ok=None)
    try:
        if kind_of_op == "set":
            op.update(key=registers[n %% len(registers)], value=value)
            s.set(op["key"], value)
            s.check(["ack"])
            op["ok"] = True
        elif kind_of_op == "push":
            op.update(key="q", value=value)
            s.queue_push("q", value)
            s.check(["ack"])
            op["ok"] = True
        elif kind_of_op == "pop":
            try:
                op["value"] = s.queue_pop("q", False).decode()
            except d.QueueEmptyError:
                op["value"] = None
            op["ok"] = True
        elif kind_of_op == "add":
            s.add("ctr", 1)
            op["ok"] = True
        else:
            op.update(key="cas", value=value)
            op["expected"] = s.get("cas").decode()
            op["ok"] = s.compare_set("cas", op["expected"], value).decode() == value
    except Exception as e:
        op["error"] = f"{type(e).__name__}: {e}"
        if kind == "torch":
            s = connect(time.monotonic() + 60)  # PyTorch's handle does not reconnect
    op["end"] = time.monotonic()
    ops.append(op)
print(json.dumps(ops))
""" % dict(timeout=CLIENT_TIMEOUT_S)


def worker(kind, port, me):
    env = dict(os.environ, PYTHONPATH=harness.HERE, LD_PRELOAD=harness.numeric_names())
    return harness.track(subprocess.Popen(
        [sys.executable, "-c", WORKER, kind, str(port), str(me), str(SECONDS), ",".join(REGISTERS)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))


def torch_client(port):
    import torch.distributed as dist
    return dist.TCPStore("127.0.0.1", port, None, False, timeout=T(seconds=CLIENT_TIMEOUT_S))


class Faults:
    """The faults, in order, each with its start time and what it did."""

    def __init__(self, cluster, frontends):
        self.cluster, self.frontends, self.log = cluster, frontends, []

    def note(self, what):
        self.log.append(f"{time.monotonic() - self.began:5.1f} s  {what}")

    def pause(self, members, seconds):
        for m in members:
            self.cluster.pause(m)
        self.note(f"SIGSTOP member(s) {members} for {seconds} s")
        time.sleep(seconds)
        for m in members:
            self.cluster.resume(m)
        self.note(f"SIGCONT member(s) {members}")

    def run(self):
        self.began = time.monotonic()
        time.sleep(2)
        self.pause([0], 7)  # the member front-end 0 talks to
        time.sleep(1)
        leader = self.cluster.leader()
        if leader is not None:
            self.cluster.kill(leader)
            self.note(f"SIGKILL leader {leader}")
            time.sleep(3)
            self.cluster.start(leader)
            self.note(f"restart member {leader}")
        time.sleep(1)
        old = self.frontends[0]
        old.kill()
        self.note("SIGKILL front-end 0")
        time.sleep(1)
        self.frontends[0] = frontend(self.cluster, 0, port=old.port)
        self.note("front-end 0 restarted on its port")
        time.sleep(1)
        self.pause([0, 2], QUORUM_LOSS_S)  # no quorum, past every timeout but the client's
        time.sleep(1)
        self.pause([1], 7)  # the member front-end 1 talks to


def frontend(cluster, first, port=0):
    return harness.CliServer(backend=cluster.url(PREFIX, first=first),
                             args=["--backend-timeout", str(BACKEND_TIMEOUT_S)], port=port)


class History:
    """etcd's history under the prefix, by store key."""

    def __init__(self, events):
        self.events = events
        self.writes = {}  # register or cas key: [value, ...] in revision order
        self.queue = []  # ("PUT" or "DELETE", element key, value, revision)
        self.last = {}
        for e in events:
            if e["key"].startswith(VALUES):
                key = e["key"][len(VALUES):].decode()
                if e["type"] == "PUT":
                    self.writes.setdefault(key, []).append(e["value"].decode())
                    self.last[key] = e["value"].decode()
                else:
                    self.last.pop(key, None)
            elif e["key"].startswith(QUEUE):
                self.queue.append((e["type"], e["key"], e["value"].decode(), e["revision"]))


def check(ops, history):
    """The promises the module's docstring lists that `ops` (every client's
    operations) and `history` break: a list of what went wrong."""
    wrong = []
    by_key = {}
    for op in ops:
        if op["op"] in ("set", "cas") and op["ok"] is not False:
            by_key.setdefault(op["key"], []).append(op)
    for key, writes in by_key.items():
        applied = history.writes.get(key, [])
        position = {}
        for i, value in enumerate(applied):
            if value in position:
                wrong.append(f"{key}: {value} applied twice (writes {position[value]} and {i} "
                             f"of {len(applied)}: {applied[position[value]:i + 1][:8]})")
            position[value] = i
        for op in writes:
            if op["ok"] and op["value"] not in position:
                wrong.append(f"{key}: acknowledged {op['value']} never applied")
        # Applied writes in history order: none may have begun after a
        # later-applied one ended.
        landed = sorted((op for op in writes if op["value"] in position), key=lambda o: position[o["value"]])
        latest_start = None
        for op in landed:
            if latest_start and latest_start[0] > op["end"]:
                wrong.append(f"{key}: {op['value']} (call ended at {op['end']:.3f}, ok={op['ok']}) "
                             f"applied after {latest_start[1]}, which began later ({latest_start[0]:.3f})")
            if not latest_start or op["start"] > latest_start[0]:
                latest_start = (op["start"], op["value"])
            if op["op"] == "cas":
                before = applied[position[op["value"]] - 1] if position[op["value"]] else None
                if before != op.get("expected"):  # None: its get failed, it was never sent
                    wrong.append(f"cas: {op['value']} expected {op.get('expected')} but was applied on {before}")

    created, deleted, present = {}, {}, {}
    fifo_broken = 0
    for kind, element, value, revision in history.queue:
        if kind == "PUT":
            if value in created:
                wrong.append(f"queue: {value} pushed twice")
            created[value] = revision
            present[element] = (revision, value)
        else:
            got = present.pop(element, None)
            if got is None:
                continue
            value = got[1]
            if value in deleted:
                wrong.append(f"queue: {value} popped twice")
            deleted[value] = revision
            if present and min(present.values())[0] < got[0]:
                fifo_broken += 1
    if fifo_broken:
        wrong.append(f"queue: {fifo_broken} pops took an element while an older one was queued")
    popped = [op["value"] for op in ops if op["op"] == "pop" and op["ok"] and op["value"] is not None]
    if len(popped) != len(set(popped)):
        wrong.append(f"queue: {len(popped) - len(set(popped))} elements returned to two poppers")
    for value in popped:
        if value not in deleted:
            wrong.append(f"queue: {value} returned by a pop but never deleted in etcd")
    unknown_pops = sum(op["op"] == "pop" and op["ok"] is None for op in ops)
    if len(deleted) - len(set(popped)) > unknown_pops:
        wrong.append(f"queue: {len(deleted)} elements deleted, {len(set(popped))} returned, "
                     f"only {unknown_pops} pops failed")
    for op in ops:
        if op["op"] == "push" and op["ok"] and op["value"] not in created:
            wrong.append(f"queue: acknowledged push {op['value']} never applied")
    return wrong, [v for _, v in sorted(present.values())]


class EtcdHistoryUnderFaults(unittest.TestCase):
    def setUp(self):
        self.cluster = harness.EtcdCluster(members=3)
        self.frontends = []

    def tearDown(self):
        for server in self.frontends:
            if server.proc.poll() is None:
                server.kill()
        self.cluster.stop()

    def test_acknowledged_writes_land_once_in_order_and_every_view_agrees(self):
        rounds = int(os.environ.get("DISTCORE_HISTORY_ROUNDS", "1"))
        broken = {}
        for round in range(rounds):
            if round:
                self.tearDown()
                self.setUp()
            wrong = self.one_round()
            if wrong:
                broken[round] = wrong
        print(f"\n{len(broken)} of {rounds} rounds broke a promise")
        self.assertEqual(broken, {}, "rounds with broken promises")

    def one_round(self):
        """One workload under the faults: the promises it broke."""
        self.frontends[:] = [frontend(self.cluster, 0), frontend(self.cluster, 1)]
        first = torch_client(self.frontends[0].port)
        first.set("cas", "init")
        first.add("ctr", 0)
        del first
        kinds = ["torch", "distcore", "torch", "distcore"]
        procs = [worker(kind, self.frontends[i % 2].port, i) for i, kind in enumerate(kinds)]
        faults = Faults(self.cluster, self.frontends)
        faults.run()
        ops = []
        for p in procs:
            ops += json.loads(harness.finish(p, timeout=SECONDS + 120).strip().splitlines()[-1])

        # Both front-ends have seen everything up to a last write on each.
        views = [torch_client(server.port) for server in self.frontends]
        views[0].set("end0", "x")
        views[1].set("end1", "x")
        for view in views:
            view.wait(["end0", "end1"])
        history = History(self.cluster.history(f"{ETCD_PREFIX}/", VALUES + b"end1"))
        wrong, queued = check(ops, history)

        adds = [op for op in ops if op["op"] == "add"]
        acked = sum(op["ok"] is True for op in adds)
        unknown = sum(op["ok"] is None for op in adds)
        counter = int(history.last["ctr"])
        if not acked <= counter <= acked + unknown:
            wrong.append(f"ctr: {counter} after {acked} acknowledged and {unknown} unknown adds")
        for i, view in enumerate(views):
            for key in REGISTERS + ["cas", "ctr"]:
                got = view.get(key).decode()
                if got != history.last[key]:
                    wrong.append(f"front-end {i}: {key} is {got}, etcd says {history.last[key]}")
            if view.queue_len("q") != len(queued):
                wrong.append(f"front-end {i}: queue_len {view.queue_len('q')}, etcd holds {len(queued)}")
        drained = []
        for _ in queued:
            drained.append(views[0].queue_pop("q", False).decode())
        if drained != queued:
            wrong.append(f"draining the queue gave {drained}, etcd held {queued}")
        # A blocking pop on the empty queue waits for a push: it does not
        # spin on etcd, whatever the front-end's mirror went through.
        before = self.cluster.transactions()
        for server in self.frontends:
            popper = torch_client(server.port)
            popper.set_timeout(T(seconds=1))
            try:
                popper.queue_pop("q")
                wrong.append("a blocking pop on the empty queue returned")
            except Exception:
                pass
        spent = self.cluster.transactions() - before
        print(f"\ntwo 1 s blocking pops on the empty queue: {spent} etcd transactions (all members)")
        if spent > 10:
            wrong.append(f"two 1 s blocking pops on an empty queue made {spent} etcd transactions")

        longest = max(op["end"] - op["start"] for op in ops)
        if longest > CLIENT_TIMEOUT_S + BACKEND_TIMEOUT_S + 5:
            wrong.append(f"a call took {longest:.1f} s")
        counts = {}
        for op in ops:
            key = (op["op"], {True: "acked", False: "refused", None: "unknown"}[op["ok"]])
            counts[key] = counts.get(key, 0) + 1
        summary = ", ".join(f"{k[0]} {k[1]} {v}" for k, v in sorted(counts.items()))
        print(f"\nhistory: {len(history.events)} etcd events; {summary}; counter {counter}; "
              f"longest call {longest:.1f} s\n  " + "\n  ".join(faults.log))
        for line in wrong[:30]:
            print("VIOLATION", line)
        for server in self.frontends:
            server.stop()
        return wrong


if __name__ == "__main__":
    unittest.main()
