"""The attention function registered with ``transformers.AttentionInterface``.

transformers calls it once per layer with the layer's queries and its **whole** static cache::

    query           [B, H_q, q_len, D]
    key, value      [B, H_kv, capacity, D]      (a static cache: every slot, filled or not)
    attention_mask  bool [B, 1, q_len, capacity + 1] from :func:`~kvdecode.hf.mask.kvdecode_mask`
    returns         ([B, q_len, H_q, D], None)

A marked static-cache decode step runs ``torch.ops.kvdecode.decode_attention`` with lengths read from
the mask on the device (:func:`lengths_from_mask`, no host sync) and the mask itself (so padding holes
stay exact); a layer's logit softcap (Gemma 2) and attention sinks (gpt-oss's ``s_aux``) go to the
kernel with it. A sliding-window layer's step is marked too, with the window in its mask, whether
its buffer has wrapped or not (:mod:`kvdecode.hf.mask`). Everything else is handed on, each reason
warned once (:class:`KVDecodeFallbackWarning`):

* prefill (``q_len > 16``): torch SDPA with the model's mask, silently (that is the plan);
* sliding-window steps the mask function did not mark, dropout, autograd, non-causal attention, a
  position bias, a mask kvdecode did not mark (a dynamic cache, a 4-D mask made elsewhere), unsupported
  dtypes or head dims: torch SDPA (transformers' ``sdpa`` integration) with the unmarked mask;
* any of those in a layer with a logit softcap or attention sinks, which torch SDPA lacks: the model's
  own ``eager_attention_forward``.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..errors import KVDecodeError
from ..ops import check_mask_for_lengths, decode_attention_op
from ..problem import MAX_HEAD_DIM, SINK_DTYPES, SUPPORTED_DTYPES
from ..quant import FP8_DTYPES, FP8_Q_DTYPES, dequantize
from .cache import fp8_scales
from .mask import MAX_DECODE_Q_LEN, carries_window, is_marked, strip_marker
from .warn import warn_once

__all__ = ["Fallback", "fallback_reason", "kvdecode_attention_forward", "lengths_from_mask"]


@dataclass(frozen=True)
class Fallback:
    """Why a call does not run kvdecode: a warning key, the message (None: expected, no warning), and
    the target, ``"sdpa"`` or ``"eager"`` (the model's own eager attention)."""

    key: str
    message: str | None
    target: str = "sdpa"


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~1 µs more, every layer and step
class _Call:
    """One call's arguments, as the checks below read them (not modified by them)."""

    module: torch.nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: object
    dropout: float
    is_causal: bool | None
    kwargs: dict


def _refuse_sparse(c: _Call) -> None:
    if c.kwargs.get("indices") is not None:  # DeepSeek-V3.2's sparse attention: its indexer reads the mask
        raise KVDecodeError(
            "sparse attention with indices= (DeepSeek-V3.2) is not supported by attn_implementation="
            "'kvdecode', got indices; load the model with attn_implementation='sdpa' or 'eager'"
        )


def _sinks(kwargs: dict) -> torch.Tensor | None:
    """A layer's attention sinks: gpt-oss passes ``s_aux``, inkling2 ``sinks`` (``[H_q]``)."""
    found = kwargs.get("s_aux")
    return found if found is not None else kwargs.get("sinks")


def _needs_eager(c: _Call) -> Fallback | None:
    """Where kvdecode does not run a layer with a softcap or sinks, torch SDPA cannot either."""
    where = "a call kvdecode does not run (a sliding window, a prefill, ...)"
    if c.kwargs.get("softcap") is not None:
        return Fallback(
            "softcap", f"logit softcapping in {where}: the model's eager attention serves it", "eager"
        )
    if _sinks(c.kwargs) is not None:
        return Fallback(
            "sinks", f"attention sinks in {where}: the model's eager attention serves them", "eager"
        )
    return None


def _prefill(c: _Call) -> Fallback | None:
    return Fallback("prefill", None) if c.query.shape[2] > MAX_DECODE_Q_LEN else None


def _model_feature(c: _Call) -> Fallback | None:
    if c.kwargs.get("sliding_window") is not None and not carries_window(c.attention_mask, c.key):
        return Fallback(
            "sliding-window",
            "sliding-window layers run torch SDPA for prefill and for steps whose keys the mask function "
            "did not mark (the step that fills a rolling buffer from part-way, a dynamic cache still "
            "growing)",
        )
    if c.dropout and c.dropout > 0.0:
        return Fallback("dropout", f"attention dropout ({c.dropout}) runs torch SDPA (kvdecode has none)")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (c.query, c.key, c.value)):
        return Fallback("autograd", "kvdecode has no backward; calls that need gradients run torch SDPA")
    if c.is_causal is False or not getattr(c.module, "is_causal", True):
        return Fallback("non-causal", "non-causal (bidirectional) attention runs torch SDPA")
    if c.kwargs.get("position_bias") is not None:
        return Fallback("position-bias", "a position bias runs torch SDPA")
    return None


def _unmarked(c: _Call) -> Fallback | None:
    if is_marked(c.attention_mask, c.key):
        return None
    return Fallback(
        "unmarked-mask",
        "a decode step without kvdecode's static-cache mask (a dynamic cache, or a 4-D mask made "
        "elsewhere or sliced by the model) runs torch SDPA; generate with cache_implementation='static'",
    )


def _unsupported_shape(c: _Call) -> Fallback | None:
    q, k, v = c.query, c.key, c.value
    fp8 = k.dtype in FP8_DTYPES and v.dtype == k.dtype and q.dtype in FP8_Q_DTYPES  # an FP8StaticCache
    if not fp8 and (q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype):
        return Fallback("dtype", f"dtype {q.dtype}/{k.dtype} is not served by kvdecode; torch SDPA runs it")
    if k.shape != v.shape or k.shape[-1] != q.shape[-1] or k.shape[0] != q.shape[0]:
        return Fallback("shapes", f"key {tuple(k.shape)} / value {tuple(v.shape)} differ; torch SDPA runs it")
    if q.shape[-1] > MAX_HEAD_DIM:
        return Fallback("head-dim", f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}; torch SDPA runs it")
    if q.shape[1] % k.shape[1] != 0:
        return Fallback("heads", f"H_q {q.shape[1]} is not a multiple of H_kv {k.shape[1]}; torch SDPA")
    if k.device != q.device or v.device != q.device:
        return Fallback("device", "query and cache on different devices; torch SDPA runs it")
    return None


# Checked in this order; the first answer wins (sent to eager when the layer has a softcap or sinks).
_CHECKS: tuple[Callable[[_Call], Fallback | None], ...] = (
    _prefill,
    _model_feature,
    _unmarked,
    _unsupported_shape,
)


def fallback_reason(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    **kwargs,
) -> Fallback | None:
    """Why this call does not run kvdecode, or ``None`` when it does (host-side checks only)."""
    call = _Call(module, query, key, value, attention_mask, dropout, is_causal, kwargs)
    _refuse_sparse(call)
    for check in _CHECKS:
        found = check(call)
        if found is not None:
            return _needs_eager(call) or found
    return None


def lengths_from_mask(mask: torch.Tensor, q_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Device-side ``(seq_lens, kv_start)`` from a static-cache decode mask; no host sync.

    The mask goes to the kernel too, so the lengths need only make kvdecode's range (query ``t`` sees
    keys ``kv_start[b] .. seq_lens - q_len + t``) cover every key the mask lets that query see: the
    mask then decides exactly. Every query row is read, not only the last one: where all rows' newest
    tokens are padding (a right-padded chunk of ``q_len > 1``), the last query attends no key at its
    own position, and a length read from it alone would shift every query's causal range left.

    Parameters
    ----------
    mask : bool Tensor ``[B, 1, q_len, capacity]``
        The causal + padding mask (True = attend).
    q_len : int
        New tokens per row.

    Returns
    -------
    seq_lens : int32 Tensor ``[B]``
        Per row, the smallest length whose bottom-right causal range covers every key any of its
        queries attends (``max_t,j (j + 1 + q_len - 1 - t)``), within ``q_len .. capacity``. A row
        whose newest tokens are padding gets a shorter length than its neighbours and its queries'
        causal ranges end earlier: never before a key the mask lets them see, and the mask decides
        the rest, so the result equals the batch-wide length's while fewer tiles are read.
    kv_start : int32 Tensor ``[B]``
        Each row's first key attended by any of its queries (left padding); ``capacity`` for a row
        that sees nothing.

    Notes
    -----
    Eager and in CUDA-graph capture, one kernel on a GPU (``torch.ops.kvdecode.mask_lengths``,
    :mod:`kvdecode._mask_lengths`) instead of the ~11 small kernels the computation takes in torch
    ops. While ``torch.compile`` traces, the torch ops themselves (``mask_lengths_torch``, the kernel's
    tested twin): inductor fuses them into the layer's own kernels, where the op would stay one
    opaque launch per layer (the compiler does not share it between layers).
    """
    check_mask_for_lengths(mask, q_len)  # a KVDecodeError for what the op's schema would refuse raw
    if torch.compiler.is_compiling():
        from .._mask_lengths import mask_lengths_torch

        return mask_lengths_torch(mask, q_len)
    return torch.ops.kvdecode.mask_lengths(mask, q_len)


class _LengthsMemo:
    """The lengths of the masks seen in this forward, with the mask's view without its marker: every
    layer of a type (full, sliding) gets the same mask object, so in eager mode they are derived once
    per mask and step instead of once per layer (~10 small kernels each). Forgotten at the first layer
    of every forward (``module.layer_idx == 0``, so a mask updated in place by a replayed CUDA graph is
    never read stale across steps) and recomputed whenever a mask's version counter differs; a thread
    sees only its own memo. Not used while compiling: the compiler traces the ops."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, module, attention_mask: torch.Tensor, capacity: int, q_len: int):
        if torch.compiler.is_compiling():
            mask = attention_mask[..., :capacity]
            return (*lengths_from_mask(mask, q_len), mask)
        # Tensors made under torch.inference_mode() have no version counter (reading it raises); the
        # identity check and the reset at layer 0 still hold for them.
        version = None if attention_mask.is_inference() else attention_mask._version
        key = (version, capacity, q_len)
        memo = getattr(self._local, "memo", None)
        if memo is None or getattr(module, "layer_idx", 0) == 0 or len(memo) >= 8:  # (a stage w/o layer 0)
            memo = self._local.memo = {}
        entry = memo.get(id(attention_mask))
        if entry is not None and entry[0] is attention_mask and entry[1] == key:
            return entry[2]
        mask = attention_mask[..., :capacity]
        found = (*lengths_from_mask(mask, q_len), mask)
        memo[id(attention_mask)] = (attention_mask, key, found)  # the mask is held: its id stays its own
        return found


_LENGTHS = _LengthsMemo()


def _sink_logits(sinks: torch.Tensor) -> torch.Tensor:
    """A layer's sinks as the kernel reads them: gpt-oss keeps them in the model dtype, which the kernel
    reads directly (no cast per step); another dtype (float64) or a strided view is converted."""
    if sinks.dtype in SINK_DTYPES and (sinks.numel() <= 1 or sinks.stride(-1) == 1):
        return sinks
    return sinks.to(torch.float32).contiguous()


def _decode_step(module, query, key, value, attention_mask, scaling, softcap, sinks) -> torch.Tensor:
    batch, num_q_heads, q_len, _ = query.shape
    capacity = key.shape[-2]
    seq_lens, kv_start, mask = _LENGTHS.get(module, attention_mask, capacity, q_len)  # (it is marked)
    out = query.new_empty(batch, q_len, num_q_heads, value.shape[-1])  # BSHD: what the model wants
    k_scale, v_scale = fp8_scales(key) if key.dtype in FP8_DTYPES else (None, None)
    decode_attention_op(
        query,
        key,
        value,
        seq_lens,
        scale=scaling,
        kv_start=kv_start,
        mask=mask,
        out=out.transpose(1, 2),
        max_seq_len=capacity,
        k_scale=k_scale,
        v_scale=v_scale,
        softcap=softcap,
        sinks=None if sinks is None else _sink_logits(sinks),
    )
    return out


def _model_eager(module: torch.nn.Module, reason: Fallback) -> Callable:
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise KVDecodeError(
            f"{reason.key} needs the model's eager attention, but {type(module).__module__} has no "
            "eager_attention_forward; load the model with attn_implementation='eager'"
        )
    return fn


def _additive(mask: object, dtype: torch.dtype) -> object:
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        return torch.where(mask, 0.0, torch.finfo(dtype).min).to(dtype)
    return mask


def _sdpa_implied_mask(module, query: torch.Tensor, key: torch.Tensor, mask: object, is_causal) -> object:
    """The mask a ``None`` stands for. The sdpa mask function returns None where torch SDPA's
    ``is_causal`` does the masking (no padding); SDPA then applies a top-left causal mask when
    ``q_len > 1`` (a fresh cache: query t sees keys 0..t) and none for one query. An eager attention
    function adds the mask it gets and nothing else, so it needs that mask spelled out."""
    if mask is not None:
        return mask
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[2], key.shape[2]
    if not causal or q_len == 1:
        return None
    seen = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()
    return seen.view(1, 1, q_len, kv_len)


def kvdecode_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``attn_implementation="kvdecode"``: transformers' attention-function contract.

    Parameters
    ----------
    module : torch.nn.Module
        The attention layer (``num_key_value_groups``, ``is_causal``, ...).
    query : Tensor ``[B, H_q, q_len, D]``
    key, value : Tensor ``[B, H_kv, kv_len, D]``
        The layer's cache; for a static cache ``kv_len`` is its capacity.
    attention_mask : Tensor or None
        From the registered mask function (see :mod:`kvdecode.hf.mask`).
    dropout : float
        Attention dropout (training only); > 0 runs torch SDPA.
    scaling : float, optional
        Score scale; defaults to ``1 / sqrt(D)``.
    is_causal : bool, optional
        False runs torch SDPA.
    **kwargs
        Model extras (``sliding_window``, ``softcap``, ``s_aux``, ``position_ids``, ...).

    Returns
    -------
    (Tensor ``[B, q_len, H_q, D]``, None)
        Attention weights are never returned (as with ``sdpa``).
    """
    reason = fallback_reason(module, query, key, value, attention_mask, dropout, is_causal, **kwargs)
    if reason is None:
        if kwargs.get("output_attentions"):
            warn_once("output-attentions", "output_attentions is not supported; attention weights are None")
        softcap, sinks = kwargs.get("softcap"), _sinks(kwargs)
        return _decode_step(module, query, key, value, attention_mask, scaling, softcap, sinks), None
    if reason.message is not None:
        warn_once(reason.key, reason.message)
    mask = strip_marker(attention_mask, key)
    if key.dtype in FP8_DTYPES and value.dtype == key.dtype:  # an FP8StaticCache: attend a bf16/fp16 copy
        k_scale, v_scale = fp8_scales(key)
        key, value = dequantize(key, k_scale, query.dtype), dequantize(value, v_scale, query.dtype)
    if reason.target == "eager":
        eager = _model_eager(module, reason)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        mask = _additive(_sdpa_implied_mask(module, query, key, mask, is_causal), query.dtype)
        return eager(module, query, key, value, mask, dropout=dropout, scaling=scale, **kwargs)
    return sdpa_attention_forward(
        module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )
