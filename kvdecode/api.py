"""The public entry point: ``decode_attention``."""

from __future__ import annotations

import torch

from ._checks import check_outputs
from .errors import KVDecodeError
from .plan import PLANS, check_flag
from .planner import check_backend_name, check_max_seq_len
from .problem import DecodeProblem

__all__ = ["check_lengths", "decode_attention", "problem_for_tensors"]


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    kv_start: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    out: torch.Tensor | None = None,
    return_lse: bool = False,
    validate: bool = False,
    deterministic: bool = False,
    max_seq_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Attention of a few new query tokens against a fixed-capacity KV cache.

    Query ``t`` of row ``b`` sits at position ``p = seq_lens[b] - T_q + t`` and sees keys
    ``kv_start[b] .. p`` (bottom-right causal), with a sliding ``window`` only ``p - window + 1 .. p``,
    further restricted by ``mask``::

        out[b, h, t] = softmax_j(cap(scale * q[b, h, t] . k[b, h // G, j]) + mask) @ v[b, h // G, j]

    with ``G = H_q // H_kv`` (GQA; MQA when ``H_kv = 1``). Lengths are read on the device: no host
    sync, no recompilation as they change.

    Parameters
    ----------
    q : Tensor ``[B, H_q, T_q, D]``
        Queries; float16, bfloat16 or float32; any strides with ``q.stride(-1) == 1``.
    k_cache, v_cache : Tensor ``[B, H_kv, capacity, D]``
        The caches in logical BHSD; a BSHD buffer is passed as ``buf.transpose(1, 2)``. q's dtype, or
        ``torch.float8_e4m3fn`` / ``torch.float8_e5m2`` (with fp16/bf16 q): K/V read as fp8, half the
        bytes, dequantized in the kernel by ``k_scale`` / ``v_scale``.
    seq_lens : int32 Tensor ``[B]`` on q's device
        Filled length of each row, the ``T_q`` new tokens included (``T_q <= seq_lens <= capacity``).
    scale : float, optional
        Score scale; defaults to ``1 / sqrt(D)``.
    kv_start : int32 Tensor ``[B]``, optional
        Keys before ``kv_start[b]`` are masked (left padding).
    mask : Tensor, optional
        Broadcastable to ``[B, H_q, T_q, capacity]``: bool (True = attend) or float (added to scores).
        Slots outside ``kv_start .. seq_lens`` may hold anything, NaN too (but see ``backend`` for an
        explicit cuDNN with T_q > 1); a slot inside that range that the mask hides still has its value
        row multiplied by a zero weight, so it must be finite (as with torch SDPA: 0 x NaN is NaN).
    window : int, optional
        Sliding window (Mistral, Gemma 2/3, gpt-oss layers): each query sees its last ``window`` keys,
        itself included. The Triton kernel reads only the tiles the window covers, so the time follows
        the window, not the filled length; cuDNN does not take it (``auto`` picks Triton).
    softcap : float, optional
        Logit softcapping (Gemma 2): ``cap(x) = softcap * tanh(x / softcap)`` on the scaled scores, before
        the mask (``cap(x) = x`` without it). Triton only, like ``window``.
    sinks : Tensor ``[H_q]``, optional
        Attention sinks (gpt-oss): one logit per query head added to the softmax's denominator (it takes
        a share of the attention and gives back no value); the LSE includes it, so a query that sees
        nothing gets zeros and ``LSE = sinks[h]``. float32, bfloat16 or float16 (read as float32).
        Triton only.
    backend : {"auto", "triton", "cudnn", "reference"}
        ``auto`` lets the planner choose; an explicit backend that cannot serve the problem raises
        :class:`~kvdecode.UnsupportedError`. ``auto`` sends T_q > 1 to Triton: cuDNN 9.19's bottom-right
        causal graph lets NaN in unfilled slots reach the output, so an explicit ``"cudnn"`` with
        T_q > 1 needs finite values there (a zero-initialised cache, as ``StaticKVCache``'s).
    out : Tensor ``[B, H_q, T_q, D]``, optional
        Written in place and returned.
    return_lse : bool
        Also return the natural-log log-sum-exp, float32 ``[B, H_q, T_q]``.
    validate : bool
        Sync and check the device lengths (``T_q <= seq_lens <= capacity``, ``kv_start <= seq_lens -
        T_q``). Off by default: the kernels clamp so nothing is read outside the cache.
    deterministic : bool
        Bitwise-reproducible results (output and LSE): served by the Triton kernel, whose merge order is
        fixed. cuDNN is not used: its decode engine (cuDNN 9.19) gave an LSE that varied by 1 ulp across
        identical calls even with non-deterministic engines deselected, so ``auto`` picks Triton and
        ``backend="cudnn"`` raises :class:`~kvdecode.UnsupportedError`; :func:`kvdecode.explain` with
        ``deterministic=True`` says so.
    max_seq_len : int, optional
        An upper bound of ``seq_lens`` (``T_q <= max_seq_len <= capacity``) for ``backend="auto"``, which
        picks Triton below the cuDNN threshold length and cuDNN at or above it. Without it, ``auto``
        decides from the capacity when the capacity is below the threshold or a CUDA graph is being
        captured, and otherwise reads ``seq_lens.max()``: **one host sync per call**. To avoid it pass
        ``max_seq_len``, or use :func:`kvdecode.plan` once and ``DecodePlan.run`` per step.
        :func:`kvdecode.explain` tells which backend a call gets and why.
    k_scale, v_scale : float32 Tensor ``[]``, ``[1]`` or ``[H_kv]``, optional
        fp8 caches only, both or neither (neither means 1.0): the real keys and values are
        ``k_cache * k_scale`` and ``v_cache * v_scale`` (one scale, or one per KV head), on q's device.
        ``k_scale`` is folded into the score scale and ``v_scale`` into the output. Triton serves fp8
        caches; cuDNN does not (``explain`` says so).

    Returns
    -------
    Tensor ``[B, H_q, T_q, D]`` in q's dtype, or ``(out, lse)`` with ``return_lse``. A row with nothing
    visible gives zeros and ``lse = -inf``, never NaN.

    Raises
    ------
    KVDecodeError
        Bad input, before any launch; the message names the argument, the value and the fix.
    UnsupportedError
        ``backend`` names a backend that cannot serve the problem; the message says why.

    Examples
    --------
    >>> import torch, kvdecode
    >>> q = torch.randn(2, 8, 1, 64)
    >>> k = torch.randn(2, 2, 256, 64); v = torch.randn(2, 2, 256, 64)
    >>> lens = torch.tensor([17, 256], dtype=torch.int32)
    >>> kvdecode.decode_attention(q, k, v, lens).shape
    torch.Size([2, 8, 1, 64])
    """
    check_backend_name(backend)
    for flag, value in (("return_lse", return_lse), ("validate", validate), ("deterministic", deterministic)):
        check_flag(flag, value)
    problem = problem_for_tensors(
        q, k_cache, v_cache, seq_lens, scale, kv_start, mask, k_scale, v_scale, window, softcap, sinks
    )
    scales = None if problem.kv_scale_kind == "none" else (k_scale, v_scale)
    if out is not None:  # before planning: the inputs made the problem, so they match it
        check_outputs(problem, q, k_cache, v_cache, seq_lens, kv_start, mask, out, None, scales, sinks)
    if validate:
        check_lengths(seq_lens, kv_start, q_len=problem.q_len, capacity=problem.capacity)
    max_seq_len = check_max_seq_len(max_seq_len, problem)
    the_plan = PLANS.plan_for_call(problem, backend, deterministic, max_seq_len, seq_lens)
    # the problem was made from these very tensors (and keys the plan): no second round of checks
    return the_plan._launch(
        q, k_cache, v_cache, seq_lens, kv_start, mask, out, None, return_lse, scales, sinks
    )


def _meta(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (t.dtype, t.shape, t.stride(), t.device)  # (get_device(): -1 on meta too)


def problem_for_tensors(
    q,
    k_cache,
    v_cache,
    seq_lens,
    scale,
    kv_start,
    mask,
    k_scale=None,
    v_scale=None,
    window=None,
    softcap=None,
    sinks=None,
) -> DecodeProblem:
    """``DecodeProblem.from_tensors`` for these tensors, looked up (an alias in the plan cache) by their
    metadata when a call with the same shapes, strides, dtypes, devices, alignment and scale was
    validated before. Only a scale that is None, an int or a float is part of an alias (by value); any
    other (a 0-d tensor, whose repr rounds to 4 digits, a numpy scalar...) is validated every call."""
    try:
        if scale is not None and type(scale) is not float and type(scale) is not int:
            raise TypeError("no alias for this scale type")
        if (window is not None and type(window) is not int) or (
            softcap is not None and type(softcap) is not float and type(softcap) is not int
        ):
            raise TypeError("no alias for this window or softcap type")  # from_tensors names it
        alias = (
            "problem", _meta(q), _meta(k_cache), _meta(v_cache), _meta(seq_lens), _meta(kv_start),
            _meta(mask), scale, _meta(k_scale), _meta(v_scale), window, softcap, _meta(sinks),
            q.data_ptr() % 16 == 0 and k_cache.data_ptr() % 16 == 0 and v_cache.data_ptr() % 16 == 0,
        )  # fmt: skip
        found = PLANS.problem_for(alias)
    except (AttributeError, TypeError):  # not tensors (or unhashable): from_tensors names the argument
        alias = found = None
    if found is not None:
        return found
    problem = DecodeProblem.from_tensors(
        q, k_cache, v_cache, seq_lens, scale=scale, kv_start=kv_start, mask=mask,
        k_scale=k_scale, v_scale=v_scale, window=window, softcap=softcap, sinks=sinks,
    )  # fmt: skip
    if alias is not None:
        problem = PLANS.remember(alias, problem)
    return problem


def check_lengths(
    seq_lens: torch.Tensor, kv_start: torch.Tensor | None, *, q_len: int, capacity: int
) -> None:
    """Sync and check device lengths; raises :class:`KVDecodeError` naming the first bad row."""
    lens = seq_lens.detach().cpu().tolist()
    for b, n in enumerate(lens):
        if n > capacity:
            raise KVDecodeError(
                f"seq_lens[{b}] must be <= capacity ({capacity}), got {n}; the cache row is full"
            )
        if n < q_len:
            raise KVDecodeError(
                f"seq_lens[{b}] must be >= T_q ({q_len}), got {n}; seq_lens counts the new tokens too"
            )
    if kv_start is not None:
        for b, (s, n) in enumerate(zip(kv_start.detach().cpu().tolist(), lens)):
            if s < 0 or s > n - q_len:
                raise KVDecodeError(
                    f"kv_start[{b}] must be in 0..seq_lens[{b}] - T_q ({n - q_len}), got {s}; "
                    "it marks the first real token of a left-padded row"
                )
