"""Backends as data: each answers ``supports(problem) -> reason or None`` and makes launchers.

A launcher is made once per plan (its configuration, compiled kernels and, for cuDNN, its graphs) and is
then called with the tensors of each step; it only launches work and never syncs the host. It holds no
per-call state: scratch is allocated per call from torch's caching allocator, so one launcher may run
on several threads and streams at once.
"""

from __future__ import annotations

import threading
from typing import Protocol

import torch

from .problem import DecodeProblem

__all__ = ["Backend", "Launcher", "ReferenceBackend", "get_backend", "register_backend"]


class Launcher(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        seq_lens: torch.Tensor,
        kv_start: torch.Tensor | None,
        mask: torch.Tensor | None,
        out: torch.Tensor,
        lse: torch.Tensor | None,
        scales: tuple[torch.Tensor, torch.Tensor] | None = None,  # fp8 caches: (k_scale, v_scale)
        sinks: torch.Tensor
        | None = None,  # [H_q] attention sinks (passed only when planned, in the planned dtype)
    ) -> None: ...


class Backend(Protocol):
    """``name``; ``supports``; ``make_launcher``. A backend whose results are not bitwise repeatable call
    to call may say why in a ``determinism_gap`` attribute (a one-line reason, read with ``getattr``):
    the planner then keeps ``deterministic=True`` calls away from it."""

    name: str

    def supports(self, problem: DecodeProblem) -> str | None:
        """``None`` when this backend can serve ``problem``, else a one-line reason why not."""

    def make_launcher(self, problem: DecodeProblem, *, deterministic: bool = False) -> Launcher:
        """Host work done once: configuration, compiled kernels or graphs."""


class _ReferenceLauncher:
    def __init__(self, problem: DecodeProblem) -> None:
        self.problem = problem

    def __call__(
        self, q, k_cache, v_cache, seq_lens, kv_start, mask, out, lse, scales=None, sinks=None
    ) -> None:
        from .reference import reference_decode_attention

        k_scale, v_scale = scales if scales is not None else (None, None)
        ref_out, ref_lse = reference_decode_attention(
            q, k_cache, v_cache, seq_lens, scale=self.problem.scale, kv_start=kv_start, mask=mask,
            k_scale=k_scale, v_scale=v_scale, window=self.problem.window, softcap=self.problem.softcap,
            sinks=sinks,
        )  # fmt: skip
        out.copy_(ref_out.to(out.device, out.dtype))
        if lse is not None:
            lse.copy_(ref_lse.to(lse.device, lse.dtype))


class ReferenceBackend:
    """The float64 reference as a backend: slow, syncs the host, always right."""

    name = "reference"

    def supports(self, problem: DecodeProblem) -> str | None:
        return None

    def make_launcher(self, problem: DecodeProblem, *, deterministic: bool = False) -> Launcher:
        return _ReferenceLauncher(problem)


_REGISTRY: dict[str, Backend] = {}
_REGISTRY_LOCK = threading.Lock()


def register_backend(backend: Backend) -> None:
    _ensure_registered()  # the built-ins first, or a registry filled before the first lookup lacks them
    _REGISTRY[backend.name] = backend


def get_backend(name: str) -> Backend:
    """The backend registered under ``name``; import-time registration keeps this a dict lookup."""
    _ensure_registered()
    return _REGISTRY[name]


def backend_names() -> tuple[str, ...]:
    _ensure_registered()
    return tuple(_REGISTRY)


def _ensure_registered() -> None:
    """Register the built-in backends once (a name registered before keeps its backend). "reference"
    goes in last: its presence tells, without the lock, that every built-in is in."""
    if "reference" in _REGISTRY:
        return
    with _REGISTRY_LOCK:
        if "reference" in _REGISTRY:
            return
        from .triton_kernels import TritonBackend

        _REGISTRY.setdefault("triton", TritonBackend())
        try:  # importing it does not import the cuDNN frontend; supports() says when cuDNN is unusable
            from .cudnn_graphs import CudnnBackend
        except ImportError:
            pass
        else:
            _REGISTRY.setdefault("cudnn", CudnnBackend())
        _REGISTRY.setdefault("reference", ReferenceBackend())
