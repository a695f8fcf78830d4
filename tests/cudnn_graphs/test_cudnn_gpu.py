"""cuDNN capacity graphs on the GPU: against the float64 reference, against Triton, one graph for every
length, CUDA-graph capture, the disk cache in a fresh process, and determinism."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import assume, given
from strategies import Case, cases, check_close, check_lse, make_inputs, poison_unfilled

import kvdecode
from kvdecode import cudnn_graphs
from kvdecode.cudnn_graphs import CudnnBackend
from kvdecode.problem import DecodeProblem
from kvdecode.reference import lse_error, reference_decode_attention, relative_l2_error, tolerance_for

pytestmark = pytest.mark.gpu
HALF = (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _private_disk_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KVDECODE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kvdecode-cache"))


def _problem(inputs) -> DecodeProblem:
    return DecodeProblem.from_tensors(inputs.q, inputs.k, inputs.v, inputs.seq_lens, **inputs.kwargs())


def _run_checked(case: Case, backend: str = "cudnn", **plan_kw):
    inputs = make_inputs(case, "cuda")
    problem = _problem(inputs)
    reason = CudnnBackend().supports(problem)
    assume(reason is None)  # e.g. a slice layout whose rows are not 16-byte multiples
    # NaN where no query may look: the padding mask must skip it. With T_q > 1 cuDNN 9.19's causal graph
    # multiplies those slots by zero weights (NaN leaks; see planner._auto_cudnn_reason), so there a large
    # finite value proves they get zero weight.
    poison_unfilled(inputs, case, math.nan if case.q_len == 1 else 1e4)
    the_plan = kvdecode.plan(problem, backend=backend, **plan_kw)
    out, lse = the_plan.run(inputs.q, inputs.k, inputs.v, inputs.seq_lens, out=inputs.out, return_lse=True)
    ref, ref_lse = reference_decode_attention(
        inputs.q, inputs.k, inputs.v, inputs.seq_lens, scale=inputs.scale
    )
    check_close(out, ref, case.dtype, problem.name, case.seed, repro=case.repro())
    check_lse(lse, ref_lse, case.dtype, problem.name, case.seed, repro=case.repro())
    return inputs, out, lse


@pytest.mark.slow  # tens of seconds on the GPU: started first (conftest)
@given(case=cases("cuda", dtypes=HALF, masks=False, kv_start=False, windows=False, sinks=False))
def test_cudnn_matches_the_reference(case):
    _run_checked(case)


@pytest.mark.parametrize("q_len", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("dtype", HALF)
def test_cudnn_speculative_rows_are_bottom_right_causal(q_len, dtype):
    capacity = 1024
    lens = (q_len, q_len + 1, 517, capacity)
    case = Case(4, 16, 4, 128, q_len, capacity, dtype, lens, kv_layout="bshd", seed=q_len)
    _run_checked(case)


@pytest.mark.parametrize("head_dim", [64, 80, 128, 192, 256])
def test_cudnn_head_dims_and_mqa(head_dim):
    case = Case(2, 8, 1, head_dim, 1, 2048, torch.bfloat16, (1, 1500), seed=head_dim)
    _run_checked(case)


@pytest.mark.slow  # tens of seconds on the GPU: started first (conftest)
@given(case=cases("cuda", dtypes=HALF, masks=False, kv_start=False, windows=False, sinks=False))
def test_cudnn_agrees_with_triton(case):
    inputs, out, lse = _run_checked(case)
    problem = _problem(inputs)
    t_out, t_lse = kvdecode.plan(problem, backend="triton").run(
        inputs.q, inputs.k, inputs.v, inputs.seq_lens, return_lse=True
    )
    tol = tolerance_for(case.dtype)  # each within tol of the reference, so within 2 tol of each other
    assert relative_l2_error(out, t_out) <= 2 * tol.rel_l2, case.repro()
    assert lse_error(lse, t_lse) <= 2 * tol.lse, case.repro()


def test_one_graph_serves_every_length_and_captures():
    capacity = 256
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 1, 64, generator=gen).to("cuda", torch.float16)
    k, v = (torch.randn(1, 2, capacity, 64, generator=gen).to("cuda", torch.float16) for _ in range(2))
    lens = torch.ones(1, dtype=torch.int32, device="cuda")
    the_plan = kvdecode.plan(DecodeProblem.from_tensors(q, k, v, lens), backend="cudnn")
    before = cudnn_graphs.cache_info()
    out = torch.full_like(q, math.nan)
    for n in range(1, capacity + 1):
        lens.fill_(n)
        out.fill_(math.nan)  # a skipped execute must not pass on the previous length's result
        the_plan.run(q, k, v, lens, out=out)
        ref, _ = reference_decode_attention(q, k, v, lens)
        check_close(out, ref, torch.float16, f"length {n}", 0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        the_plan.run(q, k, v, lens, out=out)
    for n in (1, 77, capacity):
        lens.fill_(n)
        out.fill_(math.nan)
        graph.replay()
        ref, _ = reference_decode_attention(q, k, v, lens)
        check_close(out, ref, torch.float16, f"replay at length {n}", 0)
    after = cudnn_graphs.cache_info()
    assert (after.builds + after.disk_loads) == (before.builds + before.disk_loads)


def test_runs_on_the_callers_stream():
    case = Case(2, 8, 2, 128, 1, 4096, torch.bfloat16, (3000, 4096), seed=11)
    inputs = make_inputs(case, "cuda")
    the_plan = kvdecode.plan(_problem(inputs), backend="cudnn")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            out = the_plan.run(inputs.q, inputs.k, inputs.v, inputs.seq_lens)
    torch.cuda.current_stream().wait_stream(side)
    ref, _ = reference_decode_attention(inputs.q, inputs.k, inputs.v, inputs.seq_lens)
    check_close(out, ref, case.dtype, "side stream", case.seed)


def test_auto_picks_cudnn_at_or_above_the_threshold():
    """auto follows the threshold of the table in use at each batch bucket (the H200 table's cuDNN never
    wins at B 1 for this shape, it does at B 4); where cuDNN is picked it gives the right answer."""
    capacity = 16384
    picked = None
    for batch in (1, 4, 16):
        case = Case(batch, 8, 2, 128, 1, capacity, torch.bfloat16, (capacity,) * batch, seed=5)
        inputs = make_inputs(case, "cuda")
        choice = kvdecode.explain(inputs.q, inputs.k, inputs.v, inputs.seq_lens, max_seq_len=capacity)
        assert (choice.backend == "cudnn") == (choice.threshold <= capacity), choice
        if choice.backend == "cudnn" and picked is None:
            picked = case, inputs, choice
    if picked is None:
        pytest.skip(f"the table in use never picks cuDNN at capacity {capacity} for B 1, 4, 16")
    case, inputs, choice = picked
    below = kvdecode.explain(inputs.q, inputs.k, inputs.v, inputs.seq_lens, max_seq_len=choice.threshold - 1)
    assert below.backend == "triton"
    out = kvdecode.decode_attention(inputs.q, inputs.k, inputs.v, inputs.seq_lens, max_seq_len=capacity)
    ref, _ = reference_decode_attention(inputs.q, inputs.k, inputs.v, inputs.seq_lens)
    check_close(out, ref, case.dtype, "auto", case.seed)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_deterministic_repeats_are_bitwise_identical(backend):
    """deterministic=True is served by Triton (cuDNN 9.19's LSE varies by 1 ulp call to call, with or
    without its non-deterministic engines: bench/cudnn_lse_repeat.py); auto says so in its choice."""
    case = Case(2, 32, 8, 128, 1, 32768, torch.bfloat16, (20000, 32768), seed=7)
    inputs = make_inputs(case, "cuda")
    with pytest.raises(kvdecode.UnsupportedError, match="not bitwise repeatable"):
        kvdecode.plan(_problem(inputs), backend="cudnn", deterministic=True)
    the_plan = kvdecode.plan(_problem(inputs), backend=backend, deterministic=True)
    assert the_plan.backend == "triton"
    if backend == "auto":
        assert "not bitwise repeatable" in the_plan.choice.reason
    first, first_lse = the_plan.run(inputs.q, inputs.k, inputs.v, inputs.seq_lens, return_lse=True)
    assert not first.isnan().any() and not first_lse.isnan().any(), "NaN in the first run"
    for i in range(20):
        again, again_lse = the_plan.run(inputs.q, inputs.k, inputs.v, inputs.seq_lens, return_lse=True)
        diff = (again.float() - first.float()).abs().max().item()
        lse_diff = (again_lse - first_lse).abs().max().item()
        assert torch.equal(again, first) and torch.equal(again_lse, first_lse), (
            f"repeat {i} differs: max |out diff| {diff:.3e}, max |lse diff| {lse_diff:.3e}"
        )


_CHILD = textwrap.dedent(
    """
    import sys, torch, kvdecode
    from kvdecode import cudnn_graphs
    from kvdecode.problem import DecodeProblem
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 16, 1, 128, generator=gen).to("cuda", torch.bfloat16)
    k, v = (torch.randn(2, 4, 8192, 128, generator=gen).to("cuda", torch.bfloat16) for _ in range(2))
    lens = torch.tensor([100, 8000], dtype=torch.int32, device="cuda")
    plan = kvdecode.plan(DecodeProblem.from_tensors(q, k, v, lens), backend="cudnn")
    out = plan.run(q, k, v, lens)
    torch.cuda.synchronize()
    info = cudnn_graphs.cache_info()
    torch.save({"out": out.cpu(), "builds": info.builds, "loads": info.disk_loads}, sys.argv[1])
    """
)


def test_disk_cache_round_trip_in_a_fresh_process(tmp_path):
    env = dict(os.environ, KVDECODE_CACHE_DIR=str(tmp_path / "cache"))
    results = []
    for i in range(2):
        path = tmp_path / f"run{i}.pt"
        subprocess.run([sys.executable, "-c", _CHILD, str(path)], env=env, check=True, timeout=300)
        results.append(torch.load(path))
    # a plan builds both of its graphs (output, output + LSE) up front, never inside a capture
    assert (results[0]["builds"], results[0]["loads"]) == (2, 0)
    assert (results[1]["builds"], results[1]["loads"]) == (0, 2)
    assert torch.equal(results[0]["out"], results[1]["out"])
    assert list((tmp_path / "cache" / "cudnn_plans").glob("*.plan"))


def test_auto_keeps_speculative_rows_off_cudnn():
    case = Case(2, 16, 4, 128, 4, 1 << 16, torch.bfloat16, (4, 1 << 16), seed=3)
    inputs = make_inputs(case, "cuda")
    choice = kvdecode.explain(inputs.q, inputs.k, inputs.v, inputs.seq_lens, max_seq_len=1 << 16)
    assert choice.backend == "triton" and "T_q > 1" in choice.reason, choice
