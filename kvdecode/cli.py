"""The ``kvdecode`` command line (also ``python -m kvdecode``).

Each subcommand is added by one ``_register_<name>(subparsers)`` function listed in ``_REGISTRARS``;
it builds its parser and sets ``func(args) -> exit code``. A :class:`~kvdecode.KVDecodeError` raised
inside a subcommand prints one line ``kvdecode: error: ...`` and exits 2, like argparse's own errors.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable, Sequence

from .errors import KVDecodeError
from .planner import BACKEND_NAMES

__all__ = ["build_parser", "main"]


def _register_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="decode a few steps against a ragged KV cache, check each against the float64 reference",
        description=(
            "Fill a ragged fixed-capacity KV cache, decode several steps with kvdecode.decode_attention, "
            "check each against the float64 reference and print per-step time and GB/s. On a CUDA device: "
            "a Llama-3-8B-like layer (H_q 32, H_kv 8, D 128, bf16, 4 rows, capacity 4096); without one, a "
            "reduced layer through the Triton interpreter. Exits 1 if a check fails."
        ),
    )
    p.add_argument("--steps", type=int, default=4, help="decode steps (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default=None, help="'cuda[:N]' or 'cpu' (default: cuda if present, else cpu)")
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKEND_NAMES,
        help="backend passed to decode_attention (default: auto)",
    )
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(steps=args.steps, seed=args.seed, device=args.device, backend=args.backend)


def _register_info(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="GPU, library versions, Triton interpreter and cache directory",
        description="Report the device and the versions kvdecode runs with; a missing piece is reported.",
    )
    p.set_defaults(func=_run_info)


# Later subcommands (plan, bench, tune) add their _register_<name> here.
from .generate_cmd import add_generate_parser  # noqa: E402
from .tuning.info_cmd import extend_info_parser  # noqa: E402  (info's tuning table / graph-cache rows)
from .tuning.plan_cmd import add_plan_parser  # noqa: E402
from .tuning.tune_cmd import add_tune_parser  # noqa: E402

_REGISTRARS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _register_demo,
    _register_info,
    extend_info_parser,
    add_tune_parser,
    add_plan_parser,
    add_generate_parser,
)


def _probe(fn: Callable[[], str]) -> str:
    """``fn()``, or a one-line account of why it failed: a missing piece is reported, never raised."""
    try:
        return fn()
    except Exception as exc:  # every failure is the answer here
        text = str(exc).strip().splitlines()
        return f"unavailable ({type(exc).__name__}: {text[0] if text else 'no message'})"


def _device() -> str:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    names = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        cc = f"{props.major}.{props.minor}"
        names.append(f"cuda:{i} {props.name}, {props.multi_processor_count} SMs, sm_{cc.replace('.', '')}")
    return "; ".join(names)


def _torch_version() -> str:
    import torch

    cuda = torch.version.cuda or "none"
    return f"{torch.__version__} (CUDA {cuda})"


def _triton_version() -> str:
    import triton

    return triton.__version__


def _cudnn_frontend_version() -> str:
    import cudnn

    return cudnn.__version__


def _cudnn_library_version() -> str:
    import cudnn

    return str(cudnn.backend_version())


def _torch_cudnn_version() -> str:
    import torch

    version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return str(version) if version is not None else "not available"


def _interpreter() -> str:
    import kvdecode.triton_kernels  # noqa: F401  (sets TRITON_INTERPRET=1 where there is no CUDA)

    value = os.environ.get("TRITON_INTERPRET")
    on = (value or "").lower() in ("1", "true", "on", "yes")
    return f"{'on' if on else 'off'} (TRITON_INTERPRET={value if value is not None else 'unset'})"


def _triton_cache_dir() -> str:
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return str(knobs.cache.dir)
    from triton.runtime.cache import default_cache_dir

    return os.environ.get("TRITON_CACHE_DIR") or default_cache_dir()


def _kvdecode_version() -> str:
    from . import __version__

    return __version__


def info_lines() -> list[str]:
    """``kvdecode info`` as lines of ``name  value``; never raises."""
    rows = [
        ("kvdecode", _probe(_kvdecode_version)),
        ("python", platform.python_version()),
        ("torch", _probe(_torch_version)),
        ("triton", _probe(_triton_version)),
        ("cudnn frontend", _probe(_cudnn_frontend_version)),
        ("cuDNN library", _probe(_cudnn_library_version)),
        ("torch's cuDNN", _probe(_torch_cudnn_version)),
        ("device", _probe(_device)),
        ("triton interpreter", _probe(_interpreter)),
        ("triton cache dir", _probe(_triton_cache_dir)),
    ]
    width = max(len(name) for name, _ in rows)
    return [f"{name:<{width}}  {value}" for name, value in rows]


def _run_info(args: argparse.Namespace) -> int:
    for line in info_lines():
        print(line)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``kvdecode demo: error: ...; see 'kvdecode demo --help'``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kvdecode",
        description="Decode attention against fixed-capacity KV caches at the memory roofline.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_kvdecode_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in _REGISTRARS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvdecode`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KVDecodeError as exc:
        message = " ".join(str(exc).split())
        print(f"kvdecode: error: {message}", file=sys.stderr)
        return 2
