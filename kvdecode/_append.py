"""Append kernel of :class:`~kvdecode.StaticKVCache`: writes new K/V tokens at device-side positions.

One launch writes both K and V. Token ``t`` of row ``b`` goes to position
``seq_lens[b] - T_q + t`` (the cache advances its lengths first, so ``seq_lens`` already counts the
new tokens). A position outside ``[0, capacity)`` is not written: under CUDA-graph capture nothing can
be checked on the host, so an overflowing token is dropped rather than written out of bounds.

Shape legend::

    k_cache, v_cache  [B, H_kv, capacity, D]   any strides with unit stride on D
    k_new, v_new      [B, H_kv, T_q, D]        any strides
    seq_lens          int32 [B]                filled length, the T_q new tokens included
"""

from __future__ import annotations

import contextlib

# isort: off
# Imported first: on a machine without CUDA it sets TRITON_INTERPRET=1, which must precede `import triton`.
from . import triton_kernels  # noqa: F401

import torch
import triton
import triton.language as tl

from ._interpret import interpreter_active

# isort: on

__all__ = ["append_kv"]

_MAX_TILE = 2048  # elements of one [BLOCK_T, BLOCK_D] tile: small, the copy is memory bound


@triton.jit
def _append_kv_kernel(
    K_cache,
    stride_kcb,
    stride_kch,
    stride_kcs,
    V_cache,
    stride_vcb,
    stride_vch,
    stride_vcs,
    K_new,
    stride_knb,
    stride_knh,
    stride_knt,
    stride_knd,
    V_new,
    stride_vnb,
    stride_vnh,
    stride_vnt,
    stride_vnd,
    Seq_lens,
    q_len,
    capacity,
    head_dim,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """cache[b, h, seq_lens[b] - T_q + t, :] = new[b, h, t, :] for every t whose position is in range."""
    pid_t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    seq_len = tl.load(Seq_lens + b)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    pos = seq_len - q_len + t
    in_range = (t < q_len) & (pos >= 0) & (pos < capacity)
    m = in_range[:, None] & (d[None, :] < head_dim)
    t64 = t.to(tl.int64)[:, None]
    pos64 = pos.to(tl.int64)[:, None]
    d64 = d.to(tl.int64)[None, :]

    k = tl.load(K_new + b * stride_knb + h * stride_knh + t64 * stride_knt + d64 * stride_knd, mask=m)
    tl.store(K_cache + b * stride_kcb + h * stride_kch + pos64 * stride_kcs + d64, k, mask=m)
    v = tl.load(V_new + b * stride_vnb + h * stride_vnh + t64 * stride_vnt + d64 * stride_vnd, mask=m)
    tl.store(V_cache + b * stride_vcb + h * stride_vch + pos64 * stride_vcs + d64, v, mask=m)


def append_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    """Launch the append kernel; shapes, dtypes and devices must already be checked by the caller.

    Never syncs the host and never allocates, so it can be captured in a CUDA graph.
    """
    batch, num_kv_heads, q_len, head_dim = k_new.shape
    capacity = k_cache.shape[2]
    block_d = triton.next_power_of_2(head_dim)
    block_t = min(triton.next_power_of_2(q_len), max(1, _MAX_TILE // block_d))
    grid = (triton.cdiv(q_len, block_t), num_kv_heads, batch)
    with _on_device(k_cache.device):
        _append_kv_kernel[grid](
            k_cache,
            *k_cache.stride()[:3],
            v_cache,
            *v_cache.stride()[:3],
            k_new,
            *k_new.stride(),
            v_new,
            *v_new.stride(),
            seq_lens,
            q_len,
            capacity,
            head_dim,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            num_warps=1 if block_t * block_d <= 512 else 4,
        )


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current device (and its current stream): switch to ``device`` if needed."""
    if device.type != "cuda" or interpreter_active() or torch.cuda.current_device() == device.index:
        return contextlib.nullcontext()
    return torch.cuda.device(device)
