"""Graph-cache keys and the bounded LRU, with an injected builder (no GPU needed)."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from problems import make_key, make_problem

from kvdecode.cudnn_graphs import cache as cache_mod
from kvdecode.cudnn_graphs.cache import GraphCache, cache_size_from_env
from kvdecode.problem import DecodeProblem


class CountingBuilder:
    def __init__(self, source: str = "build") -> None:
        self.built: list = []
        self.source = source

    def __call__(self, key):
        self.built.append(key)
        return type("Built", (), {"key": key, "source": self.source})()


def _problem_from_tensors(capacity: int, dtype=torch.float16, scale=None, bshd=False) -> DecodeProblem:
    # CPU tensors: the key logic does not care where the problem lives.
    q = torch.zeros(2, 4, 1, 16, dtype=dtype)
    if bshd:
        k = torch.zeros(2, capacity, 2, 16, dtype=dtype).transpose(1, 2)
    else:
        k = torch.zeros(2, 2, capacity, 16, dtype=dtype)
    lens = torch.tensor([1, capacity], dtype=torch.int32)
    return DecodeProblem.from_tensors(q, k, k, lens, scale=scale)


def _get(cache, problem, **kw):
    return cache.get(make_key(problem, **kw))


def test_new_capacity_builds_one_graph_and_other_lengths_reuse_it():
    builder = CountingBuilder()
    cache = GraphCache(builder, maxsize=8)
    first = _get(cache, _problem_from_tensors(256))
    for n in (1, 7, 128, 256):  # other lengths at the same capacity: same problem, same key
        q = torch.zeros(2, 4, 1, 16, dtype=torch.float16)
        k = torch.zeros(2, 2, 256, 16, dtype=torch.float16)
        problem = DecodeProblem.from_tensors(q, k, k, torch.tensor([n, n], dtype=torch.int32))
        assert _get(cache, problem) is first
    assert len(builder.built) == 1
    _get(cache, _problem_from_tensors(512))
    assert len(builder.built) == 2
    info = cache.cache_info()
    assert (info.misses, info.hits, info.builds, info.currsize) == (2, 4, 2, 2)


@pytest.mark.parametrize(
    "change",
    [
        dict(scale=0.5),
        dict(dtype=torch.bfloat16),
        dict(bshd=True),  # the same shape through other strides
    ],
)
def test_scale_dtype_or_strides_build_a_new_graph(change):
    builder = CountingBuilder()
    cache = GraphCache(builder, maxsize=8)
    _get(cache, _problem_from_tensors(256))
    _get(cache, _problem_from_tensors(256, **change))
    assert len(builder.built) == 2
    assert builder.built[0] != builder.built[1]


def test_every_baked_in_field_is_in_the_key():
    base = make_problem()
    key = make_key(base)
    changes = dict(
        batch=3,
        num_q_heads=16,
        num_kv_heads=4,
        head_dim=128,
        q_len=2,
        capacity=2048,
        dtype=torch.float16,
        scale=0.01,
        device=torch.device("cuda", 1),
        q_strides=(2048, 256, 64, 1),
        k_strides=(262144, 64, 128, 1),
        v_strides=(262144, 64, 128, 1),
    )
    for field, value in changes.items():
        assert make_key(replace(base, **{field: value})) != key, field
    assert make_key(base, deterministic=True) != key
    assert make_key(base, with_lse=True) != key
    assert replace(key, cudnn_version=91000) != key
    assert replace(key, scale=key.scale + 1e-12).digest() != key.digest()  # exact scale in the digest
    assert make_key(replace(base, q_len=2)).causal_bottom_right and not key.causal_bottom_right


def test_lru_evicts_the_least_recently_used():
    builder = CountingBuilder()
    cache = GraphCache(builder, maxsize=2)
    a, b, c = (make_key(make_problem(capacity=n)) for n in (64, 128, 256))
    cache.get(a)
    cache.get(b)
    cache.get(a)  # a is now the most recent
    cache.get(c)  # evicts b
    assert a in cache and c in cache and b not in cache
    cache.get(b)
    assert builder.built == [a, b, c, b]
    info = cache.cache_info()
    assert info.evictions == 2 and info.currsize == 2 and info.maxsize == 2


def test_clear_empties_and_resets_counters():
    builder = CountingBuilder()
    cache = GraphCache(builder, maxsize=4)
    key = make_key(make_problem())
    cache.get(key)
    cache.get(key)
    cache.clear()
    assert cache.cache_info().hits == 0 and cache.cache_info().currsize == 0
    cache.get(key)
    assert len(builder.built) == 2


def test_disk_loads_and_build_time_are_counted_apart():
    cache = GraphCache(CountingBuilder(source="disk"), maxsize=4)
    cache.get(make_key(make_problem()))
    info = cache.cache_info()
    assert (info.builds, info.disk_loads) == (0, 1)
    assert info.load_seconds >= 0.0 and info.build_seconds == 0.0


def test_thrashing_warns_once_and_never_raises():
    cache = GraphCache(CountingBuilder(), maxsize=2)
    keys = [make_key(make_problem(capacity=64 * (i + 1))) for i in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(cache_mod.THRASH_WINDOW):
            for key in keys:  # round robin over 3 keys in 2 slots: every lookup misses
                cache.get(key)
    thrash = [w for w in caught if "thrashing" in str(w.message)]
    assert len(thrash) == 1
    assert issubclass(thrash[0].category, RuntimeWarning)
    assert "KVDECODE_GRAPH_CACHE_SIZE" in str(thrash[0].message)


def test_a_warm_cache_does_not_warn():
    cache = GraphCache(CountingBuilder(), maxsize=2)
    keys = [make_key(make_problem(capacity=64 * (i + 1))) for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for key in keys:  # one eviction
            cache.get(key)
        for _ in range(4 * cache_mod.THRASH_WINDOW):
            cache.get(keys[-1])


def test_cache_size_from_env(monkeypatch):
    monkeypatch.setenv("KVDECODE_GRAPH_CACHE_SIZE", "5")
    assert cache_size_from_env() == 5
    assert GraphCache(CountingBuilder()).maxsize == 5
    monkeypatch.setenv("KVDECODE_GRAPH_CACHE_SIZE", "zero")
    with pytest.warns(RuntimeWarning, match="positive integer"):
        assert cache_size_from_env() == cache_mod.DEFAULT_SIZE
    monkeypatch.delenv("KVDECODE_GRAPH_CACHE_SIZE")
    assert cache_size_from_env() == cache_mod.DEFAULT_SIZE
