#!/usr/bin/env python3
"""Decode-attention benchmark: kvdecode (Triton, cuDNN, auto) against torch SDPA and the memory floor.

Usage::

    python3 bench/bench_decode.py --out bench/results            # full run, ~6 min on an H100
    python3 bench/bench_decode.py --out /tmp/smoke --quick       # smoke run, ~1 min
    python3 bench/bench_decode.py --dry-run                      # list cells and bytes, no GPU needed

Writes ``<out>/<gpu-slug>-<date>.json`` and ``.md`` (``-quick`` appended for --quick), rewritten after
every cell so a killed run keeps what it measured. See bench/README.md for what each number means.
Exit status: 0, or 1 when a correctness check failed, 2 without a CUDA device (use --dry-run), 3 when a
result read faster than the floor (the best read-only bandwidth measured in the run; listed in the report).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(HERE), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from decode_grid import (  # noqa: E402
    BACKENDS,
    FULL_GRID,
    QUICK_GRID,
    VARIANTS,
    build_cells,
    format_length,
    parse_backends,
    parse_grid,
    parse_length,
    plan_layers,
)

SECTIONS = ("cudnn", "host", "grid", "static", "step", "variants")
STATIC_LENGTHS = "1k,2k,4k,8k,16k,32k"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", type=Path, default=HERE / "results", help="results folder (default bench/results)"
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: a few cells, fewer calls (~1 min)")
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"subset of {','.join(BACKENDS)}")
    ap.add_argument("--grid", default=None, help="main grid, e.g. 'B=1,4,16,64;L=1k,4k,16k,64k,128k'")
    ap.add_argument("--variants", default=None, help=f"B 1 variant rows, subset of {','.join(VARIANTS)}")
    ap.add_argument("--variant-lengths", default=None, help="lengths of the variant rows (default: grid L)")
    ap.add_argument("--static-lengths", default=None, help=f"static-cache lengths (default {STATIC_LENGTHS})")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {','.join(SECTIONS)}")
    ap.add_argument("--replays", type=int, default=20, help="timed graph replays per measure (median)")
    ap.add_argument("--host-calls", type=int, default=None, help="calls per host-overhead measure (1000)")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds; later cells are skipped")
    ap.add_argument("--keep-disk-cache", action="store_true", help="use the usual cuDNN plan disk cache")
    ap.add_argument("--dry-run", action="store_true", help="list cells and bytes without a GPU")
    ap.add_argument("--assume-free-gb", type=float, default=79.0, help="device memory for --dry-run")
    args = ap.parse_args(argv)
    try:
        _resolve(args)
    except ValueError as exc:
        ap.error(str(exc))
    return args


def _lengths(text: str) -> tuple[int, ...]:
    return tuple(parse_length(t) for t in text.split(",") if t.strip())


def _resolve(args: argparse.Namespace) -> None:
    """Fill defaults that depend on --quick and parse the list options in place."""
    q = args.quick
    args.backends = parse_backends(args.backends)
    args.grid = parse_grid(args.grid) if args.grid else dict(QUICK_GRID if q else FULL_GRID)
    variants = args.variants if args.variants is not None else ",".join(VARIANTS)
    args.variants = tuple(v.strip() for v in variants.split(",") if v.strip())
    vl = args.variant_lengths or ("1k" if q else None)
    args.variant_lengths = _lengths(vl) if vl else args.grid["L"]
    args.static_lengths = _lengths(args.static_lengths or ("1k,32k" if q else STATIC_LENGTHS))
    args.sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        raise ValueError(f"--sections must be a subset of {','.join(SECTIONS)}, got {bad}")
    args.host_calls = args.host_calls or (200 if q else 1000)
    args.time_budget = args.time_budget or (75.0 if q else 330.0)
    args.cells = build_cells(
        args.grid if "grid" in args.sections else {"B": (), "L": ()},
        args.variants if "variants" in args.sections else (),
        args.variant_lengths,
    )


def dry_run(args: argparse.Namespace) -> int:
    """Print the cells, their bytes and layer counts under ``--assume-free-gb``; touches no GPU."""
    from kvdecode.timing import RESERVE_BYTES

    budget = int(args.assume_free_gb * 1e9) - RESERVE_BYTES
    print(f"sections: {','.join(args.sections)}; backends: {','.join(args.backends)}")
    kept = f"{RESERVE_BYTES / 1e9:.0f} GB kept back"
    print(f"assumed free device memory {args.assume_free_gb:.0f} GB ({kept})\n")
    print(f"{'cell':<44} {'KV/layer MB':>12} {'layers':>6} {'replay GB':>9}  note")
    total = 0
    for spec in args.cells:
        reason = spec.skip_reason()
        n = 0 if reason else plan_layers(spec, budget)
        note = reason or ("does not fit" if n == 0 else "")
        if n and n * spec.kv_bytes <= 50 * 2**20:
            note = "replay fits in an H100's 50 MB L2"
        total += n * spec.alloc_bytes
        print(f"{spec.name:<44} {spec.kv_bytes / 1e6:>12.1f} {n:>6} {n * spec.kv_bytes / 1e9:>9.2f}  {note}")
    print(f"\n{len(args.cells)} cells, {total / 1e9:.1f} GB of caches allocated in all (one cell at a time)")
    if "static" in args.sections:
        lens = ",".join(format_length(n) for n in args.static_lengths)
        print(f"static cache: B 8, H 32/8, D 128, capacity 32k, lengths {lens}")
    print(f"time budget {args.time_budget:.0f} s; host overhead {args.host_calls} calls per measure")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    import torch

    if not torch.cuda.is_available():
        print("bench_decode: no CUDA device; use --dry-run to list the cells", file=sys.stderr)
        return 2
    if not args.keep_disk_cache:  # a cold disk cache, so "first build" is a build (read by cudnn_graphs)
        os.environ["KVDECODE_CACHE_DIR"] = tempfile.mkdtemp(prefix="kvdecode-bench-cache-")
    from decode_runner import Runner

    return Runner(args, REPO).run()


if __name__ == "__main__":
    sys.exit(main())
