"""The planner: which backend serves a problem, and why.

``choose`` is pure host logic over a :class:`DecodeProblem`; it never reads device values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .backends import Backend, backend_names, get_backend
from .errors import KVDecodeError, UnsupportedError
from .problem import DecodeProblem

__all__ = ["BACKEND_NAMES", "Choice", "choose"]

log = logging.getLogger("kvdecode.planner")

BACKEND_NAMES = ("auto", "triton", "cudnn", "reference")


@dataclass(frozen=True)
class Choice:
    """The planner's answer: the backend, a one-line reason, and the threshold it used (if any)."""

    backend: str
    reason: str
    threshold: int | None = None


def check_backend_name(backend: object) -> str:
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise KVDecodeError(f"backend must be one of {', '.join(map(repr, BACKEND_NAMES))}, got {backend!r}")
    return backend


def choose(problem: DecodeProblem, backend: str = "auto", *, max_seq_len: int | None = None) -> Choice:
    """Pick the backend for ``problem``.

    An explicit backend that cannot serve the problem raises :class:`UnsupportedError` with its reason.
    ``auto`` orders the candidates and takes the first that supports the problem.
    """
    check_backend_name(backend)
    if backend != "auto":
        if backend not in backend_names():
            raise UnsupportedError(f"backend {backend!r} is not available in this installation")
        reason = get_backend(backend).supports(problem)
        if reason is not None:
            raise UnsupportedError(f"backend {backend!r} cannot serve {problem.name}: {reason}")
        return Choice(backend, "asked for explicitly")
    candidate: Backend = get_backend("triton")
    reason = candidate.supports(problem)
    if reason is None:
        return Choice("triton", "auto: the Triton split-KV kernel serves every length")
    log.debug("triton cannot serve %s: %s; using the reference", problem.name, reason)
    return Choice("reference", f"auto: triton cannot serve it ({reason})")
