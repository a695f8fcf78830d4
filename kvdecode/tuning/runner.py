"""The tuning loop: every point measured once, the table rewritten after each, resumable.

The output file is the table itself, with ``metadata.partial`` true until the last point: an
interrupted run leaves a usable table of what it measured, and a rerun with the same ``--out`` skips
the points already in it (``--fresh`` starts over). A file measured on another GPU or with other
versions is never resumed into.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

import torch

from ..errors import KVDecodeError
from ..thresholds import read_table, resolve_table, save_table
from ..triton_kernels.config import sm_count as config_sm_count
from .crossover import add_point, finalize, measured_points, new_table
from .environment import current_environment, device_gpu_name, mismatch_reasons
from .measure import PointBench, SkipPoint, tune_point
from .spec import Point, TuneSpec

__all__ = ["Progress", "load_for_resume", "run_tune"]

MEASURE_TEXT = (
    "kvdecode.timing.steady_state_us: N layers (distinct caches, N = steady_state_layers) in one CUDA "
    "graph, median replay / N; search with {search} replays, recorded numbers with 20; capacity = "
    "filled length = L, T_q 1, no mask (families ending in _mask: a bool mask [B, 1, T_q, L] that hides "
    "nothing, and kv_start)"
)


class Progress:
    """A one-line progress bar on stderr (rewritten in place on a terminal, one line per step otherwise)."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total, self.done = total, 0
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def step(self, text: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        width = 20
        filled = width * self.done // max(1, self.total)
        bar = "#" * filled + "." * (width - filled)
        line = f"[{bar}] {self.done}/{self.total} {_clock(elapsed)} eta {_clock(eta)}  {text}"
        self.stream.write(("\r\033[K" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


def load_for_resume(path: Path, metadata: dict) -> dict | None:
    """The table at ``path`` to continue, None when there is none; KVDecodeError when it must not be."""
    if not path.exists():
        return None
    raw = read_table(path)
    if raw["schema_version"] < 2:
        raise KVDecodeError(
            f"--out {path} holds a version-1 table, which cannot be resumed; pass another --out or --fresh"
        )
    env = current_environment(metadata["gpu_name"])
    reasons = mismatch_reasons(raw["metadata"], env)
    if reasons:
        raise KVDecodeError(
            f"--out {path} cannot be resumed: {'; '.join(reasons)}; pass another --out or --fresh"
        )
    return raw


def run_tune(
    spec: TuneSpec,
    out: Path,
    *,
    fresh: bool = False,
    remeasure: bool = False,
    search_replays: int = 10,
    command: str = "",
    stream: TextIO | None = None,
    device: torch.device | None = None,
) -> dict:
    """Measure every point of ``spec`` not yet in ``out``; write ``out`` after each; returns the table.

    ``remeasure``: measure the spec's points already in ``out`` again too (a new search, say), keeping
    every other point of the table; the crossovers are recomputed from the whole table.

    ``device`` defaults to the current CUDA device (a CPU device runs the plumbing through the Triton
    interpreter; its timings mean nothing).
    """
    if device is None:
        if not torch.cuda.is_available():
            raise KVDecodeError("kvdecode tune needs a CUDA GPU, got none; use --dry-run to see the plan")
        device = torch.device("cuda", torch.cuda.current_device())
    env = current_environment(device_gpu_name(device))
    sm_count = config_sm_count(device)
    meta = env.metadata()
    meta.update(sm_count=sm_count, measure=MEASURE_TEXT.format(search=search_replays), command=command)
    raw = None if fresh else load_for_resume(out, meta)
    if raw is None and spec.families and all(f.masked for f in spec.families):
        raw = _seed(meta, progress_stream=stream or sys.stderr)
    if raw is None:
        raw = new_table(meta)
    done = measured_points(raw)
    todo = [p for p in spec.points() if remeasure or (p.family.key, p.batch, p.length) not in done]
    progress = Progress(len(todo), stream)
    if len(todo) < len(spec.points()):
        progress.stream.write(f"resuming {out}: {len(spec.points()) - len(todo)} points already measured\n")
    elif remeasure and done:
        again = sum((p.family.key, p.batch, p.length) in done for p in todo)
        progress.stream.write(f"remeasuring {again} of {out}'s points; its other points are kept\n")
        if again and command:  # the table says which of its points came from which command
            before = raw["metadata"].get("command") or ""
            raw["metadata"]["command"] = f"{before}; {command} ({meta['date']}, remeasured)".lstrip("; ")
    try:
        for point in todo:
            record = _measure(point, device, sm_count, spec.coarse, search_replays)
            if record is not None:
                add_point(raw, _family_dict(point), point.batch, point.length, record)
                save_table(finalize(raw, partial=True), out)
            progress.step(_summary(point, record))
    finally:
        progress.close()
    raw["metadata"]["date"] = meta["date"]
    return _save_final(raw, out)


def _seed(meta: dict, *, progress_stream: TextIO) -> dict | None:
    """The table in use for this GPU, to start a new table of masked families from: a table holding
    only masked twins would be looked up before it and hide its crossovers and mask-free
    configurations from every other call. None when no table is in use (or it does not match)."""
    import copy

    found = resolve_table(meta["gpu_name"]).table
    if found is None or not found.path:
        return None
    raw = read_table(found.path)
    if raw["schema_version"] < 2 or mismatch_reasons(raw["metadata"], current_environment(meta["gpu_name"])):
        return None
    raw = copy.deepcopy(raw)
    raw["metadata"].update({k: v for k, v in meta.items() if k in ("command", "measure")})
    progress_stream.write(f"starting from {found.path}: its points are kept, the masked families added\n")
    return raw


def _save_final(raw: dict, out: Path) -> dict:
    save_table(finalize(raw, partial=False), out)
    return raw


def _measure(point: Point, device: torch.device, sm_count: int, coarse: bool, replays: int) -> dict | None:
    bench = None
    try:
        bench = PointBench(point, device)
        return tune_point(bench, sm_count=sm_count, coarse=coarse, search_replays=replays)
    except (SkipPoint, torch.cuda.OutOfMemoryError) as exc:
        sys.stderr.write(f"skipping {point.name}: {exc}\n")
        return None
    except Exception as exc:  # one bad point must not lose the run: report it, go on (rerun retries it)
        first = (str(exc).strip().splitlines() or ["no message"])[0]
        sys.stderr.write(f"error at {point.name}: {type(exc).__name__}: {first}; not recorded\n")
        return None
    finally:
        if bench is not None:
            bench.close()


def _family_dict(point: Point) -> dict:
    f = point.family
    return {
        "key": f.key,
        "num_q_heads": f.num_q_heads,
        "num_kv_heads": f.num_kv_heads,
        "head_dim": f.head_dim,
        "q_len": f.q_len,
        "dtype": f.dtype_name,
        "presets": f.label,
        **({"mask": "bool"} if f.masked else {}),
    }


def _summary(point: Point, record: dict | None) -> str:
    if record is None:
        return f"{point.name}: skipped"
    cudnn = record["cudnn_us"]
    return (
        f"{point.name}: triton {record['triton_us']:.1f} us (default {record['default_us']:.1f}), "
        f"cuDNN {'n/a' if cudnn is None else f'{cudnn:.1f} us'}"
    )
