"""Tuning tables: the cuDNN crossover lengths and the tuned Triton configurations, per GPU.

At or above the crossover (threshold) length ``auto`` uses cuDNN, below it Triton. Tables are JSON
files written by ``kvdecode tune``. Schema (``schema_version`` 2; version 1 files, which have no
``families``, are still read)::

    {
      "schema_version": 2,
      "kind": "kvdecode.tuning_table",
      "metadata": {"gpu_name": str, "sm_count": int, "date": "YYYY-MM-DD",
                   "versions": {"kvdecode", "torch", "triton", "cudnn", "cudnn_frontend": str},
                   "provisional": bool, "partial": bool, "note": str, "measure": str, "command": str},
      "batch_buckets": [1, 4, 16, 64],       # a batch B falls in the first bucket >= B (else the last)
      "default_threshold": int,              # for keys the table does not list
      "thresholds": {"d{head_dim}_{fp16|bf16}_b{bucket}": int},   # per head dim / dtype / batch bucket
      "families": {                          # version 2: what was measured, per problem family
        "hq{H_q}_hkv{H_kv}_d{D}_tq{T_q}_{dtype}": {
          "num_q_heads": int, "num_kv_heads": int, "head_dim": int, "q_len": int, "dtype": str,
          "batches": {"{B}": {
            "threshold": int or null,         # null: cuDNN never won (or was not measured)
            "lengths": {"{L}": {              # a point: capacity L, every row filled to L
              "config": {"num_splits": int, "block_n": int, "num_warps": int, "num_stages": int},
              "triton_us": float, "default_us": float, "default_config": {...}, "cudnn_us": float or null,
              "cudnn_reason": str (when cudnn_us is null), "searched": int}}}}}}
    }

A threshold of :data:`NEVER` means cuDNN never won. Lookups: a family entry when the heads are known,
else the ``thresholds`` key, else ``default_threshold``. A batch falls in the first measured batch >= B
(else the last); a capacity in the first measured length >= it (else the longest).

Which table: an explicit path (:func:`use_table`) > ``$KVDECODE_TUNING_TABLE`` > the user's table for
this GPU in ``<cache dir>/tuning/`` > the one shipped in ``kvdecode/tuning/`` for this GPU. A table
whose metadata does not match (GPU, SM count, versions: :mod:`kvdecode.tuning.environment`) is refused
with a message saying why: an explicit one raises, the others warn and the next in line is tried.
Without a table the provisional :data:`FALLBACK_THRESHOLD` applies.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import KVDecodeError
from .tuning.environment import check_versions_enabled, current_environment, gpu_slug, mismatch_reasons

__all__ = [
    "ENV_TABLE",
    "FALLBACK_THRESHOLD",
    "NEVER",
    "Resolution",
    "Threshold",
    "ThresholdTable",
    "TuningTable",
    "family_key",
    "load_table",
    "resolve_table",
    "save_table",
    "table_for_gpu",
    "threshold_for",
    "use_table",
    "user_table_path",
]

SCHEMA_VERSION = 2
KIND = "kvdecode.tuning_table"
FALLBACK_THRESHOLD = 8192  # provisional: used when no table matches the GPU
NEVER = 2**31 - 1  # threshold when cuDNN never won: auto keeps Triton at every length
TUNING_DIR = Path(__file__).with_name("tuning")
ENV_TABLE = "KVDECODE_TUNING_TABLE"
NO_TABLE = "none"  # use_table(NO_TABLE): no table, the fallback threshold and the heuristic configs
CONFIG_FIELDS = ("num_splits", "block_n", "num_warps", "num_stages")


@dataclass(frozen=True)
class Threshold:
    """A crossover length and where it came from (table path or "fallback")."""

    value: int
    source: str
    provisional: bool


def table_key(head_dim: int, dtype_name: str, bucket: int) -> str:
    return f"d{head_dim}_{dtype_name}_b{bucket}"


def family_key(num_q_heads: int, num_kv_heads: int, head_dim: int, q_len: int, dtype_name: str) -> str:
    """``"hq32_hkv8_d128_tq1_bf16"``: the problem family a table entry was measured for."""
    return f"hq{num_q_heads}_hkv{num_kv_heads}_d{head_dim}_tq{q_len}_{dtype_name}"


def _first_at_least(values: list[int], x: int) -> int:
    for v in values:
        if x <= v:
            return v
    return values[-1]


@dataclass(frozen=True)
class ThresholdTable:
    """A loaded tuning table (see the module docstring for the file's schema)."""

    gpu_name: str
    default_threshold: int
    batch_buckets: tuple[int, ...]
    thresholds: dict[str, int] = field(hash=False)
    metadata: dict = field(hash=False)
    path: str = ""
    families: dict = field(default_factory=dict, hash=False)
    schema_version: int = 1

    @property
    def provisional(self) -> bool:
        return bool(self.metadata.get("provisional", False))

    def bucket(self, batch: int) -> int:
        return _first_at_least(list(self.batch_buckets), batch)

    def lookup(self, head_dim: int, dtype_name: str, batch: int) -> int:
        return self.thresholds.get(
            table_key(head_dim, dtype_name, self.bucket(batch)), self.default_threshold
        )

    def _batch_entry(self, family: str, batch: int) -> dict | None:
        batches = self.families.get(family, {}).get("batches", {})
        if not batches:
            return None
        return batches[str(_first_at_least(sorted(int(b) for b in batches), batch))]

    def family_threshold(self, family: str, batch: int) -> int | None:
        """The crossover measured for ``family`` at ``batch``'s bucket (NEVER if cuDNN never won)."""
        entry = self._batch_entry(family, batch)
        if entry is None or not entry.get("lengths"):
            return None
        value = entry.get("threshold")
        return NEVER if value is None else int(value)

    def tuned_point(self, family: str, batch: int, capacity: int) -> tuple[int, int, dict] | None:
        """``(batch bucket, length bucket, point)`` tuned for this family, batch and capacity, or None."""
        entry = self._batch_entry(family, batch)
        if entry is None or not entry.get("lengths"):
            return None
        lengths = sorted(int(n) for n in entry["lengths"])
        length = _first_at_least(lengths, capacity)
        b = _first_at_least(sorted(int(x) for x in self.families[family]["batches"]), batch)
        return b, length, entry["lengths"][str(length)]


TuningTable = ThresholdTable


def _bad(path: Path, what: str) -> KVDecodeError:
    return KVDecodeError(f"tuning table {path}: {what}; regenerate it with 'kvdecode tune'")


def _check_families(path: Path, families: object) -> None:
    if not isinstance(families, dict):
        raise _bad(path, f"families must be a dict, got {type(families).__name__}")
    for name, fam in families.items():
        batches = fam.get("batches") if isinstance(fam, dict) else None
        if not isinstance(batches, dict) or not all(str(b).isdigit() for b in batches):
            raise _bad(path, f"families[{name!r}].batches must map batch sizes to entries")
        for b, entry in batches.items():
            where = f"families[{name!r}].batches[{b!r}]"
            thr = entry.get("threshold") if isinstance(entry, dict) else 0
            if thr is not None and not (isinstance(thr, int) and thr >= 1):
                raise _bad(path, f"{where}.threshold must be a positive int or null, got {thr!r}")
            lengths = entry.get("lengths", {})
            if not isinstance(lengths, dict) or not all(str(n).isdigit() for n in lengths):
                raise _bad(path, f"{where}.lengths must map lengths to points")
            for n, point in lengths.items():
                cfg = point.get("config") if isinstance(point, dict) else None
                ok = isinstance(cfg, dict) and all(
                    isinstance(cfg.get(f), int) and cfg[f] >= 1 for f in CONFIG_FIELDS
                )
                if not ok:
                    raise _bad(path, f"{where}.lengths[{n!r}].config must have {CONFIG_FIELDS}, got {cfg!r}")


def load_table(path: str | Path) -> ThresholdTable:
    """Read and check a table; raises :class:`KVDecodeError` naming the file and the bad field."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise KVDecodeError(f"tuning table {path} must be readable JSON, got {exc}") from None
    if not isinstance(raw, dict) or raw.get("schema_version") not in (1, SCHEMA_VERSION):
        got = raw.get("schema_version") if isinstance(raw, dict) else type(raw).__name__
        raise KVDecodeError(
            f"tuning table {path} must have schema_version 1 or {SCHEMA_VERSION}, got {got!r}"
        )
    meta = raw.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("gpu_name"), str):
        raise KVDecodeError(f"tuning table {path} must have metadata.gpu_name (a string); regenerate it")
    if raw["schema_version"] == SCHEMA_VERSION:
        for name, kind in (("sm_count", int), ("versions", dict), ("date", str)):
            if not isinstance(meta.get(name), kind):
                raise _bad(path, f"metadata.{name} must be a {kind.__name__}, got {meta.get(name)!r}")
        _check_families(path, raw.get("families"))
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
        families=raw.get("families") or {},
        schema_version=int(raw["schema_version"]),
    )


def save_table(raw: dict, path: str | Path) -> Path:
    """Write a table dict as JSON atomically (temp file + rename), creating the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(raw, f, indent=1, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---- which table is in use ----

_explicit: Path | None = None


def user_table_path(gpu_name: str) -> Path:
    """Where ``kvdecode tune`` writes by default and where lookups find it: ``<cache dir>/tuning/``."""
    from .cudnn_graphs.disk_cache import default_cache_dir

    return default_cache_dir() / "tuning" / f"{gpu_slug(gpu_name)}.json"


def use_table(path: str | Path | None) -> None:
    """Use the table at ``path`` for every lookup in this process (None: back to the usual order).

    ``"none"`` uses no table at all (the provisional fallback threshold and heuristic Triton configs).
    The file is read and checked now (:class:`KVDecodeError` if malformed); whether it matches the GPU
    is checked at lookup, where a mismatch raises.
    """
    global _explicit
    if path is not None and str(path) != NO_TABLE:
        load_table(path)
    _explicit = None if path is None else Path(path)
    table_for_gpu.cache_clear()


@dataclass(frozen=True)
class Resolution:
    """The table found for a GPU (or None), where it came from, and the tables refused on the way."""

    table: ThresholdTable | None
    source: str  # "explicit", "env", "user cache", "packaged" or "none"
    refused: tuple[str, ...] = ()


def _candidates(gpu_name: str) -> list[tuple[str, Path]]:
    found = []
    if _explicit is not None:
        found.append(("explicit", _explicit))
    if os.environ.get(ENV_TABLE):
        found.append(("env", Path(os.environ[ENV_TABLE])))
    user = user_table_path(gpu_name)
    if user.is_file():
        found.append(("user cache", user))
    found += [("packaged", p) for p in sorted(TUNING_DIR.glob("*.json"))]
    return found


def resolve_table(gpu_name: str) -> Resolution:
    """Find the table for ``gpu_name`` in the lookup order; never warns (see :func:`table_for_gpu`).

    Raises :class:`KVDecodeError` when the explicit table (:func:`use_table`) does not match.
    """
    if _explicit is not None and str(_explicit) == NO_TABLE:
        return Resolution(None, "explicit (no table)")
    env = current_environment(gpu_name)
    refused = []
    for source, path in _candidates(gpu_name):
        try:
            table = load_table(path)
        except KVDecodeError as exc:
            if source == "explicit":
                raise
            refused.append(f"{source} table refused: {exc}")
            continue
        if source == "packaged" and table.gpu_name != gpu_name:
            continue  # a shipped table for another GPU: not a refusal
        # version 1 tables (provisional placeholders) predate the version check
        versions = check_versions_enabled() and table.schema_version >= SCHEMA_VERSION
        reasons = mismatch_reasons(table.metadata, env, check_versions=versions)
        if not reasons:
            return Resolution(table, source, tuple(refused))
        text = f"{source} table {path} refused: " + "; ".join(reasons)
        if source == "explicit":
            raise KVDecodeError(
                f"{text}; run 'kvdecode tune' on this GPU, "
                "or set KVDECODE_TUNING_MATCH=gpu to ignore versions"
            )
        label = f"{ENV_TABLE}={path}" if source == "env" else f"{source} table {path}"
        refused.append(f"{label} refused: " + "; ".join(reasons))
    return Resolution(None, "none", tuple(refused))


@functools.cache
def table_for_gpu(gpu_name: str) -> ThresholdTable | None:
    """The table in use for ``gpu_name`` (cached); each refused table is reported once as a warning."""
    resolution = resolve_table(gpu_name)
    for reason in resolution.refused:
        warnings.warn(f"{reason}; ignoring it", RuntimeWarning, stacklevel=2)
    return resolution.table


def threshold_for(
    head_dim: int,
    dtype_name: str,
    batch: int,
    gpu_name: str,
    *,
    num_q_heads: int | None = None,
    num_kv_heads: int | None = None,
    q_len: int = 1,
) -> Threshold:
    """The crossover length for this shape on ``gpu_name``.

    With the heads given, a family measured by ``kvdecode tune`` is used when the table has it; else
    the table's per head dim / dtype / batch bucket value, else its default.
    """
    table = table_for_gpu(gpu_name)
    if table is None:
        return Threshold(FALLBACK_THRESHOLD, "fallback (no table for this GPU)", provisional=True)
    if num_q_heads is not None and num_kv_heads is not None:
        family = family_key(num_q_heads, num_kv_heads, head_dim, q_len, dtype_name)
        value = table.family_threshold(family, batch)
        if value is not None:
            return Threshold(value, f"{table.path} [{family}]", table.provisional)
    return Threshold(table.lookup(head_dim, dtype_name, batch), table.path, table.provisional)
