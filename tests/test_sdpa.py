"""kvdecode.sdpa: slice recognition from strides and storage, fast path vs fall-through, torch parity.

On the CPU the fast path is forced with ``backend="triton"`` (the interpreter); ``backend="auto"`` falls
through to torch there. Whether the fast path ran is observed by replacing torch's SDPA with a spy.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from strategies import check_close

import kvdecode
from kvdecode.reference import reference_decode_attention

sdpa_module = sys.modules["kvdecode.sdpa"]  # `kvdecode.sdpa` is the function; the module lives here
capacity_view = sdpa_module.capacity_view


# ---- slice recognition (no kernels) ----


def _layer_view(storage: torch.Tensor, layout: str, layer: int) -> torch.Tensor:
    return storage[layer] if layout == "bhsd" else storage[layer].transpose(1, 2)


@given(
    layout=st.sampled_from(["bhsd", "bshd"]),
    layers=st.integers(1, 3),
    b=st.integers(1, 3),
    h=st.integers(1, 3),
    cap=st.integers(2, 40),
    d=st.sampled_from([1, 8, 16]),
    data=st.data(),
)
def test_capacity_view_finds_the_buffer_of_a_leading_slice(layout, layers, b, h, cap, d, data):
    storage = torch.randn((layers, b, h, cap, d) if layout == "bhsd" else (layers, b, cap, h, d))
    layer = data.draw(st.integers(0, layers - 1), label="layer")
    length = data.draw(st.integers(1, cap - 1), label="L")
    buf = _layer_view(storage, layout, layer)
    found = capacity_view(buf[:, :, :length])
    assert found is not None
    view, capacity = found
    # Exactly the layer's capacity, at B 1 / H 1 too: the strides a size-1 dimension keeps from its
    # buffer bound the row, where the storage alone would run on into the next layers.
    assert capacity == cap
    assert view.data_ptr() == buf.data_ptr() and view.stride() == buf.stride()
    assert torch.equal(view, buf)
    assert capacity_view(buf) is None  # a full buffer has no room


def test_capacity_view_cases():
    buf = torch.randn(2, 3, 40, 16)
    view, cap = capacity_view(buf[:, :, 5:15])  # a slice starting at an offset: room up to the buffer end
    assert cap == 35 and torch.equal(view, buf[:, :, 5:])
    assert capacity_view(torch.randn(2, 3, 10, 16)) is None  # a fresh tensor exactly L long
    flat = torch.randn(2 * 2 * 3 * 10 * 16)
    assert capacity_view(flat[: 2 * 3 * 10 * 16].view(2, 3, 10, 16)) is None  # more storage, but no row room
    bshd = torch.randn(2, 40, 3, 16)
    view, cap = capacity_view(bshd[:, :10].transpose(1, 2))
    assert cap == 40 and torch.equal(view, bshd.transpose(1, 2))
    assert capacity_view(bshd[:, :10, 1:2].transpose(1, 2))[1] == 40  # one head of a BSHD buffer
    # Expanded (stride-0) heads are ignored: the slice of one head, broadcast to 3, still has room.
    view, cap = capacity_view(buf[:, :1, :10].expand(2, 3, 10, 16))
    assert cap > 10 and torch.equal(view[:, :, :10], buf[:, :1, :10].expand(2, 3, 10, 16))
    assert capacity_view(torch.randn(2, 1, 10, 16).expand(2, 3, 10, 16)) is None
    assert capacity_view(torch.randn(2, 3, 1, 16).expand(2, 3, 10, 16)) is None  # sequence stride 0
    assert capacity_view(torch.randn(3, 10, 16)) is None  # not 4-D


# ---- fast path and fall-through ----


@pytest.fixture
def torch_sdpa_calls(monkeypatch):
    """Counts calls of torch's SDPA made through kvdecode.sdpa (the spy still computes the result)."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def _case(
    gen, *, b=2, hq=4, hkv=2, cap=48, length=20, d=16, tq=1, dtype=torch.float32, layout="bhsd", device="cpu"
):
    """q and K/V slices of length ``length`` of fixed-capacity buffers (BSHD: layer 1 of 3 layers)."""
    shape = (b, hkv, cap, d) if layout == "bhsd" else (3, b, cap, hkv, d)
    k_buf, v_buf = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(2))
    if layout == "bhsd":
        k, v = k_buf[:, :, :length], v_buf[:, :, :length]
    else:
        k, v = k_buf[1][:, :length].transpose(1, 2), v_buf[1][:, :length].transpose(1, 2)
    q = torch.randn(b, hq, tq, d, generator=gen).to(device, dtype)
    return q, k, v


FAST_CASES = [
    dict(),
    dict(hq=2, hkv=2, length=1),
    dict(hq=6, hkv=1, length=47, layout="bshd", dtype=torch.float16),
    dict(hq=4, hkv=4, length=5, tq=5, causal=True),
    dict(dtype=torch.bfloat16, d=40, scale=0.3),
]


@pytest.mark.parametrize(
    "spec", FAST_CASES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "base"
)
def test_fast_path_matches_torch_and_the_reference(spec, torch_sdpa_calls):
    spec = dict(spec)
    causal, scale = spec.pop("causal", False), spec.pop("scale", None)
    gen = torch.Generator().manual_seed(7)
    q, k, v = _case(gen, **spec)
    gqa = q.shape[1] != k.shape[1]
    assert sdpa_module.sdpa_fast_path_reason(q, k, v, None, 0.0, causal, scale, gqa, backend="triton") is None
    out = torch.full_like(q, float("nan"))
    out.copy_(kvdecode.sdpa(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa, backend="triton"))
    assert not torch_sdpa_calls, "the fast path was not taken"
    lens = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32)
    ref, _ = reference_decode_attention(q, k, v, lens, scale=scale)
    check_close(out, ref, q.dtype, f"sdpa {spec}", 7)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    check_close(expected, ref, q.dtype, f"torch sdpa {spec}", 7)  # torch and kvdecode agree via the ref


def test_one_plan_serves_every_length(torch_sdpa_calls):
    gen = torch.Generator().manual_seed(8)
    q, _, _ = _case(gen)
    k_buf, v_buf = torch.randn(2, 2, 48, 16, generator=gen), torch.randn(2, 2, 48, 16, generator=gen)
    sdpa_module.clear_plan_cache()
    for length in (3, 17, 47):
        k, v = k_buf[:, :, :length], v_buf[:, :, :length]
        out = kvdecode.sdpa(q, k, v, enable_gqa=True, backend="triton")
        ref, _ = reference_decode_attention(q, k, v, torch.full((2,), length, dtype=torch.int32))
        check_close(out, ref, torch.float32, f"sdpa L={length}", 8)
    assert sdpa_module.plan_cache_info()["size"] == 1
    assert not torch_sdpa_calls


FALL_THROUGH = {
    "mask": dict(attn_mask=True),
    "dropout": dict(dropout_p=0.5),
    "top-left causal T_q 1": dict(is_causal=True),
    "non-causal T_q 3": dict(tq=3),
    "causal T_q < L": dict(tq=3, is_causal=True),
    "exact tensor": dict(exact=True),
    "cpu with auto": dict(backend="auto"),
    "requires grad": dict(grad=True),
    "head dim of v differs": dict(v_dim=8),
}


@pytest.mark.parametrize("name", list(FALL_THROUGH))
def test_other_calls_fall_through_to_torch_unchanged(name, torch_sdpa_calls):
    spec = dict(FALL_THROUGH[name])
    gen = torch.Generator().manual_seed(9)
    q, k, v = _case(gen, tq=spec.pop("tq", 1))
    if spec.pop("exact", False):
        k, v = k.contiguous(), v.contiguous()
    if spec.pop("grad", False):
        q.requires_grad_(True)
    if "v_dim" in spec:
        v = torch.randn(2, 48, 2, spec.pop("v_dim"), generator=gen).transpose(1, 2)[:, :, :20]
    if spec.pop("attn_mask", False):
        spec["attn_mask"] = torch.rand(q.shape[2], k.shape[2], generator=gen) > 0.3
    backend = spec.pop("backend", "triton")
    torch.manual_seed(0)
    out = kvdecode.sdpa(q, k, v, enable_gqa=True, backend=backend, **spec)
    assert len(torch_sdpa_calls) == 1, "expected a fall-through to torch SDPA"
    torch.manual_seed(0)
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **spec)
    assert torch.equal(out, expected)
    reason = sdpa_module.sdpa_fast_path_reason(q, k, v, **spec, enable_gqa=True, backend=backend)
    assert (reason is None) == (name == "exact tensor")  # an exact tensor is refused later, by capacity_view


def test_top_left_causal_is_not_decode_causal(torch_sdpa_calls):
    """Why is_causal with T_q = 1 < L falls through: torch lets the query see key 0 only."""
    gen = torch.Generator().manual_seed(10)
    q, k, v = _case(gen, hq=2, hkv=2)
    out = kvdecode.sdpa(q, k, v, is_causal=True, backend="triton")
    torch.testing.assert_close(out, v[:, :, :1].expand_as(out), rtol=1e-6, atol=1e-6)


def test_mismatched_heads_without_gqa_raise_torch_error():
    q, k, v = _case(torch.Generator().manual_seed(11))
    with pytest.raises(RuntimeError) as ours:
        kvdecode.sdpa(q, k, v, backend="triton")
    with pytest.raises(RuntimeError) as theirs:
        F.scaled_dot_product_attention(q, k, v)
    assert str(ours.value) == str(theirs.value)


def test_explicit_backend_that_cannot_serve_raises():
    q, k, v = _case(torch.Generator().manual_seed(12))
    with pytest.raises(kvdecode.UnsupportedError):
        kvdecode.sdpa(q, k, v, enable_gqa=True, backend="cudnn")  # no cuDNN plan on a CPU tensor


# ---- GPU ----


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_path_on_gpu_matches_torch(layout, dtype, torch_sdpa_calls):
    gen = torch.Generator().manual_seed(13)
    for length in (1, 100, 1000, 4095):
        q, k, v = _case(
            gen, b=3, hq=32, hkv=8, cap=4096, length=length, d=128, dtype=dtype, layout=layout, device="cuda"
        )
        assert capacity_view(k)[1] == 4096
        out = kvdecode.sdpa(q, k, v, enable_gqa=True)
        assert not torch_sdpa_calls, "the fast path fell through to torch SDPA"
        ref, _ = reference_decode_attention(q, k, v, torch.full((3,), length, dtype=torch.int32))
        check_close(out, ref, dtype, f"gpu sdpa {layout} L={length}", 13)
        expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # the spy records this one
        torch_sdpa_calls.clear()
        check_close(expected, ref, dtype, f"torch sdpa {layout} L={length}", 13)


# ---- capacity from evidence, not from the storage's end (issue 12, defect 7) ----


def test_capacity_view_is_exact_for_every_layer_of_a_stacked_buffer_at_b1_h1():
    for layout in ("bhsd", "bshd"):
        shape = (4, 1, 1, 40, 16) if layout == "bhsd" else (4, 1, 40, 1, 16)
        storage = torch.randn(shape)
        for layer in range(4):
            buf = _layer_view(storage, layout, layer)
            view, cap = capacity_view(buf[:, :, :10])
            assert cap == 40, (layout, layer, cap)
            assert torch.equal(view, buf)
            view, cap = capacity_view(buf[:, :, 5:15])  # a slice at an offset: up to its row's end
            assert cap == 35 and torch.equal(view, buf[:, :, 5:])


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(2, 1, 1, 40, 16),  # [k|v, B, H, cap, D]
        lambda: torch.randn(3, 2, 1, 1, 40, 16)[1],  # layer 1 of [layers, k|v, B, H, cap, D]
        lambda: torch.randn(2, 3, 1, 1, 40, 16)[:, 1],  # layer 1 of [k|v, layers, B, H, cap, D]
        lambda: torch.randn(2 * 40 * 16).view(2, 1, 1, 40, 16),  # one flat storage
    ],
    ids=["kv", "layers-kv", "kv-layers", "flat"],
)
def test_capacity_view_of_k_and_v_sharing_one_storage(make):
    kv = make()
    k, v = kv[0][:, :, :10], kv[1][:, :, :10]
    assert capacity_view(k)[1] == capacity_view(v)[1] == 40
    assert capacity_view(k)[0].untyped_storage().data_ptr() == kv.untyped_storage().data_ptr()


def test_capacity_view_of_packed_kv_in_one_tensor():
    packed = torch.randn(1, 40, 2, 1, 16)  # [B, cap, k|v, H, D]: K and V interleaved per position
    k, v = (packed[:, :10, i].transpose(1, 2) for i in range(2))
    assert capacity_view(k)[1] == capacity_view(v)[1] == 40


def test_capacity_view_without_evidence_of_the_row_pitch_is_none():
    # Layer 0 of [layers, cap, D] seen as [1, 1, L, D] with stride-0 (broadcast) B and H: no stride says
    # where the buffer ends (the next layer follows), only the storage does: no capacity is claimed.
    stacked = torch.randn(3, 40, 16)
    assert capacity_view(stacked[0].as_strided((1, 1, 10, 16), (0, 0, 16, 1))) is None
    # Unsqueezed, torch gives the size-1 dimensions the pitch as stride: every layer then holds 40.
    assert (
        capacity_view(stacked[0][None, None, :10])[1] == capacity_view(stacked[2][None, None, :10])[1] == 40
    )


def test_every_layer_of_a_stacked_b1_h1_cache_shares_one_plan(torch_sdpa_calls):
    gen = torch.Generator().manual_seed(9)
    k_all = torch.randn(3, 1, 1, 48, 16, generator=gen)
    v_all = torch.randn(3, 1, 1, 48, 16, generator=gen)
    q = torch.randn(1, 2, 1, 16, generator=gen)
    sdpa_module.clear_plan_cache()
    for layer in range(3):
        k, v = k_all[layer][:, :, :20], v_all[layer][:, :, :20]
        out = kvdecode.sdpa(q, k, v, enable_gqa=True, backend="triton")
        ref, _ = reference_decode_attention(q, k, v, torch.full((1,), 20, dtype=torch.int32))
        check_close(out, ref, torch.float32, f"sdpa layer {layer}", 9)
    assert sdpa_module.plan_cache_info()["size"] == 1
    assert not torch_sdpa_calls


def test_capacity_view_of_v_in_the_second_half_of_each_row():
    rows = torch.randn(2, 2, 80, 16)  # [B, H, 2 * cap, D]: K in positions 0..39, V in 40..79
    k, v = rows[:, :, :10], rows[:, :, 40:50]
    assert capacity_view(v)[1] == 40  # up to the end of its row, not into the next row's K
    assert capacity_view(k)[1] == 80  # one longer row, as far as a view can tell: sdpa takes the smaller


def test_capacity_view_of_a_sequence_outermost_buffer_is_none():
    # [cap, B, H, D] seen as BHSD: B and H strides are below the sequence stride, nothing says where the
    # buffer ends ([layers, cap, B, H, D] would continue into the next layer): torch SDPA serves it.
    sbhd = torch.randn(2, 40, 2, 3, 16)
    assert capacity_view(sbhd[0, :10].permute(1, 2, 0, 3)) is None


def test_sdpa_compiles_without_a_graph_break_and_takes_the_fast_path():
    """Inside torch.compile a qualifying call is one op (torch.ops.kvdecode.sdpa): fullgraph=True
    would raise on a graph break; the plan cache shows the fast path ran when the graph did."""
    from kvdecode.plan import PLANS
    from kvdecode.reference import assert_close_to_reference

    torch.manual_seed(0)
    kb, vb, q = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 4, 1, 16)

    def step(q, kb, vb, length: int):
        return kvdecode.sdpa(q, kb[:, :, :length], vb[:, :, :length], enable_gqa=True, backend="triton") * 2

    PLANS.clear()
    out = torch.compile(step, backend="aot_eager", fullgraph=True)(q, kb, vb, 10)
    ref, _ = kvdecode.reference_decode_attention(q, kb, vb, torch.tensor([10], dtype=torch.int32))
    assert_close_to_reference(out / 2, ref, torch.float32, "compiled kvdecode.sdpa")
    assert PLANS.cache_info()["misses"] == 1


def test_sdpa_op_passes_opcheck():
    import kvdecode.ops  # noqa: F401  (registers the ops)

    kb, vb, q = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 4, 1, 16)
    args = (q, kb[:, :, :10], vb[:, :, :10], False, None, True, "triton")
    torch.library.opcheck(torch.ops.kvdecode.sdpa.default, args)


def test_sdpa_op_output_strides_match_its_fake(monkeypatch):
    """The op's fake says contiguous, so its real output must be too, fall-through included: CUDA's
    flash/efficient SDPA returns a BTHD-strided [B, H, T, D] (inductor's assert_size_stride fails on it).
    Here torch SDPA is replaced by one returning that layout, on a call that falls through inside the op."""
    import kvdecode.ops  # noqa: F401  (registers the ops)

    real = F.scaled_dot_product_attention

    def bthd(*args, **kwargs):
        return real(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)

    monkeypatch.setattr(F, "scaled_dot_product_attention", bthd)
    q, k, v = (torch.randn(1, 2, 4, 16) for _ in range(3))  # exact-length K/V: not a slice, falls through
    out = torch.ops.kvdecode.sdpa(q, k, v, True, None, False, "triton")
    assert out.stride() == torch.empty_like(q, memory_format=torch.contiguous_format).stride()
    torch.testing.assert_close(out, real(q, k, v, is_causal=True))
