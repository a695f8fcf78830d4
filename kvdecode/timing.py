"""Timing utilities shared by the benchmark, the CLI and the tuner: the one steady-state harness.

Four measures, each answering a different question:

``steady_state_us``
    The number that matters (the benchmark's and the tuner's measure, bench/README.md): a decode step
    runs attention once per layer, each layer over its own cache, all captured in one CUDA graph. N
    layers with distinct caches are captured into one ``torch.cuda.CUDAGraph``; the result is the median
    of 20 replays divided by N, in µs per layer. How many layers: :func:`steady_state_layers` (within
    free memory: :func:`layers_that_fit`); the layers themselves: :class:`LayerStack`, whose
    :meth:`LayerStack.steady_us` is what the benchmark and ``kvdecode tune`` both time with.
``isolated_us``
    One call timed by ``triton.testing.do_bench`` (median; it flushes L2 before every call). Reads
    higher than steady state for everyone: the flush leaves dirty lines the next kernel writes back.
``host_overhead_us``
    Wall-clock per call of back-to-back eager calls followed by one sync: the host cost of a call.
``copy_bandwidth``
    The memory floor's denominator: a large device-to-device copy, bytes read + written, GB/s.

GB means 1e9 bytes throughout (never GiB).
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "MIN_REPLAY_BYTES",
    "MIN_STEADY_LAYERS",
    "RESERVE_BYTES",
    "STEADY_REPLAYS",
    "LayerStack",
    "call_times_us",
    "capture_graph",
    "copy_bandwidth",
    "floor_us",
    "free_device_bytes",
    "gbps",
    "host_overhead_us",
    "isolated_us",
    "kv_bytes",
    "layers_that_fit",
    "pct_of_floor",
    "steady_state_layers",
    "steady_state_us",
    "time_replays_us",
]

MIN_REPLAY_BYTES = 10**9  # 1 GB of KV per replay ...
MIN_STEADY_LAYERS = 8  # ... or 8 layers, whichever needs fewer layers
STEADY_REPLAYS = 20
RESERVE_BYTES = 4 * 10**9  # device memory kept free for scratch, workspaces, graph pools and checks
CPU_BUDGET_BYTES = 8 * 10**9  # what a CPU "device" (the Triton interpreter, in tests) may allocate

_ELEMENT_SIZE = {
    torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float8_e4m3fn: 1, torch.float8_e5m2: 1,
}  # fmt: skip


# ---- byte counting and the floor (pure host logic, testable without a GPU) ----


def kv_bytes(batch: int, num_kv_heads: int, seq_len: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of K and V one decode call must read: ``2 * B * H_kv * L * D * element_size``.

    ``seq_len`` is the filled length L, not the capacity: that is what an ideal kernel reads.
    """
    if dtype not in _ELEMENT_SIZE:
        raise ValueError(
            f"dtype must be one of float16, bfloat16, float32, float8_e4m3fn, float8_e5m2, got {dtype}"
        )
    for name, value in (("batch", batch), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    return 2 * batch * num_kv_heads * seq_len * head_dim * _ELEMENT_SIZE[dtype]


def floor_us(nbytes: int, bandwidth_gbps: float) -> float:
    """Time to move ``nbytes`` at ``bandwidth_gbps`` (GB/s, GB = 1e9): the memory floor, in µs."""
    if bandwidth_gbps <= 0:
        raise ValueError(f"bandwidth_gbps must be > 0, got {bandwidth_gbps}")
    return nbytes / (bandwidth_gbps * 1e9) * 1e6


def gbps(nbytes: int, us: float) -> float:
    """Achieved bandwidth in GB/s (GB = 1e9) for ``nbytes`` moved in ``us`` microseconds."""
    if us <= 0:
        raise ValueError(f"us must be > 0, got {us}")
    return nbytes / (us * 1e-6) / 1e9


def pct_of_floor(measured_us: float, floor: float) -> float:
    """``100 * floor / measured``: 100 % means the call runs at the copy bandwidth."""
    if measured_us <= 0:
        raise ValueError(f"measured_us must be > 0, got {measured_us}")
    return 100.0 * floor / measured_us


def steady_state_layers(
    layer_read_bytes: int,
    *,
    layer_alloc_bytes: int | None = None,
    budget_bytes: int | None = None,
    min_replay_bytes: int = MIN_REPLAY_BYTES,
    min_layers: int = MIN_STEADY_LAYERS,
) -> int:
    """How many layers (distinct caches) one steady-state replay holds.

    The rule is ">= 1 GB of KV per replay or at least 8 layers": enough distinct caches that a
    replay cannot be served from the 50 MB L2, and never fewer than 8 layers. We take
    ``max(min_layers, ceil(min_replay_bytes / layer_read_bytes))``, then cap it by memory:
    ``budget_bytes // layer_alloc_bytes``. So B 1, L 1k (4 MB a layer) gets 239 layers, a layer of >= 1 GB
    gets 8, and a cell whose 8 layers do not fit (B 64, L 128k: 34 GB a layer) gets as many as fit.
    Returns 0 when not even one layer fits (the caller skips the cell).

    Parameters
    ----------
    layer_read_bytes : int
        KV bytes one layer's call reads (filled length).
    layer_alloc_bytes : int, optional
        Bytes one layer allocates (capacity); defaults to ``layer_read_bytes``.
    budget_bytes : int, optional
        Device memory available for the caches; no cap when None.
    """
    if layer_read_bytes < 1:
        raise ValueError(f"layer_read_bytes must be >= 1, got {layer_read_bytes}")
    wanted = max(min_layers, math.ceil(min_replay_bytes / layer_read_bytes))
    if budget_bytes is None:
        return wanted
    alloc = layer_read_bytes if layer_alloc_bytes is None else layer_alloc_bytes
    return max(0, min(wanted, budget_bytes // max(1, alloc)))


# ---- GPU measures ----


def copy_bandwidth(
    device: torch.device | str | int | None = None, *, nbytes: int = 1 << 30, reps: int = 20
) -> float:
    """Device-to-device copy bandwidth in GB/s (GB = 1e9), counting bytes read + written.

    Copies a ``nbytes`` buffer into another ``reps`` times, each timed with CUDA events after two
    warm-up copies, and returns ``2 * nbytes / median time``. This is the floor's denominator: no
    kernel that reads the KV cache once can beat it.
    """
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    with torch.cuda.device(dev):
        times = call_times_us(functools.partial(dst.copy_, src), reps)
    del src, dst
    return 2 * nbytes / (statistics.median(times) * 1e-6) / 1e9


def call_times_us(fn: Callable[[], object], reps: int, *, warmup: int = 2) -> list[float]:
    """GPU time of each of ``reps`` back-to-back calls of ``fn`` (CUDA events), µs, after ``warmup``
    untimed calls. For calls that move ``>= 1 GB``, where L2 cannot hold what the next call reads."""
    for _ in range(warmup):
        fn()
    return _time_events([fn] * reps)


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(index: int) -> torch.cuda.Stream:
    """One warm-up stream per device for :func:`capture_graph`: eager fused-merge calls keep a scratch
    pair per stream they ran on (``launcher.FUSED_SCRATCH``), so a new stream per capture would leave
    one behind each time (up to torch's pool of streams)."""
    found = _SIDE_STREAMS.get(index)
    if found is None:
        found = _SIDE_STREAMS.setdefault(index, torch.cuda.Stream(index))
    return found


def capture_graph(steps: Sequence[Callable[[], object]], *, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """Run ``steps`` ``warmup`` times on a side stream, then capture them, in order, in one CUDA graph.

    Warm-up compiles kernels, builds cuDNN graphs and lets plans allocate their scratch before the
    capture (``run`` must not allocate or sync once captured). ``torch.cuda.graph`` captures on its own
    side stream.
    """
    side = _side_stream(torch.cuda.current_device())
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            for step in steps:
                step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for step in steps:
            step()
    torch.cuda.synchronize()
    return graph


def time_replays_us(graph: torch.cuda.CUDAGraph, replays: int = STEADY_REPLAYS) -> list[float]:
    """GPU time of each of ``replays`` back-to-back replays of ``graph`` (CUDA events), in µs.

    One untimed replay goes first (the first replay of a graph uploads it).
    """
    graph.replay()
    return _time_events([graph.replay] * replays)


def steady_state_us(
    make_step: Callable[[int], Callable[[], object]],
    n_layers: int,
    *,
    replays: int = STEADY_REPLAYS,
    warmup: int = 3,
) -> float:
    """Steady-state time per layer, in µs: the benchmark's and the tuner's measure.

    ``make_step(layer)`` returns a zero-argument callable that launches layer ``layer``'s attention on
    that layer's own cache (and writes a preallocated output). All ``n_layers`` calls are captured in
    one CUDA graph (:func:`capture_graph`); the result is the median of ``replays`` replays, each
    timed with CUDA events, divided by ``n_layers``. Choose ``n_layers`` with
    :func:`steady_state_layers`.

    Examples
    --------
    >>> step = lambda i: lambda: plan.run(q[i], k[i], v[i], lens, out=o[i])  # doctest: +SKIP
    >>> us = steady_state_us(step, 8)  # doctest: +SKIP
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    steps = [make_step(i) for i in range(n_layers)]
    graph = capture_graph(steps, warmup=warmup)
    try:
        return statistics.median(time_replays_us(graph, replays)) / n_layers
    finally:
        del graph


def free_device_bytes(device: torch.device, reserve_bytes: int = RESERVE_BYTES) -> int:
    """Bytes the caches of one measurement may take on ``device``: free memory minus ``reserve_bytes``
    (a CPU device, for tests through the interpreter, has :data:`CPU_BUDGET_BYTES`)."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else CPU_BUDGET_BYTES
    return max(0, free - reserve_bytes)


def layers_that_fit(
    layer_read_bytes: int,
    device: torch.device,
    *,
    layer_alloc_bytes: int | None = None,
    reserve_bytes: int = RESERVE_BYTES,
) -> int:
    """:func:`steady_state_layers` capped by :func:`free_device_bytes` (0: not even one layer fits)."""
    budget = free_device_bytes(device, reserve_bytes)
    return steady_state_layers(layer_read_bytes, layer_alloc_bytes=layer_alloc_bytes, budget_bytes=budget)


Layer = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Launch = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], object]


class LayerStack(Sequence[Layer]):
    """N layers of one decode shape, each with its own random ``(q, k_cache, v_cache)`` and output.

    The steady-state harness: distinct caches, so a replay cannot be served from L2, timed by
    :meth:`steady_us` in one CUDA graph. A sequence of ``(q, k, v)``; ``outs[i]`` is layer ``i``'s
    preallocated output (``empty_like(q)``). Shapes: q ``[B, H_q, T_q, D]``, caches
    ``[B, H_kv, capacity, D]``, contiguous BHSD, standard normal.
    """

    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers
        self.outs = [torch.empty_like(q) for q, _, _ in layers]

    @classmethod
    def random(
        cls,
        n_layers: int,
        q_shape: tuple[int, int, int, int],
        kv_shape: tuple[int, int, int, int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> LayerStack:
        def randn(shape):
            return torch.randn(shape, dtype=dtype, device=device)

        return cls([(randn(q_shape), randn(kv_shape), randn(kv_shape)) for _ in range(n_layers)])

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i):  # an int gives one (q, k, v); a slice, a list of them
        return self.layers[i]

    def step(self, i: int, launch: Launch) -> Callable[[], object]:
        """A zero-argument call of ``launch(q, k, v, out)`` on layer ``i``."""
        (q, k, v), out = self.layers[i], self.outs[i]
        return lambda: launch(q, k, v, out)

    def steady_us(self, launch: Launch, *, replays: int = STEADY_REPLAYS, warmup: int = 3) -> float:
        """:func:`steady_state_us` of ``launch(q, k, v, out)`` over every layer: µs per layer."""
        return steady_state_us(lambda i: self.step(i, launch), len(self), replays=replays, warmup=warmup)

    def close(self) -> None:
        """Drop the tensors (and give the cached blocks back to the device)."""
        self.layers, self.outs = [], []
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def isolated_us(fn: Callable[[], object], *, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of one eager call in µs by ``triton.testing.do_bench`` (L2 flushed before each)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")) * 1e3


def host_overhead_us(fn: Callable[[], object], n: int = 1000, *, warmup: int = 20) -> float:
    """Wall-clock µs per call of ``n`` back-to-back calls of ``fn`` followed by one sync.

    On a tiny problem the GPU finishes each call before the host issues the next, so this is the host
    cost of a call (argument checks, planning or plan lookup, launch). Syncs only when CUDA is present,
    so plain host functions can be timed too.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - start) / n * 1e6


def _time_events(calls: Sequence[Callable[[], object]]) -> list[float]:
    """Run ``calls`` back to back on the current stream, each between two CUDA events; µs each."""
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in calls]
    for call, (start, end) in zip(calls, pairs):
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) * 1e3 for start, end in pairs]
