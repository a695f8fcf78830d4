"""Host side of the split-KV kernel: configuration, scratch, and the launch (no host sync)."""

from __future__ import annotations

import torch
import triton

from .._interpret import interpreter_problem
from ..backends import Launcher
from ..problem import DecodeProblem
from .config import LOG2E_CONST, SplitKVConfig, default_config, interpreter_active, tile_shape
from .split_kv import merge_kernel, split_kv_kernel

__all__ = ["SplitKVLauncher", "TritonBackend"]

_MASK_KIND = {"none": 0, "bool": 1, "additive": 2}


def _pdl_available(device: torch.device) -> bool:
    if device.type != "cuda" or interpreter_active():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


class SplitKVLauncher:
    """Launches the split kernel (and the merge kernel when ``num_splits > 1``) for one problem.

    Made once per plan: it fixes the grid, the compile-time constants and the fp32 scratch for the
    partial outputs (``[B * H_kv, M, num_splits, D]``) and their LSEs. ``__call__`` only launches.
    The merge sums splits in a fixed order, so results are bitwise reproducible for a given config
    (``deterministic`` needs nothing more).
    """

    def __init__(
        self, problem: DecodeProblem, config: SplitKVConfig | None = None, *, deterministic: bool = False
    ) -> None:
        self.problem = p = problem
        self.config = cfg = config or default_config(problem)
        block_m, block_d = tile_shape(problem)
        rows = p.group_size * p.q_len
        self.use_pdl = _pdl_available(p.device) if cfg.use_pdl is None else cfg.use_pdl
        if self.use_pdl and not _pdl_available(p.device):
            self.use_pdl = False
        self.split_grid = (cfg.num_splits, p.batch * p.num_kv_heads, triton.cdiv(rows, block_m))
        self.merge_grid = (p.batch * p.num_kv_heads * rows,)
        interp_bf16 = (
            interpreter_active() and p.dtype == torch.bfloat16
        )  # Triton 3.9 interpreter: bf16 tl.dot reads raw bits and fp32->bf16 truncates
        self.constexprs = dict(
            H_KV=p.num_kv_heads,
            GROUP=p.group_size,
            T_Q=p.q_len,
            HEAD_DIM=p.head_dim,
            NUM_SPLITS=cfg.num_splits,
        )
        self.split_constexprs = dict(
            BLOCK_M=block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_D=block_d,
            HAS_KV_START=p.has_kv_start,
            MASK_KIND=_MASK_KIND[p.mask_kind],
            INTERP_BF16=interp_bf16,
            DOT_PRECISION="ieee",
            USE_PDL=self.use_pdl,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        splits_p2 = max(2, triton.next_power_of_2(cfg.num_splits))
        self.merge_constexprs = dict(
            SPLITS_P2=splits_p2,
            BLOCK_D=block_d,
            INTERP_BF16=interp_bf16,
            USE_PDL=self.use_pdl,
            num_warps=4 if splits_p2 * block_d <= 8192 else 8,  # [SPLITS_P2, BLOCK_D] fp32 in registers
        )
        if self.use_pdl:
            self.split_constexprs["launch_pdl"] = True
            self.merge_constexprs["launch_pdl"] = True
        n_part = p.batch * p.num_kv_heads * rows * cfg.num_splits if cfg.num_splits > 1 else 1
        self.part_o = torch.empty(n_part * (p.head_dim if cfg.num_splits > 1 else 1), dtype=torch.float32,
                                  device=p.device)  # fmt: skip
        self.part_lse = torch.empty(n_part, dtype=torch.float32, device=p.device)
        self.qk_scale = p.scale * LOG2E_CONST
        self.mask_strides = p.mask_strides or (0, 0, 0, 0)
        # Triton launches on the *current* device and its current stream: remember ours to switch to it.
        self.device_index = p.device.index if p.device.type == "cuda" and not interpreter_active() else None

    def __call__(self, q, k_cache, v_cache, seq_lens, kv_start, mask, out, lse) -> None:
        index = self.device_index
        if index is not None and torch.cuda.current_device() != index:
            with torch.cuda.device(index):  # tensors on another GPU than the current one
                self._launch(q, k_cache, v_cache, seq_lens, kv_start, mask, out, lse)
            return
        self._launch(q, k_cache, v_cache, seq_lens, kv_start, mask, out, lse)

    def _launch(self, q, k_cache, v_cache, seq_lens, kv_start, mask, out, lse) -> None:
        p, cfg = self.problem, self.config
        write_lse = lse is not None
        lse_t = lse if write_lse else self.part_lse
        lse_strides = (lse.stride(0), lse.stride(1)) if write_lse else (0, 0)
        o_strides = (out.stride(0), out.stride(1), out.stride(2))
        split_kv_kernel[self.split_grid](
            out, *o_strides,
            lse_t, *lse_strides,
            self.part_o, self.part_lse,
            q, p.q_strides[0], p.q_strides[1], p.q_strides[2],
            k_cache, p.k_strides[0], p.k_strides[1], p.k_strides[2],
            v_cache, p.v_strides[0], p.v_strides[1], p.v_strides[2],
            seq_lens,
            kv_start if kv_start is not None else seq_lens,
            mask if mask is not None else seq_lens, *self.mask_strides,
            self.qk_scale,
            p.capacity,
            WRITE_LSE=write_lse,
            **self.constexprs,
            **self.split_constexprs,
        )  # fmt: skip
        if cfg.num_splits > 1:
            merge_kernel[self.merge_grid](
                out, *o_strides,
                lse_t, *lse_strides,
                self.part_o, self.part_lse,
                WRITE_LSE=write_lse,
                **self.constexprs,
                **self.merge_constexprs,
            )  # fmt: skip


class TritonBackend:
    """The Triton split-KV kernel: serves every problem the public contract admits."""

    name = "triton"

    def supports(self, problem: DecodeProblem) -> str | None:
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
