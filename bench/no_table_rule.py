"""Derive and check the planner's rule for GPUs without a tuning table (issue 11, item 2).

Reads the shipped tables (``kvdecode/tuning/default_h200.json``, ``default_h100.json``). A table cell
is one family (heads, head dim), batch B and length L (capacity = filled length = L), measured
steady state: ``default_us`` (Triton at its heuristic configuration: what runs without a table) and
``cudnn_us``. For a rule that sends the call to cuDNN iff L >= threshold, the cell's regret is

    time(chosen backend) / min(default_us, cudnn_us)

Cells without ``cudnn_us`` are listed with the rule's choice but have no regret (since 2026-12-04
every cell of both tables has both backends: the H200's D 64 / D 256 families were re-tuned with
cuDNN). For each regime of :mod:`kvdecode.no_table_rule` the script prints the range of
"cuDNN from X bytes" that keeps every cell of that regime within BOUND, then evaluates the shipped rule
and simpler alternatives (a flat 8192, one byte size for all), prints the cells and writes JSON.

    python bench/no_table_rule.py [--out bench/results/h200-2026-12-04/no-table-rule.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from kvdecode import no_table_rule as rule
from kvdecode.thresholds import TUNING_DIR

BOUND = 1.10
TABLES = ("default_h200.json", "default_h100.json")
DEFAULT_OUT = Path(__file__).parent / "results" / "h200-2026-12-04" / "no-table-rule.json"


# The H200 benchmark cells quoted in DESIGN.md and issue 11 (steady state, µs per layer, bf16, H_q 32):
# (H_kv, D, B, L, Triton heuristic, cuDNN at capacity). Not a table: a second check on other lengths.
BENCH_CELLS = [
    (8, 128, 1, 1024, 6.4, 9.2), (8, 128, 1, 4096, 9.4, 13.3), (8, 128, 1, 16384, 22.7, 24.9),
    (8, 128, 1, 131072, 134.2, 126.7), (8, 128, 8, 1024, 14.9, 16.4), (8, 128, 8, 4096, 39.1, 40.2),
    (8, 128, 64, 4096, 292.6, 240.6), (8, 128, 16, 1024, 25.7, 21.6), (8, 256, 1, 16384, 39.4, 54.0),
]  # fmt: skip


def bench_cells() -> list[dict]:
    cells = []
    for hkv, d, b, n, triton, cudnn in BENCH_CELLS:
        verdict = rule.no_table_threshold(d, "bf16", b, 32, hkv, 1, 132)
        cells.append(
            {
                "gpu": "NVIDIA H200 (DESIGN.md bench)", "sms": 132, "family": f"hq32_hkv{hkv}_d{d}_tq1_bf16",
                "batch": b, "length": n, "kv_bytes": 2 * b * hkv * n * d * 2, "triton_default_us": triton,
                "cudnn_us": cudnn, "regime": verdict.regime, "programs": verdict.programs,
                "ctas": verdict.ctas, "block_m": verdict.block_m, "rule_threshold": verdict.value,
            }
        )  # fmt: skip
    return cells


def load_cells(path: Path) -> list[dict]:
    """One dict per measured point: GPU, family, B, L, bytes, Triton default and cuDNN µs, the regime."""
    raw = json.loads(path.read_text())
    gpu, sms = raw["metadata"]["gpu_name"], raw["metadata"]["sm_count"]
    cells = []
    for fam_key, fam in raw["families"].items():
        hq, hkv, d, tq, dt = (fam[k] for k in ("num_q_heads", "num_kv_heads", "head_dim", "q_len", "dtype"))
        for b, entry in fam["batches"].items():
            b = int(b)
            verdict = rule.no_table_threshold(d, dt, b, hq, hkv, tq, sms)
            for n, point in entry["lengths"].items():
                n = int(n)
                cells.append(
                    {
                        "gpu": gpu, "sms": sms, "family": fam_key, "batch": b, "length": n,
                        "kv_bytes": 2 * b * hkv * n * d * rule.ITEMSIZE[dt],
                        "triton_default_us": point.get("default_us", point["triton_us"]),
                        "cudnn_us": point.get("cudnn_us"), "regime": verdict.regime,
                        "programs": verdict.programs, "ctas": verdict.ctas, "block_m": verdict.block_m,
                        "rule_threshold": verdict.value,
                    }
                )  # fmt: skip
    return sorted(cells, key=lambda c: (c["gpu"], c["family"], c["batch"], c["length"]))


def regret(cell: dict, use_cudnn: bool) -> float | None:
    t, c = cell["triton_default_us"], cell["cudnn_us"]
    if c is None:
        return None
    return (c if use_cudnn else t) / min(t, c)


def feasible_range(cells: list[dict], bound: float = BOUND) -> tuple[int, int | None]:
    """``(lo, hi)``: any "cuDNN from X bytes" with lo < X <= hi keeps every cell within ``bound``."""
    lo, hi = 0, None
    for c in cells:
        if c["cudnn_us"] is None:
            continue
        if regret(c, use_cudnn=False) > bound:  # Triton too slow: X <= bytes
            hi = c["kv_bytes"] if hi is None else min(hi, c["kv_bytes"])
        if regret(c, use_cudnn=True) > bound:  # cuDNN too slow: X > bytes
            lo = max(lo, c["kv_bytes"])
    return lo, hi


def evaluate(cells: list[dict], uses_cudnn) -> dict:
    """Max and mean regret of a rule (``uses_cudnn(cell) -> bool``), per GPU and overall, worst cells."""
    scored = [(regret(c, uses_cudnn(c)), c) for c in cells if c["cudnn_us"] is not None]
    out = {}
    for gpu in [*sorted({c["gpu"] for _, c in scored}), "all"]:
        mine = [(r, c) for r, c in scored if gpu in ("all", c["gpu"])]
        worst = sorted(mine, key=lambda rc: -rc[0])[:3]
        out[gpu] = {
            "cells": len(mine),
            "max_regret": round(max(r for r, _ in mine), 4),
            "mean_regret": round(sum(r for r, _ in mine) / len(mine), 4),
            "over_bound": sum(r > BOUND for r, _ in mine),
            "worst": [f"{_cell_name(c)}: {r:.3f}" for r, c in worst],
        }
    return out


def _cell_name(c: dict) -> str:
    return f"{c['gpu'].replace('NVIDIA ', '')} {c['family']} B{c['batch']} L{c['length']}"


def _mib(n: int | None) -> str:
    return "inf" if n is None else f"{n / (1 << 20):.1f} MiB"


def _range(cells: list[dict]) -> dict:
    lo, hi = feasible_range(cells)
    return {"above_bytes": lo, "at_most_bytes": hi, "feasible": hi is None or lo < hi}


def derive(cells: list[dict]) -> dict:
    """Feasible sizes per regime: from both GPUs, and from each alone (does one GPU predict the other?)."""
    ranges = {}
    for regime in ("full", "underfilled", "uneven", "even", None):
        mine = [c for c in cells if regime is None or c["regime"] == regime]
        entry = _range(mine)
        entry["per_gpu"] = {
            g: _range([c for c in mine if c["gpu"] == g]) for g in sorted({c["gpu"] for c in mine})
        }
        ranges[regime or "one size for all"] = entry
    return ranges


def best_single_size(cells: list[dict]) -> tuple[int, dict]:
    sizes = sorted({c["kv_bytes"] for c in cells} | {c["kv_bytes"] + 1 for c in cells})
    scored = [(evaluate(cells, lambda c, x=x: c["kv_bytes"] >= x)["all"]["max_regret"], x) for x in sizes]
    best = min(scored)[1]
    return best, evaluate(cells, lambda c: c["kv_bytes"] >= best)


def print_cells(cells: list[dict]) -> None:
    head = f"{'cell':<44} {'regime':<11} {'MiB':>9} {'thr':>7} {'triton':>9} {'cudnn':>9} pick  regret"
    print(head)
    for c in cells:
        pick = c["length"] >= c["rule_threshold"]
        r = regret(c, pick)
        cudnn = "-" if c["cudnn_us"] is None else f"{c['cudnn_us']:.1f}"
        flag = "" if r is None or r <= BOUND else "  <-- over"
        print(
            f"{_cell_name(c):<44} {c['regime']:<11} {c['kv_bytes'] / (1 << 20):>9.1f} "
            f"{c['rule_threshold']:>7} "
            f"{c['triton_default_us']:>9.1f} {cudnn:>9} {'cudnn' if pick else 'triton':<5} "
            f"{'-' if r is None else f'{r:.3f}'}{flag}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    cells = [c for name in TABLES for c in load_cells(TUNING_DIR / name)]
    print_cells(cells)
    ranges = derive(cells)
    print(f"\nfeasible 'cuDNN from X' per regime (every cell within {BOUND}):")
    for regime, r in ranges.items():
        ok = "ok" if r["feasible"] else "EMPTY"
        per_gpu = "; ".join(
            f"{g.replace('NVIDIA ', '')}: {_mib(v['above_bytes'])}..{_mib(v['at_most_bytes'])}"
            for g, v in r["per_gpu"].items()
        )
        print(f"  {regime:<16} {_mib(r['above_bytes'])} < X <= {_mib(r['at_most_bytes'])}  {ok}  ({per_gpu})")
    single, single_eval = best_single_size(cells)
    rules = {
        "shipped rule (kvdecode.no_table_rule)": evaluate(
            cells, lambda c: c["length"] >= c["rule_threshold"]
        ),
        "flat threshold 8192 (before)": evaluate(cells, lambda c: c["length"] >= 8192),
        f"one size for all: cuDNN from {_mib(single)}": single_eval,
        "always Triton (default config)": evaluate(cells, lambda c: False),
        "always cuDNN": evaluate(cells, lambda c: True),
    }
    bench = bench_cells()
    print("\nbenchmark cells (DESIGN.md / issue 11, H200):")
    print_cells(bench)
    rules["shipped rule on the DESIGN.md benchmark cells"] = evaluate(
        bench, lambda c: c["length"] >= c["rule_threshold"]
    )
    print()
    for name, result in rules.items():
        per_gpu = ", ".join(f"{g.replace('NVIDIA ', '')} {v['max_regret']}" for g, v in result.items())
        print(f"{name:<45} max regret {per_gpu}; worst {result['all']['worst'][0]}")
    names = ("FULL_BYTES", "UNEVEN_BYTES", "EVEN_BYTES", "CUDNN_HEAD_DIM", "IMBALANCE")
    constants = {k: getattr(rule, k) for k in names}
    result = {
        "kind": "kvdecode.no_table_rule_analysis",
        "date": "2026-12-04",
        "bound": BOUND,
        "tables": list(TABLES),
        "regret": "time(rule's backend, Triton at its heuristic config) / min(Triton heuristic, cuDNN)",
        "rule_constants": constants,
        "feasible_ranges": ranges,
        "rules": rules,
        "cells": [dict(c, regret=regret(c, c["length"] >= c["rule_threshold"])) for c in cells + bench],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    worst = rules["shipped rule (kvdecode.no_table_rule)"]["all"]["max_regret"]
    return 0 if worst <= BOUND and not math.isnan(worst) else 1


if __name__ == "__main__":
    raise SystemExit(main())
