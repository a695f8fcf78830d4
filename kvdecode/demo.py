"""``kvdecode demo``: decode a few steps against a ragged, fixed-capacity KV cache and check each one.

A Llama-3-8B-like attention layer (H_q 32, H_kv 8, D 128, bf16, 4 rows, capacity 4096) on a CUDA device;
without one, a reduced layer (H_q 8, H_kv 2, D 64, capacity 256) through the Triton interpreter on the CPU.
Each step appends one token's K/V per row at position ``seq_lens[b]``, advances the lengths on the
device, calls :func:`kvdecode.decode_attention` and compares the result with the float64 reference.
The time printed is the decode call alone (CUDA events on the GPU, wall clock on the CPU); the GB/s is
the K and V bytes the call has to read, ``2 * sum(seq_lens) * H_kv * D * bytes``, over that time.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .api import decode_attention
from .errors import KVDecodeError
from .planner import explain
from .reference import reference_decode_attention, relative_l2_error, tolerance_for

__all__ = ["CPU_SHAPE", "GPU_SHAPE", "DemoShape", "run_demo"]


@dataclass(frozen=True)
class DemoShape:
    """One attention layer and its cache: ``q [B, H_q, 1, D]``, caches ``[B, H_kv, capacity, D]``."""

    label: str
    batch: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    capacity: int
    dtype: torch.dtype = torch.bfloat16

    def describe(self) -> str:
        return (
            f"B {self.batch}, H_q {self.num_q_heads}, H_kv {self.num_kv_heads}, D {self.head_dim}, "
            f"capacity {self.capacity}, {str(self.dtype).removeprefix('torch.')}"
        )


GPU_SHAPE = DemoShape("Llama-3-8B-like layer", 4, 32, 8, 128, 4096)
CPU_SHAPE = DemoShape("reduced layer", 4, 8, 2, 64, 256)


@dataclass(frozen=True)
class StepResult:
    step: int
    seq_lens: tuple[int, ...]
    backend: str
    seconds: float
    kv_bytes: int
    error: float
    tolerance: float  # rel L2 allowed for the shape's dtype (kvdecode.reference.TOLERANCES)
    appended: bool = True  # the step's new K/V sit at position seq_lens[b] - 1

    @property
    def ok(self) -> bool:
        return self.appended and self.error <= self.tolerance  # False for a NaN error too

    @property
    def gbytes_per_s(self) -> float:
        return self.kv_bytes / self.seconds / 1e9


def resolve_device(name: str | None) -> torch.device:
    """The demo's device: ``name``, or CUDA when there is one, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise KVDecodeError(f"--device must be 'cpu' or 'cuda[:N]', got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise KVDecodeError(f"--device must be 'cpu' or 'cuda[:N]', got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KVDecodeError(f"--device must name an available device, got {name!r}; this machine has no CUDA")
    return device


def _interpreter_on() -> bool:
    import kvdecode.triton_kernels  # noqa: F401  (sets TRITON_INTERPRET=1 where there is no CUDA)

    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _prompt_lengths(shape: DemoShape, steps: int, gen: torch.Generator) -> list[int]:
    """Ragged prompt lengths, one per row, each drawn from its own band of ``1 .. capacity - steps``."""
    room = shape.capacity - steps
    bands = [(room * b // shape.batch + 1, room * (b + 1) // shape.batch) for b in range(shape.batch)]
    lens = [int(torch.randint(lo, max(lo, hi) + 1, (1,), generator=gen)) for lo, hi in bands]
    order = torch.randperm(shape.batch, generator=gen).tolist()
    return [lens[i] for i in order]


def _randn(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: torch.Generator):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def _time_call(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds of ``reps`` calls of ``fn``: CUDA events on the GPU, wall clock on the CPU."""
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)
        ]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) for s, e in events) * 1e-3
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _header(shape: DemoShape, device: torch.device, interpreted: bool, reps: int) -> list[str]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name} ({props.multi_processor_count} SMs)"
        timing = f"time = median of {reps} eager calls per step, CUDA events, after warm-up"
    else:
        why = "" if torch.cuda.is_available() else "no CUDA device, so "
        where = f"{why}a reduced size on the CPU"
        if interpreted:
            where += ", Triton kernels through the interpreter (TRITON_INTERPRET=1)"
        timing = "time = CPU wall clock of one call (interpreted: a correctness run, not a speed number)"
    return [f"kvdecode demo: {where}", f"{shape.label}: {shape.describe()}", timing]


def run_demo(
    *,
    steps: int = 4,
    seed: int = 0,
    device: str | None = None,
    backend: str = "auto",
    emit: Callable[[str], None] = print,
) -> int:
    """Run the demo, printing through ``emit``; returns the exit code (0 when every step checks out).

    Raises
    ------
    KVDecodeError
        A bad option (steps, device, backend).
    """
    dev = resolve_device(device)
    shape = GPU_SHAPE if dev.type == "cuda" else CPU_SHAPE
    if not 1 <= steps <= shape.capacity - 1:
        raise KVDecodeError(
            f"--steps must be in 1..{shape.capacity - 1}, got {steps}; the cache must fit them"
        )
    interpreted = _interpreter_on()
    if dev.type == "cpu" and backend in ("auto", "triton") and not interpreted:
        raise KVDecodeError(
            "--device cpu needs the Triton interpreter, got "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')}; "
            "run with TRITON_INTERPRET=1 or use --device cuda"
        )
    reps = 20 if dev.type == "cuda" else 1
    for line in _header(shape, dev, interpreted, reps):
        emit(line)
    results = _decode_steps(shape, dev, steps=steps, seed=seed, backend=backend, reps=reps, emit=emit)
    return _summary(results, emit)


def _decode_steps(
    shape: DemoShape,
    dev: torch.device,
    *,
    steps: int,
    seed: int,
    backend: str,
    reps: int,
    emit: Callable[[str], None],
) -> list[StepResult]:
    gen = torch.Generator().manual_seed(seed)
    s = shape
    kv_shape = (s.batch, s.num_kv_heads, s.capacity, s.head_dim)
    k_cache, v_cache = _randn(kv_shape, s.dtype, dev, gen), _randn(kv_shape, s.dtype, dev, gen)
    seq_lens = torch.tensor(_prompt_lengths(s, steps, gen), dtype=torch.int32, device=dev)
    rows = torch.arange(s.batch, device=dev)
    q = _randn((s.batch, s.num_q_heads, 1, s.head_dim), s.dtype, dev, gen)
    out = torch.empty_like(q)

    def call() -> None:
        decode_attention(q, k_cache, v_cache, seq_lens, backend=backend, out=out)

    choice = explain(q, k_cache, v_cache, seq_lens, backend=backend)
    emit(f"planner: {choice.backend} ({choice.reason})")
    _time_call(call, dev, reps=3 if dev.type == "cuda" else 1)  # warm-up: compile, plan, caches

    table = _Table(dev)
    emit(table.header())
    results = []
    for step in range(1, steps + 1):
        new_k = _randn((s.batch, s.num_kv_heads, s.head_dim), s.dtype, dev, gen)
        new_v = _randn((s.batch, s.num_kv_heads, s.head_dim), s.dtype, dev, gen)
        k_cache[rows, :, seq_lens.long()] = new_k  # append at position seq_lens[b], on the device
        v_cache[rows, :, seq_lens.long()] = new_v
        seq_lens += 1  # advance on the device: no host sync, the kernel reads the new lengths
        q.copy_(_randn(tuple(q.shape), s.dtype, dev, gen))
        out.fill_(float("nan"))  # poisoned: an element the call does not write fails the check
        seconds = _time_call(call, dev, reps)
        # Checking syncs; it happens after the timed calls.
        last = seq_lens.long() - 1
        appended = torch.equal(k_cache[rows, :, last], new_k) and torch.equal(v_cache[rows, :, last], new_v)
        lens = seq_lens.tolist()
        used = explain(q, k_cache, v_cache, seq_lens, backend=backend).backend  # what the call chose
        top = max(lens)  # the reference only needs the filled prefix of the cache
        expected, _ = reference_decode_attention(q, k_cache[:, :, :top], v_cache[:, :, :top], seq_lens)
        kv_bytes = 2 * sum(lens) * s.num_kv_heads * s.head_dim * k_cache.element_size()
        error = relative_l2_error(out, expected)
        tol = tolerance_for(s.dtype).rel_l2
        result = StepResult(step, tuple(lens), used, seconds, kv_bytes, error, tol, appended)
        results.append(result)
        emit(table.row(result))
    return results


class _Table:
    """A small aligned table: step, lengths, backend, time, GB/s, relative L2 error, verdict."""

    def __init__(self, dev: torch.device) -> None:
        self.unit, self.factor = ("µs", 1e6) if dev.type == "cuda" else ("ms", 1e3)

    def header(self) -> str:
        cols = ("step", "seq_lens", "backend", f"time {self.unit}", "GB/s", "rel L2", "check")
        return self._line(*cols)

    def row(self, r: StepResult) -> str:
        verdict = "ok" if r.ok else "FAIL (append)" if not r.appended else f"FAIL (> {r.tolerance:g})"
        return self._line(
            str(r.step),
            ",".join(map(str, r.seq_lens)),
            r.backend,
            f"{r.seconds * self.factor:.1f}",
            f"{r.gbytes_per_s:.3g}",
            f"{r.error:.2e}",
            verdict,
        )

    @staticmethod
    def _line(step: str, lens: str, backend: str, time: str, gbps: str, err: str, check: str) -> str:
        return f"{step:>4}  {lens:<20}  {backend:<9}  {time:>10}  {gbps:>9}  {err:>8}  {check}"


def _summary(results: list[StepResult], emit: Callable[[str], None]) -> int:
    bad = [r.step for r in results if not r.ok]
    if bad:
        emit(
            f"FAILED: step(s) {', '.join(map(str, bad))} differ from the float64 reference by more than "
            f"relative L2 {results[0].tolerance:g} (or lost the appended token)"
        )
        return 1
    worst = max(r.error for r in results)
    emit(
        f"all {len(results)} steps match the float64 reference "
        f"(worst relative L2 {worst:.2e} <= {results[0].tolerance:g})"
    )
    return 0
