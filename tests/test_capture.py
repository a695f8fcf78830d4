"""CUDA-graph capture of a decode step (StaticKVCache advance + append + attend), plan mismatches, overflow.

GPU only. The captured step is replayed 200 times while lengths grow on the device (ragged rows, rows
reset between replays); every replay's outputs are compared with the float64 reference and every
appended token with the inputs. The cuDNN backend is skipped, with its reason, where it cannot serve.
"""

from __future__ import annotations

import math

import pytest
import torch
from strategies import check_close

from kvdecode import DecodeProblem, KVDecodeError, StaticKVCache, UnsupportedError, plan
from kvdecode.reference import reference_decode_attention

pytestmark = pytest.mark.gpu

BACKENDS = ["triton", "cudnn"]


def _plan_or_skip(cache: StaticKVCache, q: torch.Tensor, out: torch.Tensor | None = None) -> None:
    try:
        cache.plan_for(q, out=out)
    except UnsupportedError as err:
        pytest.skip(f"backend {cache.backend!r} unavailable: {err}")


def _capture(step):
    """Warm up on a side stream (compiles kernels, makes plans), then capture ``step`` in a graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


class Step:
    """Static inputs and outputs of one decode step over every layer of ``cache``."""

    def __init__(self, cache: StaticKVCache, num_q_heads: int, q_len: int) -> None:
        n, b, h, d = cache.num_layers, cache.batch, cache.num_kv_heads, cache.head_dim
        kw = dict(dtype=cache.dtype, device="cuda")
        self.cache, self.q_len = cache, q_len
        self.q = torch.zeros(n, b, num_q_heads, q_len, d, **kw)
        self.k_new = torch.zeros(n, b, h, q_len, d, **kw)
        self.v_new = torch.zeros(n, b, h, q_len, d, **kw)
        self.out = torch.zeros(n, b, num_q_heads, q_len, d, **kw)

    def __call__(self) -> None:
        self.cache.advance(self.q_len)
        for layer in range(self.cache.num_layers):
            self.cache.append(layer, self.k_new[layer], self.v_new[layer])
            self.cache.attend(layer, self.q[layer], out=self.out[layer])

    def refill(self, gen: torch.Generator) -> None:
        for t in (self.q, self.k_new, self.v_new):
            t.copy_(torch.randn(t.shape, generator=gen))
        self.out.fill_(math.nan)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_captured_step_replays_with_growing_ragged_lengths(backend, q_len, layout):
    dtype, capacity, start = torch.bfloat16, 512, [0, 37, 300]
    cache = StaticKVCache(
        2, 3, 2, capacity, 128, dtype=dtype, layout=layout, backend=backend, validate=True, device="cuda"
    )
    gen = torch.Generator().manual_seed(21)
    for buf in (cache.k_buffer, cache.v_buffer):
        buf.copy_(torch.randn(buf.shape, generator=gen))  # stale data the lengths must hide
    step = Step(cache, num_q_heads=8, q_len=q_len)
    _plan_or_skip(cache, step.q[0], step.out[0])
    graph = _capture(step)
    cache.set_lengths(start)
    lens = list(start)
    for replay in range(200):
        full = [b for b, n in enumerate(lens) if n + q_len > capacity]
        if replay == 60:
            full.append(1)  # a finished sequence replaced by a new one: the batch gets more ragged
        if full:
            cache.reset(full)
            lens = [0 if b in full else n for b, n in enumerate(lens)]
        step.refill(gen)
        graph.replay()
        lens = [n + q_len for n in lens]
        assert cache.seq_lens.tolist() == lens, f"replay {replay}"
        _check_replay(step, lens, f"{backend} {layout} T_q={q_len} replay {replay} lens={lens}")


def _check_replay(step: Step, lens: list[int], where: str) -> None:
    cache, q_len, filled = step.cache, step.q_len, max(lens)
    for layer in range(cache.num_layers):
        k, v = cache.keys(layer), cache.values(layer)
        for b, n in enumerate(lens):
            assert torch.equal(k[b, :, n - q_len : n], step.k_new[layer, b]), f"{where}: K row {b}"
            assert torch.equal(v[b, :, n - q_len : n], step.v_new[layer, b]), f"{where}: V row {b}"
        ref, _ = reference_decode_attention(  # only the filled prefix: the reference works in float64
            step.q[layer], k[:, :, :filled], v[:, :, :filled], cache.seq_lens
        )
        check_close(step.out[layer], ref, cache.dtype, f"{where} layer {layer}", 21)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_mismatch_errors_name_both_sides(backend):
    gen = torch.Generator().manual_seed(22)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to("cuda", torch.bfloat16)

    q, k, v = randn(2, 8, 1, 128), randn(2, 2, 256, 128), randn(2, 2, 256, 128)
    lens = torch.tensor([5, 256], dtype=torch.int32, device="cuda")
    try:
        the_plan = plan(DecodeProblem.from_tensors(q, k, v, lens), backend=backend)
    except UnsupportedError as err:
        pytest.skip(f"backend {backend!r} unavailable: {err}")
    ref, _ = reference_decode_attention(q, k, v, lens)
    check_close(the_plan.run(q, k, v, lens), ref, torch.bfloat16, f"{backend} plan", 22)
    bshd = randn(2, 256, 2, 128).transpose(1, 2)
    cases = [
        ((q.half(), k, v, lens), {}, "q has dtype torch.float16 but the plan was made for torch.bfloat16"),
        ((q, k[:, :, :128], v, lens), {}, r"k_cache has shape \(2, 2, 128, 128\) but the plan was made for"),
        ((q, k, bshd, lens), {}, r"v_cache has strides \(65536, 128, 256, 1\) but the plan was made for"),
        ((q, k, v, lens), {"kv_start": torch.zeros_like(lens)}, "kv_start is given but the plan was made"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(KVDecodeError, match=match):
            the_plan.run(*args, **kwargs)


def test_cache_rejects_a_query_it_cannot_serve():
    cache = StaticKVCache(1, 2, 2, 64, 128, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(KVDecodeError, match=r"k_cache\.dtype must equal q\.dtype"):
        cache.attend(0, torch.zeros(2, 8, 1, 128, dtype=torch.float16, device="cuda"))
    with pytest.raises(KVDecodeError, match=r"k_cache\.shape\[3\] \(D\) must equal q\.shape\[3\] \(64\)"):
        cache.attend(0, torch.zeros(2, 8, 1, 64, dtype=torch.bfloat16, device="cuda"))


def test_cache_overflow_raises_eagerly_and_is_dropped_under_capture():
    cache = StaticKVCache(2, 2, 2, 16, 64, dtype=torch.float16, device="cuda", validate=True)
    cache.set_lengths([14, 3])
    with pytest.raises(KVDecodeError, match=r"seq_lens\[0\] after advance must be in 0..capacity \(16\)"):
        cache.advance(4)
    assert cache.seq_lens.tolist() == [14, 3]

    step = Step(cache, num_q_heads=4, q_len=4)
    cache.reset()
    graph = _capture(step)  # validation is skipped while capturing: no sync
    gen = torch.Generator().manual_seed(23)
    for buf in (cache.k_buffer, cache.v_buffer):  # NaN everywhere but row 0's first 10 (filled) slots
        buf.fill_(math.nan)
        buf[:, 0, :, :10] = torch.randn(buf[:, 0, :, :10].shape, generator=gen).to(buf)
    cache.set_lengths([10, 0])
    expected_k = cache.k_buffer.clone()
    for replay in range(3):  # row 0: 14, 18 (slots 16, 17 dropped), 22 (all dropped)
        step.refill(gen)
        before = cache.seq_lens.tolist()
        graph.replay()
        for layer in range(2):
            for b, n in enumerate(before):
                for t in range(4):
                    if n + t < 16:
                        expected_k[layer, b, :, n + t] = step.k_new[layer, b, :, t]
        assert torch.equal(cache.k_buffer.isnan(), expected_k.isnan()), f"replay {replay}: a spilled write"
        written = ~expected_k.isnan()
        assert torch.equal(cache.k_buffer[written], expected_k[written]), f"replay {replay}"
        assert not step.out.isnan().any(), f"replay {replay}: attention read outside the filled cache"
    assert cache.seq_lens.tolist() == [22, 12]
    assert cache.overflowed().tolist() == [True, False]
