"""GPU scenarios of the decode benchmark beyond the grid.

- static cache: one CUDA graph captured at a fixed capacity and replayed as the filled length grows,
  kvdecode against torch SDPA over the whole capacity with a boolean mask and ``enable_gqa=True`` (the
  fastest formulation a user would write; the SDPA backend that served it is recorded);
- captured step: ``StaticKVCache.append`` + ``attend`` per layer in one graph (steady state);
- host overhead: eager wall-clock per call on a tiny problem;
- cuDNN graph builds: first in the process, later ones, from the disk cache (in a fresh process).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable

import decode_measure as dm
import torch
import torch.nn.functional as F
from decode_grid import CellSpec
from decode_measure import (
    RunOptions,
    check_output,
    expected_rows,
    free_budget,
    is_oom,
    kvdecode_unavailable,
    make_layers,
    make_plan,
    on_layers,
)
from decode_report import backend_error, backend_na
from decode_sdpa import sdpa_served_by

import kvdecode
from kvdecode.errors import UnsupportedError
from kvdecode.timing import capture_graph, floor_us, host_overhead_us, steady_state_layers, time_replays_us

__all__ = ["captured_step", "cudnn_builds", "host_overhead", "static_cache"]


def static_cache(
    opts: RunOptions, lengths: tuple[int, ...], *, batch: int = 8, capacity: int = 32768
) -> dict:
    """B ``batch``, H 32/8, D 128, bf16 at ``capacity``: each backend captured once, replayed per length.

    Layers: :func:`~kvdecode.timing.steady_state_layers` at the shortest length (the graph is fixed, so
    the count is too). Between replays only ``seq_lens`` (and SDPA's mask) change, in place.
    """
    spec = CellSpec("gqa", batch, 32, 8, 128, seq_len=min(lengths), capacity=capacity)
    n = steady_state_layers(
        spec.kv_bytes, layer_alloc_bytes=spec.alloc_bytes, budget_bytes=free_budget(opts.reserve_bytes)
    )
    rec = {"batch": batch, "num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128, "dtype": "bf16"}
    rec.update(capacity=capacity, lengths=list(lengths), n_layers=n, results={})
    rec["floor_us"] = [
        floor_us(dataclasses.replace(spec, seq_len=L).kv_bytes, opts.floor_gbps) for L in lengths
    ]
    if n == 0:
        return {**rec, "status": "skipped", "reason": "not even one layer fits in free device memory"}

    def body(layers) -> None:
        seq_lens = torch.full((batch,), capacity, dtype=torch.int32, device=dm.DEVICE)
        for name in [b for b in opts.backends if b != "sdpa"]:
            run = functools.partial(_static_kvdecode, name, spec, layers, seq_lens, lengths, opts)
            rec["results"][name] = _guarded(run)
        if "sdpa" in opts.backends:
            run = functools.partial(_static_sdpa, spec, layers, seq_lens, lengths, opts)
            rec["results"]["sdpa-masked"] = _guarded(run)

    return on_layers(rec, spec, n, body)


def _guarded(fn: Callable[[], dict]) -> dict:
    """``fn()``; an exception becomes an error record (OOM: skipped; UnsupportedError: n/a)."""
    try:
        return fn()
    except UnsupportedError as exc:
        return backend_na(str(exc))
    except Exception as exc:
        return backend_error(exc, skipped=is_oom(exc))
    finally:
        torch.cuda.empty_cache()


def _replay_lengths(graph, n, seq_lens, lengths, layers, out0, opts, *, on_length=None) -> list[dict]:
    """Per length: set ``seq_lens`` in place, replay, check layer 0's output, time ``opts.replays``."""
    steps = []
    for length in lengths:
        seq_lens.fill_(length)
        if on_length is not None:
            on_length()
        graph.replay()
        check = check_output(out0(), expected_rows(layers[0], length, seq_lens))
        us = statistics.median(time_replays_us(graph, opts.replays)) / n
        steps.append({"seq_len": length, "status": "ok", "steady_us": us, **check})
    return steps


def _static_kvdecode(name, spec, layers, seq_lens, lengths, opts) -> dict:
    planned = dm.plan_for_layers(name.removeprefix("kvdecode-"), layers, seq_lens, spec.capacity)
    if isinstance(planned, dict):
        return planned
    the_plan, plan_ms, outs = planned
    steps = [
        (lambda q=q, k=k, v=v, o=o: the_plan.run(q, k, v, seq_lens, out=o))
        for (q, k, v), o in zip(layers, outs)
    ]
    seq_lens.fill_(spec.capacity)
    graph = capture_graph(steps)
    try:
        per = _replay_lengths(graph, len(layers), seq_lens, lengths, layers, lambda: outs[0], opts)
    finally:
        del graph
    return {"status": "ok", "chosen": the_plan.backend, "plan_ms": plan_ms, "per_length": per}


def _static_sdpa(spec, layers, seq_lens, lengths, opts) -> dict:
    """SDPA over the whole capacity with a bool mask ``[B, 1, 1, capacity]`` rebuilt in place per length.

    ``scaled_dot_product_attention(q, k_full, v_full, attn_mask=mask, enable_gqa=True)``: what a user of a
    static cache writes, and the fastest formulation (torch routes it to cuDNN attention on the H200,
    251 µs per layer at B 8 / capacity 32k, where q folded to ``[B, H_kv, G, D]`` took 639 µs). Which
    backend served it, and what each backend costs alone, is recorded (:func:`decode_sdpa.sdpa_served_by`).
    """
    b, cap = spec.batch, spec.capacity
    mask = torch.ones((b, 1, 1, cap), dtype=torch.bool, device=dm.DEVICE)
    positions = torch.arange(cap, device=dm.DEVICE)
    outs: list[torch.Tensor | None] = [None] * len(layers)

    def call(i: int) -> torch.Tensor:
        q, k, v = layers[i]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def step(i: int) -> None:
        outs[i] = call(i)

    def set_mask() -> None:
        mask.copy_((positions[None, :] < seq_lens[:, None]).view(b, 1, 1, cap))

    seq_lens.fill_(cap)
    set_mask()
    served = sdpa_served_by(lambda: call(0))
    graph = capture_graph([lambda i=i: step(i) for i in range(len(layers))])
    try:
        per = _replay_lengths(
            graph, len(layers), seq_lens, lengths, layers, lambda: outs[0], opts, on_length=set_mask
        )
    finally:
        del graph
    variant = "enable_gqa=True, bool mask [B, 1, 1, capacity], whole capacity"
    return {"status": "ok", "variant": variant, "per_length": per, **served}


def captured_step(opts: RunOptions, *, seq_len: int = 1024, capacity: int = 2048) -> dict:
    """Steady state of ``StaticKVCache.append`` + ``attend`` per layer, B 1, H 32/8, D 128, bf16.

    Lengths are set once to ``seq_len`` (``advance`` is not in the graph): every replay writes the token
    at position ``seq_len - 1`` and attends over ``seq_len`` keys.
    """
    spec = CellSpec("gqa", 1, 32, 8, 128, seq_len=seq_len, capacity=capacity)
    n = steady_state_layers(
        spec.kv_bytes, layer_alloc_bytes=spec.alloc_bytes, budget_bytes=free_budget(opts.reserve_bytes)
    )
    rec = {"problem": spec.name, "n_layers": n, "replay_bytes": n * spec.kv_bytes, "results": {}}
    for name in [b for b in opts.backends if b != "sdpa"]:
        rec["results"][name] = _guarded(functools.partial(_captured_step_one, name, spec, n, opts))
    return rec


def _captured_step_one(name: str, spec: CellSpec, n: int, opts: RunOptions) -> dict:
    backend = name.removeprefix("kvdecode-")
    reason = kvdecode_unavailable(backend)
    if reason:
        return backend_na(reason)
    cache = kvdecode.StaticKVCache(
        n,
        spec.batch,
        spec.num_kv_heads,
        spec.capacity,
        spec.head_dim,
        dtype=spec.torch_dtype,
        device=dm.DEVICE,
        backend=backend,
    )
    cache.set_lengths([spec.seq_len] * spec.batch)
    dt = spec.torch_dtype
    qs = [
        torch.randn(spec.batch, spec.num_q_heads, 1, spec.head_dim, dtype=dt, device=dm.DEVICE)
        for _ in range(n)
    ]
    kv_new = torch.randn(2, spec.batch, spec.num_kv_heads, 1, spec.head_dim, dtype=dt, device=dm.DEVICE)
    outs = [torch.empty_like(q) for q in qs]

    def make_step(i: int) -> Callable[[], object]:
        def step() -> None:
            cache.append(i, kv_new[0], kv_new[1])
            cache.attend(i, qs[i], out=outs[i])

        return step

    graph = capture_graph([make_step(i) for i in range(n)])
    try:
        us = statistics.median(time_replays_us(graph, opts.replays)) / n
    finally:
        del graph
    layer0 = (qs[0], cache.keys(0), cache.values(0))
    check = check_output(outs[0], expected_rows(layer0, spec.seq_len, cache.seq_lens))
    return {"status": "ok", "steady_us": us, "floor_us": floor_us(spec.kv_bytes, opts.floor_gbps), **check}


def host_overhead(opts: RunOptions, n_calls: int) -> dict:
    """Eager wall-clock per call (``n_calls`` back-to-back + one sync), B 1, H 32/8, D 128, L = cap = 256."""
    spec = CellSpec("gqa", 1, 32, 8, 128, seq_len=256, capacity=256)
    ((q, k, v),) = make_layers(spec, 1)
    lens = torch.full((1,), 256, dtype=torch.int32, device=dm.DEVICE)
    out = torch.empty_like(q)
    rec = {"problem": spec.name, "n": n_calls, "calls": {}}
    calls: dict[str, Callable[[], Callable[[], object]]] = {}
    for name in [b for b in opts.backends if b != "sdpa"]:
        backend = name.removeprefix("kvdecode-")
        calls[f"decode_attention(backend={backend!r})"] = lambda backend=backend: (
            lambda: kvdecode.decode_attention(q, k, v, lens, backend=backend, out=out)
        )
        calls[f"DecodePlan.run ({backend})"] = lambda backend=backend: _plan_runner(
            backend, q, k, v, lens, out
        )
    if "sdpa" in opts.backends:
        calls["torch SDPA (enable_gqa)"] = lambda: (
            lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        )
    for label, make in calls.items():
        rec["calls"][label] = _guarded(functools.partial(_host_one, make, n_calls))
    return rec


def _host_one(make: Callable[[], Callable[[], object]], n_calls: int) -> dict:
    return {"status": "ok", "us_per_call": host_overhead_us(make(), n_calls)}


def _plan_runner(backend, q, k, v, lens, out) -> Callable[[], object]:
    reason = kvdecode_unavailable(backend)
    if reason:
        raise UnsupportedError(reason)
    the_plan, _ = make_plan(backend, q, k, v, lens, out, k.shape[2])
    return lambda: the_plan.run(q, k, v, lens, out=out)


_CHILD = r"""
import json, sys, time
import torch, kvdecode
from kvdecode.problem import DecodeProblem
plans = []
for cap in json.loads(sys.argv[1]):
    q = torch.empty(1, 32, 1, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.empty(1, 8, cap, 128, dtype=torch.bfloat16, device="cuda")
    lens = torch.full((1,), cap, dtype=torch.int32, device="cuda")
    problem = DecodeProblem.from_tensors(q, k, k, lens, out=torch.empty_like(q))
    torch.cuda.synchronize()
    start = time.perf_counter()
    kvdecode.plan(problem, backend="cudnn", max_seq_len=cap)
    torch.cuda.synchronize()
    plans.append({"capacity": cap, "plan_ms": (time.perf_counter() - start) * 1e3})
try:
    import dataclasses, kvdecode.cudnn_graphs as cg
    info = dataclasses.asdict(cg.cache_info())
except Exception as exc:
    info = {"error": repr(exc)}
print("RESULT " + json.dumps({"plans": plans, "cache_info": info}))
"""


def cudnn_builds(capacities: tuple[int, ...], child_capacities: tuple[int, ...], repo_root: str) -> dict:
    """Plan (graph build) times: the first in this process, later capacities, then a fresh process that
    finds them in the disk cache (``$KVDECODE_CACHE_DIR``). Cache stats from ``cudnn_graphs.cache_info``.
    """
    reason = kvdecode_unavailable("cudnn")
    if reason:
        return backend_na(reason)
    try:
        import kvdecode.cudnn_graphs as cg

        info_fn = getattr(cg, "cache_info", None)
    except Exception as exc:  # the hook stays guarded: a missing or broken module is recorded, not fatal
        return backend_na(f"kvdecode.cudnn_graphs does not import: {exc!r}")
    rec = {"status": "ok", "cache_dir": os.environ.get("KVDECODE_CACHE_DIR"), "builds": []}
    rec["cache_info_before"] = _info(info_fn)
    for i, cap in enumerate(capacities):
        when = "first in process" if i == 0 else "later (same head dim and dtype)"
        rec["builds"].append({"capacity": cap, "when": when, **_guarded(functools.partial(_build_one, cap))})
    rec["cache_info_after"] = _info(info_fn)
    rec["disk"] = _guarded(functools.partial(_disk_child, child_capacities, repo_root))
    for i, plan_rec in enumerate(rec["disk"].get("plans", [])):
        when = "from disk, first in a fresh process" if i == 0 else "from disk, later"
        rec["builds"].append({**plan_rec, "when": when, "status": "ok"})
    return rec


def _build_one(cap: int) -> dict:
    spec = CellSpec("gqa", 1, 32, 8, 128, seq_len=cap, capacity=cap)
    q = torch.empty(1, 32, 1, 128, dtype=spec.torch_dtype, device=dm.DEVICE)
    k = torch.empty(1, 8, cap, 128, dtype=spec.torch_dtype, device=dm.DEVICE)
    lens = torch.full((1,), cap, dtype=torch.int32, device=dm.DEVICE)
    the_plan, ms = make_plan("cudnn", q, k, k, lens, torch.empty_like(q), cap)
    return {"status": "ok", "plan_ms": ms, "chosen": the_plan.backend}


def _disk_child(capacities: tuple[int, ...], repo_root: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(list(capacities))],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return {"status": "ok", **json.loads(line[len("RESULT ") :])}
    return {"status": "error", "reason": f"child exited {done.returncode}: {done.stderr[-1500:]}"}


def _info(fn) -> dict | None:
    if fn is None:
        return None
    try:
        info = fn()
    except Exception as exc:
        return {"error": repr(exc)}
    if dataclasses.is_dataclass(info):
        return dataclasses.asdict(info)
    if hasattr(info, "_asdict"):
        return dict(info._asdict())
    return dict(info) if isinstance(info, dict) else {"repr": repr(info)}
