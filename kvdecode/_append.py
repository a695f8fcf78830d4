"""Append kernel of :class:`~kvdecode.StaticKVCache`: writes new K/V tokens at device-side positions.

One launch writes both K and V. Token ``t`` of row ``b`` goes to position
``seq_lens[b] - T_q + t`` (the cache advances its lengths first, so ``seq_lens`` already counts the
new tokens). A position outside ``[0, capacity)`` is not written: under CUDA-graph capture nothing can
be checked on the host, so an overflowing token is dropped rather than written out of bounds.

Shape legend::

    k_cache, v_cache  [B, H_kv, capacity, D]   any strides with unit stride on D
    k_new, v_new      [B, H_kv, T_q, D]        any strides
    seq_lens          int32 or int64 [B]       filled length, the T_q new tokens included; or one
                                               value (0-d or [1]) for every row
"""

from __future__ import annotations

# isort: off
# Imported first: on a machine without CUDA it sets TRITON_INTERPRET=1, which must precede `import triton`.
from . import triton_kernels  # noqa: F401

import torch
import triton
import triton.language as tl

from ._interpret import interpreter_active, on_device

# isort: on

from .quant import FP8_MAX
from .triton_kernels.bound import bound_kernel, int_class

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
    stride_sl,  # 0: one length for every row
    KScale,  # float32 [1] or [H_kv]; used when QUANT
    VScale,
    q_len,
    capacity,
    head_dim,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr,  # fp8 cache: store saturate(new / scale) in the cache's dtype
    PER_HEAD: tl.constexpr,  # one scale per KV head (else one for all)
    QMAX: tl.constexpr,  # the fp8 dtype's largest finite magnitude
    INTERP_FP8: tl.constexpr,  # Triton's interpreter: round to the fp8 grid in fp32 before the cast
    MANT_BITS: tl.constexpr,  # fp8 mantissa bits (3 for e4m3, 2 for e5m2)
    MIN_NORMAL_LOG2: tl.constexpr,  # log2 of the smallest normal fp8 value (-6 for e4m3, -14 for e5m2)
):
    """cache[b, h, seq_lens[b] - T_q + t, :] = new[b, h, t, :] for every t whose position is in range
    (quantized to fp8 as ``clamp(new / scale, -QMAX, QMAX)`` with ``QUANT``)."""
    pid_t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    seq_len = tl.load(Seq_lens + b * stride_sl)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    pos = seq_len - q_len + t
    in_range = (t < q_len) & (pos >= 0) & (pos < capacity)
    m = in_range[:, None] & (d[None, :] < head_dim)
    t64 = t.to(tl.int64)[:, None]
    pos64 = pos.to(tl.int64)[:, None]
    d64 = d.to(tl.int64)[None, :]

    k = tl.load(K_new + b * stride_knb + h * stride_knh + t64 * stride_knt + d64 * stride_knd, mask=m)
    v = tl.load(V_new + b * stride_vnb + h * stride_vnh + t64 * stride_vnt + d64 * stride_vnd, mask=m)
    if QUANT:
        head = h if PER_HEAD else 0
        k = _saturate(k.to(tl.float32) / tl.load(KScale + head), QMAX)
        v = _saturate(v.to(tl.float32) / tl.load(VScale + head), QMAX)
        if INTERP_FP8:  # the interpreter's fp32 -> fp8 cast is wrong near powers of two: cast exact values
            k = _round_to_fp8(k, MANT_BITS, MIN_NORMAL_LOG2)
            v = _round_to_fp8(v, MANT_BITS, MIN_NORMAL_LOG2)
        k = k.to(K_cache.dtype.element_ty)
        v = v.to(V_cache.dtype.element_ty)
    tl.store(K_cache + b * stride_kcb + h * stride_kch + pos64 * stride_kcs + d64, k, mask=m)
    tl.store(V_cache + b * stride_vcb + h * stride_vch + pos64 * stride_vcs + d64, v, mask=m)


@triton.jit
def _saturate(x, QMAX: tl.constexpr):
    return tl.minimum(tl.maximum(x, -QMAX), QMAX)


@triton.jit
def _round_to_fp8(x, MANT_BITS: tl.constexpr, MIN_NORMAL_LOG2: tl.constexpr):
    """``x`` (fp32, within the fp8 range) rounded to the nearest fp8 value, ties to even, still in fp32.

    Seen 2026-12-01: Triton 3.9's interpreter casts fp32 -> fp8 without carrying a rounded-up mantissa
    into the exponent (31.5 -> 16 instead of 32). Normal values round on their bits (the integer add
    carries into the exponent); subnormal ones, whose spacing is ``2^(MIN_NORMAL_LOG2 - MANT_BITS)``,
    round with the float32 magic-number trick. The cast that follows is then exact.
    """
    drop: tl.constexpr = 23 - MANT_BITS
    bits = x.to(tl.uint32, bitcast=True)
    half: tl.constexpr = (1 << (drop - 1)) - 1
    keep: tl.constexpr = 0xFFFFFFFF - ((1 << drop) - 1)  # clears the dropped mantissa bits
    bits = (bits + half + ((bits >> drop) & 1)) & keep
    normal = bits.to(tl.float32, bitcast=True)
    step = tl.exp2((MIN_NORMAL_LOG2 - MANT_BITS) * 1.0)
    magic = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds to an integer, ties to even
    tiny = ((tl.abs(x) / step + magic) - magic) * step
    subnormal = tl.where(x < 0, -tiny, tiny)  # keeps the sign of a value that rounds to zero
    return tl.where(tl.abs(x) < tl.exp2(MIN_NORMAL_LOG2 * 1.0), subnormal, normal)


def append_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    seq_lens: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Launch the append kernel; shapes, dtypes and devices must already be checked by the caller.

    ``scales`` = ``(k_scale, v_scale)`` (float32, one value or one per KV head) for an fp8 cache: the new
    K/V (fp16/bf16/fp32) are divided by them, saturated to the fp8 range and stored as fp8.

    Never syncs the host and never allocates, so it can be captured in a CUDA graph.
    """
    batch, num_kv_heads, q_len, head_dim = k_new.shape
    capacity = k_cache.shape[2]
    block_d = triton.next_power_of_2(head_dim)
    block_t = min(triton.next_power_of_2(q_len), max(1, _MAX_TILE // block_d))
    grid = (triton.cdiv(q_len, block_t), num_kv_heads, batch)
    quant = scales is not None
    k_scale, v_scale = scales if quant else (seq_lens, seq_lens)  # (never read without QUANT)
    tensors = (k_cache, v_cache, k_new, v_new, seq_lens, k_scale, v_scale)
    ptrs = [t.data_ptr() for t in tensors]
    ints = (
        *k_cache.stride()[:3], *v_cache.stride()[:3], *k_new.stride(), *v_new.stride(),
        0 if seq_lens.numel() == 1 else seq_lens.stride(0), q_len, capacity, head_dim,
    )  # fmt: skip
    consts = (
        block_t, block_d, quant, quant and k_scale.numel() > 1, FP8_MAX.get(k_cache.dtype, 0.0),
        quant and interpreter_active(), 3 if k_cache.dtype == torch.float8_e4m3fn else 2,
        -6 if k_cache.dtype == torch.float8_e4m3fn else -14,
    )  # fmt: skip
    # Triton specializes on the pointers' dtypes and 16-byte alignment, on each integer's class (1, its
    # width, a multiple of 16) and on the constants: launches equal in all of them share one kernel
    spec = (*[t.dtype for t in tensors], *[p % 16 == 0 for p in ptrs], *map(int_class, ints), *consts)
    with on_device(k_cache.device):
        warps = 1 if block_t * block_d <= 512 else 4
        bound_kernel(_append_kv_kernel, "append_kv_kernel", k_cache.device, num_warps=warps)(
            grid, _args(ptrs, ints, consts), spec, lambda: _args(tensors, ints, consts)
        )


def _args(t, ints, consts) -> list:
    """The kernel's arguments: ``t`` the tensors (or their pointers) k_cache, v_cache, k_new, v_new,
    seq_lens, k_scale, v_scale."""
    return [t[0], *ints[0:3], t[1], *ints[3:6], t[2], *ints[6:10], t[3], *ints[10:14], t[4], ints[14],
            t[5], t[6], *ints[15:], *consts]  # fmt: skip
