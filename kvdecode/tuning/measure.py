"""Timing one tuning point on the GPU: Triton configurations and cuDNN, steady state.

Measure: :func:`kvdecode.timing.steady_state_us` (N layers with distinct caches in one CUDA graph, N
from :func:`~kvdecode.timing.steady_state_layers`), the number DESIGN.md judges by. The search uses a
cheaper proxy of the same measure: ``search_replays`` (default 10) replays instead of 20. The winner,
the heuristic default and cuDNN are then measured again with the full 20 replays, interleaved, and the
table records those numbers; a winner that is not faster than the default there is replaced by the
default, so a tuned configuration is never slower than the default at the points it was measured.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch

from ..errors import KVDecodeError
from ..problem import DecodeProblem
from ..reference import relative_l2_error
from ..timing import STEADY_REPLAYS, steady_state_layers, steady_state_us
from ..triton_kernels.config import SplitKVConfig, heuristic_config, tile_shape
from .search import search
from .spec import Point

__all__ = ["PointBench", "SkipPoint", "config_dict", "tune_point"]

TOLERANCE = {torch.bfloat16: 4e-3, torch.float16: 1e-3}
RESERVE_BYTES = 4 * 10**9  # kept free for scratch, workspaces and graph pools
CPU_BUDGET = 8 * 10**9  # a CPU "device" (the interpreter, for tests of the plumbing)


class SkipPoint(Exception):
    """The point cannot be measured here (memory); the message says why."""


def config_dict(cfg: SplitKVConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k != "use_pdl"}


class PointBench:
    """N layers of random caches for one point, and steady-state timers over them."""

    def __init__(self, point: Point, device: torch.device, *, reserve_bytes: int = RESERVE_BYTES) -> None:
        f = point.family
        nbytes = point.kv_bytes()
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else CPU_BUDGET
        self.n_layers = steady_state_layers(nbytes, budget_bytes=max(0, free - reserve_bytes))
        if self.n_layers == 0:
            raise SkipPoint(f"one layer ({nbytes / 1e9:.1f} GB of KV) does not fit in free device memory")
        kv_shape = (point.batch, f.num_kv_heads, point.length, f.head_dim)
        q_shape = (point.batch, f.num_q_heads, f.q_len, f.head_dim)
        self.layers = [
            tuple(torch.randn(s, dtype=f.dtype, device=device) for s in (q_shape, kv_shape, kv_shape))
            for _ in range(self.n_layers)
        ]
        self.outs = [torch.empty_like(q) for q, _, _ in self.layers]
        self.seq_lens = torch.full((point.batch,), point.length, dtype=torch.int32, device=device)
        q, k, v = self.layers[0]
        self.problem = DecodeProblem.from_tensors(q, k, v, self.seq_lens)

    def _time(self, launch, replays: int) -> float:
        def make_step(i: int):
            (q, k, v), o = self.layers[i], self.outs[i]
            return lambda: launch(q, k, v, self.seq_lens, None, None, o, None)

        return steady_state_us(make_step, self.n_layers, replays=replays)

    def triton_us(self, cfg: SplitKVConfig, replays: int) -> float:
        """Steady-state µs per layer of ``cfg``; ``math.inf`` if it does not compile or launch."""
        from ..triton_kernels import TritonBackend

        try:
            launcher = TritonBackend().make_launcher(self.problem, config=cfg)
            return self._time(launcher, replays)
        except Exception as exc:  # out of resources, compile errors: skip this configuration
            if "illegal" in str(exc).lower() or isinstance(exc, torch.cuda.OutOfMemoryError):
                raise  # a broken CUDA context: nothing after this can be trusted
            return math.inf

    def cudnn_us(self, replays: int) -> tuple[float | None, str | None]:
        """``(µs, None)``, or ``(None, why cuDNN is not measured)``."""
        from ..backends import backend_names, get_backend

        if "cudnn" not in backend_names():
            return None, "the cuDNN backend is not available in this installation"
        backend = get_backend("cudnn")
        reason = backend.supports(self.problem)
        if reason is not None:
            return None, reason
        try:
            launcher = backend.make_launcher(self.problem)
        except KVDecodeError as exc:
            return None, str(exc)
        return self._time(launcher, replays), None

    def check(self, cfg: SplitKVConfig) -> float:
        """Relative L2 error of ``cfg``'s output (NaN-poisoned first) on the first and last row."""
        from ..triton_kernels import TritonBackend

        q, k, v = self.layers[0]
        out = self.outs[0].fill_(float("nan"))
        launcher = TritonBackend().make_launcher(self.problem, config=cfg)
        launcher(q, k, v, self.seq_lens, None, None, out, None)
        rows = sorted({0, q.shape[0] - 1})
        got = out[rows].double()
        want = torch.stack([_fp32_row(q[b], k[b], v[b]) for b in rows])
        return relative_l2_error(got.cpu(), want.cpu()) if torch.isfinite(got).all() else math.inf

    def close(self) -> None:
        self.layers, self.outs = [], []
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _fp32_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v of one row in float32, the T_q queries bottom-right aligned."""
    hq, tq, d = q.shape
    hkv, length = k.shape[0], k.shape[1]
    qg = q.float().reshape(hkv, (hq // hkv) * tq, d)
    s = qg @ k.float().transpose(-1, -2) / math.sqrt(d)
    pos = torch.arange(tq, device=q.device).repeat(hq // hkv) + length - tq
    s = s.masked_fill(torch.arange(length, device=q.device)[None, None, :] > pos[None, :, None], -math.inf)
    return (torch.softmax(s, -1) @ v.float()).reshape(hq, tq, d).double()


def tune_point(bench: PointBench, *, sm_count: int, coarse: bool, search_replays: int) -> dict:
    """Search, check and measure one point; returns its record for the table."""
    problem = bench.problem
    default = heuristic_config(problem, sm_count)
    best, _, searched = search(
        default,
        problem.capacity,
        tile_shape(problem)[1],
        lambda cfg: bench.triton_us(cfg, search_replays),
        coarse=coarse,
    )
    note = None
    err = bench.check(best) if best != default else 0.0
    if not err <= TOLERANCE[problem.dtype]:
        note = f"{best.name} failed the check (relative L2 {err:.2e}); the default is kept"
        best = default
    cudnn_us, cudnn_reason = bench.cudnn_us(STEADY_REPLAYS)
    default_us = bench.triton_us(default, STEADY_REPLAYS)
    best_us = bench.triton_us(best, STEADY_REPLAYS) if best != default else default_us
    if cudnn_us is not None:  # measured again after Triton, to even out drift between them
        cudnn_us = min(cudnn_us, bench.cudnn_us(STEADY_REPLAYS)[0] or math.inf)
    if not best_us < default_us:
        best, best_us = default, default_us
    record = {
        "config": config_dict(best),
        "triton_us": round(best_us, 3),
        "default_us": round(default_us, 3),
        "default_config": config_dict(default),
        "cudnn_us": None if cudnn_us is None else round(cudnn_us, 3),
        "searched": searched,
        "n_layers": bench.n_layers,
    }
    if cudnn_reason:
        record["cudnn_reason"] = cudnn_reason
    if note:
        record["note"] = note
    return record
