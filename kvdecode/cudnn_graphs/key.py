"""The graph-cache key: everything a cuDNN SDPA graph bakes in, and nothing that changes per step.

Lengths (``seq_lens``) are device values passed through the padding mask at run time, so they are not
part of the key: one graph per capacity serves every length ``1..capacity``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from ..problem import DecodeProblem, Strides, shape_name_parts

__all__ = ["GraphKey", "contiguous_strides"]


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of ``shape``."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


@dataclass(frozen=True)
class GraphKey:
    """Everything the cuDNN graph bakes in.

    The output ``O`` ``[B, H_q, T_q, D]`` and the stats ``[B, H_q, T_q, 1]`` are always row-major (the
    launcher copies into other layouts); ``seq_len_q`` / ``seq_len_kv`` are ``[B, 1, 1, 1]`` int32.
    """

    batch: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    q_len: int
    capacity: int
    q_strides: Strides
    k_strides: Strides
    v_strides: Strides
    o_strides: Strides
    dtype: str  # "fp16" | "bf16"
    scale: float
    causal_bottom_right: bool  # T_q > 1: query t sees keys <= seq_len_kv - T_q + t
    device_index: int
    cudnn_version: int
    deterministic: bool
    with_lse: bool

    @classmethod
    def from_problem(
        cls,
        problem: DecodeProblem,
        *,
        deterministic: bool,
        with_lse: bool,
        cudnn_version: int,
        device_index: int | None = None,
    ) -> GraphKey:
        index = problem.device.index if device_index is None else device_index
        shape = (problem.batch, problem.num_q_heads, problem.q_len, problem.head_dim)
        return cls(
            batch=problem.batch,
            num_q_heads=problem.num_q_heads,
            num_kv_heads=problem.num_kv_heads,
            head_dim=problem.head_dim,
            q_len=problem.q_len,
            capacity=problem.capacity,
            q_strides=tuple(problem.q_strides),
            k_strides=tuple(problem.k_strides),
            v_strides=tuple(problem.v_strides),
            o_strides=contiguous_strides(shape),
            dtype=problem.dtype_name,
            scale=float(problem.scale),
            causal_bottom_right=problem.q_len > 1,
            device_index=0 if index is None else int(index),
            cudnn_version=int(cudnn_version),
            deterministic=bool(deterministic),
            with_lse=bool(with_lse),
        )

    @property
    def stats_strides(self) -> Strides:
        return contiguous_strides((self.batch, self.num_q_heads, self.q_len, 1))

    @property
    def name(self) -> str:
        """Readable, for logs and cache file names."""
        parts = shape_name_parts(
            self.batch, self.num_q_heads, self.num_kv_heads, self.head_dim, self.q_len, self.capacity,
            self.dtype,
        )  # fmt: skip
        if self.with_lse:
            parts.append("lse")
        if self.deterministic:
            parts.append("det")
        return "_".join(parts)

    def canonical(self) -> str:
        """A stable text form (the scale written exactly, as a hex float) for hashing and metadata."""
        fields = asdict(self)
        fields["scale"] = float(self.scale).hex()
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.canonical().encode()).hexdigest()
