"""Serialized cuDNN plans on disk, so a new process skips the graph build.

Location: ``$KVDECODE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/kvdecode``, else ``~/.cache/kvdecode``;
plans live in its ``cudnn_plans/`` folder. Set ``KVDECODE_DISK_CACHE=0`` to turn the disk cache off.

File format (version 2), one file per graph key::

    b"KVDECODE-CUDNN-PLAN v2\n"          magic line (names the format version)
    4 bytes, big-endian                   length of the header (at most MAX_HEADER_BYTES)
    header                                JSON: format_version, gpu_name, cudnn_version, frontend_version,
                                          key (canonical text), name, workspace_size, created,
                                          blob_size, blob_sha256 (hex)
    blob                                  ``graph.serialize()``, exactly blob_size bytes

Loading refuses, and the caller rebuilds and overwrites the file:

* a path that is not a regular file (a symlink, even to a plan; a FIFO, a device, a folder), checked
  with ``os.lstat`` before opening and again on the open descriptor (``O_NOFOLLOW | O_NONBLOCK``), or
  larger than :data:`MAX_PLAN_BYTES` (at most that much is ever read);
* a header that does not parse or has a field of the wrong type, and a blob whose length or SHA-256 is
  not the header's: the blob never reaches cuDNN. These are corruption: a ``RuntimeWarning`` names the
  file and the reason;
* a file for another GPU, cuDNN build, graph key or format version (an older kvdecode's file): logged at
  INFO, no warning, since an upgrade makes them.

Saving is atomic (a temp file in the folder, then a rename) and never raises: a failure is logged, and
the temp file is removed whatever went wrong.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import stat
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from .key import GraphKey

__all__ = ["MAX_PLAN_BYTES", "DiskCache", "PlanMeta", "default_cache_dir"]

log = logging.getLogger("kvdecode.cudnn_graphs")

MAGIC = b"KVDECODE-CUDNN-PLAN v2\n"
FORMAT_VERSION = 2
OLD_MAGICS = (b"KVDECODE-CUDNN-PLAN v1\n",)  # files of earlier formats: refused quietly, rebuilt
MAX_PLAN_BYTES = 64 * 2**20  # plans are ~100 KB; nothing larger is read
MAX_HEADER_BYTES = 64 * 2**10


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
        """``(blob, metadata)`` when a matching, intact plan is on disk, else None (missing or refused).

        The blob's length and SHA-256 are verified here, before anything is handed to cuDNN.
        """
        path = self.path_for(key)
        try:
            data = _read_plain_file(path)
        except FileNotFoundError:
            return None
        except _Refused as exc:
            return self._refuse(path, str(exc), corrupt=True)
        except OSError as exc:
            log.info("cannot read cached cuDNN plan %s (%s); rebuilding", path, exc)
            return None
        if data.startswith(OLD_MAGICS):
            return self._refuse(path, "it was saved in an older format", corrupt=False)
        try:
            found, blob = _parse(data)
        except _Refused as exc:
            return self._refuse(path, str(exc), corrupt=True)
        reason = meta.mismatch(found)
        if reason is not None:
            return self._refuse(path, reason, corrupt=False)
        return blob, found

    def _refuse(self, path: Path, reason: str, *, corrupt: bool) -> None:
        self.refused += 1
        if corrupt:
            warnings.warn(
                f"refusing cached cuDNN plan {path}: {reason}; rebuilding", RuntimeWarning, stacklevel=3
            )
        else:
            log.info("refusing cached cuDNN plan %s: %s; rebuilding", path, reason)
        return None

    def save(self, key: GraphKey, meta: PlanMeta, blob: bytes, workspace_size: int) -> Path | None:
        """Write the plan atomically; returns the path, or None when it could not be written (logged)."""
        path = self.path_for(key)
        tmp = None
        try:
            data = _encode(key, meta, bytes(blob), workspace_size)
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".plan")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            tmp = None
        except Exception as exc:  # a full disk, a read-only folder, a blob that is not bytes: never fatal
            log.warning("could not write the cuDNN plan cache at %s: %s", path, exc)
            return None
        finally:
            if tmp is not None:  # the write or the rename failed (or was interrupted): no leftover
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return path

    def clear(self) -> int:
        """Delete every saved plan (and any ``.tmp-*`` a killed process left); returns how many files."""
        removed = 0
        for p in self.folder.glob("*.plan"):
            try:
                p.unlink()
                removed += 1
            except OSError:
                pass
        return removed


class _Refused(Exception):
    """A plan file that must not be used; the message says why."""


def _encode(key: GraphKey, meta: PlanMeta, blob: bytes, workspace_size: int) -> bytes:
    record = {
        "format_version": FORMAT_VERSION,
        "gpu_name": meta.gpu_name,
        "cudnn_version": meta.cudnn_version,
        "frontend_version": meta.frontend_version,
        "key": meta.key,
        "name": key.name,
        "workspace_size": int(workspace_size),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "blob_size": len(blob),
        "blob_sha256": hashlib.sha256(blob).hexdigest(),
    }
    header = json.dumps(record, sort_keys=True).encode()
    return MAGIC + struct.pack(">I", len(header)) + header + blob


def _check_plain(st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise _Refused(f"it is not a regular file ({stat.filemode(st.st_mode)}); remove it")
    if st.st_size > MAX_PLAN_BYTES:
        raise _Refused(f"it has more than {MAX_PLAN_BYTES} bytes ({st.st_size})")


def _read_plain_file(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file (not a symlink) of at most MAX_PLAN_BYTES."""
    _check_plain(os.lstat(path))  # before opening: a FIFO would block, a device never end
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if os.path.islink(path):  # replaced by a symlink since the lstat (O_NOFOLLOW: ELOOP)
            raise _Refused("it is not a regular file (a symlink); remove it") from None
        raise exc
    with os.fdopen(fd, "rb") as f:
        _check_plain(os.fstat(f.fileno()))  # what was opened, should the path have changed
        data = f.read(MAX_PLAN_BYTES + 1)
    if len(data) > MAX_PLAN_BYTES:
        raise _Refused(f"it has more than {MAX_PLAN_BYTES} bytes")
    return data


def _parse(data: bytes) -> tuple[dict, bytes]:
    """The header and the verified blob of a version-2 file; :class:`_Refused` saying why not."""
    start = len(MAGIC) + 4
    if not data.startswith(MAGIC) or len(data) < start:
        raise _Refused("it is not a kvdecode plan file or is truncated")
    (size,) = struct.unpack(">I", data[len(MAGIC) : start])
    if size > MAX_HEADER_BYTES or len(data) < start + size:
        raise _Refused(f"its header length ({size}) is past the file's end or over {MAX_HEADER_BYTES}")
    try:
        found = json.loads(data[start : start + size].decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _Refused(f"its header is not JSON ({exc})") from None
    if not isinstance(found, dict):
        raise _Refused("its header is not a JSON object")
    for field, ok in (
        ("workspace_size", lambda v: _is_int(v) and v >= 0),
        ("blob_size", lambda v: _is_int(v) and v >= 1),
        ("blob_sha256", lambda v: isinstance(v, str) and len(v) == 64),
    ):
        if not ok(found.get(field)):
            raise _Refused(f"header field {field} is {found.get(field)!r}")
    blob = data[start + size :]
    if len(blob) != found["blob_size"]:
        raise _Refused(f"its blob has length {len(blob)}, the header says {found['blob_size']} (truncated?)")
    if hashlib.sha256(blob).hexdigest() != found["blob_sha256"]:
        raise _Refused("its blob does not match the header's SHA-256 checksum (corrupted)")
    return found, blob


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
