"""Launcher of the split-KV kernel (stub: being written)."""
from __future__ import annotations


class SplitKVLauncher:
    def __init__(self, problem, config=None, *, deterministic: bool = False) -> None:
        raise NotImplementedError


class TritonBackend:
    name = "triton"

    def supports(self, problem):
        return None

    def make_launcher(self, problem, *, deterministic: bool = False, config=None):
        return SplitKVLauncher(problem, config, deterministic=deterministic)
