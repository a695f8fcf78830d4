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
kernel's causal range covers the mask's and the mask decides exactly. One program per row (and per
64 KiB chunk of a longer row, merged by a second, tiny kernel) scans the row's ``T_q x capacity`` bools
in ``[BLOCK_T, BLOCK_N]`` tiles.
"""

from __future__ import annotations

# isort: off
# Imported first: on a machine without CUDA it sets TRITON_INTERPRET=1, which must precede `import triton`.
from . import triton_kernels  # noqa: F401

import torch
import triton
import triton.language as tl

from ._interpret import on_device
from .triton_kernels.bound import bound_kernel, int_class

# isort: on

__all__ = ["mask_lengths_torch", "mask_lengths_triton"]

_TILE = 8192  # bools per [BLOCK_T, BLOCK_N] tile (8 KiB: 32 bytes per thread at 8 warps)
_CHUNK = 65536  # bools one program scans (8 tiles); a longer row is cut into chunks, merged by a 2nd kernel
_MAX_CHUNKS = 1024  # the merge reads a row's chunks in one block: longer rows get longer chunks


@triton.jit
def _mask_lengths_kernel(
    Mask,
    stride_mb,
    stride_mt,
    stride_mn,  # [B, T_q, capacity] (the head axis of [B, 1, T_q, capacity] dropped)
    SeqLens,  # int32 [B], or [B, num_chunks] partials (the last attended key + 1 + behind, or 0)
    KvStart,  # int32 [B], or [B, num_chunks] partials (the first attended key, or capacity)
    capacity,
    cols,  # keys per chunk (a multiple of BLOCK_N); the chunk is program_id(1)
    num_chunks,
    T_Q: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE: tl.constexpr,  # one chunk per row: write the lengths themselves
):
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    t_ok = offs_t < T_Q
    behind = T_Q - 1 - offs_t  # query t sits this many tokens before the newest
    rows = Mask + b * stride_mb + offs_t.to(tl.int64)[:, None] * stride_mt
    filled = tl.zeros([BLOCK_T], dtype=tl.int32)  # per query: its last attended key + 1 + behind
    first = tl.full([BLOCK_T], capacity, dtype=tl.int32)
    lo = chunk * cols
    hi = tl.minimum(lo + cols, capacity)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        ok = t_ok[:, None] & (offs_n < hi)[None, :]
        seen = tl.load(rows + offs_n.to(tl.int64)[None, :] * stride_mn, mask=ok, other=0) != 0
        filled = tl.maximum(filled, tl.max(tl.where(seen, offs_n[None, :] + 1 + behind[:, None], 0), axis=1))
        first = tl.minimum(first, tl.min(tl.where(seen, offs_n[None, :], capacity), axis=1))
    if SINGLE:
        tl.store(SeqLens + b, tl.minimum(tl.maximum(tl.max(filled, axis=0), T_Q), capacity))
        tl.store(KvStart + b, tl.min(first, axis=0))
    else:
        tl.store(SeqLens + b * num_chunks + chunk, tl.max(filled, axis=0))
        tl.store(KvStart + b * num_chunks + chunk, tl.min(first, axis=0))


@triton.jit
def _mask_lengths_merge(
    Filled,  # int32 [B, num_chunks]
    First,  # int32 [B, num_chunks]
    SeqLens,  # int32 [B]
    KvStart,  # int32 [B]
    capacity,
    num_chunks,
    T_Q: tl.constexpr,
    CHUNKS_P2: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, CHUNKS_P2)
    ok = offs < num_chunks
    filled = tl.max(tl.load(Filled + b * num_chunks + offs, mask=ok, other=0), axis=0)
    first = tl.min(tl.load(First + b * num_chunks + offs, mask=ok, other=capacity), axis=0)
    tl.store(SeqLens + b, tl.minimum(tl.maximum(filled, T_Q), capacity))
    tl.store(KvStart + b, first)


def mask_lengths_triton(
    mask: torch.Tensor, q_len: int, *, tile: int = _TILE, chunk: int = _CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(seq_lens, kv_start)`` of a bool ``[B, 1, q_len, capacity]`` mask on the device (no host sync).

    One launch while a row's ``q_len x capacity`` bools fit one program's ``chunk`` (8 tiles): up to a
    64k cache at one query, 4k at sixteen. A longer row is cut into chunks scanned in parallel, and a
    second, tiny kernel merges them (one program scanning a 128k row of 16 queries would take ~128
    dependent tile loads). The caller checks the mask (:func:`kvdecode.ops.check_mask_for_lengths`);
    ``tile`` and ``chunk`` (bools, powers of two) are for tests, which want several tiles and chunks on
    small masks.
    """
    batch, _, rows, capacity = mask.shape
    seq_lens = torch.empty(batch, dtype=torch.int32, device=mask.device)
    kv_start = torch.empty(batch, dtype=torch.int32, device=mask.device)
    if batch == 0:
        return seq_lens, kv_start
    block_t = triton.next_power_of_2(rows)
    block_n = max(16, tile // block_t)
    cols = max(block_n, chunk // block_t // block_n * block_n)  # keys per chunk, whole tiles
    num_chunks = max(1, triton.cdiv(capacity, cols))
    if num_chunks > _MAX_CHUNKS:
        cols = triton.cdiv(triton.cdiv(capacity, _MAX_CHUNKS), block_n) * block_n
        num_chunks = triton.cdiv(capacity, cols)
    single = num_chunks == 1
    if single:
        filled, first = seq_lens, kv_start
    else:
        partials = torch.empty(2, batch, num_chunks, dtype=torch.int32, device=mask.device)
        filled, first = partials[0], partials[1]
    scan_ints = (mask.stride(0), mask.stride(2), mask.stride(3), capacity, cols, num_chunks)
    scan_consts = (q_len, block_t, block_n, single)
    ptrs = [t.data_ptr() for t in (mask, filled, first, seq_lens, kv_start)]
    aligned = tuple(p % 16 == 0 for p in ptrs)  # (first is partials[1]: its alignment follows B)
    warps = 8 if block_t * block_n >= 4096 else 4
    scan = bound_kernel(_mask_lengths_kernel, "mask_lengths_kernel", mask.device, num_warps=warps)
    with on_device(mask.device):
        scan(
            (batch, num_chunks, 1),
            [ptrs[0], *scan_ints[:3], ptrs[1], ptrs[2], *scan_ints[3:], *scan_consts],
            (*aligned[:3], *map(int_class, scan_ints), *scan_consts),
            lambda: [mask, *scan_ints[:3], filled, first, *scan_ints[3:], *scan_consts],
        )
        if not single:
            tail = [capacity, num_chunks, q_len, triton.next_power_of_2(num_chunks)]
            warps = 1 if num_chunks <= 128 else 4
            merge = bound_kernel(_mask_lengths_merge, "mask_lengths_merge", mask.device, num_warps=warps)
            merge(
                (batch, 1, 1),
                [*ptrs[1:], *tail],
                (*aligned[1:], *map(int_class, tail[:2]), *tail[2:]),
                lambda: [filled, first, seq_lens, kv_start, *tail],
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
