"""Where an eager Hugging Face decode step spends its time, per backend: torch.profiler over a few steps
of ``bench_generate.py``'s model and cache (same builders), top ops by self CPU time and by CUDA time.

    python3 bench/profile_hf_step.py --window 4096 [--batch 8 --capacity 32768 --filled 16384]
    python3 bench/profile_hf_step.py --backends kvdecode,kvdecode-fp8 --compiled   # reduce-overhead

For finding what makes one backend's eager step slower than another's (a host sync shows as a large
``cudaStreamSynchronize`` / ``aten::item`` self CPU time; a slow kernel as its CUDA time).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import FP8_BACKEND, _sync, backend_step, build_model, make_cache


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--capacity", type=int, default=32768)
    p.add_argument("--filled", type=int, default=16384)
    p.add_argument("--window", type=int, default=0)
    p.add_argument("--backends", default="sdpa,kvdecode", help=f"attn_implementations, or {FP8_BACKEND}")
    p.add_argument("--compiled", action="store_true", help="torch.compile(mode='reduce-overhead') the step")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rows", type=int, default=18, help="ops listed per table")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = device.type != "cuda"
    model = build_model(args.layers, tiny, device, window=args.window)
    caches = {"bf16": make_cache(model, args.batch, args.capacity, args.filled)}
    for backend in args.backends.split(","):
        _, step = backend_step(model, backend, args.batch, args.capacity, args.filled, caches)
        if args.compiled:
            torch._dynamo.reset()
            step = torch.compile(step, mode="reduce-overhead")
        with torch.no_grad():
            for _ in range(3):
                step()
            _sync(device)
            t0 = time.perf_counter()
            with torch.profiler.profile() as prof:
                for _ in range(args.steps):
                    step()
                _sync(device)
            ms = (time.perf_counter() - t0) * 1e3 / args.steps
        how = "compiled" if args.compiled else "eager"
        print(f"\n=== {backend} {how}: {ms:.2f} ms per step under the profiler ({args.steps} steps) ===")
        if args.compiled:
            from torch._dynamo.utils import counters

            print("dynamo:", {k: dict(v) for k, v in counters.items() if k in ("graph_break", "stats")})
            counters.clear()
        table = prof.key_averages()
        print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows))
        if device.type == "cuda":
            print(table.table(sort_by="cuda_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
