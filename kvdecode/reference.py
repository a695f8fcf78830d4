"""The float64 reference, and how close a backend must come to it: one truth for tests, bench, tuner and CLI.

- :func:`reference_decode_attention`: the definition of what every backend computes (float64, CPU). It
  reads device lengths with ``.tolist()`` (a host sync) and is meant for checking, not for speed.
- :func:`float32_reference_rows`: the same math in float32 on the tensors' device for a few rows, for
  problems too large to copy to the host (an fp32 answer is ~1e-6 from float64, far below any tolerance).
- :data:`TOLERANCES` (``dtype -> Tolerance``), :func:`tolerance_for`: the one tolerance table.
- :func:`assert_close_to_reference`, :func:`assert_lse_close`: the checks every caller uses;
  :func:`within_tolerance`, :func:`lse_error`: the same measures as numbers, for reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "LSE_TOLERANCE",
    "TOLERANCES",
    "Tolerance",
    "assert_close_to_reference",
    "assert_lse_close",
    "float32_reference_rows",
    "lse_error",
    "reference_decode_attention",
    "relative_l2_error",
    "tolerance_for",
    "within_tolerance",
]


def _dequantized(cache: torch.Tensor, scale: torch.Tensor | float | None) -> torch.Tensor:
    """``cache`` in float64 on the CPU, times ``scale`` (one value, or one per KV head) when given."""
    x = cache.detach().to("cpu", torch.float64)
    if scale is None:
        return x
    s = torch.as_tensor(scale, dtype=torch.float64).detach().cpu().reshape(-1)
    return x * (s.view(1, -1, 1, 1) if s.numel() > 1 else s.reshape(()))


def reference_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    kv_start: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    k_scale: torch.Tensor | float | None = None,
    v_scale: torch.Tensor | float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Decode attention in float64 on the CPU.

    Quantized (fp8) caches are dequantized first: ``k = k_cache * k_scale``, ``v = v_cache * v_scale``,
    each scale one value or one per KV head (``[H_kv]``).

    For row ``b``, query head ``h`` (KV head ``h // (H_q // H_kv)``) and query ``t`` at position
    ``p = seq_lens[b] - T_q + t``, the visible keys are ``j`` in ``[kv_start[b], p]``, within
    ``p - window + 1 .. p`` with a sliding ``window`` (and where a bool mask is True)::

        s_j   = cap(scale * <q[b, h, t], k[b, h_kv, j]>) + additive_mask[b, h, t, j]
        cap(x) = softcap * tanh(x / softcap)   (x itself without softcap)
        lse   = log(sum_j exp(s_j) + exp(sinks[h]))  (natural log; no sink term without sinks,
                                                    then -inf when nothing is visible)
        out   = sum_j exp(s_j - lse) * v[b, h_kv, j] (zeros when nothing is visible)

    ``sinks`` (``[H_q]``, gpt-oss's attention sinks) add a logit per query head to the softmax's
    denominator only: a sink takes a share of the attention and gives back no value.

    Shapes: q ``[B, H_q, T_q, D]``, caches ``[B, H_kv, capacity, D]``, lengths ``[B]``; returns
    ``(out float64 [B, H_q, T_q, D], lse float64 [B, H_q, T_q])`` on the CPU.
    """
    batch, num_q_heads, q_len, head_dim = q.shape
    num_kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    qd = q.detach().to("cpu", torch.float64)
    kd = _dequantized(k_cache, k_scale).repeat_interleave(group, dim=1)
    vd = _dequantized(v_cache, v_scale).repeat_interleave(group, dim=1)
    lens = seq_lens.detach().cpu().tolist()
    starts = kv_start.detach().cpu().tolist() if kv_start is not None else [0] * batch
    full_mask = None
    if mask is not None:
        full_mask = mask.detach().cpu().expand(batch, num_q_heads, q_len, capacity)
    out = torch.zeros(batch, num_q_heads, q_len, head_dim, dtype=torch.float64)
    lse = torch.full((batch, num_q_heads, q_len), -math.inf, dtype=torch.float64)
    pos = torch.arange(capacity)
    for b in range(batch):
        scores = torch.einsum("htd,hjd->htj", qd[b], kd[b]) * scale  # [H_q, T_q, capacity]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        query_pos = lens[b] - q_len + torch.arange(q_len)  # [T_q]
        visible = (pos[None, :] >= starts[b]) & (pos[None, :] <= query_pos[:, None])  # [T_q, cap]
        if window is not None:
            visible = visible & (pos[None, :] > query_pos[:, None] - window)
        visible = visible[None].expand(num_q_heads, q_len, capacity)
        if full_mask is not None:
            if full_mask.dtype == torch.bool:
                visible = visible & full_mask[b]
            else:
                scores = scores + full_mask[b].to(torch.float64)
        scores = scores.masked_fill(~visible, -math.inf)
        row_lse = torch.logsumexp(scores, dim=-1)  # -inf where nothing is visible
        if sinks is not None:
            row_lse = torch.logaddexp(row_lse, sinks.detach().to("cpu", torch.float64)[:, None])
        finite = torch.isfinite(row_lse)
        weights = torch.where(finite[..., None], torch.exp(scores - row_lse[..., None]), 0.0)
        weights = torch.nan_to_num(weights, nan=0.0)
        # slots no query of a head may see can hold anything (NaN in a torch.empty cache): never read them
        used = visible.any(dim=1)  # [H_q, capacity]
        values = torch.where(used[..., None], vd[b], 0.0)
        out[b] = torch.einsum("htj,hjd->htd", weights, values)
        lse[b] = row_lse
    return out, lse


def relative_l2_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (absolute norm when expected is all zeros)."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    num = torch.linalg.vector_norm(a - e).item()
    den = torch.linalg.vector_norm(e).item()
    return num / den if den > 0 else num


def float32_reference_rows(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_len: int, rows: list[int]
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D)) v`` in float32 on the tensors' device for batch rows ``rows``.

    Every row is filled to ``seq_len`` (keys ``0 .. seq_len - 1``), the T_q queries bottom-right aligned
    (query ``t`` sees keys up to ``seq_len - T_q + t``), GQA by head grouping, default scale, no mask.
    Returns float64 ``[len(rows), H_q, T_q, D]`` on the CPU. Only the rows are copied to the host.
    """
    num_q_heads, q_len, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    keys = torch.arange(seq_len, device=q.device)
    query_pos = torch.arange(q_len, device=q.device).repeat(group) + seq_len - q_len  # [G * T_q]
    hidden = keys[None, None, :] > query_pos[None, :, None]  # [1, G * T_q, L]
    outs = []
    for b in rows:
        qb = q[b].float().reshape(num_kv_heads, group * q_len, head_dim)  # head h -> kv head h // G
        kb, vb = k_cache[b, :, :seq_len].float(), v_cache[b, :, :seq_len].float()
        s = (qb @ kb.transpose(-1, -2)) / math.sqrt(head_dim)
        p = torch.softmax(s.masked_fill(hidden, -math.inf), dim=-1)
        outs.append((p @ vb).reshape(num_q_heads, q_len, head_dim).double().cpu())
    return torch.stack(outs)


# ---- tolerances ----


@dataclass(frozen=True)
class Tolerance:
    """How close a result must be to the float64 reference, for one input dtype.

    ``rel_l2``: the output's relative L2 error (:func:`relative_l2_error`), overall and per batch row.
    ``lse``: ``|lse - ref| / max(1, |ref|)`` for every finite LSE entry (:func:`lse_error`).
    """

    rel_l2: float
    lse: float


# The LSE is accumulated in float32 from the same (exactly representable) inputs as the reference, so only
# float32 rounding and the fast exp2/log2 separate them (<= 1.2e-6 seen on the H100, bench/gpu_smoke.py),
# whatever the input dtype: 1e-4 relative. An LSE error of e scales a merged output by exp(e), so the
# output tolerance would be far too loose for it. float32 inputs keep the stricter 1e-5 they were held to.
LSE_TOLERANCE = 1e-4
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.bfloat16: Tolerance(rel_l2=4e-3, lse=LSE_TOLERANCE),
    torch.float16: Tolerance(rel_l2=1e-3, lse=LSE_TOLERANCE),
    torch.float32: Tolerance(rel_l2=1e-5, lse=1e-5),
}


def tolerance_for(dtype: torch.dtype) -> Tolerance:
    """The :data:`TOLERANCES` entry of ``dtype``; ``ValueError`` naming the dtypes that have one."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        names = ", ".join(str(d).removeprefix("torch.") for d in TOLERANCES)
        raise ValueError(f"dtype must be one of {names} to have a tolerance, got {dtype}") from None


def within_tolerance(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float]:
    """``(ok, relative L2 error)``: ok when ``out`` is finite and within ``tolerance_for(dtype).rel_l2``.

    A non-finite ``out`` gives ``(False, inf)``. For reports; tests use :func:`assert_close_to_reference`.
    """
    got = out.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(got).all()):
        return False, math.inf
    err = relative_l2_error(got, ref)
    return err <= tolerance_for(dtype).rel_l2, err


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, where: str) -> None:
    """Raise ``AssertionError`` unless ``out`` is within ``tolerance_for(dtype).rel_l2`` of ``ref``.

    Checked overall and per batch row (one wrong row of a ragged batch must not hide behind the
    others); any NaN fails, and so does a non-finite reference (every comparison would pass). The
    message starts with ``where`` (name the problem and the seed there) and gives the worst row's
    error per head.
    """
    tol = tolerance_for(dtype).rel_l2
    got = out.detach().to("cpu", torch.float64)
    exp = ref.detach().to("cpu", torch.float64)
    if got.shape != exp.shape:
        raise AssertionError(f"{where}: shape {tuple(got.shape)} != reference {tuple(exp.shape)}")
    if not torch.isfinite(exp).all():
        raise AssertionError(
            f"{where}: the reference itself is not finite; the test is broken, not the kernel"
        )
    nan = torch.isnan(got)
    if nan.any():
        idx = nan.nonzero()[0].tolist()
        raise AssertionError(f"{where}: {int(nan.sum())} NaN in the output (first at [b, h, t, d] = {idx})")
    err = relative_l2_error(got, exp)
    row_errs = [relative_l2_error(got[b], exp[b]) for b in range(got.shape[0])]
    worst = max(range(len(row_errs)), key=row_errs.__getitem__)
    if err > tol or row_errs[worst] > tol:
        per_head = [relative_l2_error(got[worst, h], exp[worst, h]) for h in range(got.shape[1])]
        raise AssertionError(
            f"{where}: relative L2 error {err:.3e} (worst batch row {worst}: {row_errs[worst]:.3e}, "
            f"per head {[f'{e:.1e}' for e in per_head]}) > tolerance {tol:.0e} for {dtype}"
        )


def lse_error(lse: torch.Tensor, ref_lse: torch.Tensor) -> float:
    """``max |lse - ref| / max(1, |ref|)`` over the finite reference entries; ``inf`` when a NaN appears or
    ``-inf`` (nothing visible) stands anywhere but where the reference has it; 0.0 when nothing is finite."""
    got = lse.detach().to("cpu", torch.float64)
    exp = ref_lse.detach().to("cpu", torch.float64)
    empty = torch.isneginf(exp)
    if torch.isnan(got).any() or (torch.isneginf(got) != empty).any():
        return math.inf
    fin = ~empty
    diff = (got[fin] - exp[fin]).abs() / exp[fin].abs().clamp(min=1.0)
    return diff.max().item() if diff.numel() else 0.0


def assert_lse_close(lse: torch.Tensor, ref_lse: torch.Tensor, dtype: torch.dtype, where: str) -> None:
    """Raise ``AssertionError`` unless ``lse`` is float32 of the reference's shape, ``-inf`` exactly where
    the reference is, NaN-free, and within ``tolerance_for(dtype).lse`` (see :func:`lse_error`)."""
    tol = tolerance_for(dtype).lse
    if lse.dtype != torch.float32 or tuple(lse.shape) != tuple(ref_lse.shape):
        raise AssertionError(
            f"{where}: lse is {lse.dtype} {tuple(lse.shape)}, want float32 {tuple(ref_lse.shape)}"
        )
    got = lse.detach().to("cpu", torch.float64)
    exp = ref_lse.detach().to("cpu", torch.float64)
    if torch.isnan(got).any():
        raise AssertionError(f"{where}: NaN in lse at {torch.isnan(got).nonzero()[0].tolist()}")
    wrong_inf = torch.isneginf(got) != torch.isneginf(exp)
    if wrong_inf.any():
        idx = tuple(wrong_inf.nonzero()[0].tolist())
        raise AssertionError(
            f"{where}: lse at [b, h, t] = {list(idx)} is {got[idx].item()}, reference {exp[idx].item()}"
        )
    fin = torch.isfinite(exp)
    diff = torch.zeros_like(exp)
    diff[fin] = (got[fin] - exp[fin]).abs() / exp[fin].abs().clamp(min=1.0)
    if fin.any() and diff.max().item() > tol:
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{where}: lse at [b, h, t] = {list(idx)} is {got[idx].item():.6f}, reference "
            f"{exp[idx].item():.6f} (error {diff.max().item():.2e} > {tol:.0e})"
        )
