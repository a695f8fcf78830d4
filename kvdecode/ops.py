"""``torch.ops.kvdecode.decode_attention``: decode attention as a torch.library op.

``torch.compile`` cannot trace into :func:`kvdecode.decode_attention` (host-side planning, Triton
launches, cuDNN graphs): dynamo would break the graph there. Wrapped as a custom op with ``out`` as its
only mutated argument and a fake (meta) implementation, a decode step compiles with no graph break
inside attention, and ``mode="reduce-overhead"`` captures it into a CUDA graph: the op's real
implementation runs once per shape while CUDA graphs are recorded, plans are looked up by the problem
(never by the lengths' values), and the lengths stay on the device.

The ops are registered with ``torch.library.Library`` (schema, one ``CompositeExplicitAutograd``
kernel, a fake), not ``torch.library.custom_op``: the latter adds Python autograd and ADInplaceOrView
layers that rebuilt the schema's argument list twice per call, ~85 of the ~175 µs an eager decode call
took on a 2-core CPU host (launches stubbed), every layer of every eager step. Registered this way a
call costs a C++ dispatch (~5 µs there) and everything that sees ops still sees this one (compile,
``torch.jit.trace``, fake and meta tensors, dispatch modes, the profiler). The kernels bump the version
counter of what they write (``out``, the caches), as an in-place torch op would.

The op returns nothing; it writes ``out``::

    torch.ops.kvdecode.decode_attention(q, k_cache, v_cache, seq_lens, kv_start, mask, out,
                                         scale, max_seq_len, k_scale=None, v_scale=None,
                                         window=None, softcap=None, sinks=None)

Shapes (the public contract of :func:`kvdecode.decode_attention`)::

    q         [B, H_q, T_q, D]
    k_cache   [B, H_kv, capacity, D]   v_cache the same
    seq_lens  int32 [B]                 filled length per row, the T_q new tokens included
    kv_start  int32 [B] or None         keys before kv_start[b] are masked (left padding)
    mask      None, or bool / float broadcastable to [B, H_q, T_q, capacity]
    out       [B, H_q, T_q, D]          written in place
    scale     float                     > 0 (pass 1/sqrt(D) for the default)
    max_seq_len int or None             an upper bound of seq_lens (T_q..capacity)
    k_scale, v_scale  Tensor? ()/[H_kv] fp8 caches' dequantization scales
    window    int or None               sliding window (keys a query sees)
    softcap   float or None             logit softcap (> 0)
    sinks     [H_q] or None             attention sinks (a logit per query head in the denominator;
                                        float32, bfloat16 or float16)

:func:`decode_attention_op` is the Python wrapper (optional arguments, an ``out`` allocated when not
given); :func:`kvdecode.sdpa` and :mod:`kvdecode.hf` call it. The module's other ops: ``kvdecode::sdpa``
(:func:`kvdecode.sdpa` as one op), ``kvdecode::append_kv`` (the append kernel, for
``kvdecode.hf.FP8StaticCache``) and ``kvdecode::mask_lengths`` (a decode step's lengths from its mask,
for :func:`kvdecode.hf.lengths_from_mask`).
"""

from __future__ import annotations

import math

import torch

from .api import decode_attention as _decode_attention
from .errors import KVDecodeError
from .problem import check_device, check_softcap, check_window

__all__ = [
    "APPEND_OP_NAME",
    "MASK_LENGTHS_OP_NAME",
    "OP_NAME",
    "SDPA_OP_NAME",
    "check_mask_for_lengths",
    "decode_attention_op",
]

# The library the ops below are defined in (it must live as long as they do).
_LIB = torch.library.Library("kvdecode", "DEF")


def _define(name: str, schema: str, impl, fake) -> None:
    """``torch.ops.kvdecode.<name>``: the schema, ``impl`` for every device, ``fake`` for tracing."""
    _LIB.define(name + schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"kvdecode::{name}", fake, lib=_LIB)


OP_NAME = "kvdecode::decode_attention"

_SCHEMA = (
    "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, Tensor? kv_start, Tensor? mask, "
    "Tensor(a!) out, float scale, int? max_seq_len, Tensor? k_scale=None, Tensor? v_scale=None, "
    "int? window=None, float? softcap=None, Tensor? sinks=None) -> ()"
)


def _decode_attention_impl(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_start: torch.Tensor | None,
    mask: torch.Tensor | None,
    out: torch.Tensor,
    scale: float,
    max_seq_len: int | None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> None:
    _decode_attention(
        q,
        k_cache,
        v_cache,
        seq_lens,
        scale=scale,
        kv_start=kv_start,
        mask=mask,
        out=out,
        max_seq_len=max_seq_len,
        k_scale=k_scale,
        v_scale=v_scale,
        window=window,
        softcap=softcap,
        sinks=sinks,
    )
    torch.autograd.graph.increment_version(out)  # written by a kernel: autograd sees the write


def _decode_attention_fake(
    q, k_cache, v_cache, seq_lens, kv_start, mask, out, scale, max_seq_len, k_scale=None, v_scale=None,
    window=None, softcap=None, sinks=None,
) -> None:  # fmt: skip
    # Shapes only (fake tensors have no data): the real call validates everything else.
    if tuple(out.shape) != tuple(q.shape):
        raise KVDecodeError(
            f"out.shape must equal q.shape {tuple(q.shape)}, got {tuple(out.shape)}; pass torch.empty_like(q)"
        )
    return None


_define("decode_attention", _SCHEMA, _decode_attention_impl, _decode_attention_fake)


def decode_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    kv_start: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    max_seq_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    r""":func:`kvdecode.decode_attention` through ``torch.ops.kvdecode.decode_attention``.

    Same contract and results as :func:`kvdecode.decode_attention` with ``backend="auto"``, but
    traceable: ``torch.compile`` records one op (no graph break) and CUDA graphs capture its launches.
    ``out[b, h, t] = softmax_j(scale * q[b, h, t] . k[b, h // G, j] + mask) @ v[b, h // G, j]`` over
    ``kv_start[b] <= j <= seq_lens[b] - T_q + t``, ``G = H_q // H_kv``.

    Parameters
    ----------
    q : Tensor ``[B, H_q, T_q, D]``
        Queries; float16, bfloat16 or float32, unit stride on D.
    k_cache, v_cache : Tensor ``[B, H_kv, capacity, D]``
        Fixed-capacity caches in logical BHSD (any strides with unit stride on D).
    seq_lens : int32 Tensor ``[B]`` on q's device
        Filled length per row, the T_q new tokens included.
    scale : float, optional
        Defaults to ``1 / sqrt(D)``.
    kv_start : int32 Tensor ``[B]``, optional
        First visible key per row (left padding).
    mask : Tensor, optional
        Bool (True = attend) or float (added), broadcastable to ``[B, H_q, T_q, capacity]``.
    out : Tensor ``[B, H_q, T_q, D]``, optional
        Written in place (any strides with unit stride on D) and returned; allocated when omitted.
    max_seq_len : int, optional
        Upper bound of ``seq_lens``; pass it (the capacity will do) so that ``auto`` never reads the
        lengths on the host.
    k_scale, v_scale : float32 Tensor ``()`` or ``[H_kv]``, optional
        Dequantization scales of fp8 caches (see :func:`kvdecode.decode_attention`).
    window, softcap, sinks : optional
        Sliding window, logit softcap and attention sinks (see :func:`kvdecode.decode_attention`).

    Returns
    -------
    Tensor ``[B, H_q, T_q, D]``: ``out``.

    Raises
    ------
    KVDecodeError
        Bad input, naming the argument, the value and the fix.

    Examples
    --------
    >>> import torch
    >>> from kvdecode.ops import decode_attention_op
    >>> q = torch.randn(1, 4, 1, 16); k = torch.randn(1, 2, 32, 16)
    >>> decode_attention_op(q, k, k, torch.tensor([5], dtype=torch.int32), max_seq_len=32).shape
    torch.Size([1, 4, 1, 16])
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise KVDecodeError(f"q must be a 4-D tensor [B, H_q, T_q, D], got {shape}; pass q as BHSD")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if isinstance(max_seq_len, bool) or not (max_seq_len is None or isinstance(max_seq_len, int)):
        raise KVDecodeError(f"max_seq_len must be an int or None, got {max_seq_len!r}")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    # checked here, before the schema's int / float conversions would turn a bad value into a TypeError
    check_window(window)
    softcap = check_softcap(softcap)
    args = (q, k_cache, v_cache, seq_lens, kv_start, mask, out, float(scale), max_seq_len, k_scale, v_scale,
            window, softcap, sinks)  # fmt: skip
    torch.ops.kvdecode.decode_attention(*args)
    return out


# ---- kvdecode::sdpa: kvdecode.sdpa as one op, so torch.compile traces a call through it ----------------

SDPA_OP_NAME = "kvdecode::sdpa"
_SDPA_SCHEMA = (
    "(Tensor query, Tensor key, Tensor value, bool is_causal, float? scale, bool enable_gqa, str backend) "
    "-> Tensor"
)


def _sdpa_impl(query, key, value, is_causal, scale, enable_gqa, backend) -> torch.Tensor:
    # Runs eagerly on real tensors, so kvdecode.sdpa can look at the storage behind ``key``/``value``
    # (what dynamo cannot trace): a leading slice of a bigger buffer takes the fast path, anything else
    # (a copy made by the compiler included) torch SDPA. The result never aliases an input.
    from .sdpa import sdpa

    # The fake promises a contiguous result: torch SDPA's (the fall-through) may not be one (CUDA's
    # flash/efficient kernels return a BTHD-strided [B, H, T, D]), and inductor checks the strides.
    out = sdpa(query, key, value, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, backend=backend)
    # (inductor's assert_size_stride skips size-1 dims, as is_contiguous does)
    out = out.contiguous()
    return out.clone() if any(out.data_ptr() == t.data_ptr() for t in (query, key, value)) else out


def _sdpa_fake(query, key, value, is_causal, scale, enable_gqa, backend) -> torch.Tensor:
    return torch.empty_like(query, memory_format=torch.contiguous_format)


_define("sdpa", _SDPA_SCHEMA, _sdpa_impl, _sdpa_fake)


# ---- kvdecode::append_kv: the append kernel as one op (kvdecode.hf.FP8StaticCache's quantizing write) ----

APPEND_OP_NAME = "kvdecode::append_kv"
_APPEND_SCHEMA = (
    "(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_new, Tensor v_new, Tensor seq_lens, "
    "Tensor? k_scale=None, Tensor? v_scale=None) -> ()"
)


def _append_impl(k_cache, v_cache, k_new, v_new, seq_lens, k_scale=None, v_scale=None) -> None:
    """``k_cache[b, h, seq_lens[b] - T + t] = k_new[b, h, t]`` (and V), quantized to the caches' fp8
    dtype with the scales when given; ``seq_lens`` int32/int64 ``[B]``, or one value (0-d or ``[1]``)
    for every row. One launch, no host sync (see :mod:`kvdecode._append`); positions outside the cache
    are not written. The caller checks shapes and dtypes: the op is for kvdecode's own caches."""
    from ._append import append_kv  # imports Triton: deferred like the static cache's

    if (k_scale is None) != (v_scale is None):
        raise KVDecodeError(
            "k_scale and v_scale must be given together (an fp8 cache) or not at all, got "
            f"k_scale {'None' if k_scale is None else 'a tensor'} and v_scale "
            f"{'None' if v_scale is None else 'a tensor'}"
        )
    named = (("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new), ("seq_lens", seq_lens))
    for name, t in (*named, ("k_scale", k_scale), ("v_scale", v_scale)):
        if t is not None:  # the kernel would read another device's address
            check_device(name, t, k_cache.device, anchor="k_cache")
    append_kv(k_cache, v_cache, k_new, v_new, seq_lens, None if k_scale is None else (k_scale, v_scale))
    torch.autograd.graph.increment_version(k_cache)  # written by a kernel: autograd sees the writes
    torch.autograd.graph.increment_version(v_cache)


def _append_fake(k_cache, v_cache, k_new, v_new, seq_lens, k_scale=None, v_scale=None) -> None:
    return None


_define("append_kv", _APPEND_SCHEMA, _append_impl, _append_fake)


# ---- kvdecode::mask_lengths: a decode step's lengths from its mask, one kernel (kvdecode.hf) -------------

MASK_LENGTHS_OP_NAME = "kvdecode::mask_lengths"
_MASK_LENGTHS_SCHEMA = "(Tensor mask, int q_len) -> (Tensor, Tensor)"


def check_mask_for_lengths(mask: object, q_len: object) -> None:
    """What the lengths kernel reads must be a bool ``[B, 1, q_len, capacity]`` tensor (host-side)."""
    if isinstance(q_len, bool) or not isinstance(q_len, int) or not 1 <= q_len <= 1024:
        raise KVDecodeError(f"q_len must be an int in 1..1024 (new tokens per row), got {q_len!r}")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise KVDecodeError(
            f"mask must be a bool [B, 1, q_len, capacity] tensor (True = attend), got {got}; pass the "
            "decode step's boolean mask"
        )
    if mask.shape[1] != 1 or mask.shape[2] != q_len:
        raise KVDecodeError(
            f"mask must be [B, 1, q_len={q_len}, capacity], got {tuple(mask.shape)}; one mask row per new "
            "token, shared by the heads"
        )


def _mask_lengths_impl(mask: torch.Tensor, q_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(seq_lens, kv_start)`` int32 ``[B]`` of a bool ``[B, 1, q_len, capacity]`` mask (see
    :mod:`kvdecode._mask_lengths`): Triton on a GPU, torch ops elsewhere (the same values); a mask of
    another dtype or shape is a :class:`KVDecodeError` before any launch."""
    # imports Triton: deferred, as the append op's
    from ._mask_lengths import mask_lengths_torch, mask_lengths_triton

    check_mask_for_lengths(mask, q_len)
    if mask.device.type == "cuda":
        return mask_lengths_triton(mask, q_len)
    return mask_lengths_torch(mask, q_len)


def _mask_lengths_fake(mask, q_len):
    check_mask_for_lengths(mask, q_len)  # shapes and dtype only: a fake tensor has them
    batch = mask.shape[0]
    return (
        mask.new_empty((batch,), dtype=torch.int32),
        mask.new_empty((batch,), dtype=torch.int32),
    )


_define("mask_lengths", _MASK_LENGTHS_SCHEMA, _mask_lengths_impl, _mask_lengths_fake)
