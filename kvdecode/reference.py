"""The float64 reference: the definition of what every backend must compute.

Shared by the tests, the benchmark and the demo. It reads device lengths with ``.tolist()`` (a host
sync) and is meant for checking, not for speed.
"""

from __future__ import annotations

import math

import torch

__all__ = ["reference_decode_attention", "relative_l2_error"]


def reference_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    kv_start: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Decode attention in float64 on the CPU.

    For row ``b``, query head ``h`` (KV head ``h // (H_q // H_kv)``) and query ``t`` at position
    ``p = seq_lens[b] - T_q + t``, the visible keys are ``j`` in ``[kv_start[b], p]`` (and where a bool
    mask is True)::

        s_j   = scale * <q[b, h, t], k[b, h_kv, j]> + additive_mask[b, h, t, j]
        lse   = log(sum_j exp(s_j))                 (natural log; -inf when nothing is visible)
        out   = sum_j exp(s_j - lse) * v[b, h_kv, j] (zeros when nothing is visible)

    Shapes: q ``[B, H_q, T_q, D]``, caches ``[B, H_kv, capacity, D]``, lengths ``[B]``; returns
    ``(out float64 [B, H_q, T_q, D], lse float64 [B, H_q, T_q])`` on the CPU.
    """
    batch, num_q_heads, q_len, head_dim = q.shape
    num_kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    qd = q.detach().to("cpu", torch.float64)
    kd = k_cache.detach().to("cpu", torch.float64).repeat_interleave(group, dim=1)
    vd = v_cache.detach().to("cpu", torch.float64).repeat_interleave(group, dim=1)
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
        query_pos = lens[b] - q_len + torch.arange(q_len)  # [T_q]
        visible = (pos[None, :] >= starts[b]) & (pos[None, :] <= query_pos[:, None])  # [T_q, cap]
        visible = visible[None].expand(num_q_heads, q_len, capacity)
        if full_mask is not None:
            if full_mask.dtype == torch.bool:
                visible = visible & full_mask[b]
            else:
                scores = scores + full_mask[b].to(torch.float64)
        scores = scores.masked_fill(~visible, -math.inf)
        row_lse = torch.logsumexp(scores, dim=-1)  # -inf where nothing is visible
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
