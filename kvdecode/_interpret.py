"""Where there is no CUDA device, Triton can run kernels only through its interpreter.

Triton decides interpreted-or-compiled when it decorates functions, including its own standard library
(``tl.zeros``, ``tl.sum``, ...), i.e. when ``triton`` is first imported. So ``kvdecode`` sets
``TRITON_INTERPRET=1`` on import where CUDA is unavailable and the variable is unset, before anything
imports ``triton``. If ``triton`` was imported earlier with the interpreter off, the Triton backend says so
(see :func:`interpreter_problem`) instead of failing inside a kernel.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

_TRITON_PREIMPORTED = "triton" in sys.modules
_SET_BY_KVDECODE = False

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    _SET_BY_KVDECODE = True


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def interpreter_problem() -> str | None:
    """Why the interpreter cannot work in this process, or None."""
    if _SET_BY_KVDECODE and _TRITON_PREIMPORTED:
        return (
            "triton was imported before kvdecode with TRITON_INTERPRET unset, so its kernels cannot "
            "run through the interpreter; set TRITON_INTERPRET=1 before importing triton "
            "(or import kvdecode first)"
        )
    return None


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current device (and its current stream): switch to ``device`` if needed."""
    if device.type != "cuda" or interpreter_active() or torch.cuda.current_device() == device.index:
        return contextlib.nullcontext()
    return torch.cuda.device(device)
