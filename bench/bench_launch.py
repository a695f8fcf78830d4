"""Launch costs (issue 10): host overhead per call, compiles per new batch size, the captured step.

    python bench/bench_launch.py --out bench/results/   # ~1-2 min on an H200

1. **Host overhead**, µs per call: 1000 back-to-back eager calls of a tiny problem (B 1, H 32/8, D 128,
   capacity 1024, L 1000) then one sync (:func:`kvdecode.timing.host_overhead_us`); the GPU work is
   shorter than the host's, so this is the host's cost. Rows: torch SDPA on the exact slice,
   ``DecodePlan.run`` (Triton, cuDNN), ``decode_attention(max_seq_len=...)``, ``decode_attention`` with
   ``auto`` and no bound (one host sync), and ``torch.ops.kvdecode.decode_attention`` when it exists.
2. **Compiles**: the family (H 32/8, D 128, bf16, T_q 1) warmed at B 1 / capacity 8192, then the first
   call of every B in 1..64 (capacity 8192) and of capacities 1k..128k (B 1, 8): wall time of that first
   call (synced) and the split/merge kernel variants the process met (:func:`compile_counts`).
3. **Captured append+attend**: ``StaticKVCache`` with N layers (>= 8), B 1, capacity 1024 filled to 1000:
   one CUDA graph of ``advance`` + per layer ``append`` and ``attend``; median replay / N, µs per layer.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
from pathlib import Path

import torch

import kvdecode
from kvdecode.timing import capture_graph, host_overhead_us, time_replays_us
from kvdecode.triton_kernels.bound import compile_counts, reset_compile_counts
from kvdecode.tuning.environment import current_environment, device_gpu_name

HQ, HKV, D, DT = 32, 8, 128, torch.bfloat16


def _tensors(b, cap, length, dev="cuda"):
    q = torch.randn(b, HQ, 1, D, device=dev, dtype=DT)
    k = torch.randn(b, HKV, cap, D, device=dev, dtype=DT)
    v = torch.randn(b, HKV, cap, D, device=dev, dtype=DT)
    lens = torch.full((b,), length, dtype=torch.int32, device=dev)
    return q, k, v, lens


def host_rows() -> dict[str, float]:
    q, k, v, lens = _tensors(1, 1024, 1000)
    out = torch.empty_like(q)
    problem = kvdecode.DecodeProblem.from_tensors(q, k, v, lens)
    rows = {
        "torch SDPA (exact slice, enable_gqa)": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k[:, :, :1000], v[:, :, :1000], enable_gqa=True
        ),
    }
    for backend in ("triton", "cudnn"):
        try:
            p = kvdecode.plan(problem, backend=backend)
        except kvdecode.UnsupportedError as exc:
            print(f"  {backend}: {exc}")
            continue
        rows[f"DecodePlan.run ({backend}, out=)"] = lambda p=p: p.run(q, k, v, lens, out=out)
    rows["decode_attention(max_seq_len=1000, out=)"] = lambda: kvdecode.decode_attention(
        q, k, v, lens, max_seq_len=1000, out=out
    )
    rows["decode_attention(auto, capacity below threshold)"] = lambda: kvdecode.decode_attention(
        q, k, v, lens
    )
    try:
        importlib.import_module("kvdecode.ops")  # registers the op

        op = torch.ops.kvdecode.decode_attention
        scale = D**-0.5
        rows["torch.ops.kvdecode.decode_attention"] = lambda: op(q, k, v, lens, None, None, out, scale, 1000)
    except (ImportError, AttributeError) as exc:  # no op in this version: record, do not crash
        print(f"  op: {exc!r}")
    result = {}
    for name, fn in rows.items():
        try:
            result[name] = round(host_overhead_us(fn, 1000), 2)
        except Exception as exc:
            result[name] = f"failed: {exc!r}"[:200]
        print(f"  {name:55s} {result[name]}")
    return result


def _first_call_ms(b: int, cap: int, length: int) -> float:
    """Wall time of one synced ``decode_attention(backend="triton")`` call on fresh tensors, ms."""
    q, k, v, lens = _tensors(b, cap, length)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    kvdecode.decode_attention(q, k, v, lens, backend="triton")
    torch.cuda.synchronize()
    return round((time.perf_counter() - t0) * 1e3, 2)


def compile_rows() -> dict:
    reset_compile_counts()
    warm_ms = _first_call_ms(1, 8192, 4000)
    after_warm = compile_counts()
    by_batch = {b: _first_call_ms(b, 8192, 4000) for b in range(1, 65)}
    by_capacity = {
        f"b{b}_cap{cap}": _first_call_ms(b, cap, cap // 2)
        for b in (1, 8)
        for cap in (1024, 2048, 4096, 16384, 32768, 65536, 131072)
    }
    torch.cuda.empty_cache()
    counts = compile_counts()
    worst, median = max(by_batch.values()), statistics.median(by_batch.values())
    print(f"  warm family: {warm_ms} ms, variants {after_warm}; after B 1..64 and capacities: {counts}")
    print(f"  first call per new B, ms: max {worst}, median {median}")
    return dict(warm_ms=warm_ms, variants_after_warm=after_warm, variants_total=counts,
                first_call_ms_by_batch=by_batch, first_call_ms_by_capacity=by_capacity)  # fmt: skip


def captured_step_row(layers: int = 8, cap: int = 1024, length: int = 1000) -> dict:
    cache = kvdecode.StaticKVCache(layers, batch=1, num_kv_heads=HKV, capacity=cap, head_dim=D, dtype=DT)
    cache.set_lengths([length - 1])
    qs = [torch.randn(1, HQ, 1, D, device="cuda", dtype=DT) for _ in range(layers)]
    ks = [torch.randn(1, HKV, 1, D, device="cuda", dtype=DT) for _ in range(layers)]
    outs = [torch.empty_like(q) for q in qs]

    def step():
        cache.advance(1)
        for i in range(layers):
            cache.append(i, ks[i], ks[i])
            cache.attend(i, qs[i], out=outs[i])
        cache.seq_lens.sub_(1)  # replays keep the length at `length`

    step()
    graph = capture_graph([step])
    us = statistics.median(time_replays_us(graph, 50)) / layers
    print(f"  captured advance+append+attend, B1 L{length}: {us:.2f} µs per layer ({layers} layers)")
    return dict(layers=layers, capacity=cap, length=length, us_per_layer=round(us, 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--skip-compiles", action="store_true")
    args = ap.parse_args()
    env = current_environment(device_gpu_name(torch.device("cuda", 0))).metadata()
    print(f"{env['gpu_name']} | {env['versions']}")
    result = {"environment": env, "date": time.strftime("%Y-%m-%d"), "host_overhead_us": host_rows()}
    result["captured_step"] = captured_step_row()
    if not args.skip_compiles:
        result["compiles"] = compile_rows()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"launch-{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
