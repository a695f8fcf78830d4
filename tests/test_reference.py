"""The float64 reference against an independent computation: torch SDPA on the exact slice.

For each row ``b`` and query ``t`` the visible keys are the slice ``kv_start[b] .. seq_lens[b] - T_q + t``
(its last ``window`` keys with a sliding window; README.md, "The call"). SDPA sees only that slice, one
query at a time (so bottom-right causality is checked by construction, not by a mask), with GQA expanded
by ``repeat_interleave``; its LSE is ``logsumexp`` of the same float64 scores.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from strategies import Case, cases, make_inputs

from kvdecode import decode_attention, reference_decode_attention
from kvdecode.reference import (
    TOLERANCES,
    assert_close_to_reference,
    assert_lse_close,
    float32_reference_rows,
    lse_error,
    relative_l2_error,
    tolerance_for,
    within_tolerance,
)

TOL = 1e-12  # float64 against float64: only summation order differs
# Two float64 computations of one value agree to round-off, not bit for bit: BLAS picks its kernel (and so
# its summation order) by shape and alignment, which differ between a T_q = 8 call and a T_q = 1 slice of it.
ROUNDOFF = dict(rtol=TOL, atol=TOL)


def sdpa_exact_slice(case: Case, q, k, v, seq_lens, kv_start, mask, sinks=None):
    """Per (row, query) SDPA on the exact visible slice; returns (out, lse) float64, NaN-free."""
    b_, hq, tq, d = q.shape
    group = hq // k.shape[1]
    scale = case.scale if case.scale is not None else 1 / math.sqrt(d)
    full_mask = None if mask is None else mask.cpu().expand(b_, hq, tq, k.shape[2])
    out = torch.zeros(b_, hq, tq, d, dtype=torch.float64)
    lse = torch.full((b_, hq, tq), -math.inf, dtype=torch.float64)
    for b in range(b_):
        start = 0 if kv_start is None else int(kv_start[b])
        for t in range(tq):
            stop = int(seq_lens[b]) - tq + t + 1  # query t sits at seq_len - T_q + t and sees itself
            lo = start if case.window is None else max(start, stop - case.window)
            if stop <= lo:
                if sinks is not None:  # nothing visible: the sink takes all, the output stays zero
                    lse[b, :, t] = sinks.double().cpu()
                continue
            qs = q[b, :, t : t + 1].double()  # [H_q, 1, D]
            ks = k[b, :, lo:stop].double().repeat_interleave(group, dim=0)  # [H_q, n, D]
            vs = v[b, :, lo:stop].double().repeat_interleave(group, dim=0)
            scores = (qs @ ks.transpose(-1, -2)) * scale  # [H_q, 1, n]
            if case.softcap is not None:
                scores = case.softcap * torch.tanh(scores / case.softcap)
            attn = None
            if full_mask is not None:
                attn = full_mask[b, :, t : t + 1, lo:stop]
                if attn.dtype != torch.bool:
                    attn = attn.double()
                    scores = scores + attn
                else:
                    scores = scores.masked_fill(~attn, -math.inf)
            row_lse = torch.logsumexp(scores, dim=-1)[:, 0]  # [H_q]
            if sinks is not None:  # SDPA has no sink: each query's softmax over [scores, sink], written out
                sink = sinks.double().cpu()
                row_lse = torch.logaddexp(row_lse, sink)
                o = (torch.exp(scores - row_lse[:, None, None]) @ vs)[:, 0]
            elif case.softcap is None:
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=attn, scale=scale)[:, 0]
            else:  # SDPA has no softcap: the softmax of the capped (and masked) scores, written out
                o = (torch.softmax(scores, dim=-1) @ vs)[:, 0]
            seen = torch.isfinite(torch.logsumexp(scores, dim=-1)[:, 0])  # some key visible
            out[b, :, t] = torch.where(seen[:, None], o, 0.0)  # SDPA gives NaN where nothing is visible
            lse[b, :, t] = row_lse
    return out, lse


@given(case=cases("cpu"))
def test_reference_matches_sdpa_on_exact_slice(case):
    x = make_inputs(case, "cpu")
    out, lse = reference_decode_attention(x.q, x.k, x.v, x.seq_lens, **x.kwargs())
    exp_out, exp_lse = sdpa_exact_slice(case, x.q, x.k, x.v, x.seq_lens, x.kv_start, x.mask, x.sinks)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), case.repro()
    err = relative_l2_error(out, exp_out)
    assert err <= TOL, f"{case.name} seed={case.seed}: {err:.2e}\n{case.repro()}"
    assert torch.equal(torch.isneginf(lse), torch.isneginf(exp_lse)), case.repro()
    fin = torch.isfinite(exp_lse)
    torch.testing.assert_close(lse[fin], exp_lse[fin], rtol=1e-12, atol=1e-12, msg=case.repro)


def _one_row(tq, cap, d=8, hq=2, hkv=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, tq, d, generator=g, dtype=torch.float64)
    k = torch.randn(1, hkv, cap, d, generator=g, dtype=torch.float64)
    v = torch.randn(1, hkv, cap, d, generator=g, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("tq", [2, 3, 8])
def test_bottom_right_causal(tq):
    """Query t of a row with L filled tokens sees exactly keys 0..L-T_q+t: changing key L-T_q+t+1
    changes only later queries, and each query equals a T_q = 1 decode at length L-T_q+t+1."""
    cap, n = 16, 11
    q, k, v = _one_row(tq, cap)
    lens = torch.tensor([n], dtype=torch.int32)
    out, lse = reference_decode_attention(q.float(), k.float(), v.float(), lens)
    for t in range(tq):
        lens_t = torch.tensor([n - tq + t + 1], dtype=torch.int32)
        o1, l1 = reference_decode_attention(q[:, :, t : t + 1].float(), k.float(), v.float(), lens_t)
        torch.testing.assert_close(out[:, :, t : t + 1], o1, **ROUNDOFF)
        torch.testing.assert_close(lse[:, :, t : t + 1], l1, **ROUNDOFF)
    # Top-left alignment (the classic mistake) would let query 0 see only key 0.
    k2 = k.clone()
    k2[:, :, n - tq + 1 :] = 100.0  # keys only later queries (and nobody at >= n) may see
    out2, _ = reference_decode_attention(q.float(), k2.float(), v.float(), lens)
    # the same computation (same shapes) on keys query 0 may not see: bit for bit the same
    torch.testing.assert_close(out2[:, :, 0], out[:, :, 0], rtol=0, atol=0)
    assert not torch.allclose(out2[:, :, 1], out[:, :, 1])


def test_keys_outside_the_visible_range_do_not_matter():
    q, k, v = _one_row(1, 32)
    lens = torch.tensor([20], dtype=torch.int32)
    start = torch.tensor([5], dtype=torch.int32)
    out, lse = reference_decode_attention(q.float(), k.float(), v.float(), lens, kv_start=start)
    k2, v2 = k.clone(), v.clone()
    for t in (k2, v2):
        t[:, :, :5] = 1e6
        t[:, :, 20:] = -1e6
    out2, lse2 = reference_decode_attention(q.float(), k2.float(), v2.float(), lens, kv_start=start)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)  # the same computation: bit for bit


@pytest.mark.parametrize(
    ("tq", "lens", "starts"),
    [(1, [0], None), (3, [2], None), (1, [4], [4]), (2, [6], [6])],
)
def test_empty_visible_range_gives_zeros_and_neg_inf(tq, lens, starts):
    q, k, v = _one_row(tq, 8)
    kv_start = None if starts is None else torch.tensor(starts, dtype=torch.int32)
    out, lse = reference_decode_attention(q, k, v, torch.tensor(lens, dtype=torch.int32), kv_start=kv_start)
    exp_out, exp_lse = sdpa_exact_slice(
        Case(1, 2, 1, 8, tq, 8, torch.float32, tuple(lens)), q, k, v, lens, starts, None
    )
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(exp_lse))
    assert torch.isneginf(lse[..., 0]).all()  # the first query sees nothing in every case here
    assert (out[..., 0, :] == 0).all()
    torch.testing.assert_close(out, exp_out, rtol=1e-12, atol=1e-12)


def test_all_false_bool_mask_and_all_neg_inf_additive_mask_give_zeros():
    q, k, v = _one_row(2, 8, hq=3, hkv=3)
    lens = torch.tensor([8], dtype=torch.int32)
    bool_mask = torch.ones(1, 3, 2, 8, dtype=torch.bool)
    bool_mask[0, 1] = False  # head 1 sees nothing
    add_mask = torch.zeros(1, 3, 2, 8)
    add_mask[0, 2, 1] = -math.inf  # head 2, query 1 sees nothing
    for mask, (h, t) in ((bool_mask, (1, slice(None))), (add_mask, (2, 1))):
        out, lse = reference_decode_attention(q, k, v, lens, mask=mask)
        assert not torch.isnan(out).any()
        assert (out[0, h, t] == 0).all() and torch.isneginf(lse[0, h, t]).all()
        assert torch.isfinite(lse[0, 0]).all() and (out[0, 0] != 0).any()


def test_masks_match_sdpa_attn_mask_over_the_full_capacity():
    """With every row full and T_q = 1, the reference equals SDPA over the whole cache with the mask."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 1, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 24, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 24, 16, generator=g, dtype=torch.float64)
    lens = torch.tensor([24, 24], dtype=torch.int32)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    bool_mask = torch.rand(2, 1, 1, 24, generator=g) < 0.6
    bool_mask[..., 0] = True
    add_mask = torch.randn(4, 1, 24, generator=g, dtype=torch.float64)
    for mask in (bool_mask, add_mask):
        out, _ = reference_decode_attention(q, k, v, lens, mask=mask)
        exp = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
        torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-12)


def test_default_scale_and_gqa_head_mapping():
    """Query head h reads KV head h // (H_q // H_kv) (repeat_interleave, not repeat)."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 6, 1, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64)
    out, _ = reference_decode_attention(q, k, v, torch.tensor([5], dtype=torch.int32))
    for h in range(6):
        exp = F.scaled_dot_product_attention(
            q[:, h : h + 1], k[:, h // 3 : h // 3 + 1], v[:, h // 3 : h // 3 + 1]
        )
        torch.testing.assert_close(out[:, h : h + 1], exp, rtol=1e-12, atol=1e-12)


@given(case=cases("cpu"))
def test_reference_backend_through_the_public_call(case):
    """decode_attention(backend="reference") writes out= in place and returns the reference in q's dtype."""
    x = make_inputs(case, "cpu")
    ref, ref_lse = reference_decode_attention(x.q, x.k, x.v, x.seq_lens, **x.kwargs())
    got, lse = decode_attention(
        x.q, x.k, x.v, x.seq_lens, backend="reference", out=x.out, return_lse=True, **x.kwargs()
    )
    assert got is x.out
    assert torch.equal(got, ref.to(case.dtype)), case.repro()
    assert lse.dtype == torch.float32 and torch.equal(lse, ref_lse.float()), case.repro()


# ---- the one tolerance table and its checks (kvdecode.reference) ----


def test_tolerance_table_is_pinned():
    """Output rel L2 per dtype (issue 2) and the LSE's float32-accumulation bound; never loosened silently."""
    got = {dt: (t.rel_l2, t.lse) for dt, t in TOLERANCES.items()}
    assert got == {torch.bfloat16: (4e-3, 1e-4), torch.float16: (1e-3, 1e-4), torch.float32: (1e-5, 1e-5)}
    assert tolerance_for(torch.float16) is TOLERANCES[torch.float16]
    with pytest.raises(ValueError, match="float64"):
        tolerance_for(torch.float64)


def _perturbed(ref: torch.Tensor, rel: float, row: int | None = None, seed: int = 0) -> torch.Tensor:
    """``ref`` plus noise of relative L2 size ``rel`` (of the whole tensor, or of batch row ``row``)."""
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if row is not None:
        noise[torch.arange(ref.shape[0]) != row] = 0
        return ref + noise * (rel * ref[row].norm() / noise.norm())
    return ref + noise * (rel * ref.norm() / noise.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_assert_close_to_reference_passes_inside_and_fails_outside_the_tolerance(dtype):
    ref = torch.randn(4, 3, 2, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tol = TOLERANCES[dtype].rel_l2
    assert_close_to_reference(_perturbed(ref, 0.5 * tol), ref, dtype, "inside")
    with pytest.raises(AssertionError, match=r"^outside: relative L2 error .* > tolerance"):
        assert_close_to_reference(_perturbed(ref, 2 * tol), ref, dtype, "outside")
    # one bad row of eight: the overall error stays inside, the per-row check catches it
    ref8 = torch.randn(8, 3, 1, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    one_bad = _perturbed(ref8, 2 * tol, row=5)
    assert relative_l2_error(one_bad, ref8) <= tol
    with pytest.raises(AssertionError, match="worst batch row 5"):
        assert_close_to_reference(one_bad, ref8, dtype, "row")
    assert within_tolerance(_perturbed(ref, 0.5 * tol), ref, dtype)[0]
    ok, err = within_tolerance(_perturbed(ref, 2 * tol), ref, dtype)
    assert not ok and err == pytest.approx(2 * tol)


def test_assert_close_to_reference_refuses_nan_shapes_and_a_broken_reference():
    ref = torch.randn(2, 2, 1, 4, dtype=torch.float64)
    bad = ref.clone()
    bad[1, 0, 0, 3] = math.nan
    with pytest.raises(AssertionError, match=r"1 NaN in the output \(first at .* = \[1, 0, 0, 3\]"):
        assert_close_to_reference(bad, ref, torch.float32, "nan")
    assert within_tolerance(bad, ref, torch.float32) == (False, math.inf)
    with pytest.raises(AssertionError, match="reference itself is not finite"):
        assert_close_to_reference(ref, bad, torch.float32, "ref")
    with pytest.raises(AssertionError, match="shape"):
        assert_close_to_reference(ref[:1], ref, torch.float32, "shape")


def test_lse_check_uses_the_lse_tolerance_and_the_empty_rows():
    ref = torch.tensor([[[0.5, 12.0, -math.inf]]], dtype=torch.float64)
    assert lse_error(ref.float(), ref) == 0.0
    near = ref.clone()
    near[0, 0, 1] += 5e-5 * 12.0  # 5e-5 relative: inside bf16's 1e-4, outside float32's 1e-5
    assert lse_error(near.float(), ref) == pytest.approx(5e-5, rel=1e-2)
    assert_lse_close(near.float(), ref, torch.bfloat16, "bf16")
    with pytest.raises(AssertionError, match=r"lse at \[b, h, t\] = \[0, 0, 1\] .* > 1e-05"):
        assert_lse_close(near.float(), ref, torch.float32, "fp32")
    small = ref.clone()
    small[0, 0, 0] += 2e-4  # |ref| < 1: judged against 1, not against 0.5
    with pytest.raises(AssertionError, match=r"\[0, 0, 0\]"):
        assert_lse_close(small.float(), ref, torch.bfloat16, "small")
    finite = ref.clone()
    finite[0, 0, 2] = 3.0  # something where nothing is visible
    assert lse_error(finite.float(), ref) == math.inf
    with pytest.raises(AssertionError, match="reference -inf"):
        assert_lse_close(finite.float(), ref, torch.bfloat16, "inf")
    with pytest.raises(AssertionError, match="want float32"):
        assert_lse_close(ref, ref, torch.bfloat16, "dtype")


@pytest.mark.parametrize(("q_len", "num_kv_heads"), [(1, 2), (3, 2), (4, 1), (2, 4)])
def test_float32_reference_rows_match_the_float64_reference(q_len, num_kv_heads):
    g = torch.Generator().manual_seed(q_len)
    batch, cap, length = 3, 40, 29
    q = torch.randn(batch, 4, q_len, 16, generator=g)
    k, v = (torch.randn(batch, num_kv_heads, cap, 16, generator=g) for _ in range(2))
    k[:, :, length:] = math.nan  # unfilled slots are never read
    ref, _ = reference_decode_attention(q, k, v, torch.full((batch,), length, dtype=torch.int32))
    rows = float32_reference_rows(q, k, v, length, [0, 2])
    assert rows.dtype == torch.float64 and rows.shape == (2, 4, q_len, 16)
    assert relative_l2_error(rows, ref[[0, 2]]) <= 1e-6
