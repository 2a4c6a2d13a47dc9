"""distcore.rpc: agents in one process (threads), meeting through a store."""
import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

import distcore
from distcore import rpc
from distcore.rpc import RRef, WorkerInfo


def echo(args, rrefs, caller_id):
    return args


def whoami(args, rrefs, caller_id):
    return str(caller_id)


def fetch(args, rrefs, caller_id):
    return b"|".join(r.to_here() for r in rrefs)


def fail(args, rrefs, caller_id):
    raise KeyError("no such thing")


kept = []


def keep(args, rrefs, caller_id):
    kept.append(rrefs[0].clone())  # a borrowed view lives during the call only
    kept.append(rrefs[0])
    return b"kept"


def slow(args, rrefs, caller_id):
    time.sleep(float(args))
    return b"late"


FUNCTIONS = {"echo": echo, "whoami": whoami, "fetch": fetch, "fail": fail, "keep": keep, "slow": slow}


def make_group(world, store=None, **kw):
    store = store or distcore.HashStore()
    with ThreadPoolExecutor(world) as pool:
        futures = [pool.submit(rpc.RpcAgent, f"w{r}", r, world, store.clone(), FUNCTIONS, **kw)
                   for r in range(world)]
        return [f.result(timeout=60) for f in futures]


def settle(agent):
    deadline = time.monotonic() + 30
    while any(agent.get_debug_info().values()):
        assert time.monotonic() < deadline, agent.get_debug_info()
        time.sleep(0.01)


@pytest.fixture
def group():
    agents = make_group(3, rpc_timeout=30)
    yield agents
    with ThreadPoolExecutor(len(agents)) as pool:
        list(pool.map(lambda a: a.shutdown(True, 30) if a._h else None, agents))
    for a in agents:
        a.close()


def test_calls_and_errors(group):
    w0, w1, w2 = group
    assert w0.name == "w0" and w1.id == 1
    assert w0.get_worker_info("w2") == WorkerInfo("w2", 2)
    assert w0.get_worker_info() == WorkerInfo("w0", 0)
    assert w0.rpc_sync("w1", "echo", b"hi") == b"hi"
    assert w0.rpc_sync("w1", "echo", "text") == b"text"
    assert w0.rpc_sync(WorkerInfo("w2", 2), "whoami") == b"0"
    assert w2.rpc_sync("w2", "whoami") == b"2"  # to itself
    with pytest.raises(distcore.DistRemoteError) as e:
        w0.rpc_sync("w1", "fail")
    assert str(e.value) == "'no such thing'"
    assert isinstance(e.value, distcore.DistError)
    with pytest.raises(distcore.DistRemoteError):
        w0.rpc_sync("w1", "no-such-function")
    with pytest.raises(distcore.DistError):
        w0.rpc_sync("nobody", "echo")
    with pytest.raises(distcore.DistTimeoutError):
        w0.rpc_sync("w1", "slow", b"2", timeout=0.2)
    futs = [w0.rpc_async("w1", "echo", str(i)) for i in range(20)]
    assert [f.wait() for f in futs] == [str(i).encode() for i in range(20)]
    chained = w0.rpc_async("w2", "echo", b"a").then(lambda f: f.value() + b"b")
    assert chained.wait(timedelta(seconds=10)) == b"ab"
    with pytest.raises(TypeError):
        w0.rpc_sync("w1", echo)  # functions are called by name


def test_rrefs_every_flow(group):
    w0, w1, w2 = group
    user = w0.remote("w1", "echo", b"on w1")
    assert not user.is_owner()
    assert user.owner() == WorkerInfo("w1", 1)
    assert user.owner_name() == "w1"
    assert user.to_here() == b"on w1"
    user.confirmed_by_owner()  # callable at any time; confirmation is asynchronous
    with pytest.raises(distcore.DistStateError):
        user.local_value()
    assert w0.rpc_sync("w2", "fetch", rrefs=[user]) == b"on w1"  # user -> third
    assert w0.rpc_sync("w1", "fetch", rrefs=[user]) == b"on w1"  # back to the owner
    mine = w0.rref(b"on w0")
    assert mine.is_owner() and mine.confirmed_by_owner()
    assert mine.local_value() == b"on w0"
    assert w0.rpc_sync("w2", "fetch", rrefs=[mine, user]) == b"on w0|on w1"
    assert w0.rpc_sync("w0", "fetch", rrefs=[mine]) == b"on w0"  # owner to itself
    failed = w0.remote("w1", "fail")
    with pytest.raises(distcore.DistRemoteError, match="no such thing"):
        failed.to_here()
    assert w0.rpc_sync("w1", "keep", rrefs=[mine]) == b"kept"
    clone, view = kept[-2], kept[-1]
    assert clone.to_here() == b"on w0"
    with pytest.raises(ValueError, match="during the function call only"):
        view.to_here()
    kept.clear()
    clone.close()
    for r in (user, mine, failed):
        r.close()
    for a in group:
        settle(a)
    assert w0.get_debug_info() == {"num_owner_rrefs": 0, "num_pending_futures": 0, "num_pending_users": 0,
                                   "num_forks": 0}


def test_module_level_api_and_context_manager():
    store = distcore.HashStore()
    other = {}
    t = threading.Thread(target=lambda: other.setdefault(
        "agent", rpc.RpcAgent("peer", 1, 2, store, {"echo": echo})))
    t.start()
    agent = rpc.init_rpc("main", 0, 2, store, {"echo": echo}, rpc_timeout=timedelta(seconds=30),
                         num_worker_threads=2)
    t.join(60)
    try:
        assert rpc.get_worker_info().name == "main"
        assert rpc.rpc_sync("peer", "echo", b"x") == b"x"
        assert rpc.rpc_async("peer", "echo", b"y").wait() == b"y"
        ref = rpc.remote("peer", "echo", b"z")
        assert ref.to_here(timeout=10) == b"z"
        own = RRef(b"local")  # on the current agent, as rpc.RRef(value)
        assert own.owner_name() == "main"
        ref.close()
        own.close()
    finally:
        with other["agent"]:
            shutter = threading.Thread(target=other["agent"].shutdown)
            shutter.start()
            rpc.shutdown()
            shutter.join(60)
    with pytest.raises(distcore.DistError, match="not been initialized"):
        rpc.rpc_sync("peer", "echo")
    with pytest.raises(ValueError, match="closed"):
        agent.rpc_sync("peer", "echo")


def test_init_times_out_without_the_others():
    with pytest.raises(distcore.DistTimeoutError):
        rpc.RpcAgent("alone", 0, 2, distcore.HashStore(), rpc_timeout=0.3)


def test_functions_must_be_callable():
    with pytest.raises(TypeError):
        rpc.RpcAgent("x", 0, 1, distcore.HashStore(), {"f": 3})


def test_register_function_after_init():
    [agent] = make_group(1)
    with agent:
        agent.register_function("late", lambda a, r, c: a[::-1])
        assert agent.rpc_sync("w0", "late", b"abc") == b"cba"


def test_across_processes_over_a_tcp_store(tmp_path):
    """A worker in another process (the same package), meeting through a TCPStore."""
    server = distcore.TCPStore("127.0.0.1", 0, is_master=True)
    script = tmp_path / "peer.py"
    script.write_text(textwrap.dedent("""
        import sys, distcore
        from distcore import rpc
        store = distcore.TCPStore("127.0.0.1", int(sys.argv[1]))
        agent = rpc.init_rpc("peer", 1, 2, store, {"upper": lambda a, r, c: a.upper()})
        rpc.shutdown()
        print("done", flush=True)
    """))
    peer = subprocess.Popen([sys.executable, str(script), str(server.port)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    try:
        agent = rpc.RpcAgent("main", 0, 2, distcore.TCPStore("127.0.0.1", server.port), {"echo": echo})
        assert agent.rpc_sync("peer", "upper", b"abc") == b"ABC"
        agent.shutdown()
        agent.close()
        assert peer.communicate(timeout=60)[0].strip() == "done"
        assert peer.returncode == 0
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
        server.close()


def test_a_killed_worker_fails_the_call_and_to_here_waiting_on_it_at_once(tmp_path):
    """A worker in another process killed (SIGKILL) while a call to it and a
    to_here on an RRef it owns wait: both raise DistPeerError naming it at
    once (the RPC timeout is 60 s), and so does a later call."""
    server = distcore.TCPStore("127.0.0.1", 0, is_master=True)
    script = tmp_path / "victim.py"
    script.write_text(textwrap.dedent("""
        import sys, time, distcore
        from distcore import rpc
        store = distcore.TCPStore("127.0.0.1", int(sys.argv[1]))
        def block(args, rrefs, caller_id):
            store.add("blocked", 1)
            time.sleep(120)
        agent = rpc.RpcAgent("victim", 1, 2, store, {"block": block, "echo": lambda a, r, c: a})
        print("ready", flush=True)
        time.sleep(120)
    """))
    victim = subprocess.Popen([sys.executable, str(script), str(server.port)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ))
    agent = None
    try:
        store = distcore.TCPStore("127.0.0.1", server.port)
        agent = rpc.RpcAgent("main", 0, 2, store, {"echo": echo}, rpc_timeout=60)
        assert victim.stdout.readline().strip() == "ready"
        call = agent.rpc_async("victim", "block")
        never = agent.remote("victim", "block")
        with ThreadPoolExecutor(1) as pool:
            fetching = pool.submit(never.to_here)
            while store.add("blocked", 0) < 2:  # both are running on the victim
                time.sleep(0.01)
            killed = time.monotonic()
            victim.kill()
            with pytest.raises(distcore.DistPeerError) as raised:
                call.wait()
            with pytest.raises(distcore.DistPeerError):
                fetching.result(timeout=10)
        elapsed = time.monotonic() - killed
        assert elapsed < 2, elapsed
        assert "RPC worker 'victim' (id 1, address 127.0.0.1:" in str(raised.value)
        assert "connection lost" in str(raised.value)
        with pytest.raises(distcore.DistPeerError, match="RPC worker 'victim'"):
            agent.rpc_sync("victim", "echo", b"x")
    finally:
        victim.kill()
        victim.wait()
        if agent is not None:
            agent.shutdown(False, 10)
            agent.close()
        server.close()


TLS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "tls")


def tls_files(ca="ca.pem"):
    """A worker's TLS: the test server certificate (valid for 127.0.0.1), mutual, trusting `ca`."""
    return dict(tls_cert=os.path.join(TLS_DIR, "server.pem"), tls_key=os.path.join(TLS_DIR, "server.key"),
                tls_ca=os.path.join(TLS_DIR, ca), tls_client_ca=os.path.join(TLS_DIR, ca))


def close_group(agents):
    with ThreadPoolExecutor(len(agents)) as pool:
        list(pool.map(lambda a: a.shutdown(False, 10), agents))
    for a in agents:
        a.close()


def test_a_group_with_a_secret_and_tls_calls_and_shares_rrefs():
    agents = make_group(2, rpc_timeout=30, secret=b"the group's secret", **tls_files())
    try:
        assert agents[0].rpc_sync("w1", "echo", b"hi") == b"hi"
        big = os.urandom(3 << 20)
        assert agents[1].rpc_sync("w0", "echo", big) == big
        rref = agents[0].remote("w1", "echo", b"value")
        assert rref.to_here() == b"value"
    finally:
        close_group(agents)


@pytest.mark.parametrize("other", [dict(secret=b"another secret"), dict(),
                                   dict(secret=b"the group's secret", **tls_files("other-ca.pem"))])
def test_a_worker_without_the_groups_guards_is_refused_at_once(other):
    ours = dict(secret=b"the group's secret", **(tls_files() if "tls_ca" in other else {}))
    store = distcore.HashStore()
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(rpc.RpcAgent, f"w{r}", r, 2, store.clone(), FUNCTIONS, rpc_timeout=10, **kw)
                   for r, kw in enumerate([ours, other])]
        agents = [f.result(timeout=60) for f in futures]
    try:
        started = time.monotonic()
        for agent, to in ((agents[0], "w1"), (agents[1], "w0")):
            with pytest.raises(distcore.DistPermissionError):
                agent.rpc_sync(to, "echo", b"x")
        assert time.monotonic() - started < 5, "refused, not timed out"
    finally:
        close_group(agents)
