"""A torchrun rendezvous backend on distcore (docs/pytorch.md):

    torchrun --rdzv-backend distcore --rdzv-endpoint HOST:PORT ...         # a `distcore serve`
    torchrun --rdzv-backend distcore --rdzv-endpoint etcd://H1:P1,H2:P2/PREFIX ...   # etcd v3

torchrun finds it by the ``torchrun.handlers`` entry point this package
declares (no patch to torch). The rendezvous is torch's own
``DynamicRendezvousHandler`` — min/max nodes, restarts, keep-alives,
last-call — with its state kept by compare-and-set in a distcore store
(:mod:`distcore.torch`): a client of a `distcore serve` server, which may
require the shared secret and TLS, or the EtcdStore straight on etcd v3.
No agent hosts the store, so the job keeps it when any agent dies.

Configuration (``--rdzv-conf key=value,...``, or the environment):

- ``secret_file`` (``DISTCORE_SECRET_FILE``): a file holding the server's
  shared secret; ``DISTCORE_SECRET`` gives the secret itself.
- ``tls_ca``, ``tls_cert``, ``tls_key``, ``tls_server_name``
  (``DISTCORE_TLS_CA``, ``DISTCORE_TLS_CERT``, ``DISTCORE_TLS_KEY``,
  ``DISTCORE_TLS_SERVER_NAME``): TLS to the server, as
  :class:`distcore.TCPStore` takes them.
- ``read_timeout``: seconds each store call may take (default 60, as
  torch's c10d backend); torch's own keys (``join_timeout``,
  ``last_call_timeout``, ``close_timeout``, ``heartbeat``) as usual.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable

from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

from . import torch as dct

__all__ = ["DistcoreRendezvousBackend", "create_rendezvous_handler", "handler_creator"]

#: The port of an endpoint given without one (the c10d backend's).
DEFAULT_PORT = 29400

#: The etcd prefix of an etcd endpoint given without one.
DEFAULT_ETCD_PREFIX = "/torchrun"

# Configuration keys and the environment variables that stand in for them.
_TLS_KEYS = {"tls_ca": "DISTCORE_TLS_CA", "tls_cert": "DISTCORE_TLS_CERT", "tls_key": "DISTCORE_TLS_KEY",
             "tls_server_name": "DISTCORE_TLS_SERVER_NAME"}


def _setting(params: RendezvousParameters, key: str, env: str) -> str | None:
    value = params.get(key)
    if value is None:
        value = os.environ.get(env) or None
    return None if value is None else str(value)


def _secret(params: RendezvousParameters) -> bytes | None:
    path = _setting(params, "secret_file", "DISTCORE_SECRET_FILE")
    if path is not None:
        with open(path, "rb") as f:
            return f.read().strip()
    secret = os.environ.get("DISTCORE_SECRET")
    return secret.encode() if secret else None


def _store(params: RendezvousParameters) -> dct.TCPStore | dct.EtcdStore:
    """The store the rendezvous keeps its state in (see the module doc)."""
    timeout = timedelta(seconds=float(params.get("read_timeout", 60)))
    endpoint = params.endpoint.strip()
    if endpoint.startswith("etcd://"):
        where = endpoint[len("etcd://"):]
        hosts, slash, prefix = where.partition("/")
        if not hosts:
            raise ValueError(f"the etcd endpoint {endpoint!r} names no member (etcd://HOST:PORT[,...][/PREFIX])")
        return dct.EtcdStore(hosts, prefix=("/" + prefix) if slash and prefix else DEFAULT_ETCD_PREFIX,
                             timeout=timeout)
    if not endpoint:
        raise ValueError("the distcore rendezvous needs --rdzv-endpoint HOST:PORT (a distcore serve) "
                         "or etcd://HOST:PORT[,...][/PREFIX]")
    host, port = parse_rendezvous_endpoint(endpoint, default_port=DEFAULT_PORT)
    tls: dict[str, Any] = {key: value for key, env in _TLS_KEYS.items()
                           if (value := _setting(params, key, env)) is not None}
    return dct.TCPStore(host, port, None, False, timeout, secret=_secret(params), **tls)


class DistcoreRendezvousBackend(C10dRendezvousBackend):
    """torch's store-backed rendezvous state (compare-and-set of one key)
    on a distcore store, under this backend's name."""

    @property
    def name(self) -> str:
        return "distcore"


#: torch's opt-out of sharing the rendezvous's TCP store with the workers.
_NO_SHARED_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def create_rendezvous_handler(params: RendezvousParameters) -> RendezvousHandler:
    """torch's DynamicRendezvousHandler over a distcore store for `params`
    (torchrun's --rdzv-* options).

    Turns off torch's sharing of one TCP store between the rounds' workers
    (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in the agent, unless set):
    with it, a job cannot grow — a node joining a later round at a rank
    other than 0 waits for the workers' store address, which the earlier
    rank 0 never writes again (torch 2.15's own c10d backend fails the same
    way). Without it, each round's rank 0 publishes a new address and its
    first worker hosts the workers' store, as torch did before 2.4."""
    os.environ.setdefault(_NO_SHARED_STORE, "1")
    store = _store(params)
    backend = DistcoreRendezvousBackend(store, params.run_id)
    return create_handler(store, backend, params)


def handler_creator() -> Callable[[RendezvousParameters], RendezvousHandler]:
    """What the ``torchrun.handlers`` entry point loads: the function that
    makes a handler from torchrun's parameters."""
    return create_rendezvous_handler
