"""``kvdecode.sdpa``: torch's ``scaled_dot_product_attention`` signature, fast on fixed-capacity caches.

When ``key`` and ``value`` are leading slices ``buf[:, :, :L]`` of fixed-capacity buffers (a BSHD
buffer's ``buf[:, :L].transpose(1, 2)`` too, and slices of a per-layer view of a bigger buffer), the
call runs one :class:`~kvdecode.DecodePlan` made for the buffers' **capacity** with ``L`` passed as a
device length, so one plan serves every step while the cache fills. Anything else goes to
``torch.nn.functional.scaled_dot_product_attention`` unchanged.

Recognizing a slice, from strides and storage alone (no data is read): the view ``[B, H, L, D]`` with
strides ``(sb, sh, ss, 1)`` at storage offset ``o`` extends to the capacity ``C``, the largest length for
which ``torch.as_strided(t, (B, H, C, D), t.stride(), o)``

* stays inside the tensor's untyped storage, and
* does not run into the next head or batch row: ``C * ss <= s`` for every stride ``s > ss`` of a
  dimension of size > 1 (size-1 and stride-0, i.e. expanded, dimensions are ignored).

The fast path is taken only when ``C > L`` for both ``key`` and ``value`` (using the smaller ``C``). A
tensor exactly ``L`` long (a fresh tensor, or a full cache) falls through: a plan per ``L`` would be
rebuilt every step, and torch SDPA on an exact tensor already reads only ``L`` keys.

The fast path also needs: no ``attn_mask``, ``dropout_p == 0``, no autograd, not inside
``torch.compile``, 4-D inputs of one float16/bfloat16/float32 dtype on one device with unit stride on D,
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
from .errors import UnsupportedError
from .plan import PLANS, DecodePlan
from .planner import check_backend_name
from .problem import MAX_HEAD_DIM, SUPPORTED_DTYPES

__all__ = ["capacity_view", "clear_plan_cache", "plan_cache_info", "sdpa", "sdpa_fast_path_reason"]

log = logging.getLogger("kvdecode.sdpa")

def capacity_view(t: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """The fixed-capacity buffer a ``[B, H, L, D]`` view is a leading slice of, or ``None``.

    Returns ``(buf, C)`` with ``buf`` a ``[B, H, C, D]`` view over ``t``'s storage with ``t``'s strides
    and storage offset (so ``buf[:, :, :L]`` is ``t``), and ``C`` the capacity defined in this module's
    docstring; ``None`` when ``t`` is not 4-D, has no room beyond ``L`` (``C == L``), or its sequence
    stride is 0.
    """
    if t.dim() != 4 or t.numel() == 0:
        return None
    batch, heads, length, head_dim = t.shape
    s_seq = t.stride(2)
    if s_seq <= 0:
        return None
    storage_elems = t.untyped_storage().nbytes() // t.element_size()
    others = [(size, stride) for i, (size, stride) in enumerate(zip(t.shape, t.stride())) if i != 2]
    last_other = t.storage_offset() + sum((size - 1) * stride for size, stride in others)
    capacity = (storage_elems - 1 - last_other) // s_seq + 1
    for size, stride in others:
        if size > 1 and stride > s_seq:
            capacity = min(capacity, stride // s_seq)
    if capacity <= length:
        return None
    buf = t.as_strided((batch, heads, capacity, head_dim), t.stride(), t.storage_offset())
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
    reason = sdpa_fast_path_reason(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend=backend
    )
    if reason is None:
        found = _fast_path(query, key, value, scale, backend)
        if not isinstance(found, str):
            the_plan, k_buf, v_buf = found
            seq_lens = torch.full((query.shape[0],), key.shape[2], dtype=torch.int32, device=query.device)
            return the_plan.run(query, k_buf, v_buf, seq_lens)
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
    if torch.compiler.is_compiling():
        return "called inside torch.compile"
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


def _fast_path(query, key, value, scale, backend) -> tuple[DecodePlan, torch.Tensor, torch.Tensor] | str:
    """The plan (from the shared plan cache) and the capacity views for a call that passed the host
    checks, or why not."""
    k_found, v_found = capacity_view(key), capacity_view(value)
    if k_found is None or v_found is None:
        which = "key" if k_found is None else "value"
        return f"{which} is not a leading slice of a larger buffer"
    capacity = min(k_found[1], v_found[1])
    k_buf, v_buf = (t[:, :, :capacity] for t in (k_found[0], v_found[0]))
    lens = torch.empty((query.shape[0],), dtype=torch.int32, device=query.device)  # metadata only
    problem = problem_for_tensors(query, k_buf, v_buf, lens, scale, None, None)
    try:
        choice = PLANS.route(problem, backend).choose(problem, capacity, None)
        made = PLANS.get(problem, choice, asked=backend)
    except UnsupportedError as err:
        if backend != "auto":
            raise
        return f"no backend serves {problem.name}: {err}"
    if backend == "auto" and made.backend == "reference":
        return f"the planner chose the float64 reference for {problem.name} ({made.choice.reason})"
    return made, k_buf, v_buf


def plan_cache_info() -> dict[str, int]:
    """Statistics of the plan cache :func:`sdpa` shares with every entry point
    (:func:`kvdecode.plan.plan_cache_info`)."""
    return PLANS.cache_info()


def clear_plan_cache() -> None:
    """Empty the shared plan cache (:func:`kvdecode.plan.clear_plan_cache`)."""
    PLANS.clear()
