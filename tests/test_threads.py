"""Threads that share a stream must never share scratch (issue 12, defect 1).

Reproduced on the H200 before the fix: 4 threads x 400 calls of ``decode_attention(backend="triton")``
on the default stream (capacity 16384, 128 splits) returned 45-84 wrong outputs per thread, no error.
Every output here is checked against the float64 reference. GPU only: Triton's interpreter is not
thread-safe.
"""

from __future__ import annotations

import threading

import pytest
import torch

import kvdecode
from kvdecode.reference import reference_decode_attention, relative_l2_error, tolerance_for

pytestmark = pytest.mark.gpu

THREADS, CALLS = 4, 150


def _inputs(seed: int, batch=1, hq=8, hkv=1, cap=16384, d=128, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, 1, d, generator=gen).to("cuda", dtype)
    k = torch.randn(batch, hkv, cap, d, generator=gen).to("cuda", dtype)
    v = torch.randn(batch, hkv, cap, d, generator=gen).to("cuda", dtype)
    lens = torch.randint(cap // 2, cap + 1, (batch,), generator=gen, dtype=torch.int32).to("cuda")
    ref, _ = reference_decode_attention(q, k, v, lens)
    return q, k, v, lens, ref


def _hammer(call, private_streams: bool):
    cases = [_inputs(seed) for seed in range(THREADS)]
    outs: list[list[torch.Tensor]] = [[] for _ in range(THREADS)]
    barrier = threading.Barrier(THREADS)

    def work(i):
        stream = torch.cuda.Stream() if private_streams else torch.cuda.current_stream()
        with torch.cuda.stream(stream):
            barrier.wait()
            for _ in range(CALLS):
                outs[i].append(call(*cases[i][:4]))
            stream.synchronize()

    _run_threads(work)
    _assert_all_right(outs, [case[4] for case in cases])


def _run_threads(work) -> None:
    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()


def _assert_all_right(outs, refs) -> None:
    tol = tolerance_for(torch.bfloat16).rel_l2
    wrong = [sum(relative_l2_error(o, refs[i]) > tol for o in outs[i]) for i in range(THREADS)]
    assert wrong == [0] * THREADS, f"wrong outputs per thread: {wrong}"


@pytest.mark.parametrize("private_streams", [False, True], ids=["default-stream", "own-streams"])
@pytest.mark.parametrize("backend", ["triton", "cudnn"])
def test_decode_attention_from_threads(backend, private_streams):
    if backend == "cudnn" and kvdecode.backends.get_backend("cudnn").supports(_inputs_problem()):
        pytest.skip("cuDNN is not usable here")
    _hammer(lambda q, k, v, lens: kvdecode.decode_attention(q, k, v, lens, backend=backend), private_streams)


def _inputs_problem():
    q, k, v, lens, _ = _inputs(0, cap=256)
    return kvdecode.DecodeProblem.from_tensors(q, k, v, lens)


def test_one_plan_run_from_threads_on_the_default_stream():
    q, k, v, lens, _ = _inputs(0)
    the_plan = kvdecode.plan(kvdecode.DecodeProblem.from_tensors(q, k, v, lens), backend="triton")
    assert the_plan.launcher.num_splits > 1  # the case that needs partials
    _hammer(lambda q, k, v, lens: the_plan.run(q, k, v, lens), private_streams=False)


@pytest.mark.parametrize("private_streams", [False, True], ids=["default-stream", "own-streams"])
def test_one_fused_merge_launcher_from_threads(private_streams):
    """The fused merge's scratch (partials and counters per stream, the counters left at zero by each call)
    shared by threads: on one stream their calls run in order; on their own streams each has its own."""
    from kvdecode.triton_kernels import SplitKVConfig, SplitKVLauncher
    from kvdecode.triton_kernels.launcher import FUSED_SCRATCH

    q, k, v, lens, _ = _inputs(0)
    problem = kvdecode.DecodeProblem.from_tensors(q, k, v, lens)
    launch = SplitKVLauncher(problem, SplitKVConfig(num_splits=16, block_n=64, fused_merge=True))
    assert launch.fused_eager and launch.fused_captured

    def call(q, k, v, lens):
        out = torch.full_like(q, float("nan"))
        launch(q, k, v, lens, None, None, out, None)
        return out

    FUSED_SCRATCH.clear()
    _hammer(call, private_streams)
    torch.cuda.synchronize()
    held = FUSED_SCRATCH.buffers()
    assert all(not c.any() for _, c in held.values())
    assert len(held) == (THREADS if private_streams else 1)  # pooled streams: 4 distinct


def test_static_cache_from_threads_on_the_default_stream():
    caches, refs = [], []
    for seed in range(THREADS):
        q, k, v, lens, ref = _inputs(seed, cap=8192)
        cache = kvdecode.StaticKVCache(1, batch=1, num_kv_heads=1, capacity=8192, head_dim=128,
                                       backend="triton")  # fmt: skip
        cache.keys(0).copy_(k)
        cache.values(0).copy_(v)
        cache.set_lengths(lens.cpu().tolist())
        caches.append((cache, q))
        refs.append(ref)
    outs = [[] for _ in range(THREADS)]

    def work(i):
        cache, q = caches[i]
        for _ in range(CALLS):
            outs[i].append(cache.attend(0, q))

    _run_threads(work)
    _assert_all_right(outs, refs)
