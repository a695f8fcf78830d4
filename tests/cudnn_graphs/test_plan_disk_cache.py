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
