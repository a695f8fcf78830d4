"""The SDPA graph described to the cuDNN frontend: validated on the CPU for many shapes (no GPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from problems import make_key, make_problem

from kvdecode.cudnn_graphs import builder
from kvdecode.cudnn_graphs.cuda_env import load_cudnn

cudnn = pytest.importorskip("cudnn")


@st.composite
def graph_problems(draw):
    num_kv = draw(st.sampled_from((1, 2, 4, 8)))
    group = draw(st.sampled_from((1, 3, 4, 7, 8)))
    if draw(st.integers(0, 5)) == 0:  # MQA with many query heads
        num_kv, group = 1, draw(st.sampled_from((16, 32, 64)))
    head_dim = draw(st.sampled_from((8, 64, 72, 80, 96, 128, 160, 192, 256)))
    return make_problem(
        batch=draw(st.integers(1, 16)),
        num_q_heads=num_kv * group,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        q_len=draw(st.sampled_from((1, 1, 2, 4, 8, 16))),
        capacity=draw(st.sampled_from((16, 1000, 4096, 32768, 131072))),
        dtype=draw(st.sampled_from((torch.float16, torch.bfloat16))),
        layout=draw(st.sampled_from(("bhsd", "bshd", "slice"))),
        scale=draw(st.sampled_from((None, 0.3, 1.0))),
    )


@given(problem=graph_problems(), with_lse=st.booleans(), deterministic=st.booleans())
def test_graph_validates_and_matches_the_problem(problem, with_lse, deterministic):
    key = make_key(problem, deterministic=deterministic, with_lse=with_lse)
    graph = builder.describe(key)  # validate() + build_operation_graph(), raises when rejected

    def tensor(uid):
        t = graph.find_tensor(uid)
        return list(t.dim), list(t.stride)

    b, hq, hkv, d, tq, cap = (
        problem.batch,
        problem.num_q_heads,
        problem.num_kv_heads,
        problem.head_dim,
        problem.q_len,
        problem.capacity,
    )
    assert tensor(builder.UID_Q) == ([b, hq, tq, d], list(problem.q_strides))
    assert tensor(builder.UID_K) == ([b, hkv, cap, d], list(problem.k_strides))
    assert tensor(builder.UID_V) == ([b, hkv, cap, d], list(problem.v_strides))
    assert tensor(builder.UID_O) == ([b, hq, tq, d], [hq * tq * d, tq * d, d, 1])
    assert tensor(builder.UID_SEQ_KV) == ([b, 1, 1, 1], [1, 1, 1, 1])
    assert tensor(builder.UID_SEQ_Q) == ([b, 1, 1, 1], [1, 1, 1, 1])
    stats = graph.find_tensor(builder.UID_STATS)
    if with_lse:
        assert list(stats.dim) == [b, hq, tq, 1] and not stats.is_virtual
    else:
        assert stats is None or stats.is_virtual
    (node,) = graph.nodes
    params = node.params
    assert params["attn_scale"] == problem.scale
    assert params["use_padding_mask"] is True
    assert params["generate_stats"] is with_lse
    if tq > 1:
        assert params["diagonal_alignment"] == cudnn.diagonal_alignment.BOTTOM_RIGHT
        assert params["diagonal_band_right_bound"] == 0
    else:
        assert "diagonal_alignment" not in params


@pytest.mark.parametrize("head_dim", [60, 4])
def test_frontend_rejects_head_dims_cudnn_cannot_serve(head_dim):
    key = make_key(make_problem(head_dim=head_dim))
    with pytest.raises(cudnn.cudnnGraphNotSupportedError, match="multiple of 8"):
        builder.describe(key)


def test_frontend_rejects_k_without_unit_last_stride():
    problem = make_problem()
    bad = (*problem.k_strides[:2], 1, problem.capacity)
    from dataclasses import replace

    with pytest.raises(cudnn.cudnnGraphNotSupportedError, match="stride"):
        builder.describe(make_key(replace(problem, k_strides=bad)))


def test_cpu_only_library_state_is_reported():
    module, version, reason = load_cudnn()
    assert module is not None
    if torch.cuda.is_available():
        assert reason is None and version >= 90000
    else:  # this CI machine has the frontend but no libcudnn: the reason must say so
        assert (reason is None) == (version is not None)
