"""Candidate Triton configurations for one tuning point, searched one axis at a time.

Trying every (num_splits, block_n, num_warps, num_stages) combination would mean hundreds of kernel
compiles per family. The search is coordinate descent from the heuristic default instead:

1. **splits**: the heuristic's split count, the powers of two around it and 1 (no merge), capped by the
   capacity's tiles and :func:`split_cap`;
2. **tiles**: ``block_n`` x ``num_warps`` at the best split count (``num_stages`` as the heuristic),
   then the split axis again when either changed (the tile count, or a CTA's throughput, and with it
   the useful split count: one warp skips the cross-warp softmax, 2 CTA barriers a tile instead of 8-9
   on sm90, but needs more CTAs to keep the SMs' memory pipes full);
3. **packed heads** (families with padding rows, e.g. GQA group 4 at T_q 1): for each
   ``heads_per_cta`` in ``heads``, the best so far with that many KV heads per CTA, the split count
   scaled by it (as many CTAs as before) and the split axis around that, and ``block_n`` halved
   (a packed CTA stages that many K/V tiles per pipeline stage);
4. **stages**: other ``num_stages`` for the best so far;
5. **deep pipelines at few splits**: ``num_splits`` in (1, 2 and the count that makes one wave of CTAs,
   ``wave_splits``) with ``num_stages`` in (3, 4, 5), the best's tile (a configuration whose stages do not
   fit in shared memory fails to compile and is skipped).
   Coordinate descent cannot reach this corner: at the heuristic's two stages one split is slow (its CTA
   has all the row's tiles and one tile in flight), and at the split count chosen there four stages are
   slow (a CTA has a few tiles: the pipeline never fills). On the H200 at B 16 L 1k (H 32/8, D 128) one
   split with four stages took 20.4 µs where the search's three splits with two took 24.1, and three
   splits with four 29.5 (``bench/results/h200-2026-12-05e/call25-kernel-variants.log``): one CTA per
   (row, KV head), as cuDNN runs it there, with the bytes in flight of a deep pipeline, and no merge.
   At B 4 one split is 32 CTAs for 132 SMs: the same shape there is four splits (one CTA an SM, a
   merge), hence the one-wave count beside 1 and 2.

``--coarse`` trims each axis (not the corner). Compiles are shared across batch sizes and lengths: the
kernel's constants are the family's shape and the configuration, not B or L.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..triton_kernels.config import MAX_SPLITS, SplitKVConfig

__all__ = ["search", "split_candidates", "split_cap", "stage_candidates", "tile_candidates", "wave_splits"]


def split_cap(block_d: int) -> int:
    """Most splits worth trying: the merge keeps a [splits, D] fp32 tile in registers (as the heuristic)."""
    return min(MAX_SPLITS, 16384 // block_d)


def split_candidates(heuristic: int, tiles: int, *, coarse: bool, cap: int = MAX_SPLITS) -> list[int]:
    """Split counts to try: 1, the heuristic, and powers of two from heuristic/8 to 2x.

    ``coarse``: 1, the heuristic, heuristic/4 and the powers of two just below and above it.
    """
    cap = max(1, min(cap, tiles))
    if coarse:
        below = 1 << (heuristic.bit_length() - 1)
        ladder = {max(1, heuristic // 4), below, 2 * below}
    else:
        low = max(1, heuristic // 8)
        ladder = {1 << k for k in range(8) if low <= 1 << k <= 2 * heuristic}
    return sorted({min(s, cap) for s in {1, heuristic, *ladder}})


def tile_candidates(block_d: int, *, coarse: bool) -> list[tuple[int, int]]:
    """``(block_n, num_warps)`` pairs: smaller key tiles for large head dims (registers, shared memory)."""
    block_ns = (64, 128, 256) if block_d <= 64 else (32, 64, 128) if block_d <= 128 else (16, 32, 64)
    warps = (4, 8) if coarse else (1, 2, 4, 8)
    return [(n, w) for n in block_ns for w in warps]


def stage_candidates(*, coarse: bool) -> list[int]:
    return [1, 3] if coarse else [1, 3, 4]


DEEP_SPLITS = (1, 2)  # the few-split, deep-pipeline corner (step 5), with the one-wave count
DEEP_STAGES = (3, 4, 5)


def wave_splits(sm_count: int, programs: int) -> int:
    """The split count that puts one CTA on each SM: ``programs`` CTAs a split (rows x KV heads x query
    blocks), at least 1."""
    return max(1, sm_count // max(1, programs))


def search_size(
    heuristic: int, tiles: int, block_d: int, *, coarse: bool, heads: tuple[int, ...] = ()
) -> int:
    """About how many configurations :func:`search` measures (for the dry-run estimate)."""
    splits = len(split_candidates(heuristic, tiles, coarse=coarse, cap=split_cap(block_d)))
    return (
        2 * splits
        + len(tile_candidates(block_d, coarse=coarse))
        - 2
        + len(heads) * (splits + 1)
        + len(stage_candidates(coarse=coarse))
        + (len(DEEP_SPLITS) + 1) * len(DEEP_STAGES)
    )


def search(
    default: SplitKVConfig,
    capacity: int,
    block_d: int,
    measure: Callable[[SplitKVConfig], float],
    *,
    coarse: bool,
    heads: tuple[int, ...] = (),
    wave: int = 1,
) -> tuple[SplitKVConfig, float, int]:
    """Coordinate descent from ``default``; returns (best config, its time, configurations measured).

    ``heads``: the ``heads_per_cta`` values > 1 to try (``config.packing_options`` of the problem).
    ``wave``: the split count of one CTA per SM (:func:`wave_splits`), tried in the deep corner.

    ``measure(config)`` returns µs, or ``math.inf`` when the configuration failed (compile error, out of
    resources): it is then skipped. Each configuration is measured once.
    """
    seen: dict[SplitKVConfig, float] = {}

    def timed(cfg: SplitKVConfig) -> float:
        if cfg not in seen:
            seen[cfg] = measure(cfg)
        return seen[cfg]

    def best_of(configs: list[SplitKVConfig]) -> SplitKVConfig:
        return min(configs, key=timed)

    def with_(cfg: SplitKVConfig, **change) -> SplitKVConfig:
        fields = dict(num_splits=cfg.num_splits, block_n=cfg.block_n, num_warps=cfg.num_warps)
        fields.update(num_stages=cfg.num_stages, use_pdl=cfg.use_pdl, heads_per_cta=cfg.heads_per_cta)
        fields.update(fused_merge=cfg.fused_merge)
        fields.update(change)
        tiles = math.ceil(capacity / fields["block_n"])
        fields["num_splits"] = max(1, min(fields["num_splits"], tiles, split_cap(block_d)))
        return SplitKVConfig(**fields)

    def split_axis(cfg: SplitKVConfig) -> SplitKVConfig:
        tiles = math.ceil(capacity / cfg.block_n)
        splits = split_candidates(cfg.num_splits, tiles, coarse=coarse, cap=split_cap(block_d))
        return best_of([cfg] + [with_(cfg, num_splits=s) for s in splits])

    best = split_axis(default)
    tiles_ = tile_candidates(block_d, coarse=coarse)
    tiled = best_of([best] + [with_(best, block_n=n, num_warps=w) for n, w in tiles_])
    if (tiled.block_n, tiled.num_warps) != (best.block_n, best.num_warps):
        # centred where as many warps are in flight as before: fewer warps a CTA, more CTAs (the ladder
        # still reaches the old count: it spans the centre / 8 .. 2x)
        more = max(1, best.num_warps // tiled.num_warps)
        best = split_axis(with_(tiled, num_splits=tiled.num_splits * more)) if more > 1 else split_axis(tiled)
        best = min((best, tiled), key=timed)
    else:
        best = tiled
    for h in heads:
        packed = with_(best, heads_per_cta=h, num_splits=best.num_splits * h // best.heads_per_cta)
        packed = split_axis(packed)
        halved = with_(packed, block_n=max(16, packed.block_n // 2), num_splits=2 * packed.num_splits)
        best = best_of([best, packed, halved])
    best = best_of([best] + [with_(best, num_stages=s) for s in stage_candidates(coarse=coarse)])
    deep_splits = sorted({*DEEP_SPLITS, max(1, wave)})
    deep = [with_(best, num_splits=n, num_stages=s) for n in deep_splits for s in DEEP_STAGES]
    best = best_of([best, *deep])
    return best, seen[best], len(seen)
