"""``kvdecode tune``: autotune the Triton kernel, calibrate the cuDNN crossover, write a table."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..errors import KVDecodeError
from ..presets import PRESETS, parse_presets
from .spec import (
    DTYPES,
    H100_MEMORY,
    H100_SMS,
    MIN_LENGTH,
    Family,
    TuneSpec,
    check_head_dim,
    estimate,
    length_grid,
    parse_heads,
    parse_int_list,
    parse_length,
)

__all__ = ["add_tune_parser", "spec_from_args"]

DESCRIPTION = """\
Autotune the Triton split-KV kernel (num_splits, block_n, num_warps, num_stages) for each family, batch
size and length bucket (powers of two up to --capacity, capacity = filled length), measure cuDNN at the
same points, find the crossover length per (family, batch), and write a tuning table (JSON) with the GPU,
SM count, versions and date. With --mask, the families' masked twins instead (a bool mask and
kv_start, as transformers steps have; Triton only). Timing: kvdecode.timing.steady_state_us (N layers in
one CUDA graph); the search uses 10 replays per candidate, the recorded numbers 20. The table is
rewritten after every point;
rerunning with the same --out resumes. Default --out: the user table for this GPU, which kvdecode then
uses (see 'kvdecode info')."""


def add_tune_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tune", help="autotune Triton and calibrate the cuDNN crossover; write a tuning table",
        description=DESCRIPTION,
    )  # fmt: skip
    g = p.add_argument_group("what to tune")
    g.add_argument("--preset", help=f"comma-separated model presets: {', '.join(PRESETS)}")
    g.add_argument("--heads", help="H_q:H_kv, e.g. 32:8 (with --head-dim)")
    g.add_argument("--head-dim", type=str, help="head dim D, e.g. 128 (with --heads)")
    g.add_argument("--dtype", default="bf16", help="bf16, fp16 or both comma-separated (default: bf16)")
    g.add_argument("--q-len", default="1", help="query tokens per step T_q (default: 1)")
    g.add_argument("--batch", default="1,4,16,64", help="batch sizes (default: 1,4,16,64)")
    g.add_argument("--capacity", default="131072", help="longest length bucket (default: 131072; 128k ok)")
    g.add_argument("--min-length", default=str(MIN_LENGTH), help=f"shortest bucket (default: {MIN_LENGTH})")
    g.add_argument("--lengths", help="explicit length buckets instead of the powers of two")
    g.add_argument("--coarse", action="store_true", help="4x steps between lengths, fewer candidates")
    g.add_argument(
        "--mask", action="store_true",
        help="tune the families' masked twins (a bool mask [B, 1, T_q, L] and kv_start, as a transformers "
        "step has; keys ending in _mask): what masked calls then use instead of the heuristic",
    )  # fmt: skip
    o = p.add_argument_group("run")
    o.add_argument("--out", help="table to write (default: the user table for this GPU)")
    o.add_argument("--fresh", action="store_true", help="ignore points already in --out; start over")
    o.add_argument(
        "--remeasure", action="store_true",
        help="measure this run's points again where --out has them (e.g. after the search changed); the "
        "table's other points are kept and the crossovers recomputed",
    )  # fmt: skip
    o.add_argument("--dry-run", action="store_true", help="list the points and the estimated time; no GPU")
    o.add_argument("--search-replays", default="10", help="replays per candidate in the search (default 10)")
    o.add_argument("--sm-count", help=f"SMs assumed by --dry-run without a GPU (default: {H100_SMS})")
    p.set_defaults(func=run_tune_command)


def _families(args: argparse.Namespace) -> tuple[Family, ...]:
    dtypes = [d.strip() for d in args.dtype.split(",")]
    for d in dtypes:
        if d not in DTYPES:
            raise KVDecodeError(f"--dtype must be bf16 or fp16 (comma-separated), got {args.dtype!r}")
    q_len = parse_length(args.q_len, "--q-len")
    shapes: list[tuple[int, int, int, str]] = []
    if args.preset:
        shapes += [(p.num_q_heads, p.num_kv_heads, p.head_dim, p.name) for p in parse_presets(args.preset)]
    if args.heads is not None or args.head_dim is not None:
        if args.heads is None or args.head_dim is None:
            raise KVDecodeError(
                "--heads and --head-dim must be given together, e.g. --heads 32:8 --head-dim 128"
            )
        hq, hkv = parse_heads(args.heads)
        shapes.append((hq, hkv, check_head_dim(parse_length(args.head_dim, "--head-dim")), "custom"))
    if not shapes:
        raise KVDecodeError("kvdecode tune needs --preset NAME or --heads H_q:H_kv --head-dim D")
    merged: dict[tuple, list[str]] = {}
    for hq, hkv, d, label in shapes:
        merged.setdefault((hq, hkv, d), []).append(label)
    return tuple(
        Family(hq, hkv, d, dtype, q_len, ",".join(labels), masked=bool(getattr(args, "mask", False)))
        for (hq, hkv, d), labels in merged.items()
        for dtype in dtypes
    )


def spec_from_args(args: argparse.Namespace) -> TuneSpec:
    """The :class:`TuneSpec` of parsed ``tune`` arguments; KVDecodeError for bad values."""
    families = _families(args)
    batches = parse_int_list(args.batch, "--batch")
    capacity = parse_length(args.capacity, "--capacity")
    if args.lengths:
        lengths = parse_int_list(args.lengths, "--lengths")
    else:
        min_length = parse_length(args.min_length, "--min-length")
        lengths = length_grid(capacity, coarse=args.coarse, min_length=min_length)
    bad = [n for n in lengths if n < families[0].q_len]
    if bad:
        raise KVDecodeError(f"--lengths must be >= T_q ({families[0].q_len}), got {bad}")
    return TuneSpec(families, batches, lengths, coarse=args.coarse)


def _default_out() -> Path:
    import torch

    from ..thresholds import user_table_path
    from .environment import device_gpu_name

    if not torch.cuda.is_available():
        return user_table_path("x").with_name("<gpu-slug>.json")  # named after the GPU at run time
    return user_table_path(device_gpu_name(torch.device("cuda", torch.cuda.current_device())))


def run_tune_command(args: argparse.Namespace) -> int:
    if args.fresh and args.remeasure:
        raise KVDecodeError(
            "--fresh and --remeasure exclude each other (--fresh starts a new table, --remeasure measures "
            "points of --out again and keeps the rest); pass one"
        )
    spec = spec_from_args(args)
    replays = parse_length(args.search_replays, "--search-replays")
    out = Path(args.out) if args.out else _default_out()
    if args.dry_run:
        print_dry_run(spec, out, args, replays)
        return 0
    from .crossover import format_results
    from .runner import run_tune

    command = "kvdecode " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else ""
    raw = run_tune(
        spec, out, fresh=args.fresh, remeasure=args.remeasure, search_replays=replays, command=command
    )
    print(format_results(raw))
    print(f"\nwrote {out}")
    return 0


def _machine(args: argparse.Namespace) -> tuple[str, int, int]:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        free, _ = torch.cuda.mem_get_info()
        return f"{props.name}, {props.multi_processor_count} SMs", props.multi_processor_count, free
    sms = parse_length(args.sm_count, "--sm-count") if args.sm_count else H100_SMS
    note = f"no CUDA GPU here: assuming {sms} SMs and {H100_MEMORY // 10**9} GB (an H100)"
    return note, sms, H100_MEMORY


def print_dry_run(spec: TuneSpec, out: Path, args: argparse.Namespace, replays: int) -> None:
    """What ``tune`` would measure and how long it expects to take; no GPU needed."""
    from .crossover import measured_points
    from .measure import RESERVE_BYTES

    machine, sms, free = _machine(args)
    done: frozenset = frozenset()
    if out.exists() and not (args.fresh or args.remeasure):
        try:
            done = frozenset((k, b, n) for k, b, n in _measured(out, measured_points))
        except KVDecodeError as exc:
            print(f"note: {exc}")
    plans, seconds = estimate(spec, sm_count=sms, budget=free - RESERVE_BYTES, replays=replays, done=done)
    n_points = len(spec.points())
    print(
        f"kvdecode tune --dry-run: {len(spec.families)} families x {len(spec.batches)} batch sizes x "
        f"{len(spec.lengths)} lengths = {n_points} points ({len(done & _keys(spec))} already in --out)"
    )
    print(f"device: {machine}")
    print(f"out: {out}")
    print(f"{'family':<31} {'B':>4} {'L':>7} {'layers':>6} {'KV/layer':>10} {'configs':>7}")
    for plan in plans:
        pt = plan.point
        size = f"{pt.kv_bytes() / 1e6:.1f} MB"
        tail = f"skip: {plan.skip}" if plan.skip else f"{plan.configs:>7}"
        print(f"{pt.family.key:<31} {pt.batch:>4} {pt.length:>7} {plan.n_layers:>6} {size:>10} {tail}")
    print(
        f"estimated duration: ~{seconds / 60:.1f} min (rough: {replays} replays per candidate, 20 for "
        "the recorded numbers, Triton compiles and cuDNN builds included)"
    )


def _keys(spec: TuneSpec) -> frozenset:
    return frozenset((p.family.key, p.batch, p.length) for p in spec.points())


def _measured(out: Path, measured_points) -> frozenset:
    from ..thresholds import read_table

    return measured_points(read_table(out))
