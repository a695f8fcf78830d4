"""Validation: every bad input raises KVDecodeError before any launch, naming the argument and value.

All calls go through ``kvdecode.decode_attention`` with the registered backends replaced by a recorder,
so each test also proves that nothing was planned or launched before the error.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

import kvdecode
from kvdecode import DecodeProblem, KVDecodeError, UnsupportedError
from kvdecode import backends as backends_module
from kvdecode.plan import PLANS

B, HQ, HKV, TQ, CAP, D = 2, 4, 2, 2, 32, 16


class RecordingBackend:
    """Wraps a real backend: answers ``supports`` as it does, but records plans and launches and
    computes nothing."""

    def __init__(self, real) -> None:
        self.real = real
        self.name = real.name
        self.made: list = []
        self.launches: list = []

    def supports(self, problem):
        return self.real.supports(problem)

    def make_launcher(self, problem, *, deterministic=False, config=None):
        self.made.append(problem)

        def launch(
            q, k, v, seq_lens, kv_start, mask, out, lse, scales=None, sinks=None
        ):  # the Launcher protocol
            self.launches.append(problem)
            out.zero_()
            if lse is not None:
                lse.zero_()

        return launch


_RECORDERS: dict[str, RecordingBackend] = {}


@pytest.fixture(autouse=True)
def recorder(monkeypatch):
    """Replace every registered backend by a recorder and start from an empty plan cache."""
    _RECORDERS.clear()
    for n in backends_module.backend_names():
        _RECORDERS[n] = RecordingBackend(backends_module.get_backend(n))
        monkeypatch.setitem(backends_module._REGISTRY, n, _RECORDERS[n])
    PLANS.clear()
    return _RECORDERS


def inputs(**over):
    """Valid inputs (fp32, CPU); keyword overrides replace single entries."""
    t = dict(
        q=torch.randn(B, HQ, TQ, D),
        k_cache=torch.randn(B, HKV, CAP, D),
        v_cache=torch.randn(B, HKV, CAP, D),
        seq_lens=torch.tensor([5, CAP], dtype=torch.int32),
    )
    t.update(over)
    return t


def call(**over):
    t = inputs(**over)
    args = (t.pop("q"), t.pop("k_cache"), t.pop("v_cache"), t.pop("seq_lens"))
    return kvdecode.decode_attention(*args, **t)


def expect_error(*fragments: str, error=KVDecodeError, **over) -> str:
    """Call with ``over``; the error must be ``error``, its message must contain every fragment, and no
    backend may have been planned or launched."""
    with pytest.raises(error) as info:
        call(**over)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in error message {msg!r}"
    for rec in _RECORDERS.values():
        assert rec.made == [], f"backend {rec.name} was planned before the error: {msg}"
        assert rec.launches == [], f"backend {rec.name} was launched before the error: {msg}"
    return msg


def test_recorder_sees_a_valid_call(recorder):
    """Control for the no-launch checks: a valid call does reach the (recording) backend."""
    out = call(backend="triton")
    assert out.shape == (B, HQ, TQ, D)
    assert len(recorder["triton"].made) == 1
    assert len(recorder["triton"].launches) == 1


def test_errors_are_value_errors():
    assert issubclass(KVDecodeError, ValueError)
    assert issubclass(UnsupportedError, KVDecodeError)


# ---- ranks ----


@pytest.mark.parametrize(
    ("name", "tensor"),
    [
        ("q", torch.randn(B, HQ, D)),
        ("q", torch.randn(1, B, HQ, TQ, D)),
        ("k_cache", torch.randn(B, HKV, CAP)),
        ("v_cache", torch.randn(B * HKV, CAP, D)),
    ],
)
def test_wrong_rank(name, tensor):
    expect_error(name, f"{tensor.dim()}-D", str(tuple(tensor.shape)), **{name: tensor})


# ---- B, D, heads disagree ----


def test_batch_of_k_disagrees_with_q():
    expect_error(
        "k_cache.shape[0]", "3", k_cache=torch.randn(3, HKV, CAP, D), v_cache=torch.randn(3, HKV, CAP, D)
    )


def test_batch_of_v_disagrees_with_k():
    expect_error("v_cache.shape", str((3, HKV, CAP, D)), v_cache=torch.randn(3, HKV, CAP, D))


def test_head_dim_of_k_disagrees_with_q():
    expect_error(
        "k_cache.shape[3]", "32", k_cache=torch.randn(B, HKV, CAP, 32), v_cache=torch.randn(B, HKV, CAP, 32)
    )


def test_head_dim_of_v_disagrees_with_k():
    expect_error("v_cache.shape", str((B, HKV, CAP, 32)), v_cache=torch.randn(B, HKV, CAP, 32))


def test_heads_of_v_disagree_with_k():
    expect_error("v_cache.shape", str((B, 1, CAP, D)), v_cache=torch.randn(B, 1, CAP, D))


def test_capacity_of_v_disagrees_with_k():
    expect_error("v_cache.shape", str((B, HKV, CAP + 1, D)), v_cache=torch.randn(B, HKV, CAP + 1, D))


@pytest.mark.parametrize("shape", [(3, HQ, TQ, D), (B, HQ + 1, TQ, D), (B, HQ, TQ + 1, D), (B, HQ, TQ, 32)])
def test_out_shape_disagrees_with_q(shape):
    expect_error("out.shape", str(shape), out=torch.empty(shape))


def test_num_q_heads_not_multiple_of_num_kv_heads():
    expect_error(
        "num_q_heads (4)", "num_kv_heads (3)",
        k_cache=torch.randn(B, 3, CAP, D), v_cache=torch.randn(B, 3, CAP, D),
    )  # fmt: skip


def test_zero_kv_heads():
    expect_error("num_kv_heads (0)", k_cache=torch.randn(B, 0, CAP, D), v_cache=torch.randn(B, 0, CAP, D))


def test_capacity_smaller_than_q_len():
    expect_error(
        "capacity", "= 3", "T_q (4)",
        q=torch.randn(B, HQ, 4, D), k_cache=torch.randn(B, HKV, 3, D), v_cache=torch.randn(B, HKV, 3, D),
    )  # fmt: skip


def test_zero_query_tokens():
    expect_error("T_q", "0", q=torch.randn(B, HQ, 0, D))


def test_empty_batch():
    expect_error(
        "B >= 1", str((0, HQ, TQ, D)),
        q=torch.randn(0, HQ, TQ, D), k_cache=torch.randn(0, HKV, CAP, D), v_cache=torch.randn(0, HKV, CAP, D),
        seq_lens=torch.zeros(0, dtype=torch.int32),
    )  # fmt: skip


# ---- seq_lens / kv_start: dtype, shape, device, type ----


@pytest.mark.parametrize("arg", ["seq_lens", "kv_start"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.int16])
def test_lengths_wrong_dtype(arg, dtype):
    expect_error(f"{arg}.dtype", "torch.int32", str(dtype), **{arg: torch.tensor([5, 7], dtype=dtype)})


@pytest.mark.parametrize("arg", ["seq_lens", "kv_start"])
@pytest.mark.parametrize("shape", [(3,), (1,), (B, 1), ()])
def test_lengths_wrong_shape(arg, shape):
    bad = torch.full(shape, 5, dtype=torch.int32)
    expect_error(f"{arg}.shape", f"({B},)", str(tuple(shape)), **{arg: bad})


@pytest.mark.parametrize("arg", ["seq_lens", "kv_start"])
def test_lengths_on_another_device(arg):
    # CPU-only machines have one real device; "meta" is a second one that holds no data.
    expect_error(arg, "meta", "cpu", **{arg: torch.empty(B, dtype=torch.int32, device="meta")})


@pytest.mark.parametrize("arg", ["seq_lens", "kv_start"])
def test_lengths_not_a_tensor(arg):
    expect_error(arg, "torch.Tensor", "list", **{arg: [5, 7]})


# ---- dtypes ----


@pytest.mark.parametrize("name", ["k_cache", "v_cache"])
def test_cache_dtype_differs_from_q(name):
    expect_error(
        f"{name}.dtype", "torch.float16", "torch.float32", **{name: torch.randn(B, HKV, CAP, D).half()}
    )


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.int8, torch.int32, torch.float8_e4m3fn, torch.complex64]
)
def test_unsupported_dtype(dtype):
    q, k, v = (torch.zeros(s, dtype=dtype) for s in ((B, HQ, TQ, D), (B, HKV, CAP, D), (B, HKV, CAP, D)))
    expect_error("q.dtype", str(dtype), q=q, k_cache=k, v_cache=v)


def test_out_dtype_differs_from_q():
    expect_error("out.dtype", "torch.bfloat16", out=torch.empty(B, HQ, TQ, D, dtype=torch.bfloat16))


# ---- head dim range ----


@pytest.mark.parametrize("head_dim", [0, 257, 512])
def test_head_dim_out_of_range(head_dim):
    expect_error(
        "head_dim", "1..256", str(head_dim),
        q=torch.randn(B, HQ, TQ, head_dim),
        k_cache=torch.randn(B, HKV, CAP, head_dim), v_cache=torch.randn(B, HKV, CAP, head_dim),
    )  # fmt: skip


# ---- strides ----


@pytest.mark.parametrize("name", ["q", "k_cache", "v_cache", "out"])
def test_last_dim_not_contiguous(name):
    shape = {"q": (B, HQ, TQ, D), "out": (B, HQ, TQ, D)}.get(name, (B, HKV, CAP, D))
    strided = torch.randn(*shape[:-1], 2 * D)[..., ::2]
    assert strided.stride(-1) == 2
    expect_error(f"{name}.stride(-1)", "got 2", **{name: strided})


def test_d_major_layout_is_rejected_not_copied():
    k = torch.randn(B, HKV, D, CAP).transpose(2, 3)  # [B, H_kv, capacity, D] with stride(-1) = capacity
    expect_error("k_cache.stride(-1)", f"got {CAP}", k_cache=k)


# ---- devices ----


@pytest.mark.parametrize("name", ["k_cache", "v_cache"])
def test_cache_on_another_device(name):
    expect_error(name, "meta", "q's device (cpu)", **{name: torch.empty(B, HKV, CAP, D, device="meta")})


def test_out_on_another_device():
    expect_error("out", "meta", out=torch.empty(B, HQ, TQ, D, device="meta"))


def test_mask_on_another_device():
    expect_error("mask", "meta", mask=torch.ones(CAP, dtype=torch.bool, device="meta"))


@pytest.mark.gpu
def test_cuda_cache_with_cpu_query():
    expect_error("k_cache", "cuda", k_cache=torch.randn(B, HKV, CAP, D, device="cuda"))


# ---- masks ----


@pytest.mark.parametrize(
    "shape", [(B, HQ, TQ, CAP - 1), (CAP + 1,), (3, 1, 1, CAP), (1, HQ + 1, 1, CAP), (1, 1, TQ + 1, CAP)]
)
def test_mask_not_broadcastable(shape):
    expect_error("mask.shape", str(tuple(shape)), str([B, HQ, TQ, CAP]), mask=torch.zeros(shape))


def test_mask_too_many_dims():
    expect_error("mask", str((1, B, HQ, TQ, CAP)), mask=torch.zeros(1, B, HQ, TQ, CAP))


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int64, torch.float64])
def test_mask_bad_dtype(dtype):
    expect_error("mask.dtype", str(dtype), mask=torch.zeros(CAP, dtype=dtype))


def test_mask_not_a_tensor():
    expect_error("mask", "torch.Tensor", mask=[True] * CAP)


# ---- scale ----


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, 0.0, -0.125, "big"])
def test_bad_scale(scale):
    expect_error("scale", "positive finite", repr(scale), scale=scale)


# ---- backend ----


@pytest.mark.parametrize("backend", ["flash", "TRITON", "", None, 3])
def test_unknown_backend(backend):
    expect_error("backend", repr(backend), "'triton'", backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_explicit_backend_that_cannot_serve_raises_unsupported(dtype):
    """cuDNN cannot serve CPU tensors (nor fp32): it refuses, names itself and says why."""
    q, k, v = (torch.randn(s, dtype=dtype) for s in ((B, HQ, TQ, D), (B, HKV, CAP, D), (B, HKV, CAP, D)))
    msg = expect_error("cudnn", error=UnsupportedError, backend="cudnn", q=q, k_cache=k, v_cache=v)
    assert len(msg) > len("backend 'cudnn' cannot serve ") + 40, msg


# ---- validate=True: the device lengths (syncs) ----


@pytest.mark.parametrize(
    ("lens", "starts", "fragments"),
    [
        ([5, CAP + 1], None, ("seq_lens[1]", f"capacity ({CAP})", str(CAP + 1))),
        ([TQ - 1, 5], None, ("seq_lens[0]", f"T_q ({TQ})", str(TQ - 1))),
        ([0, 5], None, ("seq_lens[0]", "got 0")),
        ([-3, 5], None, ("seq_lens[0]", "got -3")),
        ([5, 10], [0, 9], ("kv_start[1]", "0..seq_lens[1] - T_q (8)", "got 9")),
        ([5, 10], [4, 0], ("kv_start[0]", "got 4")),
        ([5, 10], [-1, 0], ("kv_start[0]", "got -1")),
    ],
)
def test_validate_rejects_bad_lengths(lens, starts, fragments):
    over = dict(seq_lens=torch.tensor(lens, dtype=torch.int32), validate=True)
    if starts is not None:
        over["kv_start"] = torch.tensor(starts, dtype=torch.int32)
    expect_error(*fragments, **over)


@pytest.mark.parametrize("validate", [True, False])
def test_valid_lengths_pass_validation(recorder, validate):
    starts = torch.tensor([0, CAP - TQ], dtype=torch.int32)
    call(seq_lens=torch.tensor([TQ, CAP], dtype=torch.int32), kv_start=starts, validate=validate)
    assert len(recorder["triton"].launches) == 1


def test_bad_lengths_without_validate_do_not_sync_or_raise(recorder):
    """validate is off by default: device values are not read on the host (the kernel clamps)."""
    call(seq_lens=torch.tensor([CAP + 100, -5], dtype=torch.int32))
    assert len(recorder["triton"].launches) == 1


# ---- the problem description ----


def _meta_problem(b, hq, hkv, d, tq, cap, dtype, **kw) -> DecodeProblem:
    q = torch.empty(b, hq, tq, d, dtype=dtype, device="meta")
    k = torch.empty(b, hkv, cap, d, dtype=dtype, device="meta")
    lens = torch.empty(b, dtype=torch.int32, device="meta")
    return DecodeProblem.from_tensors(q, k, k, lens, **kw)


def test_problem_name_format():
    p = _meta_problem(8, 32, 8, 128, 1, 131072, torch.bfloat16)
    assert p.name == "b8_hq32_hkv8_d128_tq1_cap131072_bf16"
    assert re.fullmatch(r"[a-z0-9_]+", p.name)


def test_problem_name_marks_kv_start_and_mask():
    lens = torch.empty(2, dtype=torch.int32, device="meta")
    mask = torch.empty(1, 1, 1, 64, dtype=torch.bool, device="meta")
    p = _meta_problem(2, 4, 1, 80, 3, 64, torch.float16, kv_start=lens, mask=mask)
    assert p.name == "b2_hq4_hkv1_d80_tq3_cap64_fp16_kvstart_maskbool"
    add = torch.empty(64, dtype=torch.float32, device="meta")
    assert _meta_problem(1, 2, 2, 64, 1, 64, torch.float32, mask=add).name.endswith("fp32_maskadditive")


def test_problem_is_frozen_hashable_and_records_layout():
    p = _meta_problem(2, 6, 3, 96, 2, 128, torch.float16)
    assert p == _meta_problem(2, 6, 3, 96, 2, 128, torch.float16)
    assert hash(p) == hash(_meta_problem(2, 6, 3, 96, 2, 128, torch.float16))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.capacity = 1  # type: ignore[misc]
    assert p.group_size == 2
    assert p.scale == pytest.approx(1 / math.sqrt(96))
    assert p.k_strides == (3 * 128 * 96, 128 * 96, 96, 1)
    bshd = torch.empty(2, 128, 3, 96, dtype=torch.float16, device="meta").transpose(1, 2)
    q = torch.empty(2, 6, 2, 96, dtype=torch.float16, device="meta")
    lens = torch.empty(2, dtype=torch.int32, device="meta")
    p2 = DecodeProblem.from_tensors(q, bshd, bshd, lens, scale=0.5)
    assert p2.k_strides == (128 * 3 * 96, 96, 3 * 96, 1)
    assert p2.scale == 0.5
    assert p2 != p  # a different layout is a different problem (and plan)


def test_a_problem_hashes_once_and_copies_hash_afresh():
    """The plan cache hashes a problem on every call: the hash is computed once and kept; a copy or an
    unpickled problem (another process hashes str differently) does not inherit it."""
    import copy
    import pickle

    q, k, v, lens = (torch.randn(B, HQ, TQ, D), torch.randn(B, HKV, CAP, D), torch.randn(B, HKV, CAP, D),
                     torch.tensor([CAP, 9], dtype=torch.int32))  # fmt: skip
    p = DecodeProblem.from_tensors(q, k, v, lens)
    assert "_hash" not in p.__dict__
    h = hash(p)
    assert p.__dict__["_hash"] == h and hash(p) == h
    for other in (copy.copy(p), pickle.loads(pickle.dumps(p)), DecodeProblem.from_tensors(q, k, v, lens)):
        assert "_hash" not in other.__dict__ and other == p and hash(other) == h
    assert hash(dataclasses.replace(p, capacity=CAP + 1)) != h


@pytest.mark.parametrize("window", [0, -3, 1.5, True, "64", 2**31])
def test_window_is_checked(window):
    expect_error("window must be None or an int", repr(window), window=window)


def test_cudnn_declines_a_window_with_the_reason():
    from kvdecode.cudnn_graphs.backend import problem_reason

    q, k = torch.randn(B, HQ, TQ, D, dtype=torch.bfloat16), torch.randn(B, HKV, CAP, D, dtype=torch.bfloat16)
    lens = torch.tensor([CAP, 9], dtype=torch.int32)
    problem = DecodeProblem.from_tensors(q, k, k, lens, window=8)
    on_gpu = dataclasses.replace(problem, device=torch.device("cuda", 0))
    assert "sliding window" in problem_reason(on_gpu)
    assert "softcap" in problem_reason(dataclasses.replace(on_gpu, window=None, softcap=50.0))
    assert problem_reason(dataclasses.replace(on_gpu, window=None)) is None


@pytest.mark.parametrize("softcap", [0, -1.0, float("inf"), float("nan"), True, "50"])
def test_softcap_is_checked(softcap):
    expect_error("softcap must be None or a positive finite float", repr(softcap), softcap=softcap)


def test_static_cache_checks_window_and_softcap_when_made():
    for bad in (dict(window=0), dict(softcap=-2.0)):
        with pytest.raises(KVDecodeError, match=r"(window|softcap) must be"):
            kvdecode.StaticKVCache(1, batch=1, num_kv_heads=1, capacity=16, head_dim=16, device="cpu", **bad)
