"""torchelastic's store helpers (torch/distributed/elastic/utils/store.py:
barrier, synchronize, get_all, store_timeout), same names, arguments and
keys, run by distcore's dc_elastic_* functions: ranks using these and ranks
using torchelastic's meet on one store. Timeouts are float seconds, as
torchelastic takes them."""
from __future__ import annotations

import contextlib
import ctypes
import re
from datetime import timedelta
from typing import TYPE_CHECKING, Callable, Iterator

from ._errors import DistStoreError
from ._lib import BufArray, check, lib, take_array
from ._util import Timeout, Value, int32_arg, key_arg, store_timeout_ms, value_arg

if TYPE_CHECKING:
    from .store import Store

__all__ = ["store_timeout", "get_all", "synchronize", "barrier"]


def _store_handle(store: Store) -> int:
    from .store import Store
    if not isinstance(store, Store):
        raise TypeError(f"store must be a distcore.Store, not {type(store).__name__}")
    return store._handle


@contextlib.contextmanager
def store_timeout(store: Store, timeout: timedelta | float) -> Iterator[None]:
    """Sets the store's timeout to `timeout` seconds for the block, then
    restores the previous one."""
    with store.timeout_guard(timeout):
        yield


def get_all(store: Store, rank: int, prefix: str, world_size: int) -> list[bytes]:
    """The values of ``{prefix}0`` .. ``{prefix}{world_size-1}`` (waiting for
    each), then checks in to ``{prefix}/finished``; rank 0 waits for every
    rank to check in."""
    arr = BufArray()
    rank, world_size = int32_arg(rank, "rank"), int32_arg(world_size, "world_size")
    check(lib.dc_elastic_get_all(_store_handle(store), rank, key_arg(prefix, "prefix"), world_size, ctypes.byref(arr)))
    return take_array(arr)


def synchronize(store: Store, data: Value, rank: int, world_size: int, key_prefix: str,
                timeout: Timeout = 300) -> list[bytes]:
    """Publishes `data` as ``{key_prefix}{rank}`` and returns every rank's
    data in rank order, with the store's timeout `timeout` seconds meanwhile."""
    data = value_arg(data, "data")
    arr = BufArray()
    rank, world_size = int32_arg(rank, "rank"), int32_arg(world_size, "world_size")
    check(lib.dc_elastic_synchronize(_store_handle(store), data, len(data), rank, world_size,
                                     key_arg(key_prefix, "key_prefix"), store_timeout_ms(timeout),
                                     ctypes.byref(arr)))
    return take_array(arr)


_MISSING = re.compile(r"missing_ranks=\[([^\]]*)\]")


def barrier(store: Store, world_size: int, key_prefix: str, barrier_timeout: Timeout = 300, rank: int | None = None,
            rank_tracing_decoder: Callable[[int], str] | None = None, trace_timeout: Timeout = 10) -> None:
    """Blocks until `world_size` members entered the barrier `key_prefix`
    (usable once per prefix), with the store's timeout `barrier_timeout`
    seconds meanwhile. With `rank`, a timeout finds the ranks that never
    arrived (waiting up to `trace_timeout` seconds for the first) and raises
    torchelastic's "Timed out waiting on barrier on rank R, for key prefix:
    P (world_size=N, missing_ranks=[...], timeout=T)", each missing rank
    shown through `rank_tracing_decoder` when given."""
    if rank is None and rank_tracing_decoder is not None:
        raise AssertionError("Tracing requires rank information")
    handle = _store_handle(store)
    prefix = key_arg(key_prefix, "key_prefix")
    timeout_ms = store_timeout_ms(barrier_timeout)
    world_size = int32_arg(world_size, "world_size")
    if rank is None:
        check(lib.dc_elastic_barrier(handle, world_size, prefix, timeout_ms))
        return
    try:
        check(lib.dc_elastic_barrier_traced(handle, world_size, prefix, timeout_ms, int32_arg(rank, "rank"),
                                            store_timeout_ms(trace_timeout)))
    except DistStoreError as e:
        if rank_tracing_decoder is None or not _MISSING.search(e.message):
            raise

        def decode(match: re.Match[str]) -> str:
            ranks = [r.strip() for r in match.group(1).split(",") if r.strip()]
            return "missing_ranks=[" + ", ".join(
                rank_tracing_decoder(int(r)) if r.isdigit() else r for r in ranks) + "]"
        raise type(e)(_MISSING.sub(decode, e.message, count=1), e.status) from None

