"""Describe one decode problem to the cuDNN frontend as an SDPA graph at the cache's capacity.

The graph is built for ``S_kv = capacity``; the real lengths arrive at run time through the padding
mask (``seq_len_q`` = T_q for every row, ``seq_len_kv`` = ``seq_lens`` viewed as ``[B, 1, 1, 1]``), so
the kernel skips the unfilled part of the cache and one graph serves every step. For ``T_q > 1`` the
causal band is aligned bottom-right (``diagonal_alignment=BOTTOM_RIGHT, diagonal_band_right_bound=0``):
query ``t`` sees keys ``<= seq_len_kv - T_q + t``, the decode convention (top-left would be wrong).

Stats: cuDNN's ``Stats`` output is ``max + ln(sum exp(s - max))`` over the scaled scores ``s``, i.e. the
natural-log log-sum-exp that kvdecode returns as ``lse`` (``stats_use_log2`` is left False).

Describing and validating a graph (``describe``) needs no GPU: frontend 1.32 validates an SDPA graph in
Python and ``build_operation_graph()`` succeeds without libcudnn. Plan creation (``build_plan``) needs
the GPU and a handle.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from .cuda_env import load_cudnn
from .key import GraphKey

__all__ = [
    "UID_K",
    "UID_O",
    "UID_Q",
    "UID_SEQ_KV",
    "UID_SEQ_Q",
    "UID_STATS",
    "UID_V",
    "BuiltGraph",
    "build_plan",
    "describe",
    "load_plan",
]

# Fixed tensor UIDs: the variant pack is keyed by these, also for plans loaded from disk.
UID_Q, UID_K, UID_V, UID_O, UID_STATS, UID_SEQ_Q, UID_SEQ_KV = 1, 2, 3, 4, 5, 6, 7


@dataclass
class BuiltGraph:
    """A cuDNN graph ready to execute, with the workspace it needs and where it came from."""

    key: GraphKey
    graph: Any
    workspace_size: int
    source: str  # "build" or "disk"
    seconds: float


def _cudnn() -> Any:
    cudnn, _, _ = load_cudnn()
    if cudnn is None:
        raise ImportError(load_cudnn()[2])
    return cudnn


def describe(key: GraphKey, handle: Any = None) -> Any:
    """The validated SDPA graph for ``key`` (``validate`` + ``build_operation_graph``; no GPU needed)."""
    cudnn = _cudnn()
    io_type = {"fp16": cudnn.data_type.HALF, "bf16": cudnn.data_type.BFLOAT16}[key.dtype]
    graph = cudnn.pygraph(
        name=f"kvdecode_{key.name}",
        io_data_type=io_type,
        intermediate_data_type=cudnn.data_type.FLOAT,
        compute_data_type=cudnn.data_type.FLOAT,
        handle=handle,
    )
    b, hq, hkv, d, tq, cap = (
        key.batch,
        key.num_q_heads,
        key.num_kv_heads,
        key.head_dim,
        key.q_len,
        key.capacity,
    )
    q = graph.tensor(name="q", dim=[b, hq, tq, d], stride=list(key.q_strides), data_type=io_type, uid=UID_Q)
    k = graph.tensor(name="k", dim=[b, hkv, cap, d], stride=list(key.k_strides), data_type=io_type, uid=UID_K)
    v = graph.tensor(name="v", dim=[b, hkv, cap, d], stride=list(key.v_strides), data_type=io_type, uid=UID_V)
    lens = dict(dim=[b, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.INT32)
    seq_q = graph.tensor(name="seq_len_q", uid=UID_SEQ_Q, **lens)
    seq_kv = graph.tensor(name="seq_len_kv", uid=UID_SEQ_KV, **lens)
    causal = {}
    if key.causal_bottom_right:
        causal = dict(diagonal_alignment=cudnn.diagonal_alignment.BOTTOM_RIGHT, diagonal_band_right_bound=0)
    o, stats = graph.sdpa(
        name="decode",
        q=q,
        k=k,
        v=v,
        generate_stats=key.with_lse,
        attn_scale=key.scale,
        use_padding_mask=True,  # real lengths through seq_len_q / seq_len_kv: always
        seq_len_q=seq_q,
        seq_len_kv=seq_kv,
        **causal,
    )
    o.set_output(True).set_dim([b, hq, tq, d]).set_stride(list(key.o_strides)).set_uid(UID_O)
    o.set_data_type(io_type)
    if key.with_lse:
        stats.set_output(True).set_dim([b, hq, tq, 1]).set_stride(list(key.stats_strides))
        stats.set_data_type(cudnn.data_type.FLOAT).set_uid(UID_STATS)
    graph.validate()
    graph.build_operation_graph()
    return graph


def build_plan(key: GraphKey, handle: Any) -> BuiltGraph:
    """Describe, plan and build the graph on the GPU (heuristics A then FALLBACK).

    ``key.deterministic`` deselects engines carrying the ``NONDETERMINISTIC`` numerical note.
    Raises ``cudnn.cudnnGraphNotSupportedError`` when no engine can serve the graph.
    """
    cudnn = _cudnn()
    start = time.perf_counter()
    graph = describe(key, handle)
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    if key.deterministic:
        graph.deselect_numeric_notes([cudnn.numerical_note.NONDETERMINISTIC])
    graph.check_support()
    graph.build_plans()
    workspace = int(graph.get_workspace_size())
    return BuiltGraph(key, graph, workspace, "build", time.perf_counter() - start)


def load_plan(key: GraphKey, blob: bytes, handle: Any, workspace_size: int) -> BuiltGraph:
    """A graph deserialized from ``serialize()`` output (``pygraph().deserialize(handle, blob)``)."""
    cudnn = _cudnn()
    start = time.perf_counter()
    graph = cudnn.pygraph(handle=handle)
    graph.deserialize(handle, blob)
    with contextlib.suppress(Exception):  # a frontend that cannot answer for a loaded plan: trust the file
        workspace_size = int(graph.get_workspace_size())
    return BuiltGraph(key, graph, workspace_size, "disk", time.perf_counter() - start)


def serialize(built: BuiltGraph) -> bytes:
    return bytes(built.graph.serialize(as_bytes=True))
