"""Triton split-KV ("flash-decoding") vector SDPA.

Without a CUDA device Triton can only run through its interpreter, so importing this package on such a
machine sets ``TRITON_INTERPRET=1`` unless the variable is already set (kernels then run on CPU tensors).
"""

from __future__ import annotations

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from .config import SplitKVConfig, default_config
from .launcher import SplitKVLauncher, TritonBackend

__all__ = ["SplitKVConfig", "SplitKVLauncher", "TritonBackend", "default_config"]
