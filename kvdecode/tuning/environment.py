"""What a tuning table was measured with, and whether it matches the machine at hand.

A table is used only on the GPU it was measured on (same name, same SM count when the device is
visible) and with the same major.minor of kvdecode, torch, Triton and cuDNN: a new compiler or library
moves the crossover and the best tiles. ``KVDECODE_TUNING_MATCH=gpu`` relaxes the check to the GPU
(version differences are then reported, not refused).
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
from dataclasses import dataclass, field

__all__ = [
    "ENV_MATCH",
    "Environment",
    "current_environment",
    "device_gpu_name",
    "gpu_slug",
    "major_minor",
    "mismatch_reasons",
]

ENV_MATCH = "KVDECODE_TUNING_MATCH"
VERSIONED = ("kvdecode", "torch", "triton", "cudnn")  # compared at major.minor


@dataclass(frozen=True)
class Environment:
    """The GPU (name, SM count; None when not visible here) and the library versions."""

    gpu_name: str
    sm_count: int | None
    versions: dict[str, str] = field(hash=False)

    def metadata(self) -> dict:
        """The ``metadata`` block of a table measured here (``provisional`` and ``note`` added later)."""
        return {
            "gpu_name": self.gpu_name,
            "sm_count": self.sm_count,
            "versions": dict(self.versions),
            "date": _dt.date.today().isoformat(),
        }


def major_minor(version: str | None) -> str | None:
    """``"2.11.0+cu130"`` -> ``"2.11"``; None stays None."""
    if not version:
        return None
    parts = str(version).split("+")[0].split(".")
    return ".".join(parts[:2])


def cudnn_version_text(version: int | None) -> str | None:
    """cuDNN's integer version as text: 91900 -> "9.19.0" (cuDNN 9), 8906 -> "8.9.6" (cuDNN 8)."""
    if version is None:
        return None
    if version >= 90000:
        return f"{version // 10000}.{version % 10000 // 100}.{version % 100}"
    return f"{version // 1000}.{version % 1000 // 100}.{version % 100}"


@functools.cache
def current_versions() -> tuple[tuple[str, str | None], ...]:
    """kvdecode, torch, triton, cuDNN library and frontend versions (None for what is missing)."""
    import torch

    from .. import __version__

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    cudnn_lib, frontend = None, None
    try:
        from ..cudnn_graphs.cuda_env import load_cudnn

        module, number, _ = load_cudnn()
        cudnn_lib = cudnn_version_text(number)
        frontend = getattr(module, "__version__", None) if module is not None else None
    except Exception:
        pass
    return (
        ("kvdecode", __version__),
        ("torch", torch.__version__),
        ("triton", triton_version),
        ("cudnn", cudnn_lib),
        ("cudnn_frontend", frontend),
    )


def _sm_count_of(gpu_name: str) -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        if props.name == gpu_name:
            return int(props.multi_processor_count)
    return None


def current_environment(gpu_name: str) -> Environment:
    """This machine as a table would describe it, for the GPU called ``gpu_name``."""
    versions = {k: v for k, v in current_versions() if v is not None}
    return Environment(gpu_name=gpu_name, sm_count=_sm_count_of(gpu_name), versions=versions)


def gpu_slug(gpu_name: str) -> str:
    """A file-name-safe short name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    text = "".join(c.lower() if c.isalnum() else "-" for c in gpu_name)
    return "-".join(part for part in text.split("-") if part) or "gpu"


def check_versions_enabled() -> bool:
    """False when ``KVDECODE_TUNING_MATCH=gpu`` asks to compare the GPU only."""
    return os.environ.get(ENV_MATCH, "strict").strip().lower() != "gpu"


def mismatch_reasons(meta: dict, env: Environment, *, check_versions: bool = True) -> list[str]:
    """Why a table with metadata ``meta`` must not be used in ``env`` (empty: it matches).

    Compared: the GPU name; the SM count when both sides know it; kvdecode, torch, Triton and cuDNN at
    major.minor when ``check_versions`` and both sides know them (a table measured without cuDNN, or a
    machine without it, does not compare cuDNN: the threshold is then unused).
    """
    reasons = []
    if meta.get("gpu_name") != env.gpu_name:
        reasons.append(f"it was measured on {meta.get('gpu_name')!r}, this GPU is {env.gpu_name!r}")
    sm = meta.get("sm_count")
    if isinstance(sm, int) and env.sm_count is not None and sm != env.sm_count:
        reasons.append(f"it was measured with {sm} SMs, this GPU has {env.sm_count}")
    if not check_versions:
        return reasons
    versions = meta.get("versions") or {}
    for name in VERSIONED:
        theirs, ours = major_minor(versions.get(name)), major_minor(env.versions.get(name))
        if theirs and ours and theirs != ours:
            reasons.append(f"it was measured with {name} {versions.get(name)}, this is {env.versions[name]}")
    return reasons


def device_gpu_name(device) -> str:
    """The name of the GPU ``device`` (a ``torch.device``) is on; ``"cpu"`` etc. for other devices."""
    import torch

    if device.type != "cuda":
        return str(device.type)
    if not torch.cuda.is_available():
        return "cuda (not available)"
    index = torch.cuda.current_device() if device.index is None else device.index
    try:
        from ..cudnn_graphs.cuda_env import device_props

        return device_props(index).name
    except Exception:  # cuda-python missing or failing: torch knows the name too
        return torch.cuda.get_device_name(index)
