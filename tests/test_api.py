"""The public call: signature, return values, out=, plan reuse across steps, backend choice, plan/run."""

from __future__ import annotations

import doctest
import inspect
import math

import pytest
import torch
from strategies import Case, make_inputs

import kvdecode
from kvdecode import (
    DecodeProblem,
    KVDecodeError,
    UnsupportedError,
    decode_attention,
    reference_decode_attention,
)
from kvdecode import api as api_module
from kvdecode.plan import PLANS


@pytest.fixture(autouse=True)
def fresh_plan_cache(monkeypatch):
    PLANS.clear()


CASE = Case(2, 6, 2, 16, 2, 48, torch.float32, (48, 5), kv_start=(0, 2), seed=5)


def test_signature_follows_the_public_contract():
    sig = inspect.signature(decode_attention)
    assert list(sig.parameters)[:4] == ["q", "k_cache", "v_cache", "seq_lens"]
    keyword_only = {n: p.default for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}
    for name, default in [("scale", None), ("kv_start", None), ("mask", None), ("backend", "auto"),
                          ("out", None), ("return_lse", False), ("validate", False)]:  # fmt: skip
        assert keyword_only[name] == default, name


def test_returns_out_or_out_and_lse():
    x = make_inputs(CASE, "cpu")
    out = decode_attention(x.q, x.k, x.v, x.seq_lens, kv_start=x.kv_start, backend="reference")
    assert isinstance(out, torch.Tensor)
    assert out.shape == x.q.shape and out.dtype == x.q.dtype and out.device == x.q.device
    out2, lse = decode_attention(
        x.q, x.k, x.v, x.seq_lens, kv_start=x.kv_start, backend="reference", return_lse=True
    )
    assert torch.equal(out, out2)
    assert lse.shape == (CASE.batch, CASE.num_q_heads, CASE.q_len) and lse.dtype == torch.float32
    ref_out, ref_lse = reference_decode_attention(x.q, x.k, x.v, x.seq_lens, kv_start=x.kv_start)
    assert torch.equal(out, ref_out.float()) and torch.equal(lse, ref_lse.float())


def test_out_is_written_in_place_and_returned():
    x = make_inputs(CASE, "cpu")
    got = decode_attention(x.q, x.k, x.v, x.seq_lens, kv_start=x.kv_start, backend="reference", out=x.out)
    assert got is x.out
    assert not torch.isnan(x.out).any()


def test_default_scale_is_one_over_sqrt_d():
    x = make_inputs(CASE, "cpu")
    a = decode_attention(x.q, x.k, x.v, x.seq_lens, backend="reference")
    b = decode_attention(x.q, x.k, x.v, x.seq_lens, backend="reference", scale=1 / math.sqrt(CASE.head_dim))
    c = decode_attention(x.q, x.k, x.v, x.seq_lens, backend="reference", scale=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_one_plan_serves_every_step():
    """Lengths are device values, not part of the problem: new lengths reuse the plan."""
    x = make_inputs(CASE, "cpu")
    for lens in ([48, 5], [2, 2], [30, 47]):
        x.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        decode_attention(x.q, x.k, x.v, x.seq_lens, kv_start=x.kv_start, backend="reference")
    assert PLANS.cache_info()["size"] == 1
    # a different layout is a different problem
    decode_attention(x.q, x.k.transpose(1, 2).contiguous().transpose(1, 2), x.v, x.seq_lens,
                     kv_start=x.kv_start, backend="reference")  # fmt: skip
    assert PLANS.cache_info()["size"] == 2


def test_auto_picks_triton_where_it_can_serve():
    x = make_inputs(CASE, "cpu")
    problem = DecodeProblem.from_tensors(x.q, x.k, x.v, x.seq_lens, kv_start=x.kv_start)
    assert kvdecode.plan(problem).backend == "triton"


def test_triton_without_interpreter_or_cuda_is_unsupported(monkeypatch):
    """On CPU tensors Triton needs its interpreter: named explicitly it refuses and says why; auto falls
    back to the reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = make_inputs(CASE, "cpu")
    with pytest.raises(UnsupportedError, match="interpreter"):
        decode_attention(x.q, x.k, x.v, x.seq_lens, backend="triton")
    problem = DecodeProblem.from_tensors(x.q, x.k, x.v, x.seq_lens)
    the_plan = kvdecode.plan(problem)
    assert the_plan.backend == "reference" and "triton" in the_plan.choice.reason
    out = decode_attention(x.q, x.k, x.v, x.seq_lens)
    assert torch.equal(out, reference_decode_attention(x.q, x.k, x.v, x.seq_lens)[0].float())


# ---- DecodePlan.run checks the tensors against the plan, naming both sides ----


@pytest.fixture
def planned():
    x = make_inputs(CASE, "cpu")
    problem = DecodeProblem.from_tensors(x.q, x.k, x.v, x.seq_lens, kv_start=x.kv_start)
    return x, kvdecode.plan(problem, backend="reference")


def test_plan_run_matches_the_call(planned):
    x, the_plan = planned
    out = the_plan.run(x.q, x.k, x.v, x.seq_lens, kv_start=x.kv_start)
    ref = reference_decode_attention(x.q, x.k, x.v, x.seq_lens, kv_start=x.kv_start)[0]
    assert torch.equal(out, ref.float())


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        (lambda x: {"q": x.q.half()}, ("q has dtype torch.float16", "torch.float32", "make a new plan")),
        (lambda x: {"k": x.k[:, :, :40]}, ("k_cache has shape", "(2, 2, 40, 16)", "(2, 2, 48, 16)")),
        (lambda x: {"v": x.v.transpose(1, 2).contiguous().transpose(1, 2)}, ("v_cache has strides",)),
        (lambda x: {"q": x.q.to("meta")}, ("q is on meta", "cpu")),
        (lambda x: {"kv_start": None}, ("kv_start is None", "with it")),
        (lambda x: {"mask": torch.ones(48, dtype=torch.bool)}, ("mask is given", "'none'")),
    ],
)
def test_plan_run_mismatch_names_both_sides(planned, change, fragments):
    x, the_plan = planned
    args = dict(q=x.q, k=x.k, v=x.v, kv_start=x.kv_start, mask=None)
    args.update(change(x))
    with pytest.raises(KVDecodeError) as info:
        the_plan.run(
            args["q"], args["k"], args["v"], x.seq_lens, kv_start=args["kv_start"], mask=args["mask"]
        )
    for frag in fragments:
        assert frag in str(info.value), (frag, str(info.value))


@pytest.mark.parametrize(
    "target",
    [
        api_module.decode_attention,
        kvdecode.plan,
        kvdecode.DecodeProblem.from_tensors,
        kvdecode.StaticKVCache,
    ],
    ids=lambda f: f.__qualname__,
)
def test_docstring_examples_run(target):
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(target, target.__qualname__, globs={"DecodeProblem": kvdecode.DecodeProblem}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0


def test_plans_are_shared_and_hold_no_scratch():
    """Threads sharing a stream used to share one plan's partials and read each other's (issue 12): plans
    are now shared by everyone and own no scratch; every launch allocates its own."""
    import threading

    from kvdecode.planner import Choice
    from kvdecode.triton_kernels import SplitKVConfig, SplitKVLauncher

    q = torch.randn(1, 4, 1, 16)
    k = torch.randn(1, 2, 32, 16)
    lens = torch.tensor([5], dtype=torch.int32)
    problem = kvdecode.DecodeProblem.from_tensors(q, k, k, lens)
    choice = Choice("reference", "test")
    here = [PLANS.get(problem, choice, asked="reference") for _ in range(2)]
    there = []
    worker = threading.Thread(target=lambda: there.append(PLANS.get(problem, choice, asked="reference")))
    worker.start()
    worker.join()
    assert here[0] is here[1] is there[0]
    launcher = SplitKVLauncher(problem, SplitKVConfig(num_splits=2, block_n=16))
    held = [name for name, value in vars(launcher).items() if isinstance(value, torch.Tensor)]
    assert held == [], f"the launcher holds tensors {held}: concurrent calls would share them"


def test_plan_run_checks_every_tensor_against_the_plan():
    q = torch.randn(2, 4, 1, 16)
    k = torch.randn(2, 2, 32, 16)
    lens = torch.tensor([5, 32], dtype=torch.int32)
    mask = torch.ones(2, 1, 1, 32, dtype=torch.bool)
    problem = kvdecode.DecodeProblem.from_tensors(q, k, k, lens, mask=mask)
    the_plan = kvdecode.plan(problem, backend="reference")
    bad = [
        (dict(seq_lens=lens.long()), "seq_lens must be a contiguous int32"),
        (dict(seq_lens=lens[:1]), "seq_lens must be a contiguous int32"),
        (dict(seq_lens=torch.tensor([[5, 0], [32, 0]], dtype=torch.int32)[:, 0]), "stride"),
        (
            dict(out=torch.empty(2, 4, 1, 16, dtype=torch.float16)),
            r"out.dtype must equal q.dtype \(torch.float32\)",
        ),
        (dict(out=torch.empty(2, 4, 1, 32)[..., ::2]), "stride"),
        (dict(lse=torch.empty(2, 4, 1, dtype=torch.float64)), "lse must be torch.float32"),
        (dict(mask=mask.float()), "mask has dtype torch.float32"),
        (dict(mask=torch.ones(2, 4, 1, 32, dtype=torch.bool)), "broadcast strides"),
    ]
    for change, message in bad:
        args = dict(seq_lens=lens, mask=mask) | change
        seq = args.pop("seq_lens")
        with pytest.raises(kvdecode.KVDecodeError, match=message):
            the_plan.run(q, k, k, seq, **args)


def test_plan_run_writes_into_given_out_and_lse():
    q = torch.randn(1, 2, 1, 16)
    k = torch.randn(1, 1, 8, 16)
    lens = torch.tensor([3], dtype=torch.int32)
    the_plan = kvdecode.plan(kvdecode.DecodeProblem.from_tensors(q, k, k, lens), backend="reference")
    out = torch.full_like(q, float("nan"))
    lse = torch.full((1, 2, 1), float("nan"))
    got_out, got_lse = the_plan.run(q, k, k, lens, out=out, lse=lse)
    assert got_out is out and got_lse is lse
    ref, ref_lse = kvdecode.reference_decode_attention(q, k, k, lens)
    assert torch.allclose(out.double(), ref, atol=1e-6) and torch.allclose(lse.double(), ref_lse, atol=1e-6)


def test_tensor_scales_that_print_alike_get_their_own_problem():
    """The problem alias must not key a scale by its repr: 0-d tensors print 4 digits, so
    ``tensor(0.12341)`` and ``tensor(0.12344)`` once shared one problem (and the first one's scale)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 1, 16) * 4, torch.randn(1, 1, 32, 16), torch.randn(1, 1, 32, 16)
    lens = torch.tensor([20], dtype=torch.int32)
    for value in (0.12341, 0.12344):
        got = decode_attention(q, k, v, lens, scale=torch.tensor(value), backend="reference")
        want = decode_attention(q, k, v, lens, scale=value, backend="reference")
        torch.testing.assert_close(got, want)


def test_scale_too_large_for_a_float_raises_kvdecode_error():
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 32, 16)
    with pytest.raises(KVDecodeError, match="scale"):
        decode_attention(q, k, k, torch.tensor([5], dtype=torch.int32), scale=10**400, backend="reference")
