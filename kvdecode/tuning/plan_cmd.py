"""``kvdecode plan``: explain the planner's decision for a problem given by flags.

Prints the backend and why, the cuDNN threshold and the table it came from, the Triton configuration
(tuned or heuristic), what each backend says about the problem, and what is missing on this machine.
Without a GPU the problem is placed on the CPU (Triton through its interpreter); the decision the table
would give on its GPU is shown too.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from ..errors import KVDecodeError, UnsupportedError
from ..planner import BACKEND_NAMES
from ..presets import PRESETS, get_preset
from .spec import Family, check_head_dim, family_problem, parse_heads, parse_length

__all__ = ["add_plan_parser", "plan_lines"]


def add_plan_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="explain which backend and configuration a problem gets, and why",
        description="Explain the planner's decision for a problem given by flags; works without a GPU.",
    )
    p.add_argument("--preset", help=f"model preset: {', '.join(PRESETS)}")
    p.add_argument("--heads", help="H_q:H_kv, e.g. 32:8 (instead of --preset, with --head-dim)")
    p.add_argument("--head-dim", help="head dim D (with --heads)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="default: bf16")
    p.add_argument("--batch", default="1", help="batch size B (default: 1)")
    p.add_argument("--q-len", default="1", help="query tokens T_q (default: 1)")
    p.add_argument("--capacity", default="131072", help="cache capacity (default: 131072; 128k ok)")
    p.add_argument("--length", help="longest filled row (max_seq_len); default: the capacity")
    p.add_argument("--kv-start", action="store_true", help="rows are left-padded (kv_start given)")
    p.add_argument(
        "--mask", action="store_true",
        help="a bool mask shared by the heads, and kv_start (a transformers step): Triton, tuned by "
        "'kvdecode tune --mask'",
    )  # fmt: skip
    p.add_argument("--backend", default="auto", choices=BACKEND_NAMES, help="default: auto")
    p.add_argument("--table", help="tuning table to use (default: the lookup order, see 'kvdecode info')")
    p.set_defaults(func=run_plan_command)


def _family(args: argparse.Namespace) -> Family:
    dtype = args.dtype
    q_len = parse_length(args.q_len, "--q-len")
    masked = bool(getattr(args, "mask", False))
    if args.preset and (args.heads or args.head_dim):
        raise KVDecodeError("give --preset or --heads/--head-dim, not both")
    if args.preset:
        pr = get_preset(args.preset)
        return Family(pr.num_q_heads, pr.num_kv_heads, pr.head_dim, dtype, q_len, pr.name, masked)
    if not (args.heads and args.head_dim):
        raise KVDecodeError("kvdecode plan needs --preset NAME or --heads H_q:H_kv --head-dim D")
    hq, hkv = parse_heads(args.heads)
    head_dim = check_head_dim(parse_length(args.head_dim, "--head-dim"))
    return Family(hq, hkv, head_dim, dtype, q_len, masked=masked)


def _problem(args: argparse.Namespace):
    fam = _family(args)
    batch = parse_length(args.batch, "--batch")
    capacity = parse_length(args.capacity, "--capacity")
    if capacity < fam.q_len:
        raise KVDecodeError(f"--capacity must be >= T_q ({fam.q_len}), got {capacity}")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    if device is None:
        import kvdecode.triton_kernels  # noqa: F401  (turns the interpreter on without CUDA)

        device = torch.device("cpu")
    problem = family_problem(fam, batch, capacity, device)
    if args.kv_start:
        problem = dataclasses.replace(problem, has_kv_start=True)
    length = parse_length(args.length, "--length") if args.length else None
    return problem, length


def plan_lines(args: argparse.Namespace) -> tuple[list[str], int]:
    """The explanation as ``(lines, exit code)``: 1 when the asked-for backend cannot serve it."""
    from .. import thresholds
    from ..backends import backend_names, get_backend
    from ..planner import auto_threshold, choose
    from ..triton_kernels.config import heuristic_config, tuned_config
    from .environment import device_gpu_name

    if args.table:
        thresholds.use_table(args.table)
    problem, length = _problem(args)
    rows: list[tuple[str, str]] = [("problem", problem.name), ("device", _device_text(problem))]
    code = 0
    try:
        choice = choose(problem, args.backend, max_seq_len=length)
        rows += [("backend", choice.backend), ("reason", choice.reason)]
    except UnsupportedError as exc:
        choice = None
        rows += [("backend", f"none: {exc}")]
        code = 1
    gpu = device_gpu_name(problem.device)
    if problem.device.type == "cuda":
        res = thresholds.resolve_table(gpu)
        table_text = f"{res.table.path} ({res.source})" if res.table else "none (provisional fallback)"
        rows.append(("table", table_text))
        rows += [("refused", r) for r in res.refused]
        thr = auto_threshold(problem)
        rows.append(("threshold", f"{_fmt(thr.value)} from {thr.source}{' (provisional)' * thr.provisional}"))
    tuned = tuned_config(problem)
    cfg, where = tuned if tuned else (heuristic_config(problem), "heuristic (no tuned entry for it)")
    rows.append(("triton config", f"{cfg.name} from {where}"))
    for name in ("triton", "cudnn", "reference"):
        reason = get_backend(name).supports(problem) if name in backend_names() else "not installed"
        rows.append((f"  {name}", _verdict(name, reason, choice)))
    rows += [("missing", m) for m in _missing(problem)]
    if problem.device.type != "cuda":
        rows += _on_table_gpu(problem, length, args.table)
    width = max(len(k) for k, _ in rows)
    return [f"{k:<{width}}  {v}" for k, v in rows], code


def _fmt(value: int) -> str:
    from ..thresholds import NEVER

    return "never (cuDNN did not win at any measured length)" if value >= NEVER else str(value)


def _device_text(problem) -> str:
    if problem.device.type == "cuda":
        props = torch.cuda.get_device_properties(problem.device)
        return f"{problem.device} {props.name}, {props.multi_processor_count} SMs"
    return "cpu (no CUDA GPU: Triton runs through its interpreter)"


def _verdict(name: str, reason: str | None, choice) -> str:
    if reason is not None:
        return f"cannot serve it: {reason}"
    if choice is not None and choice.backend == name:
        return "can serve it: chosen"
    if name == "reference":
        return "can serve it: used only when neither Triton nor cuDNN can (float64, syncs)"
    why = choice.reason if choice is not None else "not asked for"
    return f"can serve it: not chosen ({why})"


def _missing(problem) -> list[str]:
    from ..cudnn_graphs.cuda_env import load_cudnn

    out = []
    if not torch.cuda.is_available():
        out.append("no CUDA GPU: cuDNN is unusable and no tuning table applies")
    _, _, reason = load_cudnn()
    if reason is not None:
        out.append(reason)
    return out


def _on_table_gpu(problem, length: int | None, path: str | None) -> list[tuple[str, str]]:
    """What a table (--table, else each shipped one) would decide for this problem on its GPU.

    ``--table`` was checked by ``use_table`` (an unusable one raised :class:`KVDecodeError`); a shipped
    table that cannot be used is reported in a row, not raised.
    """
    from ..thresholds import TUNING_DIR, family_key, load_table

    paths = [path] if path else sorted(str(p) for p in TUNING_DIR.glob("*.json"))
    rows = []
    for p in paths:
        try:
            table = load_table(p)
        except KVDecodeError as exc:
            if path:
                raise
            rows.append(("refused", str(exc)))
            continue
        f = problem
        key = family_key(f.num_q_heads, f.num_kv_heads, f.head_dim, f.q_len, f.dtype_name)
        value = table.family_threshold(key, f.batch) or table.lookup(f.head_dim, f.dtype_name, f.batch)
        n = length or f.capacity
        pick = "cudnn" if n >= value else "triton"
        rows.append(
            (
                f"on {table.gpu_name}",
                f"table {p}: threshold {_fmt(value)}; auto at length {n} would pick {pick} "
                "(if cuDNN serves it there)",
            )
        )
    return rows


def run_plan_command(args: argparse.Namespace) -> int:
    lines, code = plan_lines(args)
    print("\n".join(lines))
    return code
