"""What ``kvdecode tune`` measures: families, batch sizes, length buckets; parsing and the estimate.

Pure host logic (no GPU): the dry run and the argument checks use it on any machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import KVDecodeError
from ..problem import SUPPORTED_DTYPES, DecodeProblem
from ..thresholds import family_key
from ..timing import kv_bytes, steady_state_layers

__all__ = [
    "DTYPES",
    "Family",
    "Point",
    "TuneSpec",
    "estimate",
    "family_mask",
    "family_problem",
    "length_grid",
    "parse_heads",
    "parse_int_list",
    "parse_length",
]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # what the tuner measures
_ALL_DTYPES = {name: dtype for dtype, name in SUPPORTED_DTYPES.items()}
MIN_LENGTH = 256
H100_SMS = 132  # assumed by the dry run when no GPU is visible and --sm-count is not given
H100_MEMORY = 80 * 10**9


@dataclass(frozen=True)
class Family:
    """A problem family: everything but the batch and the length (T_q, BHSD contiguous; no mask, or
    with ``masked`` a bool ``[B, 1, T_q, capacity]`` mask and ``kv_start``, as transformers steps have)."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype_name: str = "bf16"
    q_len: int = 1
    label: str = ""
    masked: bool = False

    @property
    def key(self) -> str:
        f = self
        return family_key(f.num_q_heads, f.num_kv_heads, f.head_dim, f.q_len, f.dtype_name, f.masked)

    @property
    def dtype(self) -> torch.dtype:
        return _ALL_DTYPES[self.dtype_name]


@dataclass(frozen=True)
class Point:
    """One measurement point: a family at batch B, capacity = filled length = ``length``."""

    family: Family
    batch: int
    length: int

    @property
    def name(self) -> str:
        return f"{self.family.key} b{self.batch} L{self.length}"

    def kv_bytes(self) -> int:
        f = self.family
        return kv_bytes(self.batch, f.num_kv_heads, self.length, f.head_dim, f.dtype)


def family_problem(family: Family, batch: int, capacity: int, device: torch.device) -> DecodeProblem:
    """The :class:`DecodeProblem` of contiguous BHSD tensors of this family (no tensors needed); a
    masked family's has ``kv_start`` and the mask :func:`family_mask` makes."""
    f = family
    kv = (f.num_kv_heads * capacity * f.head_dim, capacity * f.head_dim, f.head_dim, 1)
    q = (f.num_q_heads * f.q_len * f.head_dim, f.q_len * f.head_dim, f.head_dim, 1)
    masked = {}
    if f.masked:  # the broadcast view [B, H_q, T_q, capacity] of [B, 1, T_q, capacity + 1][..., :capacity]
        row = capacity + 1
        heads = 0 if f.num_q_heads > 1 else f.q_len * row  # (a size-1 dim keeps its stride)
        masked = dict(has_kv_start=True, mask_kind="bool", mask_dtype=torch.bool,
                      mask_strides=(f.q_len * row, heads, row, 1))  # fmt: skip
    return DecodeProblem(
        **masked,
        batch=batch,
        num_q_heads=f.num_q_heads,
        num_kv_heads=f.num_kv_heads,
        head_dim=f.head_dim,
        q_len=f.q_len,
        capacity=capacity,
        dtype=f.dtype,
        device=device,
        q_strides=q,
        k_strides=kv,
        v_strides=kv,
        scale=1.0 / math.sqrt(f.head_dim),
    )


def family_mask(family: Family, batch: int, capacity: int, device: torch.device):
    """``(mask, kv_start)`` of a masked family's point, or ``(None, None)``: every key visible (the
    cost of reading the mask, not of skipping keys), the mask a slice of one column more, as
    kvdecode's marked transformers mask is."""
    if not family.masked:
        return None, None
    mask = torch.ones(batch, 1, family.q_len, capacity + 1, dtype=torch.bool, device=device)
    return mask[..., :capacity], torch.zeros(batch, dtype=torch.int32, device=device)


def parse_length(text: str, name: str) -> int:
    """``"131072"``, ``"128k"`` (x1024) or ``"1m"`` -> a positive int; KVDecodeError otherwise."""
    raw = text.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(raw[-1:], 1)
    digits = raw[:-1] if scale > 1 else raw
    if not digits.isdigit() or int(digits) < 1:
        raise KVDecodeError(f"{name} must be a positive integer (e.g. 4096 or 4k), got {text!r}")
    return int(digits) * scale


def parse_int_list(text: str, name: str) -> tuple[int, ...]:
    """``"1,4,16"`` -> (1, 4, 16), sorted, duplicates dropped; KVDecodeError naming the bad item."""
    items = [part.strip() for part in text.split(",")]
    if not items or any(not part for part in items):
        raise KVDecodeError(f"{name} must be a comma-separated list of positive integers, got {text!r}")
    return tuple(sorted({parse_length(part, f"each item of {name}") for part in items}))


def parse_heads(text: str) -> tuple[int, int]:
    """``"32:8"`` -> (32, 8); H_q must be a multiple of H_kv."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise KVDecodeError(f"--heads must be H_q:H_kv with positive integers (e.g. 32:8), got {text!r}")
    hq, hkv = int(parts[0]), int(parts[1])
    if hq % hkv:
        raise KVDecodeError(
            f"--heads: H_q ({hq}) must be a multiple of H_kv ({hkv}), got {text!r}; e.g. 32:8 or 28:4"
        )
    return hq, hkv


def check_head_dim(head_dim: int) -> int:
    if not 1 <= head_dim <= 256:
        raise KVDecodeError(f"--head-dim must be in 1..256, got {head_dim}")
    return head_dim


def length_grid(capacity: int, *, coarse: bool, min_length: int = MIN_LENGTH) -> tuple[int, ...]:
    """Length buckets: powers of two from ``min_length`` up to ``capacity`` (included even if not one).

    ``coarse`` keeps every other bucket counting down from the capacity (4x steps).
    """
    if capacity < 1:
        raise KVDecodeError(f"--capacity must be >= 1, got {capacity}")
    low = min(min_length, capacity)
    grid = [capacity]
    n = 1 << (capacity - 1).bit_length() - 1 if capacity > 1 else 0  # largest power of two < capacity
    while n >= low:
        grid.append(n)
        n //= 2
    if coarse:
        grid = grid[::2] if grid[0] & (grid[0] - 1) == 0 else [grid[0], *grid[2::2]]
    return tuple(sorted(grid))


@dataclass(frozen=True)
class TuneSpec:
    """Everything a tuning run measures."""

    families: tuple[Family, ...]
    batches: tuple[int, ...]
    lengths: tuple[int, ...]
    coarse: bool = False

    def points(self) -> list[Point]:
        return [Point(f, b, n) for f in self.families for b in self.batches for n in self.lengths]


@dataclass(frozen=True)
class PointPlan:
    """A point as the dry run sees it: layers it would allocate, configurations it would search."""

    point: Point
    n_layers: int
    configs: int
    seconds: float
    skip: str | None


# Rough costs for the estimate (H100, measured once; they only size the dry run's guess).
COMPILE_S = 1.5  # a new Triton configuration of a family: split + merge kernels
HOST_S = 0.03  # launcher, graph capture and teardown per measurement
LAUNCH_S = 30e-6  # host cost of one layer's launches (split + merge kernels)
CUDNN_FIRST_S, CUDNN_BUILD_S = 0.6, 0.08
FILL_BPS = 5e11  # random fill of the caches
READ_BPS = 2.8e12


def plan_point(point: Point, *, sm_count: int, budget: int, coarse: bool, replays: int) -> PointPlan:
    """Layers, configurations searched and estimated seconds of one point (no compiles counted)."""
    from ..triton_kernels.config import heuristic_config, packing_options, tile_shape
    from .search import search_size

    problem = family_problem(point.family, point.batch, point.length, torch.device("cuda"))
    nbytes = point.kv_bytes()
    layers = steady_state_layers(nbytes, budget_bytes=budget)
    if layers == 0:
        return PointPlan(point, 0, 0, 0.0, f"one layer ({nbytes / 1e9:.1f} GB of KV) does not fit")
    default = heuristic_config(problem, sm_count)
    tiles = math.ceil(point.length / default.block_n)
    configs = search_size(
        default.num_splits, tiles, tile_shape(problem)[1], coarse=coarse, heads=packing_options(problem)
    )
    replay_s = layers * max(nbytes / READ_BPS, 5e-6)
    host_s = HOST_S + layers * LAUNCH_S * 4  # 3 warm-up passes and the capture launch every layer
    search_s = configs * (host_s + (4 + replays) * replay_s)
    finals_s = 4 * (host_s + 24 * replay_s) + (0 if point.family.masked else CUDNN_BUILD_S)
    return PointPlan(point, layers, configs, search_s + finals_s + layers * nbytes / FILL_BPS, None)


def estimate(
    spec: TuneSpec, *, sm_count: int, budget: int, replays: int, done: frozenset = frozenset()
) -> tuple[list[PointPlan], float]:
    """Per-point plans and the total estimated seconds, compiles and first cuDNN builds included."""
    plans = [
        plan_point(p, sm_count=sm_count, budget=budget, coarse=spec.coarse, replays=replays)
        for p in spec.points()
        if (p.family.key, p.batch, p.length) not in done
    ]
    # Compiles: about one per configuration searched at each (family, batch)'s longest length (the
    # split ladders differ between batch sizes; other lengths mostly reuse them). An overestimate.
    longest = {(p.point.family, p.point.batch): p.configs for p in plans if p.skip is None}
    compiles = sum(longest.values()) * 0.7  # batch sizes share most of their candidates
    cudnn_families = sum(not f.masked for f in spec.families)  # (masked families: Triton only)
    total = sum(p.seconds for p in plans) + COMPILE_S * compiles + CUDNN_FIRST_S * cudnn_families
    return plans, total
