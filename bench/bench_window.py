"""Sliding windows (issue 19): does a windowed decode cost what its window reads, not the filled length?

    python3 bench/bench_window.py --out bench/results/      # GPU, about a minute
    python3 bench/bench_window.py --dry-run                 # the cells and their bytes, no GPU

Cells: H 32/8, D 128, bf16, T_q 1, capacity 32k, every row filled to L in {4k, 8k, 16k, 32k}, window W in
{1k, 4k} at B 1 and 8. Steady state per layer (:class:`kvdecode.timing.LayerStack`, the harness of
every kvdecode benchmark) of, in one run:

- ``kvdecode-window``: ``plan(problem with window=W, backend="triton").run`` over the whole cache;
- ``kvdecode-full``: the same without a window (reads all L keys: what a window saves);
- ``sdpa-slice``: torch SDPA (``enable_gqa=True``) on the exact last-W slice of every row, the
  fastest way to call it when every row has the same length (a ragged batch could not);
- the floor: the K/V bytes of W keys per row over the read bandwidth measured by ``bench_decode.py``
  (``--floor-gbps``, default the H200's 4622 GB/s of 2026-12-04).

Every kvdecode output is checked against float32 math on the device (first and last row) before timing.
Predicted: ``kvdecode-window`` flat in L and within a few µs of ``sdpa-slice``; ``kvdecode-full`` growing
with L. Writes ``<out>/window-<gpu-slug>-<date>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import kvdecode
from kvdecode.reference import tolerance_for
from kvdecode.timing import LayerStack, floor_us, kv_bytes, steady_state_layers

HQ, HKV, D, CAP = 32, 8, 128, 32768
DT = torch.bfloat16
LENGTHS = (4096, 8192, 16384, 32768)
WINDOWS = (1024, 4096)
BATCHES = (1, 8)


def _window_ref(q, k, v, n: int, w: int, rows: list[int]) -> torch.Tensor:
    """float32 attention of the last ``w`` of ``n`` keys for the given rows (GQA by repeat)."""
    outs = []
    for b in rows:
        kb = k[b, :, n - w : n].float().repeat_interleave(HQ // HKV, 0)
        vb = v[b, :, n - w : n].float().repeat_interleave(HQ // HKV, 0)
        s = (q[b].float() @ kb.transpose(-1, -2)) / math.sqrt(D)
        outs.append(torch.softmax(s, -1) @ vb)
    return torch.stack(outs)


def measure(batch: int, n: int, w: int, floor_gbps: float, device: torch.device) -> dict:
    lens = torch.full((batch,), n, dtype=torch.int32, device=device)
    # enough layers for 1 GB of window reads, capped by what their full-capacity caches take in memory
    layers = steady_state_layers(
        kv_bytes(batch, HKV, w, D, DT), layer_alloc_bytes=kv_bytes(batch, HKV, CAP, D, DT)
    )
    stack = LayerStack.random(layers, (batch, HQ, 1, D), (batch, HKV, CAP, D), DT, device)
    q, k, v = stack[0]
    rec = {"batch": batch, "seq_len": n, "window": w, "layers": layers}
    plans = {}
    for name, window in (("kvdecode-window", w), ("kvdecode-full", None)):
        problem = kvdecode.DecodeProblem.from_tensors(q, k, v, lens, window=window)
        plans[name] = kvdecode.plan(problem, backend="triton", max_seq_len=n)
    out = plans["kvdecode-window"].run(q, k, v, lens)
    err = (out[[0, batch - 1]].float() - _window_ref(q, k, v, n, w, [0, batch - 1])).norm()
    rel = (err / _window_ref(q, k, v, n, w, [0, batch - 1]).norm()).item()
    rec["check_rel_l2"], rec["check_ok"] = rel, rel <= tolerance_for(DT).rel_l2
    for name, the_plan in plans.items():
        rec[name] = stack.steady_us(lambda q, k, v, out, p=the_plan: p.run(q, k, v, lens, out=out))
    rec["sdpa-slice"] = stack.steady_us(
        lambda q, k, v, out: torch.nn.functional.scaled_dot_product_attention(
            q, k[:, :, n - w : n], v[:, :, n - w : n], enable_gqa=True
        )
    )
    rec["floor_us"] = floor_us(kv_bytes(batch, HKV, w, D, DT), floor_gbps)
    stack.close()
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--floor-gbps", type=float, default=4622.0)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    cells = [(b, n, w) for b in BATCHES for w in WINDOWS for n in LENGTHS]
    if args.dry_run:
        for b, n, w in cells:
            print(f"B {b} L {n} W {w}: window K/V {kv_bytes(b, HKV, w, D, DT) / 1e6:.1f} MB, "
                  f"full {kv_bytes(b, HKV, n, D, DT) / 1e6:.1f} MB")  # fmt: skip
        return 0
    if not torch.cuda.is_available():
        print("bench_window: needs a CUDA GPU (use --dry-run)", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    results = []
    print(f"{'B':>3} {'L':>6} {'W':>5} {'window':>9} {'full':>9} {'sdpa-slice':>10} {'floor':>7}  check")
    for b, n, w in cells:
        r = measure(b, n, w, args.floor_gbps, device)
        results.append(r)
        print(f"{b:>3} {n:>6} {w:>5} {r['kvdecode-window']:>9.1f} {r['kvdecode-full']:>9.1f} "
              f"{r['sdpa-slice']:>10.1f} {r['floor_us']:>7.1f}  {r['check_rel_l2']:.1e}")  # fmt: skip
    meta = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "date": time.strftime("%Y-%m-%d"),
            "shape": f"H {HQ}/{HKV}, D {D}, bf16, T_q 1, capacity {CAP}",
            "floor_gbps": args.floor_gbps}  # fmt: skip
    slug = meta["gpu"].lower().replace(" ", "-")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"window-{slug}-{meta['date']}.json"
    path.write_text(json.dumps({"meta": meta, "cells": results}, indent=1))
    print(f"wrote {path}")
    return 0 if all(r["check_ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
