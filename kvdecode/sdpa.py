"""``kvdecode.sdpa``: torch's ``scaled_dot_product_attention`` signature, fast on fixed-capacity caches.

When ``key`` and ``value`` are leading slices ``buf[:, :, :L]`` of fixed-capacity buffers (a BSHD
buffer's ``buf[:, :L].transpose(1, 2)`` too, and slices of a per-layer view of a bigger buffer), the
call runs one :class:`~kvdecode.DecodePlan` made for the buffers' **capacity** with ``L`` passed as a
device length, so one plan serves every step while the cache fills. Anything else goes to
``torch.nn.functional.scaled_dot_product_attention`` unchanged.

Recognizing a slice, from strides and storage alone (no data is read). Nothing in a view proves that
the memory past ``L`` is its buffer's unused tail rather than other data (the next layer of a stacked
``[layers, B, H, cap, D]`` buffer, V after K in one storage), so a capacity is claimed only on evidence,
and it is the smallest the evidence allows. The view ``[B, H, L, D]`` with strides ``(sb, sh, ss, 1)`` at
storage offset ``o`` extends to the capacity ``C``, the smallest of:

* the **row pitch** ``P = min(s // ss)`` over ``s`` in ``(sb, sh)`` with ``s > ss``, whatever the
  dimension's size. Rows of a dimension of size > 1 cannot be closer without overlapping; a size-1
  dimension's stride constrains no memory, but it is the stride the dimension had in the buffer the view
  was sliced from (``buf[i]`` of a contiguous ``[layers, 1, 1, cap, D]`` buffer has strides
  ``(cap·D, cap·D, D, 1)``), the only record of where a row ends, and using it can only lower ``C``.
  Without such a stride (B and H broadcast with stride 0, or both strides <= ``ss`` as in a sequence-
  outermost ``[cap, B, H, D]`` buffer permuted to BHSD) there is no evidence: the call falls through;
* the **end of the row the view starts in**, ``P - (o mod (P·ss)) // ss``, taking rows to start at
  multiples of the pitch from the storage's start, as in any buffer allocated whole (``buf[:, :, 5:15]``
  of a 40-long buffer has capacity 35, not 40 reaching into the next row's first 5 positions; V in the
  second half of ``[B, H, 2·cap, D]`` rows gets ``cap``);
* the **storage**: ``torch.as_strided(t, (B, H, C, D), t.stride(), o)`` stays inside the tensor's
  untyped storage.

K and V sharing one storage (``kv[0]``, ``kv[1]`` of ``[2, B, H, cap, D]``, or of a per-layer stack of
them, or K and V interleaved per position) are each bounded by their own pitch this way. A limit that
no view can see past: a row holding several buffers one after another (``[B, H, layers·cap, D]`` with a
layer per ``cap`` positions) looks like one longer row, so all but the last get a larger ``C`` (never
outside the storage; only the first ``L`` positions are ever read).

The fast path is taken only when ``C > L`` for both ``key`` and ``value`` (using the smaller ``C``). A
tensor exactly ``L`` long (a fresh tensor, or a full cache) falls through: a plan per ``L`` would be
rebuilt every step, and torch SDPA on an exact tensor already reads only ``L`` keys.

Inside ``torch.compile`` a qualifying call becomes one op, ``torch.ops.kvdecode.sdpa`` (no graph
break): dynamo cannot inspect storage, so the op does the slice detection when the graph runs (a copy
the compiler made of a slice then falls through to torch SDPA: correct, not faster).

The fast path also needs: no ``attn_mask``, ``dropout_p == 0``, no autograd, 4-D inputs of one
float16/bfloat16/float32 dtype on one device with unit stride on D,
``key.shape == value.shape``, matching batch and head dim, ``H_q == H_kv`` (or ``enable_gqa`` and
``H_q % H_kv == 0``), and causality that means the same in both: ``is_causal=False`` with ``T_q == 1``,
or ``is_causal=True`` with ``T_q == L`` (torch's ``is_causal`` is top-left aligned, the decode kernel is
bottom-right; they agree only there). With ``backend="auto"`` it also needs a CUDA tensor (on CPU Triton
runs through its interpreter, slower than torch) and a planner choice other than the float64 reference.
"""

from __future__ import annotations

import logging

import torch

from .api import problem_for_tensors
from .errors import KVDecodeError, UnsupportedError
from .plan import PLANS, DecodePlan
from .planner import check_backend_name
from .problem import MAX_HEAD_DIM, SUPPORTED_DTYPES

__all__ = ["capacity_view", "clear_plan_cache", "plan_cache_info", "sdpa", "sdpa_fast_path_reason"]

log = logging.getLogger("kvdecode.sdpa")


def capacity_view(t: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """The fixed-capacity buffer a ``[B, H, L, D]`` view is a leading slice of, or ``None``.

    Returns ``(buf, C)`` with ``buf`` a ``[B, H, C, D]`` view over ``t``'s storage with ``t``'s strides
    and storage offset (so ``buf[:, :, :L]`` is ``t``), and ``C`` the capacity defined in this module's
    docstring; ``None`` when ``t`` is not 4-D, no stride gives the row pitch, there is no room beyond
    ``L`` (``C == L``), or its sequence stride is 0.
    """
    if t.dim() != 4 or t.numel() == 0:
        return None
    batch, heads, length, head_dim = t.shape
    s_seq = t.stride(2)
    if s_seq <= 0:
        return None
    # The row pitch: the smallest stride above the sequence stride among B and H, whatever their size
    # (a size-1 dimension keeps the stride it had in the buffer it was sliced from).
    pitches = [stride // s_seq for stride in (t.stride(0), t.stride(1)) if stride > s_seq]
    if not pitches:
        return None  # no evidence where a row ends: only the storage would bound it
    pitch = min(pitches)
    offset = t.storage_offset()
    capacity = pitch - (offset % (pitch * s_seq)) // s_seq  # up to the end of the row the view starts in
    storage_elems = t.untyped_storage().nbytes() // t.element_size()
    others = [(size, stride) for i, (size, stride) in enumerate(zip(t.shape, t.stride())) if i != 2]
    last_other = offset + sum((size - 1) * stride for size, stride in others)
    capacity = min(capacity, (storage_elems - 1 - last_other) // s_seq + 1)
    if capacity <= length:
        return None
    buf = t.as_strided((batch, heads, capacity, head_dim), t.stride(), offset)
    return buf, capacity


def sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    r"""Drop-in for ``torch.nn.functional.scaled_dot_product_attention``; fast on cache slices.

    Shape legend: ``query [B, H_q, T_q, D]``, ``key``/``value`` ``[B, H_kv, L, D]`` (typically
    ``buf[:, :, :L]`` of a ``[B, H_kv, capacity, D]`` cache), output ``[B, H_q, T_q, D]``.

    Parameters
    ----------
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
        As in torch. When the call qualifies (see the module docstring or :func:`sdpa_fast_path_reason`)
        it runs a kvdecode plan over the whole buffer with ``L`` as a device length; otherwise torch
        SDPA runs with exactly these arguments.
    backend : {"auto", "triton", "cudnn", "reference"}
        Keyword-only extension: the backend of the fast path. An explicit backend also takes the fast path
        on CPU tensors; one that cannot serve the call raises :class:`~kvdecode.UnsupportedError`.

    Returns
    -------
    Tensor ``[B, H_q, T_q, D]`` in query's dtype, matching torch SDPA within the dtype's tolerance.

    Examples
    --------
    >>> import torch, kvdecode
    >>> k_buf = torch.randn(1, 2, 64, 16); v_buf = torch.randn(1, 2, 64, 16)
    >>> q = torch.randn(1, 4, 1, 16)
    >>> out = kvdecode.sdpa(q, k_buf[:, :, :10], v_buf[:, :, :10], enable_gqa=True)
    >>> out.shape
    torch.Size([1, 4, 1, 16])
    """
    check_backend_name(backend)
    if not all(isinstance(t, torch.Tensor) for t in (query, key, value)):
        kinds = ", ".join(type(t).__name__ for t in (query, key, value))
        raise KVDecodeError(f"query, key and value must be tensors, got {kinds}; pass torch.Tensor inputs")
    reason = sdpa_fast_path_reason(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend=backend
    )
    if reason is None and torch.compiler.is_compiling():
        # dynamo cannot look at the storage behind key/value: one op does it when the graph runs
        from . import ops  # noqa: F401  (registers torch.ops.kvdecode.sdpa)

        the_scale = None if scale is None else float(scale)
        return torch.ops.kvdecode.sdpa(query, key, value, is_causal, the_scale, enable_gqa, backend)
    if reason is None:
        found = _fast_path(query, key, value, scale, backend)
        if not isinstance(found, str):
            the_plan, k_buf, v_buf, seq_lens = found
            # the plan's problem was made from these very tensors: launch without a second round of checks
            return the_plan._launch(query, k_buf, v_buf, seq_lens, None, None, None, None, False)
        reason = found
    log.debug("kvdecode.sdpa falls through to torch SDPA: %s", reason)
    return torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
    )


def sdpa_fast_path_reason(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str = "auto",
) -> str | None:
    """``None`` when :func:`sdpa` would try its fast path, else why it falls through to torch SDPA.

    Host checks only (shapes, strides, flags); the planner may still decline (reported by :func:`sdpa`'s
    DEBUG log).
    """
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "query, key and value must be tensors"
    if attn_mask is not None:
        return "attn_mask is given (its last dimension spans L, not the capacity)"
    if dropout_p != 0.0:
        return f"dropout_p is {dropout_p}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "an input requires grad (the fast path has no backward)"
    if any(t.dim() != 4 for t in tensors):
        return "inputs must be 4-D [B, H, S, D]"
    if query.dtype not in SUPPORTED_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtypes {query.dtype}, {key.dtype}, {value.dtype} are not one of float16/bfloat16/float32"
    if key.device != query.device or value.device != query.device:
        return "inputs are on different devices"
    if backend == "auto" and query.device.type != "cuda":
        return f"device {query.device} is not CUDA (pass backend= to force the fast path)"
    return _shape_reason(query, key, value, is_causal, scale, enable_gqa)


def _shape_reason(query, key, value, is_causal, scale, enable_gqa) -> str | None:
    batch, num_q_heads, q_len, head_dim = query.shape
    if tuple(key.shape) != tuple(value.shape):
        return f"key.shape {tuple(key.shape)} differs from value.shape {tuple(value.shape)}"
    _, num_kv_heads, length, _ = key.shape
    if key.shape[0] != batch or key.shape[3] != head_dim:
        return f"query {tuple(query.shape)} and key {tuple(key.shape)} differ in batch or head dim"
    if min(batch, num_q_heads, q_len, head_dim, num_kv_heads, length) < 1 or head_dim > MAX_HEAD_DIM:
        return f"sizes {tuple(query.shape)}, {tuple(key.shape)} are empty or the head dim is too large"
    if num_q_heads != num_kv_heads and not (enable_gqa and num_q_heads % num_kv_heads == 0):
        return f"H_q {num_q_heads} vs H_kv {num_kv_heads} without enable_gqa (or not a multiple)"
    if any(t.shape[3] > 1 and t.stride(3) != 1 for t in (query, key, value)):
        return "the head dim must be contiguous (stride 1) in query, key and value"
    if scale is not None and not (isinstance(scale, (int, float)) and 0.0 < float(scale) < float("inf")):
        return f"scale {scale!r} is not a positive finite float"
    if is_causal and q_len != length:
        return f"is_causal with T_q {q_len} != L {length} (torch aligns top-left, decode bottom-right)"
    if not is_causal and q_len != 1:
        return f"is_causal=False with T_q {q_len} > 1 (decode applies bottom-right causality)"
    return None


def _fast_path(
    query, key, value, scale, backend
) -> tuple[DecodePlan, torch.Tensor, torch.Tensor, torch.Tensor] | str:
    """The plan (from the shared plan cache) and the capacity views for a call that passed the host
    checks, or why not."""
    k_found, v_found = capacity_view(key), capacity_view(value)
    if k_found is None or v_found is None:
        which = "key" if k_found is None else "value"
        return f"{which} is not a leading slice of a larger buffer"
    capacity = min(k_found[1], v_found[1])
    k_buf, v_buf = (t[:, :, :capacity] for t in (k_found[0], v_found[0]))
    lens = torch.full((query.shape[0],), key.shape[2], dtype=torch.int32, device=query.device)
    problem = problem_for_tensors(query, k_buf, v_buf, lens, scale, None, None)
    try:
        made = PLANS.plan_for_call(problem, backend, False, capacity, None)
    except UnsupportedError as err:
        if backend != "auto":
            raise
        return f"no backend serves {problem.name}: {err}"
    if backend == "auto" and made.backend == "reference":
        return f"the planner chose the float64 reference for {problem.name} ({made.choice.reason})"
    return made, k_buf, v_buf, lens


def plan_cache_info() -> dict[str, int]:
    """Statistics of the plan cache :func:`sdpa` shares with every entry point
    (:func:`kvdecode.plan.plan_cache_info`)."""
    return PLANS.cache_info()


def clear_plan_cache() -> None:
    """Empty the shared plan cache (:func:`kvdecode.plan.clear_plan_cache`)."""
    PLANS.clear()
