"""fp8 K/V caches (issue 13): the Triton kernel against the float64 reference on the *dequantized* cache.

Tolerance: the one table's row for q's dtype. Every float8_e4m3fn / float8_e5m2 value is exact in fp16
and bf16 (3 or 2 mantissa bits, exponents within range), so converting a tile after loading adds no
rounding: the kernel's error against the dequantized cache is that of an fp16/bf16 cache, while the
error against the original (unquantized) K/V is the quantization's, reported, not asserted. The
interpreter supports fp8 loads and conversions (Triton 3.9), so these run in CI.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import cases, check_close, check_lse, make_inputs

import kvdecode
from kvdecode.reference import reference_decode_attention, relative_l2_error
from kvdecode.triton_kernels import SplitKVConfig, SplitKVLauncher

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def quantize(x: torch.Tensor, dtype: torch.dtype, per_head: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x / scale)`` saturated to fp8, and the float32 scale (one, or one per KV head) that maps the
    largest magnitude to a quarter of the fp8 range."""
    dims = (0, 2, 3) if per_head else tuple(range(x.dim()))
    amax = x.detach().abs().float().amax(dim=dims).clamp(min=1e-6)
    scale = (amax / (FP8_MAX[dtype] / 4)).to(torch.float32)
    view = scale.view(1, -1, 1, 1) if per_head else scale
    q8 = (x.float() / view).clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype)
    return q8, scale.contiguous() if per_head else scale.reshape(())


@given(case=cases(dtypes=(torch.float16, torch.bfloat16)), fp8=st.sampled_from(FP8),
       kind=st.sampled_from(["per_head", "scalar", "none"]))  # fmt: skip
def test_fp8_caches_match_the_reference_on_the_dequantized_cache(case, fp8, kind):
    x = make_inputs(case, "cpu")
    k8, k_scale = quantize(x.k, fp8, kind == "per_head")
    v8, v_scale = quantize(x.v, fp8, kind == "per_head")
    if kind == "none":  # plain fp8 values (scale 1)
        k8, v8, k_scale, v_scale = x.k.clamp(-200, 200).to(fp8), x.v.clamp(-200, 200).to(fp8), None, None
    scales = {} if kind == "none" else dict(k_scale=k_scale, v_scale=v_scale)
    out, lse = kvdecode.decode_attention(
        x.q, k8, v8, x.seq_lens, scale=x.scale, kv_start=x.kv_start, mask=x.mask, out=x.out,
        backend="triton", return_lse=True, **scales,
    )  # fmt: skip
    ref, ref_lse = reference_decode_attention(
        x.q, k8, v8, x.seq_lens, scale=x.scale, kv_start=x.kv_start, mask=x.mask, **scales
    )
    problem = kvdecode.DecodeProblem.from_tensors(x.q, k8, v8, x.seq_lens, kv_start=x.kv_start,
                                                  mask=x.mask, **scales)  # fmt: skip
    check_close(out, ref, case.dtype, problem.name, case.seed, repro=repr(case))
    check_lse(lse, ref_lse, case.dtype, problem.name, case.seed, repro=repr(case))
    if kind != "none":  # the quantization's own error, against the unquantized K/V: reported
        exact, _ = reference_decode_attention(x.q, x.k, x.v, x.seq_lens, scale=x.scale,
                                              kv_start=x.kv_start, mask=x.mask)  # fmt: skip
        print(f"{problem.name}: rel L2 vs unquantized K/V {relative_l2_error(out, exact):.2e}")


@pytest.mark.parametrize("fp8", FP8)
def test_fp8_result_is_independent_of_the_split_count(fp8):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 8, 2, 32, generator=gen).to(torch.bfloat16)
    k8 = torch.randn(2, 2, 256, 32, generator=gen).to(fp8)
    v8 = torch.randn(2, 2, 256, 32, generator=gen).to(fp8)
    lens = torch.tensor([256, 77], dtype=torch.int32)
    k_scale, v_scale = torch.tensor([0.5, 2.0]), torch.tensor([1.5, 0.25])
    problem = kvdecode.DecodeProblem.from_tensors(q, k8, v8, lens, k_scale=k_scale, v_scale=v_scale)
    ref, _ = reference_decode_attention(q, k8, v8, lens, k_scale=k_scale, v_scale=v_scale)
    for splits in (1, 3, 16):
        out = torch.full_like(q, float("nan"))
        SplitKVLauncher(problem, SplitKVConfig(num_splits=splits, block_n=16))(
            q, k8, v8, lens, None, None, out, None, scales=(k_scale, v_scale)
        )
        check_close(out, ref, torch.bfloat16, f"{problem.name} splits {splits}", 3)


def _fp8_inputs():
    q = torch.randn(1, 4, 1, 16, dtype=torch.bfloat16)
    k8 = torch.randn(1, 2, 32, 16).to(torch.float8_e4m3fn)
    lens = torch.tensor([20], dtype=torch.int32)
    return q, k8, lens


@pytest.mark.parametrize(
    "over, fragment",
    [
        (dict(q=torch.randn(1, 4, 1, 16)), "q.dtype must be float16 or bfloat16 with fp8 caches"),
        (dict(v=torch.randn(1, 2, 32, 16, dtype=torch.bfloat16)), "v_cache.dtype must equal k_cache.dtype"),
        (dict(k_scale=torch.ones(()), v_scale=None), "v_scale must be given with the other scale"),
        (dict(k_scale=torch.ones((), dtype=torch.float64), v_scale=torch.ones(())), "k_scale must be a"),
        (dict(k_scale=torch.ones(3), v_scale=torch.ones(3)), r"k_scale.shape must be \(\) or \(1,\)"),
        (dict(k_scale=torch.ones(2), v_scale=torch.ones(())), "must be of one kind"),
    ],
    ids=["fp32-q", "mixed-kv", "one-scale", "fp64-scale", "scale-shape", "mixed-kinds"],
)
def test_bad_fp8_arguments_raise_before_any_launch(over, fragment):
    q, k8, lens = _fp8_inputs()
    args = dict(q=q, k=k8, v=k8, k_scale=None, v_scale=None, **{})
    args.update(over)
    with pytest.raises(kvdecode.KVDecodeError, match=fragment):
        kvdecode.decode_attention(args["q"], args["k"], args["v"], lens, k_scale=args["k_scale"],
                                  v_scale=args["v_scale"], backend="triton")  # fmt: skip


def test_scales_with_a_bf16_cache_are_refused():
    q, _, lens = _fp8_inputs()
    k = torch.randn(1, 2, 32, 16, dtype=torch.bfloat16)
    with pytest.raises(kvdecode.KVDecodeError, match=r"must be None for torch\.bfloat16 caches"):
        kvdecode.decode_attention(q, k, k, lens, k_scale=torch.ones(()), v_scale=torch.ones(()))


def test_a_plan_made_with_scales_needs_them_at_run_time():
    q, k8, lens = _fp8_inputs()
    s = torch.ones(())
    the_plan = kvdecode.plan(kvdecode.DecodeProblem.from_tensors(q, k8, k8, lens, k_scale=s, v_scale=s),
                             backend="triton")  # fmt: skip
    with pytest.raises(kvdecode.KVDecodeError, match="k_scale/v_scale are None but the plan was made with"):
        the_plan.run(q, k8, k8, lens)
    out = the_plan.run(q, k8, k8, lens, k_scale=s, v_scale=s)
    ref, _ = reference_decode_attention(q, k8, k8, lens, k_scale=s, v_scale=s)
    check_close(out, ref, torch.bfloat16, the_plan.problem.name, 0)


def test_auto_keeps_fp8_on_triton_and_says_why():
    q, k8, lens = _fp8_inputs()
    choice = kvdecode.explain(q, k8, k8, lens)
    assert choice.backend == "triton"
    from kvdecode.cudnn_graphs.backend import problem_reason

    problem = kvdecode.DecodeProblem.from_tensors(q, k8, k8, lens)
    assert "fp8" in problem_reason(problem) and problem.name.endswith("kvfp8e4m3")
    assert problem.kv_bytes(20) == 2 * 2 * 20 * 16  # one byte per element
