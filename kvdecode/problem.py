"""One decode-attention problem as data: built and validated once from the tensors.

Shape legend (logical BHSD; any strides with unit stride on D)::

    q        [B, H_q, T_q, D]
    k_cache  [B, H_kv, capacity, D]
    v_cache  [B, H_kv, capacity, D]
    seq_lens int32 [B]       filled length of each row, the T_q new tokens included
    kv_start int32 [B]       optional: keys before kv_start[b] are masked (left padding)
    mask     broadcastable to [B, H_q, T_q, capacity], bool (True = attend) or additive float
    out      [B, H_q, T_q, D], q's dtype
    lse      float32 [B, H_q, T_q], natural log
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import KVDecodeError
from .quant import FP8_DTYPES, FP8_Q_DTYPES, ScaleKind, check_kv_scales
from .timing import kv_bytes

__all__ = ["SUPPORTED_DTYPES", "DecodeProblem", "MaskKind", "capturing"]

MaskKind = Literal["none", "bool", "additive"]

SUPPORTED_DTYPES: dict[torch.dtype, str] = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
}
MAX_HEAD_DIM = 256
SINK_DTYPES = SUPPORTED_DTYPES  # attention sinks: any of them (read as float32 in the kernel)

Strides = tuple[int, int, int, int]


def shape_name_parts(
    batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int, q_len: int, capacity: int, dtype: str
) -> list[str]:
    """``["b8", "hq32", "hkv8", "d128", "tq1", "cap131072", "bf16"]``: the readable core of a name."""
    heads = [f"hq{num_q_heads}", f"hkv{num_kv_heads}"]
    return [f"b{batch}", *heads, f"d{head_dim}", f"tq{q_len}", f"cap{capacity}", dtype]


@dataclass(frozen=True)
class DecodeProblem:
    """Everything about a decode call that does not change from step to step.

    Lengths (``seq_lens``, ``kv_start``) are device values and deliberately not part of the problem:
    one problem serves every step while the cache fills.
    """

    batch: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    q_len: int
    capacity: int
    dtype: torch.dtype
    device: torch.device
    q_strides: Strides
    k_strides: Strides
    v_strides: Strides
    scale: float
    has_kv_start: bool = False
    mask_kind: MaskKind = "none"
    mask_dtype: torch.dtype | None = None
    mask_strides: Strides | None = None
    aligned_16: bool = True  # q, k_cache and v_cache start on 16-byte boundaries (cuDNN needs it)
    kv_dtype: torch.dtype | None = None  # the caches' dtype when it is not q's (fp8 K/V)
    kv_scale_kind: ScaleKind = "none"  # fp8 K/V: one k_scale / v_scale value, or one per KV head
    window: int | None = None  # sliding window: query at p sees keys p - window + 1 .. p (and kv_start..)
    softcap: float | None = None  # logit softcapping: scores pass through softcap * tanh(s / softcap)
    # sinks: a [H_q] logit per query head joins each softmax's denominator; their dtype (float32,
    # bfloat16 or float16: a model's own parameter, no cast per step) is compiled into the kernel
    sinks_dtype: torch.dtype | None = None

    def __hash__(self) -> int:
        """The fields' hash, computed once: a problem keys the plan cache and its routes on every call."""
        found = self.__dict__.get("_hash")
        if found is None:
            found = hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))
            object.__setattr__(self, "_hash", found)
        return found

    def __getstate__(self) -> dict:
        # str hashes differ between processes: a copy or an unpickled problem computes its own
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    @property
    def has_sinks(self) -> bool:
        """Attention sinks are given (of dtype :attr:`sinks_dtype`)."""
        return self.sinks_dtype is not None

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype of ``k_cache`` and ``v_cache`` (q's unless the caches are fp8)."""
        return self.kv_dtype if self.kv_dtype is not None else self.dtype

    @property
    def reach(self) -> int:
        """The most keys one row can read: the capacity, or with a window ``window + T_q - 1``."""
        if self.window is None:
            return self.capacity
        return min(self.capacity, self.window + self.q_len - 1)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 = MHA, H_q = MQA)."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def dtype_name(self) -> str:
        return SUPPORTED_DTYPES[self.dtype]

    @property
    def name(self) -> str:
        """A readable name for logs, cache files and test reproductions."""
        parts = shape_name_parts(
            self.batch, self.num_q_heads, self.num_kv_heads, self.head_dim, self.q_len, self.capacity,
            self.dtype_name,
        )  # fmt: skip
        if self.has_kv_start:
            parts.append("kvstart")
        if self.mask_kind != "none":
            parts.append(f"mask{self.mask_kind}")
        if self.kv_dtype is not None:
            parts.append(f"kv{FP8_DTYPES.get(self.kv_dtype, str(self.kv_dtype))}")
        if self.kv_scale_kind != "none":
            parts.append(f"scale{self.kv_scale_kind.replace('_', '')}")
        if self.window is not None:
            parts.append(f"win{self.window}")
        if self.softcap is not None:
            parts.append(f"softcap{self.softcap:g}")
        if self.has_sinks:
            parts.append(
                "sinks" + ("" if self.sinks_dtype == torch.float32 else SINK_DTYPES[self.sinks_dtype])
            )
        return "_".join(parts)

    def kv_bytes(self, seq_len: int) -> int:
        """Bytes of K and V a decode of ``seq_len`` filled tokens per row must read."""
        return kv_bytes(self.batch, self.num_kv_heads, seq_len, self.head_dim, self.cache_dtype)

    @classmethod
    def from_tensors(
        cls,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        seq_lens: torch.Tensor,
        *,
        scale: float | None = None,
        kv_start: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
        window: int | None = None,
        softcap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> DecodeProblem:
        """Validate the tensors of one call and describe them.

        Parameters
        ----------
        q : Tensor ``[B, H_q, T_q, D]``
        k_cache, v_cache : Tensor ``[B, H_kv, capacity, D]``
        seq_lens : int32 Tensor ``[B]`` on q's device
        scale : float, optional
            Defaults to ``1 / sqrt(D)``.
        kv_start : int32 Tensor ``[B]``, optional
        mask : Tensor broadcastable to ``[B, H_q, T_q, capacity]``, optional
        out : Tensor ``[B, H_q, T_q, D]``, optional
        window : int, optional
            Sliding window: query ``t`` (at position ``p = seq_lens[b] - T_q + t``) sees keys
            ``max(kv_start[b], p - window + 1) .. p``; ``window >= 1``.
        softcap : float, optional
            Logit softcapping (Gemma 2): the scaled scores ``s`` become ``softcap * tanh(s / softcap)``
            before the (additive) mask and the softmax; ``softcap > 0``.
        sinks : Tensor ``[H_q]``, optional
            Attention sinks (gpt-oss): one logit per query head added to each softmax's denominator;
            float32, bfloat16 or float16 (a plan is made for one of them).

        Returns
        -------
        DecodeProblem
            Shapes, dtype, device, strides, scale and mask kind; never the lengths' values.

        Raises
        ------
        KVDecodeError
            Naming the argument, the value and the fix; nothing has been launched.

        Examples
        --------
        >>> import torch
        >>> q = torch.randn(8, 32, 1, 128); k = torch.randn(8, 8, 4096, 128)
        >>> DecodeProblem.from_tensors(q, k, k, torch.full((8,), 100, dtype=torch.int32)).name
        'b8_hq32_hkv8_d128_tq1_cap4096_fp32'
        """
        _check_tensor("q", q)
        _check_tensor("k_cache", k_cache)
        _check_tensor("v_cache", v_cache)
        _check_rank("q", q, "[B, H_q, T_q, D]")
        _check_rank("k_cache", k_cache, "[B, H_kv, capacity, D]")
        _check_rank("v_cache", v_cache, "[B, H_kv, capacity, D]")
        device = q.device
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            check_device(name, t, device)
        _check_dtype(q, k_cache, v_cache)
        batch, num_q_heads, q_len, head_dim = q.shape
        _check_shapes(q, k_cache, v_cache)
        num_kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
        if q_len < 1:
            raise KVDecodeError(f"q.shape[2] (T_q) must be >= 1, got {q_len}; pass at least one query token")
        if batch < 1 or num_q_heads < 1:
            raise KVDecodeError(
                f"q must have B >= 1 and H_q >= 1, got shape {tuple(q.shape)}; pass a non-empty query"
            )
        if capacity < q_len:
            raise KVDecodeError(
                f"k_cache capacity (k_cache.shape[2] = {capacity}) must be >= T_q ({q_len}); "
                "the T_q new tokens must fit in the cache"
            )
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
            _check_unit_last_stride(name, t)
        _check_lengths("seq_lens", seq_lens, batch, device)
        if kv_start is not None:
            _check_lengths("kv_start", kv_start, batch, device)
        mask_kind, mask_dtype, mask_strides = _check_mask(mask, (batch, num_q_heads, q_len, capacity), device)
        scale_kind = check_kv_scales(k_scale, v_scale, k_cache.dtype, num_kv_heads, device)
        if out is not None:
            check_out(out, tuple(q.shape), q.dtype, q.device)
        check_window(window)
        softcap = check_softcap(softcap)
        if sinks is not None:
            check_sinks(sinks, num_q_heads, device)
        return cls(
            batch=batch,
            num_q_heads=num_q_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            q_len=q_len,
            capacity=capacity,
            dtype=q.dtype,
            device=device,
            q_strides=tuple(q.stride()),
            k_strides=tuple(k_cache.stride()),
            v_strides=tuple(v_cache.stride()),
            scale=_check_scale(scale, head_dim),
            has_kv_start=kv_start is not None,
            mask_kind=mask_kind,
            mask_dtype=mask_dtype,
            mask_strides=mask_strides,
            aligned_16=all(t.data_ptr() % 16 == 0 for t in (q, k_cache, v_cache)),
            kv_dtype=None if k_cache.dtype == q.dtype else k_cache.dtype,
            kv_scale_kind=scale_kind,
            window=window,
            softcap=softcap,
            sinks_dtype=None if sinks is None else sinks.dtype,
        )


# ---- _check_* helpers: each raises KVDecodeError("<arg> must be <rule>, got <value>; <fix>") ----


def _check_tensor(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise KVDecodeError(f"{name} must be a torch.Tensor, got {type(t).__name__}; pass a tensor")


def _check_rank(name: str, t: torch.Tensor, legend: str) -> None:
    if t.dim() != 4:
        raise KVDecodeError(
            f"{name} must be 4-D {legend}, got {t.dim()}-D with shape {tuple(t.shape)}; "
            "a BSHD buffer is passed as buf.transpose(1, 2)"
        )


def check_device(name: str, t: torch.Tensor, device: torch.device, anchor: str = "q") -> None:
    """``t`` on ``device`` (``anchor``'s device), else a :class:`KVDecodeError` naming ``name``."""
    if t.device != device:
        raise KVDecodeError(
            f"{name} must be on {anchor}'s device ({device}), got {t.device}; "
            f"move it with .to({str(device)!r})"
        )


def _check_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dtype not in SUPPORTED_DTYPES:
        raise KVDecodeError(
            f"q.dtype must be one of float16, bfloat16, float32, got {q.dtype}; cast the inputs"
        )
    if k.dtype in FP8_DTYPES:
        if q.dtype not in FP8_Q_DTYPES:
            raise KVDecodeError(f"q.dtype must be float16 or bfloat16 with fp8 caches, got {q.dtype}; cast q")
        if v.dtype != k.dtype:
            raise KVDecodeError(
                f"v_cache.dtype must equal k_cache.dtype ({k.dtype}), got {v.dtype}; store K and V alike"
            )
        return
    for name, t in (("k_cache", k), ("v_cache", v)):
        if t.dtype != q.dtype:
            raise KVDecodeError(
                f"{name}.dtype must equal q.dtype ({q.dtype}) or be float8_e4m3fn / float8_e5m2, got "
                f"{t.dtype}; cast q or the cache"
            )


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    batch, num_q_heads, _, head_dim = q.shape
    if tuple(k.shape) != tuple(v.shape):
        raise KVDecodeError(
            f"v_cache.shape must equal k_cache.shape {tuple(k.shape)}, got {tuple(v.shape)}; "
            "K and V caches must have the same layout"
        )
    if k.shape[0] != batch:
        raise KVDecodeError(
            f"k_cache.shape[0] (B) must equal q.shape[0] ({batch}), got {k.shape[0]}; "
            "one cache row per query row"
        )
    if k.shape[3] != head_dim:
        raise KVDecodeError(
            f"k_cache.shape[3] (D) must equal q.shape[3] ({head_dim}), got {k.shape[3]}; check the head dims"
        )
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise KVDecodeError(
            f"head_dim (q.shape[3]) must be in 1..{MAX_HEAD_DIM}, got {head_dim}; "
            "larger heads are not supported"
        )
    num_kv_heads = k.shape[1]
    if num_kv_heads < 1 or num_q_heads % num_kv_heads != 0:
        raise KVDecodeError(
            f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads}); "
            "check the head dimension (dim 1) of q and the caches"
        )


def _check_unit_last_stride(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise KVDecodeError(
            f"{name}.stride(-1) must be 1 (D contiguous), got {t.stride(-1)}; pass {name}.contiguous() "
            "or a view whose last dimension is contiguous"
        )


def _check_lengths(name: str, t: object, batch: int, device: torch.device) -> None:
    _check_tensor(name, t)
    assert isinstance(t, torch.Tensor)
    if t.dtype != torch.int32:
        raise KVDecodeError(f"{name}.dtype must be torch.int32, got {t.dtype}; pass {name}.to(torch.int32)")
    if tuple(t.shape) != (batch,):
        raise KVDecodeError(
            f"{name}.shape must be ({batch},) (one per row), got {tuple(t.shape)}; "
            "pass one length per batch row"
        )
    if t.device != device:
        raise KVDecodeError(
            f"{name} must be on q's device ({device}), got {t.device}; lengths are read on the device"
        )
    if batch > 1 and t.stride(0) != 1:
        raise KVDecodeError(
            f"{name}.stride(0) must be 1 (the kernels read lengths[b]), got {t.stride(0)}; "
            f"pass {name}.contiguous()"
        )


def _check_mask(
    mask: torch.Tensor | None, full: tuple[int, int, int, int], device: torch.device
) -> tuple[MaskKind, torch.dtype | None, Strides | None]:
    if mask is None:
        return "none", None, None
    _check_tensor("mask", mask)
    if mask.dtype == torch.bool:
        kind: MaskKind = "bool"
    elif mask.dtype in SUPPORTED_DTYPES:
        kind = "additive"
    else:
        raise KVDecodeError(
            "mask.dtype must be bool (True = attend) or float16/bfloat16/float32 (added to the scores), "
            f"got {mask.dtype}; cast the mask"
        )
    if mask.device != device:
        raise KVDecodeError(
            f"mask must be on q's device ({device}), got {mask.device}; move it with .to({str(device)!r})"
        )
    if mask.dim() > 4:
        raise KVDecodeError(
            f"mask must have at most 4 dims, got shape {tuple(mask.shape)}; "
            "it broadcasts to [B, H_q, T_q, capacity]"
        )
    try:
        expanded = mask.expand(full)
    except RuntimeError:
        raise KVDecodeError(
            f"mask.shape {tuple(mask.shape)} must broadcast to [B, H_q, T_q, capacity] = {list(full)}; "
            "its last dimension spans the whole cache capacity"
        ) from None
    return kind, mask.dtype, tuple(expanded.stride())


def check_out(out: object, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    """``out`` must have q's ``shape``, ``dtype`` and ``device``, with unit stride on D (the one check of
    ``out``: :func:`kvdecode.decode_attention`, ``from_tensors`` and ``DecodePlan.run`` all use it)."""
    _check_tensor("out", out)
    assert isinstance(out, torch.Tensor)
    if tuple(out.shape) != tuple(shape):
        raise KVDecodeError(
            f"out.shape must equal q.shape {tuple(shape)}, got {tuple(out.shape)}; pass torch.empty_like(q)"
        )
    if out.dtype != dtype:
        raise KVDecodeError(
            f"out.dtype must equal q.dtype ({dtype}), got {out.dtype}; pass torch.empty_like(q)"
        )
    if out.device != device:
        raise KVDecodeError(
            f"out must be on q's device ({device}), got {out.device}; pass torch.empty_like(q)"
        )
    _check_unit_last_stride("out", out)


def check_window(window: object) -> None:
    """``window`` must be None or an int >= 1 (a sliding window: the keys a query sees, itself included)."""
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window < 2**31:
        raise KVDecodeError(
            f"window must be None or an int in 1..2**31-1 (keys a query sees, itself included), "
            f"got {window!r}; pass the model's sliding window, e.g. 4096"
        )


def check_softcap(softcap: object) -> float | None:
    """``softcap`` must be None or a positive finite number; returned as a float."""
    if softcap is None:
        return None
    ok = isinstance(softcap, (int, float)) and not isinstance(softcap, bool) and math.isfinite(softcap)
    if not ok or softcap <= 0:
        raise KVDecodeError(
            f"softcap must be None or a positive finite float, got {softcap!r}; pass the model's "
            "attention logit softcap, e.g. 50.0"
        )
    return float(softcap)


def check_sinks(
    sinks: object, num_q_heads: int, device: torch.device, planned: torch.dtype | None = None
) -> None:
    """``sinks`` must be a contiguous float32, bfloat16 or float16 ``[H_q]`` tensor on q's device (of
    the ``planned`` dtype when a plan was made for one)."""
    _check_tensor("sinks", sinks)
    assert isinstance(sinks, torch.Tensor)
    if sinks.dtype not in SINK_DTYPES or tuple(sinks.shape) != (num_q_heads,) or sinks.device != device:
        raise KVDecodeError(
            f"sinks must be a float32, bfloat16 or float16 ({num_q_heads},) tensor (one logit per query "
            f"head) on {device}, got {sinks.dtype} {tuple(sinks.shape)} on {sinks.device}; "
            f"pass sinks.to({str(device)!r}, torch.float32)"
        )
    if planned is not None and sinks.dtype != planned:
        raise KVDecodeError(
            f"sinks must be {planned} as planned (the kernel reads that dtype), got {sinks.dtype}; pass "
            f"sinks.to({planned}) or plan for {sinks.dtype} sinks"
        )
    if num_q_heads > 1 and sinks.stride(0) != 1:
        raise KVDecodeError(f"sinks.stride(0) must be 1, got {sinks.stride(0)}; pass sinks.contiguous()")


def _check_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    try:
        value = float(scale)
    except (TypeError, ValueError, OverflowError):
        raise KVDecodeError(
            f"scale must be a positive finite float, got {scale!r}; leave it None for 1/sqrt(D)"
        ) from None
    if not math.isfinite(value) or value <= 0.0:
        raise KVDecodeError(
            f"scale must be a positive finite float, got {scale!r}; leave it None for 1/sqrt(D)"
        )
    return value


def capturing(device: torch.device) -> bool:
    """Whether ``device``'s current stream is capturing a CUDA graph (False off CUDA)."""
    if device.type != "cuda":
        return False
    index = device.index
    if index is None or not torch.cuda.is_available() or torch.cuda.current_device() == index:
        return torch.cuda.is_current_stream_capturing()
    with torch.cuda.device(index):
        return torch.cuda.is_current_stream_capturing()
