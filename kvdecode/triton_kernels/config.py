"""Launch configuration of the split-KV kernel (stub: being written)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SplitKVConfig:
    num_splits: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


def default_config(problem, sm_count: int | None = None) -> SplitKVConfig:
    raise NotImplementedError
