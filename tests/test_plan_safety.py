"""Issue 12 regressions in the plan layer: keys say what was asked, outputs never alias inputs, wrong
argument types raise ``KVDecodeError``, cuDNN graphs are built at plan time, and plans are thread-safe
(the threaded GPU test is in tests/test_threads.py)."""

from __future__ import annotations

import sys

import pytest
import torch
from test_planner import FakeCudnn, gpu_problem

import kvdecode
from kvdecode import backends
from kvdecode.backends import ReferenceBackend
from kvdecode.errors import KVDecodeError, UnsupportedError
from kvdecode.plan import PLANS


@pytest.fixture(autouse=True)
def fresh_plans():
    PLANS.clear()
    yield
    PLANS.clear()


class FakeTriton(ReferenceBackend):
    name = "triton"


def test_explicit_cudnn_never_reuses_an_auto_fallback(monkeypatch):
    """An ``auto`` call whose cuDNN build failed falls back to Triton; a later explicit ``cudnn`` call for
    the same problem used to get that Triton plan from the cache (keyed by the chosen name only)."""
    from kvdecode.thresholds import Threshold

    backends.backend_names()
    monkeypatch.setitem(backends._REGISTRY, "cudnn", FakeCudnn(fail_build=True))
    monkeypatch.setitem(backends._REGISTRY, "triton", FakeTriton())
    monkeypatch.setattr("kvdecode.planner.auto_threshold", lambda p: Threshold(16, "test", False))
    q, k, v, lens = _cpu_inputs()
    kvdecode.decode_attention(q, k, v, lens, max_seq_len=32)  # auto -> cuDNN -> build fails -> Triton
    auto = PLANS.peek(kvdecode.DecodeProblem.from_tensors(q, k, v, lens), asked="auto", backend="cudnn")
    assert auto is not None and auto.backend == "triton" and "declined at build time" in auto.choice.reason
    with pytest.raises(UnsupportedError, match="no engine"):
        kvdecode.decode_attention(q, k, v, lens, backend="cudnn")


def _cpu_inputs():
    q = torch.randn(2, 4, 1, 16)
    k = torch.randn(2, 2, 32, 16)
    v = torch.randn(2, 2, 32, 16)
    lens = torch.tensor([5, 32], dtype=torch.int32)
    return q, k, v, lens


def _plan(q, k, v, lens):
    return kvdecode.plan(kvdecode.DecodeProblem.from_tensors(q, k, v, lens), backend="reference")


@pytest.mark.parametrize(
    "make_out, fragment",
    [
        (lambda q, k: torch.empty(1, 4, 1, 16).expand(2, 4, 1, 16), "out must not overlap itself"),
        (lambda q, k: k.view(-1)[:128].view(2, 4, 1, 16), "share memory with k_cache"),
        (lambda q, k: q, "share memory with q"),
    ],
    ids=["expanded", "inside-k_cache", "is-q"],
)
def test_outputs_that_alias_are_refused(make_out, fragment):
    q, k, v, lens = _cpu_inputs()
    out = make_out(q, k)
    k_before = k.clone()
    for call in (
        lambda: _plan(q, k, v, lens).run(q, k, v, lens, out=out),
        lambda: kvdecode.decode_attention(q, k, v, lens, backend="reference", out=out),
    ):
        with pytest.raises(KVDecodeError, match=fragment):
            call()
    assert torch.equal(k, k_before)


def test_lse_overlapping_out_is_refused():
    q, k, v, lens = _cpu_inputs()
    buf = torch.empty(2 * 4 * 1 * 16)
    out = buf.view(2, 4, 1, 16)
    lse = buf[:8].view(2, 4, 1)
    with pytest.raises(KVDecodeError, match="out must not share memory with lse"):
        _plan(q, k, v, lens).run(q, k, v, lens, out=out, lse=lse)


@pytest.mark.parametrize("arg", ["q", "k_cache", "v_cache", "seq_lens", "out", "lse", "kv_start", "mask"])
def test_run_with_a_non_tensor_names_the_argument(arg):
    q, k, v, lens = _cpu_inputs()
    args = dict(q=q, k_cache=k, v_cache=v, seq_lens=lens)
    kwargs = {}
    if arg in args:
        args[arg] = [1, 2]
    else:
        kwargs[arg] = [1, 2]
    the_plan = _plan(q, k, v, lens)
    with pytest.raises(KVDecodeError, match=arg):
        the_plan.run(*args.values(), **kwargs)


@pytest.mark.parametrize("bad", [None, "problem", 3, object()])
def test_plan_of_a_non_problem_is_a_clear_error(bad):
    with pytest.raises(KVDecodeError, match="problem must be a DecodeProblem"):
        kvdecode.plan(bad)


@pytest.mark.parametrize("flag", ["deterministic", "return_lse", "validate"])
def test_flags_must_be_bools(flag):
    q, k, v, lens = _cpu_inputs()
    with pytest.raises(KVDecodeError, match=f"{flag} must be True or False"):
        kvdecode.decode_attention(q, k, v, lens, backend="reference", **{flag: []})
    if flag == "deterministic":
        with pytest.raises(KVDecodeError, match="deterministic must be True or False"):
            kvdecode.plan(kvdecode.DecodeProblem.from_tensors(q, k, v, lens), deterministic=[])


def test_one_plan_cache_serves_every_entry_point():
    """decode_attention, plan, sdpa and StaticKVCache share PLANS: the same problem is planned once."""
    q, k, v, lens = _cpu_inputs()
    kvdecode.decode_attention(q, k, v, lens, backend="reference")
    _plan(q, k, v, lens)
    info = PLANS.cache_info()
    assert (info["size"], info["misses"], info["hits"]) == (1, 1, 1)
    kvdecode.sdpa(q, k[:, :, :7], v[:, :, :7], enable_gqa=True, backend="reference")  # same problem
    cache = kvdecode.StaticKVCache(1, batch=2, num_kv_heads=2, capacity=32, head_dim=16,
                                   dtype=torch.float32, device="cpu", backend="reference")  # fmt: skip
    cache.advance(1)
    cache.attend(0, q)
    cache.attend(0, q)
    info = PLANS.cache_info()  # the cache's layer views have the same shape and strides too
    assert (info["size"], info["misses"]) == (1, 1) and cache.plan_for(q) is _plan(q, k, v, lens)


def test_two_descriptions_of_one_problem_share_its_object():
    """A [1] seq_lens with stride 1 and one with stride 0 (what ``expand`` makes) are different aliases
    of one problem; both resolve to the object that keys the plan, so a call's lookups are identity
    tests (a dataclass compare of every field cost ~2 µs each, four per call)."""
    from kvdecode.api import problem_for_tensors

    PLANS.clear()
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
    plain = torch.full((1,), 5, dtype=torch.int32)
    expanded = torch.tensor(5, dtype=torch.int32).expand(1)
    assert plain.stride() != expanded.stride()
    first = problem_for_tensors(q, k, v, plain, None, None, None)
    second = problem_for_tensors(q, k, v, expanded, None, None, None)
    assert first is second
    kvdecode.decode_attention(q, k, v, plain, backend="reference", max_seq_len=32)
    kvdecode.decode_attention(q, k, v, expanded, backend="reference", max_seq_len=32)
    assert PLANS.cache_info()["size"] == 1
    PLANS.clear()
    assert problem_for_tensors(q, k, v, plain, None, None, None) is not first  # forgotten with the plans


def test_triton_refuses_grids_past_the_cuda_limit():
    p = gpu_problem(batch=8193)  # 8193 * 8 KV heads > 65535 programs on grid axis 1
    from kvdecode.triton_kernels import TritonBackend

    assert "65535" in TritonBackend().supports(p)


def test_cudnn_launcher_builds_both_graphs_at_plan_time(monkeypatch):
    """The LSE graph used to be built on the first call that asked for it, after ``auto`` had committed
    to cuDNN: a build failure then surfaced at run time. Both are made with the plan now."""
    from types import SimpleNamespace

    pytest.importorskip("cudnn")
    import cudnn

    from kvdecode.cudnn_graphs import backend as cudnn_backend

    asked = []

    class Cache:
        def get(self, key):
            asked.append(key.with_lse)
            if key.with_lse:
                raise cudnn.cudnnGraphNotSupportedError("no engine for Stats")
            return SimpleNamespace(key=key, workspace_size=0)

    monkeypatch.setattr(cudnn_backend, "load_cudnn", lambda: (None, 91900, None))
    monkeypatch.setattr(torch, "full", lambda *a, **k: None)  # the constant seq_len_q: no CUDA here
    with pytest.raises(UnsupportedError, match="no engine for Stats"):
        cudnn_backend.CudnnLauncher(gpu_problem(), deterministic=False, cache=Cache())
    assert asked == [False, True]


def test_auto_iterates_the_registered_backends(monkeypatch):
    """The planner's candidates are the registry's, not a hard-coded pair: a registered backend that can
    serve a problem neither Triton nor cuDNN serves is chosen by ``auto`` and can be asked for by name."""
    backends.backend_names()

    class Refuses(ReferenceBackend):
        def __init__(self, name):
            self.name = name

        def supports(self, problem):
            return "not today"

    class Extra(ReferenceBackend):
        name = "extra"

    for name in ("triton", "cudnn"):
        monkeypatch.setitem(backends._REGISTRY, name, Refuses(name))
    monkeypatch.setitem(backends._REGISTRY, "extra", Extra())
    q, k, v, lens = _cpu_inputs()
    problem = kvdecode.DecodeProblem.from_tensors(q, k, v, lens)
    choice = kvdecode.planner.choose(problem)
    assert choice.backend == "extra" and "triton cannot serve it (not today)" in choice.reason
    assert kvdecode.plan(problem, backend="extra").backend == "extra"


def _good():
    q, k, v, lens = _cpu_inputs()
    return dict(q=q, k_cache=k, v_cache=v, seq_lens=lens)


@pytest.mark.parametrize(
    "over",
    [
        {"q": None},
        {"q": [[1.0]]},
        {"k_cache": "k"},
        {"v_cache": 3},
        {"seq_lens": [5, 32]},
        {"scale": "big"},
        {"scale": [1.0]},
        {"kv_start": [0, 0]},
        {"mask": 1},
        {"backend": 3},
        {"backend": ["triton"]},
        {"out": []},
        {"max_seq_len": "7"},
        {"max_seq_len": 7.5},
        {"return_lse": "yes"},
        {"deterministic": None},
    ],
    ids=lambda over: "-".join(f"{k}={type(v).__name__}" for k, v in over.items()),
)
def test_public_calls_raise_kvdecode_error_for_wrong_types(over):
    """Every wrong type is a KVDecodeError naming the argument, never a raw AttributeError, TypeError or
    IndexError: decode_attention, explain (positional and keyword arguments alike)."""
    args = {**_good(), "backend": "reference"}
    args.update(over)
    name = next(iter(over))
    with pytest.raises(KVDecodeError, match=name):
        kvdecode.decode_attention(**args)
    explain_args = {k: v for k, v in args.items() if k not in ("out", "return_lse", "deterministic")}
    if name not in ("out", "return_lse", "deterministic"):
        with pytest.raises(KVDecodeError, match=name):
            kvdecode.explain(**explain_args)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"dtype": [torch.float32]}, "dtype"),
        ({"dtype": "bf16"}, "dtype"),
        ({"device": "no-such"}, "device"),
        ({"q_lens": 1}, "q_lens"),
        ({"capacities": ["1k"]}, "capacities"),
        ({"kv_start": "yes"}, "kv_start"),
    ],
)
def test_warmup_raises_kvdecode_error_for_wrong_types(kwargs, name):
    with pytest.raises(KVDecodeError, match=name):
        kvdecode.warmup(4, 2, 16, **{"batch_sizes": [1], "capacities": [64], "device": "cpu", **kwargs})


@pytest.mark.parametrize("bad", [None, [1.0], "q"])
def test_sdpa_with_non_tensors_is_a_kvdecode_error(bad):
    _, k, v, _ = _cpu_inputs()
    with pytest.raises(KVDecodeError, match="query, key and value must be tensors"):
        kvdecode.sdpa(bad, k[:, :, :5], v[:, :, :5], enable_gqa=True)


def test_cudnn_refuses_batches_past_the_grid_limit():
    from kvdecode.cudnn_graphs.backend import problem_reason

    assert "65535" in problem_reason(gpu_problem(batch=65536))
    assert problem_reason(gpu_problem(batch=4)) is None


def test_alignment_is_part_of_the_plan_key():
    """A problem records whether q and the caches start on 16-byte boundaries (cuDNN needs it); the plan
    cache is keyed by the problem, so an unaligned view of the same shape never reuses an aligned plan."""
    buf = torch.randn(2 * 2 * 32 * 16 + 1)
    aligned = buf[: 2 * 2 * 32 * 16].view(2, 2, 32, 16)
    shifted = buf[1:].view(2, 2, 32, 16)  # 4 bytes off
    q, _, _, lens = _cpu_inputs()
    kvdecode.decode_attention(q, aligned, aligned, lens, backend="reference")
    kvdecode.decode_attention(q, shifted, shifted, lens, backend="reference")
    assert PLANS.cache_info()["size"] == 2


def test_registering_a_backend_first_keeps_the_built_in_ones(monkeypatch):
    """``register_backend`` before any lookup used to leave the registry holding only that backend
    (the built-ins are registered lazily, only while the registry is empty)."""

    class Extra(ReferenceBackend):
        name = "extra"

    monkeypatch.setattr(backends, "_REGISTRY", {})
    backends.register_backend(Extra())
    names = backends.backend_names()
    assert {"triton", "reference", "extra"} <= set(names)


def test_lse_inside_k_cache_is_refused_when_out_is_given_too():
    """The fast overlap check once compared only the first output against the inputs (an exhausted
    iterator): an ``lse`` view of ``k_cache`` beside a fresh ``out`` slipped through and overwrote it."""
    q, k, v, lens = _cpu_inputs()
    lse = k.view(-1)[:8].view(2, 4, 1)
    before = k.clone()
    with pytest.raises(KVDecodeError, match="lse must not share memory with k_cache"):
        _plan(q, k, v, lens).run(q, k, v, lens, out=torch.empty_like(q), lse=lse)
    assert torch.equal(k, before)


def test_out_sharing_memory_with_the_lengths_is_refused():
    q, k, v, _ = _cpu_inputs()
    buf = torch.empty(2 * 4 * 1 * 16)
    lens = buf.view(torch.int32)[:2]
    lens.copy_(torch.tensor([5, 32], dtype=torch.int32))
    out = buf.view(2, 4, 1, 16)
    for call in (
        lambda: _plan(q, k, v, lens).run(q, k, v, lens, out=out),
        lambda: kvdecode.decode_attention(q, k, v, lens, backend="reference", out=out),
    ):
        with pytest.raises(KVDecodeError, match="out must not share memory with seq_lens"):
            call()


def test_meta_tensors_on_a_cpu_plan_are_a_clear_error():
    q, k, v, lens = _cpu_inputs()
    the_plan = _plan(q, k, v, lens)
    with pytest.raises(KVDecodeError, match="q is on meta"):
        the_plan.run(q.to("meta"), k, v, lens)
    with pytest.raises(KVDecodeError, match="out"):
        the_plan.run(q, k, v, lens, out=torch.empty_like(q, device="meta"))


def test_cudnn_is_not_built_inside_a_capture_and_the_fallback_is_not_kept(monkeypatch):
    """Warm-up read the lengths and planned Triton; the capture then chose cuDNN from the capacity and
    built its graph inside the capture, where the launcher's constant tensors exist only as graph nodes.
    cuDNN now refuses to build while capturing (not remembered as declined), and the plan cache keeps no
    fallback made because of a capture."""
    from kvdecode.cudnn_graphs import backend as cudnn_backend
    from kvdecode.planner import Choice

    backend = cudnn_backend.CudnnBackend()
    monkeypatch.setattr(cudnn_backend.CudnnBackend, "supports", lambda self, p: None)
    monkeypatch.setattr(cudnn_backend, "capturing", lambda device: True)
    p = gpu_problem()
    with pytest.raises(UnsupportedError, match="while a CUDA graph is being captured"):
        backend.make_launcher(p)
    assert backend._declined == {}

    backends.backend_names()
    monkeypatch.setitem(backends._REGISTRY, "cudnn", FakeCudnn(fail_build=True))
    monkeypatch.setitem(backends._REGISTRY, "triton", FakeTriton())
    plan_module = sys.modules["kvdecode.plan"]  # kvdecode.plan is also the function
    monkeypatch.setattr(plan_module, "capturing", lambda device: True)
    made = PLANS.get(p, Choice("cudnn", "test"), asked="auto")
    assert made.backend == "triton" and PLANS.peek(p, asked="auto", backend="cudnn") is None
    monkeypatch.setattr(plan_module, "capturing", lambda device: False)
    PLANS.get(p, Choice("cudnn", "test"), asked="auto")
    assert PLANS.peek(p, asked="auto", backend="cudnn") is not None


def test_out_sharing_memory_with_kv_start_is_refused_by_run():
    """The fast output check knows q, the caches and seq_lens only; a plan with kv_start (or a mask, or
    fp8 scales) used to take it anyway and let an out that overlaps kv_start through."""
    q, k, v, lens = _cpu_inputs()
    buf = torch.empty(2 * 4 * 1 * 16)
    starts = buf.view(torch.int32)[:2]
    starts.zero_()
    out = buf.view(2, 4, 1, 16)
    the_plan = kvdecode.plan(kvdecode.DecodeProblem.from_tensors(q, k, v, lens, kv_start=starts),
                             backend="reference")  # fmt: skip
    with pytest.raises(KVDecodeError, match="out must not share memory with kv_start"):
        the_plan.run(q, k, v, lens, kv_start=starts, out=out)
    # decode_attention takes the same fast output check (against the problem's signature, kv_start's
    # extent included)
    with pytest.raises(KVDecodeError, match="out must not share memory with kv_start"):
        kvdecode.decode_attention(q, k, v, lens, kv_start=starts, out=out, backend="reference")


def test_a_plan_with_sinks_runs_on_the_fast_checks(monkeypatch):
    """gpt-oss layers call with sinks every step: matching sinks take the few comparisons of the plain
    path (no full check of the inputs or outputs), and the full checks still catch what they must."""
    import sys

    plan_module = sys.modules["kvdecode.plan"]  # (kvdecode.plan is also the function)

    q, k, v, lens = _cpu_inputs()
    sinks = torch.zeros(4)
    with_sinks = kvdecode.plan(kvdecode.DecodeProblem.from_tensors(q, k, v, lens, sinks=sinks),
                               backend="reference")  # fmt: skip
    full = []
    for module, name in ((plan_module, "check_inputs"), (sys.modules["kvdecode._checks"], "check_buffers")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, **kw: full.append(1) or _real(*a, **kw))
    with_sinks.run(q, k, v, lens, sinks=sinks, out=torch.empty_like(q))
    assert full == []
    with pytest.raises(KVDecodeError, match=r"sinks must be torch\.float32 as planned"):
        with_sinks.run(q, k, v, lens, sinks=sinks.to(torch.float16))
    assert full == [1]


def test_sinks_are_given_exactly_when_planned_and_checked():
    q, k, v, lens = _cpu_inputs()
    sinks = torch.zeros(4)
    with_sinks = kvdecode.plan(kvdecode.DecodeProblem.from_tensors(q, k, v, lens, sinks=sinks),
                               backend="reference")  # fmt: skip
    with pytest.raises(KVDecodeError, match="sinks is None but the plan was made with them"):
        with_sinks.run(q, k, v, lens)
    with pytest.raises(KVDecodeError, match="sinks is given but the plan was made without them"):
        _plan(q, k, v, lens).run(q, k, v, lens, sinks=sinks)
    with pytest.raises(KVDecodeError, match=r"sinks must be a float32, bfloat16 or float16 \(4,\) tensor"):
        with_sinks.run(q, k, v, lens, sinks=torch.zeros(4, dtype=torch.float64))
    # the kernel is compiled for the planned sinks' dtype: another one is refused, not misread
    with pytest.raises(KVDecodeError, match=r"sinks must be torch.float32 as planned .* got torch.bfloat16"):
        with_sinks.run(q, k, v, lens, sinks=torch.zeros(4, dtype=torch.bfloat16))
    buf = torch.zeros(2 * 4 * 1 * 16)
    with pytest.raises(KVDecodeError, match="out must not share memory with sinks"):
        with_sinks.run(q, k, v, lens, sinks=buf[:4], out=buf.view(2, 4, 1, 16))


def test_a_bshd_out_with_a_mask_and_kv_start_takes_the_fast_output_check(monkeypatch):
    """transformers' decode step: kv_start, a sliced bool mask and an out that is a ``[B, T, H, D]``
    buffer seen as BHSD. That call used to take the full overlap check (byte extents recomputed per
    call, the larger part of its host time); the problem's signature now sizes kv_start, the mask and
    the scales, so the fast check serves it, and an out overlapping any of them is still refused."""
    q, k, v, lens = _cpu_inputs()
    starts = torch.tensor([1, 0], dtype=torch.int32)
    mask = torch.ones(2, 1, 1, k.shape[2] + 1, dtype=torch.bool)[..., : k.shape[2]]  # a marked mask, sliced
    out = torch.empty(2, 1, 4, 16).transpose(1, 2)  # BSHD seen as BHSD
    full = []
    checks = sys.modules["kvdecode._checks"]  # the one output check of every entry point
    real = checks.check_outputs_disjoint
    monkeypatch.setattr(checks, "check_outputs_disjoint", lambda *a: full.append(1) or real(*a))
    for plan_or_call in ("call", "run"):
        if plan_or_call == "call":
            kvdecode.decode_attention(q, k, v, lens, kv_start=starts, mask=mask, out=out, backend="reference")
        else:
            problem = kvdecode.DecodeProblem.from_tensors(q, k, v, lens, kv_start=starts, mask=mask)
            kvdecode.plan(problem, backend="reference").run(
                q, k, v, lens, kv_start=starts, mask=mask, out=out
            )
        want, _ = kvdecode.reference_decode_attention(q, k, v, lens, kv_start=starts, mask=mask)
        torch.testing.assert_close(out, want.to(out.dtype))
    assert full == []
    # out over the mask's bytes (and over kv_start's): refused by the fast check's extents, then named
    buf = torch.zeros(2 * 4 * 16)
    over_mask = buf.view(torch.bool)[: 2 * (k.shape[2] + 1)].view(2, 1, 1, k.shape[2] + 1)[..., : k.shape[2]]
    over_mask.fill_(True)
    with pytest.raises(KVDecodeError, match="out must not share memory with mask"):
        kvdecode.decode_attention(
            q, k, v, lens, kv_start=starts, mask=over_mask, out=buf.view(2, 4, 1, 16), backend="reference"
        )
    assert full == [1]


def test_the_signature_sizes_kv_start_the_mask_and_the_scales():
    """The fast check's extents of the extra inputs are those the full check computes per call."""
    from kvdecode._checks import extent, signature

    q, k, v, lens = _cpu_inputs()
    k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    q16 = q.to(torch.bfloat16)
    starts = torch.zeros(2, dtype=torch.int32)
    for mask in (
        torch.ones(2, 1, 1, k.shape[2] + 1, dtype=torch.bool)[..., : k.shape[2]],
        torch.zeros(1, 4, 1, k.shape[2]),
        torch.ones(k.shape[2], dtype=torch.bool),
    ):
        for scales in ((torch.tensor(0.5), torch.tensor(2.0)), (torch.ones(2), torch.ones(2))):
            p = kvdecode.DecodeProblem.from_tensors(
                q16, k8, v8, lens, kv_start=starts, mask=mask, k_scale=scales[0], v_scale=scales[1]
            )
            assert signature(p).others == (extent(starts), extent(mask), extent(scales[0]), extent(scales[1]))
    plain = signature(kvdecode.DecodeProblem.from_tensors(q, k, v, lens))
    assert plain.others == (0, 0, 0, 0)
