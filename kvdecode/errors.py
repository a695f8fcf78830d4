"""Exceptions raised by kvdecode.

Every message follows ``"<arg> must be <rule>, got <value>; <fix>"`` so the caller can act on it.
"""

from __future__ import annotations

__all__ = ["KVDecodeError", "UnsupportedError"]


class KVDecodeError(ValueError):
    """Bad input: raised before any kernel launch, naming the argument, the value and the fix."""


class UnsupportedError(KVDecodeError):
    """A backend that was asked for explicitly cannot serve this problem; the message says why."""
