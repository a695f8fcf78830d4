"""Triton split-KV ("flash-decoding") vector SDPA.

Without a CUDA device Triton can only run through its interpreter, so importing this package on such a
machine sets ``TRITON_INTERPRET=1`` unless the variable is already set (kernels then run on CPU tensors).
"""

from __future__ import annotations

from .. import _interpret  # noqa: F401  (sets TRITON_INTERPRET=1 where there is no CUDA)
from .config import SplitKVConfig, default_config
from .launcher import SplitKVLauncher, TritonBackend

__all__ = ["SplitKVConfig", "SplitKVLauncher", "TritonBackend", "default_config"]
