"""Serialized plans on disk: metadata checks, refusal and rebuild, cache-dir resolution (no GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
from problems import make_key, make_problem

from kvdecode.cudnn_graphs.builder import BuiltGraph
from kvdecode.cudnn_graphs.disk_cache import MAGIC, DiskCache, PlanMeta, default_cache_dir
from kvdecode.cudnn_graphs.store import load_or_build

H100 = "NVIDIA H100 80GB HBM3"


def _meta(key, gpu=H100, version=91900, frontend="1.32.0"):
    return PlanMeta(gpu_name=gpu, cudnn_version=version, frontend_version=frontend, key=key.canonical())


def test_round_trip(tmp_path):
    disk = DiskCache(tmp_path)
    key = make_key(make_problem())
    blob = bytes(range(256)) * 40
    path = disk.save(key, _meta(key), blob, workspace_size=4096)
    assert path is not None and path.parent == tmp_path / "cudnn_plans" and key.name in path.name
    loaded, record = disk.load(key, _meta(key))
    assert loaded == blob
    assert record["workspace_size"] == 4096 and record["gpu_name"] == H100


@pytest.mark.parametrize(
    "other",
    [dict(gpu="NVIDIA A100-SXM4-80GB"), dict(version=90100), dict(frontend="1.31.0")],
)
def test_blob_from_another_gpu_or_version_is_refused(tmp_path, other):
    disk = DiskCache(tmp_path)
    key = make_key(make_problem())
    disk.save(key, _meta(key, **other), b"plan-from-elsewhere", workspace_size=0)
    assert disk.load(key, _meta(key)) is None
    assert disk.refused == 1


def test_blob_for_another_key_is_refused(tmp_path):
    disk = DiskCache(tmp_path)
    key = make_key(make_problem())
    other = make_key(make_problem(capacity=2048))
    disk.save(key, _meta(other), b"plan", workspace_size=0)  # right file name, wrong key inside
    assert disk.load(key, _meta(key)) is None


@pytest.mark.parametrize(
    "content", [b"", b"garbage", MAGIC + b"\x00\x00\x10\x00{", MAGIC + b"\x00\x00\x00\x02{}"]
)
def test_corrupt_files_are_refused(tmp_path, content):
    disk = DiskCache(tmp_path)
    key = make_key(make_problem())
    disk.folder.mkdir(parents=True)
    disk.path_for(key).write_bytes(content)
    with pytest.warns(RuntimeWarning, match="refusing cached cuDNN plan"):
        assert disk.load(key, _meta(key)) is None


def _fake(key, source, ws=0):
    return BuiltGraph(key=key, graph=object(), workspace_size=ws, source=source, seconds=0.0)


def test_load_or_build_rebuilds_a_refused_blob_and_overwrites_it(tmp_path):
    disk = DiskCache(tmp_path)
    key = make_key(make_problem())
    disk.save(key, _meta(key, gpu="another GPU"), b"stale", workspace_size=0)
    calls = []
    build = lambda: calls.append("build") or _fake(key, "build", ws=128)
    load = lambda blob, ws: calls.append(("load", blob, ws)) or _fake(key, "disk", ws)
    got = load_or_build(
        key, disk=disk, meta=_meta(key), build=build, load=load, serialize_fn=lambda b: b"fresh"
    )
    assert got.source == "build" and calls == ["build"]
    got = load_or_build(
        key, disk=disk, meta=_meta(key), build=build, load=load, serialize_fn=lambda b: b"fresh"
    )
    assert got.source == "disk" and calls == ["build", ("load", b"fresh", 128)]


def test_load_or_build_survives_a_blob_the_library_rejects(tmp_path):
    disk = DiskCache(tmp_path)
    key = make_key(make_problem())
    disk.save(key, _meta(key), b"bad", workspace_size=0)

    def load(blob, ws):
        raise RuntimeError("cudnn: deserialization failed")

    got = load_or_build(
        key,
        disk=disk,
        meta=_meta(key),
        build=lambda: _fake(key, "build"),
        load=load,
        serialize_fn=lambda b: b"ok",
    )
    assert got.source == "build"
    assert disk.load(key, _meta(key))[0] == b"ok"


def test_unwritable_cache_dir_is_not_an_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    disk = DiskCache(blocker)
    key = make_key(make_problem())
    assert disk.save(key, _meta(key), b"x", workspace_size=0) is None


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("KVDECODE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "kvdecode"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "kvdecode"
    monkeypatch.setenv("KVDECODE_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    assert DiskCache().folder == tmp_path / "mine" / "cudnn_plans"


def test_clear_removes_plans(tmp_path):
    disk = DiskCache(tmp_path)
    for cap in (64, 128):
        key = make_key(make_problem(capacity=cap))
        disk.save(key, _meta(key), b"x", workspace_size=0)
    assert disk.clear() == 2
    assert not list(disk.folder.glob("*.plan"))


# ---- failed saves, blob integrity, files that are not plain files (issue 12, defect 9) ----


def _saved(tmp_path, blob=b"plan-bytes" * 100):
    disk = DiskCache(tmp_path)
    key = make_key(make_problem())
    path = disk.save(key, _meta(key), blob, workspace_size=64)
    assert path is not None
    return disk, key, path


class _Unserializable:
    def __bytes__(self):
        raise RuntimeError("no bytes here")


class _FullDisk:
    """``os.fdopen`` whose file refuses every write, as on a full disk."""

    def __init__(self, fd, mode):
        self.f = open(fd, mode)  # noqa: SIM115 (closed in __exit__)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        raise OSError(28, "No space left on device")


@pytest.mark.parametrize("failure", ["replace", "write", "blob"])
def test_a_failed_save_leaves_no_temp_file(tmp_path, monkeypatch, failure):
    from kvdecode.cudnn_graphs import disk_cache

    disk = DiskCache(tmp_path)
    key = make_key(make_problem())
    blob = b"x" * 100
    if failure == "replace":
        monkeypatch.setattr(disk_cache.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(28, "full")))
    elif failure == "write":
        monkeypatch.setattr(disk_cache.os, "fdopen", _FullDisk)
    else:
        blob = _Unserializable()
    assert disk.save(key, _meta(key), blob, workspace_size=0) is None  # logged, never raised
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []


def test_files_carry_a_length_and_checksum_verified_on_load(tmp_path):
    disk, key, path = _saved(tmp_path)
    data = path.read_bytes()
    assert data.startswith(MAGIC) and b'"blob_sha256"' in data and b'"blob_size": 1000' in data
    for name, bad in (("flipped", data[:-1] + bytes([data[-1] ^ 1])), ("truncated", data[:-1])):
        path.write_bytes(bad)
        with pytest.warns(RuntimeWarning, match=f"refusing cached cuDNN plan {path}.*(checksum|length)"):
            assert disk.load(key, _meta(key)) is None, name


def test_a_corrupt_blob_is_rebuilt_and_overwritten(tmp_path):
    disk, key, path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-3] + b"zzz")
    calls = []
    build = lambda: calls.append("build") or _fake(key, "build", ws=64)
    load = lambda blob, ws: calls.append("load") or _fake(key, "disk", ws)
    with pytest.warns(RuntimeWarning, match="checksum"):
        got = load_or_build(
            key, disk=disk, meta=_meta(key), build=build, load=load, serialize_fn=lambda b: b"new"
        )
    assert got.source == "build" and calls == ["build"]  # the corrupt blob never reached cuDNN
    assert disk.load(key, _meta(key))[0] == b"new"


@pytest.mark.parametrize("kind", ["symlink to /dev/zero", "symlink to a plan", "fifo", "folder"])
def test_a_plan_path_that_is_not_a_regular_file_is_not_read(tmp_path, kind):
    import os

    disk, key, path = _saved(tmp_path)
    good = path.with_name("elsewhere.bin")
    path.rename(good)
    if kind == "symlink to /dev/zero":
        path.symlink_to("/dev/zero")
    elif kind == "symlink to a plan":
        path.symlink_to(good)
    elif kind == "fifo":
        os.mkfifo(path)  # opening it to read would block until a writer came
    else:
        path.mkdir()
    with pytest.warns(RuntimeWarning, match="not a regular file"):
        assert disk.load(key, _meta(key)) is None


def test_an_oversized_plan_file_is_not_read(tmp_path):
    from kvdecode.cudnn_graphs.disk_cache import MAX_PLAN_BYTES

    disk, key, path = _saved(tmp_path)
    with open(path, "r+b") as f:
        f.truncate(MAX_PLAN_BYTES + 1)  # sparse: no disk used
    with pytest.warns(RuntimeWarning, match=f"more than {MAX_PLAN_BYTES} bytes"):
        assert disk.load(key, _meta(key)) is None


@pytest.mark.parametrize(
    "field, value",
    [("workspace_size", "4096"), ("workspace_size", -1), ("blob_size", None), ("blob_sha256", 7)],
)
def test_a_header_field_of_a_wrong_type_is_refused(tmp_path, field, value):
    import json
    import struct

    disk, key, path = _saved(tmp_path)
    data = path.read_bytes()
    (size,) = struct.unpack(">I", data[len(MAGIC) : len(MAGIC) + 4])
    header = json.loads(data[len(MAGIC) + 4 : len(MAGIC) + 4 + size])
    header[field] = value
    text = json.dumps(header).encode()
    path.write_bytes(MAGIC + struct.pack(">I", len(text)) + text + data[len(MAGIC) + 4 + size :])
    with pytest.warns(RuntimeWarning, match=field):
        assert disk.load(key, _meta(key)) is None


def test_a_file_of_the_previous_format_is_refused_quietly_and_rebuilt(tmp_path, recwarn):
    disk = DiskCache(tmp_path)
    key = make_key(make_problem())
    disk.folder.mkdir(parents=True)
    disk.path_for(key).write_bytes(b"KVDECODE-CUDNN-PLAN v1\n\x00\x00\x00\x02{}blob")
    assert disk.load(key, _meta(key)) is None and disk.refused == 1
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]  # an upgrade is not corruption


def test_load_or_build_survives_a_failing_disk_cache(tmp_path):
    class Broken(DiskCache):
        def load(self, key, meta):
            raise MemoryError("no room to read")

    key = make_key(make_problem())
    with pytest.warns(RuntimeWarning, match="no room to read"):
        got = load_or_build(
            key, disk=Broken(tmp_path), meta=_meta(key), build=lambda: _fake(key, "build"),
            load=lambda blob, ws: _fake(key, "disk"), serialize_fn=lambda b: b"ok",
        )  # fmt: skip
    assert got.source == "build"
