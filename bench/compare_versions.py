"""Steady-state µs per layer of two kvdecode checkouts, measured in the same run on the same GPU.

    python bench/compare_versions.py --baseline /path/to/old/checkout --out bench/results/

Each checkout runs in its own subprocess (``PYTHONPATH`` = that checkout), timing
``kvdecode.plan(problem, backend=...).run(...)`` with *this* checkout's harness
(:class:`kvdecode.timing.LayerStack`, loaded by file path so both sides are timed identically). Cells:
H 32/8, D 128, bf16, T_q 1, capacity = L, B x L over the grid below. The result file holds both columns
and their ratio; issue 10 asks that no cell be slower than before by more than 1%.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
CELLS = [(1, 1024), (1, 4096), (1, 16384), (1, 131072), (8, 1024), (8, 4096), (8, 16384), (16, 1024),
         (16, 4096), (64, 1024), (64, 4096)]  # fmt: skip


def _timing():
    spec = importlib.util.spec_from_file_location("kv_timing", HERE / "kvdecode" / "timing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(backend: str) -> dict:
    """In the child: every cell with the kvdecode on sys.path."""
    import torch

    import kvdecode

    timing = _timing()
    device = torch.device("cuda", 0)
    rows = {}
    for b, length in CELLS:
        read = 2 * b * 8 * length * 128 * 2
        n = timing.steady_state_layers(read, budget_bytes=int(torch.cuda.mem_get_info()[0] * 0.8))
        stack = timing.LayerStack.random(n, (b, 32, 1, 128), (b, 8, length, 128), torch.bfloat16, device)
        lens = torch.full((b,), length, dtype=torch.int32, device=device)
        q, k, v = stack[0]
        the_plan = kvdecode.plan(kvdecode.DecodeProblem.from_tensors(q, k, v, lens), backend=backend)
        us = stack.steady_us(lambda q, k, v, out, p=the_plan, n=lens: p.run(q, k, v, n, out=out))
        config = getattr(the_plan.launcher, "config", None)
        rows[f"b{b}_L{length}"] = dict(us=round(us, 3), layers=n, config=getattr(config, "name", None))
        stack.close()
        print(
            f"    b{b} L{length}: {us:.2f} µs ({n} layers, {rows[f'b{b}_L{length}']['config']})", flush=True
        )
    return rows


def _child(checkout: Path, backend: str) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{checkout}:{os.environ.get('PYTHONPATH', '')}")
    code = f"import json, sys; sys.path.insert(0, {str(HERE / 'bench')!r}); import compare_versions as c; "
    code += f"print('RESULT' + json.dumps(c.measure({backend!r})))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=checkout)
    sys.stdout.write(proc.stdout.replace("RESULT", "", 0))
    if proc.returncode:
        raise RuntimeError(f"{checkout}: {proc.stderr[-2000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, required=True)
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--out", type=Path, default=HERE / "bench" / "results")
    args = ap.parse_args()
    result = {"date": time.strftime("%Y-%m-%d"), "backend": args.backend, "columns": {}}
    for name, checkout in (("baseline", args.baseline.resolve()), ("current", HERE)):
        print(f"== {name}: {checkout}", flush=True)
        result["columns"][name] = _child(checkout, args.backend)
    base, cur = result["columns"]["baseline"], result["columns"]["current"]
    result["ratio_current_over_baseline"] = {
        c: round(cur[c]["us"] / base[c]["us"], 4) for c in cur if c in base
    }
    for cell, ratio in result["ratio_current_over_baseline"].items():
        print(f"  {cell:10s} baseline {base[cell]['us']:8.2f}  current {cur[cell]['us']:8.2f}  x{ratio:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"compare-versions-{args.backend}-{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
