"""The Store API on every store: values, keys, timeouts, errors, lifetime."""
import os
import socket
import subprocess
import threading
import time
from datetime import timedelta

import pytest

import distcore
import harness  # interop/harness.py (conftest puts interop/ on the path)
from distcore import Status

T = timedelta


def test_every_operation(store):
    s = store
    s.set("k1", "v1")  # str values are encoded as UTF-8, as in PyTorch
    assert s.get("k1") == b"v1"
    s.set("bin", b"\x00\xff")
    assert s.get("bin") == b"\x00\xff"
    s.set("ba", bytearray(b"ba"))
    s.set("uni", "é€")
    assert s.get("uni") == "é€".encode()
    assert s.add("cnt", 5) == 5
    assert s.add("cnt", -2) == 3
    assert s.get("cnt") == b"3"
    assert s.compare_set("cs", "x", "y") == b"x"  # missing key, expected not empty
    assert s.compare_set("cs", "", "first") == b"first"
    assert s.compare_set("cs", "wrong", "z") == b"first"
    assert s.compare_set("cs", b"first", b"second") == b"second"
    assert s.check(["k1", "cnt"])
    assert not s.check(["k1", "nope"])
    s.wait(["k1", "cnt"])
    s.wait(["k1"], T(seconds=1))
    s.append("ap", "x")
    s.append("ap", b"yz")
    assert s.get("ap") == b"xyz"
    s.multi_set(["m1", "m2"], ["1", b"22"])
    assert s.multi_get(["m2", "m1", "ap"]) == [b"22", b"1", b"xyz"]
    assert s.multi_get([]) == []
    # A FileStore counts its refcount key too, as PyTorch's does.
    assert s.num_keys() == 9 + isinstance(s, distcore.FileStore)
    assert s.delete_key("k1")
    assert not s.delete_key("k1")
    assert sorted(s.list_keys()) == ["ap", "ba", "bin", "cnt", "cs", "m1", "m2", "uni"]
    s.queue_push("q", "a")
    s.queue_push("q", b"\x00b")
    assert s.queue_len("q") == 2
    assert s.queue_pop("q", block=False) == b"a"
    assert s.queue_pop("q") == b"\x00b"
    with pytest.raises(distcore.QueueEmptyError) as e:
        s.queue_pop("q", block=False)
    assert e.value.status == Status.QUEUE_EMPTY
    assert isinstance(e.value, distcore.DistStoreError)
    assert "is empty" in str(e.value)
    s.barrier("bar", 1)
    assert s.has_extended_api()


def test_timeout_property_and_set_timeout(store):
    assert store.timeout == T(seconds=300) or store.timeout == T(seconds=30)
    store.set_timeout(T(seconds=7))
    assert store.timeout == T(seconds=7)
    store.set_timeout(1.5)  # seconds, as a convenience
    assert store.timeout == T(milliseconds=1500)
    store.set_timeout(T(0))  # no timeout (PyTorch's kNoTimeout)
    assert store.timeout == T(0)
    with store.timeout_guard(T(milliseconds=40)):
        assert store.timeout == T(milliseconds=40)
    assert store.timeout == T(0)
    with pytest.raises(ValueError):
        store.set_timeout(T(seconds=-1))
    with pytest.raises(TypeError):
        store.set_timeout("1s")


def test_timeouts_are_store_errors_and_timeout_errors(store):
    store.set_timeout(T(milliseconds=100))
    for op in (lambda: store.get("never"), lambda: store.wait(["never"]), lambda: store.queue_pop("empty"),
               lambda: store.wait(["never"], T(milliseconds=50)), lambda: store.barrier("b2", 2, T(milliseconds=50)),
               lambda: store.multi_get(["never"])):
        start = time.monotonic()
        with pytest.raises(distcore.DistStoreError) as e:
            op()
        assert time.monotonic() - start < 5
        assert isinstance(e.value, TimeoutError)
        assert isinstance(e.value, distcore.DistTimeoutError)
        assert isinstance(e.value, RuntimeError)  # PyTorch's DistError is a RuntimeError
        assert e.value.status == Status.TIMEOUT
        assert e.value.message == str(e.value)
    with pytest.raises(distcore.DistTimeoutError, match=r"^wait timeout after 50ms, keys: .*never$"):
        store.wait(["never"], T(milliseconds=50))
    store.set("after", "ok")  # the handle survived every timeout
    assert store.get("after") == b"ok"


def test_bad_arguments(store):
    store.set("text", "not a number")
    with pytest.raises(ValueError) as e:  # PyTorch: ValueError (std::invalid_argument)
        store.add("text", 1)
    assert isinstance(e.value, distcore.DistError)
    assert e.value.status == Status.INVALID_ARGUMENT
    with pytest.raises(TypeError):
        store.set("k", 3)  # PyTorch: TypeError
    with pytest.raises(TypeError):
        store.set(b"k", "v")
    with pytest.raises(TypeError):
        store.add("k", "1")
    with pytest.raises(TypeError):
        store.check("k")  # a single key, not a list
    with pytest.raises(ValueError):
        store.multi_set(["a", "b"], ["1"])
    with pytest.raises(ValueError):
        store.wait(["k"], T(seconds=-1))


def test_blocking_calls_are_woken_by_another_thread(store):
    threading.Timer(0.2, lambda: store.set("late", "L")).start()
    assert store.get("late") == b"L"
    threading.Timer(0.2, lambda: store.queue_push("jobs", "job-1")).start()
    assert store.queue_pop("jobs") == b"job-1"


def test_list_and_delete_by_prefix(store):
    for key in ("sweep/a", "sweep/b", "sweepless"):
        store.set(key, "1")
    assert sorted(store.list_prefix("sweep/")) == ["sweep/a", "sweep/b"]
    assert store.delete_prefix("sweep/") == 2
    assert store.list_prefix("sweep/") == []
    assert store.check(["sweepless"])


def test_clone_is_the_same_store_and_class(store):
    with store.clone() as c:
        assert type(c) is type(store)
        c.set("from-clone", "1")
        assert store.get("from-clone") == b"1"


def test_context_manager_and_close(store):
    with store.clone() as c:
        c.set("x", "1")
    with pytest.raises(ValueError, match="closed"):
        c.get("x")
    c.close()  # idempotent
    assert store.get("x") == b"1"
    assert "closed" in repr(c)


def test_a_store_nobody_closed_is_freed_when_collected():
    import gc
    server = distcore.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    port = server.port
    server.set("k", "v")
    view = distcore.PrefixStore("p", server)
    del server
    gc.collect()
    # A store built on it keeps the server alive...
    view.set("x", "1")
    assert view.get("x") == b"1"
    del view
    gc.collect()
    # ...and once neither is referenced, the server is gone.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_store_is_abstract():
    with pytest.raises(TypeError):
        distcore.Store()


def test_hash_store_clones_share_and_threads_meet():
    s = distcore.HashStore()
    world = 4
    errors = []

    def worker(rank):
        try:
            with s.clone() as c:
                c.barrier("meet", world, T(seconds=10))
                c.add("after", 1)
        except Exception as e:  # reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert s.get("after") == b"4"


def test_prefix_store(tcp_server):
    base = distcore.TCPStore("127.0.0.1", tcp_server.port)
    p = distcore.PrefixStore("job", base)
    assert p.underlying_store is base
    assert p.prefix == "job"
    p.set("a", "1")
    assert base.get("job/a") == b"1"
    assert p.list_keys() == ["a"]
    pp = distcore.PrefixStore("inner", p)
    pp.set("b", "2")
    assert base.get("job/inner/b") == b"2"
    assert pp._underlying_non_prefix_store is base
    assert type(pp.clone()) is distcore.PrefixStore
    base.close()  # the prefix stores keep what they need
    assert pp.get("b") == b"2"
    with pytest.raises(TypeError):
        distcore.PrefixStore("x", object())


def test_file_store(tmp_path):
    path = str(tmp_path / "fs")
    a = distcore.FileStore(path, 2)
    assert a.path == path
    b = distcore.FileStore(path)
    a.set("k", "v")
    assert b.get("k") == b"v"
    b.close()
    a.close()
    with pytest.raises(distcore.DistStoreError) as e:  # PyTorch: DistStoreError
        distcore.FileStore(str(tmp_path / "no" / "such" / "dir"), 1)
    assert e.value.status == Status.IO


def test_tcp_store_arguments_and_properties():
    with distcore.TCPStore("127.0.0.1", 0, None, True, T(seconds=10), wait_for_workers=False,
                           use_libuv=True) as server:
        assert server.host == "127.0.0.1"
        assert 0 < server.port < 65536
        assert server.libuvBackend is False
        assert server.timeout == T(seconds=10)
        with distcore.TCPStore(host_name="127.0.0.1", port=server.port, world_size=None, is_master=False,
                               timeout=T(seconds=5), wait_for_workers=True, multi_tenant=False,
                               master_listen_fd=None, use_libuv=False) as client:
            client.set("k", "v")
            client.get("k")
            counters = client.collect_client_counters()
            assert counters["set"]["count"] >= 1 and counters["get"]["count"] >= 1
            with pytest.raises(distcore.DistValueError):
                client.server_stats()  # a client runs no server
        stats = server.server_stats()
        assert set(stats) == {"connections", "pending_waits", "keys"}
        assert stats["keys"] == 1
    with pytest.raises(ValueError):
        distcore.TCPStore("127.0.0.1", 70000)
    with pytest.raises(TypeError):
        distcore.TCPStore(None, 0)


def test_tcp_store_takes_over_a_bound_socket_not_yet_listening():
    # PyTorch's test_take_over_listen_socket: the socket is bound, not listening.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    with distcore.TCPStore("127.0.0.1", port, 1, is_master=True, master_listen_fd=sock.detach()) as store:
        assert store.port == port
        store.set("key", "value")
        assert store.get("key") == b"value"
    with pytest.raises(distcore.DistNetworkError, match="not a TCP socket"):
        r, w = os.pipe()
        os.close(w)
        distcore.TCPStore("127.0.0.1", 0, 1, is_master=True, master_listen_fd=r)


def test_serve_listens_on_a_bound_socket_it_inherits():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    proc = harness.track(subprocess.Popen([harness.CLI, "serve", "--listen-fd", str(sock.fileno())],
                                          pass_fds=[sock.fileno()], stdout=subprocess.PIPE, text=True))
    sock.close()
    try:
        harness._read_line(proc, "distcore TCPStore server listening on")
        with distcore.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=10)) as client:
            client.set("k", "v")
            assert client.get("k") == b"v"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()


def test_tcp_store_world_size_waits_for_workers():
    port = harness.free_port()
    made = {}
    server_thread = threading.Thread(target=lambda: made.setdefault(
        "server", distcore.TCPStore("127.0.0.1", port, 3, True, T(seconds=30))))
    server_thread.start()
    clients = [distcore.TCPStore("127.0.0.1", port, 3, False, T(seconds=30)) for _ in range(2)]
    server_thread.join(30)
    assert "server" in made
    for c in clients:
        c.close()
    made["server"].close()


def test_tcp_store_world_size_times_out_with_pytorch_message():
    with pytest.raises(distcore.DistTimeoutError, match=r"waiting for clients. 1/2 clients joined"):
        distcore.TCPStore("127.0.0.1", 0, 2, True, T(milliseconds=300))


def test_connecting_to_nobody_is_a_network_error():
    port = harness.free_port()
    start = time.monotonic()
    with pytest.raises((distcore.DistNetworkError, distcore.DistTimeoutError)) as e:
        distcore.TCPStore("127.0.0.1", port, timeout=T(milliseconds=500))
    assert time.monotonic() - start < 5
    assert isinstance(e.value, distcore.DistError)


def test_value_over_the_servers_limit_is_a_value_error():
    with distcore.TCPStore("127.0.0.1", 0, is_master=True, max_value_size=1024) as s:
        with pytest.raises(distcore.DistValueError):
            s.set("big", b"x" * 4096)
        s.set("small", b"x" * 1000)  # the handle lives
        assert len(s.get("small")) == 1000
