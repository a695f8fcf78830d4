"""The cuDNN crossover on a GPU without a tuning table: a rule derived from the measured tables.

``auto`` sends a call to cuDNN once the K/V bytes it reads reach a size that depends on the head dim
and on how the Triton kernel's heuristic configuration
(:func:`~kvdecode.triton_kernels.config.heuristic_config`, what runs without a table) loads the GPU.
With ``S`` SMs, ``P = B · H_kv · ceil(G · T_q / BLOCK_M)`` programs and ``C = P · num_splits`` CTAs
(the split count of a long capacity)::

    regime       when                                           cuDNN from (K+V bytes)
    wide head    D > 128                                                    never
    full         P >= S / 2 (<= 4 splits: batch and heads fill the GPU)     24 MiB (D 128), never (D < 128)
    underfilled  C < WAVES · S (the split cap leaves SMs short of CTAs)     24 MiB (D 128), never (D < 128)
    uneven       BLOCK_M > 16 and ceil(C / S) · S / C > 1.1                 12 MiB (D 128), never (D < 128)
                 (wide tiles whose last wave is mostly empty)
    even         otherwise                                                  768 MiB

cuDNN 9.19's decode engine is at its best at D 128: at D 64 and D 256 Triton's heuristic configuration
was faster in all but a few cells on both GPUs (at most 1.11x slower there), and at D 256 B 16 cuDNN
took up to 1.24x Triton's time. The threshold length is those bytes over the bytes one token costs
(``2 · B · H_kv · D · itemsize``). Derived by ``bench/no_table_rule.py`` from
``kvdecode/tuning/default_h200.json`` (D 64 and D 256 re-tuned with cuDNN on 2026-12-04) and
``default_h100.json`` (both GPUs have 132 SMs): over every cell where both backends were measured,
choosing by this rule costs at most :data:`MEASURED_MAX_REGRET` × the faster of cuDNN and Triton at its
heuristic configuration (``bench/results/h200-2026-12-04/no-table-rule.json``); measured with the table
switched off on the H200 (``bench/compare_tables.py --baseline none``) the old rule cost up to 1.24x
(``bench/results/h200-2026-12-04/compare-tables-no-table-rule.log``). It is provisional: a table made
by ``kvdecode tune`` on the GPU at hand replaces it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["MEASURED_MAX_REGRET", "RULE_NAME", "RuleThreshold", "describe_rule", "no_table_threshold"]

RULE_NAME = "no-table rule"
MIB = 1 << 20
# Each size sits inside the range that keeps every measured cell of its regime within 10% (the
# ranges bench/no_table_rule.py prints), away from the measured sizes (powers of two):
FULL_BYTES = 24 * MIB  # full: (0, 64 MiB]; underfilled: (4 MiB, 32 MiB]
UNEVEN_BYTES = 12 * MIB  # (4 MiB, 16 MiB]: MQA at B 16 and 64
EVEN_BYTES = 768 * MIB  # (512 MiB, 1 GiB]: D 128 B 4 L 64k (1 GiB, H200 table off) and D 64 B 4 L 128k above
CUDNN_HEAD_DIM = 128  # the head dim where cuDNN's decode engine beats Triton by a margin (both GPUs)
IMBALANCE = 1.1  # the busiest SM holds > 10% more than the average share of CTAs
LONG_CAPACITY = 1 << 20  # the configuration of a long capacity (split count not capped by tiles)
# measured 1.094 (H200 D 64 B 16 L 512: Triton's heuristic config 10.8 µs, cuDNN 9.8 µs);
# tests/test_no_table_rule.py checks it on both shipped tables
MEASURED_MAX_REGRET = 1.10
ITEMSIZE = {"fp16": 2, "bf16": 2, "fp32": 4}
NEVER = 2**31 - 1  # the threshold when cuDNN never wins (kvdecode.thresholds.NEVER is this one)


@dataclass(frozen=True)
class RuleThreshold:
    """What the rule decided: the crossover length, its regime and the quantities it looked at."""

    value: int
    regime: str
    cudnn_bytes: int | None  # None: cuDNN never (value is thresholds.NEVER)
    programs: int
    ctas: int
    block_m: int
    sms: int

    @property
    def text(self) -> str:
        """One line for :class:`~kvdecode.thresholds.Threshold`'s ``source``."""
        return (
            f"{RULE_NAME} ({self.regime}: {self.programs} programs, {self.ctas} CTAs on {self.sms} SMs; "
            f"{_size(self.cudnn_bytes)})"
        )


def _size(n: int | None) -> str:
    if n is None:
        return "cuDNN never"
    return f"cuDNN from {n / (1 << 30):g} GiB of K/V" if n >= 1 << 30 else f"cuDNN from {n // MIB} MiB of K/V"


def _long_problem(
    batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int, q_len: int, dtype_name: str
):
    import torch

    from .problem import SUPPORTED_DTYPES, DecodeProblem

    dtype = {name: dt for dt, name in SUPPORTED_DTYPES.items()}[dtype_name]
    n = LONG_CAPACITY
    kv = (num_kv_heads * n * head_dim, n * head_dim, head_dim, 1)
    q = (num_q_heads * q_len * head_dim, q_len * head_dim, head_dim, 1)
    return DecodeProblem(
        batch, num_q_heads, num_kv_heads, head_dim, q_len, n, dtype, torch.device("cpu"), q, kv, kv,
        1 / math.sqrt(head_dim),
    )  # fmt: skip


def _regime(programs: int, ctas: int, block_m: int, sms: int, head_dim: int) -> tuple[str, int | None]:
    from .triton_kernels.config import WAVES

    if head_dim > CUDNN_HEAD_DIM:
        return "wide head", None
    if 2 * programs >= sms:
        regime, size = "full", FULL_BYTES
    elif ctas < WAVES * sms:
        regime, size = "underfilled", FULL_BYTES
    elif block_m > 16 and math.ceil(ctas / sms) * sms / ctas > IMBALANCE:
        regime, size = "uneven", UNEVEN_BYTES
    else:
        return "even", EVEN_BYTES
    if head_dim < CUDNN_HEAD_DIM:
        return f"{regime}, narrow head", None
    return regime, size


def no_table_threshold(
    head_dim: int,
    dtype_name: str,
    batch: int,
    num_q_heads: int,
    num_kv_heads: int,
    q_len: int,
    sms: int,
) -> RuleThreshold:
    """The crossover length the rule gives for this shape on a GPU with ``sms`` SMs.

    Examples
    --------
    >>> no_table_threshold(128, "bf16", 64, 32, 8, 1, 132).regime
    'full'
    """
    from .triton_kernels.config import heuristic_config, tile_shape

    problem = _long_problem(batch, num_q_heads, num_kv_heads, head_dim, q_len, dtype_name)
    block_m, _ = tile_shape(problem)
    programs = batch * num_kv_heads * math.ceil(problem.group_size * q_len / block_m)
    ctas = programs * heuristic_config(problem, sms).num_splits
    regime, cudnn_bytes = _regime(programs, ctas, block_m, sms, head_dim)
    per_token = 2 * batch * num_kv_heads * head_dim * ITEMSIZE[dtype_name]
    value = NEVER if cudnn_bytes is None else min(NEVER, max(1, math.ceil(cudnn_bytes / per_token)))
    return RuleThreshold(value, regime, cudnn_bytes, programs, ctas, block_m, sms)


def describe_rule(sms: int) -> str:
    """The rule in one line, for ``kvdecode info``."""
    from .triton_kernels.config import WAVES

    return (
        f"D {CUDNN_HEAD_DIM}: {_size(FULL_BYTES)} when the Triton programs (batch x KV heads x query "
        f"tiles) reach {math.ceil(sms / 2)} ({sms} SMs / 2) or its heuristic grid has fewer than "
        f"{WAVES * sms} CTAs, from {UNEVEN_BYTES // MIB} MiB when wide query tiles fill the SMs unevenly, "
        f"else from {EVEN_BYTES // MIB} MiB; D < {CUDNN_HEAD_DIM}: only that last case; "
        f"D > {CUDNN_HEAD_DIM}: cuDNN never"
    )
