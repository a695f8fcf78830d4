"""The cuDNN backend: ``supports(problem)`` and a launcher that executes one graph per capacity.

The launcher is made once per plan: it looks its graph up in the shared cache (building or loading it
from disk on a miss), sizes the workspace and allocates the constant ``seq_len_q`` tensor. A call then
only binds the current stream to the thread's handle (when it changed) and executes by variant pack:
no host sync, no allocation in the common case, capturable in a CUDA graph.
"""

from __future__ import annotations

import logging
import threading

import torch

from ..errors import KVDecodeError, UnsupportedError
from ..problem import DecodeProblem, capturing
from .builder import UID_K, UID_O, UID_Q, UID_SEQ_KV, UID_SEQ_Q, UID_STATS, UID_V, BuiltGraph
from .cache import GraphCache
from .cuda_env import current_stream, device_props, handle_for, load_cudnn
from .key import GraphKey
from .store import default_graph_cache

__all__ = ["CudnnBackend", "CudnnLauncher"]

log = logging.getLogger("kvdecode.cudnn_graphs")

MAX_HEAD_DIM = 256
MIN_SM = 80  # cuDNN's fused flash attention starts at Ampere
ALIGN_ELEMS = 8  # 16-byte rows for fp16/bf16
MAX_BATCH = 65535  # conservative: a grid's y/z dimensions hold at most 65535 blocks


def problem_reason(problem: DecodeProblem) -> str | None:
    """Why cuDNN cannot serve ``problem`` judging from the problem alone (no library, no device query)."""
    if problem.kv_dtype is not None:
        return (
            f"the caches are {problem.kv_dtype} (fp8) and q is {problem.dtype}: cuDNN's fp8 attention "
            "(sdpa_fp8) takes q, K and V all in fp8, so it cannot serve fp16/bf16 queries; the Triton kernel "
            "serves fp8 caches"
        )
    if problem.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {problem.dtype} is not supported by cuDNN SDPA (float16 and bfloat16 are)"
    d = problem.head_dim
    if d % 8 != 0 or d > MAX_HEAD_DIM:
        return f"head_dim {d} must be a multiple of 8 and <= {MAX_HEAD_DIM} for cuDNN"
    if problem.mask_kind != "none":
        return f"a {problem.mask_kind} mask is given; the cuDNN graph takes lengths only"
    if problem.has_kv_start:
        return "kv_start (left padding) is given; cuDNN's padding mask covers right padding only"
    if problem.has_sinks:
        return "attention sinks are given; the capacity graph has no sink term"
    if problem.softcap is not None:
        return "a logit softcap is given; the capacity graph applies none"
    if problem.window is not None:
        return "a sliding window is given; the capacity graph has no band mask (Triton skips the tiles)"
    if problem.device.type != "cuda":
        return f"the tensors are on {problem.device}; cuDNN needs a CUDA device"
    if problem.batch > MAX_BATCH:
        return f"batch {problem.batch} exceeds {MAX_BATCH} (a CUDA grid dimension); split the batch"
    if not problem.aligned_16:
        return "q, k_cache or v_cache does not start on a 16-byte boundary; cuDNN needs aligned tensors"
    for name, strides in (
        ("q", problem.q_strides),
        ("k_cache", problem.k_strides),
        ("v_cache", problem.v_strides),
    ):
        if any(s % ALIGN_ELEMS for s in strides[:3]):
            return f"{name} strides {strides} must be multiples of {ALIGN_ELEMS} (16-byte rows) for cuDNN"
    return None


# Measured on the H200 with cuDNN 9.19 / frontend 1.32 (bench/cudnn_lse_repeat.py, results in
# bench/results/h200-2026-12-04/cudnn-lse-repeat.json): the engine heuristics pick (eng8) carries no
# NONDETERMINISTIC note, so deselecting those engines changes nothing; its Stats (LSE) took 5 to 11
# distinct values over 21 identical calls (1 ulp), whatever the workspace held (fresh, zeroed, 0xFF,
# reused). The bf16 output repeated, but an fp32 sum that varies can round either way.
DETERMINISM_GAP = (
    "deterministic=True: cuDNN 9.19's decode engine is not bitwise repeatable (its LSE varied by 1 ulp "
    "across identical calls on the H200 with nondeterministic engines deselected); the Triton kernel is"
)


class CudnnBackend:
    """cuDNN SDPA graphs built at the cache capacity, lengths through the padding mask."""

    name = "cudnn"
    determinism_gap = DETERMINISM_GAP

    def __init__(self, cache: GraphCache | None = None) -> None:
        self._cache = cache
        self._declined: dict[tuple[DecodeProblem, bool], str] = {}
        self._lock = threading.Lock()

    @property
    def cache(self) -> GraphCache:
        return self._cache if self._cache is not None else default_graph_cache()

    def supports(self, problem: DecodeProblem) -> str | None:
        reason = problem_reason(problem)
        if reason is not None:
            return reason
        _, _, lib_reason = load_cudnn()
        if lib_reason is not None:
            return lib_reason
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
        sm = device_props(_device_index(problem)).sm_version
        if sm < MIN_SM:
            return f"GPU SM version {sm} is below {MIN_SM}; cuDNN fused attention needs Ampere or newer"
        return None

    def make_launcher(self, problem: DecodeProblem, *, deterministic: bool = False) -> CudnnLauncher:
        reason = self.supports(problem) or (DETERMINISM_GAP if deterministic else None)
        reason = reason or self._declined.get((problem, deterministic))
        if reason is not None:
            raise UnsupportedError(f"backend 'cudnn' cannot serve {problem.name}: {reason}")
        if capturing(problem.device):  # not remembered as declined: it can be built after the capture
            raise UnsupportedError(
                f"backend 'cudnn' cannot build the graph of {problem.name} while a CUDA graph is being "
                "captured (its constant tensors would exist only in the capture); run the call once "
                "before capturing"
            )
        try:
            return CudnnLauncher(problem, deterministic=deterministic, cache=self.cache)
        except UnsupportedError as exc:
            with self._lock:  # remembered per (problem, determinism): a failed build is not retried
                self._declined[(problem, deterministic)] = str(exc)
            raise


def _device_index(problem: DecodeProblem) -> int:
    index = problem.device.index
    return torch.cuda.current_device() if index is None else int(index)


class CudnnLauncher:
    """Executes the capacity graph of one problem; ``(q, k, v, seq_lens, kv_start, mask, out, lse)``.

    Both graphs (without and with the LSE, cuDNN's natural-log ``Stats``) are made with the plan, so a
    build failure surfaces while ``auto`` can still fall back, never at run time. The launcher holds
    no per-call state: the workspace and the clamped lengths are allocated per call from torch's
    caching allocator on the current stream (the graph's pool under capture), so threads sharing a
    stream never share scratch. ``out`` and ``lse`` are written in place; a layout other than
    row-major goes through a scratch buffer and a device copy.
    """

    def __init__(self, problem: DecodeProblem, *, deterministic: bool, cache: GraphCache) -> None:
        _, version, _ = load_cudnn()
        self.problem = problem
        self.deterministic = deterministic
        self.device_index = _device_index(problem)
        self.device = torch.device("cuda", self.device_index)
        self._cache = cache
        self._version = int(version or 0)
        self._graphs: dict[bool, BuiltGraph] = {}
        self.workspace_size = 0
        # read-only, so shared by every call
        self._seq_len_q = torch.full(
            (problem.batch, 1, 1, 1), problem.q_len, dtype=torch.int32, device=self.device
        )
        self.prepare(lse=False)
        self.prepare(lse=True)

    def key(self, *, lse: bool) -> GraphKey:
        return GraphKey.from_problem(
            self.problem,
            deterministic=self.deterministic,
            with_lse=lse,
            cudnn_version=self._version,
            device_index=self.device_index,
        )

    def prepare(self, *, lse: bool) -> BuiltGraph:
        """Get (build, load or look up) the graph with or without LSE output and size the workspace."""
        found = self._graphs.get(lse)
        if found is not None:
            return found
        import cudnn

        try:
            built = self._cache.get(self.key(lse=lse))
        except cudnn.cudnnGraphNotSupportedError as exc:
            raise UnsupportedError(f"backend 'cudnn' cannot serve {self.problem.name}: {exc}") from exc
        self.workspace_size = max(self.workspace_size, int(built.workspace_size))
        self._graphs[lse] = built
        return built

    def __call__(
        self, q, k_cache, v_cache, seq_lens, kv_start, mask, out, lse, scales=None, sinks=None
    ) -> None:
        if kv_start is not None or mask is not None or scales is not None or sinks is not None:
            raise UnsupportedError(
                "backend 'cudnn' takes no kv_start, mask, k/v scales or sinks; plan with another backend"
            )
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
            if t.data_ptr() % 16:
                raise KVDecodeError(
                    f"{name}.data_ptr() must be 16-byte aligned for cuDNN, got {t.data_ptr():#x}; "
                    "pass an aligned tensor or use backend='triton'"
                )
        if torch.cuda.current_device() == self.device_index:
            self._execute(q, k_cache, v_cache, seq_lens, out, lse)
        else:  # a cuDNN handle is tied to the device current at its creation: execute there
            with torch.cuda.device(self.device_index):
                self._execute(q, k_cache, v_cache, seq_lens, out, lse)

    def _execute(self, q, k_cache, v_cache, seq_lens, out, lse) -> None:
        p = self.problem
        built = self._graphs[lse is not None]
        key = built.key
        # outputs cuDNN cannot write in place (another layout, or not 16-byte aligned) go through scratch
        direct = tuple(out.stride()) == key.o_strides and out.data_ptr() % 16 == 0
        o = out if direct else torch.empty(q.shape, dtype=q.dtype, device=q.device)
        # lengths clamped into 0..capacity on the device (one tiny capturable kernel) so that, as with the
        # Triton kernel, no length ever points cuDNN past the cache; a fresh tensor per call
        seq_len_kv = torch.clamp(seq_lens.view(p.batch, 1, 1, 1), 0, p.capacity)
        pack = {UID_Q: q, UID_K: k_cache, UID_V: v_cache, UID_O: o, UID_SEQ_Q: self._seq_len_q}
        pack[UID_SEQ_KV] = seq_len_kv
        stats = None
        if lse is not None:
            shape = (p.batch, p.num_q_heads, p.q_len, 1)
            contiguous = tuple(lse.stride()) == key.stats_strides[:3] and lse.data_ptr() % 16 == 0
            stats = (
                lse.view(shape) if contiguous else torch.empty(shape, dtype=torch.float32, device=q.device)
            )
            pack[UID_STATS] = stats
        workspace = (
            torch.empty(self.workspace_size, dtype=torch.uint8, device=self.device)
            if self.workspace_size
            else None
        )
        handle = handle_for(self.device_index, current_stream(self.device_index))
        built.graph.execute(pack, workspace, handle=handle)
        if o is not out:
            out.copy_(o)
        if stats is not None and lse is not None and stats.data_ptr() != lse.data_ptr():
            lse.copy_(stats.view(lse.shape))
