"""``torch.ops.kvdecode.decode_attention``: decode attention as a torch.library op.

``torch.compile`` cannot trace into :func:`kvdecode.decode_attention` (host-side planning, Triton
launches, cuDNN graphs): dynamo would break the graph there. Wrapped as a custom op with ``out`` as its
only mutated argument and a fake (meta) implementation, a decode step compiles with no graph break
inside attention, and ``mode="reduce-overhead"`` captures it into a CUDA graph: the op's real
implementation runs once per shape while CUDA graphs are recorded, plans are looked up by the problem
(never by the lengths' values), and the lengths stay on the device.

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
given); :func:`kvdecode.sdpa` and :mod:`kvdecode.hf` call it.
"""

from __future__ import annotations

import math

import torch

from .api import decode_attention as _decode_attention
from .errors import KVDecodeError
from .problem import check_softcap, check_window

__all__ = ["APPEND_OP_NAME", "OP_NAME", "SDPA_OP_NAME", "append_kv_op", "decode_attention_op"]

# What an eager call may hand to an op's implementation directly (gpt-oss's sinks are a Parameter).
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _state_probes():
    """torch's (private) probes of what could see an op call, or None where this torch lacks one: then
    every call takes the op (correct, only slower). All four are long-standing in torch 2.x."""
    try:
        probes = (
            torch._C._get_tracing_state,  # torch.jit.trace: not None while tracing
            torch._C._len_torch_dispatch_stack,  # dispatch modes (fake, functional, make_fx, ...)
            torch._C._is_torch_function_mode_enabled,  # __torch_function__ modes (torch.device(...))
            torch._C._functorch.peek_interpreter_stack,  # vmap, grad, jvp
        )
    except AttributeError:
        return None
    return probes


_PROBES = _state_probes()


def eager_direct(*tensors: torch.Tensor | None) -> bool:
    """Whether a call with these tensor arguments may run an op's implementation directly.

    A ``torch.library.custom_op`` call costs far more host time than the launch it wraps: torch's
    Python autograd and ADInplaceOrView layers rebuild the schema's argument list twice per call
    (``fill_defaults``), ~125 of the 175 µs a decode call took on a 2-core CPU host (kernels stubbed).
    The op exists for ``torch.compile`` (and anything else that traces); a plain eager call of plain
    tensors gets the same implementation without the dispatcher. True only when nothing could see the
    difference: not tracing (dynamo, ``torch.jit.trace``), no dispatch or ``__torch_function__`` mode
    (fake tensors, functionalization, ``make_fx``, an op-counting mode, ``with torch.device(...)``), no
    functorch transform (vmap), no tensor subclass or meta tensor (the op's fake implementation serves
    those), and no input that autograd would record. Under the profiler the direct call is recorded
    under the op's name (:func:`run_direct`).
    """
    if _PROBES is None or torch.compiler.is_compiling():
        return False
    tracing, dispatch_modes, function_modes, transforms = _PROBES
    if tracing() is not None or dispatch_modes() or function_modes() or transforms() is not None:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TENSORS or t.is_meta or (grad and t.requires_grad)):
            return False
    return True


def run_direct(name: str, impl, args: tuple, mutated: tuple) -> None:
    """``impl(*args)`` as the op ``name`` would run it: under the profiler as a range of that name, and
    with the version bump its ADInplaceOrView layer gives the ``mutated`` tensors (autograd sees the
    write)."""
    if getattr(torch.autograd.profiler, "_is_profiler_enabled", False):
        with torch.autograd.profiler.record_function(name):
            impl(*args)
    else:
        impl(*args)
    for t in mutated:
        torch.autograd.graph.increment_version(t)


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


_op = torch.library.custom_op(OP_NAME, _decode_attention_impl, mutates_args=("out",), schema=_SCHEMA)


@_op.register_fake
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
    if eager_direct(q, k_cache, v_cache, seq_lens, kv_start, mask, out, k_scale, v_scale, sinks):
        run_direct(OP_NAME, _decode_attention_impl, args, (out,))
    else:
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


_sdpa_op = torch.library.custom_op(SDPA_OP_NAME, _sdpa_impl, mutates_args=(), schema=_SDPA_SCHEMA)


@_sdpa_op.register_fake
def _sdpa_fake(query, key, value, is_causal, scale, enable_gqa, backend) -> torch.Tensor:
    return torch.empty_like(query, memory_format=torch.contiguous_format)


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
    append_kv(k_cache, v_cache, k_new, v_new, seq_lens, None if k_scale is None else (k_scale, v_scale))


_append_op = torch.library.custom_op(
    APPEND_OP_NAME, _append_impl, mutates_args=("k_cache", "v_cache"), schema=_APPEND_SCHEMA
)


@_append_op.register_fake
def _append_fake(k_cache, v_cache, k_new, v_new, seq_lens, k_scale=None, v_scale=None) -> None:
    return None


def append_kv_op(k_cache, v_cache, k_new, v_new, seq_lens, k_scale=None, v_scale=None) -> None:
    """``torch.ops.kvdecode.append_kv`` (see :func:`_append_impl`), run directly where an eager call
    allows it (:func:`eager_direct`)."""
    args = (k_cache, v_cache, k_new, v_new, seq_lens, k_scale, v_scale)
    if eager_direct(*args):
        run_direct(APPEND_OP_NAME, _append_impl, args, (k_cache, v_cache))
    else:
        torch.ops.kvdecode.append_kv(*args)
