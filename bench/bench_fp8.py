"""fp8 K/V beside bf16, in the same run (issue 13): steady state, bytes read, % of the read ceiling.

    python bench/bench_fp8.py --out bench/results/          # ~3-5 min on an H200
    python bench/bench_fp8.py --quick --out /tmp/fp8        # three cells

Cells: H 32/8, D 128, bf16 q, T_q 1, capacity = L, B in {1, 4, 16} x L in {4k, 16k, 64k, 128k}; per cell
bf16 caches and float8_e4m3fn caches (per-KV-head scales), both through ``DecodePlan.run`` with
``backend="triton"`` (cuDNN does not serve fp8), timed by the one harness
(:class:`kvdecode.timing.LayerStack`). The read ceiling is the best streaming read of this run
(:func:`decode_bandwidth.measure_ceiling`); each column reports GB/s of *its own* bytes (fp8 reads half)
and % of that ceiling. Issue-13 targets printed beside: fp8 <= 0.55x bf16 for cells with >= 128 MB of
bf16 KV, fp8 >= 95% of the ceiling, short rows no slower than bf16.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_bandwidth import measure_ceiling

import kvdecode
from kvdecode.timing import LayerStack, gbps, steady_state_layers
from kvdecode.tuning.environment import current_environment, device_gpu_name

HQ, HKV, D = 32, 8, 128
CELLS = [(b, n) for b in (1, 4, 16) for n in (4096, 16384, 65536, 131072)]
QUICK = [(1, 16384), (4, 65536), (16, 131072)]
FP8 = torch.float8_e4m3fn


def _time(batch: int, length: int, kv_dtype: torch.dtype, device: torch.device) -> tuple[float, int]:
    elem = torch.empty((), dtype=kv_dtype).element_size()
    read = 2 * batch * HKV * length * D * elem
    free = int(torch.cuda.mem_get_info(device)[0] * 0.8)
    n = steady_state_layers(read, budget_bytes=free)
    stack = LayerStack.random(n, (batch, HQ, 1, D), (batch, HKV, length, D), torch.bfloat16, device)
    scales = {}
    if kv_dtype != torch.bfloat16:  # quantize each layer's caches in place of the bf16 ones
        stack.layers = [(q, k.to(kv_dtype), v.to(kv_dtype)) for q, k, v in stack.layers]
        k_scale = torch.full((HKV,), 0.5, device=device)
        scales = dict(k_scale=k_scale, v_scale=torch.full((HKV,), 0.25, device=device))
    lens = torch.full((batch,), length, dtype=torch.int32, device=device)
    q, k, v = stack[0]
    problem = kvdecode.DecodeProblem.from_tensors(q, k, v, lens, **scales)
    the_plan = kvdecode.plan(problem, backend="triton")
    us = stack.steady_us(lambda q, k, v, out: the_plan.run(q, k, v, lens, out=out, **scales))
    stack.close()
    return us, read


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    gpu = device_gpu_name(device)
    env = current_environment(gpu).metadata()
    ceiling = measure_ceiling(gpu, device)
    top = ceiling["floor_gbps"]
    print(f"{gpu} | {env['versions']} | read ceiling {top:.0f} GB/s ({ceiling['floor_source']})")
    print(f"{'B':>3} {'L':>7} {'bf16 us':>9} {'%ceil':>6} {'fp8 us':>9} {'%ceil':>6} {'fp8/bf16':>9}  target")
    rows = []
    for batch, length in QUICK if args.quick else CELLS:
        bf16_us, bf16_bytes = _time(batch, length, torch.bfloat16, device)
        fp8_us, fp8_bytes = _time(batch, length, FP8, device)
        row = dict(batch=batch, length=length, bf16_us=round(bf16_us, 3), fp8_us=round(fp8_us, 3),
                   bf16_bytes=bf16_bytes, fp8_bytes=fp8_bytes,
                   bf16_pct=round(100 * gbps(bf16_bytes, bf16_us) / top, 1),
                   fp8_pct=round(100 * gbps(fp8_bytes, fp8_us) / top, 1),
                   ratio=round(fp8_us / bf16_us, 3))  # fmt: skip
        target = "<= 0.55x" if bf16_bytes >= 128e6 else "no slower"
        met = row["ratio"] <= 0.55 if bf16_bytes >= 128e6 else row["ratio"] <= 1.0
        row["target"], row["met"] = target, bool(met)
        rows.append(row)
        cells = f"{bf16_us:>9.2f} {row['bf16_pct']:>6} {fp8_us:>9.2f} {row['fp8_pct']:>6}"
        print(f"{batch:>3} {length:>7} {cells} {row['ratio']:>9.3f}  {target} {'met' if met else 'MISSED'}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"fp8-{gpu.lower().replace(' ', '-')}-{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps(dict(environment=env, date=time.strftime("%Y-%m-%d"), ceiling=ceiling,
                                    rows=rows), indent=1, default=str))  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
