"""Plan once, run many: ``plan`` does the host work, ``DecodePlan.run`` only checks and launches."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from .backends import Launcher, get_backend
from .errors import KVDecodeError, UnsupportedError
from .planner import Choice, choose
from .problem import DecodeProblem

__all__ = ["DecodePlan", "plan", "plan_for_choice"]

log = logging.getLogger("kvdecode.planner")


@dataclass
class DecodePlan:
    """A decode problem bound to a backend, its configuration and its scratch.

    ``run`` checks the tensors against the plan (a mismatch raises :class:`KVDecodeError` naming both
    sides) and launches; it never syncs the host.

    A plan owns scratch (the Triton partials, the cuDNN workspace), so its runs must not overlap: use it
    from one stream at a time, and make one plan per stream (or per thread) that decodes concurrently.
    ``decode_attention`` does this for you (its plans are per current stream).
    """

    problem: DecodeProblem
    choice: Choice
    deterministic: bool
    launcher: Launcher = field(repr=False)

    @property
    def backend(self) -> str:
        return self.choice.backend

    def run(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        seq_lens: torch.Tensor,
        *,
        kv_start: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        return_lse: bool = False,
        lse: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Launch the planned kernel(s); returns ``out`` (and ``lse`` when ``return_lse``).

        Parameters
        ----------
        q, k_cache, v_cache : Tensor
            Same shapes, dtype, device and strides as the plan's problem (``q [B, H_q, T_q, D]``, caches
            ``[B, H_kv, capacity, D]``); a mismatch raises :class:`KVDecodeError` naming both sides.
        seq_lens : int32 Tensor ``[B]``, contiguous, on the plan's device
            Read on the device: they may change between runs (and between CUDA-graph replays).
        kv_start, mask : Tensor, optional
            As planned (given exactly when the plan was made with them).
        out : Tensor ``[B, H_q, T_q, D]``, optional
            Written in place; allocated when None.
        return_lse : bool
            Also return the natural-log LSE, float32 ``[B, H_q, T_q]``.
        lse : float32 Tensor ``[B, H_q, T_q]``, optional
            Written in place; implies ``return_lse``. With ``out`` and ``lse`` given nothing is allocated,
            e.g. inside a captured CUDA graph.
        """
        p = self.problem
        _same("q", q, p.q_strides, (p.batch, p.num_q_heads, p.q_len, p.head_dim), p)
        kv_shape = (p.batch, p.num_kv_heads, p.capacity, p.head_dim)
        _same("k_cache", k_cache, p.k_strides, kv_shape, p)
        _same("v_cache", v_cache, p.v_strides, kv_shape, p)
        _lengths("seq_lens", seq_lens, p)
        if (kv_start is not None) != p.has_kv_start:
            raise KVDecodeError(
                f"kv_start is {'given' if kv_start is not None else 'None'} but the plan was made "
                f"{'with' if p.has_kv_start else 'without'} it; make a new plan"
            )
        if kv_start is not None:
            _lengths("kv_start", kv_start, p)
        _mask(mask, p)
        q_shape = (p.batch, p.num_q_heads, p.q_len, p.head_dim)
        if out is not None:
            _buffer("out", out, q_shape, p.dtype, p)
        if lse is not None:
            _buffer("lse", lse, q_shape[:3], torch.float32, p)
            return_lse = True
        return self._launch(q, k_cache, v_cache, seq_lens, kv_start, mask, out, lse, return_lse)

    def _launch(self, q, k_cache, v_cache, seq_lens, kv_start, mask, out, lse, return_lse):
        """Allocate what is missing and launch, without checks: for callers whose tensors made the problem
        (``decode_attention`` validates them in ``DecodeProblem.from_tensors``)."""
        p = self.problem
        if out is None:
            out = torch.empty((p.batch, p.num_q_heads, p.q_len, p.head_dim), dtype=p.dtype, device=p.device)
        if lse is None and return_lse:
            lse = torch.empty((p.batch, p.num_q_heads, p.q_len), dtype=torch.float32, device=p.device)
        self.launcher(q, k_cache, v_cache, seq_lens, kv_start, mask, out, lse)
        return (out, lse) if return_lse else out


def stream_key(device: torch.device) -> int:
    """Who may run a plan concurrently with others: the current stream of ``device`` (CUDA), else the
    thread. Plan caches key on it, since a plan's scratch serves one stream at a time."""
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return threading.get_ident()


def _lengths(name: str, t: torch.Tensor, p: DecodeProblem) -> None:
    stride_ok = p.batch == 1 or t.stride(0) == 1
    if t.dtype != torch.int32 or tuple(t.shape) != (p.batch,) or t.device != p.device or not stride_ok:
        raise KVDecodeError(
            f"{name} must be a contiguous int32 ({p.batch},) tensor on {p.device}, got {t.dtype} "
            f"{tuple(t.shape)} with stride {tuple(t.stride())} on {t.device}; pass "
            f"{name}.to({str(p.device)!r}, torch.int32).contiguous()"
        )


def _mask(mask: torch.Tensor | None, p: DecodeProblem) -> None:
    if (mask is not None) != (p.mask_kind != "none"):
        raise KVDecodeError(
            f"mask is {'given' if mask is not None else 'None'} but the plan was made with mask kind "
            f"{p.mask_kind!r}; make a new plan"
        )
    if mask is None:
        return
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


def _buffer(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype, p: DecodeProblem) -> None:
    if tuple(t.shape) != shape or t.dtype != dtype or t.device != p.device or t.stride(-1) != 1:
        raise KVDecodeError(
            f"{name} must be {dtype} {shape} on {p.device} with stride(-1) == 1, got {t.dtype} "
            f"{tuple(t.shape)} on {t.device} with strides {tuple(t.stride())}"
        )


def _same(name: str, t: torch.Tensor, strides: tuple, shape: tuple, p: DecodeProblem) -> None:
    if t.dtype != p.dtype:
        raise KVDecodeError(
            f"{name} has dtype {t.dtype} but the plan was made for {p.dtype}; make a new plan"
        )
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


def plan(
    problem: DecodeProblem,
    *,
    backend: str = "auto",
    deterministic: bool = False,
    max_seq_len: int | None = None,
) -> DecodePlan:
    """Choose a backend for ``problem`` and do its host work once (configuration, graph, scratch).

    Parameters
    ----------
    problem : DecodeProblem
        From :meth:`DecodeProblem.from_tensors` on example tensors of the shapes and layout to serve.
    backend : {"auto", "triton", "cudnn", "reference"}
        With ``"auto"`` the choice is made for ``max_seq_len`` (the longest row the plan will serve), or
        for the capacity when it is None: ``run`` never reads the device lengths. A cuDNN graph that fails
        to build under ``"auto"`` falls back to Triton with the reason recorded in ``choice``.
    deterministic : bool
        Bitwise-reproducible results (see :func:`kvdecode.decode_attention`).
    max_seq_len : int, optional
        The longest filled length the plan will see (``<= capacity``).

    Returns
    -------
    DecodePlan
        ``plan.run(q, k_cache, v_cache, seq_lens, out=..., lse=...)`` launches with no host sync; with
        ``out`` (and ``lse``) given it allocates nothing, so a step can be captured in a CUDA graph.

    Raises
    ------
    UnsupportedError
        An explicit ``backend`` cannot serve ``problem``.

    Examples
    --------
    >>> import torch, kvdecode
    >>> q = torch.randn(2, 8, 1, 64); k = torch.randn(2, 2, 256, 64)
    >>> lens = torch.tensor([17, 256], dtype=torch.int32)
    >>> p = kvdecode.plan(kvdecode.DecodeProblem.from_tensors(q, k, k, lens), backend="triton")
    >>> out = torch.empty_like(q)
    >>> p.run(q, k, k, lens, out=out) is out
    True
    """
    choice = choose(problem, backend, max_seq_len=max_seq_len)
    return plan_for_choice(problem, choice, deterministic=deterministic, auto=backend == "auto")


def plan_for_choice(
    problem: DecodeProblem, choice: Choice, *, deterministic: bool = False, auto: bool = False
) -> DecodePlan:
    """Make the plan of an already made choice; under ``auto`` a cuDNN build failure falls back to Triton."""
    try:
        launcher = get_backend(choice.backend).make_launcher(problem, deterministic=deterministic)
    except UnsupportedError as exc:
        if not (auto and choice.backend == "cudnn"):
            raise
        log.debug("auto: cuDNN declined %s at build time (%s); using triton", problem.name, exc)
        choice = Choice(
            "triton", f"auto: cuDNN declined at build time ({exc})", choice.threshold, choice.length
        )
        launcher = get_backend("triton").make_launcher(problem, deterministic=deterministic)
    return DecodePlan(problem=problem, choice=choice, deterministic=deterministic, launcher=launcher)
