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
from kvdecode.errors import KVDecodeError
from kvdecode.quant import quantize_fp8
from kvdecode.reference import reference_decode_attention, relative_l2_error
from kvdecode.timing import LayerStack, gbps, kv_bytes, steady_state_layers
from kvdecode.triton_kernels.config import MAX_SPLITS, SplitKVConfig
from kvdecode.triton_kernels.launcher import SplitKVLauncher
from kvdecode.tuning.environment import current_environment, device_gpu_name

HQ, HKV, D = 32, 8, 128
CELLS = [(b, n) for b in (1, 4, 16) for n in (4096, 16384, 65536, 131072)]
QUICK = [(1, 16384), (4, 65536), (16, 131072)]
FP8 = torch.float8_e4m3fn


def _stack(batch: int, length: int, kv_dtype: torch.dtype, device: torch.device) -> tuple[LayerStack, int]:
    """The layers of one cell in ``kv_dtype`` (fp8 ones quantized layer by layer from bf16 randoms, so
    that the bf16 and fp8 stacks never coexist) and the bytes one layer's call reads."""
    read = kv_bytes(batch, HKV, length, D, kv_dtype)
    bf16_layer = kv_bytes(batch, HKV, length, D, torch.bfloat16)
    free = int(torch.cuda.mem_get_info(device)[0] * 0.8) - bf16_layer  # one bf16 layer in flight
    n = steady_state_layers(read, budget_bytes=free)
    layers = []
    for _ in range(n):
        q, k, v = LayerStack.random(1, (batch, HQ, 1, D), (batch, HKV, length, D), torch.bfloat16, device)[0]
        layers.append((q, k.to(kv_dtype), v.to(kv_dtype)) if kv_dtype != torch.bfloat16 else (q, k, v))
        del q, k, v
    return LayerStack(layers), read


def _scales(kv_dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    if kv_dtype == torch.bfloat16:
        return {}
    return dict(
        k_scale=torch.full((HKV,), 0.5, device=device), v_scale=torch.full((HKV,), 0.25, device=device)
    )


def _variants(base: SplitKVConfig, fp8: bool = True) -> list[tuple[str, SplitKVConfig, str]]:
    """``(name, config, fp8_compute)`` beside the default: the earlier kernel (tl casts; the
    bench-fp8-sweep-run3 default) and pipeline depths / tile sizes / warps around the default; for bf16
    (``fp8=False``) the packed-heads ones only (the tuner searched the rest)."""
    s, n, w, st = base.num_splits, base.block_n, base.num_warps, base.num_stages
    out = [
        ("tl-casts", base, "fp16"),
        ("st2", SplitKVConfig(s, n, w, 2), "fp16-ptx"),
        ("st4", SplitKVConfig(s, n, w, 4), "fp16-ptx"),
        ("n/2", SplitKVConfig(s, max(16, n // 2), w, st), "fp16-ptx"),
        ("n*2", SplitKVConfig(s, 2 * n, w, st), "fp16-ptx"),
        # the loop issues ~1.85x bf16's instructions per byte: more warps per CTA to hide its latencies
        ("w8", SplitKVConfig(s, n, 8, st), "fp16-ptx"),
        ("w8 n*2", SplitKVConfig(s, 2 * n, 8, st), "fp16-ptx"),
        # or fewer: the [16, N] softmax of 4 warps syncs the CTA 8 times a tile (kernel_sass.py, Triton 3.6),
        # one warp twice, for 11% fewer instructions per tile in all; more splits keep the SMs as full
        ("w1 s*4", SplitKVConfig(min(MAX_SPLITS, 4 * s), n, 1, st), "fp16-ptx"),
        ("w2 s*2", SplitKVConfig(min(MAX_SPLITS, 2 * s), n, 2, st), "fp16-ptx"),
        # four KV heads per CTA: the softmax on 16 real rows (266 vs 351 loop instructions per head and
        # tile, kernel_sass.py --heads, Triton 3.6); a quarter of the CTAs, so 4x the splits
        ("hp4 s*4", SplitKVConfig(min(MAX_SPLITS, 4 * s), n, w, st, heads_per_cta=4), "fp16-ptx"),
        ("hp4 s*4 st2", SplitKVConfig(min(MAX_SPLITS, 4 * s), n, w, 2, heads_per_cta=4), "fp16-ptx"),
        (
            "hp4 s*8 n/2",
            SplitKVConfig(min(MAX_SPLITS, 8 * s), max(16, n // 2), w, st, heads_per_cta=4),
            "fp16-ptx",
        ),
        ("hp2 s*2", SplitKVConfig(min(MAX_SPLITS, 2 * s), n, w, st, heads_per_cta=2), "fp16-ptx"),
    ]
    if not fp8:
        out = [entry for entry in out if entry[0].startswith("hp")]
    seen, kept = {(base, "fp16-ptx")}, []
    for name, cfg, compute in out:  # the default, or a config met already (8 warps tuned): not timed again
        if (cfg, compute) not in seen:
            seen.add((cfg, compute))
            kept.append((name, cfg, compute))
    return kept


def _time(batch: int, length: int, kv_dtype: torch.dtype, device: torch.device, sweep: bool
          ) -> tuple[float, int, str, dict[str, float]]:  # fmt: skip
    """Steady-state µs of the default plan (and, with ``sweep``, of config variants), bytes, config."""
    stack, read = _stack(batch, length, kv_dtype, device)
    scales = _scales(kv_dtype, device)
    lens = torch.full((batch,), length, dtype=torch.int32, device=device)
    q, k, v = stack[0]
    problem = kvdecode.DecodeProblem.from_tensors(q, k, v, lens, **scales)
    the_plan = kvdecode.plan(problem, backend="triton")
    us = stack.steady_us(lambda q, k, v, out: the_plan.run(q, k, v, lens, out=out, **scales))
    base = the_plan.launcher.config
    swept = {}
    if sweep:
        pair = (scales["k_scale"], scales["v_scale"]) if scales else None
        for name, cfg, compute in _variants(base, fp8=bool(scales)):
            launch = SplitKVLauncher(problem, cfg, fp8_compute=compute)

            def run(q, k, v, out, launch=launch):
                launch(q, k, v, lens, None, None, out, None, pair)

            try:
                swept[f"{name}:{cfg.name}"] = round(stack.steady_us(run), 3)
            except KVDecodeError as exc:  # e.g. a doubled tile with more stages: too much shared memory
                swept[f"{name}:{cfg.name}"] = f"out of resources: {exc}"
    stack.close()
    return us, read, base.name, swept


def accuracy(device: torch.device) -> list[dict]:
    """The quantization's error beside the kernel's: B 2, L 8k, bf16 K/V quantized with per-KV-head amax
    scales; relative L2 errors against the float64 reference on the original and on the dequantized K/V."""
    gen = torch.Generator(device="cpu").manual_seed(13)
    batch, length = 2, 8192
    q = torch.randn(batch, HQ, 1, D, generator=gen).to(device, torch.bfloat16)
    k = torch.randn(batch, HKV, length, D, generator=gen).to(device, torch.bfloat16)
    v = torch.randn(batch, HKV, length, D, generator=gen).to(device, torch.bfloat16)
    lens = torch.tensor([length, length // 3], dtype=torch.int32, device=device)
    exact, _ = reference_decode_attention(q, k, v, lens)
    bf16 = kvdecode.decode_attention(q, k, v, lens, backend="triton")
    rows = [dict(kv="bfloat16", vs_original=relative_l2_error(bf16, exact), vs_dequantized=None)]
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        k8, k_scale = quantize_fp8(k, fp8)
        v8, v_scale = quantize_fp8(v, fp8)
        out = kvdecode.decode_attention(q, k8, v8, lens, k_scale=k_scale, v_scale=v_scale)
        deq, _ = reference_decode_attention(q, k8, v8, lens, k_scale=k_scale, v_scale=v_scale)
        kv = str(fp8).removeprefix("torch.")
        rows.append(
            dict(kv=kv, vs_original=relative_l2_error(out, exact), vs_dequantized=relative_l2_error(out, deq))
        )
    return rows


def markdown(data: dict) -> str:
    """The results as a table: µs per layer, % of the read ceiling, fp8/bf16 and the target per cell."""
    env, top = data["environment"], data["ceiling"]["floor_gbps"]
    lines = [
        f"# fp8 (float8_e4m3fn, per-KV-head scales) beside bf16: {env.get('gpu_name', '')} {data['date']}",
        "",
        f"{env.get('versions')}; H_q {HQ}, H_kv {HKV}, D {D}, bf16 q, T_q 1, capacity = L; steady state "
        f"(distinct caches in one CUDA graph), µs per layer; read ceiling {top:.0f} GB/s "
        f"({data['ceiling']['floor_source']}), each column against its own bytes.",
        "",
        "| B | L | bf16 KV MB | bf16 µs | % ceiling | fp8 µs | % ceiling | fp8 / bf16 | target | met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['batch']} | {r['length']} | {r['bf16_bytes'] / 1e6:.0f} | {r['bf16_us']:.2f} "
            f"| {r['bf16_pct']} | {r['fp8_us']:.2f} | {r['fp8_pct']} | {r['ratio']:.3f} | {r['target']} | "
            f"{'yes' if r['met'] else 'no'} |"
        )
    if data.get("accuracy"):
        lines += ["", "Accuracy (B 2, L 8k, per-KV-head amax scales), relative L2 error vs float64:", "",
                  "| K/V | vs the original K/V | vs the dequantized K/V |", "|---|---|---|"]  # fmt: skip
        for e in data["accuracy"]:
            deq = "–" if e["vs_dequantized"] is None else f"{e['vs_dequantized']:.2e}"
            lines.append(f"| {e['kv']} | {e['vs_original']:.2e} | {deq} |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> bool:
    """µs per layer vs L, bf16 and fp8, one line per batch; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for batch in sorted({r["batch"] for r in data["rows"]}):
        rows = sorted((r for r in data["rows"] if r["batch"] == batch), key=lambda r: r["length"])
        x = [r["length"] for r in rows]
        (line,) = ax.plot(x, [r["bf16_us"] for r in rows], marker="o", label=f"B {batch} bf16")
        ax.plot(
            x,
            [r["fp8_us"] for r in rows],
            marker="s",
            ls="--",
            color=line.get_color(),
            label=f"B {batch} fp8",
        )
        ax2.plot(x, [r["ratio"] for r in rows], marker="s", color=line.get_color(), label=f"B {batch}")
    ax2.axhline(0.55, color="gray", ls=":", label="target 0.55")
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xlabel("L (filled = capacity)")
        a.legend(fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("µs per layer (steady state)")
    ax2.set_ylabel("fp8 time / bf16 time")
    fig.suptitle(f"fp8 vs bf16 K/V, {data['environment'].get('gpu_name', '')}, H 32/8, D 128")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(data: dict, path: Path) -> None:
    path.with_suffix(".md").write_text(markdown(data))
    plotted = plot(data, path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.md')}{', .png' if plotted else ' (no matplotlib: no plot)'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--render", type=Path, help="write the .md and .png of an earlier run's JSON; no run")
    ap.add_argument("--sweep", action="store_true", help="also time fp8 config variants (development)")
    args = ap.parse_args()
    if args.render is not None:
        write_report(json.loads(args.render.read_text()), args.render)
        return 0
    device = torch.device("cuda", torch.cuda.current_device())
    gpu = device_gpu_name(device)
    env = current_environment(gpu).metadata()
    ceiling = measure_ceiling(gpu, device)
    top = ceiling["floor_gbps"]
    print(f"{gpu} | {env['versions']} | read ceiling {top:.0f} GB/s ({ceiling['floor_source']})")
    print(f"{'B':>3} {'L':>7} {'bf16 us':>9} {'%ceil':>6} {'fp8 us':>9} {'%ceil':>6} {'fp8/bf16':>9}  target")
    rows = []
    for batch, length in QUICK if args.quick else CELLS:
        bf16_us, bf16_bytes, bf16_cfg, bf16_swept = _time(batch, length, torch.bfloat16, device, args.sweep)
        fp8_us, fp8_bytes, fp8_cfg, fp8_swept = _time(batch, length, FP8, device, args.sweep)
        row = dict(batch=batch, length=length, bf16_us=round(bf16_us, 3), fp8_us=round(fp8_us, 3),
                   bf16_bytes=bf16_bytes, fp8_bytes=fp8_bytes,
                   bf16_pct=round(100 * gbps(bf16_bytes, bf16_us) / top, 1),
                   fp8_pct=round(100 * gbps(fp8_bytes, fp8_us) / top, 1),
                   ratio=round(fp8_us / bf16_us, 3), bf16_config=bf16_cfg, fp8_config=fp8_cfg,
                   bf16_swept=bf16_swept, fp8_swept=fp8_swept)  # fmt: skip
        target = "<= 0.55x" if bf16_bytes >= 128e6 else "no slower"
        met = row["ratio"] <= 0.55 if bf16_bytes >= 128e6 else row["ratio"] <= 1.0
        row["target"], row["met"] = target, bool(met)
        rows.append(row)
        cells = f"{bf16_us:>9.2f} {row['bf16_pct']:>6} {fp8_us:>9.2f} {row['fp8_pct']:>6}"
        print(
            f"{batch:>3} {length:>7} {cells} {row['ratio']:>9.3f}  {target} {'met' if met else 'MISSED'}"
            f"  [{bf16_cfg} | {fp8_cfg}]",
            flush=True,
        )
        for name, sw_us in {**{"bf16 " + k: x for k, x in bf16_swept.items()},
                            **{"fp8 " + k: x for k, x in fp8_swept.items()}}.items():  # fmt: skip
            shown = f"{sw_us:>9.2f}" if isinstance(sw_us, float) else sw_us[:60]
            print(f"      {name:<44} {shown}", flush=True)
    errors = accuracy(device)
    print("accuracy, B 2 L 8k (lengths 8192, 2730), per-KV-head amax scales; rel L2 error vs float64 on:")
    for e in errors:
        deq = "-" if e["vs_dequantized"] is None else f"{e['vs_dequantized']:.2e}"
        print(f"  {e['kv']:<16} original K/V {e['vs_original']:.2e}   dequantized K/V {deq}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"fp8-{gpu.lower().replace(' ', '-')}-{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps(dict(environment=env, date=time.strftime("%Y-%m-%d"), ceiling=ceiling,
                                    rows=rows, accuracy=errors), indent=1, default=str))  # fmt: skip
    print(f"wrote {path}")
    write_report(json.loads(path.read_text()), path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
