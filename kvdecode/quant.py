"""fp8 K/V caches: the dtypes, their ranges, the scale checks and the quantizing cast.

A quantized cache stores ``k8 = saturate(k / k_scale)`` in ``float8_e4m3fn`` or ``float8_e5m2``; the real
keys are ``k8 * k_scale`` (``k_scale`` one float32 value or one per KV head), likewise for values.
"""

from __future__ import annotations

from typing import Literal

import torch

from .errors import KVDecodeError

__all__ = [
    "FP8_DTYPES",
    "FP8_MAX",
    "FP8_Q_DTYPES",
    "ScaleKind",
    "cache_scales",
    "check_kv_scales",
    "dequantize",
    "quantize",
    "quantize_fp8",
]

FP8_DTYPES: dict[torch.dtype, str] = {
    torch.float8_e4m3fn: "fp8e4m3",
    torch.float8_e5m2: "fp8e5m2",
}
FP8_MAX: dict[torch.dtype, float] = {  # the largest finite magnitudes: saturation bounds
    torch.float8_e4m3fn: 448.0,
    torch.float8_e5m2: 57344.0,
}
FP8_Q_DTYPES = (torch.float16, torch.bfloat16)  # query (and output) dtypes served with fp8 caches
ScaleKind = Literal["none", "scalar", "per_head"]


def check_kv_scales(
    k_scale: object, v_scale: object, cache_dtype: torch.dtype, num_kv_heads: int, device: torch.device
) -> ScaleKind:
    """``k_scale`` / ``v_scale``: both or neither, fp8 caches only, float32 on q's device, one value
    (shape ``()`` or ``(1,)``) or one per KV head (``(H_kv,)``), contiguous; returns their kind."""
    if k_scale is None and v_scale is None:
        return "none"
    if cache_dtype not in FP8_DTYPES:
        raise KVDecodeError(
            f"k_scale and v_scale must be None for {cache_dtype} caches, got a scale; they dequantize "
            "fp8 caches (float8_e4m3fn / float8_e5m2)"
        )
    kinds = []
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if t is None:
            raise KVDecodeError(f"{name} must be given with the other scale, got None; pass both or neither")
        if not isinstance(t, torch.Tensor):
            raise KVDecodeError(f"{name} must be a torch.Tensor, got {type(t).__name__}; pass a tensor")
        if t.dtype != torch.float32 or t.device != device or not t.is_contiguous():
            raise KVDecodeError(
                f"{name} must be a contiguous float32 tensor on {device}, got {t.dtype} on {t.device}; "
                f"pass {name}.to({str(device)!r}, torch.float32).contiguous()"
            )
        if t.numel() == 1 and t.dim() <= 1:
            kinds.append("scalar")
        elif tuple(t.shape) == (num_kv_heads,):
            kinds.append("per_head")
        else:
            raise KVDecodeError(
                f"{name}.shape must be () or (1,) (one scale) or ({num_kv_heads},) (one per KV head), got "
                f"{tuple(t.shape)}"
            )
    if kinds[0] != kinds[1]:
        raise KVDecodeError(
            f"k_scale and v_scale must be of one kind, got {kinds[0]} and {kinds[1]}; reshape one of them"
        )
    return kinds[0]


def cache_scales(
    dtype: torch.dtype, k_scale: object, v_scale: object, num_kv_heads: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """A ``StaticKVCache``'s scales: ``(None, None)`` for a cache that is not fp8 (scales refused), else
    float32 device tensors, one value (a float, default 1.0) or one per KV head (a tensor ``[H_kv]``)."""
    if dtype not in FP8_DTYPES:
        if k_scale is not None or v_scale is not None:
            raise KVDecodeError(
                f"k_scale and v_scale must be None for a {dtype} cache, got a scale; they are for fp8 caches"
            )
        return None, None
    made = []
    for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
        value = 1.0 if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
            raise KVDecodeError(f"{name} must be a float or a float32 tensor, got {type(value).__name__}")
        t = torch.as_tensor(value, dtype=torch.float32).to(device).reshape(-1).contiguous()
        if t.numel() not in (1, num_kv_heads):
            raise KVDecodeError(
                f"{name} must hold 1 or {num_kv_heads} (one per KV head) values, got {t.numel()}"
            )
        if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
            raise KVDecodeError(f"{name} must be positive and finite, got {t.tolist()}")
        made.append(t if t.numel() == num_kv_heads and num_kv_heads > 1 else t.reshape(()))
    k, v = made
    if k.dim() != v.dim():
        raise KVDecodeError("k_scale and v_scale must be of one kind (both one value or both per KV head)")
    return k, v


def quantize_fp8(
    x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, *, per_head: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a K or V cache ``[B, H_kv, S, D]`` to fp8 with amax scales; returns ``(x8, scale)``.

    ``scale = amax / FP8_MAX[dtype]`` (float32, shape ``(H_kv,)`` with ``per_head``, else ``()``) maps
    the largest magnitude to the largest finite fp8 value, and ``x8 = saturate(x / scale)``; pass
    ``scale`` as ``k_scale`` / ``v_scale``. An all-zero head gets scale 1.

    Examples
    --------
    >>> k8, k_scale = quantize_fp8(torch.randn(1, 2, 16, 8))
    >>> k8.dtype, tuple(k_scale.shape)
    (torch.float8_e4m3fn, (2,))
    """
    if dtype not in FP8_DTYPES:
        raise KVDecodeError(f"dtype must be one of {list(FP8_DTYPES)}, got {dtype}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        what = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise KVDecodeError(f"x must be a floating [B, H_kv, S, D] tensor, got {what}")
    dims = (0, 2, 3) if per_head else (0, 1, 2, 3)
    amax = x.detach().abs().float().amax(dim=dims)
    scale = torch.where(amax > 0, amax / FP8_MAX[dtype], torch.ones_like(amax)).to(torch.float32)
    return quantize(x, scale, dtype), scale.contiguous()


def _per_head(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` (one value, or ``[H_kv]``) shaped to broadcast over ``[B, H_kv, S, D]``."""
    return scale.view(1, -1, 1, 1) if scale.dim() == 1 else scale


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``saturate(x / scale)`` in the fp8 ``dtype``; ``x [B, H_kv, S, D]``, ``scale`` one value or [H_kv]."""
    top = FP8_MAX[dtype]
    return (x.float() / _per_head(scale)).clamp(-top, top).to(dtype)


def dequantize(x8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x8 * scale`` in ``dtype``: the values an fp8 cache stands for (the inverse of :func:`quantize`)."""
    return (x8.float() * _per_head(scale)).to(dtype)
