"""One-time warnings for what kvdecode hands to another attention implementation."""

from __future__ import annotations

import logging
import threading
import warnings

import torch

__all__ = ["KVDecodeFallbackWarning", "reset_warnings", "warn_once", "warned"]

log = logging.getLogger("kvdecode.hf")

_WARNED: set[str] = set()
_LOCK = threading.Lock()


class KVDecodeFallbackWarning(UserWarning):
    """A call that ``attn_implementation="kvdecode"`` hands to torch SDPA or the model's eager attention."""


def warn_once(key: str, message: str) -> None:
    """Warn ``message`` the first time ``key`` is seen in this process; log it at DEBUG every time.

    While torch.compile traces, a key already warned about is skipped without calling anything the
    compiler cannot trace: a fallback layer (e.g. every sliding-window layer of a mixed model) would
    otherwise break the compiled decode step's graph at each such layer. (The DEBUG line is then
    logged only by eager calls.)"""
    if torch.compiler.is_compiling() and key in _WARNED:
        return
    _warn_and_log(key, message)


@torch.compiler.disable
def _warn_and_log(key: str, message: str) -> None:
    log.debug("fallback (%s): %s", key, message)
    with _LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    warnings.warn(f"kvdecode.hf: {message}", KVDecodeFallbackWarning, stacklevel=3)


def warned() -> frozenset[str]:
    """The keys warned about so far (for tests and diagnostics)."""
    with _LOCK:
        return frozenset(_WARNED)


def reset_warnings() -> None:
    """Forget which warnings were given, so each warns once again."""
    with _LOCK:
        _WARNED.clear()
