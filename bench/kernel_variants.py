"""Steady-state timing of split-KV kernel variants on the GPU (a development tool, not the benchmark).

For each shape and each config: correctness against the float64 reference on one layer, then N layers
with distinct caches captured in one CUDA graph (N = max(8, ceil(1 GB / KV bytes per layer))), median of
20 replays / N, µs per layer: :class:`kvdecode.timing.LayerStack`, the benchmark's and the tuner's harness.
torch SDPA on the exact slice is timed the same way in the same run. The floor uses the best read-only
bandwidth measured in the run (``decode_bandwidth``), as ``bench_decode.py`` does.
Usage: python3 bench/kernel_variants.py --out DIR [--shapes 1x1024,8x4096] [--variants base,...] [--mask]

``--mask`` times what a transformers step runs: a bool mask ``[B, 1, 1, L]`` (a slice of ``L + 1``
columns, as kvdecode's marked mask is) and ``kv_start``, against torch SDPA with that mask. A masked
problem gets :func:`heuristic_config` (the tuning table was measured without masks); the variants
``heuristic`` and ``tuned`` (the table's configuration for the mask-free twin) say which serves it better.

``--kv bf16,fp8`` times each shape twice: 16-bit caches (torch SDPA beside them), then the same caches as
e4m3 with scalar scales 1.0 (what ``kvdecode.hf.FP8StaticCache`` holds by default), the variants reshaped
for fp8 as the planner does. ``--fill F`` fills a fraction of the capacity (``L`` is the capacity; the
mask, with ``--mask``, is True on the filled keys only): a transformers row of ``bench_generate.py``
(B 8, cap 32k, L 16k) is ``--shapes 8x32768 --fill 0.5 --mask``. The floor counts the bytes filled.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from decode_bandwidth import measure_ceiling

from kvdecode.problem import DecodeProblem
from kvdecode.quant import cache_scales, quantize
from kvdecode.reference import reference_decode_attention, relative_l2_error
from kvdecode.timing import LayerStack, floor_us, kv_bytes, steady_state_layers
from kvdecode.triton_kernels import SplitKVConfig, TritonBackend, default_config
from kvdecode.triton_kernels.config import MAX_SPLITS, heuristic_config, tuned_config

HQ, HKV, D, DT = 32, 8, 128, torch.bfloat16


def variants(base: SplitKVConfig) -> dict[str, SplitKVConfig]:
    r = base.__class__
    s, st = base.num_splits, base.num_stages
    return {
        "base": base,
        "nopdl": r(s, base.block_n, base.num_warps, base.num_stages, use_pdl=False),
        "splits/2": r(max(1, s // 2), base.block_n, base.num_warps, base.num_stages),
        "splits*2": r(min(64, 2 * s), base.block_n, base.num_warps, base.num_stages),
        "n32": r(s, 32, base.num_warps, base.num_stages),
        "n128": r(s, 128, base.num_warps, base.num_stages),
        "st1": r(s, base.block_n, base.num_warps, 1),  # the table's choice where a CTA has one tile
        "st3": r(s, base.block_n, base.num_warps, 3),
        "st4": r(s, base.block_n, base.num_warps, 4),
        "w2": r(s, base.block_n, 2, base.num_stages),
        "w8": r(s, base.block_n, 8, base.num_stages),
        # deeper pipelines at few splits (issue 18 item 1: B 16 L 1k, where cuDNN runs one CTA per (b, KV
        # head) with 128-key tiles): more bytes in flight per CTA instead of more CTAs
        "s1n128st3": r(1, 128, base.num_warps, 3),
        "s1n128st3w8": r(1, 128, 8, 3),
        "s1st4": r(1, base.block_n, base.num_warps, 4),
        "s2st4": r(min(2, s), base.block_n, base.num_warps, 4),
        "s2n128st3": r(min(2, s), 128, base.num_warps, 3),
        # deeper still (s1st4 reached 1.03x / 1.007x of SDPA at B 16 L 1k / 4k): 5 and 6 stages of 64 keys
        # (160 / 192 KB of K/V in flight), 8 of 32 keys (128 KB in finer steps), 8 warps at 4 stages
        "s1st5": r(1, base.block_n, base.num_warps, 5),
        "s1st6": r(1, base.block_n, base.num_warps, 6),
        "s1n32st8": r(1, 32, base.num_warps, 8),
        "s1st4w8": r(1, base.block_n, 8, 4),
        # the same at B 4 (32 CTAs a split): four splits, one CTA an SM
        "s4st4": r(min(4, s), base.block_n, base.num_warps, 4),
        "s4st5": r(min(4, s), base.block_n, base.num_warps, 5),
        # one warp: no cross-warp softmax (2 CTA syncs a tile instead of 9), more splits to fill the SMs
        "w1s*4": r(min(64, 4 * s), base.block_n, 1, base.num_stages),
        # several KV heads per CTA (GQA 32/8: 4 heads fill the dot's 16 rows): the loop's instructions per
        # head and tile drop to 0.52x (kernel_sass.py --heads 1 4); a quarter of the CTAs, so 4x the splits;
        # 4 heads' tiles a pipeline stage (137 KB of shared memory at n64 and 2 stages)
        "hp2": r(min(MAX_SPLITS, 2 * s), base.block_n, base.num_warps, base.num_stages, heads_per_cta=2),
        "hp4": r(min(MAX_SPLITS, 4 * s), base.block_n, base.num_warps, min(2, st), heads_per_cta=4),
        "hp4n32": r(min(MAX_SPLITS, 4 * s), 32, base.num_warps, base.num_stages, heads_per_cta=4),
        "hp4n32s*2": r(min(MAX_SPLITS, 8 * s), 32, base.num_warps, base.num_stages, heads_per_cta=4),
        "hp4w8": r(min(MAX_SPLITS, 4 * s), base.block_n, 8, min(2, st), heads_per_cta=4),
        "hp4s1": r(1, base.block_n, base.num_warps, min(2, st), heads_per_cta=4),
        # with a one-row mask (--mask): the mask checked on a program's tiles first, then skipped where it
        # is all True (mc1), against a mask load per tile (mc0); by default on where a program has 2+ tiles
        "mc0": r(s, base.block_n, base.num_warps, st, mask_check=False),
        "mc1": r(s, base.block_n, base.num_warps, st, mask_check=True),
        # the last split merges (no merge kernel): captured here, so with a memset node per call
        "fm": r(s, base.block_n, base.num_warps, st, fused_merge=True),
        "hp4fm": r(
            min(MAX_SPLITS, 4 * s),
            base.block_n,
            base.num_warps,
            min(2, st),
            heads_per_cta=4,
            fused_merge=True,
        ),
    }


def run_shape(
    batch: int,
    length: int,
    names: list[str],
    floor_gbps: float,
    masked: bool = False,
    kv: str = "bf16",
    fill: float = 1.0,
) -> list[dict]:
    filled = max(1, min(length, round(length * fill)))
    fp8 = kv == "fp8"
    kv_dtype = torch.float8_e4m3fn if fp8 else DT
    nbytes = kv_bytes(batch, HKV, filled, D, kv_dtype)
    n_layers = steady_state_layers(nbytes, layer_alloc_bytes=kv_bytes(batch, HKV, length, D, DT))
    dev = torch.device("cuda")
    layers = LayerStack.random(n_layers, (batch, HQ, 1, D), (batch, HKV, length, D), DT, dev)
    scales = None
    if fp8:  # what FP8StaticCache holds by default: scalar scales 1.0, saturate(k / scale) in e4m3
        scales = cache_scales(kv_dtype, 1.0, 1.0, HKV, dev)
        layers = LayerStack(
            [(q, quantize(k, scales[0], kv_dtype), quantize(v, scales[1], kv_dtype)) for q, k, v in layers]
        )
    (q0, k0, v0) = layers[0]
    lens = torch.full((batch,), filled, dtype=torch.int32, device=dev)
    mask = starts = None
    if masked:  # every filled key visible: the cost of reading the mask, not of skipping keys
        mask = torch.zeros(batch, 1, 1, length + 1, dtype=torch.bool, device=dev)
        mask[..., :filled] = True
        mask = mask[..., :length]
        starts = torch.zeros(batch, dtype=torch.int32, device=dev)
    kw = {} if scales is None else dict(k_scale=scales[0], v_scale=scales[1])
    problem = DecodeProblem.from_tensors(q0, k0, v0, lens, kv_start=starts, mask=mask, **kw)
    rows = []
    tag = dict(B=batch, L=length, filled=filled, kv=kv)

    def sdpa(q, k, v, _out) -> None:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    if not fp8:
        rows.append(dict(**tag, variant="sdpa", us=layers.steady_us(sdpa), layers=n_layers))
    configs = variants(default_config(problem))
    configs["heuristic"] = heuristic_config(problem)
    tuned = tuned_config(DecodeProblem.from_tensors(q0, k0, v0, lens, **kw))
    if tuned is not None:
        configs["tuned"] = tuned[0]
    for name, cfg in configs.items():
        if names and name not in names:
            continue
        try:
            launcher = TritonBackend().make_launcher(problem, config=cfg)
            ragged = torch.randint(1, filled + 1, (batch,), dtype=torch.int32, device=dev)
            ragged[0] = filled
            out = torch.full_like(q0, float("nan"))
            launcher(q0, k0, v0, ragged, starts, mask, out, None, scales=scales)
            ref, _ = reference_decode_attention(q0, k0, v0, ragged, kv_start=starts, mask=mask, **kw)
            err = relative_l2_error(out, ref)

            def step(q, k, v, o, launcher=launcher) -> None:
                launcher(q, k, v, lens, starts, mask, o, None, scales=scales)

            us = layers.steady_us(step)
            rows.append(dict(**tag, variant=name, config=cfg.name, us=us, err=err,
                             pdl=launcher.use_pdl, layers=n_layers))  # fmt: skip
        except Exception as exc:  # record and go on: one bad variant must not lose the others
            rows.append(dict(**tag, variant=name, error=repr(exc)[:300]))
        print(rows[-1], flush=True)
    floor = floor_us(nbytes, floor_gbps)
    for r in rows:
        r["floor_us"] = floor
    layers.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--shapes", default="1x1024,1x4096,1x16384,8x1024,8x4096,8x16384")
    ap.add_argument("--variants", default="")
    ap.add_argument("--mask", action="store_true", help="a bool mask and kv_start, as a transformers step")
    ap.add_argument("--kv", default="bf16", help="cache dtypes, in order: bf16, fp8 or bf16,fp8")
    ap.add_argument("--fill", type=float, default=1.0, help="filled fraction of the capacity L (0, 1]")
    args = ap.parse_args()
    kvs = args.kv.split(",")
    if not set(kvs) <= {"bf16", "fp8"} or not 0.0 < args.fill <= 1.0:
        ap.error(f"--kv takes bf16, fp8 or both and --fill a fraction in (0, 1], got {args.kv!r} {args.fill}")
    names = [v for v in args.variants.split(",") if v]
    ceiling = measure_ceiling(torch.cuda.get_device_name())
    print(f"floor bandwidth {ceiling['floor_gbps']:.0f} GB/s ({ceiling['floor_source']})", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        b, n = (int(x) for x in shape.split("x"))
        for kv in kvs:
            rows += run_shape(b, n, names, ceiling["floor_gbps"], args.mask, kv, args.fill)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, bandwidth=ceiling, mask=args.mask,
                fill=args.fill)  # fmt: skip
    name = "kernel_variants_masked.json" if args.mask else "kernel_variants.json"
    with open(f"{args.out}/{name}", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"{'B':>3} {'L':>6} {'kv':>4} {'variant':>9} {'us':>7} {'floor':>6} {'err':>8}")
    for r in rows:
        if "us" in r:
            print(f"{r['B']:>3} {r['L']:>6} {r['kv']:>4} {r['variant']:>9} {r['us']:7.2f} "
                  f"{r['floor_us']:6.1f} {r.get('err', 0):8.1e}")  # fmt: skip
        else:
            print(r["B"], r["L"], r["kv"], r["variant"], r.get("error"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
