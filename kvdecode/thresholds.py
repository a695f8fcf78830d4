"""Crossover lengths: at or above the threshold ``auto`` uses cuDNN, below it Triton.

Tables are JSON files (shipped ones in ``kvdecode/tuning/``, or the file named by
``KVDECODE_TUNING_TABLE``), one per GPU model. Schema (``schema_version`` 1)::

    {
      "schema_version": 1,
      "kind": "kvdecode.cudnn_threshold",
      "metadata": {"gpu_name": str, "sm_count": int, "versions": {name: version}, "date": "YYYY-MM-DD",
                   "provisional": bool, "note": str},
      "batch_buckets": [1, 4, 16, 64],       # a batch B falls in the first bucket >= B (else the last)
      "default_threshold": int,              # for keys the table does not list
      "thresholds": {"d{head_dim}_{fp16|bf16}_b{bucket}": int}
    }

A table is used only for the GPU named in its metadata (``torch.cuda.get_device_name``); a table for
another GPU is refused with a warning. Without a table the provisional :data:`FALLBACK_THRESHOLD` applies.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import KVDecodeError

__all__ = [
    "FALLBACK_THRESHOLD",
    "Threshold",
    "ThresholdTable",
    "load_table",
    "table_for_gpu",
    "threshold_for",
]

SCHEMA_VERSION = 1
FALLBACK_THRESHOLD = 8192  # provisional: used when no table matches the GPU
TUNING_DIR = Path(__file__).with_name("tuning")
ENV_TABLE = "KVDECODE_TUNING_TABLE"


@dataclass(frozen=True)
class Threshold:
    """A crossover length and where it came from (table path or "fallback")."""

    value: int
    source: str
    provisional: bool


@dataclass(frozen=True)
class ThresholdTable:
    gpu_name: str
    default_threshold: int
    batch_buckets: tuple[int, ...]
    thresholds: dict[str, int] = field(hash=False)
    metadata: dict = field(hash=False)
    path: str = ""

    @property
    def provisional(self) -> bool:
        return bool(self.metadata.get("provisional", False))

    def bucket(self, batch: int) -> int:
        for b in self.batch_buckets:
            if batch <= b:
                return b
        return self.batch_buckets[-1]

    def lookup(self, head_dim: int, dtype_name: str, batch: int) -> int:
        return self.thresholds.get(
            table_key(head_dim, dtype_name, self.bucket(batch)), self.default_threshold
        )


def table_key(head_dim: int, dtype_name: str, bucket: int) -> str:
    return f"d{head_dim}_{dtype_name}_b{bucket}"


def load_table(path: str | Path) -> ThresholdTable:
    """Read and check a table; raises :class:`KVDecodeError` naming the file and the bad field."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise KVDecodeError(f"tuning table {path} must be readable JSON, got {exc}") from None
    if not isinstance(raw, dict) or raw.get("schema_version") != SCHEMA_VERSION:
        got = raw.get("schema_version") if isinstance(raw, dict) else type(raw).__name__
        raise KVDecodeError(f"tuning table {path} must have schema_version {SCHEMA_VERSION}, got {got!r}")
    meta = raw.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("gpu_name"), str):
        raise KVDecodeError(f"tuning table {path} must have metadata.gpu_name (a string); regenerate it")
    buckets = raw.get("batch_buckets")
    if not isinstance(buckets, list) or not buckets or list(buckets) != sorted(buckets):
        raise KVDecodeError(
            f"tuning table {path}: batch_buckets must be a sorted non-empty list, got {buckets!r}"
        )
    values = raw.get("thresholds", {})
    default = raw.get("default_threshold")
    numbers = [*values.values(), default] if isinstance(values, dict) else [None]
    if not all(isinstance(v, int) and v >= 1 for v in numbers):
        raise KVDecodeError(f"tuning table {path}: thresholds must be positive integers, got {values!r}")
    return ThresholdTable(
        gpu_name=meta["gpu_name"],
        default_threshold=int(default),
        batch_buckets=tuple(int(b) for b in buckets),
        thresholds=dict(values),
        metadata=meta,
        path=str(path),
    )


@functools.cache
def table_for_gpu(gpu_name: str) -> ThresholdTable | None:
    """The table for ``gpu_name``: ``$KVDECODE_TUNING_TABLE`` if it matches, else a shipped one, else None."""
    override = os.environ.get(ENV_TABLE)
    if override:
        table = load_table(override)
        if table.gpu_name == gpu_name:
            return table
        warnings.warn(
            f"{ENV_TABLE}={override} was measured on {table.gpu_name!r}, not this {gpu_name!r}; ignoring it",
            RuntimeWarning,
            stacklevel=2,
        )
    for path in sorted(TUNING_DIR.glob("*.json")):
        table = load_table(path)
        if table.gpu_name == gpu_name:
            return table
    return None


def threshold_for(head_dim: int, dtype_name: str, batch: int, gpu_name: str) -> Threshold:
    """The crossover length for this shape on ``gpu_name``."""
    table = table_for_gpu(gpu_name)
    if table is None:
        return Threshold(FALLBACK_THRESHOLD, "fallback (no table for this GPU)", provisional=True)
    return Threshold(table.lookup(head_dim, dtype_name, batch), table.path, table.provisional)
