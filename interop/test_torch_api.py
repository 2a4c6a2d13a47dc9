"""The distcore package against torch.distributed's own Python API: the same
names, parameters and defaults, and the same script giving the same results
and the same kinds of errors on PyTorch's stores and distcore's."""
import datetime
import inspect
import os
import re
import tempfile
import unittest
import warnings

warnings.filterwarnings("ignore")
import torch.distributed as dist  # noqa: E402
from torch.distributed.elastic.utils import store as torch_elastic  # noqa: E402

import distcore  # noqa: E402
from distcore import elastic as distcore_elastic  # noqa: E402

T = datetime.timedelta


def pybind_params(cls):
    """(name, default text) of a pybind11 __init__, from its signature line."""
    line = cls.__init__.__doc__.strip().splitlines()[0]
    params = line[line.index("(") + 1:line.rindex(")")].split(", ")[1:]  # without self
    out = []
    for p in params:
        name, _, rest = p.partition(":")
        default = rest.partition(" = ")[2] or None
        out.append((name.strip(), default))
    return out


def python_params(cls):
    sig = inspect.signature(cls.__init__)
    out = []
    for p in list(sig.parameters.values())[1:]:
        if p.kind is p.KEYWORD_ONLY:
            break  # distcore's own extras come after PyTorch's arguments
        out.append((p.name, None if p.default is p.empty else p.default))
    return out


def same_default(text, value):
    if text is None:
        return value is None or value is inspect.Parameter.empty
    return eval(text, {"datetime": datetime}) == value  # noqa: S307 - pybind's repr of a default


class Signatures(unittest.TestCase):
    def test_store_classes_take_pytorchs_arguments(self):
        for name in ["TCPStore", "FileStore", "HashStore", "PrefixStore"]:
            theirs, ours = pybind_params(getattr(dist, name)), python_params(getattr(distcore, name))
            self.assertEqual([n for n, _ in theirs], [n for n, _ in ours], name)
            for (n, d), (_, v) in zip(theirs, ours):
                self.assertTrue(same_default(d, v), f"{name}({n}=...): PyTorch {d}, distcore {v!r}")

    def test_every_store_method_and_property_exists(self):
        for name in ["Store", "TCPStore", "FileStore", "HashStore", "PrefixStore"]:
            public = {m for m in dir(getattr(dist, name)) if not m.startswith("_")}
            public.discard("_underlying_non_prefix_store")
            missing = public - set(dir(getattr(distcore, name)))
            self.assertEqual(missing, set(), name)

    def test_work_future_and_rref_methods_exist(self):
        import torch
        import torch.distributed.rpc as torch_rpc
        from distcore import rpc
        tensor_only = {"boxed", "unbox", "block_current_stream", "get_future_result"}  # tensors and streams
        rref_proxies = {"backward", "remote", "rpc_async", "rpc_sync"}  # autograd and Python-object proxies
        for theirs, ours, skip in [(dist.Work, distcore.Work, tensor_only), (torch.futures.Future, distcore.Future, ()),
                                   (torch_rpc.RRef, rpc.RRef, rref_proxies)]:
            public = {m for m in dir(theirs) if not m.startswith("_")} - set(skip)
            self.assertEqual(public - set(dir(ours)), set(), ours.__name__)

    def test_queue_pop_and_barrier_keywords(self):
        for method in ["queue_pop", "barrier"]:
            doc = getattr(dist.Store, method).__doc__.splitlines()[0]
            theirs = re.findall(r"(\w+): [^,)]+(?: = ([^,)]+))?", doc)[1:]  # without self
            ours = list(inspect.signature(getattr(distcore.Store, method)).parameters.values())[1:]
            self.assertEqual([n for n, _ in theirs], [p.name for p in ours], method)

    def test_elastic_helpers_have_torchelastics_signatures(self):
        for name in torch_elastic.__all__:
            theirs = inspect.signature(getattr(torch_elastic, name)).parameters
            ours = inspect.signature(getattr(distcore_elastic, name)).parameters
            self.assertEqual(list(theirs), list(ours), name)
            for p in theirs:
                self.assertEqual(theirs[p].default, ours[p].default, f"{name}({p})")

    def test_exception_classes(self):
        for name in ["DistError", "DistStoreError", "DistNetworkError", "QueueEmptyError"]:
            theirs, ours = getattr(dist, name), getattr(distcore, name)
            self.assertEqual([c.__name__ for c in theirs.__mro__], [c.__name__ for c in ours.__mro__], name)


def script(mod, store):
    """Every store call, recording results, or the classes (MRO names) of
    the exception each raised."""
    out = []

    def run(label, fn):
        try:
            out.append((label, "ok", fn()))
        except Exception as e:  # compared below
            out.append((label, "raised", [c.__name__ for c in type(e).__mro__]))

    s = store
    run("set str", lambda: s.set("k", "v"))
    run("set bytes", lambda: s.set("b", b"\x00\xff"))
    run("get", lambda: (s.get("k"), s.get("b")))
    run("add", lambda: (s.add("n", 5), s.add("n", -7)))
    run("compare_set", lambda: (s.compare_set("cs", "x", "y"), s.compare_set("cs", "", "a"),
                                s.compare_set("cs", "no", "b"), s.compare_set("cs", "a", "c")))
    run("check", lambda: (s.check(["k", "n"]), s.check(["k", "none"])))
    run("append", lambda: (s.append("ap", "x"), s.append("ap", b"y"), s.get("ap"))[2])
    run("multi", lambda: (s.multi_set(["m1", "m2"], ["1", b"2"]), s.multi_get(["m2", "m1"]))[1])
    run("delete", lambda: (s.delete_key("m1"), s.delete_key("m1")))
    run("list_keys", lambda: sorted(k for k in s.list_keys() if not k.startswith(("init/", "efcount"))))
    run("queue", lambda: (s.queue_push("q", "a"), s.queue_push("q", b"b"), s.queue_len("q"),
                          s.queue_pop("q"), s.queue_pop("q", block=False))[2:])
    run("queue empty", lambda: s.queue_pop("q", block=False))
    run("timeout", lambda: s.timeout)
    run("set_timeout", lambda: (s.set_timeout(T(milliseconds=100)), s.timeout)[1])
    run("get timeout", lambda: s.get("never"))
    run("wait timeout", lambda: s.wait(["never"]))
    run("wait given timeout", lambda: s.wait(["never"], T(milliseconds=50)))
    run("wait present", lambda: s.wait(["k"], T(seconds=1)))
    run("blocking pop timeout", lambda: s.queue_pop("q"))
    run("barrier", lambda: s.barrier("bar", 1))
    run("barrier timeout", lambda: s.barrier("bar2", 2, T(milliseconds=50)))
    run("set int value", lambda: s.set("k", 3))
    run("add str amount", lambda: s.add("n", "1"))
    run("set_timeout int", lambda: s.set_timeout(None))
    run("extended", lambda: s.has_extended_api())
    run("clone", lambda: s.clone().get("k"))
    run("prefix", lambda: (mod.PrefixStore("p", s).set("x", "1"), s.get("p/x"))[1])
    run("underlying", lambda: mod.PrefixStore("p", s).underlying_store is s)
    # Last: PyTorch's TCPStore server drops the connection of a client that
    # adds to text, and PyTorch's client does not reconnect.
    run("add to text", lambda: s.add("k", 1))
    return out


# A PyTorch server answers an add to text by closing the connection
# (DistNetworkError; PyTorch's client does not reconnect), and so does
# distcore's server to a PyTorch client, since PyTorch's protocol has no
# error reply; a distcore client of a distcore server gets DistValueError
# and keeps its connection.
ADD_TO_TEXT = {"add to text"}


class SameScriptSameResults(unittest.TestCase):
    def compare(self, make, known=()):
        """Same results; where PyTorch raises an exception of class X,
        distcore raises one that is an X too (perhaps more precise: its
        timeouts are DistStoreErrors where PyTorch's FileStore raises a bare
        RuntimeError); where PyTorch lacks a feature (NotImplementedError),
        distcore may have it."""
        theirs = script(dist, make(dist))
        ours = script(distcore, make(distcore))
        self.assertEqual([a[0] for a in theirs], [b[0] for b in ours])
        for a, b in zip(theirs, ours):
            if a[0] in known:
                self.assertNotEqual(a, b, f"{a[0]}: no longer differs, drop it from the known differences")
                continue
            if a[1] == "raised":
                if a[2][0] == "NotImplementedError":
                    continue
                self.assertEqual(b[1], "raised", f"{a[0]}: PyTorch raised {a[2][0]}, distcore returned {b}")
                self.assertIn(a[2][0], b[2], f"{a[0]}: PyTorch raised {a[2][0]}, distcore {b[2][0]}")
            else:
                self.assertEqual(a, b)

    def test_hash_store(self):
        self.compare(lambda mod: mod.HashStore())

    def test_file_store(self):
        with tempfile.TemporaryDirectory() as d:
            # PyTorch's FileStore.delete_key returns True for a missing key
            # too; it has no queues, so has_extended_api() is False there.
            self.compare(lambda mod: mod.FileStore(os.path.join(d, mod.__name__), -1),
                         known={"delete", "extended"})

    def test_tcp_store_server(self):
        self.compare(lambda mod: mod.TCPStore("127.0.0.1", 0, None, True, T(seconds=30), wait_for_workers=False),
                     known=ADD_TO_TEXT)

    def test_tcp_clients_of_a_pytorch_server(self):
        server = dist.TCPStore("127.0.0.1", 0, None, True, T(seconds=30), wait_for_workers=False)
        n = iter(range(2))
        # Separate key spaces: a PrefixStore per client.
        self.compare(lambda mod: mod.PrefixStore(f"c{next(n)}", mod.TCPStore("127.0.0.1", server.port,
                                                                             timeout=T(seconds=30))))

    def test_tcp_clients_of_a_distcore_server(self):
        server = distcore.TCPStore("127.0.0.1", 0, None, True, T(seconds=30), wait_for_workers=False)
        n = iter(range(2))
        self.compare(lambda mod: mod.PrefixStore(f"c{next(n)}", mod.TCPStore("127.0.0.1", server.port,
                                                                             timeout=T(seconds=30))),
                     known=ADD_TO_TEXT)
        server.close()


if __name__ == "__main__":
    unittest.main()
