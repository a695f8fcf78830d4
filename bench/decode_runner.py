"""Runs the decode benchmark's sections in order, writing the results after every step."""

from __future__ import annotations

import argparse
import os
import time
import traceback
from pathlib import Path

import torch
from decode_bandwidth import measure_ceiling, over_ceiling
from decode_markdown import short_table
from decode_measure import RunOptions, measure_cell
from decode_report import environment, new_result, result_stem, validate_result, write_result
from decode_scenarios import captured_step, cudnn_builds, host_overhead, static_cache

__all__ = ["Runner"]

CUDNN_CAPACITIES = (4096, 8192, 16384, 32768)
CUDNN_DISK_CAPACITIES = (4096, 8192)


class Runner:
    """One benchmark run: measures, records every outcome (errors included) and keeps the files current."""

    def __init__(self, args: argparse.Namespace, repo: Path) -> None:
        self.args, self.repo = args, repo
        self.start = time.perf_counter()
        self.dead: str | None = None  # set when the CUDA context is unusable
        meta = environment(repo)
        config = {
            "quick": args.quick,
            "backends": list(args.backends),
            "grid": {k: list(v) for k, v in args.grid.items()},
            "variants": list(args.variants),
            "variant_lengths": list(args.variant_lengths),
            "static_lengths": list(args.static_lengths),
            "sections": list(args.sections),
            "replays": args.replays,
            "host_calls": args.host_calls,
            "time_budget_s": args.time_budget,
            "cudnn_cache_dir": os.environ.get("KVDECODE_CACHE_DIR"),
        }
        self.doc = new_result(meta, config)
        self.stem = result_stem(meta, args.quick)
        quick = args.quick
        self.opts = RunOptions(
            backends=args.backends,
            floor_gbps=0.0,
            replays=args.replays,
            bench_warmup_ms=5 if quick else 25,
            bench_rep_ms=20 if quick else 100,
            l2_bytes=meta.get("l2_bytes"),
        )

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def save(self) -> tuple[Path, Path]:
        self.doc["elapsed_s"] = round(self.elapsed(), 1)
        return write_result(self.doc, self.args.out, self.stem)

    def run(self) -> int:
        a = self.args
        gpu = self.doc["meta"].get("gpu_name")
        print(
            f"bench_decode on {gpu}; sections {','.join(a.sections)}; budget {a.time_budget:.0f} s",
            flush=True,
        )
        ceil = measure_ceiling(gpu)
        self.opts.floor_gbps = ceil["floor_gbps"]
        self.doc.update(bandwidth=ceil, floor_bandwidth_gbps=ceil["floor_gbps"])
        self.doc["copy_bandwidth_gbps"] = ceil["copy_gbps"]
        sheet = ceil["datasheet_gbps"]
        print(
            f"floor bandwidth {ceil['floor_gbps']:.0f} GB/s ({ceil['floor_source']}); copy "
            f"{ceil['copy_gbps']:.0f} GB/s (read + written); datasheet {sheet or 'unknown'} GB/s",
            flush=True,
        )
        self.save()
        if "cudnn" in a.sections:  # first: "first graph build in a process" must really be the first
            self._section(
                "cudnn_graphs", lambda: cudnn_builds(CUDNN_CAPACITIES, CUDNN_DISK_CAPACITIES, str(self.repo))
            )
        if "host" in a.sections:
            self._section("host_overhead", lambda: host_overhead(self.opts, a.host_calls))
        grid = [c for c in a.cells if c.case == "gqa"]
        self._cells(grid)
        if "static" in a.sections:
            self._section("static_cache", lambda: static_cache(self.opts, a.static_lengths))
        if "step" in a.sections:
            self._section("captured_step", lambda: captured_step(self.opts))
        self._cells([c for c in a.cells if c.case != "gqa"])
        return self._finish()

    def _section(self, key: str, fn) -> None:
        if self.dead or self.elapsed() > self.args.time_budget:
            why = self.dead or f"time budget of {self.args.time_budget:.0f} s spent"
            self.doc[key] = {"status": "skipped", "reason": why}
        else:
            t0 = time.perf_counter()
            try:
                self.doc[key] = fn()
            except Exception as exc:
                self.doc[key] = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
                self.doc["errors"].append(f"{key}: {traceback.format_exc(limit=4)}")
                self._health()
            print(
                f"{key}: {self.doc[key].get('status', 'ok')} in {time.perf_counter() - t0:.1f} s", flush=True
            )
        self.save()

    def _cells(self, cells) -> None:
        for spec in cells:
            if self.dead or self.elapsed() > self.args.time_budget:
                why = self.dead or f"time budget of {self.args.time_budget:.0f} s spent"
                self.doc["cells"].append({**_stub(spec), "status": "skipped", "reason": why})
                continue
            t0 = time.perf_counter()
            rec = measure_cell(spec, self.opts)
            self.doc["cells"].append(rec)
            if rec["status"] == "error" or any(r.get("status") == "error" for r in rec["results"].values()):
                self._health()
            print(_progress(rec, time.perf_counter() - t0), flush=True)
            self.save()

    def _health(self) -> None:
        """After an error: is the CUDA context still usable (an illegal address poisons it)?"""
        try:
            torch.cuda.synchronize()
            torch.empty(1, device="cuda").fill_(0).item()
        except Exception as exc:
            self.dead = f"CUDA context unusable after an earlier error: {exc}"

    def _finish(self) -> int:
        self.doc["over_ceiling"] = over_ceiling(self.doc)
        problems = validate_result(self.doc)
        self.doc["errors"] += [f"schema: {p}" for p in problems]
        json_path, md_path = self.save()
        print("\n" + short_table(self.doc))
        print(_static_summary(self.doc.get("static_cache") or {}))
        for label, rec in (self.doc.get("host_overhead") or {}).get("calls", {}).items():
            value = f"{rec['us_per_call']:.1f} µs" if rec.get("status") == "ok" else rec.get("status")
            print(f"host {label}: {value}")
        for name, rec in (self.doc.get("captured_step") or {}).get("results", {}).items():
            value = f"{rec['steady_us']:.1f} µs/layer" if rec.get("status") == "ok" else rec.get("status")
            print(f"captured append+attend {name}: {value}")
        for b in (self.doc.get("cudnn_graphs") or {}).get("builds", []):
            ms = b.get("plan_ms")
            shown = "n/a" if ms is None else f"{ms:.1f} ms"
            print(f"cudnn plan, capacity {b.get('capacity')} ({b.get('when')}): {shown}")
        failed = [c["name"] for c in self.doc["cells"] if c["status"] == "ok" and not c.get("check_ok")]
        for name, rec in (self.doc.get("static_cache") or {}).get("results", {}).items():
            bad = [p["seq_len"] for p in rec.get("per_length", []) if not p.get("check_ok")]
            failed += [f"static cache {name} L {length}" for length in bad]
        for name, rec in (self.doc.get("captured_step") or {}).get("results", {}).items():
            if rec.get("status") == "ok" and not rec.get("check_ok"):
                failed.append(f"captured step {name}")
        errors = sum(c["status"] == "error" for c in self.doc["cells"]) + len(self.doc["errors"])
        print(f"\nwrote {json_path} and {md_path} in {self.elapsed():.0f} s; {errors} errors recorded")
        if failed:
            print(f"CORRECTNESS CHECK FAILED in {len(failed)} cells: {', '.join(failed)}")
        above = self.doc["over_ceiling"]
        if above:
            print(f"ABOVE THE FLOOR (the floor is not a ceiling) in {len(above)} results: {'; '.join(above)}")
        return 1 if failed else 3 if above else 0


def _stub(spec) -> dict:
    return {
        "name": spec.name, "case": spec.case, "batch": spec.batch, "num_q_heads": spec.num_q_heads,
        "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim, "seq_len": spec.seq_len,
        "capacity": spec.capacity, "dtype": spec.dtype, "kv_bytes": spec.kv_bytes, "results": {},
    }  # fmt: skip


def _progress(rec: dict, seconds: float) -> str:
    if rec["status"] != "ok":
        return f"{rec['name']}: {rec['status']} ({rec.get('reason', '')[:160]}) [{seconds:.1f} s]"
    parts = []
    for name, r in rec["results"].items():
        short = name.removeprefix("kvdecode-")
        parts.append(f"{short} {r['steady_us']:.1f}" if r.get("status") == "ok" else f"{short} {r['status']}")
    flag = "" if rec.get("check_ok") else " CHECK FAILED"
    above = [n for n, r in rec["results"].items() if (r.get("pct_floor") or 0) > 100]
    flag += f" ABOVE THE FLOOR: {', '.join(above)}" if above else ""
    return (
        f"{rec['name']}: floor {rec['floor_us']:.1f} | " + ", ".join(parts) + f" µs{flag} [{seconds:.1f} s]"
    )


def _static_summary(sc: dict) -> str:
    if sc.get("status") != "ok":
        return f"static cache: {sc.get('status')} {sc.get('reason', '')}" if sc else ""
    lines = [
        f"static cache B {sc['batch']} capacity {sc['capacity']} ({sc['n_layers']} layers), µs per layer:"
    ]
    for i, length in enumerate(sc["lengths"]):
        cells = []
        for name, rec in sc["results"].items():
            per = rec.get("per_length") or []
            ok = i < len(per) and per[i].get("status") == "ok"
            cells.append(
                f"{name.removeprefix('kvdecode-')} {per[i]['steady_us']:.1f}"
                if ok
                else f"{name} {rec['status']}"
            )
        lines.append(f"  L {length}: " + ", ".join(cells))
    return "\n".join(lines)
