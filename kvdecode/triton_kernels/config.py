"""Launch configuration of the split-KV kernel, and the default policy that picks it.

The split count is fixed per problem (it sets the grid), never per step: lengths are cut into
``num_splits`` chunks on the device, so one configuration serves every length up to the capacity.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton

from .._interpret import interpreter_active
from ..errors import KVDecodeError
from ..problem import DecodeProblem

__all__ = [
    "MAX_SPLITS",
    "SplitKVConfig",
    "check_heads_per_cta",
    "default_config",
    "fp8_config",
    "heuristic_config",
    "interpreter_active",
    "packing_options",
    "programs_per_split",
    "tile_shape",
    "tuned_config",
]

LOG2E_CONST = 1.4426950408889634  # 1 / ln 2: exp(x) = exp2(x * LOG2E)
MAX_SPLITS = 128  # the merge kernel holds [MAX_SPLITS, BLOCK_D] partials of one query row in registers
WAVES = 2  # aim for this many CTAs per SM: enough memory requests in flight at small batch
INTERPRETER_SMS = 4  # nominal SM count under the interpreter: small grids, but still several splits


@dataclass(frozen=True)
class SplitKVConfig:
    """How the split-KV kernel is launched.

    Parameters
    ----------
    num_splits : int
        Programs the key tiles of each (row, KV head) are dealt to, 1..128; 1 skips the merge.
    block_n : int
        Keys per tile (a power of two >= 16).
    num_warps, num_stages : int
        Triton launch parameters of the split kernel.
    use_pdl : bool or None
        Programmatic dependent launch (Hopper+): the merge kernel starts while the split kernel drains.
        ``None`` = on where the device and Triton support it.
    heads_per_cta : int
        KV heads one program serves (a power of two dividing ``H_kv``), their query rows packed into one
        row block: with GQA group 4 at ``T_q = 1``, 4 heads fill the 16 rows a dot needs, so the softmax
        works on no padding rows. ``heads_per_cta * group * T_q`` must fit one row block
        (:func:`tile_shape`); :func:`check_heads_per_cta` says why a value does not serve a problem.
    fused_merge : bool or None
        With several splits, the last split of each (row, KV heads) to finish merges the partials, so one
        kernel runs instead of two: one launch less on the host (``DecodePlan.run`` 27.0 -> 18.1 us on the
        H200's host, 25.0 -> 16.9 on the H100's), -2% to +5% on the GPU (``bench/NOTES.md``, 12-05).
        ``None`` (the default) fuses eager calls, where the host's time counts, and keeps the merge
        kernel under CUDA-graph capture (captured and compiled steps, where only the GPU's time does);
        ``True`` fuses every call, ``False`` none. A deterministic plan takes one form for both (the
        merge kernel unless ``True``): the two forms round differently. Eager fused calls take their
        partials and finished-split counters from one buffer per (device, stream) that every launcher
        shares (calls on a stream run in order, and each leaves the counters at zero), allocated outside
        any CUDA-graph memory pool; a captured call takes its own. The first eager fused call of a plan
        for given tensor alignments and LSE output also compiles and loads the other form, so a capture
        of the same call that follows compiles nothing.
    mask_check : bool or None
        With a bool mask row shared by the query rows (a transformers step's ``[B, 1, 1, L]``), each
        program first reads the mask on all its tiles' visible keys (up to 2048) and, where it is True on
        every one, runs its tiles without mask loads. ``None`` = where a program has two tiles or more
        (with one, the check is one more memory round trip and saves no load).
    """

    num_splits: int
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    use_pdl: bool | None = None
    heads_per_cta: int = 1
    fused_merge: bool | None = None
    mask_check: bool | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.num_splits <= MAX_SPLITS:
            raise KVDecodeError(f"num_splits must be in 1..{MAX_SPLITS}, got {self.num_splits}")
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise KVDecodeError(f"block_n must be a power of two >= 16, got {self.block_n}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise KVDecodeError(f"num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise KVDecodeError(f"num_stages must be >= 1, got {self.num_stages}")
        hp = self.heads_per_cta
        if not isinstance(hp, int) or hp < 1 or hp & (hp - 1):
            raise KVDecodeError(f"heads_per_cta must be a power of two >= 1, got {hp!r}")
        if self.fused_merge is not None and not isinstance(self.fused_merge, bool):
            raise KVDecodeError(f"fused_merge must be True, False or None, got {self.fused_merge!r}")
        if self.mask_check is not None and not isinstance(self.mask_check, bool):
            raise KVDecodeError(f"mask_check must be True, False or None, got {self.mask_check!r}")

    @property
    def name(self) -> str:
        pdl = {None: "auto", True: "on", False: "off"}[self.use_pdl]
        heads = "" if self.heads_per_cta == 1 else f"_hp{self.heads_per_cta}"
        fused = {None: "", True: "_fm", False: "_nofm"}[self.fused_merge]
        check = "" if self.mask_check is None else f"_mc{self.mask_check:d}"
        return (
            f"s{self.num_splits}_n{self.block_n}_w{self.num_warps}_st{self.num_stages}_pdl{pdl}{heads}{fused}"
            f"{check}"
        )


def tile_shape(problem: DecodeProblem, heads_per_cta: int = 1) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_D)``: packed query rows per program (``heads_per_cta`` KV heads' rows) and the
    padded head dim."""
    block_d = max(16, triton.next_power_of_2(problem.head_dim))
    rows = problem.group_size * problem.q_len * heads_per_cta
    return min(max(16, triton.next_power_of_2(rows)), block_m_cap(block_d)), block_d


def block_m_cap(block_d: int) -> int:
    """Most query rows a program holds: the ``[BLOCK_M, BLOCK_D]`` fp32 accumulator stays in registers."""
    return max(16, 8192 // block_d)


def packing_options(problem: DecodeProblem) -> tuple[int, ...]:
    """The ``heads_per_cta`` values > 1 worth trying: those whose rows still fit the 16 a dot must have
    (``heads * group * T_q <= 16``), i.e. that replace padding rows with real ones and add no rows."""
    rows = problem.group_size * problem.q_len
    return tuple(h for h in (2, 4, 8, 16) if h * rows <= 16 and check_heads_per_cta(problem, h) is None)


def check_heads_per_cta(problem: DecodeProblem, heads_per_cta: int) -> str | None:
    """Why ``heads_per_cta`` KV heads per program cannot serve ``problem``, or None when they can."""
    if heads_per_cta == 1:
        return None
    p = problem
    if p.num_kv_heads % heads_per_cta:
        return f"heads_per_cta={heads_per_cta} does not divide the {p.num_kv_heads} KV heads"
    rows = heads_per_cta * p.group_size * p.q_len
    cap = block_m_cap(tile_shape(p)[1])
    if rows > cap:
        return (
            f"heads_per_cta={heads_per_cta} packs {rows} query rows (group {p.group_size} x T_q {p.q_len} "
            f"per head), more than one row block holds at head dim {p.head_dim} ({cap})"
        )
    return None


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_config(problem: DecodeProblem, sm_count_: int | None = None) -> SplitKVConfig:
    """The configuration tuned for this problem on this GPU, else :func:`heuristic_config`.

    The tuning table in use (:mod:`kvdecode.thresholds`) is consulted for the problem's family
    (heads, head dim, T_q, dtype), batch bucket and capacity bucket; see :func:`tuned_config`.
    """
    found = tuned_config(problem, sm_count_)
    config = found[0] if found is not None else heuristic_config(problem, sm_count_)
    return fp8_config(problem, config) if problem.kv_dtype is not None else config


FP8_TILE_BYTES = 8192  # fp8 K tile: BLOCK_N x BLOCK_D bytes (64 keys at D 128)
FP8_STAGES = 3


def fp8_config(problem: DecodeProblem, config: SplitKVConfig) -> SplitKVConfig:
    """The configuration for fp8 caches, from the one found for the problem's q dtype.

    The tuning tables and the heuristic were measured on 16-bit caches. With fp8 the kernel spends its
    time converting tiles, not waiting for them: on the H200 (``bench-fp8-sweep-run3.log``) tiles of
    8 KB (64 keys at D 128) with a 3-stage pipeline were the fastest or within 3% of it in every cell of
    B 1..16 x L 4k..128k, up to 25% faster than the 16-bit configuration. The split count is kept (per
    CTA row: a packed 16-bit point's count is divided by its heads). Packed KV heads are not carried over:
    a 16-bit point's ``heads_per_cta`` says nothing of fp8 (whose 3 stages of tiles and converted tiles
    may not fit the shared memory), and fp8 with packed heads is not yet measured.
    """
    block_d = tile_shape(problem)[1]
    block_n = max(16, min(config.block_n, FP8_TILE_BYTES // block_d))
    splits = cap_splits(problem, max(1, config.num_splits // config.heads_per_cta), block_n)
    return replace(config, num_splits=splits, block_n=block_n, num_stages=FP8_STAGES, heads_per_cta=1)


def tuned_config(problem: DecodeProblem, sm_count_: int | None = None) -> tuple[SplitKVConfig, str] | None:
    """``(config, where it came from)`` from the tuning table for this GPU, or None.

    Only on a CUDA device, for what the tuner measures: mask-free problems, and problems with a mask
    shared by the heads (a transformers step's) from the family's masked twin (``kvdecode tune --mask``;
    a table without one leaves them to the heuristic); and not when ``sm_count_`` names another SM
    count than the table's. The split count is capped by the capacity's tiles, as the heuristic does.
    """
    if problem.device.type != "cuda" or interpreter_active():
        return None
    masked = problem.mask_kind != "none"
    if masked and not _tuned_mask(problem):
        return None
    from ..thresholds import family_key, table_for_gpu
    from ..tuning.environment import device_gpu_name

    table = table_for_gpu(device_gpu_name(problem.device))
    if table is None or (sm_count_ is not None and table.metadata.get("sm_count") != sm_count_):
        return None
    p = problem
    family = family_key(p.num_q_heads, p.num_kv_heads, p.head_dim, p.q_len, p.dtype_name, masked)
    found = table.tuned_point(family, p.batch, p.reach)  # a window reads like a capacity of its reach
    if found is None:
        return None
    batch, length, point = found
    cfg = point["config"]
    splits = cap_splits(p, cfg["num_splits"], cfg["block_n"])
    heads = cfg.get("heads_per_cta", 1)
    if check_heads_per_cta(p, heads) is not None:  # a table edited by hand: the family's key says it fits
        return None
    config = SplitKVConfig(
        num_splits=splits, block_n=cfg["block_n"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        heads_per_cta=heads,
    )  # fmt: skip
    return config, f"{table.path} [{family} b{batch} L{length}]"


def _tuned_mask(p: DecodeProblem) -> bool:
    """The mask is what masked families are tuned with: bool, one row per query shared by the heads
    (broadcast, or a single head), keys contiguous. Another (float: 2-4x the bytes; per head; strided
    keys) reads differently and keeps the heuristic."""
    strides = p.mask_strides
    shared = strides is not None and (strides[1] == 0 or p.num_q_heads == 1)
    return p.mask_kind == "bool" and shared and strides[3] == 1


def cap_splits(problem: DecodeProblem, splits: int, block_n: int) -> int:
    """Clamp a split count to 1..MAX_SPLITS, to the tiles a row can touch, and so that the merge's
    ``[splits, BLOCK_D]`` fp32 tile stays in registers."""
    block_d = tile_shape(problem)[1]
    return max(1, min(splits, MAX_SPLITS, 16384 // block_d, row_tiles(problem, block_n)))


def row_tiles(problem: DecodeProblem, block_n: int) -> int:
    """The K/V tiles one row can touch: the capacity's, or a sliding window's (one more: a window need
    not start on a tile boundary)."""
    return min(triton.cdiv(problem.capacity, block_n), triton.cdiv(problem.reach, block_n) + 1)


def programs_per_split(problem: DecodeProblem) -> int:
    """CTAs of one split with one KV head a CTA: rows x KV heads x query-row blocks."""
    block_m = tile_shape(problem)[0]
    return problem.batch * problem.num_kv_heads * triton.cdiv(problem.group_size * problem.q_len, block_m)


def heuristic_config(problem: DecodeProblem, sm_count_: int | None = None) -> SplitKVConfig:
    """Pick a configuration from the problem's shape and the SM count (no device values are read).

    Enough splits to put ``WAVES`` CTAs on every SM, but never more than there are ``block_n`` tiles a
    row can touch (the capacity's, or a window's), and one split (no merge) once the batch and heads
    alone fill the GPU.
    """
    sms = sm_count(problem.device) if sm_count_ is None else sm_count_
    block_d = tile_shape(problem)[1]
    block_n = {16: 128, 32: 128, 64: 128, 128: 64}.get(block_d, 32)  # ~16 KB of K per tile
    splits = triton.cdiv(WAVES * sms, programs_per_split(problem))
    splits = cap_splits(problem, splits, block_n)
    return SplitKVConfig(num_splits=splits, block_n=block_n, num_warps=4, num_stages=2)
