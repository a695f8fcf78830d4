"""``kvdecode info``'s tuning section: the table in use, the cache directory, graph-cache stats.

:func:`extend_info_parser` is a registrar (``cli._REGISTRARS``): it wraps the ``info`` subcommand so
that these rows follow the ones ``cli.info_lines`` prints. Every probe reports a failure as text.
"""

from __future__ import annotations

import argparse

__all__ = ["extend_info_parser", "tuning_info_rows"]


def _probe(fn) -> str:
    try:
        return fn()
    except Exception as exc:  # a missing piece is the answer, never an error
        text = str(exc).strip().splitlines()
        return f"unavailable ({type(exc).__name__}: {text[0] if text else 'no message'})"


def _gpu_name() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    from .environment import device_gpu_name

    return device_gpu_name(torch.device("cuda", torch.cuda.current_device()))


def _table_rows() -> list[tuple[str, str]]:
    from ..thresholds import ENV_TABLE, MAKE_A_TABLE, TUNING_DIR, load_table, resolve_table

    rows = []
    gpu = _gpu_name()
    if gpu is None:
        rows.append(
            ("tuning table", "none in use (no CUDA GPU: tables apply to the GPU they were measured on)")
        )
    else:
        res = resolve_table(gpu)
        if res.table is None:
            text = f"none for {gpu}: the no-table rule applies (provisional); {MAKE_A_TABLE}"
            rows.append(("tuning table", text))
            rows.append(("no-table rule", _probe(_rule_text)))
            rows.append(("triton configs", "heuristic (no tuned entries without a table)"))
        else:
            rows.append(("tuning table", f"{res.table.path} ({res.source}; {_describe(res.table)})"))
        rows += [("  refused", r) for r in res.refused]
    from .. import thresholds

    user = thresholds.user_table_path(gpu or "x")
    rows.append(("user tuning table", str(user if gpu else user.with_name("<gpu-slug>.json"))))
    rows.append((f"${ENV_TABLE}", _env_value(ENV_TABLE)))
    for path in sorted(TUNING_DIR.glob("*.json")):
        rows.append(("packaged table", f"{path.name}: {_probe(lambda p=path: _describe(load_table(p)))}"))
    return rows


def _sm_count() -> int | None:
    import torch

    from ..planner import device_sm_count

    return device_sm_count(torch.device("cuda"))


def _rule_text() -> str:
    from ..no_table_rule import describe_rule

    sms = _sm_count()
    if sms is None:
        return "not usable (SM count unreadable): flat provisional threshold"
    return describe_rule(sms) + " (kvdecode.no_table_rule; kvdecode.explain names the regime)"


def _describe(table) -> str:
    meta = table.metadata
    flags = [f for f in ("provisional", "partial") if meta.get(f)]
    n = sum(len(e.get("lengths", {})) for f in table.families.values() for e in f["batches"].values())
    text = f"{table.gpu_name}, {meta.get('sm_count')} SMs, {meta.get('date')}, {n} tuned points"
    return text + (f", {' '.join(flags)}" if flags else "")


def _env_value(name: str) -> str:
    import os

    return os.environ.get(name) or "unset"


def _cudnn_usable() -> str:
    import torch

    from ..cudnn_graphs.cuda_env import load_cudnn

    _, version, reason = load_cudnn()
    if reason is not None:
        return f"no: {reason}"
    if not torch.cuda.is_available():
        return f"no: no CUDA GPU (cuDNN {version} is loadable)"
    return f"yes (cuDNN {version})"


def _graph_cache() -> str:
    from ..cudnn_graphs import cache_info

    i = cache_info()
    return (
        f"hits {i.hits}, misses {i.misses}, builds {i.builds}, disk loads {i.disk_loads}, "
        f"evictions {i.evictions}, size {i.currsize}/{i.maxsize}, build {i.build_seconds:.2f} s, "
        f"load {i.load_seconds:.2f} s (this process)"
    )


def _disk_cache() -> str:
    from ..cudnn_graphs.disk_cache import DiskCache, default_cache_dir, disk_cache_enabled

    folder = DiskCache().folder
    plans = len(list(folder.glob("*"))) if folder.is_dir() else 0
    state = "on" if disk_cache_enabled() else "off (KVDECODE_DISK_CACHE=0)"
    return f"{default_cache_dir()} ({plans} saved cuDNN plans in {folder.name}/; disk cache {state})"


def tuning_info_rows() -> list[tuple[str, str]]:
    """``(name, value)`` rows for ``kvdecode info``; never raises."""
    rows = [("cuDNN usable", _probe(_cudnn_usable))]
    try:
        rows += _table_rows()
    except Exception as exc:
        rows.append(("tuning table", f"unavailable ({type(exc).__name__}: {exc})"))
    rows += [("kvdecode cache dir", _probe(_disk_cache)), ("cuDNN graph cache", _probe(_graph_cache))]
    return rows


def extend_info_parser(subparsers: argparse._SubParsersAction) -> None:
    """Append :func:`tuning_info_rows` to ``kvdecode info`` (registered after ``info`` itself)."""
    parser = subparsers.choices.get("info")
    if parser is None:
        return
    base = parser.get_default("func")

    def run_info(args: argparse.Namespace) -> int:
        code = base(args) if base is not None else 0
        rows = tuning_info_rows()
        width = max(18, *(len(k) for k, _ in rows))
        for name, value in rows:
            print(f"{name:<{width}}  {value}")
        return code

    parser.set_defaults(func=run_info)
