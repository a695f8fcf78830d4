"""Decode problems described without tensors (a GPU problem can be described on a CPU-only machine)."""

from __future__ import annotations

import math

import torch

from kvdecode.cudnn_graphs.key import GraphKey, contiguous_strides
from kvdecode.problem import DecodeProblem


def kv_strides(layout: str, b: int, h: int, cap: int, d: int, pitch: int = 0) -> tuple[int, ...]:
    """Strides of a ``[B, H_kv, cap, D]`` view: BHSD, BSHD (``buf.transpose(1, 2)``) or a slice of a
    bigger BHSD buffer whose rows are ``d + pitch`` long."""
    if layout == "bhsd":
        return contiguous_strides((b, h, cap, d))
    if layout == "bshd":
        return (cap * h * d, d, h * d, 1)
    if layout == "slice":
        row = d + pitch
        return ((h + 1) * (cap + 8) * row, (cap + 8) * row, row, 1)
    raise ValueError(layout)


def make_problem(
    *,
    batch: int = 2,
    num_q_heads: int = 8,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    q_len: int = 1,
    capacity: int = 1024,
    dtype: torch.dtype = torch.bfloat16,
    layout: str = "bhsd",
    scale: float | None = None,
    device: str = "cuda:0",
    **extra,
) -> DecodeProblem:
    kv = kv_strides(layout, batch, num_kv_heads, capacity, head_dim, pitch=8)
    return DecodeProblem(
        batch=batch,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        q_len=q_len,
        capacity=capacity,
        dtype=dtype,
        device=torch.device(device),
        q_strides=contiguous_strides((batch, num_q_heads, q_len, head_dim)),
        k_strides=kv,
        v_strides=kv,
        scale=1.0 / math.sqrt(head_dim) if scale is None else scale,
        **extra,
    )


def make_key(problem: DecodeProblem, *, deterministic: bool = False, with_lse: bool = False) -> GraphKey:
    return GraphKey.from_problem(problem, deterministic=deterministic, with_lse=with_lse, cudnn_version=91900)
