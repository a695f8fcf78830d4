"""Timing one tuning point on the GPU: Triton configurations and cuDNN, steady state.

Measure: :meth:`kvdecode.timing.LayerStack.steady_us` (N layers with distinct caches in one CUDA graph, N
from :func:`~kvdecode.timing.layers_that_fit`), the benchmark's harness and number. The search uses a
cheaper proxy of the same measure: ``search_replays`` (default 10) replays instead of 20. The winner,
the heuristic default and cuDNN are then measured again with the full 20 replays, interleaved, and the
table records those numbers; a winner that is not faster than the default there is replaced by the
default, so a tuned configuration is never slower than the default at the points it was measured. A
winner is first checked against float32 math within :data:`kvdecode.reference.TOLERANCES`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace

import torch

from ..errors import KVDecodeError
from ..problem import DecodeProblem
from ..reference import float32_reference_rows, within_tolerance
from ..timing import RESERVE_BYTES, STEADY_REPLAYS, LayerStack, layers_that_fit
from ..triton_kernels.config import (
    SplitKVConfig,
    heuristic_config,
    packing_options,
    programs_per_split,
    tile_shape,
)
from .search import search, wave_splits
from .spec import Point, family_mask

__all__ = ["RESERVE_BYTES", "PointBench", "SkipPoint", "config_dict", "tune_point"]


class SkipPoint(Exception):
    """The point cannot be measured here (memory); the message says why."""


def _captured_form(cfg: SplitKVConfig) -> SplitKVConfig:
    """``cfg`` in the form its captured calls take (the table times captured calls), eagerly too: the
    warm-ups and the check then run that form, not the fused merge the default gives eager calls."""
    return replace(cfg, fused_merge=False) if cfg.fused_merge is None else cfg


def config_dict(cfg: SplitKVConfig) -> dict:
    """The table's record of ``cfg`` (``heads_per_cta`` only when packed: older readers know the rest; the
    merge's form is not tuned)."""
    fields = asdict(cfg)
    del fields["use_pdl"]
    for name, default in (("heads_per_cta", 1), ("fused_merge", None), ("mask_check", None)):
        if fields[name] == default:
            del fields[name]
    return fields


class PointBench:
    """N layers of random caches for one point (a :class:`~kvdecode.timing.LayerStack`), and
    steady-state timers over them."""

    def __init__(self, point: Point, device: torch.device, *, reserve_bytes: int = RESERVE_BYTES) -> None:
        f = point.family
        nbytes = point.kv_bytes()
        self.n_layers = layers_that_fit(nbytes, device, reserve_bytes=reserve_bytes)
        if self.n_layers == 0:
            raise SkipPoint(f"one layer ({nbytes / 1e9:.1f} GB of KV) does not fit in free device memory")
        kv_shape = (point.batch, f.num_kv_heads, point.length, f.head_dim)
        q_shape = (point.batch, f.num_q_heads, f.q_len, f.head_dim)
        self.layers = LayerStack.random(self.n_layers, q_shape, kv_shape, f.dtype, device)
        self.seq_lens = torch.full((point.batch,), point.length, dtype=torch.int32, device=device)
        self.mask, self.kv_start = family_mask(f, point.batch, point.length, device)  # (None: no mask)
        q, k, v = self.layers[0]
        self.problem = DecodeProblem.from_tensors(
            q, k, v, self.seq_lens, kv_start=self.kv_start, mask=self.mask
        )

    @property
    def outs(self) -> list[torch.Tensor]:
        return self.layers.outs

    def _time(self, launch, replays: int) -> float:
        lens, starts, mask = self.seq_lens, self.kv_start, self.mask
        return self.layers.steady_us(
            lambda q, k, v, o: launch(q, k, v, lens, starts, mask, o, None), replays=replays
        )

    def triton_us(self, cfg: SplitKVConfig, replays: int) -> float:
        """Steady-state µs per layer of ``cfg``; ``math.inf`` if it does not compile or launch."""
        from ..triton_kernels import TritonBackend

        try:
            launcher = TritonBackend().make_launcher(self.problem, config=_captured_form(cfg))
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

    def check(self, cfg: SplitKVConfig) -> tuple[bool, float]:
        """``(within the dtype's tolerance, relative L2 error)`` of ``cfg``'s output (NaN-poisoned first)
        on the first and last row, against :func:`kvdecode.reference.float32_reference_rows`."""
        from ..triton_kernels import TritonBackend

        q, k, v = self.layers[0]
        out = self.outs[0].fill_(float("nan"))
        launcher = TritonBackend().make_launcher(self.problem, config=_captured_form(cfg))
        launcher(q, k, v, self.seq_lens, self.kv_start, self.mask, out, None)
        rows = sorted({0, q.shape[0] - 1})  # (a masked family's mask hides nothing: the same reference)
        want = float32_reference_rows(q, k, v, self.problem.capacity, rows)
        return within_tolerance(out[rows], want, self.problem.dtype)

    def close(self) -> None:
        self.layers.close()


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
        heads=packing_options(problem),
        wave=wave_splits(sm_count, programs_per_split(problem)),
    )
    note = None
    ok, err = bench.check(best) if best != default else (True, 0.0)
    if not ok:
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
