"""Derive a tuning table (crossover thresholds) from steady-state benchmark results.

Reads one or more ``bench/bench_decode.py`` results files (later files override earlier cells of the same
name), and writes a ``kvdecode.tuning_table`` (schema 2, see :mod:`kvdecode.thresholds`) whose families hold
the measured Triton and cuDNN times per (family, batch, length) and the crossover: the shortest measured
length from which cuDNN is faster at that length and every longer one (``null`` = never). The Triton
configs recorded are the heuristic ones that ran (nothing was searched: ``searched`` = 0). This is how the
shipped default table was made until ``kvdecode tune`` runs on the GPU.

Usage: python3 bench/thresholds_from_bench.py RESULTS.json [MORE.json ...] \
    --out kvdecode/tuning/default_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from kvdecode.problem import DecodeProblem
from kvdecode.thresholds import SCHEMA_VERSION, family_key
from kvdecode.triton_kernels.config import heuristic_config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def crossover(points: dict[int, dict]) -> int | None:
    """Shortest length from which cuDNN wins at it and every longer measured length; None if never."""
    best = None
    for length in sorted(points, reverse=True):
        p = points[length]
        if p["cudnn_us"] is None or p["cudnn_us"] >= p["triton_us"]:
            break
        best = length
    return best


def config_that_ran(cell: dict, sms: int) -> dict:
    b, hq, hkv, d, cap = (cell[k] for k in ("batch", "num_q_heads", "num_kv_heads", "head_dim", "capacity"))
    strides = (hq * d, d, d, 1)
    kv = (hkv * cap * d, cap * d, d, 1)
    problem = DecodeProblem(
        b, hq, hkv, d, 1, cap, DTYPES[cell["dtype"]], torch.device("cuda", 0), strides, kv, kv, d**-0.5
    )
    cfg = heuristic_config(problem, sms)
    return {
        "num_splits": cfg.num_splits,
        "block_n": cfg.block_n,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }


def build(paths: list[Path]) -> dict:
    cells: dict[str, dict] = {}
    meta = None
    for path in paths:
        data = json.loads(path.read_text())
        meta = data["meta"]
        for cell in data["cells"]:
            res = cell.get("results", {})
            if res.get("kvdecode-triton", {}).get("status") == "ok":
                cells[cell["name"]] = cell
    sms = int(meta["sm_count"])
    families: dict[str, dict] = {}
    for cell in cells.values():
        fam = family_key(cell["num_q_heads"], cell["num_kv_heads"], cell["head_dim"], 1, cell["dtype"])
        entry = families.setdefault(
            fam,
            {
                "num_q_heads": cell["num_q_heads"],
                "num_kv_heads": cell["num_kv_heads"],
                "head_dim": cell["head_dim"],
                "q_len": 1,
                "dtype": cell["dtype"],
                "batches": {},
            },
        )
        batch = entry["batches"].setdefault(str(cell["batch"]), {"lengths": {}})
        t = cell["results"]["kvdecode-triton"]["steady_us"]
        c = cell["results"].get("kvdecode-cudnn", {})
        batch["lengths"][str(cell["seq_len"])] = {
            "config": config_that_ran(cell, sms),
            "triton_us": t,
            "default_us": t,
            "cudnn_us": c.get("steady_us") if c.get("status") == "ok" else None,
            "searched": 0,
        }
    for entry in families.values():
        for batch in entry["batches"].values():
            pts = {int(n): p for n, p in batch["lengths"].items()}
            batch["threshold"] = crossover(pts)
    return {"families": families, "meta": meta, "sms": sms}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    built = build(args.results)
    meta = built["meta"]
    cudnn = int(meta.get("cudnn_backend") or 0)
    ver = {
        "kvdecode": meta.get("kvdecode"),
        "torch": meta.get("torch", "").split("+")[0],
        "triton": meta.get("triton"),
        "cudnn": f"{cudnn // 10000}.{cudnn // 100 % 100}.{cudnn % 100}" if cudnn else None,
        "cudnn_frontend": meta.get("cudnn_frontend"),
    }
    flat = {}
    for entry in built["families"].values():
        if (entry["num_q_heads"], entry["num_kv_heads"]) == (32, 8):  # the GQA family stands for its head dim
            for b, batch in entry["batches"].items():
                key = f"d{entry['head_dim']}_{entry['dtype']}_b{b}"
                flat[key] = batch["threshold"] if batch["threshold"] is not None else 2**31 - 1
    table = {
        "schema_version": SCHEMA_VERSION,
        "kind": "kvdecode.tuning_table",
        "metadata": {
            "gpu_name": meta["gpu_name"],
            "sm_count": built["sms"],
            "date": meta.get("date", ""),
            "versions": ver,
            "provisional": False,
            "partial": True,
            "measure": "steady state (bench/bench_decode.py): N layers in one CUDA graph, "
            "median of 20 replays / N",
            "note": "crossovers measured by bench/bench_decode.py; Triton configs are the heuristic "
            "ones that ran (not searched); derived by bench/thresholds_from_bench.py from "
            + ", ".join(str(p) for p in args.results),
        },
        "batch_buckets": [1, 4, 8, 16, 64],
        "default_threshold": 8192,
        "thresholds": flat,
        "families": built["families"],
    }
    args.out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    for name, entry in sorted(built["families"].items()):
        print(name, {b: e["threshold"] for b, e in sorted(entry["batches"].items(), key=lambda x: int(x[0]))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
