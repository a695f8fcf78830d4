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
              "config": {"num_splits": int, "block_n": int, "num_warps": int, "num_stages": int,
                         "heads_per_cta": int (optional, absent = 1)},
              "triton_us": float, "default_us": float, "default_config": {...}, "cudnn_us": float or null,
              "cudnn_reason": str (when cudnn_us is null), "searched": int}}}}}}
    }

A threshold of :data:`NEVER` means cuDNN never won. Lookups: a family entry when the heads are known,
else the ``thresholds`` key, else ``default_threshold``. A batch falls in the first measured batch >= B
(else the last); a capacity in the first measured length >= it (else the longest).

Which table: an explicit path (:func:`use_table`) > ``$KVDECODE_TUNING_TABLE`` > the user's table for
this GPU in ``<cache dir>/tuning/`` > the one shipped in ``kvdecode/tuning/`` for this GPU. A table
whose metadata does not match (GPU, SM count, versions: :mod:`kvdecode.tuning.environment`), or that
cannot be used at all (not a regular file, too large, not UTF-8, too deep, or any value out of its rule:
:mod:`kvdecode.tuning.table_schema` checks every value when the table loads), is refused with a message
naming the file and the reason. An explicit one (:func:`use_table`, ``kvdecode plan --table``) raises
:class:`~kvdecode.KVDecodeError`; the others (``$KVDECODE_TUNING_TABLE``, the user's cache, the packaged
ones) warn once (``RuntimeWarning``) and the next in line is tried, so a corrupt table never fails a call.
Without a table the crossover comes from :mod:`kvdecode.no_table_rule` (K/V bytes and how the heuristic
Triton grid loads the SMs; provisional) when the heads and the SM count are given, else from the flat
provisional :data:`FALLBACK_THRESHOLD`.
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
from .no_table_rule import ITEMSIZE, NEVER, no_table_threshold
from .tuning.environment import check_versions_enabled, current_environment, gpu_slug, mismatch_reasons
from .tuning.table_schema import CONFIG_RULES, MAX_TABLE_BYTES, check_table, read_table_json

__all__ = [
    "ENV_TABLE",
    "FALLBACK_THRESHOLD",
    "MAX_TABLE_BYTES",
    "NEVER",
    "Resolution",
    "Threshold",
    "ThresholdTable",
    "TuningTable",
    "family_key",
    "load_table",
    "read_table",
    "resolve_table",
    "save_table",
    "table_for_gpu",
    "threshold_for",
    "use_table",
    "user_table_path",
]

SCHEMA_VERSION = 2
KIND = "kvdecode.tuning_table"
FALLBACK_THRESHOLD = 8192  # provisional: no table matches the GPU and the no-table rule lacks an input
MAKE_A_TABLE = "make one with 'kvdecode tune' on this GPU"
TUNING_DIR = Path(__file__).with_name("tuning")
ENV_TABLE = "KVDECODE_TUNING_TABLE"
NO_TABLE = "none"  # use_table(NO_TABLE): no table, the fallback threshold and the heuristic configs
CONFIG_FIELDS = tuple(CONFIG_RULES)  # num_splits, block_n, num_warps, num_stages


@dataclass(frozen=True)
class Threshold:
    """A crossover length and where it came from (table path or "fallback")."""

    value: int
    source: str
    provisional: bool


def table_key(head_dim: int, dtype_name: str, bucket: int) -> str:
    return f"d{head_dim}_{dtype_name}_b{bucket}"


def family_key(
    num_q_heads: int, num_kv_heads: int, head_dim: int, q_len: int, dtype_name: str, masked: bool = False
) -> str:
    """``"hq32_hkv8_d128_tq1_bf16"``: the problem family a table entry was measured for; ``..._mask``
    for its masked twin (a bool mask shared by the heads and ``kv_start``, as a transformers step
    has), tuned apart (``kvdecode tune --mask``): the mask's loads can favour other tiles."""
    key = f"hq{num_q_heads}_hkv{num_kv_heads}_d{head_dim}_tq{q_len}_{dtype_name}"
    return key + "_mask" if masked else key


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


def read_table(path: str | Path) -> dict:
    """The table at ``path`` as a checked dict (the checks of :func:`load_table`), e.g. to resume it."""
    path = Path(path)
    return check_table(path, read_table_json(path), (1, SCHEMA_VERSION))


def load_table(path: str | Path) -> ThresholdTable:
    """Read and check a table; raises :class:`KVDecodeError` naming the file and the bad field.

    Every value is validated now (:mod:`kvdecode.tuning.table_schema`): a file that is not a regular
    file, larger than :data:`MAX_TABLE_BYTES`, not UTF-8, nested too deep, or with any value out of its
    rule (e.g. ``block_n`` 3, ``num_splits`` 10**6, a batch bucket -4 or 2.5) is refused as a whole.
    """
    path = Path(path)
    raw = read_table(path)
    return ThresholdTable(
        gpu_name=raw["metadata"]["gpu_name"],
        default_threshold=raw["default_threshold"],
        batch_buckets=tuple(raw["batch_buckets"]),
        thresholds=dict(raw.get("thresholds", {})),
        metadata=raw["metadata"],
        path=str(path),
        families=raw.get("families") or {},
        schema_version=raw["schema_version"],
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
    The file is read and every value checked now: an unusable file raises :class:`KVDecodeError`
    (naming the file and the reason) rather than warning, since it was asked for by name. Whether it
    matches the GPU is checked at lookup, where a mismatch (or a file corrupted since) raises too.
    """
    global _explicit
    if path is not None and str(path) != NO_TABLE:
        load_table(path)
    _explicit = None if path is None else Path(path)
    table_for_gpu.cache_clear()
    from .plan import PLANS  # routes (thresholds) and plans (Triton configs) came from the old table

    PLANS.clear()


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

    Raises :class:`KVDecodeError` when the explicit table (:func:`use_table`) does not match or cannot
    be used; any other table that cannot be used is listed in ``refused`` and skipped.
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
    sm_count: int | None = None,
) -> Threshold:
    """The crossover length for this shape on ``gpu_name`` (with ``sm_count`` SMs, when known).

    With the heads given, a family measured by ``kvdecode tune`` is used when the table has it; else
    the table's per head dim / dtype / batch bucket value, else its default. Without a table for
    the GPU, :func:`kvdecode.no_table_rule.no_table_threshold` when the heads and ``sm_count`` are
    given, else :data:`FALLBACK_THRESHOLD`; both provisional.
    """
    if sm_count is not None and (isinstance(sm_count, bool) or not isinstance(sm_count, int) or sm_count < 1):
        raise KVDecodeError(
            f"sm_count must be a positive int or None, got {sm_count!r}; pass the device's SM count"
        )
    table = table_for_gpu(gpu_name)
    if table is None:
        return _without_table(
            head_dim, dtype_name, batch, gpu_name, num_q_heads, num_kv_heads, q_len, sm_count
        )
    if num_q_heads is not None and num_kv_heads is not None:
        family = family_key(num_q_heads, num_kv_heads, head_dim, q_len, dtype_name)
        value = table.family_threshold(family, batch)
        if value is not None:
            return Threshold(value, f"{table.path} [{family}]", table.provisional)
    return Threshold(table.lookup(head_dim, dtype_name, batch), table.path, table.provisional)


def _without_table(
    head_dim: int,
    dtype_name: str,
    batch: int,
    gpu_name: str,
    num_q_heads: int | None,
    num_kv_heads: int | None,
    q_len: int,
    sm_count: int | None,
) -> Threshold:
    missing = f"no tuning table for {gpu_name}: {MAKE_A_TABLE}"
    if num_q_heads is None or num_kv_heads is None or sm_count is None or dtype_name not in ITEMSIZE:
        return Threshold(FALLBACK_THRESHOLD, f"flat fallback; {missing}", provisional=True)
    rule = no_table_threshold(head_dim, dtype_name, batch, num_q_heads, num_kv_heads, q_len, sm_count)
    return Threshold(rule.value, f"{rule.text}; {missing}", provisional=True)  # rule.value <= NEVER
