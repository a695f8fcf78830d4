"""From measurements to a table: crossover lengths, derived lookup keys, the results table.

Pure host logic on the table dict (schema in :mod:`kvdecode.thresholds`), so it is tested on CPU.

The crossover of a (family, batch) is the shortest measured length from which cuDNN is faster than
the tuned Triton kernel at that length **and at every longer measured length**; ``None`` (stored as
null, looked up as :data:`~kvdecode.thresholds.NEVER`) when cuDNN does not win at the longest one.
Auto then uses Triton below the measured length where cuDNN starts to win for good: a single noisy
win among shorter lengths does not move it.
"""

from __future__ import annotations

import statistics

from ..thresholds import FALLBACK_THRESHOLD, KIND, NEVER, SCHEMA_VERSION, table_key

__all__ = ["add_point", "crossover", "finalize", "format_results", "measured_points", "new_table"]


def crossover(times: dict[int, tuple[float, float | None]]) -> int | None:
    """``{length: (triton_us, cudnn_us or None)}`` -> the threshold length, or None (cuDNN never wins)."""
    threshold = None
    for length in sorted(times, reverse=True):
        triton_us, cudnn_us = times[length]
        if cudnn_us is None or cudnn_us >= triton_us:
            break
        threshold = length
    return threshold


def new_table(metadata: dict) -> dict:
    """An empty version-2 table with this metadata (``partial`` until :func:`finalize` says otherwise)."""
    meta = {"provisional": False, "partial": True, **metadata}
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "metadata": meta,
        "batch_buckets": [1],
        "default_threshold": FALLBACK_THRESHOLD,
        "thresholds": {},
        "families": {},
    }


def add_point(raw: dict, family: dict, batch: int, length: int, record: dict) -> None:
    """Store one point's record under ``families[key].batches[B].lengths[L]`` (``family`` has ``key``)."""
    fams = raw.setdefault("families", {})
    entry = fams.setdefault(family["key"], {k: v for k, v in family.items() if k != "key"})
    batches = entry.setdefault("batches", {})
    batches.setdefault(str(batch), {"threshold": None, "lengths": {}})["lengths"][str(length)] = record


def measured_points(raw: dict) -> frozenset[tuple[str, int, int]]:
    """``(family key, batch, length)`` of every point already in the table (for resuming)."""
    return frozenset(
        (key, int(b), int(n))
        for key, fam in raw.get("families", {}).items()
        for b, entry in fam.get("batches", {}).items()
        for n in entry.get("lengths", {})
    )


def _times(entry: dict) -> dict[int, tuple[float, float | None]]:
    return {int(n): (p["triton_us"], p.get("cudnn_us")) for n, p in entry["lengths"].items()}


def _first_at_least(values: list[int], x: int) -> int:
    return next((v for v in values if x <= v), values[-1])


def finalize(raw: dict, *, partial: bool) -> dict:
    """Recompute every crossover and the per head dim / dtype / batch bucket keys; returns ``raw``.

    The per-key value is the lower median of the families' crossovers for that head dim and dtype (a
    family that never switches counts as :data:`NEVER`), for a planner that only knows D, dtype and B.
    """
    families = raw.get("families", {})
    buckets: set[int] = set()
    by_key: dict[tuple[int, str], list[dict]] = {}
    for fam in families.values():
        for entry in fam["batches"].values():
            entry["threshold"] = crossover(_times(entry)) if entry["lengths"] else None
        if fam.get("mask"):  # (cuDNN takes no mask: masked families only hold Triton configurations)
            continue
        buckets.update(int(b) for b in fam["batches"])
        by_key.setdefault((fam["head_dim"], fam["dtype"]), []).append(fam)
    raw["batch_buckets"] = sorted(buckets) or [1]
    thresholds = {}
    for (head_dim, dtype), fams in sorted(by_key.items()):
        for bucket in raw["batch_buckets"]:
            values = []
            for fam in fams:
                b = _first_at_least(sorted(int(x) for x in fam["batches"]), bucket)
                value = fam["batches"][str(b)]["threshold"]
                values.append(NEVER if value is None else value)
            thresholds[table_key(head_dim, dtype, bucket)] = int(statistics.median_low(values))
    raw["thresholds"] = thresholds
    raw["metadata"]["partial"] = partial
    return raw


def _fmt_threshold(value: int | None) -> str:
    return "never" if value is None or value >= NEVER else str(value)


def format_results(raw: dict) -> str:
    """The table printed at the end of ``kvdecode tune``: every point, then the crossovers."""
    head = (
        f"{'family':<31} {'B':>4} {'L':>7}  {'default us':>10} {'tuned us':>9} {'speedup':>7}  "
        f"{'tuned config':<22} {'cuDNN us':>9}  winner"
    )
    lines = [head, "-" * len(head)]
    crossings = []
    for key, fam in raw.get("families", {}).items():
        for b, entry in sorted(fam["batches"].items(), key=lambda kv: int(kv[0])):
            for n, p in sorted(entry["lengths"].items(), key=lambda kv: int(kv[0])):
                c = p["config"]
                cfg = f"s{c['num_splits']} n{c['block_n']} w{c['num_warps']} st{c['num_stages']}"
                cfg += f" hp{c['heads_per_cta']}" if c.get("heads_per_cta", 1) != 1 else ""
                cudnn = p.get("cudnn_us")
                winner = "cudnn" if cudnn is not None and cudnn < p["triton_us"] else "triton"
                lines.append(
                    f"{key:<31} {b:>4} {n:>7}  {p['default_us']:>10.2f} {p['triton_us']:>9.2f} "
                    f"{p['default_us'] / p['triton_us']:>6.3f}x  {cfg:<22} "
                    f"{'n/a' if cudnn is None else f'{cudnn:.2f}':>9}  {winner}"
                )
            where = (
                "n/a (masked: Triton only)"
                if fam.get("mask")
                else f"cuDNN from L >= {_fmt_threshold(entry['threshold'])}"
            )
            crossings.append(f"{key:<31} {b:>4}  {where}")
    lines += ["", "crossover (auto uses cuDNN at or above it):", *crossings]
    return "\n".join(lines)
