"""Launches that never recompile (issue 10): run-time split counts, merge buckets, bound launches,
``kvdecode.warmup``."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from strategies import check_direct_arguments

import kvdecode
from kvdecode import DecodeProblem
from kvdecode import warm as warmup_module
from kvdecode.quant import quantize_fp8
from kvdecode.reference import assert_close_to_reference, assert_lse_close, reference_decode_attention
from kvdecode.triton_kernels import config as config_module
from kvdecode.triton_kernels.bound import compile_counts
from kvdecode.triton_kernels.config import SplitKVConfig, default_config
from kvdecode.triton_kernels.launcher import FUSED_SCRATCH, MERGE_BUCKETS, SplitKVLauncher, merge_bucket


def test_merge_buckets_cover_every_split_count():
    for splits in range(2, MERGE_BUCKETS[-1] + 1):
        bucket = merge_bucket(splits)
        assert splits <= bucket and bucket in MERGE_BUCKETS
    with pytest.raises(ValueError):
        merge_bucket(MERGE_BUCKETS[-1] + 1)


def test_a_family_meets_at_most_three_split_kernels_on_an_h200_sized_gpu(monkeypatch):
    """B 1..64 and capacity 1k..128k of the Llama-3-8B family: the split count is a run-time value, so
    the split kernel compiles once with several splits and once for one split (no merge), and the merge
    once per bucket it meets (a constexpr split count compiled one kernel per distinct count)."""
    monkeypatch.setattr(config_module, "sm_count", lambda device: 132)
    monkeypatch.setattr(config_module, "tuned_config", lambda problem, sms=None: None)
    launched = []
    monkeypatch.setattr(warmup_module, "_launch_once", lambda launcher, p, lse: launched.append(launcher))
    caps = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
    got = kvdecode.warmup(32, 8, 128, batch_sizes=range(1, 65), capacities=caps, device="cpu")
    assert got["variants"] == len(launched)
    split_kernels = {(lc.config.block_n, lc.config.num_warps, lc.config.num_stages, lc.num_splits == 1)
                     for lc in launched}  # fmt: skip
    merges = {merge_bucket(lc.num_splits) for lc in launched if lc.num_splits > 1}
    assert len(split_kernels) <= 3 and len(merges) <= 3, (split_kernels, merges)


def test_warmup_runs_and_checks_its_arguments():
    got = kvdecode.warmup(4, 2, 16, dtype=torch.float32, batch_sizes=[1, 3], capacities=[64], device="cpu")
    assert got["variants"] >= 1
    with pytest.raises(kvdecode.KVDecodeError, match="batch_sizes"):
        kvdecode.warmup(4, 2, 16, batch_sizes=[0], device="cpu")
    with pytest.raises(kvdecode.KVDecodeError, match="multiple of num_kv_heads"):
        kvdecode.warmup(6, 4, 16, device="cpu")


@pytest.mark.parametrize("splits", [1, 2, 5, 16, 17, 33])
def test_any_split_count_gives_the_reference(splits):
    """One compiled split kernel and merge bucket serve every split count (the count is run time)."""
    gen = torch.Generator().manual_seed(splits)
    q = torch.randn(2, 4, 1, 16, generator=gen)
    k = torch.randn(2, 2, 33 * 16, 16, generator=gen)
    v = torch.randn(2, 2, 33 * 16, 16, generator=gen)
    lens = torch.tensor([33 * 16, 100], dtype=torch.int32)
    problem = kvdecode.DecodeProblem.from_tensors(q, k, v, lens)
    launcher = SplitKVLauncher(problem, SplitKVConfig(num_splits=splits, block_n=16))
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"))
    launcher(q, k, v, lens, None, None, out, lse)
    ref, ref_lse = reference_decode_attention(q, k, v, lens)
    assert_close_to_reference(out, ref, q.dtype, f"{problem.name} splits {splits}")
    assert_lse_close(lse, ref_lse, q.dtype, f"{problem.name} splits {splits}")


@pytest.mark.gpu
def test_direct_launch_matches_the_binder_path():
    q = torch.randn(3, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(3, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(3, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor([4096, 17, 2000], dtype=torch.int32, device="cuda")
    problem = kvdecode.DecodeProblem.from_tensors(q, k, v, lens)
    # split and merge kernels; the fused merge (one kernel, its counters); the default: fused eagerly,
    # the captured form (split and merge) compiled and loaded at the first call
    for fused in (False, True, None):
        cfg = replace(default_config(problem), fused_merge=fused)
        direct, binder = SplitKVLauncher(problem, cfg), SplitKVLauncher(problem, cfg)
        assert direct.num_splits > 1
        for bound in (binder._split, binder._split_fused, binder._merge):
            if bound is not None:
                bound.direct = False
        outs = []
        for launcher in (direct, direct, binder):
            out = torch.full_like(q, float("nan"))
            launcher(q, k, v, lens, None, None, out, None)
            outs.append(out)
        assert torch.equal(outs[1], outs[2]) and torch.equal(outs[0], outs[1])
        ref = reference_decode_attention(q, k, v, lens)[0]
        assert_close_to_reference(outs[1], ref, q.dtype, f"{problem.name} fused {fused}")
        eager = direct._split_fused if fused is not False else direct._split
        assert eager._compiled and eager.direct
        assert bool(direct._merge._compiled) == (fused is not True)  # (True: never launched nor prepared)
        assert bool(direct._split._compiled) == (fused is not True)  # (None: prepared, never launched)


@pytest.mark.gpu
@pytest.mark.slow  # tens of seconds on the GPU: started first (conftest)
def test_new_batch_sizes_and_capacities_compile_nothing_after_warmup():
    caps = (1024, 8192, 131072)
    kvdecode.warmup(32, 8, 128, batch_sizes=range(1, 65), capacities=caps)
    before = compile_counts()
    for b, cap in [(1, 1024), (5, 8192), (12, 8192), (48, 1024), (64, 1024), (2, 131072)]:
        q = torch.randn(b, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, 8, cap, 128, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((b,), cap // 2, dtype=torch.int32, device="cuda")
        out = kvdecode.decode_attention(q, k, k, lens, backend="triton")
        ref = reference_decode_attention(q, k, k, lens)[0]
        assert_close_to_reference(out, ref, q.dtype, f"b{b} cap{cap}")
    assert compile_counts() == before


@pytest.mark.parametrize("splits", [1, 3])
def test_direct_launch_arguments_are_the_binder_arguments_as_pointers(splits):
    """A direct launch passes integers where Triton's binder gets tensors (Triton's launcher then asks
    the driver nothing): position by position, every integer is that tensor's ``data_ptr()`` and every
    other argument is the same. A slip in the order would launch on the wrong memory on a GPU."""
    gen = torch.Generator().manual_seed(splits)
    q = torch.randn(2, 4, 1, 16, generator=gen, dtype=torch.float16)
    k8, k_scale = quantize_fp8(torch.randn(2, 2, 64, 16, generator=gen))
    v8, v_scale = quantize_fp8(torch.randn(2, 2, 64, 16, generator=gen))
    lens = torch.tensor([64, 30], dtype=torch.int32)
    kv_start = torch.tensor([0, 3], dtype=torch.int32)
    mask = torch.ones(2, 1, 1, 64, dtype=torch.bool)
    sinks = torch.zeros(4)
    problem = kvdecode.DecodeProblem.from_tensors(
        q, k8, v8, lens, kv_start=kv_start, mask=mask, k_scale=k_scale, v_scale=v_scale, sinks=sinks
    )
    for fused in (False, True, None):  # (the fused merge: one kernel, with the counters' pointer)
        launcher = SplitKVLauncher(problem, SplitKVConfig(num_splits=splits, block_n=16, fused_merge=fused))
        seen = []
        spy = _Spy(lambda grid, args, spec, binder_args, seen=seen: seen.append((args, binder_args())))
        launcher._split = launcher._split_fused = launcher._merge = spy
        out, lse = torch.empty_like(q), torch.empty(q.shape[:3])
        launcher(q, k8, v8, lens, kv_start, mask, out, lse, scales=(k_scale, v_scale), sinks=sinks)
        assert len(seen) == (2 if splits > 1 and fused is False else 1)  # (None: fused, an eager call)
        for args, binder in seen:
            assert check_direct_arguments(args, binder) >= 5  # the merge: out, lse, the two partials, sinks
        named = {id(t) for t in (out, lse, q, k8, v8, lens, kv_start, mask, k_scale, v_scale, sinks)}
        assert named <= {id(b) for b in seen[0][1] if isinstance(b, torch.Tensor)}


class _Spy:
    """Stands in for a launcher's BoundKernel: ``on_launch(grid, args, spec, binder_args)`` per launch;
    ``prepare`` calls recorded, every spec new when ``new``."""

    def __init__(self, on_launch, new: bool = False) -> None:
        self.on_launch, self.new, self.prepared = on_launch, new, []

    def __call__(self, grid, args, spec, binder_args=None) -> None:
        self.on_launch(grid, args, spec, binder_args)

    def is_new(self, spec) -> bool:
        return self.new

    def prepare(self, grid, spec, binder_args) -> None:
        self.prepared.append((grid, spec, binder_args()))


def test_default_forms_fused_eagerly_merge_kernel_captured_one_form_when_deterministic():
    q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 64, 16)
    problem = kvdecode.DecodeProblem.from_tensors(q, k, k, torch.tensor([64, 30], dtype=torch.int32))
    forms = {}
    for fused in (None, True, False):
        for det in (False, True):
            la = SplitKVLauncher(
                problem, SplitKVConfig(num_splits=3, block_n=16, fused_merge=fused), deterministic=det
            )
            forms[fused, det] = (la.fused_eager, la.fused_captured)
    assert forms[None, False] == (True, False)  # the default: one kernel eagerly, two in a graph
    assert forms[None, True] == (False, False)  # deterministic: the same form both ways
    assert forms[True, False] == forms[True, True] == (True, True)  # asked for: fused everywhere
    assert forms[False, False] == forms[False, True] == (False, False)
    one = SplitKVLauncher(problem, SplitKVConfig(num_splits=1, block_n=16))
    assert not one.fused_eager and not one.fused_captured  # one split: nothing to merge


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "lens-unaligned"])
def test_first_eager_fused_call_prepares_the_form_a_capture_launches(monkeypatch, aligned):
    """At an eager fused call with a new launch shape, the split and merge kernels a captured call of the
    same tensors launches are compiled and loaded (prepared) first, for exactly the specialization and
    arguments that call gives them, but for the partials (the captured call's own, the stream's here);
    none is prepared for a shape already met. With seq_lens 4 bytes off a 16-byte boundary the captured
    form's key differs from the fused call's (seq_lens' pointer stands where the counters' was)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 16, generator=gen)
    k, v = torch.randn(2, 2, 64, 16, generator=gen), torch.randn(2, 2, 64, 16, generator=gen)
    lens = (
        torch.tensor([64, 30], dtype=torch.int32)
        if aligned
        else torch.tensor([0, 64, 30], dtype=torch.int32)[1:]
    )
    assert (lens.data_ptr() % 16 == 0) == aligned
    problem = kvdecode.DecodeProblem.from_tensors(q, k, v, lens)
    launcher = SplitKVLauncher(problem, SplitKVConfig(num_splits=3, block_n=16))
    monkeypatch.setattr(launcher, "device_index", 0)  # as on a GPU (where a capture can follow)
    monkeypatch.setattr("kvdecode.triton_kernels.launcher._stream_capturing", lambda: False)
    monkeypatch.setattr("kvdecode.triton_kernels.launcher.raw_stream", lambda index: 0)
    launches = []
    launcher._split, launcher._merge = _Spy(lambda *a: launches.append(("split", a))), _Spy(lambda *a: None)
    launcher._split_fused = _Spy(lambda *a: launches.append(("fused", a[2])), new=True)
    out = torch.empty_like(q)
    launcher._launch(q, k, v, lens, None, None, out, None, None, None, None)
    assert [name for name, _ in launches] == ["fused"]
    (split_prep,), (merge_prep,) = launcher._split.prepared, launcher._merge.prepared
    assert (split_prep[1] == launches[0][1]) == aligned  # the fused call's own key only when all aligned
    # what a captured call passes: the same launch with the merge kernel (fused=False)
    captured = {}
    launcher._split = _Spy(lambda grid, args, spec, binder: captured.update(split=(grid, spec, binder())))
    launcher._merge = _Spy(lambda grid, args, spec, binder: captured.update(merge=(grid, spec, binder())))
    launcher._launch(q, k, v, lens, None, None, out, None, None, None, False)
    for prep, want in ((split_prep, captured["split"]), (merge_prep, captured["merge"])):
        assert prep[:2] == want[:2]  # grid and specialization
        assert len(prep[2]) == len(want[2])
        for a, b in zip(prep[2], want[2]):
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a is not b:
                assert a.dtype == b.dtype == torch.float32  # the partials (the call's own when captured)
            else:
                assert a is b or (not isinstance(a, torch.Tensor) and a == b)
    launcher._split_fused.new = False  # a shape met before: nothing prepared again
    launcher._split = _Spy(lambda *a: None)
    launcher._launch(q, k, v, lens, None, None, out, None, None, None, None)
    assert launcher._split.prepared == []


def test_a_fused_launcher_still_runs_the_merge_kernel_when_asked():
    """``fused=False`` on a launcher configured with ``fused_merge=True`` runs split + merge (its merge
    kernel is built whatever the form): the same result as the fused form within rounding."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 1, 16, generator=gen)
    k, v = torch.randn(2, 2, 64, 16, generator=gen), torch.randn(2, 2, 64, 16, generator=gen)
    lens = torch.tensor([64, 30], dtype=torch.int32)
    launcher = SplitKVLauncher(
        kvdecode.DecodeProblem.from_tensors(q, k, v, lens), SplitKVConfig(3, 16, fused_merge=True)
    )
    ref = reference_decode_attention(q, k, v, lens)[0]
    for fused in (True, False):
        out = torch.full_like(q, float("nan"))
        launcher(q, k, v, lens, None, None, out, None, fused=fused)
        assert_close_to_reference(out, ref, q.dtype, f"fused={fused}")


def test_specialization_key_tells_aligned_and_unaligned_pointers_apart():
    """Triton compiles a 16-byte-aligned pointer apart from an unaligned one: a launch with q one
    element off the alignment must not reuse the aligned launch's kernel (the key's last field is one
    flag when every pointer is aligned, else one per pointer)."""
    base = torch.randn(2 * 4 * 16 + 1)
    q_aligned = base[: 2 * 4 * 16].view(2, 4, 1, 16)
    q_off = base[1:].view(2, 4, 1, 16)  # 4 bytes past a 16-byte boundary
    k = torch.randn(2, 2, 64, 16)
    lens = torch.tensor([64, 30], dtype=torch.int32)
    launcher = SplitKVLauncher(kvdecode.DecodeProblem.from_tensors(q_aligned, k, k, lens))
    keys = []
    launcher._split = launcher._merge = lambda grid, args, spec, binder: keys.append(spec)
    for q in (q_aligned, q_off, q_aligned):
        launcher(q, k, k, lens, None, None, torch.empty_like(q_aligned), None)
    first, off, again = (keys[0], keys[len(keys) // 3], keys[2 * len(keys) // 3])
    assert first == again and first[-1] is True
    assert off != first and off[-1][4] is False and sum(not f for f in off[-1]) == 1  # q alone


def test_int_class_is_what_triton_specializes_integers_on():
    """Two integers with the same class must get the same specialization from Triton, and two with
    different classes different ones: a key built from ``int_class`` then neither reuses a kernel
    compiled for another specialization nor splits calls Triton would serve with one kernel."""
    from triton.backends.compiler import BaseBackend

    from kvdecode.triton_kernels.bound import int_class

    native_specialize_impl = getattr(
        pytest.importorskip("triton.runtime.jit"), "native_specialize_impl", None
    )  # Triton's own classifier (3.6 and 3.9 have it)
    if native_specialize_impl is None:
        pytest.skip("this Triton has no native_specialize_impl to compare with")

    values = [0, 1, 2, 15, 16, 17, 32, 1000, 1024, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**40 + 3,
              -1, -16, -17, -(2**31), -(2**31) - 1, 2**63, 2**63 + 16]  # fmt: skip
    triton_key = {v: native_specialize_impl(BaseBackend, v, False, True, True) for v in values}
    for a in values:
        for b in values:
            assert (int_class(a) == int_class(b)) == (triton_key[a] == triton_key[b]), (a, b)


@pytest.mark.parametrize(
    "shape, q_len, dtype, kind",
    [
        ((2, 1, 1, 64), 1, torch.bool, 3),  # a transformers step: one row of keys, loaded once per tile
        ((2, 1, 1, 64), 3, torch.bool, 3),  # broadcast over the tokens too
        ((1, 1, 1, 64), 1, torch.bool, 3),  # and over the batch
        ((2, 1, 3, 64), 3, torch.bool, 1),  # a row per token
        ((2, 8, 1, 64), 1, torch.bool, 1),  # a row per head
        ((2, 1, 1, 64), 1, torch.float32, 2),  # additive
    ],
)
def test_a_mask_shared_by_every_query_row_takes_the_one_row_kernel(shape, q_len, dtype, kind):
    q = torch.zeros(2, 8, q_len, 16)
    k = torch.zeros(2, 2, 64, 16)
    mask = torch.ones(shape, dtype=dtype) if dtype == torch.bool else torch.zeros(shape, dtype=dtype)
    problem = DecodeProblem.from_tensors(q, k, k, torch.full((2,), 64, dtype=torch.int32), mask=mask)
    assert SplitKVLauncher(problem, SplitKVConfig(num_splits=1)).mask_kind == kind


@pytest.mark.gpu
def test_gpu_fused_launchers_of_other_sizes_share_the_streams_scratch_back_to_back():
    """Two fused launchers of other sizes alternate on one stream with no sync between their calls (the
    outputs allocated first: nothing else on the stream between two calls), on one scratch pair that
    grows to the larger; every output against the reference, the counters left at zero."""
    gen = torch.Generator(device="cuda").manual_seed(12)
    cases = []
    for batch, cap, splits in ((2, 4096, 24), (5, 2048, 7)):
        q = torch.randn(batch, 32, 1, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
        k = torch.randn(batch, 8, cap, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
        lens = torch.randint(1, cap + 1, (batch,), device="cuda", generator=gen, dtype=torch.int32)
        launch = SplitKVLauncher(
            DecodeProblem.from_tensors(q, k, k, lens), SplitKVConfig(splits, 64, fused_merge=True)
        )
        assert launch.fused_eager and launch.fused_captured
        cases.append((launch, q, k, lens, reference_decode_attention(q, k, k, lens)[0]))
    stream = torch.cuda.Stream()
    key = (torch.cuda.current_device(), stream.cuda_stream)
    with torch.cuda.stream(stream):
        outs = [torch.full_like(cases[i % 2][1], float("nan")) for i in range(6)]
        stream.synchronize()
        for i, out in enumerate(outs):
            launch, q, k, lens, _ = cases[i % 2]
            launch(q, k, k, lens, None, None, out, None)
        stream.synchronize()
    for i, out in enumerate(outs):
        assert_close_to_reference(out, cases[i % 2][4], torch.bfloat16, f"call {i}")
    partials, counters = FUSED_SCRATCH.buffers()[key]
    assert not counters.any()
    assert partials.numel() >= max(c[0]._part_elems for c in cases)


@pytest.mark.parametrize(
    "capacity, mask_shape, config, checked",
    [
        (2048, (1, 1, 1, 2048), dict(num_splits=64, block_n=32), False),  # one tile a program: no check
        (2048, (1, 1, 1, 2048), dict(num_splits=32, block_n=32), True),  # two
        (2048, (1, 1, 1, 2048), dict(num_splits=4, block_n=128), True),
        (2048, (1, 1, 1, 2048), dict(num_splits=4, block_n=128, mask_check=False), False),
        (2048, (1, 1, 1, 2048), dict(num_splits=64, block_n=32, mask_check=True), True),
        (2048, (1, 8, 1, 2048), dict(num_splits=4, block_n=128, mask_check=True), False),  # a row per head
        (2048, None, dict(num_splits=4, block_n=128, mask_check=True), False),  # no mask
    ],
)
def test_the_mask_row_check_runs_where_a_program_has_tiles_to_skip(capacity, mask_shape, config, checked):
    """``mask_check``: by default where a program has two tiles or more of a one-row mask; forced on or
    off by the config; never for other masks or none."""
    q = torch.zeros(1, 8, 1, 16)
    k = torch.zeros(1, 2, capacity, 16)
    mask = None if mask_shape is None else torch.ones(mask_shape, dtype=torch.bool)
    problem = DecodeProblem.from_tensors(q, k, k, torch.full((1,), 64, dtype=torch.int32), mask=mask)
    assert SplitKVLauncher(problem, SplitKVConfig(**config)).mask_check == checked


def test_mask_check_must_be_a_bool_or_none():
    assert SplitKVConfig(4, mask_check=True).name.endswith("_mc1")
    assert SplitKVConfig(4).name.endswith("pdlauto")
    with pytest.raises(kvdecode.KVDecodeError, match=r"mask_check must be True, False or None, got 1"):
        SplitKVConfig(4, mask_check=1)


@pytest.mark.gpu
def test_gpu_fused_merge_eager_on_two_streams_and_in_a_graph():
    """The fused merge's scratch: eager calls on the current stream and on a side stream (partials and
    counters each, the counters left at zero), and a CUDA graph whose replays zero their own (captured)
    counters; every output NaN-poisoned first and checked against the reference."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    q = torch.randn(3, 32, 1, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(3, 8, 4096, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(3, 8, 4096, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
    lens = torch.tensor([4096, 1000, 1], dtype=torch.int32, device="cuda")
    ref, ref_lse = reference_decode_attention(q, k, v, lens)
    problem = DecodeProblem.from_tensors(q, k, v, lens)
    for heads in (1, 4):
        cfg = SplitKVConfig(num_splits=24, block_n=64, heads_per_cta=heads, fused_merge=True)
        launch = SplitKVLauncher(problem, cfg)
        out = torch.empty_like(q)
        lse = torch.empty(3, 32, 1, device="cuda")

        def check(what, out=out, lse=lse, name=cfg.name):
            assert_close_to_reference(out, ref, torch.bfloat16, f"{name} {what}")
            assert_lse_close(lse, ref_lse, torch.bfloat16, f"{name} {what}")

        side = torch.cuda.Stream()
        streams = {torch.cuda.current_stream().cuda_stream, side.cuda_stream}
        for stream in (torch.cuda.current_stream(), side, torch.cuda.current_stream()):
            with torch.cuda.stream(stream):
                for i in range(3):
                    out.fill_(float("nan"))
                    lse.fill_(float("nan"))
                    launch(q, k, v, lens, None, None, out, lse)
                    stream.synchronize()
                    check(f"eager call {i}")
                # back to back, no sync between them: each call reuses the counters the last one zeroed
                outs = [torch.full_like(q, float("nan")) for _ in range(4)]
                for o in outs:
                    launch(q, k, v, lens, None, None, o, None)
                stream.synchronize()
                for i, o in enumerate(outs):
                    assert_close_to_reference(o, ref, torch.bfloat16, f"{cfg.name} back-to-back call {i}")
        held = {key: c for key, (_, c) in FUSED_SCRATCH.buffers().items() if key[1] in streams}
        assert len(held) == 2 and all(not c.any() for c in held.values())
        taken = []
        real_get = FUSED_SCRATCH.get
        FUSED_SCRATCH.get = lambda *a, taken=taken, real_get=real_get: taken.append(a) or real_get(*a)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):  # (side has a scratch pair: it must not be used)
                launch(q, k, v, lens, None, None, out, lse)
        finally:
            del FUSED_SCRATCH.get
        assert not taken  # the graph took scratch of its own
        for i in range(3):
            out.fill_(float("nan"))
            lse.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            check(f"replay {i}")


def _fused_case(seed: int, batch: int = 3, cap: int = 4096):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, 32, 1, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = torch.randn(batch, 8, cap, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
    v = torch.randn(batch, 8, cap, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
    lens = torch.randint(1, cap + 1, (batch,), device="cuda", generator=gen, dtype=torch.int32)
    return q, k, v, lens


@pytest.mark.gpu
def test_gpu_fused_scratch_is_never_allocated_in_a_graph_pool():
    """torch.compile's graph trees route a thread's allocations to the graph's private pool while they
    warm a graph up (the op runs eagerly then); the stream's shared scratch made by that call must still
    come from the ordinary pool (a pool checkpoint could hand it to the graph's tensors), while the
    call's own output, allocated by the caller, lands in the routed pool."""
    if not (hasattr(torch.cuda, "MemPool") and hasattr(torch.cuda, "use_mem_pool")):
        pytest.skip("this torch has no torch.cuda.MemPool / use_mem_pool")
    q, k, v, lens = _fused_case(21)
    launch = SplitKVLauncher(DecodeProblem.from_tensors(q, k, v, lens), SplitKVConfig(12, 64))
    assert launch.fused_eager and not launch.fused_captured
    FUSED_SCRATCH.clear()
    pool = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(pool):
        out = torch.full_like(q, float("nan"))
        launch(q, k, v, lens, None, None, out, None)
    torch.cuda.synchronize()
    assert_close_to_reference(out, reference_decode_attention(q, k, v, lens)[0], q.dtype, "fused in a pool")
    ((part, counters),) = FUSED_SCRATCH.buffers().values()
    segments = pool.snapshot()

    def in_pool(t: torch.Tensor) -> bool:
        return any(s["address"] <= t.data_ptr() < s["address"] + s["total_size"] for s in segments)

    assert in_pool(out) and not in_pool(part) and not in_pool(counters)
    assert not counters.any()


@pytest.mark.gpu
def test_gpu_eager_call_then_capture_compiles_nothing_and_replays_the_merge_kernel(monkeypatch):
    """The default form: one eager call (fused) is the only warm-up a capture of the same call needs: the
    split + merge kernels were compiled and loaded with it (prepared: this family, H 12/4 D 96 at 32-key
    tiles, is met by no other test, so nothing else compiled them), and the capture launches them, not
    the fused kernel. Every replay is close to the reference and to the eager output."""
    gen = torch.Generator(device="cuda").manual_seed(22)
    q = torch.randn(3, 12, 1, 96, device="cuda", generator=gen, dtype=torch.float16)
    k = torch.randn(3, 4, 2048, 96, device="cuda", generator=gen, dtype=torch.float16)
    v = torch.randn(3, 4, 2048, 96, device="cuda", generator=gen, dtype=torch.float16)
    lens = torch.tensor([2048, 5, 1000], device="cuda", dtype=torch.int32)
    problem = DecodeProblem.from_tensors(q, k, v, lens)
    launch = SplitKVLauncher(problem, SplitKVConfig(num_splits=9, block_n=32, num_warps=2, num_stages=3))
    the_plan = kvdecode.DecodePlan(problem, kvdecode.plan(problem, backend="triton").choice, False, launch)
    assert launch.fused_eager and not launch.fused_captured
    assert not launch._split._compiled and not launch._merge._compiled
    eager = the_plan.run(q, k, v, lens)
    torch.cuda.synchronize()
    assert launch._split_fused._compiled  # launched
    assert launch._split._compiled and launch._merge._compiled  # prepared, never launched
    before = compile_counts()

    def no_fused(*args):
        raise AssertionError("the fused kernel launched under capture")

    monkeypatch.setattr(launch, "_split_fused", no_fused)
    out = torch.full_like(q, float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        the_plan.run(q, k, v, lens, out=out)
    assert compile_counts() == before  # nothing compiled (or loaded) during the capture
    ref = reference_decode_attention(q, k, v, lens)[0]
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close_to_reference(out, ref, q.dtype, "captured after one eager call")
        assert_close_to_reference(out, eager, q.dtype, "captured against eager")


def test_prepare_compiles_and_loads_once_and_warns_once_when_it_cannot(caplog):
    """``BoundKernel.prepare``: Triton's ``warmup`` with the launch options, then the module load; the
    kernel kept for direct launches of that spec. A form that fails is logged as a warning, not raised
    (the call that prepares runs another form), and not tried again."""
    from kvdecode.triton_kernels.bound import BoundKernel

    class Compiled:
        run, function, packed_metadata = object(), object(), object()

        def __init__(self):
            self.loaded = 0

        def _init_handles(self):
            self.loaded += 1

    class Fn:
        def __init__(self, fail):
            self.fail, self.calls = fail, []

        def warmup(self, *args, grid, **options):
            self.calls.append((args, grid, options))
            if self.fail:
                raise RuntimeError("out of resources: shared memory")
            return Compiled()

    ok = BoundKernel(Fn(False), "k", {"num_warps": 4, "launch_pdl": True}, None)
    ok.direct = True  # as on a GPU
    assert ok.is_new(("spec",))
    ok.prepare((3, 1, 1), ("spec",), lambda: ["t"])
    ok.prepare((3, 1, 1), ("spec",), lambda: ["t"])
    assert ok.fn.calls == [(("t",), (3, 1, 1), {"num_warps": 4, "launch_pdl": True})]  # once
    assert ok._compiled[("spec",)].loaded == 1 and not ok.is_new(("spec",))
    bad = BoundKernel(Fn(True), "k", {}, None)
    bad.direct = True
    with caplog.at_level(logging.WARNING, logger="kvdecode.triton"):
        bad.prepare((1, 1, 1), ("s",), lambda: [])
        bad.prepare((1, 1, 1), ("s",), lambda: [])
    assert len(bad.fn.calls) == 1 and not bad.is_new(("s",)) and ("s",) not in bad._compiled
    assert [r.levelno for r in caplog.records] == [logging.WARNING] and "capture" in caplog.records[0].message
