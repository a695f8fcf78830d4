"""The cells of the decode benchmark: shapes, byte counts, skips. Pure host logic (no GPU needed)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvdecode.timing import kv_bytes, steady_state_layers

__all__ = [
    "BACKENDS",
    "FULL_GRID",
    "MAX_CELL_KV_BYTES",
    "QUICK_GRID",
    "VARIANTS",
    "CellSpec",
    "build_cells",
    "format_length",
    "parse_backends",
    "parse_grid",
    "parse_length",
    "plan_layers",
]

BACKENDS = ("kvdecode-triton", "kvdecode-cudnn", "kvdecode-auto", "sdpa")
MAX_CELL_KV_BYTES = 40 * 10**9  # skip cells whose one layer of KV is over 40 GB
FULL_GRID = {"B": (1, 4, 16, 64), "L": (1024, 4096, 16384, 65536, 131072)}
QUICK_GRID = {"B": (1, 16), "L": (1024, 16384)}

# case -> (H_q, H_kv, D); "gqa" is the main grid's Llama-3-8B-like layer, the others are B 1 rows.
CASES = {
    "gqa": (32, 8, 128),
    "mha": (32, 32, 128),
    "mqa": (32, 1, 128),
    "d64": (32, 8, 64),
    "d256": (32, 8, 256),
}
VARIANTS = ("mha", "mqa", "d64", "d256")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class CellSpec:
    """One benchmark cell: a decode problem with T_q = 1 and every row filled to ``seq_len``."""

    case: str
    batch: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    seq_len: int
    capacity: int
    dtype: str = "bf16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def kv_bytes(self) -> int:
        """KV bytes one call reads (the filled length)."""
        return kv_bytes(self.batch, self.num_kv_heads, self.seq_len, self.head_dim, self.torch_dtype)

    @property
    def alloc_bytes(self) -> int:
        """KV bytes one layer allocates (the capacity)."""
        return kv_bytes(self.batch, self.num_kv_heads, self.capacity, self.head_dim, self.torch_dtype)

    @property
    def name(self) -> str:
        return (
            f"{self.case}_b{self.batch}_hq{self.num_q_heads}_hkv{self.num_kv_heads}_d{self.head_dim}"
            f"_L{format_length(self.seq_len)}_cap{format_length(self.capacity)}_{self.dtype}"
        )

    def skip_reason(self) -> str | None:
        """Why this cell is skipped before anything is allocated, or None."""
        if self.alloc_bytes > MAX_CELL_KV_BYTES:
            return f"one layer of KV is {self.alloc_bytes / 1e9:.1f} GB, over the 40 GB limit"
        return None


def parse_length(text: str) -> int:
    """``"16k"`` -> 16384, ``"128k"`` -> 131072, ``"1000"`` -> 1000."""
    t = text.strip().lower()
    try:
        value = int(t[:-1]) * 1024 if t.endswith("k") else int(t)
    except ValueError:
        raise ValueError(f"length must be an integer or '<n>k', got {text!r}") from None
    if value < 1:
        raise ValueError(f"length must be >= 1, got {text!r}")
    return value


def format_length(n: int) -> str:
    """Inverse of :func:`parse_length` for multiples of 1024: 131072 -> ``"128k"``."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def parse_grid(text: str) -> dict[str, tuple[int, ...]]:
    """Parse ``"B=1,4;L=1k,16k"`` into ``{"B": (1, 4), "L": (1024, 16384)}``.

    A key left out keeps its :data:`FULL_GRID` values.
    """
    grid = dict(FULL_GRID)
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, values = part.partition("=")
        key = key.strip().upper()
        if not sep or key not in ("B", "L"):
            raise ValueError(f"grid part must be 'B=<list>' or 'L=<list>', got {part!r}")
        items = [v for v in (s.strip() for s in values.split(",")) if v]
        if not items:
            raise ValueError(f"grid part {part!r} lists no values")
        grid[key] = tuple(parse_length(v) if key == "L" else int(v) for v in items)
        if min(grid[key]) < 1:
            raise ValueError(f"grid values must be >= 1, got {part!r}")
    return grid


def parse_backends(text: str) -> tuple[str, ...]:
    """Comma-separated subset of :data:`BACKENDS`, order kept, duplicates dropped."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    bad = [n for n in names if n not in BACKENDS]
    if bad or not names:
        raise ValueError(f"backends must be a non-empty subset of {', '.join(BACKENDS)}, got {text!r}")
    return names


def build_cells(
    grid: dict[str, tuple[int, ...]], variants: tuple[str, ...], variant_lengths: tuple[int, ...]
) -> list[CellSpec]:
    """The main GQA grid (B x L, capacity = L), then B 1 rows of each variant case at ``variant_lengths``."""
    cells = []
    for batch in grid["B"]:
        for length in grid["L"]:
            cells.append(_spec("gqa", batch, length))
    for case in variants:
        if case not in CASES or case == "gqa":
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {case!r}")
        for length in variant_lengths:
            cells.append(_spec(case, 1, length))
    return cells


def _spec(case: str, batch: int, length: int) -> CellSpec:
    hq, hkv, d = CASES[case]
    return CellSpec(case, batch, hq, hkv, d, seq_len=length, capacity=length)


def plan_layers(spec: CellSpec, budget_bytes: int | None) -> int:
    """Layers of the steady-state replay for ``spec`` within ``budget_bytes`` (0: does not fit)."""
    return steady_state_layers(spec.kv_bytes, layer_alloc_bytes=spec.alloc_bytes, budget_bytes=budget_bytes)
