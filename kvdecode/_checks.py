"""Checks ``DecodePlan.run`` makes on every call: cheap comparisons first, messages only on failure.

The fast test (:func:`inputs_match`, :func:`outputs_ok`) compares each tensor's metadata with the
problem's :class:`Signature`, computed once; only when it fails does the slow path work out which
argument is wrong and raise :class:`KVDecodeError` naming both sides
(a non-tensor argument included: never a raw ``AttributeError``).

Overlaps: an output that aliases an input or the other output would be written while it is read (or
written twice), so ``out`` and ``lse`` must not share memory with ``q``, ``k_cache``, ``v_cache`` or each
other, and neither may overlap itself (an expanded, stride-0 view). Two tensors are taken to overlap when
their byte ranges ``[data_ptr, data_ptr + extent)`` intersect: exact for the dense layouts decode uses,
conservative for interleaved views of one buffer (refused though disjoint element by element).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .errors import KVDecodeError
from .problem import DecodeProblem, check_out, check_sinks
from .quant import check_kv_scales

__all__ = [
    "Signature",
    "call_inputs",
    "check_buffers",
    "check_inputs",
    "check_outputs",
    "check_outputs_disjoint",
    "check_scales",
    "check_sinks_given",
    "contiguous_strides",
    "extent",
    "inputs_match",
    "outputs_ok",
    "overlapping",
    "signature",
    "span",
]


def span(shape: tuple[int, ...], strides: tuple[int, ...], elem_size: int) -> int:
    """Bytes from the first element of a ``shape``/``strides`` view to one past its last (0 if empty)."""
    if any(n == 0 for n in shape):
        return 0
    return (sum((n - 1) * s for n, s in zip(shape, strides) if n > 1) + 1) * elem_size


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape`` (what ``torch.empty(shape).stride()`` gives)."""
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def extent(t: torch.Tensor) -> int:
    """Bytes from ``t.data_ptr()`` to one past its last element (0 for an empty tensor)."""
    return span(tuple(t.shape), tuple(t.stride()), t.element_size())


def overlapping(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the byte ranges of ``a`` and ``b`` intersect (see the module docstring)."""
    if a.device != b.device:
        return False
    pa, pb = a.data_ptr(), b.data_ptr()
    return pa < pb + extent(b) and pb < pa + extent(a)


def self_overlapping(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` share memory (e.g. an expanded view with a zero stride)."""
    return torch._debug_has_internal_overlap(t) != 0  # 0: none; 1: yes; 2: too hard to tell (refused)


def call_inputs(q, k_cache, v_cache, seq_lens, kv_start=None, mask=None, scales=None, sinks=None) -> dict:
    """The tensors a call reads, by argument name: what its outputs must not overlap."""
    inputs = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "seq_lens": seq_lens}
    k_scale, v_scale = scales if scales is not None else (None, None)
    extra = (("kv_start", kv_start), ("mask", mask), ("k_scale", k_scale), ("v_scale", v_scale))
    extra += (("sinks", sinks),)
    inputs.update({n: t for n, t in extra if isinstance(t, torch.Tensor)})
    return inputs


def check_outputs(
    p: DecodeProblem, q, k_cache, v_cache, seq_lens, kv_start, mask, out, lse, scales=None, sinks=None,
    sig: Signature | None = None,
) -> None:  # fmt: skip
    """``out`` and ``lse`` (either may be None) for a call whose inputs match ``p``: the fast test against
    its signature (which sizes every input; ``sig``, when the caller holds it, saves looking it up),
    else the full checks naming the fault. The one output check of :func:`kvdecode.decode_attention`,
    ``DecodePlan.run`` and ``StaticKVCache.attend``."""
    k_scale, v_scale = scales if scales is not None else (None, None)
    others = (kv_start, mask, k_scale, v_scale)
    if sig is None:
        sig = signature(p)
    if not outputs_ok(sig, q, k_cache, v_cache, seq_lens, out, lse, sinks, others):
        check_buffers(p, out, lse)
        outputs = {n: t for n, t in (("out", out), ("lse", lse)) if t is not None}
        check_outputs_disjoint(
            outputs, call_inputs(q, k_cache, v_cache, seq_lens, kv_start, mask, scales, sinks)
        )


def check_outputs_disjoint(outputs: dict, inputs: dict) -> None:
    """Refuse outputs that overlap themselves, each other or an input (names in the message)."""
    for name, t in outputs.items():
        if self_overlapping(t):
            raise KVDecodeError(
                f"{name} must not overlap itself, got strides {tuple(t.stride())} for shape "
                f"{tuple(t.shape)}; pass a fresh tensor (torch.empty) instead of an expanded view"
            )
    names = list(outputs)
    for i, name in enumerate(names):
        others = {**{n: outputs[n] for n in names[i + 1 :]}, **inputs}
        for other, t in others.items():
            if overlapping(outputs[name], t):
                raise KVDecodeError(
                    f"{name} must not share memory with {other}, got overlapping ranges at "
                    f"{outputs[name].data_ptr():#x} and {t.data_ptr():#x}; pass a separate output buffer"
                )


def check_inputs(p: DecodeProblem, q, k_cache, v_cache, seq_lens, kv_start, mask) -> None:
    """Raise :class:`KVDecodeError` for the first argument that does not match the plan."""
    kv_shape = (p.batch, p.num_kv_heads, p.capacity, p.head_dim)
    _same("q", q, p.dtype, p.q_strides, (p.batch, p.num_q_heads, p.q_len, p.head_dim), p)
    _same("k_cache", k_cache, p.cache_dtype, p.k_strides, kv_shape, p)
    _same("v_cache", v_cache, p.cache_dtype, p.v_strides, kv_shape, p)
    _lengths("seq_lens", seq_lens, p)
    _as_planned("kv_start is", "it", kv_start is not None, p.has_kv_start)
    if kv_start is not None:
        _lengths("kv_start", kv_start, p)
    _mask(mask, p)


def check_scales(p: DecodeProblem, k_scale, v_scale) -> None:
    """``k_scale``/``v_scale`` as ``DecodeProblem.from_tensors`` checks them, and of the planned kind."""
    _as_planned(
        "k_scale/v_scale are", "them", k_scale is not None or v_scale is not None, p.kv_scale_kind != "none"
    )
    kind = check_kv_scales(k_scale, v_scale, p.cache_dtype, p.num_kv_heads, p.device)
    if kind != p.kv_scale_kind:
        raise KVDecodeError(
            f"k_scale/v_scale are of kind {kind!r} but the plan was made for {p.kv_scale_kind!r}; "
            "pass them as planned or make a new plan"
        )


def check_sinks_given(p: DecodeProblem, sinks) -> None:
    """``sinks`` given exactly when planned, and as ``DecodeProblem.from_tensors`` checks them."""
    _as_planned("sinks is", "them", sinks is not None, p.has_sinks)
    if sinks is not None:
        check_sinks(sinks, p.num_q_heads, p.device, planned=p.sinks_dtype)


def _as_planned(subject: str, pronoun: str, given: bool, planned: bool) -> None:
    """An optional input is given exactly when the plan was made with it."""
    if given != planned:
        raise KVDecodeError(
            f"{subject} {'given' if given else 'None'} but the plan was made "
            f"{'with' if planned else 'without'} {pronoun}; make a new plan"
        )


def check_buffers(p: DecodeProblem, out, lse) -> None:
    q_shape = (p.batch, p.num_q_heads, p.q_len, p.head_dim)
    if out is not None:
        check_out(out, q_shape, p.dtype, p.device)
    if lse is not None:
        _buffer("lse", lse, q_shape[:3], torch.float32, p)


def _tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise KVDecodeError(f"{name} must be a torch.Tensor, got {type(t).__name__}; pass a tensor")
    return t


def _lengths(name: str, t: object, p: DecodeProblem) -> None:
    t = _tensor(name, t)
    stride_ok = p.batch == 1 or t.stride(0) == 1
    if t.dtype != torch.int32 or tuple(t.shape) != (p.batch,) or t.device != p.device or not stride_ok:
        raise KVDecodeError(
            f"{name} must be a contiguous int32 ({p.batch},) tensor on {p.device}, got {t.dtype} "
            f"{tuple(t.shape)} with stride {tuple(t.stride())} on {t.device}; pass "
            f"{name}.to({str(p.device)!r}, torch.int32).contiguous()"
        )


def _mask(mask: object, p: DecodeProblem) -> None:
    if (mask is not None) != (p.mask_kind != "none"):
        raise KVDecodeError(
            f"mask is {'given' if mask is not None else 'None'} but the plan was made with mask kind "
            f"{p.mask_kind!r}; make a new plan"
        )
    if mask is None:
        return
    mask = _tensor("mask", mask)
    full = (p.batch, p.num_q_heads, p.q_len, p.capacity)
    try:
        strides = tuple(mask.expand(full).stride())
    except RuntimeError:
        strides = None
    if mask.dtype != p.mask_dtype or strides != p.mask_strides or mask.device != p.device:
        raise KVDecodeError(
            f"mask has dtype {mask.dtype}, shape {tuple(mask.shape)} on {mask.device} but the plan was made "
            f"for dtype {p.mask_dtype} with broadcast strides {p.mask_strides} on {p.device}; make a new plan"
        )


def _buffer(name: str, t: object, shape: tuple, dtype: torch.dtype, p: DecodeProblem) -> None:
    t = _tensor(name, t)
    if tuple(t.shape) != shape or t.dtype != dtype or t.device != p.device or t.stride(-1) != 1:
        raise KVDecodeError(
            f"{name} must be {dtype} {shape} on {p.device} with stride(-1) == 1, got {t.dtype} "
            f"{tuple(t.shape)} on {t.device} with strides {tuple(t.stride())}"
        )


def _same(name: str, t: object, dtype: torch.dtype, strides: tuple, shape: tuple, p: DecodeProblem) -> None:
    t = _tensor(name, t)
    if t.dtype != dtype:
        raise KVDecodeError(f"{name} has dtype {t.dtype} but the plan was made for {dtype}; make a new plan")
    if tuple(t.shape) != shape:
        raise KVDecodeError(
            f"{name} has shape {tuple(t.shape)} but the plan was made for {shape}; make a new plan"
        )
    if tuple(t.stride()) != strides:
        raise KVDecodeError(
            f"{name} has strides {tuple(t.stride())} but the plan was made for {strides}; make a new plan"
        )
    if t.device != p.device:
        raise KVDecodeError(f"{name} is on {t.device} but the plan was made for {p.device}; make a new plan")


# ---- the fast test ----


@dataclass(frozen=True, eq=False)
class Signature:
    """What the per-call fast checks compare, derived once from a problem (:func:`signature`):
    ``(dtype, shape, strides)`` of q, the caches, a contiguous out and LSE, an out that is a
    contiguous ``[B, T_q, H_q, D]`` buffer seen as BHSD (``out_bshd``: what transformers' attention
    functions return) and the sinks (None without),
    the lengths' dtype and shape, the device index (-1 off CUDA), whether the problem is plain (no
    kv_start, mask or scales: sinks, one small tensor, are compared here too), the byte extents of
    q, k, v, out, lse and sinks from their ``data_ptr``, and those of kv_start, the mask and the two
    scales (``others``, 0 where the problem has none)."""

    q: tuple
    k: tuple
    v: tuple
    lens: tuple
    out: tuple
    out_bshd: tuple
    lse: tuple
    sinks: tuple | None
    device_index: int
    plain: bool
    extents: tuple[int, ...]
    lens_bytes: int
    others: tuple[int, int, int, int]


@functools.lru_cache(maxsize=1024)
def signature(p: DecodeProblem) -> Signature:
    """The :class:`Signature` of ``p`` (memoized: problems hash once)."""
    kv_shape = torch.Size((p.batch, p.num_kv_heads, p.capacity, p.head_dim))
    kv_dt = p.cache_dtype
    elem = p.dtype.itemsize
    kv_elem = kv_dt.itemsize
    q_shape = (p.batch, p.num_q_heads, p.q_len, p.head_dim)
    out = (p.dtype, torch.Size(q_shape), contiguous_strides(q_shape))
    bshd = contiguous_strides((p.batch, p.q_len, p.num_q_heads, p.head_dim))
    lse = (torch.float32, torch.Size(q_shape[:3]), contiguous_strides(q_shape[:3]))
    extents = tuple(  # bytes from data_ptr to one past the last element: q, k, v, out, lse
        span(shape, strides, size)
        for shape, strides, size in (
            (q_shape, p.q_strides, elem), (kv_shape, p.k_strides, kv_elem), (kv_shape, p.v_strides, kv_elem),
            (q_shape, out[2], elem), (q_shape[:3], lse[2], 4),
        )
    )  # fmt: skip
    sinks = None
    if p.has_sinks:
        sinks = (p.sinks_dtype, torch.Size((p.num_q_heads,)), (1,))
        extents += (p.num_q_heads * p.sinks_dtype.itemsize,)
    mask = 0
    if p.mask_kind != "none":  # the broadcast view spans what the mask itself spans (stride 0 adds nothing)
        mask = span((p.batch, p.num_q_heads, p.q_len, p.capacity), p.mask_strides, p.mask_dtype.itemsize)
    scale = {"none": 0, "scalar": 4, "per_head": 4 * p.num_kv_heads}[p.kv_scale_kind]  # float32
    return Signature(
        q=(p.dtype, torch.Size(q_shape), p.q_strides),
        k=(kv_dt, kv_shape, p.k_strides),
        v=(kv_dt, kv_shape, p.v_strides),
        lens=(torch.int32, torch.Size((p.batch,))),
        out=out,
        out_bshd=(p.dtype, torch.Size(q_shape), (bshd[0], bshd[2], bshd[1], bshd[3])),
        lse=lse,
        sinks=sinks,
        device_index=p.device.index if p.device.type == "cuda" else -1,
        plain=not p.has_kv_start and p.mask_kind == "none" and p.kv_scale_kind == "none",
        extents=extents,
        lens_bytes=4 * p.batch,
        others=(4 * p.batch if p.has_kv_start else 0, mask, scale, scale),
    )


def inputs_match(sig: Signature, q, k_cache, v_cache, seq_lens, sinks=None) -> bool:
    """The common case in a few comparisons; False sends the caller to the checks that name the fault."""
    try:
        index = sig.device_index
        if sinks is None:
            if sig.sinks is not None:
                return False
        elif (
            (sinks.dtype, sinks.shape, sinks.stride()) != sig.sinks
            or sinks.get_device() != index
            or (index < 0 and not sinks.is_cpu)
        ):
            return False
        return (
            (q.dtype, q.shape, q.stride()) == sig.q
            and (k_cache.dtype, k_cache.shape, k_cache.stride()) == sig.k
            and (v_cache.dtype, v_cache.shape, v_cache.stride()) == sig.v
            and (seq_lens.dtype, seq_lens.shape) == sig.lens
            and (seq_lens.shape[0] == 1 or seq_lens.stride(0) == 1)
            and q.get_device() == index
            and k_cache.get_device() == index
            and v_cache.get_device() == index
            and seq_lens.get_device() == index
            and (index >= 0 or (q.is_cpu and k_cache.is_cpu and v_cache.is_cpu and seq_lens.is_cpu))
        )  # get_device() is -1 for CPU and meta tensors alike: a CPU plan also asks is_cpu
    except (AttributeError, TypeError):
        return False


def outputs_ok(
    sig: Signature, q, k_cache, v_cache, seq_lens, out, lse=None, sinks=None, others=(None,) * 4
) -> bool:
    """Outputs of the planned shapes (``out`` contiguous or a BSHD buffer's view, ``lse`` contiguous), on
    the device, disjoint from the inputs (which match ``sig``) and each other, in a few integer
    comparisons; False sends the caller to the full checks. ``others``: the call's kv_start, mask,
    k_scale and v_scale (None where absent), which must be the problem's."""
    try:
        ranges = []
        for t, want, ext in ((out, sig.out, sig.extents[3]), (lse, sig.lse, sig.extents[4])):
            if t is None:
                continue
            meta = (t.dtype, t.shape, t.stride())
            if meta != want and not (t is out and meta == sig.out_bshd):  # (dense too: the same extent)
                return False
            if t.get_device() != sig.device_index:
                return False
            if sig.device_index < 0 and not t.is_cpu:
                return False
            ranges.append((t.data_ptr(), ext))
        pointers = (q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), seq_lens.data_ptr())
        inputs = list(zip(pointers, (*sig.extents[:3], sig.lens_bytes)))
        if sinks is not None:  # (matching sig.sinks, which sized the last extent)
            inputs.append((sinks.data_ptr(), sig.extents[5]))
        if not sig.plain:  # the inputs match the problem: given exactly where it sized them
            inputs += [(t.data_ptr(), ext) for t, ext in zip(others, sig.others) if ext]
        for i, (a, a_ext) in enumerate(ranges):
            for b, b_ext in [*ranges[i + 1 :], *inputs]:
                if a < b + b_ext and b < a + a_ext:
                    return False
        return True
    except (AttributeError, TypeError):
        return False
