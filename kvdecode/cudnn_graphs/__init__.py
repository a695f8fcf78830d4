"""cuDNN SDPA graphs built once per cache capacity, real lengths through the padding mask.

Importing this package does not import the cuDNN frontend; ``CudnnBackend().supports(problem)`` says
why cuDNN cannot serve a problem (library missing, no GPU, fp32, head dim, mask, kv_start, ...).
"""

from __future__ import annotations

from .backend import CudnnBackend, CudnnLauncher, problem_reason
from .cache import CacheInfo, GraphCache
from .disk_cache import DiskCache, default_cache_dir
from .key import GraphKey
from .store import cache_info, clear, default_graph_cache

__all__ = [
    "CacheInfo",
    "CudnnBackend",
    "CudnnLauncher",
    "DiskCache",
    "GraphCache",
    "GraphKey",
    "cache_info",
    "clear",
    "default_cache_dir",
    "default_graph_cache",
    "problem_reason",
]
