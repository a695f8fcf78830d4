"""Planner decisions (auto per call, thresholds, fallbacks), explain() and the threshold tables."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

import kvdecode
from kvdecode import backends, planner, thresholds
from kvdecode.backends import ReferenceBackend
from kvdecode.errors import KVDecodeError, UnsupportedError
from kvdecode.plan import PLANS, plan_for_choice
from kvdecode.planner import Choice, choose
from kvdecode.problem import DecodeProblem
from kvdecode.thresholds import FALLBACK_THRESHOLD, Threshold, load_table, table_for_gpu, threshold_for

H100 = "NVIDIA H100 80GB HBM3"


def gpu_problem(capacity=16384, batch=1, head_dim=128, dtype=torch.bfloat16, **extra) -> DecodeProblem:
    """A problem on cuda:0 described without tensors (this runs on CPU-only CI too)."""
    s = (8 * capacity * head_dim, capacity * head_dim, head_dim, 1)
    return DecodeProblem(
        batch=batch,
        num_q_heads=32,
        num_kv_heads=8,
        head_dim=head_dim,
        q_len=1,
        capacity=capacity,
        dtype=dtype,
        device=torch.device("cuda", 0),
        q_strides=(32 * head_dim, head_dim, head_dim, 1),
        k_strides=s,
        v_strides=s,
        scale=1 / math.sqrt(head_dim),
        **extra,
    )


class FakeCudnn:
    """Stands in for the cuDNN backend: serves everything, counts launchers, computes the reference."""

    name = "cudnn"

    def __init__(self, reason=None, fail_build=False):
        self.reason, self.fail_build, self.made = reason, fail_build, []

    def supports(self, problem):
        return self.reason

    def make_launcher(self, problem, *, deterministic=False):
        if self.fail_build:
            raise UnsupportedError("backend 'cudnn' cannot serve it: no engine")
        self.made.append(problem)
        return ReferenceBackend().make_launcher(problem)


class SeqLens:
    """A stand-in for device lengths that records (or forbids) reading them."""

    is_cuda = True

    def __init__(self, value=None):
        self.value, self.reads = value, 0

    def max(self):
        if self.value is None:
            raise AssertionError("seq_lens must not be read here")
        self.reads += 1
        return torch.tensor(self.value)


@pytest.fixture
def fake_cudnn(monkeypatch):
    backends.backend_names()  # fill the registry first
    fake = FakeCudnn()
    monkeypatch.setitem(backends._REGISTRY, "cudnn", fake)
    monkeypatch.setattr(planner, "device_gpu_name", lambda device: H100)
    PLANS.clear()
    return fake


def test_auto_uses_triton_below_the_threshold_and_cudnn_at_it(fake_cudnn):
    p = gpu_problem()
    thr = planner.auto_threshold(p).value
    below = choose(p, max_seq_len=thr - 1)
    at = choose(p, max_seq_len=thr)
    assert (below.backend, at.backend) == ("triton", "cudnn")
    assert below.threshold == at.threshold == thr and at.length == thr
    assert "max_seq_len" in at.reason and "provisional" in at.reason


def test_capacity_below_threshold_never_reads_lengths(fake_cudnn):
    p = gpu_problem(capacity=1024)
    choice = choose(p, seq_lens=SeqLens(None))
    assert choice.backend == "triton" and "not read" in choice.reason


def test_capture_uses_the_capacity_without_reading(fake_cudnn, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    choice = choose(gpu_problem(capacity=65536), seq_lens=SeqLens(None))
    assert choice.backend == "cudnn" and choice.length == 65536 and "capturing" in choice.reason


def test_otherwise_the_longest_row_is_read_once(fake_cudnn, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    p = gpu_problem(capacity=65536)
    thr = planner.auto_threshold(p).value
    for value, want in ((thr - 1, "triton"), (thr, "cudnn"), (65536, "cudnn"), (1, "triton")):
        lens = SeqLens(value)
        choice = choose(p, seq_lens=lens)
        assert (choice.backend, choice.length, lens.reads) == (want, value, 1)
    assert choose(p, seq_lens=SeqLens(None), max_seq_len=5).backend == "triton"  # max_seq_len wins


def test_plan_without_lengths_decides_for_the_capacity(fake_cudnn):
    assert choose(gpu_problem(capacity=65536)).backend == "cudnn"
    assert choose(gpu_problem(capacity=64)).backend == "triton"


def test_what_cudnn_cannot_serve_goes_to_triton_with_the_reason(fake_cudnn, caplog):
    fake_cudnn.reason = "a bool mask is given; the cuDNN graph takes lengths only"
    with caplog.at_level(logging.DEBUG, logger="kvdecode.planner"):
        choice = choose(gpu_problem(capacity=65536), max_seq_len=65536)
    assert choice.backend == "triton" and fake_cudnn.reason in choice.reason
    assert any(fake_cudnn.reason in r.getMessage() for r in caplog.records)


def test_explicit_cudnn_that_cannot_serve_raises(fake_cudnn):
    fake_cudnn.reason = "head_dim 60 must be a multiple of 8"
    with pytest.raises(UnsupportedError, match="multiple of 8"):
        choose(gpu_problem(), "cudnn")


def test_deterministic_calls_stay_off_a_backend_that_is_not_bitwise_repeatable(fake_cudnn):
    """cuDNN's LSE varies by 1 ulp call to call (bench/cudnn_lse_repeat.py): deterministic=True goes to
    Triton under auto, with the reason in the choice, and an explicit cuDNN raises saying why."""
    fake_cudnn.determinism_gap = "deterministic=True: not bitwise repeatable"
    p = gpu_problem(capacity=65536)
    assert choose(p, max_seq_len=65536).backend == "cudnn"
    det = choose(p, max_seq_len=65536, deterministic=True)
    assert det.backend == "triton" and fake_cudnn.determinism_gap in det.reason
    with pytest.raises(UnsupportedError, match="not bitwise repeatable"):
        choose(p, "cudnn", deterministic=True)
    # the plan cache memoizes routes per determinism: asking one way never answers the other
    assert PLANS.route(p, "auto").choose(p, 65536, None).backend == "cudnn"
    assert PLANS.route(p, "auto", True).choose(p, 65536, None).backend == "triton"
    assert PLANS.route(p, "auto", False).choose(p, 65536, None).backend == "cudnn"


def test_the_cudnn_backend_refuses_deterministic_launchers(monkeypatch):
    from kvdecode.cudnn_graphs import backend as cudnn_backend

    monkeypatch.setattr(cudnn_backend.CudnnBackend, "supports", lambda self, problem: None)
    cudnn = cudnn_backend.CudnnBackend()
    assert cudnn.determinism_gap == cudnn_backend.DETERMINISM_GAP
    with pytest.raises(UnsupportedError, match="not bitwise repeatable"):
        cudnn.make_launcher(gpu_problem(), deterministic=True)


@pytest.mark.parametrize("bad", [0, 16385, -1, 1.5, True, "10"])
def test_max_seq_len_is_checked(fake_cudnn, bad):
    with pytest.raises(KVDecodeError, match="max_seq_len"):
        choose(gpu_problem(), max_seq_len=bad)


def test_build_failure_under_auto_falls_back_to_triton(fake_cudnn, monkeypatch):
    fake_cudnn.fail_build = True
    monkeypatch.setitem(backends._REGISTRY, "triton", ReferenceBackend())  # stands in for Triton here
    p = gpu_problem(capacity=65536)
    made = plan_for_choice(p, choose(p), auto=True)
    assert made.backend == "triton" and "declined at build time" in made.choice.reason
    with pytest.raises(UnsupportedError):
        plan_for_choice(p, choose(p, "cudnn"), auto=False)


def test_rows_below_the_threshold_never_build_a_cudnn_graph(fake_cudnn, monkeypatch):
    monkeypatch.setattr(planner, "auto_threshold", lambda p: Threshold(40, "test", provisional=False))
    fake_triton = FakeCudnn()  # the Triton kernel is tested elsewhere; here only the routing counts
    fake_triton.name = "triton"
    monkeypatch.setitem(backends._REGISTRY, "triton", fake_triton)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 1, 16, generator=gen)
    k, v = (torch.randn(2, 2, 64, 16, generator=gen) for _ in range(2))
    for n in (1, 10, 39):
        lens = torch.tensor([n, 1], dtype=torch.int32)
        assert kvdecode.explain(q, k, v, lens).backend == "triton"
        out = kvdecode.decode_attention(q, k, v, lens)
        ref, _ = kvdecode.reference_decode_attention(q, k, v, lens)
        assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert fake_cudnn.made == [] and len(fake_triton.made) == 1
    for n in (40, 50, 64):  # at or above: one cuDNN plan for every length of this capacity
        lens = torch.tensor([1, n], dtype=torch.int32)
        out = kvdecode.decode_attention(q, k, v, lens)
        ref, _ = kvdecode.reference_decode_attention(q, k, v, lens)
        assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert len(fake_cudnn.made) == 1


def test_plan_for_call_is_route_choose_get_with_one_read_of_the_lengths(fake_cudnn, monkeypatch, caplog):
    """The call path's one lookup (``PLANS.plan_for_call``, no reason string on a hit) picks what
    ``choose`` picks on both sides of the threshold, reads the device lengths once per call (a miss
    included), hands back the cached plan on a hit (counted), and with DEBUG logging still logs each
    call's choice."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    fake_triton = FakeCudnn()
    fake_triton.name = "triton"
    monkeypatch.setitem(backends._REGISTRY, "triton", fake_triton)
    p = gpu_problem(capacity=65536)
    thr = planner.auto_threshold(p).value
    plans = {}
    for value in (thr - 1, thr, 1, 65536, thr - 1):
        lens = SeqLens(value)
        made = PLANS.plan_for_call(p, "auto", False, None, lens)
        assert made.backend == choose(p, seq_lens=SeqLens(value)).backend and lens.reads == 1
        assert plans.setdefault(made.backend, made) is made  # one plan per backend, reused
    info = PLANS.cache_info()
    assert (info["size"], info["misses"], info["hits"]) == (2, 2, 3)
    assert PLANS.plan_for_call(p, "cudnn", False, 7, None).backend == "cudnn"  # explicit: no lengths read
    with caplog.at_level(logging.DEBUG, logger="kvdecode.planner"):
        PLANS.plan_for_call(p, "auto", False, thr, None)
    assert any("max_seq_len" in r.getMessage() and "cudnn" in r.getMessage() for r in caplog.records)


def test_explain_on_cpu_names_what_cudnn_lacks():
    q = torch.randn(1, 4, 1, 60, dtype=torch.float16)
    k = torch.randn(1, 1, 128, 60, dtype=torch.float16)
    lens = torch.tensor([5], dtype=torch.int32)
    choice = kvdecode.explain(q, k, k, lens)
    assert isinstance(choice, Choice) and choice.backend == "triton"
    assert "head_dim 60" in choice.reason
    choice = kvdecode.explain(
        q[..., :32].contiguous(), k[..., :32].contiguous(), k[..., :32].contiguous(), lens
    )
    assert "cpu" in choice.reason
    choice = kvdecode.explain(
        q[..., :32].contiguous(),
        k[..., :32].contiguous(),
        k[..., :32].contiguous(),
        lens,
        kv_start=torch.zeros(1, dtype=torch.int32),
    )
    assert "kv_start" in choice.reason
    with pytest.raises(UnsupportedError, match="cudnn"):
        kvdecode.decode_attention(q, k, k, lens, backend="cudnn")


# ---- threshold tables ----


def test_shipped_h100_table():
    # Read the file directly: in CI the torch/triton versions differ from the H100 machine's, so the
    # version check (rightly) refuses it there.
    table = load_table(thresholds.TUNING_DIR / "default_h100.json")
    assert table.gpu_name == H100 and not table.provisional
    for field in ("gpu_name", "sm_count", "versions", "date"):
        assert field in table.metadata
    assert table.bucket(1) == 1 and table.bucket(3) == 4 and table.bucket(1000) == 64
    gqa = thresholds.family_key(32, 8, 128, 1, "bf16")
    # measured on the H100 (bench/results/nvidia-h100-80gb-hbm3-2026-11-25*.json): at B 1 Triton won
    # every length; at B 16 cuDNN won from 1k
    assert table.family_threshold(gqa, 1) == thresholds.NEVER
    assert table.family_threshold(gqa, 16) == 1024
    assert table.lookup(96, "fp16", 1) == table.default_threshold


def test_unknown_gpu_gets_the_provisional_fallback():
    t = threshold_for(128, "bf16", 1, "Some Other GPU")
    assert t == Threshold(FALLBACK_THRESHOLD, t.source, provisional=True)


def _write(path, **over):
    raw = {
        "schema_version": 1,
        "metadata": {"gpu_name": "Test GPU", "sm_count": 1, "versions": {}, "date": "2026-11-25"},
        "batch_buckets": [1, 8],
        "default_threshold": 1000,
        "thresholds": {"d64_fp16_b8": 77},
    }
    raw.update(over)
    path.write_text(json.dumps(raw))
    return path


def test_env_table_is_used_for_its_gpu_and_refused_for_another(tmp_path, monkeypatch):
    monkeypatch.setenv("KVDECODE_TUNING_TABLE", str(_write(tmp_path / "t.json")))
    monkeypatch.setenv("KVDECODE_TUNING_MATCH", "gpu")  # the shipped table's versions are the H100's
    table_for_gpu.cache_clear()
    try:
        assert threshold_for(64, "fp16", 5, "Test GPU").value == 77
        assert threshold_for(64, "fp16", 1, "Test GPU").value == 1000
        with pytest.warns(RuntimeWarning, match="Test GPU"):
            assert table_for_gpu(H100).gpu_name == H100  # falls back to the shipped table
    finally:
        table_for_gpu.cache_clear()


@pytest.mark.parametrize(
    "over",
    [dict(schema_version=2), dict(metadata={}), dict(batch_buckets=[8, 1]), dict(thresholds={"x": -1})],
)
def test_malformed_tables_are_refused(tmp_path, over):
    with pytest.raises(KVDecodeError, match="tuning table"):
        load_table(_write(tmp_path / "bad.json", **over))


def test_unaligned_tensors_keep_cudnn_away():
    """cuDNN needs 16-byte aligned starts; the problem records it so auto never plans cuDNN for a view that
    starts mid-vector (it would otherwise raise at run time)."""
    import dataclasses

    from kvdecode.cudnn_graphs.backend import problem_reason

    q = torch.randn(1, 4, 1, 16, dtype=torch.bfloat16)
    flat = torch.randn(2 * 64 * 16 + 1, dtype=torch.bfloat16)
    k = flat[1:].view(1, 2, 64, 16)  # starts 2 bytes into the storage
    lens = torch.tensor([10], dtype=torch.int32)
    unaligned = DecodeProblem.from_tensors(q, k, k, lens)
    aligned = DecodeProblem.from_tensors(q, k.clone(), k.clone(), lens)
    assert not unaligned.aligned_16 and aligned.aligned_16
    on_gpu = dataclasses.replace(unaligned, device=torch.device("cuda", 0))
    assert "16-byte" in problem_reason(on_gpu)
    assert problem_reason(dataclasses.replace(aligned, device=torch.device("cuda", 0))) is None


def test_use_table_drops_memoized_routes_and_plans(fake_cudnn, monkeypatch):
    """Routes (thresholds) and plans (Triton configs) come from the table in use: switching tables
    must not leave the old table's choices memoized in the shared plan cache."""
    p = gpu_problem()
    monkeypatch.setattr(planner, "auto_threshold", lambda problem: Threshold(111, "old", False))
    assert PLANS.route(p, "auto").threshold.value == 111
    monkeypatch.setattr(planner, "auto_threshold", lambda problem: Threshold(222, "new", False))
    try:
        thresholds.use_table(thresholds.NO_TABLE)
        assert PLANS.route(p, "auto").threshold.value == 222
    finally:
        thresholds.use_table(None)
