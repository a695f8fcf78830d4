"""Which torch SDPA backend served a benchmark's SDPA call, and how fast each backend is on it.

``torch.nn.functional.scaled_dot_product_attention`` picks a backend (cuDNN attention, flash, memory
efficient, math) per call; the benchmark compares against what a user gets with the default dispatch and
records who that was. Two independent pieces of evidence:

- **bitwise**: the call is run once with the default dispatch and once under
  ``torch.nn.attention.sdpa_kernel([backend])`` for each backend; a backend whose output is bitwise equal
  to the default's served it (each backend's forward is deterministic; different backends round
  differently);
- **kernels**: the CUDA kernel names the profiler saw for the default call (:func:`backend_from_kernels`),
  taken only when the bitwise evidence does not name exactly one backend (the profiler is kept out of
  the runs otherwise: its callbacks could add host time to the isolated measures that follow).

Each backend that runs is also timed in isolation (``do_bench``, short), so the record says whether a
backend the dispatcher did not pick would have been faster. Pure host logic except :func:`sdpa_served_by`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from kvdecode.timing import isolated_us

__all__ = ["CANDIDATES", "backend_from_kernels", "sdpa_served_by", "served_by"]

CANDIDATES = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")

# Kernel-name fragments, most specific first: cuDNN's SDPA kernels can carry "flash" in their names too.
_KERNEL_MARKS = (
    ("CUDNN_ATTENTION", ("cudnn",)),
    ("FLASH_ATTENTION", ("flash_fwd", "flash::", "pytorch_flash")),
    ("EFFICIENT_ATTENTION", ("fmha_cutlass", "efficient_attention", "mem_eff")),
)


def backend_from_kernels(names: Iterable[str]) -> str | None:
    """The SDPA backend the CUDA kernel ``names`` of one call belong to; ``MATH`` when only other kernels
    ran (gemms, softmax), None when no kernel was seen."""
    lowered = [n.lower() for n in names]
    if not lowered:
        return None
    for backend, marks in _KERNEL_MARKS:
        if any(m in n for n in lowered for m in marks):
            return backend
    return "MATH"


def served_by(same_as_default: Mapping[str, bool | None], kernel_backend: str | None) -> str:
    """The backend that served the default call.

    ``same_as_default[b]``: True when backend ``b`` alone gave the default's output bitwise, False when it
    gave another, None when it cannot run the call. One bitwise match decides; several are split by the
    kernel names; none leaves the kernel names (``"unknown"`` without them). A disagreement between the two
    pieces of evidence is reported as such, never silently resolved.
    """
    same = [b for b in CANDIDATES if same_as_default.get(b)]
    if len(same) == 1:
        if kernel_backend not in (None, same[0]):
            return f"ambiguous: bitwise {same[0]}, kernels {kernel_backend}"
        return same[0]
    if kernel_backend is not None and (not same or kernel_backend in same):
        return kernel_backend
    return "ambiguous: " + ", ".join(same) if same else "unknown"


def sdpa_served_by(call: Callable[[], torch.Tensor], *, warmup_ms: int = 5, rep_ms: int = 20) -> dict:
    """Record which SDPA backend serves ``call`` (a zero-argument SDPA call returning its output).

    Returns ``sdpa_backend`` (:func:`served_by`), ``sdpa_kernels`` (the default call's kernel names, when
    needed), ``sdpa_backends`` (per backend: ``runs``, ``same_as_default``, ``isolated_us`` or ``reason``) and
    ``sdpa_fastest``. Never raises: a backend that cannot run the call is recorded with the reason.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    reference = call()
    torch.cuda.synchronize()
    per: dict[str, dict] = {}
    for name in CANDIDATES:
        try:
            with sdpa_kernel([getattr(SDPBackend, name)]):
                out = call()
                torch.cuda.synchronize()
                equal = bool(torch.equal(out, reference))
                us = isolated_us(call, warmup_ms=warmup_ms, rep_ms=rep_ms)
            per[name] = {"runs": True, "same_as_default": equal, "isolated_us": us}
        except Exception as exc:  # "no available kernel", out of memory: this backend cannot serve it
            per[name] = {
                "runs": False,
                "same_as_default": None,
                "reason": f"{type(exc).__name__}: {exc}"[:300],
            }
    torch.cuda.empty_cache()  # the math backend's repeated K/V
    same = {b: r["same_as_default"] for b, r in per.items()}
    kernels = [] if sum(bool(s) for s in same.values()) == 1 else _kernel_names(call)
    running = {b: r["isolated_us"] for b, r in per.items() if r["runs"]}
    return {
        "sdpa_backend": served_by(same, backend_from_kernels(kernels)),
        "sdpa_kernels": kernels[:8],
        "sdpa_backends": per,
        "sdpa_fastest": min(running, key=running.get) if running else None,
    }


def _kernel_names(call: Callable[[], object]) -> list[str]:
    """CUDA kernel names of one ``call`` under the profiler; [] when the profiler is unavailable."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        return sorted({e.key for e in prof.key_averages() if "cuda" in str(e.device_type).lower()})
    except Exception:
        return []
