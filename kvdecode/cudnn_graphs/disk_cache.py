"""Serialized cuDNN plans on disk, so a new process skips the graph build.

Location: ``$KVDECODE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/kvdecode``, else ``~/.cache/kvdecode``;
plans live in its ``cudnn_plans/`` folder. Set ``KVDECODE_DISK_CACHE=0`` to turn the disk cache off.

One file per graph key: a magic line, a 4-byte big-endian metadata length, the metadata as JSON (GPU
name, cuDNN version, frontend version, the key's canonical text, workspace size, date) and the blob from
``graph.serialize()``. A file whose metadata does not match the running GPU, cuDNN version or key is
refused (logged) and the caller rebuilds and overwrites it. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .key import GraphKey

__all__ = ["DiskCache", "PlanMeta", "default_cache_dir"]

log = logging.getLogger("kvdecode.cudnn_graphs")

MAGIC = b"KVDECODE-CUDNN-PLAN v1\n"
FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """``$KVDECODE_CACHE_DIR``, else ``$XDG_CACHE_HOME/kvdecode``, else ``~/.cache/kvdecode``."""
    explicit = os.environ.get("KVDECODE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kvdecode"


def disk_cache_enabled() -> bool:
    return os.environ.get("KVDECODE_DISK_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class PlanMeta:
    """What a saved plan must match to be used: the GPU, the cuDNN build and the graph key."""

    gpu_name: str
    cudnn_version: int
    frontend_version: str
    key: str  # GraphKey.canonical()

    def mismatch(self, found: dict) -> str | None:
        """Why ``found`` (a file's metadata) is not for this plan, or None when it matches."""
        for field in ("gpu_name", "cudnn_version", "frontend_version", "key"):
            want = getattr(self, field)
            if found.get(field) != want:
                got = found.get(field)
                if field == "key":
                    return "it was saved for another graph key"
                return f"{field} is {got!r}, this process has {want!r}"
        if found.get("format_version") != FORMAT_VERSION:
            return f"format_version is {found.get('format_version')!r}, expected {FORMAT_VERSION}"
        return None


class DiskCache:
    """Load and save serialized plans under ``root/cudnn_plans``."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.refused = 0

    @property
    def folder(self) -> Path:
        return self.root / "cudnn_plans"

    def path_for(self, key: GraphKey) -> Path:
        return self.folder / f"{key.name}-{key.digest()[:20]}.plan"

    def load(self, key: GraphKey, meta: PlanMeta) -> tuple[bytes, dict] | None:
        """``(blob, metadata)`` when a matching plan is on disk, else None (missing or refused)."""
        path = self.path_for(key)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        found, blob = _parse(data)
        reason = "it is not a kvdecode plan file or is truncated" if found is None else meta.mismatch(found)
        if reason is not None:
            self.refused += 1
            log.info("refusing cached cuDNN plan %s: %s; rebuilding", path, reason)
            return None
        return blob, found

    def save(self, key: GraphKey, meta: PlanMeta, blob: bytes, workspace_size: int) -> Path | None:
        """Write the plan atomically; returns the path, or None when the folder is not writable."""
        record = {
            "format_version": FORMAT_VERSION,
            "gpu_name": meta.gpu_name,
            "cudnn_version": meta.cudnn_version,
            "frontend_version": meta.frontend_version,
            "key": meta.key,
            "name": key.name,
            "workspace_size": int(workspace_size),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        header = json.dumps(record, sort_keys=True).encode()
        path = self.path_for(key)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".plan")
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + struct.pack(">I", len(header)) + header + bytes(blob))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not write the cuDNN plan cache at %s: %s", path, exc)
            return None
        return path

    def clear(self) -> int:
        """Delete every saved plan; returns how many files were removed."""
        removed = 0
        for p in self.folder.glob("*.plan"):
            try:
                p.unlink()
                removed += 1
            except OSError:
                pass
        return removed


def _parse(data: bytes) -> tuple[dict | None, bytes]:
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        return None, b""
    (size,) = struct.unpack(">I", data[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if len(data) < start + size:
        return None, b""
    try:
        found = json.loads(data[start : start + size].decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, b""
    blob = data[start + size :]
    if not isinstance(found, dict) or not blob:
        return None, b""
    return found, blob
