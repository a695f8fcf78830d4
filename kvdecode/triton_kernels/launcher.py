"""Host side of the split-KV kernel: configuration, scratch, and the launch (no host sync)."""

from __future__ import annotations

import functools
import operator
import threading

import torch
import triton

from .._interpret import interpreter_problem
from ..backends import Launcher
from ..errors import KVDecodeError
from ..problem import DecodeProblem
from .bound import BoundKernel, raw_stream
from .config import (
    LOG2E_CONST,
    MAX_SPLITS,
    SplitKVConfig,
    check_heads_per_cta,
    default_config,
    interpreter_active,
    row_tiles,
    tile_shape,
)
from .split_kv import merge_kernel, split_kv_kernel

__all__ = ["FUSED_SCRATCH", "SplitKVLauncher", "TritonBackend"]

_MASK_KIND = {"none": 0, "bool": 1, "additive": 2}
_SCALE_KIND = {"none": 0, "scalar": 1, "per_head": 2}
# fp8 tiles become q's dtype, or fp16 (through tl casts, or with V in PTX: the GPU default; see split_kv)
_FP8_COMPUTE = {"q": 1, "fp16": 2, "fp16-ptx": 3}


def _mask_kind(p: DecodeProblem) -> int:
    """The kernel's ``MASK_KIND``: a bool mask whose one row of keys serves every query row of a batch row
    (broadcast over the heads, and over the tokens or one token: a transformers step's ``[B, 1, 1, L]``)
    is loaded once per tile, not once per row (3)."""
    kind = _MASK_KIND[p.mask_kind]
    if kind == 1:
        _, s_h, s_t, _ = p.mask_strides
        if (s_h == 0 or p.num_q_heads == 1) and (s_t == 0 or p.q_len == 1):
            return 3
    return kind


def _pdl_available(device: torch.device) -> bool:
    if device.type != "cuda" or interpreter_active():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def _default_fp8_compute() -> str:
    return "fp16" if interpreter_active() else "fp16-ptx"  # the interpreter runs no inline PTX


class FusedScratch:
    """The fused merge's scratch for eager calls: per (device, stream), one float32 buffer of partials and
    one int32 buffer of finished-split counters (zeros), shared by every launcher and grown as calls
    need. Calls on one stream run one after another (with PDL a kernel touches nothing before
    ``griddepcontrol.wait``, which waits for its predecessor's end), and every call leaves the counters
    it used at zero (the last split of a row zeroes its counter), so the next call on that stream, of
    any launcher, finds them so. A buffer outgrown is dropped: torch's allocator frees it in the order
    of its stream, after the calls already queued there. At most 64 (device, stream) pairs are held
    (streams come and go): past that the oldest are forgotten the same way.

    The buffers are allocated on the caller's stream by a short-lived thread of their own: torch routes a
    thread's allocations to a CUDA graph's private pool while ``torch.compile(mode="reduce-overhead")``
    warms a graph up (running the op eagerly) or captures it, and ``torch.cuda.use_mem_pool`` does the
    same, and a shared buffer made there could be handed to the graph's own tensors when the pool is
    checkpointed. That routing is per thread (torch 2.11 and later): another thread's allocations go to
    the ordinary pool, in the order of the stream it names. (A routing keyed on the stream instead would
    not be escaped this way.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # for changes; a lookup reads the dict as it is (atomic in CPython)
        # (device index, raw stream) -> (partials, counters, their sizes)
        self._buffers: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, int, int]] = {}

    def get(self, device: torch.device, stream: int, part_elems: int, counters: int):
        """``(partials, counters)`` with at least ``part_elems`` floats and ``counters`` zeros."""
        key = (device.index if device.index is not None else -1, stream)
        found = self._buffers.get(key)
        if found is None or found[2] < part_elems or found[3] < counters:
            with self._lock:
                found = self._buffers.get(key)
                if found is None or found[2] < part_elems or found[3] < counters:
                    size = max(part_elems, 0 if found is None else found[2])
                    count = max(counters, 0 if found is None else found[3])
                    if found is None and len(self._buffers) >= 64:
                        del self._buffers[next(iter(self._buffers))]
                    part, zeros = _outside_graph_pools(
                        key[0],
                        lambda: (
                            torch.empty(size, dtype=torch.float32, device=device),
                            torch.zeros(count, dtype=torch.int32, device=device),
                        ),
                    )
                    found = self._buffers[key] = (part, zeros, size, count)
        return found[0], found[1]

    def buffers(self) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
        """A copy of what is held, by (device index, raw stream): for tests."""
        with self._lock:
            return {key: found[:2] for key, found in self._buffers.items()}

    def clear(self) -> None:
        with self._lock:
            self._buffers.clear()


def _outside_graph_pools(device_index: int, make):
    """``make()`` run on another thread with this thread's current CUDA device and stream (directly off
    CUDA): its allocations go to torch's ordinary pool, never to a CUDA graph's private pool that this
    thread's allocations may be routed to (see :class:`FusedScratch`). Exceptions propagate."""
    if device_index < 0:
        return make()
    stream = torch.cuda.current_stream(device_index)
    result: list = []

    def run() -> None:
        try:
            with torch.cuda.device(device_index), torch.cuda.stream(stream):
                result.append((True, make()))
        except BaseException as exc:  # handed to the caller
            result.append((False, exc))

    worker = threading.Thread(target=run, name="kvdecode-fused-scratch", daemon=True)
    worker.start()
    worker.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


FUSED_SCRATCH = FusedScratch()

MERGE_BUCKETS = (4, 16, 64, MAX_SPLITS)  # compile-time split capacities of the merge (one variant each)
GRID_Y_MAX = 65535  # CUDA's limit on grid dimensions y and z


def merge_bucket(num_splits: int) -> int:
    """The merge variant serving ``num_splits``: the smallest bucket that holds it (splits are padded
    with masked lanes), so a family meets at most ``len(MERGE_BUCKETS)`` merge kernels."""
    for bucket in MERGE_BUCKETS:
        if num_splits <= bucket:
            return bucket
    raise ValueError(f"num_splits {num_splits} exceeds the largest merge bucket {MERGE_BUCKETS[-1]}")


# whether the current CUDA stream is capturing, without torch.cuda's Python wrapper (a per-call query)
_stream_capturing = (
    getattr(torch._C, "_cuda_isCurrentStreamCapturing", None) or torch.cuda.is_current_stream_capturing
)


def _spec(write_lse: bool, o_strides, lse_strides, ptrs: list[int]) -> tuple:
    """What a launch's compiled kernel depends on beyond the launcher's constants. Triton specializes on
    each pointer's 16-byte alignment: one flag when all are aligned (the common case), else one per
    pointer (the partials' never change within a plan: allocator blocks at a fixed offset)."""
    flags = True if not (functools.reduce(operator.or_, ptrs) & 15) else tuple(p % 16 == 0 for p in ptrs)
    return (write_lse, o_strides, lse_strides, flags)


class SplitKVLauncher:
    """Launches the split kernel (and the merge kernel when ``num_splits > 1``) for one problem.

    Made once per plan: it fixes the grid and every constant argument (:class:`BoundKernel`), so a call
    passes only the tensors' pointers and launches the compiled kernels directly. The split count is a
    run-time argument: plans of one family share compiled kernels whatever their batch and capacity.

    It holds no per-call state. With several splits, an eager call (by default, see
    ``SplitKVConfig.fused_merge``) is one kernel whose fp32 partials (``[B * H_kv, M, num_splits, D]`` and
    their LSEs) and finished-split counters are the stream's (:class:`FusedScratch`); a call under
    CUDA-graph capture allocates its own partials from torch's caching allocator (the graph's private
    pool) and merges them in a kernel of its own. Either way one plan may serve any number of threads
    and streams at once. Both forms sum the splits in a fixed order, so each is bitwise reproducible;
    the two differ from each other in rounding (a deterministic plan uses one form for both).

    ``fp8_compute`` (fp8 caches only, a development switch): ``"fp16-ptx"`` (the default on a GPU) runs the
    dots in fp16 with V converted in inline PTX where it is loaded, ``"fp16"`` (the interpreter's default)
    converts with Triton casts, ``"q"`` converts to q's dtype; all three are exact (see ``split_kv``).
    """

    def __init__(
        self,
        problem: DecodeProblem,
        config: SplitKVConfig | None = None,
        *,
        deterministic: bool = False,
        fp8_compute: str | None = None,
    ) -> None:
        if fp8_compute is not None and fp8_compute not in _FP8_COMPUTE:
            raise KVDecodeError(
                f"fp8_compute must be one of {list(_FP8_COMPUTE)} or None, got {fp8_compute!r}"
            )
        if fp8_compute == "fp16-ptx" and interpreter_active():
            raise KVDecodeError("fp8_compute='fp16-ptx' needs a GPU (the interpreter runs no inline PTX)")
        self.problem = p = problem
        self.config = cfg = config or default_config(problem)
        heads = cfg.heads_per_cta
        why = check_heads_per_cta(problem, heads)
        if why is not None:
            raise KVDecodeError(f"config {cfg.name}: {why}; use heads_per_cta=1 (or a divisor that fits)")
        block_m, block_d = tile_shape(problem, heads)
        rows = p.group_size * p.q_len
        self.use_pdl = _pdl_available(p.device) if cfg.use_pdl is None else cfg.use_pdl
        if self.use_pdl and not _pdl_available(p.device):
            self.use_pdl = False
        self.num_splits = splits = cfg.num_splits
        self.split_grid = (splits, p.batch * p.num_kv_heads // heads, triton.cdiv(rows * heads, block_m))
        self.merge_grid = (p.batch * p.num_kv_heads * rows, 1, 1)
        interp_bf16 = (
            interpreter_active() and p.dtype == torch.bfloat16
        )  # Triton 3.9 interpreter: bf16 tl.dot reads raw bits and fp32->bf16 truncates
        common = [p.num_kv_heads, p.group_size, p.q_len, p.head_dim]  # H_KV, GROUP, T_Q, HEAD_DIM
        self.mask_kind = _mask_kind(p)  # the kernel's MASK_KIND
        self._mask_strides = list(p.mask_strides or (0, 0, 0, 0))
        self._split_tail = [
            p.scale * LOG2E_CONST, p.capacity, p.window or 0, p.softcap or 1.0, splits, splits == 1, *common,
            block_m, cfg.block_n, block_d, p.has_kv_start, p.window is not None, p.softcap is not None,
            p.has_sinks, self.mask_kind,
        ]  # fmt: skip
        # the last split merges (no merge kernel): eager calls by default, captured ones when asked; one form
        # for a deterministic plan (the two round differently)
        fused = cfg.fused_merge
        self.fused_captured = splits > 1 and fused is True
        self.fused_eager = splits > 1 and (fused is True or (fused is None and not deterministic))
        self.mask_check = self.mask_kind == 3 and (
            cfg.mask_check
            if cfg.mask_check is not None
            else triton.cdiv(row_tiles(p, cfg.block_n), splits) >= 2
        )  # (a program's tiles at full length)
        self._n_counters = self.split_grid[1] * self.split_grid[2]
        # INTERP_BF16, DOT_PRECISION, USE_PDL, KV_FP8, SCALE_KIND, HEADS, FUSED_MERGE, MASK_CHECK
        self._split_end = [
            interp_bf16,
            "ieee",
            self.use_pdl,
            0 if p.kv_dtype is None else _FP8_COMPUTE[fp8_compute or _default_fp8_compute()],
            _SCALE_KIND[p.kv_scale_kind],
            heads,
            False,
            self.mask_check,
        ]
        self._split_end_fused = [*self._split_end[:-2], True, self.mask_check]
        self._q_strides, self._k_strides, self._v_strides = p.q_strides[:3], p.k_strides[:3], p.v_strides[:3]
        self.n_part = p.batch * p.num_kv_heads * rows * splits if splits > 1 else 0
        self._part_elems = self.n_part * (p.head_dim + 1)
        self.device_index = p.device.index if p.device.type == "cuda" and not interpreter_active() else None
        pdl = {"launch_pdl": True} if self.use_pdl else {}
        split_options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl)
        self._split = BoundKernel(split_kv_kernel, "split_kv_kernel", split_options, self.device_index)
        # the same kernel with the fused merge: variants of its own (FUSED_MERGE is a constexpr)
        self._split_fused = BoundKernel(
            split_kv_kernel, "split_kv_kernel_fm", split_options, self.device_index
        )
        bucket = merge_bucket(splits)
        # then WRITE_LSE, INTERP_BF16, USE_PDL
        self._merge_tail = [splits, *common, bucket, block_d, p.has_sinks]
        self._interp_bf16 = interp_bf16
        merge_warps = 4 if bucket * block_d <= 8192 else 8  # [bucket, BLOCK_D] fp32 in registers
        # built whatever the form (a call may ask for the merge kernel: ``fused=False``); compiled only
        # when launched or prepared
        self._merge = BoundKernel(
            merge_kernel, f"merge_kernel_s{bucket}", dict(num_warps=merge_warps, **pdl), self.device_index
        )

    def __call__(
        self, q, k_cache, v_cache, seq_lens, kv_start, mask, out, lse, scales=None, sinks=None, *, fused=None
    ) -> None:
        """Launch for these tensors (checked by the caller). ``fused``: the fused merge or not for this
        call (None: the configuration's form for an eager or a captured call)."""
        index = self.device_index
        if index is not None and torch.cuda.current_device() != index:
            with torch.cuda.device(index):  # tensors on another GPU than the current one
                self._launch(q, k_cache, v_cache, seq_lens, kv_start, mask, out, lse, scales, sinks, fused)
            return
        self._launch(q, k_cache, v_cache, seq_lens, kv_start, mask, out, lse, scales, sinks, fused)

    def _launch(self, q, k_cache, v_cache, seq_lens, kv_start, mask, out, lse, scales, sinks, fused) -> None:
        write_lse = lse is not None
        lens_ptr = seq_lens.data_ptr()  # stands in for every absent tensor: never read then
        capturing = None
        if fused is None:
            fused = self.fused_eager  # (only with several splits)
            if fused != self.fused_captured:  # the forms differ: which one this call takes
                capturing = self._capturing()
                fused = self.fused_captured if capturing else fused
        elif fused:
            fused = self.n_part > 0  # (one split: nothing to merge)
        part = counters = None
        if fused:  # one kernel: its scratch is the stream's in an eager call (see FusedScratch)
            part, counters = self._fused_scratch(q.device, capturing)
        elif self.n_part:  # owned by this call: a merge kernel reads it after the split kernel, and a call
            # from another thread on the same stream may launch between the two
            part = torch.empty(self._part_elems, dtype=torch.float32, device=q.device)
        if part is not None:
            part_ptr = part.data_ptr()
            part_lse_ptr = part_ptr + 4 * self.n_part * self.problem.head_dim
        else:
            part_ptr = part_lse_ptr = lens_ptr  # never read nor written with one split
        lse_strides = lse.stride()[:2] if write_lse else (0, 0)
        o_strides = out.stride()[:3]
        k_scale, v_scale = scales if scales is not None else (None, None)
        ptrs = [
            out.data_ptr(), lse.data_ptr() if write_lse else part_lse_ptr, part_ptr, part_lse_ptr,
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), lens_ptr,
            lens_ptr if kv_start is None else kv_start.data_ptr(),
            lens_ptr if mask is None else mask.data_ptr(),
            lens_ptr if k_scale is None else k_scale.data_ptr(),
            lens_ptr if v_scale is None else v_scale.data_ptr(),
            lens_ptr if sinks is None else sinks.data_ptr(),
            lens_ptr if counters is None else counters.data_ptr(),
        ]  # fmt: skip
        spec = _spec(write_lse, o_strides, lse_strides, ptrs)

        def tensors():  # the same arguments as tensors, for Triton's binder (a new specialization)
            if part is None:
                part_t = part_lse_t = seq_lens
            else:
                part_t, part_lse_t = part, part[self.n_part * self.problem.head_dim :]
            found = (kv_start, mask, k_scale, v_scale, sinks, counters)
            return (out, lse if write_lse else part_lse_t, part_t, part_lse_t, q, k_cache, v_cache, seq_lens,
                    *[seq_lens if t is None else t for t in found])  # fmt: skip

        end = self._split_end_fused if fused else self._split_end
        split = self._split_fused if fused else self._split
        if fused and capturing is False and self.device_index is not None and split.is_new(spec):
            self._prepare_captured_form(ptrs, tensors, seq_lens, o_strides, lse_strides, write_lse)
        split(
            self.split_grid, self._split_args(ptrs, o_strides, lse_strides, write_lse, end), spec,
            lambda: self._split_args(tensors(), o_strides, lse_strides, write_lse, end),
        )  # fmt: skip
        if self.n_part and not fused:
            self._merge(
                self.merge_grid, self._merge_args(ptrs, o_strides, lse_strides, write_lse), spec,
                lambda: self._merge_args(tensors(), o_strides, lse_strides, write_lse),
            )  # fmt: skip

    def _capturing(self) -> bool:
        """Whether this call is being captured in a CUDA graph (the caller made the launcher's device the
        current one; never off the GPU)."""
        return self.device_index is not None and _stream_capturing()

    def _prepare_captured_form(self, ptrs, tensors, seq_lens, o_strides, lse_strides, write_lse) -> None:
        """At the first eager fused call of a launch shape, compile and load the split and merge kernels a
        capture of the same call launches (a module load during capture fails): the same tensors, with
        seq_lens' pointer where the counters' was and the stream's partials standing in for a call's own
        (both allocator blocks: the same alignment)."""
        other = [*ptrs[:13], ptrs[7]]
        spec = _spec(write_lse, o_strides, lse_strides, other)

        def binder():
            return (*tensors()[:13], seq_lens)

        self._split.prepare(
            self.split_grid, spec,
            lambda: self._split_args(binder(), o_strides, lse_strides, write_lse, self._split_end),
        )  # fmt: skip
        self._merge.prepare(
            self.merge_grid, spec, lambda: self._merge_args(binder(), o_strides, lse_strides, write_lse)
        )

    def _fused_scratch(
        self, device: torch.device, capturing: bool | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused merge's partials and counters (zeros, one per program row) for this call: under
        CUDA-graph capture its own (the counters zeroed in the graph, so every replay starts at zero),
        never what an eager call or another graph uses; eager, the stream's (:class:`FusedScratch`).
        A grid that never finishes (a device fault: the CUDA context is lost with it) would leave counts
        behind; nothing else can, since every program of a call counts once and the last one zeroes."""
        if capturing is None:
            capturing = self._capturing()
        if capturing:
            return (
                torch.empty(self._part_elems, dtype=torch.float32, device=device),
                torch.zeros(self._n_counters, dtype=torch.int32, device=device),
            )
        stream = 0 if self.device_index is None else raw_stream(self.device_index)
        return FUSED_SCRATCH.get(device, stream, self._part_elems, self._n_counters)

    def _split_args(self, t, o_strides, lse_strides, write_lse, end) -> list:
        """The split kernel's arguments, ``t`` the call's tensors (or their pointers) in the order of
        ``_launch``'s ``tensors``, ``end`` its last constexprs (``_split_end`` or ``_split_end_fused``)."""
        return [t[0], *o_strides, t[1], *lse_strides, t[2], t[3], t[4], *self._q_strides, t[5],
                *self._k_strides, t[6], *self._v_strides, t[7], t[8], t[9], *self._mask_strides,
                t[10], t[11], t[12], t[13], *self._split_tail, write_lse, *end]  # fmt: skip

    def _merge_args(self, t, o_strides, lse_strides, write_lse) -> list:
        return [t[0], *o_strides, t[1], *lse_strides, t[2], t[3], t[12], *self._merge_tail, write_lse,
                self._interp_bf16, self.use_pdl]  # fmt: skip


class TritonBackend:
    """The Triton split-KV kernel: serves every problem the public contract admits."""

    name = "triton"

    def supports(self, problem: DecodeProblem) -> str | None:
        rows = problem.batch * problem.num_kv_heads
        if rows > GRID_Y_MAX:
            return f"B * H_kv ({rows}) exceeds the {GRID_Y_MAX} programs of a grid's second dimension"
        if problem.device.type != "cuda":
            if not interpreter_active():
                return (
                    f"tensors are on {problem.device} and the Triton interpreter is off "
                    "(TRITON_INTERPRET unset)"
                )
            return interpreter_problem()
        return None

    def make_launcher(
        self, problem: DecodeProblem, *, deterministic: bool = False, config: SplitKVConfig | None = None
    ) -> Launcher:
        return SplitKVLauncher(problem, config, deterministic=deterministic)
