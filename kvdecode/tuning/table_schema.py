"""Reading and checking a tuning table file: every value is validated when the table loads.

The schema is in :mod:`kvdecode.thresholds`. A table that fails any check here is refused as a whole
(:class:`~kvdecode.KVDecodeError` naming the file and the field), so lookups never meet a value that
would break a plan later. What is checked:

- the file: a regular file (after symlinks; not a device, FIFO or folder), at most
  :data:`MAX_TABLE_BYTES`, UTF-8, JSON nested at most :data:`MAX_DEPTH` deep;
- ``batch_buckets``: a non-empty, strictly increasing list of ints >= 1;
- thresholds (``default_threshold``, ``thresholds``, each family batch's ``threshold``): ints in
  1..:data:`~kvdecode.thresholds.NEVER` (a family batch's may be null);
- family batch and length keys: canonical decimal integers >= 1 (``"16"``, not ``"016"`` or ``"²"``);
- each point's ``config``: ``num_splits`` 1..128, ``block_n`` a power of two in 16..1024,
  ``num_warps`` one of 1, 2, 4, 8, 16, ``num_stages`` 1..8, and when present ``heads_per_cta`` a power
  of two in 1..64 (absent: 1);
- metadata: ``gpu_name`` a string; ``sm_count`` an int >= 1, ``versions`` a dict of strings and
  ``date`` a string (required in version 2); ``provisional``/``partial`` booleans when present.

Booleans are never accepted where an int is asked for (``True`` is an ``int`` in Python).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import stat
from pathlib import Path

from ..errors import KVDecodeError

__all__ = [
    "CONFIG_RULES",
    "MAX_DEPTH",
    "MAX_TABLE_BYTES",
    "OPTIONAL_CONFIG_RULES",
    "check_table",
    "read_table_json",
]

MAX_TABLE_BYTES = 16 * 2**20  # the largest tables kvdecode tune writes are a few hundred KB
MAX_DEPTH = 32  # the schema nests 8 deep; deeper is corruption (and json would recurse without bound)
MAX_INT = 2**31 - 1  # thresholds.NEVER
_DECIMAL = re.compile(r"[1-9][0-9]*")  # ASCII digits only: str.isdigit() accepts "²", int() does not


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _pow2(lo: int, hi: int):
    return lambda v: lo <= v <= hi and v & (v - 1) == 0


CONFIG_RULES = {  # field: (test, rule text); kept in step with triton_kernels.config.SplitKVConfig
    "num_splits": (lambda v: 1 <= v <= 128, "an int in 1..128"),
    "block_n": (_pow2(16, 1024), "a power of two in 16..1024"),
    "num_warps": (lambda v: v in (1, 2, 4, 8, 16), "one of 1, 2, 4, 8, 16"),
    "num_stages": (lambda v: 1 <= v <= 8, "an int in 1..8"),
}
OPTIONAL_CONFIG_RULES = {  # absent: the default (tables written before the field existed)
    "heads_per_cta": (_pow2(1, 64), "a power of two in 1..64"),
}


class _Bad(Exception):
    """A check failed: ``where`` must be ``rule``, got ``value``."""

    def __init__(self, where: str, rule: str, value: object) -> None:
        text = repr(value)
        super().__init__(f"{where} must be {rule}, got {text[:80]}{'...' * (len(text) > 80)}")


def _depth(obj: object, limit: int) -> int:
    """Nesting depth of a parsed JSON value (iterative: no recursion to overflow)."""
    stack, deepest = [(obj, 1)], 0
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack += [(c, d + 1) for c in children if isinstance(c, (dict, list))]
    return deepest


def _read_bytes(path: Path) -> bytes:
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise _Bad("the file", "a regular file", f"mode {stat.filemode(st.st_mode)}")
        if st.st_size > MAX_TABLE_BYTES:
            raise _Bad("the file", f"at most {MAX_TABLE_BYTES} bytes", st.st_size)
        with open(path, "rb") as f:
            data = f.read(MAX_TABLE_BYTES + 1)  # the file may have grown since the stat
    except OSError as exc:
        raise _Bad("the file", "readable", f"{type(exc).__name__}: {exc.strerror or exc}") from None
    if len(data) > MAX_TABLE_BYTES:
        raise _Bad("the file", f"at most {MAX_TABLE_BYTES} bytes", len(data))
    return data


def _parse(data: bytes) -> object:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Bad("the file", "UTF-8 text", f"byte {data[exc.start]:#04x} at offset {exc.start}") from None
    # the C decoder recurses once per level and raises RecursionError when too deep
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _Bad("the file", "valid JSON", str(exc)) from None
    if _depth(raw, MAX_DEPTH) > MAX_DEPTH:
        raise _Bad("JSON nesting", f"at most {MAX_DEPTH} deep", "deeper")
    return raw


def read_table_json(path: Path) -> object:
    """The parsed JSON of the table at ``path``; KVDecodeError naming the file and why it cannot be read."""
    try:
        return _parse(_read_bytes(path))
    except _Bad as exc:
        raise _error(path, exc) from None


def _error(path: Path, exc: Exception) -> KVDecodeError:
    return KVDecodeError(f"tuning table {path}: {exc}; regenerate it with 'kvdecode tune' or delete it")


def _threshold(where: str, value: object, *, nullable: bool = False) -> None:
    if value is None and nullable:
        return
    if not (_is_int(value) and 1 <= value <= MAX_INT):
        raise _Bad(where, f"an int in 1..{MAX_INT}" + " or null" * nullable, value)


def _keyed(where: str, mapping: object, what: str) -> dict:
    if not isinstance(mapping, dict):
        raise _Bad(where, f"a dict of {what}", type(mapping).__name__)
    for key in mapping:
        if not _DECIMAL.fullmatch(key):
            raise _Bad(f"{where} key", "a decimal integer >= 1 without leading zeros", key)
    return mapping


def _check_config(where: str, cfg: object) -> None:
    if not isinstance(cfg, dict):
        raise _Bad(where, "a dict", type(cfg).__name__)
    for name, (test, rule) in CONFIG_RULES.items():
        value = cfg.get(name)
        if not (_is_int(value) and test(value)):
            raise _Bad(f"{where}.{name}", rule, value)
    for name, (test, rule) in OPTIONAL_CONFIG_RULES.items():
        value = cfg.get(name, 1)
        if not (_is_int(value) and test(value)):
            raise _Bad(f"{where}.{name}", rule, value)


def _check_families(families: object) -> None:
    if not isinstance(families, dict):
        raise _Bad("families", "a dict", type(families).__name__)
    for name, fam in families.items():
        batches = fam.get("batches") if isinstance(fam, dict) else fam
        batches = _keyed(f"families[{name!r}].batches", batches, "batch sizes to entries")
        for b, entry in batches.items():
            where = f"families[{name!r}].batches[{b!r}]"
            if not isinstance(entry, dict):
                raise _Bad(where, "a dict", type(entry).__name__)
            _threshold(f"{where}.threshold", entry.get("threshold"), nullable=True)
            lengths = _keyed(f"{where}.lengths", entry.get("lengths", {}), "lengths to points")
            for n, point in lengths.items():
                if not isinstance(point, dict):
                    raise _Bad(f"{where}.lengths[{n!r}]", "a dict", type(point).__name__)
                _check_config(f"{where}.lengths[{n!r}].config", point.get("config"))


def _check_metadata(meta: object, version: int) -> None:
    if not isinstance(meta, dict) or not isinstance(meta.get("gpu_name"), str):
        raise _Bad("metadata.gpu_name", "a string", meta.get("gpu_name") if isinstance(meta, dict) else meta)
    required = version >= 2
    sm = meta.get("sm_count")
    if (required or sm is not None) and not (_is_int(sm) and sm >= 1):
        raise _Bad("metadata.sm_count", "an int >= 1", sm)
    versions = meta.get("versions")
    if required or versions is not None:
        ok = isinstance(versions, dict) and all(isinstance(v, str) for v in versions.values())
        if not ok:
            raise _Bad("metadata.versions", "a dict of version strings", versions)
    if (required or "date" in meta) and not isinstance(meta.get("date"), str):
        raise _Bad("metadata.date", "a string", meta.get("date"))
    for flag in ("provisional", "partial"):
        if flag in meta and not isinstance(meta[flag], bool):
            raise _Bad(f"metadata.{flag}", "true or false", meta[flag])


def _check_body(raw: dict, versions: tuple[int, ...]) -> None:
    version = raw.get("schema_version")
    if not _is_int(version) or version not in versions:
        raise _Bad("schema_version", " or ".join(map(str, versions)), version)
    _check_metadata(raw.get("metadata"), version)
    buckets = raw.get("batch_buckets")
    ok = isinstance(buckets, list) and buckets and all(_is_int(b) and b >= 1 for b in buckets)
    if not ok or any(a >= b for a, b in itertools.pairwise(buckets)):
        raise _Bad("batch_buckets", "a non-empty strictly increasing list of ints >= 1", buckets)
    _threshold("default_threshold", raw.get("default_threshold"))
    values = raw.get("thresholds", {})
    if not isinstance(values, dict):
        raise _Bad("thresholds", "a dict", type(values).__name__)
    for key, value in values.items():
        _threshold(f"thresholds[{key!r}]", value)
    if version >= 2 or "families" in raw:
        _check_families(raw.get("families"))


def check_table(path: Path, raw: object, versions: tuple[int, ...]) -> dict:
    """``raw`` if it is a valid table of one of ``versions``, else KVDecodeError naming the file and field."""
    try:
        if not isinstance(raw, dict):
            raise _Bad("the top level", "a JSON object", type(raw).__name__)
        _check_body(raw, versions)
    except _Bad as exc:
        raise _error(path, exc) from None
    return raw
