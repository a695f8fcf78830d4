"""One cell's kernels under Nsight Compute: kvdecode's plan and torch SDPA, a few launches each.

The cells that miss their targets are bound by something the steady-state timings cannot name: the
batched short rows of issue 18 (B 16, L 1k: 61% of the read floor where torch SDPA reaches 74%) and
fp8 at long rows (issue 19: 0.60x of bf16 where 0.5x is the bytes' ratio). This runs a cell's calls
between ``cudaProfilerStart``/``Stop`` (after a warm-up outside the range, so no compile or plan build
is profiled), for ncu to read with ``--profile-from-start off``::

    ncu --clock-control none --profile-from-start off --set full --import-source no \\
        -o $OUT/b16-l1k python3 bench/ncu_cells.py --cell 16x1024
    ncu --clock-control none --profile-from-start off --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \\
        --section LaunchStats --csv --page details \\
        python3 bench/ncu_cells.py --cell 16x131072 --kv fp8 --no-sdpa > $OUT/fp8-b16-l128k.csv

``--kernels`` runs the same calls under ``torch.profiler`` instead and prints each call's kernels with
their mean device time (no ncu needed): what a call launches, e.g. kvdecode's cuDNN route (a clamp of
the lengths, then cuDNN's kernel) beside torch SDPA's at the cells where it trails SDPA by ~2 µs::

    python3 bench/ncu_cells.py --cell 16x1024 --backend cudnn --kernels --launches 20

Shape: H 32/8, D 128, bf16 q, T_q 1, capacity = L (fp8: e4m3 K/V with per-head scales). Without a GPU
(``--device cpu``) it runs the same calls once under Triton's interpreter: a check of this script only.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import kvdecode
from kvdecode.quant import quantize_fp8

HQ, HKV, D = 32, 8, 128


def parse_cell(text: str) -> tuple[int, int]:
    try:
        batch, length = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--cell must be BxL (e.g. 16x1024), got {text!r}") from None
    if batch < 1 or length < 1:
        raise SystemExit(f"--cell needs B >= 1 and L >= 1, got {text!r}")
    return batch, length


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cell", required=True, help="BxL, e.g. 16x1024")
    p.add_argument("--kv", choices=("bf16", "fp8"), default="bf16", help="the caches' dtype")
    p.add_argument("--launches", type=int, default=3, help="profiled calls of each (default 3)")
    p.add_argument("--no-sdpa", action="store_true", help="profile kvdecode's kernels only")
    p.add_argument("--backend", choices=("triton", "cudnn"), default="triton", help="kvdecode's plan")
    p.add_argument("--kernels", action="store_true", help="list each call's kernels (torch.profiler)")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    if args.kv == "fp8" and args.backend == "cudnn":
        p.error("--kv fp8 needs --backend triton (cuDNN serves no fp8 caches)")
    batch, length = parse_cell(args.cell)
    dev = torch.device(args.device)
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(batch, HQ, 1, D, device=dev, generator=gen, dtype=torch.bfloat16)
    k = torch.randn(batch, HKV, length, D, device=dev, generator=gen, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lens = torch.full((batch,), length, dtype=torch.int32, device=dev)
    scales = {}
    kk, vv = k, v
    if args.kv == "fp8":
        kk, k_scale = quantize_fp8(k)
        vv, v_scale = quantize_fp8(v)
        scales = dict(k_scale=k_scale, v_scale=v_scale)
    problem = kvdecode.DecodeProblem.from_tensors(q, kk, vv, lens, **scales)
    the_plan = kvdecode.plan(problem, backend=args.backend)
    out = torch.empty_like(q)
    calls = {"kvdecode": lambda: the_plan.run(q, kk, vv, lens, out=out, **scales)}
    if not args.no_sdpa:  # the baseline: torch SDPA as a user calls it (cuDNN / flash on the GPU)
        calls["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    for call in calls.values():  # warm-up: compiles and plans outside the profiled range
        call()
    # (stderr: ncu's --csv report goes to stdout)
    config = getattr(the_plan.launcher, "config", None)  # Triton's; a cuDNN plan names its graph
    what = config.name if config is not None else the_plan.launcher.key(lse=False).name
    print(f"cell B {batch} L {length} {args.kv}: plan {the_plan.backend} {what}", file=sys.stderr)
    if args.kernels:
        return _kernel_table(calls, args.launches, dev)
    profiling = dev.type == "cuda"
    if profiling:
        torch.cuda.synchronize(dev)
        torch.cuda.profiler.start()
    for call in calls.values():
        for _ in range(args.launches if profiling else 1):
            call()
    if profiling:
        torch.cuda.synchronize(dev)
        torch.cuda.profiler.stop()
    return 0


def _kernel_table(calls: dict, launches: int, dev: torch.device) -> int:
    """Each call's kernels under torch.profiler: name (shortened), launches per call, mean device µs."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    for label, call in calls.items():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        with profile(activities=activities) as prof:
            for _ in range(launches):
                call()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        rows = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        total = sum(e.device_time_total for e in rows) / launches
        print(f"{label}: {total:.1f} µs of kernels per call")
        for e in sorted(rows, key=lambda e: -e.device_time_total):
            per_call = e.count / launches
            print(f"  {e.device_time_total / e.count:8.2f} µs x {per_call:g}  {e.key[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
