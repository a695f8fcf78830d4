"""Results of the decode benchmark: records, environment metadata, JSON + markdown output.

Pure host logic except :func:`environment`, which reads the GPU when there is one.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from kvdecode.timing import gbps, pct_of_floor

__all__ = [
    "SCHEMA",
    "backend_error",
    "backend_na",
    "backend_ok",
    "environment",
    "new_result",
    "result_stem",
    "slug",
    "validate_result",
    "write_result",
]

SCHEMA = "kvdecode.bench_decode/2"  # 2: the floor is the best streaming read of the run, not the copy
STATUSES = ("ok", "n/a", "skipped", "error")
_REQUIRED_TOP = ("schema", "meta", "config", "copy_bandwidth_gbps", "floor_bandwidth_gbps", "bandwidth")
_REQUIRED_TOP += ("cells", "static_cache", "host_overhead", "over_ceiling")
_REQUIRED_CELL = ("name", "case", "batch", "num_q_heads", "num_kv_heads", "head_dim", "seq_len", "capacity")
_REQUIRED_CELL += ("dtype", "kv_bytes", "status", "results")


# ---- records ----


def backend_ok(
    steady_us: float, isolated_us: float | None, nbytes: int, floor: float | None, **extra
) -> dict:
    """A measured backend: steady-state µs per layer (primary), isolated µs, GB/s, % of floor, vs SDPA."""
    rec = {
        "status": "ok",
        "steady_us": steady_us,
        "isolated_us": isolated_us,
        "gbps": gbps(nbytes, steady_us),
    }
    rec["pct_floor"] = pct_of_floor(steady_us, floor) if floor else None
    rec["isolated_pct_floor"] = pct_of_floor(isolated_us, floor) if floor and isolated_us else None
    rec.update(extra)
    return rec


def backend_na(reason: str) -> dict:
    """A backend this installation or problem cannot serve (not an error of the benchmark)."""
    return {"status": "n/a", "reason": reason}


def backend_error(exc: BaseException, *, skipped: bool = False) -> dict:
    """An exception caught while measuring; ``skipped`` for out-of-memory and similar expected limits."""
    return {"status": "skipped" if skipped else "error", "reason": f"{type(exc).__name__}: {exc}"[:2000]}


def new_result(meta: dict, config: dict) -> dict:
    """An empty results document; sections are filled in as the run goes."""
    return {
        "schema": SCHEMA,
        "meta": meta,
        "config": config,
        "copy_bandwidth_gbps": None,
        "floor_bandwidth_gbps": None,
        "bandwidth": {},
        "floor_rule": (
            "floor = KV bytes / floor_bandwidth_gbps, the best read-only bandwidth measured in this run "
            "(decode_bandwidth.read_bandwidths); copy and datasheet figures beside it under 'bandwidth'; "
            "'over_ceiling' lists every result above 100% of its floor"
        ),
        "over_ceiling": [],
        "steady_state_rule": (
            "N layers with distinct caches captured in one CUDA graph; median of 20 replays / N. "
            "N = max(8, ceil(1 GB / KV bytes of one layer)), capped by free device memory; "
            "'l2_resident' marks cells whose whole replay fits in L2."
        ),
        "cells": [],
        "static_cache": {},
        "host_overhead": {},
        "captured_step": {},
        "cudnn_graphs": {},
        "errors": [],
    }


def add_vs_sdpa(cell: dict) -> None:
    """Add ``vs_sdpa`` (steady time / SDPA's steady time) to each measured kvdecode backend of ``cell``."""
    sdpa = cell["results"].get("sdpa", {})
    if sdpa.get("status") != "ok":
        return
    for name, rec in cell["results"].items():
        if name != "sdpa" and rec.get("status") == "ok":
            rec["vs_sdpa"] = rec["steady_us"] / sdpa["steady_us"]


def validate_result(doc: dict) -> list[str]:
    """Problems with ``doc``'s structure (empty when it follows :data:`SCHEMA`)."""
    problems = [f"missing top-level key {k!r}" for k in _REQUIRED_TOP if k not in doc]
    if doc.get("schema") != SCHEMA:
        problems.append(f"schema must be {SCHEMA!r}, got {doc.get('schema')!r}")
    for i, cell in enumerate(doc.get("cells", [])):
        problems += [f"cells[{i}] missing {k!r}" for k in _REQUIRED_CELL if k not in cell]
        if cell.get("status") not in STATUSES:
            problems.append(f"cells[{i}].status must be one of {STATUSES}, got {cell.get('status')!r}")
        for name, rec in cell.get("results", {}).items():
            problems += _check_backend_record(f"cells[{i}].results[{name!r}]", rec)
    try:
        json.dumps(doc, allow_nan=False)
    except (TypeError, ValueError) as exc:
        problems.append(f"not strict JSON: {exc}")
    return problems


def _check_backend_record(where: str, rec: dict) -> list[str]:
    status = rec.get("status")
    if status not in STATUSES:
        return [f"{where}.status must be one of {STATUSES}, got {status!r}"]
    if status == "ok":
        return [
            f"{where} missing {k!r}"
            for k in ("steady_us", "isolated_us", "gbps", "pct_floor")
            if k not in rec
        ]
    return [] if rec.get("reason") else [f"{where} has status {status!r} but no reason"]


# ---- environment ----


def slug(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def result_stem(meta: dict, quick: bool) -> str:
    """File name stem ``<gpu-slug>-<date>`` (``-quick`` appended for smoke runs)."""
    stem = f"{slug(meta.get('gpu_name') or 'cpu')}-{meta['date']}"
    return stem + "-quick" if quick else stem


def environment(repo_root: Path) -> dict:
    """GPU, driver, library versions, git commit and date of this run; never raises."""
    meta: dict = {
        "date": _dt.date.today().isoformat(),
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "torch_cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    meta.update(_gpu_info())
    meta["triton"] = _try(lambda: __import__("triton").__version__)
    meta["cudnn_frontend"] = _try(lambda: __import__("cudnn").__version__)
    meta["cudnn_backend"] = _try(lambda: __import__("cudnn").backend_version())
    meta["kvdecode"] = _try(lambda: __import__("kvdecode").__version__)
    meta["git_commit"] = _git(repo_root, "rev-parse", "HEAD")
    status = _git(repo_root, "status", "--porcelain", "--untracked-files=no")
    meta["git_dirty"] = None if status is None else bool(status)
    return meta


def _gpu_info() -> dict:
    if not torch.cuda.is_available():
        return {
            "gpu_name": None,
            "sm_count": None,
            "l2_bytes": None,
            "gpu_memory_bytes": None,
            "driver": None,
        }
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"])
    return {
        "gpu_name": props.name,
        "sm_count": props.multi_processor_count,
        "compute_capability": f"{props.major}.{props.minor}",
        "l2_bytes": getattr(props, "L2_cache_size", None),
        "gpu_memory_bytes": props.total_memory,
        "driver": driver.splitlines()[0].strip() if driver else None,
    }


def _try(fn):
    try:
        value = fn()
    except Exception:
        return None
    return value if isinstance(value, (str, int, float)) or value is None else str(value)


def _git(root: Path, *args: str) -> str | None:
    out = _run(["git", "-C", str(root), *args])
    return None if out is None else out.strip()


def _run(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout


# ---- output ----


def write_result(doc: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` under ``out_dir`` (atomically replaced); return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = (out_dir / f"{stem}.json", out_dir / f"{stem}.md")
    from decode_markdown import render_markdown

    for path, text in zip(paths, (json.dumps(_finite(doc), indent=1), render_markdown(doc))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, path)
    return paths


def _finite(obj):
    """Replace NaN/inf floats by None so the JSON is strict."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
