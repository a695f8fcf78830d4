"""GPU side of the decode benchmark: one grid cell, measured for every backend.

Each cell allocates N layers of distinct caches (:class:`kvdecode.timing.LayerStack`, the harness the
tuner uses too), checks one layer of each backend against an exact answer within
:data:`kvdecode.reference.TOLERANCES`, then times steady state (N layers in one CUDA graph) and an
isolated ``do_bench`` call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from decode_grid import CellSpec, plan_layers
from decode_report import add_vs_sdpa, backend_error, backend_na, backend_ok
from decode_sdpa import sdpa_served_by

import kvdecode
from kvdecode.backends import backend_names
from kvdecode.errors import UnsupportedError
from kvdecode.problem import DecodeProblem
from kvdecode.reference import float32_reference_rows, reference_decode_attention, within_tolerance
from kvdecode.timing import RESERVE_BYTES, LayerStack, floor_us, free_device_bytes, isolated_us

__all__ = [
    "Expected",
    "RunOptions",
    "check_output",
    "expected_rows",
    "free_budget",
    "is_oom",
    "make_layers",
    "make_plan",
    "measure_cell",
    "on_layers",
    "sync",
]

REFERENCE_MAX_BYTES = 16 * 10**6  # the CPU float64 reference for cells up to 16 MB of KV
DEVICE = torch.device("cuda")  # a CPU smoke test of the bench's logic may point this elsewhere


@dataclass
class RunOptions:
    backends: tuple[str, ...]
    floor_gbps: float  # the best read-only bandwidth measured in this run (decode_bandwidth)
    replays: int = 20
    bench_warmup_ms: int = 25
    bench_rep_ms: int = 100
    reserve_bytes: int = RESERVE_BYTES  # left free for SDPA workspaces, graph pools and the check
    l2_bytes: int | None = None


@dataclass
class Expected:
    """The exact answer for some rows of layer 0: ``values[i]`` is row ``rows[i]`` (float64, CPU)."""

    rows: list[int]
    values: torch.Tensor
    method: str


Layer = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def free_budget(reserve: int) -> int:
    """Device bytes the caches of one cell may take."""
    return free_device_bytes(DEVICE, reserve)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def make_layers(spec: CellSpec, n_layers: int, *, capacity: int | None = None) -> LayerStack:
    """``n_layers`` distinct (q, k, v) and outputs, BHSD contiguous, random normal, on the GPU."""
    cap = spec.capacity if capacity is None else capacity
    kv_shape = (spec.batch, spec.num_kv_heads, cap, spec.head_dim)
    q_shape = (spec.batch, spec.num_q_heads, 1, spec.head_dim)
    return LayerStack.random(n_layers, q_shape, kv_shape, spec.torch_dtype, DEVICE)


def on_layers(rec: dict, spec: CellSpec, n_layers: int, body: Callable[[LayerStack], None]) -> dict:
    """``body(layers)`` on ``n_layers`` fresh layers of ``spec``, then ``rec["status"] = "ok"``; an
    exception becomes ``rec``'s status and reason (out of memory: skipped). The layers are freed after."""
    layers = None
    try:
        layers = make_layers(spec, n_layers)
        body(layers)
        rec["status"] = "ok"
    except Exception as exc:
        err = backend_error(exc, skipped=is_oom(exc))
        rec.update(status=err["status"], reason=err["reason"])
    finally:
        if layers is not None:
            layers.close()
        torch.cuda.empty_cache()
    return rec


def expected_rows(layer: Layer, seq_len: int, seq_lens: torch.Tensor) -> Expected:
    """Exact output of ``layer`` at length ``seq_len``.

    Small cells (<= 16 MB of KV): :func:`kvdecode.reference_decode_attention` (float64, CPU) on every
    row. Larger ones: :func:`kvdecode.reference.float32_reference_rows` on the GPU for the first and last
    row (~1e-6 from float64, far below the bf16 tolerance), so the check never copies a big cache to the
    host.
    """
    q, k, v = layer
    nbytes = 2 * k[:, :, :seq_len].numel() * k.element_size()
    if nbytes <= REFERENCE_MAX_BYTES:
        out, _ = reference_decode_attention(q, k, v, seq_lens)
        return Expected(list(range(q.shape[0])), out, "reference (float64, CPU)")
    rows = sorted({0, q.shape[0] - 1})
    values = float32_reference_rows(q, k, v, seq_len, rows)
    return Expected(rows, values, "float32 math on the device, first and last row")


def check_output(out: torch.Tensor, expected: Expected) -> dict:
    """Relative L2 error of ``out``'s checked rows; ``ok`` when within the dtype's tolerance, no NaN."""
    ok, err = within_tolerance(out[expected.rows], expected.values, out.dtype)
    finite = err != float("inf")
    return {"check_rel_l2": err if finite else None, "check_ok": ok, "check_method": expected.method}


def make_plan(
    backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens, out, max_seq_len: int
) -> tuple[kvdecode.DecodePlan, float]:
    """``kvdecode.plan`` for these tensors and its host time in ms (graph builds included)."""
    sync()
    start = time.perf_counter()
    problem = DecodeProblem.from_tensors(q, k, v, seq_lens, out=out)
    the_plan = kvdecode.plan(problem, backend=backend, max_seq_len=max_seq_len)
    sync()
    return the_plan, (time.perf_counter() - start) * 1e3


def plan_for_layers(backend: str, layers, seq_lens, max_seq_len: int) -> tuple | dict:
    """``(plan, plan_ms, outs)`` for a stack of same-shaped layers (one output each), or the n/a record
    when the backend is unavailable or cannot serve them."""
    reason = kvdecode_unavailable(backend)
    if reason:
        return backend_na(reason)
    outs = layers.outs
    q0, k0, v0 = layers[0]
    try:
        the_plan, plan_ms = make_plan(backend, q0, k0, v0, seq_lens, outs[0], max_seq_len)
    except UnsupportedError as exc:
        return backend_na(str(exc))
    return the_plan, plan_ms, outs


def kvdecode_unavailable(backend: str) -> str | None:
    """Why a kvdecode backend name cannot be benchmarked in this installation, or None."""
    if backend != "auto" and backend not in backend_names():
        return f"backend {backend!r} is not registered in this installation (kvdecode.backends)"
    return None


def measure_cell(spec: CellSpec, opts: RunOptions) -> dict:
    """Measure every backend of ``opts`` on ``spec``; never raises (errors become records)."""
    rec = cell_record(spec)
    reason = spec.skip_reason()
    if reason:
        return {**rec, "status": "skipped", "reason": reason}
    n = plan_layers(spec, free_budget(opts.reserve_bytes))
    if n == 0:
        return {**rec, "status": "skipped", "reason": "not even one layer fits in free device memory"}
    floor = floor_us(spec.kv_bytes, opts.floor_gbps)
    rec.update(n_layers=n, replay_bytes=n * spec.kv_bytes, floor_us=floor)
    rec["l2_resident"] = bool(opts.l2_bytes and n * spec.kv_bytes <= opts.l2_bytes)

    def body(layers: LayerStack) -> None:
        seq_lens = torch.full((spec.batch,), spec.seq_len, dtype=torch.int32, device=DEVICE)
        expected = expected_rows(layers[0], spec.seq_len, seq_lens)
        for name in opts.backends:
            rec["results"][name] = _measure_backend(name, spec, layers, seq_lens, expected, floor, opts)

    on_layers(rec, spec, n, body)
    checks = [r.get("check_ok") for r in rec["results"].values() if r.get("status") == "ok"]
    rec["check_ok"] = bool(checks) and all(checks)
    add_vs_sdpa(rec)
    return rec


def cell_record(spec: CellSpec) -> dict:
    return {
        "name": spec.name,
        "case": spec.case,
        "batch": spec.batch,
        "num_q_heads": spec.num_q_heads,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "seq_len": spec.seq_len,
        "capacity": spec.capacity,
        "dtype": spec.dtype,
        "kv_bytes": spec.kv_bytes,
        "status": "pending",
        "results": {},
    }


def _measure_backend(name, spec, layers, seq_lens, expected, floor, opts) -> dict:
    try:
        if name == "sdpa":
            return _measure_sdpa(spec, layers, expected, floor, opts)
        return _measure_kvdecode(
            name.removeprefix("kvdecode-"), spec, layers, seq_lens, expected, floor, opts
        )
    except Exception as exc:
        return backend_error(exc, skipped=is_oom(exc))
    finally:
        torch.cuda.empty_cache()


def _measure_kvdecode(backend, spec, layers, seq_lens, expected, floor, opts) -> dict:
    planned = plan_for_layers(backend, layers, seq_lens, spec.seq_len)
    if isinstance(planned, dict):
        return planned
    the_plan, plan_ms, outs = planned
    q0, k0, v0 = layers[0]
    outs[0].fill_(float("nan"))  # poisoned: the check proves every checked element is written
    start = time.perf_counter()
    the_plan.run(q0, k0, v0, seq_lens, out=outs[0])
    sync()
    first_ms = (time.perf_counter() - start) * 1e3
    check = check_output(outs[0], expected)

    def launch(q, k, v, o):
        return the_plan.run(q, k, v, seq_lens, out=o)

    steady = layers.steady_us(launch, replays=opts.replays)
    iso = isolated_us(layers.step(0, launch), warmup_ms=opts.bench_warmup_ms, rep_ms=opts.bench_rep_ms)
    extra = {"plan_ms": plan_ms, "first_call_ms": first_ms, "chosen": the_plan.backend}
    extra["choice_reason"] = the_plan.choice.reason
    return backend_ok(steady, iso, spec.kv_bytes, floor, **extra, **check)


def _measure_sdpa(spec, layers, expected, floor, opts) -> dict:
    """torch SDPA on the exact slice ``k[:, :, :L]`` (here the whole buffer), ``enable_gqa=True``; records
    which SDPA backend served it (:func:`decode_sdpa.sdpa_served_by`)."""
    length = spec.seq_len

    def launch(q, k, v, _out):
        return F.scaled_dot_product_attention(q, k[:, :, :length], v[:, :, :length], enable_gqa=True)

    call = layers.step(0, launch)
    check = check_output(call(), expected)
    served = sdpa_served_by(call)
    steady = layers.steady_us(launch, replays=opts.replays)
    iso = isolated_us(call, warmup_ms=opts.bench_warmup_ms, rep_ms=opts.bench_rep_ms)
    return backend_ok(steady, iso, spec.kv_bytes, floor, **check, **served)
