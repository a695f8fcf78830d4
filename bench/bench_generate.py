"""Decode ms/step and tokens/s in a Hugging Face generation loop: sdpa vs flex_attention vs kvdecode.

A Llama-3-8B-shaped model (hidden 4096, 32 query heads, 8 KV heads, head dim 128, MLP 14336, vocab
128256) with ``--layers`` decoder layers (default 8) and random bf16 weights decodes one token per step
against a transformers ``StaticCache`` of a given capacity filled to length L. The cache is filled
without a prefill: random K/V are written into every layer's buffers and each layer's length state
(``StaticLayer.cumulative_length``, one 0-d device tensor) is set directly; each timed step resets it to
``L - 1`` first, so every step attends exactly L keys. The 4-D masks are made once per row outside the
timed step, as ``generate`` does for static caches.

Modes, all in the same run and process:

* ``eager``: the model's forward, no graph; host-bound, so the backends are timed in interleaved
  rounds (:func:`time_eager_interleaved`);
* ``captured``: one decode step captured in a CUDA graph (``torch.cuda.graph``) and replayed;
* ``compiled``: ``torch.compile(mode="reduce-overhead")`` of the step (what ``generate`` does), only on
  the headline row by default (``--compile``) and only while the time budget allows.

The sliding-window row (``--window``, default 4096; 0 leaves it out) runs the same shape as a
``MistralForCausalLM`` whose every layer attends the last ``window`` positions: transformers keeps a
rolling buffer of ``window`` slots per layer, so every backend reads ``window`` keys a step whatever L is.
It runs eager and compiled (as the headline row, ``--compile``), not captured: the sliding layers'
update builds a CUDA tensor from a Python list each step (a host-to-device copy), which a raw
CUDA-graph capture refuses.

A backend that fails in a row is recorded with its error and the run goes on. Results: JSON and
markdown under ``--out`` (default ``bench/results/``) and a PNG plot of ms/step vs L when matplotlib is
importable. ``--quick`` runs two rows without compilation (about a minute on an H200).

    python3 bench/bench_generate.py [--layers 8] [--quick] [--out DIR]

A full run with the compiled column on every row takes longer than one 10-minute device call; split
it by rows and join the parts (the results are rewritten after every row, so a part cut short by its
time limit keeps the rows it finished)::

    python3 bench/bench_generate.py --compile all --rows 1x2048x1024,1x32768x1024 --tag part1
    python3 bench/bench_generate.py --compile all --rows 8x32768x16384,8x32768x16384x4096 --tag part2
    python3 bench/bench_generate.py --merge hf-generate-*-part1.json hf-generate-*-part2.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import kvdecode
import kvdecode.hf  # registers attn_implementation="kvdecode"
from kvdecode.generate_cmd import random_llama
from kvdecode.quant import FP8_DTYPES

ROWS = (
    (1, 2048, 1024),
    (1, 32768, 1024),
    (1, 32768, 16384),
    (8, 2048, 1024),
    (8, 32768, 1024),
    (8, 32768, 16384),
)
QUICK_ROWS = ((1, 32768, 1024), (8, 32768, 16384))
HEADLINE = (8, 32768, 16384)
WINDOW_ROWS = (HEADLINE,)  # with --window (both --quick and full runs)
BACKENDS = ("sdpa", "flex_attention", "kvdecode", "kvdecode-fp8")
FP8_BACKEND = "kvdecode-fp8"  # attn_implementation "kvdecode" on a kvdecode.hf.FP8StaticCache (e4m3, scale 1)
MODES = ("eager", "captured", "compiled")
TINY_POSITIONS = 512  # --tiny: a CPU smoke run of this script


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    p.add_argument("--quick", action="store_true", help="two rows (and the window row), no torch.compile")
    p.add_argument("--out", default="bench/results", help="directory for JSON, markdown and PNG")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated attn_implementations")
    p.add_argument("--steps", type=int, default=20, help="timed steps (replays) per repeat (default 20)")
    p.add_argument("--repeats", type=int, default=3, help="repeats; the median is reported (default 3)")
    p.add_argument(
        "--compile",
        choices=("none", "headline", "all"),
        default=None,
        help="rows to run torch.compile(mode='reduce-overhead') on (default: the B 8 / 32k / 16k rows, "
        "none with --quick)",
    )
    p.add_argument("--budget-s", type=float, default=225.0, help="skip compiled runs past this (s)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and cache (CPU smoke run)")
    p.add_argument(
        "--window", type=int, default=4096, help="sliding window of the Mistral-shaped row (0: no such row)"
    )
    p.add_argument(
        "--rows",
        type=_rows_arg,
        help="run exactly these rows, 'BxCAPxL' or 'BxCAPxLxWINDOW' comma-separated (e.g. "
        "1x2048x1024,8x32768x16384x4096; --window adds none then); a run split across calls, its parts "
        "joined with --merge",
    )
    p.add_argument("--tag", default="", help="appended to the results' file names (e.g. part1)")
    p.add_argument("--render", type=Path, help="write the .md (and .png) of an earlier run's JSON; no run")
    p.add_argument(
        "--merge", type=Path, nargs="+", help="join the JSONs of one split run into one under --out; no run"
    )
    return p.parse_args(argv)


def _rows_arg(text: str) -> tuple[tuple[int, int, int, int], ...]:
    try:
        rows = tuple(tuple(int(x) for x in item.lower().split("x")) for item in text.split(",") if item)
    except ValueError:
        rows = ()
    if not rows or any(len(r) not in (3, 4) or min(r) < 1 or r[2] > r[1] for r in rows):
        raise argparse.ArgumentTypeError(
            f"--rows wants 'BxCAPxL[xWINDOW],...' with 1 <= L <= CAP and WINDOW >= 1, got {text!r}"
        )
    return tuple((*r, 0) if len(r) == 3 else r for r in rows)


def environment() -> dict:
    """GPU, versions and date, printed and stored with the results."""
    import transformers
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA)"
    return dict(
        gpu=gpu,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=triton.__version__,
        transformers=transformers.__version__,
        kvdecode=kvdecode.__version__,
        python=platform.python_version(),
        date=datetime.date.today().isoformat(),
    )


def build_model(layers: int, tiny: bool, device: torch.device, window: int = 0):
    """Random-weights Llama (a sliding-window Mistral with ``window``) built directly on the device in
    bf16 (fp32 on CPU)."""
    positions = TINY_POSITIONS if tiny else 131072
    return random_llama(layers, device, tiny=tiny, max_positions=positions, sliding_window=window or None)


def _set_length(cache, length: int) -> None:
    for layer in cache.layers:
        if not hasattr(layer, "cumulative_length"):
            raise RuntimeError(
                f"{type(layer).__name__} has no cumulative_length; this transformers version tracks the "
                "static cache length differently"
            )
        layer.cumulative_length.fill_(min(length, layer.max_cache_len))
        if hasattr(layer, "cumulative_length_int"):  # a sliding layer: its branch (full or not) reads this
            layer.cumulative_length_int = length
        if hasattr(layer, "_host_length"):  # kvdecode's FP8StaticLayer counts eager writes on the host
            layer._host_length = length


def make_cache(model, batch: int, capacity: int, filled: int, *, fp8: bool = False):
    """A StaticCache (an fp8 ``FP8StaticCache`` with ``fp8``) with random K/V in slots ``0..filled-1``
    of every layer."""
    from transformers import StaticCache

    cfg = model.config
    if fp8:
        cache = kvdecode.hf.FP8StaticCache(cfg, max_cache_len=capacity)
    else:
        cache = StaticCache(config=cfg, max_cache_len=capacity)
    cache.early_initialization(batch, cfg.num_key_value_heads, cfg.head_dim, model.dtype, model.device)
    gen = torch.Generator(device=model.device).manual_seed(0)
    for layer in cache.layers:
        for buf in (layer.keys, layer.values):
            if buf.dtype in FP8_DTYPES:  # no normal_ for fp8: quantize bf16 randoms
                shape = buf[:, :, :filled].shape  # a sliding layer has fewer slots than filled
                rand = torch.randn(shape, generator=gen, device=model.device, dtype=model.dtype)
                buf[:, :, :filled].copy_(rand.to(buf.dtype))
            else:
                buf[:, :, :filled].normal_(generator=gen)
    _set_length(cache, filled - 1)
    return cache


def _cache_kw(model) -> str:
    # transformers 5.24 renamed forward's past_key_values to cache (the old name warns until 5.40)
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def make_step(model, cache, batch: int, filled: int, backend: str):
    """The decode step for one backend: resets the lengths to ``filled - 1``, then one forward."""
    from transformers.masking_utils import create_masks_for_generate

    model.set_attn_implementation(backend)
    dev = model.device
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=dev)
    pos = torch.full((batch, 1), filled - 1, device=dev, dtype=torch.long)
    mask_2d = torch.ones(batch, filled, device=dev, dtype=torch.long)
    _set_length(cache, filled - 1)
    embeds = torch.empty((batch, 1, 0), dtype=model.dtype, device=dev)
    mask = create_masks_for_generate(model.config, embeds, mask_2d, cache, pos)
    kwargs = {_cache_kw(model): cache, "use_cache": True}

    def step():
        _set_length(cache, filled - 1)
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, **kwargs).logits

    return step


def backend_step(model, backend: str, batch: int, capacity: int, filled: int, caches: dict):
    """``(attn_implementation, step)`` of one backend on a row's cache: ``caches["bf16"]`` is the row's
    ``StaticCache``; the fp8 backend's ``FP8StaticCache`` is made on first use into ``caches["fp8"]``."""
    if backend == FP8_BACKEND:
        if caches.get("fp8") is None:
            caches["fp8"] = make_cache(model, batch, capacity, filled, fp8=True)
        return "kvdecode", make_step(model, caches["fp8"], batch, filled, "kvdecode")
    return backend, make_step(model, caches["bf16"], batch, filled, backend)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, steps: int, repeats: int, device: torch.device) -> float:
    """Median over repeats of the mean ms per call of ``fn`` (CUDA events on a GPU)."""
    results = []
    for _ in range(repeats):
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                fn()
            end.record()
            end.synchronize()
            results.append(start.elapsed_time(end) / steps)
        else:
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            results.append((time.perf_counter() - t0) * 1e3 / steps)
    return statistics.median(results)


def time_eager_interleaved(model, steps: dict, args, device) -> dict:
    """Eager ms/step of every backend of a row, ``{backend: ms, or the error as a string}`` (a string,
    not the exception: its traceback would keep the row's caches alive past the row).

    ``steps`` maps a backend to ``(attn_implementation, step)``. An eager step is host-bound and the
    host's speed drifts within a run (sdpa's B 1 row read 10.1 and 12.8 ms in two runs of 12-04), so
    timing one backend's repeats after another's books the drift as a difference between backends.
    Here every round times one block of ``--steps`` steps per backend, in alternating order (A B C, then
    C B A, ...), and each backend's median over the ``--repeats`` rounds is reported.
    """
    results: dict = {}
    live = {}
    with torch.no_grad():
        for backend, (impl, step) in steps.items():  # warm-up: kernels compiled, plans made
            try:
                model.set_attn_implementation(impl)
                for _ in range(3):
                    step()
                live[backend] = (impl, step)
            except Exception as exc:
                results[backend] = _error(exc)
        times: dict[str, list[float]] = {b: [] for b in live}
        for round_ in range(args.repeats):
            order = list(live) if round_ % 2 == 0 else list(reversed(live))
            for backend in order:
                if backend in results:  # failed in an earlier round
                    continue
                impl, step = live[backend]
                try:
                    model.set_attn_implementation(impl)
                    times[backend].append(_time(step, args.steps, 1, device))
                except Exception as exc:
                    results[backend] = _error(exc)
        for backend, values in times.items():
            if backend not in results:
                results[backend] = statistics.median(values)
    return results


def time_captured(step, args, device) -> float:
    if device.type != "cuda":
        raise RuntimeError("CUDA graphs need a CUDA device")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.no_grad():
        with torch.cuda.stream(side):  # warm up where the capture runs: kernels compiled, plans made
            for _ in range(3):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            step()
        graph.replay()
        try:
            return _time(graph.replay, args.steps, args.repeats, device)
        finally:
            del graph


def time_compiled(step, args, device) -> float:
    torch._dynamo.reset()
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=False)
    with torch.no_grad():
        for _ in range(3):
            compiled()
        return _time(compiled, args.steps, args.repeats, device)


def _error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def run_row(model, row, backends, modes, args, device) -> list[dict]:
    """Every backend and mode of one (B, capacity, L, window) row (window 0: none); failures are
    recorded, not raised."""
    batch, capacity, filled, window = row
    key = dict(batch=batch, capacity=capacity, filled=filled, window=window)
    records = []

    def record(backend: str, mode: str, found, t0: float, share: int = 1) -> None:
        """One result (ms per step, or the error as a string) printed and kept."""
        rec = dict(backend=backend, **key, mode=mode)
        if isinstance(found, str):
            rec["error"] = found
        else:
            rec.update(ms_per_step=round(found, 4), tokens_per_s=round(batch * 1e3 / found, 1))
        rec["wall_s"] = round((time.perf_counter() - t0) / share, 1)
        print(_line(rec), flush=True)
        records.append(rec)

    try:
        caches = {"bf16": make_cache(model, batch, capacity, filled)}
    except Exception as exc:  # e.g. out of memory: the row is recorded as failed
        return [dict(backend=b, **key, error=_error(exc)) for b in backends]
    if "eager" in modes:  # every backend at once, in interleaved rounds
        t0 = time.perf_counter()
        steps, found = {}, {}
        for backend in backends:
            try:
                steps[backend] = backend_step(model, backend, batch, capacity, filled, caches)
            except Exception as exc:
                found[backend] = _error(exc)
        found.update(time_eager_interleaved(model, steps, args, device))
        steps = None
        for backend in backends:  # (wall time: the row's eager share per backend)
            record(backend, "eager", found[backend], t0, share=len(backends))
    for backend in backends:
        for mode in modes:
            if mode == "eager":
                continue
            t0 = time.perf_counter()
            try:
                _, step = backend_step(model, backend, batch, capacity, filled, caches)
                found = {"captured": time_captured, "compiled": time_compiled}[mode](step, args, device)
            except Exception as exc:  # a backend's failure is a result, never the end of the run
                found = _error(exc)
            step = None
            record(backend, mode, found, t0)
    caches.clear()  # released before the next row allocates
    gc.collect()  # (a reference cycle, seen with flex_attention's step, kept the cache alive otherwise)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records


def _line(rec: dict) -> str:
    head = f"B {rec['batch']:>2} cap {rec['capacity']:>6} L {rec['filled']:>6} {_window(rec):>11}"
    head += f" {rec['backend']:>14}"
    head += f" {rec.get('mode', '-'):>8}"
    if "error" in rec:
        return f"{head}  FAILED {rec['error']}"
    return f"{head}  {rec['ms_per_step']:8.3f} ms/step  {rec['tokens_per_s']:9.1f} tok/s  ({rec['wall_s']} s)"


def _window(rec: dict) -> str:
    return f"window {rec['window']}" if rec.get("window") else ""


def markdown(records: list[dict], env: dict, layers: int, backends) -> str:
    """One table per mode: rows (B, capacity, L) by backend, ms/step (tokens/s)."""
    lines = [
        f"# HF decode step: {env['gpu']}, {layers} layers, Llama-3-8B-shaped, bf16, StaticCache",
        "",
        ", ".join(f"{k} {v}" for k, v in env.items()),
        "",
    ]
    if FP8_BACKEND in backends:
        lines += [
            f"`{FP8_BACKEND}`: attn_implementation `kvdecode` on a `kvdecode.hf.FP8StaticCache` "
            "(float8_e4m3fn K/V, scales 1.0, quantized as they are written); the other columns use "
            "transformers' bf16 `StaticCache`.",
            "",
        ]
    for mode in MODES:
        cells = {
            (r.get("window", 0), r["batch"], r["capacity"], r["filled"], r["backend"]): r
            for r in records
            if r.get("mode") == mode
        }
        if not cells:
            continue
        lines += [
            f"## {mode}: ms per step (tokens/s)",
            "",
            "| B | capacity | L | window | " + " | ".join(backends) + " |",
        ]
        lines.append("|---|---|---|---|" + "---|" * len(backends))
        for w, b, cap, n in sorted({k[:4] for k in cells}):
            row = []
            for be in backends:
                r = cells.get((w, b, cap, n, be))
                row.append(
                    "–"
                    if r is None
                    else "failed"
                    if "error" in r
                    else f"{r['ms_per_step']:.2f} ({r['tokens_per_s']:.0f})"
                )
            lines.append(f"| {b} | {cap} | {n} | {w or '–'} | " + " | ".join(row) + " |")
        lines.append("")
    failed = [r for r in records if "error" in r]
    if failed:
        lines += ["## failures", ""] + [f"- {_line(r)}" for r in failed] + [""]
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> bool:
    """ms/step vs filled length, one line per backend and (B, capacity), one panel per mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    modes = [m for m in MODES if any(r.get("mode") == m and "error" not in r for r in records)]
    if not modes:
        return False
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        series: dict[tuple, list] = {}
        for r in records:
            if r.get("mode") == mode and "error" not in r:
                key = (r["backend"], r["batch"], r["capacity"], r.get("window", 0))
                series.setdefault(key, []).append((r["filled"], r["ms_per_step"]))
        for (backend, b, cap, w), pts in sorted(series.items()):
            pts.sort()
            label = f"{backend} B{b} cap{cap}" + (f" win{w}" if w else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="filled length L", ylabel="ms / decode step", title=mode)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _modes_for(row, args, started: float) -> list[str]:
    # A sliding layer's update builds its last slot's index from a Python list (transformers'
    # StaticSlidingWindowLayer: a host-to-device copy), which a raw CUDA-graph capture refuses;
    # torch.compile makes it a constant.
    modes = ["eager"] if row[3] else ["eager", "captured"]
    chosen = args.compile or ("none" if args.quick else "headline")
    want = chosen == "all" or (chosen == "headline" and tuple(row[:3]) == HEADLINE)
    if want and time.perf_counter() - started < args.budget_s - 60:
        modes.append("compiled")
    return modes


def render(path: Path) -> int:
    """The markdown and plot of a results JSON, beside it (for runs whose .md/.png did not come back)."""
    data = json.loads(path.read_text())
    meta, records = data["meta"], data["results"]
    path.with_suffix(".md").write_text(markdown(records, meta["env"], meta["layers"], meta["backends"]))
    plotted = plot(records, path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.md')}{', .png' if plotted else ' (no matplotlib: no plot)'}")
    return 0


def plans_made() -> list[dict]:
    """kvdecode's plans at the end of the run (the shared plan cache): which backend and configuration
    served each problem the HF steps met (a step's problem has a mask: the Triton heuristic's config)."""
    from kvdecode.plan import PLANS

    made = []
    for plan in list(PLANS._plans.values()):
        config = getattr(plan.launcher, "config", None)
        made.append(dict(problem=plan.problem.name, backend=plan.backend, reason=plan.choice.reason,
                         config=config.name if config is not None else None))  # fmt: skip
    return made


def merge(paths: list[Path], out: Path) -> int:
    """One results file from the parts of a run split across calls (``--rows``/``--tag``): the records
    in order, the first part's environment, every part's rows and plans; refuses parts of another GPU or
    set of versions (they are not one run's figures)."""
    parts = [json.loads(p.read_text()) for p in paths]
    env = parts[0]["meta"]["env"]
    for path, part in zip(paths[1:], parts[1:]):
        other = part["meta"]["env"]
        if {k: v for k, v in other.items() if k != "date"} != {k: v for k, v in env.items() if k != "date"}:
            raise SystemExit(f"{path}: environment {other} differs from {paths[0]}'s {env}")
    meta = dict(parts[0]["meta"], parts=[str(p.name) for p in paths])
    meta["rows"] = [r for part in parts for r in part["meta"]["rows"]]
    meta["kvdecode_plans"] = [pl for part in parts for pl in part["meta"].get("kvdecode_plans", [])]
    records = [r for part in parts for r in part["results"]]
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{_stem(env)}.json"
    path.write_text(json.dumps(dict(meta=meta, results=records), indent=1))
    return render(path)


def _stem(env: dict) -> str:
    gpu = env["gpu"].lower().replace(" ", "-").replace("(", "").replace(")", "")
    return f"hf-generate-{gpu}-{env['date']}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        return render(args.render)
    if args.merge:
        return merge(args.merge, Path(args.out))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment()
    print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    rows = ((2, 64, 32), (2, 64, 60)) if args.tiny else QUICK_ROWS if args.quick else ROWS
    rows = [(*row, 0) for row in rows]
    if args.rows:
        rows = list(args.rows)
    elif args.window:  # --tiny: a window of at most 16 in its 64-slot cache, so that it slides
        window = min(args.window, 16) if args.tiny else args.window
        rows += [(*row, window) for row in (((2, 64, 60),) if args.tiny else WINDOW_ROWS)]
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = _stem(env) + ("-quick" if args.quick else "-tiny" if args.tiny else "")
    stem += f"-{args.tag}" if args.tag else ""

    def save(done: list) -> None:  # after every row: a run cut short by a time limit keeps its rows
        meta = dict(
            env=env, layers=args.layers, rows=[list(r) for r in done], backends=backends, argv=sys.argv[1:],
            kvdecode_plans=plans_made(),
        )  # fmt: skip
        (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, results=records), indent=1))
        (out / f"{stem}.md").write_text(markdown(records, env, args.layers, backends))

    records, model = [], None
    for i, row in enumerate(rows):
        if model is None or getattr(model.config, "sliding_window", None) != (row[3] or None):
            del model
            model = build_model(args.layers, args.tiny, device, window=row[3])
            name = f"{type(model).__name__}, {args.layers} layers, {model.dtype}"
            print(f"model: {name}, built at {time.perf_counter() - started:.1f} s", flush=True)
        # FP8StaticCache keeps sliding layers in the model's dtype: on a window row it is kvdecode again
        row_backends = [b for b in backends if not (row[3] and b == FP8_BACKEND)]
        records += run_row(model, row, row_backends, _modes_for(row, args, started), args, device)
        save(rows[: i + 1])
    plotted = plot(records, out / f"{stem}.png")
    print(f"wrote {out / stem}.json, .md{', .png' if plotted else ' (no matplotlib: no plot)'}")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
