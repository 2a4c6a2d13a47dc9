"""distcore.elastic: torchelastic's store helpers, same signatures and keys."""
import threading
from datetime import timedelta

import pytest

import distcore
from distcore import elastic


def run_ranks(world, fn, store=None):
    store = store or distcore.HashStore()
    results, errors = {}, {}

    def one(rank):
        try:
            with store.clone() as s:
                results[rank] = fn(s, rank)
        except Exception as e:  # returned below
            errors[rank] = e
    threads = [threading.Thread(target=one, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


def test_barrier_synchronize_get_all_across_threads():
    world = 4
    store = distcore.HashStore()

    def rank_fn(s, rank):
        elastic.barrier(s, world, "el/bar", barrier_timeout=10)
        data = elastic.synchronize(s, f"d{rank}", rank, world, "el/sync/", timeout=10)
        s.set(f"el/all/{rank}", f"v{rank}")
        return data, elastic.get_all(s, rank, "el/all/", world)

    results, errors = run_ranks(world, rank_fn, store)
    assert errors == {}
    for rank in range(world):
        data, all_values = results[rank]
        assert data == [f"d{r}".encode() for r in range(world)]
        assert all_values == [f"v{r}".encode() for r in range(world)]
    # torchelastic's keys
    assert store.get("el/bar/num_members") == str(world).encode()
    assert store.get("el/bar/last_member") == b"<val_ignored>"
    assert store.get("el/sync/2") == b"d2"
    assert store.get("el/all//finished/num_members") == str(world).encode()


def test_barrier_timeout_is_a_store_error():
    s = distcore.HashStore()
    with pytest.raises(distcore.DistStoreError) as e:
        elastic.barrier(s, 2, "lonely", barrier_timeout=0.1)
    assert isinstance(e.value, TimeoutError)
    assert s.timeout == timedelta(seconds=300)  # restored


def test_traced_barrier_names_the_missing_ranks():
    def rank_fn(s, rank):
        elastic.barrier(s, 3, "traced", barrier_timeout=0.3, rank=rank,
                        rank_tracing_decoder=lambda r: f"host{r}", trace_timeout=2)

    results, errors = run_ranks(2, rank_fn)  # rank 2 never comes
    assert results == {}
    assert isinstance(errors[0], distcore.DistStoreError)
    assert str(errors[0]).startswith("Timed out waiting on barrier on rank 0, for key prefix: traced "
                                     "(world_size=3, missing_ranks=[host2], timeout=")
    assert isinstance(errors[1], distcore.DistStoreError)


def test_tracing_needs_a_rank():
    with pytest.raises(AssertionError):
        elastic.barrier(distcore.HashStore(), 1, "x", rank_tracing_decoder=str)


def test_store_timeout_restores():
    s = distcore.HashStore()
    s.set_timeout(timedelta(seconds=5))
    with elastic.store_timeout(s, 0.25):
        assert s.timeout == timedelta(milliseconds=250)
    assert s.timeout == timedelta(seconds=5)


def test_wrong_store_type():
    with pytest.raises(TypeError):
        elastic.barrier(object(), 1, "x")
