"""The planner: which backend serves a call, and why.

``auto`` picks per call from the longest filled row ``L``: Triton's split-KV kernel below the cuDNN
threshold (a crossover length measured on the GPU, see :mod:`kvdecode.thresholds`), the cuDNN capacity
graph at or above it when cuDNN can serve the problem. ``L`` is, in this order:

1. ``max_seq_len`` when the caller gives it (no device read);
2. the capacity when it is below the threshold (Triton whatever the lengths are; nothing read), or when
   no lengths are at hand (``plan``), or when the current stream is capturing a CUDA graph;
3. otherwise ``seq_lens.max()``: one host sync. Pass ``max_seq_len`` or use ``plan``/``run`` to avoid it.

What cuDNN cannot serve goes to Triton; the reason is in the :class:`Choice` (see :func:`explain`) and in
the DEBUG log of the ``kvdecode.planner`` logger. ``deterministic=True`` is one such case: cuDNN's decode
engine is not bitwise repeatable (``CudnnBackend.determinism_gap``), so those calls go to Triton.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .backends import backend_names, get_backend
from .errors import KVDecodeError, UnsupportedError
from .problem import DecodeProblem, capturing
from .thresholds import Threshold, threshold_for
from .tuning.environment import device_gpu_name

__all__ = ["BACKEND_NAMES", "Choice", "Route", "auto_threshold", "choose", "explain", "route"]

log = logging.getLogger("kvdecode.planner")

BACKEND_NAMES = ("auto", "triton", "cudnn", "reference")  # the built-in ones (CLI choices)


@dataclass(frozen=True)
class Choice:
    """The planner's answer: the backend, a one-line reason, the threshold and length it used (if any)."""

    backend: str
    reason: str
    threshold: int | None = None
    length: int | None = None


def check_backend_name(backend: object) -> str:
    if isinstance(backend, str) and backend in BACKEND_NAMES:  # no registry lookup: traceable by dynamo
        return backend
    names = ("auto", *dict.fromkeys((*BACKEND_NAMES[1:], *backend_names())))
    if not isinstance(backend, str) or backend not in names:
        raise KVDecodeError(f"backend must be one of {', '.join(map(repr, names))}, got {backend!r}")
    return backend


def check_max_seq_len(max_seq_len: object, problem: DecodeProblem) -> int | None:
    if max_seq_len is None:
        return None
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int):
        raise KVDecodeError(f"max_seq_len must be an int or None, got {max_seq_len!r}")
    if not problem.q_len <= max_seq_len <= problem.capacity:
        raise KVDecodeError(
            f"max_seq_len must be in T_q..capacity ({problem.q_len}..{problem.capacity}), got {max_seq_len}; "
            "it is the longest filled row, the new tokens included"
        )
    return max_seq_len


def _reason(name: str, problem: DecodeProblem, deterministic: bool = False) -> str | None:
    if name not in backend_names():
        return f"backend {name!r} is not available in this installation"
    backend = get_backend(name)
    reason = backend.supports(problem)
    if reason is None and deterministic:
        reason = getattr(backend, "determinism_gap", None)
    return reason


def _auto_cudnn_reason(problem: DecodeProblem) -> str | None:
    """Problems cuDNN serves when asked explicitly but that ``auto`` keeps away from it."""
    if problem.q_len > 1:
        return (
            "T_q > 1: cuDNN's bottom-right causal graph reads unfilled cache slots and NaN there reaches "
            "the output (cuDNN 9.19, seen 2026-11-25); the Triton kernel never does"
        )
    return None


def auto_threshold(problem: DecodeProblem) -> Threshold:
    """The cuDNN crossover length for ``problem`` on its GPU (from the tuning table, else the
    no-table rule of :mod:`kvdecode.no_table_rule`, which needs the SM count)."""
    return threshold_for(
        problem.head_dim,
        problem.dtype_name,
        problem.batch,
        device_gpu_name(problem.device),
        num_q_heads=problem.num_q_heads,
        num_kv_heads=problem.num_kv_heads,
        q_len=problem.q_len,
        sm_count=device_sm_count(problem.device),
    )


def device_sm_count(device: torch.device) -> int | None:
    """The SM count of a CUDA ``device``; None elsewhere or when it cannot be read."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        from .cudnn_graphs.cuda_env import device_props

        index = torch.cuda.current_device() if device.index is None else device.index
        return int(device_props(index).sm_count)
    except Exception:  # cuda-python missing or failing: torch knows it too
        try:
            return torch.cuda.get_device_properties(device).multi_processor_count
        except Exception:
            return None


@dataclass(frozen=True)
class Route:
    """What the planner decides about a problem before seeing any length (made once per problem and
    backend asked for, memoized by the plan cache): a fixed choice, or the cuDNN threshold to compare the
    length with."""

    fixed: Choice | None
    threshold: Threshold | None = None

    def backend_for(
        self, problem: DecodeProblem, max_seq_len: int | None, seq_lens: torch.Tensor | None
    ) -> tuple[str, tuple[int, str] | None]:
        """The backend :meth:`choose` picks, without its reason, and the length it compared (None for a
        fixed choice); hand both to :meth:`choose` so that a miss reads the lengths only once."""
        if self.fixed is not None:
            return self.fixed.backend, None
        value = self.threshold.value
        length = _length(problem, value, max_seq_len, seq_lens)
        return ("triton" if length[0] < value else "cudnn"), length

    def choose(
        self,
        problem: DecodeProblem,
        max_seq_len: int | None,
        seq_lens: torch.Tensor | None,
        decided: tuple[str, tuple[int, str] | None] | None = None,
    ) -> Choice:
        """The backend for this call and why. ``decided``: what :meth:`backend_for` returned for the same
        arguments (the lengths are then not read again)."""
        if self.fixed is not None:
            if max_seq_len is None or self.fixed.threshold is not None:
                return self.fixed
            return Choice(self.fixed.backend, self.fixed.reason, None, max_seq_len)
        threshold = self.threshold
        name, (length, how) = decided or self.backend_for(problem, max_seq_len, seq_lens)
        sign = "<" if name == "triton" else ">="
        tag = f" (provisional: {threshold.source})" if threshold.provisional else ""
        reason = f"auto: length {length} from {how} {sign} cuDNN threshold {threshold.value}{tag}"
        choice = Choice(name, reason, threshold.value, length)
        log.debug("%s -> %s: %s", problem.name, choice.backend, choice.reason)
        return choice


def route(problem: DecodeProblem, backend: str = "auto", *, deterministic: bool = False) -> Route:
    """The length-independent part of :func:`choose`: which backends can serve ``problem`` and, when both
    can, the cuDNN threshold. An explicit backend that cannot serve it raises :class:`UnsupportedError`.
    With ``deterministic`` a backend that is not bitwise repeatable (its ``determinism_gap``) cannot."""
    check_backend_name(backend)
    if backend != "auto":
        reason = _reason(backend, problem, deterministic)
        if reason is not None:
            raise UnsupportedError(f"backend {backend!r} cannot serve {problem.name}: {reason}")
        return Route(Choice(backend, "asked for explicitly"))
    # every registered backend but the float64 reference is a candidate, in registration order
    reasons = {
        name: _auto_reason(name, problem, deterministic) for name in backend_names() if name != "reference"
    }
    usable = [name for name, reason in reasons.items() if reason is None]
    if {"triton", "cudnn"} <= set(usable):  # the measured crossover decides, per call
        return Route(None, auto_threshold(problem))
    refused = "; ".join(f"{name} cannot serve it ({reason})" for name, reason in reasons.items() if reason)
    if not usable:
        log.debug("auto: no backend serves %s: %s", problem.name, refused)
        return Route(Choice("reference", f"auto: {refused}"))
    log.debug("auto: %s serves %s; %s", usable[0], problem.name, refused)
    threshold = auto_threshold(problem).value if usable[0] == "cudnn" else None
    return Route(Choice(usable[0], f"auto: {refused}", threshold))


def _auto_reason(name: str, problem: DecodeProblem, deterministic: bool) -> str | None:
    reason = _reason(name, problem, deterministic)
    if reason is None and name == "cudnn":
        reason = _auto_cudnn_reason(problem)
    return reason


def choose(
    problem: DecodeProblem,
    backend: str = "auto",
    *,
    max_seq_len: int | None = None,
    seq_lens: torch.Tensor | None = None,
    deterministic: bool = False,
) -> Choice:
    """Pick the backend for ``problem``.

    An explicit backend that cannot serve the problem raises :class:`UnsupportedError` with its reason.
    ``auto`` follows the rules in this module's docstring; with ``seq_lens`` given and neither
    ``max_seq_len`` nor a capture nor a capacity below the threshold, it reads ``seq_lens.max()`` (a host
    sync). ``deterministic`` keeps the call on bitwise-repeatable backends (Triton, not cuDNN).
    """
    check_backend_name(backend)
    max_seq_len = check_max_seq_len(max_seq_len, problem)
    return route(problem, backend, deterministic=deterministic).choose(problem, max_seq_len, seq_lens)


def _length(
    problem: DecodeProblem, threshold: int, max_seq_len: int | None, seq_lens: torch.Tensor | None
) -> tuple[int, str]:
    if max_seq_len is not None:
        return max_seq_len, "max_seq_len"
    if problem.capacity < threshold:
        return problem.capacity, "the capacity (below the threshold, lengths not read)"
    if seq_lens is None:
        return problem.capacity, "the capacity (no lengths at plan time)"
    if seq_lens.is_cuda and capturing(problem.device):
        return problem.capacity, "the capacity (capturing a CUDA graph)"
    return int(seq_lens.max().item()), "seq_lens.max() (one host sync)"


def explain(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    kv_start: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    max_seq_len: int | None = None,
    deterministic: bool = False,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> Choice:
    """The choice :func:`kvdecode.decode_attention` would make for these arguments, without running it.

    Shapes as in :func:`kvdecode.decode_attention`. Returns a :class:`Choice` with ``backend``,
    ``reason`` (why, e.g. what cuDNN cannot serve, or that ``deterministic=True`` keeps it off cuDNN) and
    ``threshold`` (the cuDNN crossover length used, None when cuDNN was out of the running). Like the
    call itself, it may read ``seq_lens.max()``.

    Examples
    --------
    >>> import torch, kvdecode
    >>> q = torch.randn(1, 4, 1, 64); k = torch.randn(1, 1, 128, 64)
    >>> kvdecode.explain(q, k, k, torch.tensor([5], dtype=torch.int32)).backend
    'triton'
    """
    problem = DecodeProblem.from_tensors(
        q, k_cache, v_cache, seq_lens, scale=scale, kv_start=kv_start, mask=mask, window=window,
        softcap=softcap, sinks=sinks,
    )  # fmt: skip
    return choose(problem, backend, max_seq_len=max_seq_len, seq_lens=seq_lens, deterministic=deterministic)
