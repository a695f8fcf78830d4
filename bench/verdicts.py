"""Issue 18's targets judged on a run's result files, cell by cell (no GPU needed).

    python bench/verdicts.py --decode bench/results/<dir>/nvidia-h200-<date>.json \\
                             --generate bench/results/<dir>/hf-generate-nvidia-h200-<date>.json

``--decode`` (``bench_decode.py``'s JSON): every cell of B >= 4 and L <= 4k where ``kvdecode-auto``
is slower than torch SDPA in the same run by more than rounding (``> 1.00x``; target: none), and every
cell that moves >= 1 GB where auto reads below 99% of the run's floor (the floor is that run's best
streaming read, so a run with a faster streaming read puts every cell lower). ``--generate``
(``bench_generate.py``'s JSON): every row and mode where kvdecode is slower than the faster of sdpa
and flex_attention (target: none), with the margin.
Prints one line per miss and a summary line per file; exit status 0 whether or not targets are met
(the verdict is the text).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BATCH_CELLS = dict(min_batch=4, max_length=4096)  # issue 18 item 1: never slower than torch SDPA there
LARGE_BYTES = 10**9  # "large cells": at >= 99% of the read floor
FLOOR_PCT = 99.0


def decode_verdicts(raw: dict) -> list[str]:
    """One line per cell that misses a target of the kernel at batch (and the large cells' floor)."""
    lines, judged = [], 0
    for cell in raw["cells"]:
        auto, sdpa = cell["results"].get("kvdecode-auto", {}), cell["results"].get("sdpa", {})
        if auto.get("status") != "ok" or sdpa.get("status") != "ok":
            continue
        name = f"{cell['case']} B {cell['batch']} L {cell['seq_len']}"
        ratio = auto["steady_us"] / sdpa["steady_us"]
        in_batch_cells = (
            cell["batch"] >= BATCH_CELLS["min_batch"] and cell["seq_len"] <= BATCH_CELLS["max_length"]
        )
        if in_batch_cells:
            judged += 1
            if round(ratio, 2) > 1.0:  # (the target is "<= 1.00x": 243.2 against 243.1 µs meets it)
                lines.append(
                    f"miss  {name}: auto {auto['steady_us']:.1f} µs vs SDPA {sdpa['steady_us']:.1f} "
                    f"({ratio:.3f}x, {auto.get('chosen', '?')})"
                )
        if cell["kv_bytes"] >= LARGE_BYTES and auto["pct_floor"] < FLOOR_PCT:
            lines.append(f"floor {name}: auto at {auto['pct_floor']:.1f}% of the read floor (< {FLOOR_PCT}%)")
    misses = sum(line.startswith("miss") for line in lines)
    lines.append(f"decode: {judged} cells with B >= 4, L <= 4k; {misses} slower than torch SDPA")
    return lines


def generate_verdicts(raw: dict) -> list[str]:
    """One line per (row, mode) where kvdecode is slower than the faster of sdpa and flex_attention."""
    by_row: dict[tuple, dict[str, float]] = {}
    for r in raw["results"]:
        if "ms_per_step" not in r:
            continue
        key = (r["batch"], r["capacity"], r["filled"], r.get("window", 0), r["mode"])
        by_row.setdefault(key, {})[r["backend"]] = r["ms_per_step"]
    lines, judged = [], 0
    for (batch, cap, filled, window, mode), ms in sorted(by_row.items()):
        peers = {b: ms[b] for b in ("sdpa", "flex_attention") if b in ms}
        if "kvdecode" not in ms or not peers:
            continue
        judged += 1
        best, best_ms = min(peers.items(), key=lambda kv: kv[1])
        if ms["kvdecode"] > best_ms:
            where = f"B {batch} cap {cap} L {filled}" + (f" window {window}" if window else "")
            lines.append(
                f"miss  {where} {mode}: kvdecode {ms['kvdecode']:.2f} ms vs {best} {best_ms:.2f} "
                f"({ms['kvdecode'] / best_ms:.3f}x)"
            )
    misses = len(lines)
    lines.append(f"generate: {judged} (row, mode) pairs; {misses} where kvdecode is not the fastest")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decode", type=Path, help="bench_decode.py's JSON")
    p.add_argument("--generate", type=Path, help="bench_generate.py's JSON")
    args = p.parse_args(argv)
    if args.decode is None and args.generate is None:
        p.error("give --decode and/or --generate")
    if args.decode is not None:
        print("\n".join(decode_verdicts(json.loads(args.decode.read_text()))))
    if args.generate is not None:
        print("\n".join(generate_verdicts(json.loads(args.generate.read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
