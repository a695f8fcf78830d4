"""Markdown rendering of the decode benchmark's results (and the short table printed at the end)."""

from __future__ import annotations

import json

__all__ = ["render_markdown", "short_table"]


def _num(x, fmt: str = ".1f") -> str:
    return "–" if x is None else format(x, fmt)


def _backend_cell(rec: dict | None) -> str:
    if not rec:
        return ""
    if rec.get("status") == "ok":
        return f"{rec['steady_us']:.1f}"
    return rec.get("status", "?")


def _backends_of(doc: dict) -> list[str]:
    return list(doc.get("config", {}).get("backends", []))


def render_markdown(doc: dict) -> str:
    """The results as markdown: header, side-by-side summary, per-backend detail, scenarios, targets."""
    parts = [_md_header(doc), _md_summary(doc)]
    parts += [_md_backend(doc, b) for b in _backends_of(doc)]
    parts += [_md_static(doc.get("static_cache") or {}), _md_step(doc.get("captured_step") or {})]
    parts += [_md_host(doc.get("host_overhead") or {})]
    parts += [_md_cudnn(doc.get("cudnn_graphs") or {}), _md_problems(doc), _md_targets(doc)]
    return "\n\n".join(p for p in parts if p)


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _md_header(doc: dict) -> str:
    m = doc.get("meta", {})
    gpu = m.get("gpu_name") or "no GPU"
    commit = (m.get("git_commit") or "unknown")[:12] + (" (dirty)" if m.get("git_dirty") else "")
    l2 = f", L2 {m['l2_bytes'] / 2**20:.0f} MiB" if m.get("l2_bytes") else ""
    return "\n".join(
        [
            f"# kvdecode decode benchmark: {gpu}, {m.get('date')}",
            "",
            f"- GPU: {gpu}, {m.get('sm_count')} SMs{l2}, driver {m.get('driver')}",
            f"- torch {m.get('torch')} (CUDA {m.get('cuda_runtime')}, cuDNN {m.get('torch_cudnn')}), "
            f"triton {m.get('triton')}, cuDNN frontend {m.get('cudnn_frontend')} "
            f"(backend {m.get('cudnn_backend')}), kvdecode {m.get('kvdecode')} at {commit}",
            _bandwidth_line(doc),
            f"- Steady state (primary): {doc.get('steady_state_rule')}",
            "- Isolated: `triton.testing.do_bench` median, L2 flushed before each call "
            "(reads high for everyone)",
            "- T_q = 1, bf16, capacity = L, every row filled to L; cases: gqa H 32/8 D 128, mha 32/32, "
            "mqa 32/1, d64 and d256 at H 32/8",
        ]
    )


def _bandwidth_line(doc: dict) -> str:
    bw = doc.get("bandwidth") or {}
    copy = _num(doc.get("copy_bandwidth_gbps"), ".0f")
    sheet = _num(bw.get("datasheet_gbps"), ".0f")
    if not doc.get("floor_bandwidth_gbps"):
        return f"- Copy bandwidth (device-to-device, bytes read + written, GB = 1e9): {copy} GB/s"
    return (
        f"- Floor bandwidth: {doc['floor_bandwidth_gbps']:.0f} GB/s (GB = 1e9), the best read-only bandwidth "
        f"measured in this run ({bw.get('floor_source')}; {_num(bw.get('floor_pct_datasheet'), '.0f')}% of "
        f"the datasheet's {sheet} GB/s); device-to-device copy {copy} GB/s (bytes read + written); "
        "floor = KV bytes / floor bandwidth"
    )


def _ok(rec: dict | None) -> bool:
    return bool(rec) and rec.get("status") == "ok"


def _cell_label(cell: dict) -> list[str]:
    mark = " †" if cell.get("l2_resident") else ""
    return [cell["case"], str(cell["batch"]), str(cell["seq_len"]) + mark]


def _md_summary(doc: dict) -> str:
    backends = _backends_of(doc)
    head = ["case", "B", "L", "KV MB", "N", "floor µs"] + [f"{b} µs (% floor)" for b in backends] + ["check"]
    rows = []
    for cell in doc["cells"]:
        if cell["status"] != "ok":
            continue
        row = [
            *_cell_label(cell),
            f"{cell['kv_bytes'] / 1e6:.1f}",
            str(cell.get("n_layers")),
            _num(cell.get("floor_us")),
        ]
        for b in backends:
            rec = cell["results"].get(b)
            row.append(
                f"{rec['steady_us']:.1f} ({rec['pct_floor']:.0f}%)"
                if _ok(rec)
                else (rec or {}).get("status", "")
            )
        row.append("ok" if cell.get("check_ok") else "**FAIL**")
        rows.append(row)
    note = "† the whole replay's KV fits in L2 (replays may read from L2)."
    return "## Steady state, µs per layer\n\n" + _table(head, rows) + "\n\n" + note


def _md_backend(doc: dict, backend: str) -> str:
    head = [
        "case",
        "B",
        "L",
        "steady µs",
        "isolated µs",
        "GB/s",
        "% floor",
        "isolated % floor",
        "vs SDPA",
        "rel L2",
        "plan ms",
        "notes",
    ]
    rows = []
    for cell in doc["cells"]:
        rec = cell["results"].get(backend)
        if cell["status"] != "ok" or not rec:
            continue
        if not _ok(rec):
            rows.append(_cell_label(cell) + ["–"] * 8 + [f"{rec['status']}: {rec.get('reason', '')[:120]}"])
            continue
        note = f"chose {rec['chosen']}" if rec.get("chosen") and backend.endswith("auto") else ""
        note = f"served by {rec['sdpa_backend']}" if rec.get("sdpa_backend") else note
        rows.append(
            [
                *_cell_label(cell),
                _num(rec["steady_us"]),
                _num(rec.get("isolated_us")),
                _num(rec["gbps"], ".0f"),
                _num(rec["pct_floor"], ".0f"),
                _num(rec.get("isolated_pct_floor"), ".0f"),
                _num(rec.get("vs_sdpa"), ".3f"),
                _num(rec.get("check_rel_l2"), ".1e"),
                _num(rec.get("plan_ms")),
                note,
            ]
        )
    return f"## {backend}\n\n" + _table(head, rows) if rows else ""


def _md_static(sc: dict) -> str:
    if not sc:
        return ""
    if sc.get("status") != "ok":
        return f"## Static cache\n\n{sc.get('status')}: {sc.get('reason')}"
    backends = list(sc["results"])
    head = ["L", "floor µs"] + [f"{b} µs" for b in backends] + ["masked SDPA / best kvdecode"]
    rows = []
    for i, length in enumerate(sc["lengths"]):
        row = [str(length), _num(sc["floor_us"][i])]
        times = {}
        for b in backends:
            rec = sc["results"][b]
            step = rec.get("per_length", [])[i] if _ok(rec) and i < len(rec.get("per_length", [])) else None
            ok = step is not None and step.get("status") == "ok"
            row.append(f"{step['steady_us']:.1f}" if ok else (step or rec).get("status", ""))
            if ok:
                times[b] = step["steady_us"]
        kv = [t for b, t in times.items() if b != "sdpa-masked"]
        row.append(f"{times['sdpa-masked'] / min(kv):.1f}x" if kv and "sdpa-masked" in times else "–")
        rows.append(row)
    title = (
        f"## Static cache: B {sc['batch']}, H {sc['num_q_heads']}/{sc['num_kv_heads']}, D {sc['head_dim']}, "
        f"capacity {sc['capacity']}, {sc['n_layers']} layers, one graph replayed as the length grows"
    )
    note = (
        "sdpa-masked attends over the whole capacity with a boolean mask [B, 1, 1, capacity] and "
        "enable_gqa=True (what a captured SDPA must do)" + _sdpa_served(sc["results"].get("sdpa-masked"))
    )
    return title + "\n\n" + _table(head, rows) + "\n\n" + note


def _sdpa_served(rec: dict | None) -> str:
    """ ", served by <backend> (fastest alone: <backend>; per backend µs)." for an SDPA record."""
    if not _ok(rec) or "sdpa_backend" not in rec:
        return "."
    alone = [
        f"{b} {r['isolated_us']:.1f} µs" if r.get("runs") else f"{b} cannot"
        for b, r in rec.get("sdpa_backends", {}).items()
    ]
    return (
        f", served by {rec['sdpa_backend']} (fastest alone: {rec.get('sdpa_fastest')}; isolated, "
        f"each backend alone: {', '.join(alone)})."
    )


def _md_step(step: dict) -> str:
    results = step.get("results", {})
    if not results:
        return ""
    rows = []
    for name, rec in results.items():
        if _ok(rec):
            rows.append([name, _num(rec["steady_us"]), _num(rec.get("check_rel_l2"), ".1e")])
        else:
            rows.append([name, f"{rec.get('status')}: {rec.get('reason', '')[:100]}", ""])
    title = (
        f"## Captured step: StaticKVCache.append + attend per layer ({step.get('problem')}, "
        f"{step.get('n_layers')} layers in one graph, lengths fixed)"
    )
    return title + "\n\n" + _table(["backend", "µs per layer", "rel L2"], rows)


def _md_host(host: dict) -> str:
    calls = host.get("calls", {})
    if not calls:
        return ""
    rows = [
        [
            name,
            _num(rec.get("us_per_call"))
            if _ok(rec)
            else f"{rec.get('status')}: {rec.get('reason', '')[:100]}",
        ]
        for name, rec in calls.items()
    ]
    return (
        f"## Eager host overhead ({host.get('problem')}, {host.get('n')} back-to-back calls + one sync)\n\n"
        + _table(["call", "µs per call"], rows)
    )


def _md_cudnn(cg: dict) -> str:
    if not cg:
        return ""
    if cg.get("status") != "ok":
        return f"## cuDNN graphs\n\n{cg.get('status')}: {cg.get('reason')}"
    rows = [[str(b.get("capacity")), b.get("when", ""), _num(b.get("plan_ms"))] for b in cg.get("builds", [])]
    text = "## cuDNN graph builds (plan time)\n\n" + _table(["capacity", "when", "ms"], rows)
    return text + f"\n\ncache_info after: `{json.dumps(cg.get('cache_info_after'))}`"


def _md_problems(doc: dict) -> str:
    lines = [
        f"- {c['name']}: {c['status']}: {c.get('reason', '')}" for c in doc["cells"] if c["status"] != "ok"
    ]
    lines += [f"- {e}" for e in doc.get("errors", [])]
    return "## Skipped and failed\n\n" + "\n".join(lines) if lines else ""


def _md_targets(doc: dict) -> str:
    big, near, slower = 0, [], []
    for cell in doc["cells"]:
        for b, rec in cell["results"].items() if cell["status"] == "ok" else ():
            if b == "sdpa" or not _ok(rec):
                continue
            if cell["kv_bytes"] >= 256 * 10**6:
                big += 1
                if rec["pct_floor"] < 100 / 1.03:
                    near.append(f"{b} {cell['name']} ({rec['pct_floor']:.0f}%)")
            if rec.get("vs_sdpa") is not None and rec["vs_sdpa"] > 1.03:
                slower.append(f"{b} {cell['name']} ({rec['vs_sdpa']:.2f}x)")
    above = doc.get("over_ceiling") or []
    sdpa = sorted({r["sdpa_backend"] for c in doc["cells"] for r in [c["results"].get("sdpa") or {}]
                   if "sdpa_backend" in r})  # fmt: skip
    return "\n".join(
        [
            "## Targets (steady state)",
            "",
            "- kvdecode results on cells with >= 256 MB of KV more than 3% above the floor: "
            f"{len(near)} of {big}" + (": " + "; ".join(near) if near else ""),
            f"- kvdecode results slower than SDPA on the exact slice by more than 3%: {len(slower)}"
            + (": " + "; ".join(slower) if slower else ""),
            f"- **results above 100% of the floor** (the floor would not be a ceiling): {len(above)}"
            + (": " + "; ".join(above) if above else ""),
            f"- SDPA on the exact slice served by: {', '.join(sdpa) or 'not recorded'}",
        ]
    )


def short_table(doc: dict) -> str:
    """A compact side-by-side steady-state table (µs per layer) for the end of stdout."""
    backends = _backends_of(doc)
    head = ["cell", "floor"] + [b.removeprefix("kvdecode-") for b in backends] + ["check"]
    lines = [" ".join(f"{h:>10}" if i else f"{h:<26}" for i, h in enumerate(head))]
    for cell in doc["cells"]:
        label = f"{cell['case']} B{cell['batch']} L{cell['seq_len']}"
        if cell["status"] != "ok":
            lines.append(f"{label:<26} {cell['status']}: {cell.get('reason', '')[:70]}")
            continue
        row = [_num(cell.get("floor_us"))] + [_backend_cell(cell["results"].get(b)) for b in backends]
        row.append("ok" if cell.get("check_ok") else "FAIL")
        lines.append(f"{label:<26} " + " ".join(f"{x:>10}" for x in row))
    return "\n".join(lines)
