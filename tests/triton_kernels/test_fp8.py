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
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import cases, check_close, check_lse, make_inputs, packed_heads_options

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
        x.q, k8, v8, x.seq_lens, out=x.out, backend="triton", return_lse=True, **x.kwargs(), **scales
    )
    ref, ref_lse = reference_decode_attention(x.q, k8, v8, x.seq_lens, **x.kwargs(), **scales)
    problem = kvdecode.DecodeProblem.from_tensors(x.q, k8, v8, x.seq_lens, **x.kwargs(), **scales)
    check_close(out, ref, case.dtype, problem.name, case.seed, repro=repr(case))
    check_lse(lse, ref_lse, case.dtype, problem.name, case.seed, repro=repr(case))
    if kind != "none":  # the quantization's own error, against the unquantized K/V: reported
        exact, _ = reference_decode_attention(x.q, x.k, x.v, x.seq_lens, **x.kwargs())
        print(f"{problem.name}: rel L2 vs unquantized K/V {relative_l2_error(out, exact):.2e}")


@given(data=st.data(), fp8=st.sampled_from(FP8), kind=st.sampled_from(["per_head", "scalar", "none"]))
def test_fp8_packed_kv_heads_match_the_reference(data, fp8, kind):
    """Several KV heads per program with fp8 caches: per-head scales become per-row ones (each row its
    KV head's k_scale in the logit scale, v_scale on the output), bf16 q rescaled for the fp16 dots."""
    case = data.draw(cases(dtypes=(torch.float16, torch.bfloat16), kv_heads=(2, 4)), label="case")
    options = packed_heads_options(case)
    assume(options)
    heads = data.draw(st.sampled_from(options), label="heads_per_cta")
    splits = data.draw(st.sampled_from((1, 3)), label="splits")
    x = make_inputs(case, "cpu")
    k8, k_scale = quantize(x.k, fp8, kind == "per_head")
    v8, v_scale = quantize(x.v, fp8, kind == "per_head")
    if kind == "per_head":  # scales far apart, so a row given another head's scale is caught
        k_scale = k_scale * torch.logspace(-2, 2, case.num_kv_heads, base=2.0)
        v_scale = v_scale * torch.logspace(2, -2, case.num_kv_heads, base=2.0)
    scales = {} if kind == "none" else dict(k_scale=k_scale, v_scale=v_scale)
    ref, _ = reference_decode_attention(x.q, k8, v8, x.seq_lens, **x.kwargs(), **scales)
    problem = kvdecode.DecodeProblem.from_tensors(x.q, k8, v8, x.seq_lens, **x.kwargs(), **scales)
    out = torch.full_like(x.out, float("nan"))
    cfg = SplitKVConfig(num_splits=splits, block_n=16, heads_per_cta=heads)
    SplitKVLauncher(problem, cfg)(
        x.q, k8, v8, x.seq_lens, x.kv_start, x.mask, out, None,
        scales=(k_scale, v_scale) if scales else None, sinks=x.sinks,
    )  # fmt: skip
    check_close(out, ref, case.dtype, f"{problem.name} {cfg.name}", case.seed, repro=repr(case))


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


@pytest.mark.gpu
@pytest.mark.parametrize("kv", [torch.bfloat16, *FP8])
@pytest.mark.parametrize("warps", [1, 2])
def test_gpu_one_and_two_warp_ctas_match_the_reference(kv, warps):
    """The tuner's search tries 1- and 2-warp CTAs (the softmax then syncs the CTA less): compiled, on
    the GPU, they must give the reference's result, T_q 1 and 3, ragged rows, several splits."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    for q_len in (1, 3):
        q = torch.randn(2, 32, q_len, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
        k = torch.randn(2, 8, 1000, 128, device="cuda", generator=gen)
        v = torch.randn(2, 8, 1000, 128, device="cuda", generator=gen)
        k, v = k.to(kv), v.to(kv)
        lens = torch.tensor([1000, 333], dtype=torch.int32, device="cuda")
        problem = kvdecode.DecodeProblem.from_tensors(q, k, v, lens)
        ref, _ = reference_decode_attention(q, k, v, lens)
        for splits in (1, 8):
            out = torch.full_like(q, float("nan"))
            SplitKVLauncher(problem, SplitKVConfig(num_splits=splits, block_n=64, num_warps=warps))(
                q, k, v, lens, None, None, out, None
            )
            check_close(out, ref, torch.bfloat16, f"{problem.name} w{warps} s{splits}", 5)


@pytest.mark.gpu
@pytest.mark.parametrize("kv", [torch.bfloat16, *FP8])
def test_gpu_packed_kv_heads_at_the_shapes_the_tuner_tries(kv):
    """Four (and two) KV heads per CTA at H 32/8, D 128 with the configurations ``kernel_variants.py`` and
    the tuner try (137-154 KB of shared memory with 4 heads' tiles a stage): compiled on the GPU, against
    the reference, T_q 1 and 3, ragged rows (one of a single key), per-head scales far apart for fp8; at
    T_q 3 the one that does not fit a CTA's shared memory is refused by name."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    for q_len in (1, 3):
        q = torch.randn(4, 32, q_len, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
        k = torch.randn(4, 8, 1000, 128, device="cuda", generator=gen).to(kv)
        v = torch.randn(4, 8, 1000, 128, device="cuda", generator=gen).to(kv)
        lens = torch.tensor([1000, 333, q_len, 64], dtype=torch.int32, device="cuda")
        scales = {}
        if kv != torch.bfloat16:
            scales = dict(k_scale=torch.logspace(-2, 2, 8, base=2.0, device="cuda"),
                          v_scale=torch.logspace(2, -2, 8, base=2.0, device="cuda"))  # fmt: skip
        problem = kvdecode.DecodeProblem.from_tensors(q, k, v, lens, **scales)
        ref, _ = reference_decode_attention(q, k, v, lens, **scales)
        configs = [
            SplitKVConfig(num_splits=8, block_n=64, num_warps=4, num_stages=2, heads_per_cta=4),
            SplitKVConfig(num_splits=1, block_n=32, num_warps=4, num_stages=3, heads_per_cta=4),
            SplitKVConfig(num_splits=16, block_n=64, num_warps=8, num_stages=3, heads_per_cta=2),
        ]
        if q_len == 3 and kv == torch.bfloat16:  # 48 rows a program with 4 heads: 64-row blocks, whose
            # bf16 tiles do not fit at n64 (272 KB of shared memory with 2 stages on Triton 3.6: H100, 12-05,
            # and bench/kernel_sass.py here): refused by name, before any launch; the tuner does not try
            # them (packing_options: 4 heads' rows must fit 16)
            with pytest.raises(kvdecode.KVDecodeError, match="does not fit this GPU"):
                SplitKVLauncher(problem, configs[0])(q, k, v, lens, None, None, torch.empty_like(q), None)
            configs[0] = SplitKVConfig(num_splits=16, block_n=64, num_warps=4, num_stages=2, heads_per_cta=2)
        for cfg in configs:
            out = torch.full_like(q, float("nan"))
            SplitKVLauncher(problem, cfg)(
                q, k, v, lens, None, None, out, None,
                scales=(scales["k_scale"], scales["v_scale"]) if scales else None,
            )  # fmt: skip
            check_close(out, ref, torch.bfloat16, f"{problem.name} {cfg.name}", 7)


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


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("per_head", [False, True], ids=["one-scale", "per-head"])
def test_static_cache_quantizes_on_append_and_decodes_fp8(fp8, per_head):
    """append stores saturate(new / scale) in fp8, exactly as torch casts it; attend decodes against the
    dequantized cache; a value past the fp8 range saturates instead of becoming inf/NaN."""
    gen = torch.Generator().manual_seed(11)
    k_scale = torch.tensor([0.02, 0.05]) if per_head else 0.03
    v_scale = torch.tensor([0.04, 0.01]) if per_head else 0.02
    cache = kvdecode.StaticKVCache(1, batch=2, num_kv_heads=2, capacity=48, head_dim=16, dtype=fp8,
                                   device="cpu", backend="triton", k_scale=k_scale,
                                   v_scale=v_scale)  # fmt: skip
    ks, vs = cache.k_scale, cache.v_scale
    view = (lambda s: s.view(1, -1, 1, 1)) if per_head else (lambda s: s)
    steps = []
    for step in range(3):
        k_new = torch.randn(2, 2, 2, 16, generator=gen).to(torch.bfloat16)
        v_new = torch.randn(2, 2, 2, 16, generator=gen).to(torch.bfloat16)
        if step == 1:
            k_new[0, 0, 0, 0] = 1e4  # far past 448 * scale: must saturate
        cache.advance(2)
        cache.append(0, k_new, v_new)
        steps.append((k_new, v_new))
        q = torch.randn(2, 4, 2, 16, generator=gen).to(torch.bfloat16)
        out = cache.attend(0, q)
        ref, _ = reference_decode_attention(q, cache.keys(0), cache.values(0), cache.seq_lens,
                                            k_scale=ks, v_scale=vs)  # fmt: skip
        check_close(out, ref, torch.bfloat16, f"static fp8 step {step}", 11)
    for step, (k_new, _) in enumerate(steps):
        stored = cache.keys(0)[:, :, 2 * step : 2 * step + 2]
        x = (k_new.float() / view(ks)).clamp(-FP8_MAX[fp8], FP8_MAX[fp8])
        assert_fp8_cast(stored, x, fp8, f"step {step}")
    assert cache.keys(0)[0, 0, 2, 0].float() == FP8_MAX[fp8]  # saturated, finite


def assert_fp8_cast(stored: torch.Tensor, x: torch.Tensor, fp8: torch.dtype, where: str) -> None:
    """``stored`` is ``x`` cast to fp8 with round-to-nearest-even (torch's cast, the GPU's ``cvt.rn``) bit
    for bit. Under the interpreter this holds only thanks to ``_append._round_to_fp8``: Triton 3.9's
    interpreter casts 31.5 to 16 (seen 2026-12-01)."""
    differ = stored.view(torch.uint8) != x.to(fp8).view(torch.uint8)
    assert not differ.any(), f"{where}: {int(differ.sum())} values differ from torch's fp8 cast"


def test_static_cache_scales_are_checked():
    with pytest.raises(kvdecode.KVDecodeError, match=r"must be None for a torch\.bfloat16 cache"):
        kvdecode.StaticKVCache(1, batch=1, num_kv_heads=2, capacity=16, head_dim=16, device="cpu",
                               k_scale=0.5)  # fmt: skip
    with pytest.raises(kvdecode.KVDecodeError, match="must hold 1 or 2"):
        kvdecode.StaticKVCache(1, batch=1, num_kv_heads=2, capacity=16, head_dim=16, device="cpu",
                               dtype=torch.float8_e4m3fn, k_scale=torch.ones(3))  # fmt: skip
    with pytest.raises(kvdecode.KVDecodeError, match="positive and finite"):
        kvdecode.StaticKVCache(1, batch=1, num_kv_heads=2, capacity=16, head_dim=16, device="cpu",
                               dtype=torch.float8_e4m3fn, v_scale=0.0)  # fmt: skip


@pytest.mark.parametrize("fp8", FP8)
def test_quantizing_append_rounds_like_torch_over_the_whole_range(fp8):
    """Magnitudes from fp8 subnormals to past the maximum, values just under powers of two (where the
    interpreter's own cast goes wrong) and exact ties: stored bit for bit as torch's saturating cast."""
    gen = torch.Generator().manual_seed(5)
    top = FP8_MAX[fp8]
    mags = torch.exp2(torch.empty(2 * 2 * 64 * 16).uniform_(-20, float(torch.log2(torch.tensor(top))) + 1,
                                                           generator=gen))  # fmt: skip
    signs = torch.where(torch.rand(mags.shape, generator=gen) < 0.5, -1.0, 1.0)
    x = (mags * signs).view(2, 2, 64, 16)
    x[0, 0, 0, :4] = torch.tensor([31.5, 7.9, -15.99, 50.0])  # just under 2^k, and a tie (48 | 52)
    cache = kvdecode.StaticKVCache(1, batch=2, num_kv_heads=2, capacity=64, head_dim=16, dtype=fp8,
                                   device="cpu", backend="triton")  # fmt: skip
    cache.advance(64)
    cache.append(0, x, x)
    assert_fp8_cast(cache.keys(0), x.clamp(-top, top), fp8, "append")


@pytest.mark.gpu
@pytest.mark.slow  # tens of seconds on the GPU: started first (conftest)
@given(case=cases("cuda", dtypes=(torch.float16, torch.bfloat16)), fp8=st.sampled_from(FP8),
       per_head=st.booleans())  # fmt: skip
def test_gpu_fp8_caches_match_the_reference_on_the_dequantized_cache(case, fp8, per_head):
    x = make_inputs(case, "cuda")
    k8, k_scale = quantize(x.k, fp8, per_head)
    v8, v_scale = quantize(x.v, fp8, per_head)
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    out, lse = kvdecode.decode_attention(
        x.q, k8, v8, x.seq_lens, out=x.out, return_lse=True, **x.kwargs(), **scales
    )
    ref, ref_lse = reference_decode_attention(x.q, k8, v8, x.seq_lens, **x.kwargs(), **scales)
    check_close(out, ref, case.dtype, f"gpu fp8 {fp8}", case.seed, repro=repr(case))
    check_lse(lse, ref_lse, case.dtype, f"gpu fp8 {fp8}", case.seed, repro=repr(case))


@pytest.mark.gpu
def test_gpu_fp8_static_cache_step_replays_in_a_cuda_graph():
    """advance + quantizing append + attend captured once and replayed as the lengths grow."""
    cache = kvdecode.StaticKVCache(2, batch=2, num_kv_heads=8, capacity=512, head_dim=128,
                                   dtype=torch.float8_e4m3fn, k_scale=torch.full((8,), 0.01),
                                   v_scale=torch.full((8,), 0.02))  # fmt: skip
    q = torch.randn(2, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k_new = torch.randn(2, 8, 1, 128, device="cuda", dtype=torch.bfloat16)
    outs = [torch.empty_like(q) for _ in range(2)]

    def step():
        cache.advance(1)
        for layer in range(2):
            cache.append(layer, k_new, k_new)
            cache.attend(layer, q, out=outs[layer])

    cache.set_lengths([100, 7])
    step()  # eager: compiles and plans
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(5):
        k_new.normal_()
        graph.replay()
        torch.cuda.synchronize()
        for layer in range(2):
            ref, _ = reference_decode_attention(q, cache.keys(layer), cache.values(layer), cache.seq_lens,
                                                k_scale=cache.k_scale, v_scale=cache.v_scale)  # fmt: skip
            check_close(outs[layer], ref, torch.bfloat16, f"captured fp8 layer {layer}", 0)
    assert cache.seq_lens.tolist() == [106, 13]  # eager step +1, capture runs nothing, 5 replays +5


@pytest.mark.parametrize("fp8", FP8)
def test_bf16_queries_beyond_the_fp16_range_stay_exact(fp8):
    """The fp16 dots scale each bf16 query row by a power of two: rows with |q| far beyond fp16's 65504,
    or far below its normal range, and rows mixing 1e-6 with 1e3, give the reference's answer."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(3, 4, 1, 32, generator=gen)
    q[0] *= 1e7  # |q| ~ 1e7: overflows fp16 unscaled
    q[1] *= 1e-7  # ~ 1e-7: fp16 subnormals unscaled
    q[2, :, :, ::2] *= 1e-6  # one row mixes magnitudes
    q[2, :, :, 1::2] *= 1e3
    q = q.to(torch.bfloat16)
    k = (torch.randn(3, 2, 64, 32, generator=gen) * 1e-3).to(fp8)  # small logits despite the large q
    v = torch.randn(3, 2, 64, 32, generator=gen).to(fp8)
    lens = torch.tensor([64, 40, 17], dtype=torch.int32)
    scales = dict(k_scale=torch.tensor([0.5, 2.0]), v_scale=torch.tensor([1.5, 0.25]))
    out = kvdecode.decode_attention(q, k, v, lens, backend="triton", **scales)
    ref, _ = reference_decode_attention(q, k, v, lens, **scales)
    check_close(out, ref, torch.bfloat16, f"bf16 q beyond the fp16 range, {fp8}", 5)


@pytest.mark.parametrize("head_dim, block_n", [(64, 128), (128, 64), (256, 32)])
def test_fp8_configs_use_8kb_tiles_and_three_stages(head_dim, block_n):
    """fp8 caches get the measured fp8 configuration (8 KB K tiles, 3 stages), 16-bit caches keep theirs."""
    from kvdecode.triton_kernels.config import default_config, heuristic_config

    q = torch.randn(2, 8, 1, head_dim, dtype=torch.bfloat16)
    k16 = torch.randn(2, 2, 4096, head_dim, dtype=torch.bfloat16)
    lens = torch.tensor([4096, 10], dtype=torch.int32)
    p16 = kvdecode.DecodeProblem.from_tensors(q, k16, k16, lens)
    k8 = k16.to(torch.float8_e4m3fn)
    p8 = kvdecode.DecodeProblem.from_tensors(q, k8, k8, lens)
    assert default_config(p16) == heuristic_config(p16)
    got = default_config(p8)
    assert (got.block_n, got.num_stages) == (min(block_n, heuristic_config(p16).block_n), 3)
    assert got.num_splits == heuristic_config(p16).num_splits


def _every_fp8_value_case(fp8, device):
    """B 2 rows, one key each attended with weight 1: row b's output is its V row, which holds half of the
    finite fp8 values (subnormals and the largest included) in order."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8).float()
    finite = values[torch.isfinite(values)]
    rows = torch.zeros(2, 128)
    rows.view(-1)[: finite.numel()] = finite
    q = torch.zeros(2, 1, 1, 128)
    q[..., 0] = 64.0
    k = torch.zeros(2, 1, 64, 128)
    v = torch.zeros(2, 1, 64, 128)
    for b, key in enumerate((5, 40)):
        k[b, 0, key, 0] = 448.0 if fp8 == torch.float8_e4m3fn else 57344.0
        v[b, 0, key] = rows[b]
    lens = torch.tensor([64, 64], dtype=torch.int32)
    to = dict(device=device)
    return (q.to(torch.bfloat16).to(**to), k.to(fp8).to(**to), v.to(fp8).to(**to), lens.to(**to),
            rows.to(torch.bfloat16).view(2, 1, 1, 128).to(**to))  # fmt: skip


@pytest.mark.parametrize("fp8", FP8)
def test_every_fp8_value_converts_exactly(fp8):
    """One-hot attention returns V's row itself: every finite fp8 value, in its place (catches a wrong
    conversion, a flushed subnormal or a permuted byte order)."""
    q, k, v, lens, want = _every_fp8_value_case(fp8, "cpu")
    out = kvdecode.decode_attention(q, k, v, lens, scale=1.0, backend="triton")
    assert torch.equal(out, want), (out - want).abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("compute", ["fp16-ptx", "fp16", "q"])
@pytest.mark.parametrize("splits", [1, 4])
def test_gpu_every_fp8_value_converts_exactly(fp8, compute, splits):
    q, k, v, lens, want = _every_fp8_value_case(fp8, "cuda")
    problem = kvdecode.DecodeProblem.from_tensors(q, k, v, lens, scale=1.0)
    out = torch.full_like(q, float("nan"))
    SplitKVLauncher(problem, SplitKVConfig(num_splits=splits, block_n=16), fp8_compute=compute)(
        q, k, v, lens, None, None, out, None
    )
    assert torch.equal(out, want), (out - want).abs().max()


def test_fp8_compute_is_checked():
    q, k8, lens = _fp8_inputs()
    problem = kvdecode.DecodeProblem.from_tensors(q, k8, k8, lens)
    with pytest.raises(kvdecode.KVDecodeError, match="fp8_compute must be one of"):
        SplitKVLauncher(problem, fp8_compute="fp32")
    from kvdecode.triton_kernels.config import interpreter_active

    if interpreter_active():
        with pytest.raises(kvdecode.KVDecodeError, match="needs a GPU"):
            SplitKVLauncher(problem, fp8_compute="fp16-ptx")
