"""``kvdecode.warmup``: compile, before serving, every Triton variant a model's decode steps will meet.

The split count is a run-time argument of the kernels, so batch size, capacity and length never compile
anything new by themselves; what does is a new launch *configuration* (tile size, warps, stages, from the
tuning table or the heuristic), a new merge bucket (16, 64 or 128 splits), the LSE output, the fused
merge (eager calls) and the merge kernel (captured ones: compiled with the fused form's first eager
call), or a new alignment of the tensors. ``warmup`` works out which of those the given batch sizes and
capacities lead to and launches each once on small tensors, so that serving never waits for a compile.

Compiled kernels are also kept on disk by Triton (``$TRITON_CACHE_DIR``, by default
``~/.triton/cache``): a second process with the same kvdecode, Triton and GPU loads them instead of
compiling (milliseconds instead of ~1 s each). Run ``warmup`` once at start-up in every process anyway:
loading is per process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch

from .errors import KVDecodeError
from .problem import SUPPORTED_DTYPES, DecodeProblem

__all__ = ["warmup"]


def _problem(batch, hq, hkv, d, q_len, capacity, dtype, device, kv_start) -> DecodeProblem:
    """A problem of contiguous BHSD tensors, described without allocating them."""
    kv = (hkv * capacity * d, capacity * d, d, 1)
    return DecodeProblem(
        batch=batch, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, q_len=q_len, capacity=capacity,
        dtype=dtype, device=device, q_strides=(hq * q_len * d, q_len * d, d, 1), k_strides=kv, v_strides=kv,
        scale=1.0 / math.sqrt(d), has_kv_start=kv_start,
    )  # fmt: skip


def _check_sizes(name: str, values: Iterable[int]) -> list[int]:
    try:
        values = list(values)
    except TypeError:
        raise KVDecodeError(f"{name} must be a sequence of positive ints, got {values!r}") from None
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise KVDecodeError(f"{name} must be a non-empty sequence of positive ints, got {values!r}")
    return values


def warmup(
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    q_lens: Iterable[int] = (1,),
    batch_sizes: Iterable[int] = tuple(range(1, 65)),
    capacities: Iterable[int] = (1024, 4096, 16384, 32768, 131072),
    kv_start: bool = False,
    return_lse: bool = False,
    device: torch.device | str | None = None,
) -> dict[str, float | int]:
    """Compile the Triton kernels the given decode shapes will use (see the module docstring).

    Parameters
    ----------
    num_q_heads, num_kv_heads, head_dim : int
        The model's attention family (``H_q % H_kv == 0``).
    dtype : torch.dtype
        Of q and the caches.
    q_lens, batch_sizes, capacities : iterables of int
        Every T_q (1, or the speculation widths), batch size and cache capacity serving will meet.
    kv_start, return_lse : bool
        Whether calls pass ``kv_start`` (left padding) and ask for the LSE.
    device : torch.device or str, optional
        Defaults to the current CUDA device.

    Returns
    -------
    dict
        ``variants`` (distinct kernel variants launched), ``compiled`` (how many of them this process had
        not met before: compiled or loaded from Triton's disk cache) and ``seconds``.

    Examples
    --------
    >>> import kvdecode
    >>> kvdecode.warmup(32, 8, 128, batch_sizes=[1, 2], capacities=[1024])  # doctest: +SKIP
    {'variants': 3, 'compiled': 3, 'seconds': 2.1}
    """
    from .triton_kernels.bound import compile_counts
    from .triton_kernels.config import default_config
    from .triton_kernels.launcher import SplitKVLauncher, merge_bucket

    if not isinstance(dtype, torch.dtype) or dtype not in SUPPORTED_DTYPES:
        raise KVDecodeError(f"dtype must be one of torch.float16, bfloat16, float32, got {dtype!r}")
    for flag, value in (("kv_start", kv_start), ("return_lse", return_lse)):
        if not isinstance(value, bool):
            raise KVDecodeError(f"{flag} must be True or False, got {value!r}")
    for name, value in (("num_q_heads", num_q_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        _check_sizes(name, [value])
    if num_q_heads % num_kv_heads:
        raise KVDecodeError(
            f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
        )
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise KVDecodeError(
            f"device must be a torch.device or a string like 'cuda:0', got {device!r}"
        ) from None
    start, before = time.perf_counter(), sum(compile_counts().values())
    variants = {}
    for q_len in _check_sizes("q_lens", q_lens):
        for batch in _check_sizes("batch_sizes", batch_sizes):
            for cap in _check_sizes("capacities", capacities):
                p = _problem(batch, num_q_heads, num_kv_heads, head_dim, q_len, cap, dtype, device, kv_start)
                cfg = default_config(p)
                bucket = merge_bucket(cfg.num_splits) if cfg.num_splits > 1 else 1
                key = (q_len, cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.heads_per_cta, bucket)
                variants.setdefault(key, (cfg, cap))
    for (q_len, *_), (cfg, _) in variants.items():
        splits = cfg.num_splits
        cap = max(splits * cfg.block_n, q_len, 16)
        cap = -(-cap // 16) * 16  # capacities that are multiples of 16 specialize alike
        p = _problem(1, num_q_heads, num_kv_heads, head_dim, q_len, cap, dtype, device, kv_start)
        _launch_once(SplitKVLauncher(p, cfg), p, return_lse)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    compiled = sum(compile_counts().values()) - before
    return dict(variants=len(variants), compiled=compiled, seconds=round(time.perf_counter() - start, 3))


def _launch_once(launcher, p: DecodeProblem, return_lse: bool) -> None:
    """One launch of ``launcher`` on zero-filled tensors of ``p``'s shapes (lengths = capacity)."""
    q = torch.zeros((p.batch, p.num_q_heads, p.q_len, p.head_dim), dtype=p.dtype, device=p.device)
    k = torch.zeros((p.batch, p.num_kv_heads, p.capacity, p.head_dim), dtype=p.dtype, device=p.device)
    lens = torch.full((p.batch,), p.capacity, dtype=torch.int32, device=p.device)
    starts = torch.zeros_like(lens) if p.has_kv_start else None
    out = torch.empty_like(q)
    for lse in (False, True) if return_lse else (False,):
        lse_t = torch.empty(q.shape[:3], dtype=torch.float32, device=p.device) if lse else None
        launcher(q, k, k, lens, starts, None, out, lse_t)
