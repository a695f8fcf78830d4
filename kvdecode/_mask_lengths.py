"""Device-side lengths of a decode step from its mask, in one kernel (``torch.ops.kvdecode.mask_lengths``).

A transformers decode step hands kvdecode a bool mask and no lengths; the kernel needs, per row, a
length whose bottom-right causal range covers every key the mask lets a query see, and the first such
key (left padding). Written with torch ops that is about eleven small kernels per mask and step
(aranges, wheres, reductions, casts); this is one launch, which matters where a step is host-bound
(eager) or made of many tiny graph nodes (a captured step at batch 1).

Shape legend::

    mask      bool [B, 1, T_q, capacity]   True = attend; any strides (a view of a marked mask)
    seq_lens  int32 [B]   max over queries t and attended keys j of (j + 1 + T_q - 1 - t),
                          clamped to T_q..capacity (T_q for a row that attends nothing)
    kv_start  int32 [B]   the row's first attended key (any query); capacity when there is none

Query ``t`` of a row then sits at ``seq_lens - T_q + t``, at or after every key it attends, so the
kernel's causal range covers the mask's and the mask decides exactly. One program per row scans the
row's ``T_q x capacity`` bools in ``[BLOCK_T, BLOCK_N]`` tiles.
"""

from __future__ import annotations

# isort: off
# Imported first: on a machine without CUDA it sets TRITON_INTERPRET=1, which must precede `import triton`.
from . import triton_kernels  # noqa: F401

import torch
import triton
import triton.language as tl

from ._interpret import on_device

# isort: on

__all__ = ["mask_lengths_torch", "mask_lengths_triton"]

_TILE = 8192  # bools per [BLOCK_T, BLOCK_N] tile (8 KiB: 32 bytes per thread at 8 warps)


@triton.jit
def _mask_lengths_kernel(
    Mask,
    stride_mb,
    stride_mt,
    stride_mn,  # [B, T_q, capacity] (the head axis of [B, 1, T_q, capacity] dropped)
    SeqLens,  # int32 [B]
    KvStart,  # int32 [B]
    capacity,
    T_Q: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    t_ok = offs_t < T_Q
    behind = T_Q - 1 - offs_t  # query t sits this many tokens before the newest
    rows = Mask + b * stride_mb + offs_t.to(tl.int64)[:, None] * stride_mt
    filled = tl.zeros([BLOCK_T], dtype=tl.int32)  # per query: its last attended key + 1 + behind
    first = tl.full([BLOCK_T], capacity, dtype=tl.int32)
    for start in range(0, capacity, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        ok = t_ok[:, None] & (offs_n < capacity)[None, :]
        seen = tl.load(rows + offs_n.to(tl.int64)[None, :] * stride_mn, mask=ok, other=0) != 0
        filled = tl.maximum(filled, tl.max(tl.where(seen, offs_n[None, :] + 1 + behind[:, None], 0), axis=1))
        first = tl.minimum(first, tl.min(tl.where(seen, offs_n[None, :], capacity), axis=1))
    seq_len = tl.minimum(tl.maximum(tl.max(filled, axis=0), T_Q), capacity)
    tl.store(SeqLens + b, seq_len)
    tl.store(KvStart + b, tl.min(first, axis=0))


def mask_lengths_triton(
    mask: torch.Tensor, q_len: int, *, tile: int = _TILE
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(seq_lens, kv_start)`` of a bool ``[B, 1, q_len, capacity]`` mask in one launch (no host sync).

    The caller checks the mask (bool, 4-D, ``q_len`` rows); ``tile`` (bools per tile, a power of two)
    exists for tests, which want several tiles per row on small masks.
    """
    batch, _, rows, capacity = mask.shape
    seq_lens = torch.empty(batch, dtype=torch.int32, device=mask.device)
    kv_start = torch.empty(batch, dtype=torch.int32, device=mask.device)
    if batch == 0:
        return seq_lens, kv_start
    block_t = triton.next_power_of_2(rows)
    block_n = max(16, tile // block_t)
    with on_device(mask.device):
        _mask_lengths_kernel[(batch,)](
            mask,
            mask.stride(0),
            mask.stride(2),
            mask.stride(3),
            seq_lens,
            kv_start,
            capacity,
            T_Q=q_len,
            BLOCK_T=block_t,
            BLOCK_N=block_n,
            num_warps=8 if block_t * block_n >= 4096 else 4,
        )
    return seq_lens, kv_start


def mask_lengths_torch(mask: torch.Tensor, q_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as :func:`mask_lengths_triton` with torch ops (CPU tensors, and the reference)."""
    rows = mask[:, 0]  # [B, q_len, capacity]
    capacity = rows.shape[-1]
    if rows.numel() == 0:  # no rows, or no keys: nothing attended anywhere
        batch = rows.shape[0]
        seq = torch.full((batch,), min(q_len, capacity), dtype=torch.int32, device=mask.device)
        return seq, torch.full((batch,), capacity, dtype=torch.int32, device=mask.device)
    ends = torch.arange(1, capacity + 1, device=mask.device, dtype=torch.int32)
    last = torch.where(rows, ends, 0).amax(dim=-1)  # [B, q_len]: one past each query's last key, or 0
    behind = torch.arange(rows.shape[-2] - 1, -1, -1, device=mask.device, dtype=torch.int32)
    seq_lens = (last + behind).amax(dim=-1).clamp(min=q_len, max=capacity).to(torch.int32)
    kv_start = torch.where(rows, ends - 1, capacity).amin(dim=-1).amin(dim=-1).to(torch.int32)
    return seq_lens, kv_start
