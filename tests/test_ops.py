"""torch.ops.kvdecode.decode_attention: torch.library.opcheck, parity with decode_attention, tracing.

CPU runs go through the Triton interpreter (tiny fp32 shapes); GPU tests (``-m gpu``) add opcheck in
half precision and a ``torch.compile(mode="reduce-overhead")`` step replayed while the lengths change.
"""

from __future__ import annotations

import pytest
import torch
from strategies import DispatchedOps

import kvdecode
from kvdecode.ops import decode_attention_op
from kvdecode.reference import assert_close_to_reference, reference_decode_attention

OP = torch.ops.kvdecode.decode_attention.default


def _inputs(b=2, hq=4, hkv=2, t=1, cap=48, d=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (
        torch.randn(shape, generator=g).to(device=device, dtype=dtype)
        for shape in ((b, hq, t, d), (b, hkv, cap, d), (b, hkv, cap, d))
    )
    lens = torch.tensor([cap - 5 * i for i in range(b)], dtype=torch.int32, device=device)
    start = torch.tensor([3 * i for i in range(b)], dtype=torch.int32, device=device)
    return q, k, v, lens, start


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("extras", ["none", "kv_start", "kv_start+mask"])
def test_opcheck_cpu(t, extras):
    q, k, v, lens, start = _inputs(t=t)
    kv_start = start if "kv_start" in extras else None
    mask = None
    if "mask" in extras:
        mask = torch.ones(q.shape[0], 1, t, k.shape[2], dtype=torch.bool)
        mask[:, :, :, 7] = False
    out = torch.empty_like(q)
    torch.library.opcheck(OP, (q, k, v, lens, kv_start, mask, out, 0.25, k.shape[2]))


@pytest.mark.parametrize("t", [1, 3])
def test_opcheck_cpu_with_window_softcap_and_sinks(t):
    q, k, v, lens, start = _inputs(t=t)
    sinks = torch.linspace(-2.0, 2.0, q.shape[1])
    out = torch.empty_like(q)
    torch.library.opcheck(
        OP, (q, k, v, lens, start, None, out, 0.25, k.shape[2]), dict(window=9, softcap=3.0, sinks=sinks)
    )


def test_the_op_takes_none_for_every_optional_value():
    """The schema says "none" as decode_attention does (None), not with sentinels (-1, 0.0)."""
    q, k, v, lens, _ = _inputs()
    args = (q, k, v, lens, None, None, torch.empty_like(q), 0.25, None)
    torch.library.opcheck(OP, args, dict(window=None, softcap=None, sinks=None))
    schema = {a.name: str(a.type) for a in OP._schema.arguments}
    assert {schema[n] for n in ("max_seq_len", "window", "softcap")} == {"Optional[int]", "Optional[float]"}


def test_op_takes_window_softcap_and_sinks_like_decode_attention():
    q, k, v, lens, start = _inputs(t=2)
    extras = dict(window=7, softcap=2.5, sinks=torch.linspace(-1.0, 1.0, q.shape[1]))
    got = decode_attention_op(q, k, v, lens, kv_start=start, max_seq_len=k.shape[2], **extras)
    want = kvdecode.decode_attention(q, k, v, lens, kv_start=start, **extras)
    ref, _ = reference_decode_attention(q, k, v, lens, kv_start=start, **extras)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(got, ref.to(got.dtype), atol=1e-5, rtol=1e-5)
    for bad, match in ((dict(window=0), "window must be"), (dict(softcap=-1.0), "softcap must be")):
        with pytest.raises(kvdecode.KVDecodeError, match=match):
            decode_attention_op(q, k, v, lens, **bad)


def test_op_matches_decode_attention_and_reference():
    q, k, v, lens, start = _inputs(t=2)
    got = decode_attention_op(q, k, v, lens, kv_start=start, max_seq_len=k.shape[2])
    want = kvdecode.decode_attention(q, k, v, lens, kv_start=start)
    ref, _ = reference_decode_attention(q, k, v, lens, kv_start=start)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(got, ref.to(got.dtype), atol=1e-5, rtol=1e-5)


def test_op_writes_a_strided_out_in_place():
    q, k, v, lens, _ = _inputs()
    buf = torch.full((q.shape[0], q.shape[2], q.shape[1], q.shape[3]), float("nan"))  # BSHD
    got = decode_attention_op(q, k, v, lens, out=buf.transpose(1, 2), max_seq_len=k.shape[2])
    assert got.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf.transpose(1, 2), kvdecode.decode_attention(q, k, v, lens))


def test_compile_traces_the_op_without_graph_breaks():
    q, k, v, lens, start = _inputs()

    def step(q, k, v, lens, start):
        return decode_attention_op(q, k, v, lens, kv_start=start, scale=0.25, max_seq_len=k.shape[2]) * 2

    explained = torch._dynamo.explain(step)(q, k, v, lens, start)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, lens, start), step(q, k, v, lens, start))


def test_the_ops_carry_no_python_autograd_layers_and_bump_what_they_write():
    """``torch.library.custom_op`` adds Python Autograd and ADInplaceOrView kernels that rebuilt the
    schema's arguments twice per call (~85 µs of a ~175 µs eager decode call on a CPU host, every
    layer of an eager HF step). The ops are registered with one CompositeExplicitAutograd kernel
    instead; what they write has its version bumped, as an in-place op's would be."""
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    for name in ("kvdecode::decode_attention", "kvdecode::append_kv", "kvdecode::sdpa"):
        assert has_kernel(name, "CompositeExplicitAutograd")
        assert not has_kernel(name, "Autograd") and not has_kernel(name, "ADInplaceOrView"), name
    q, k, v, lens, start = _inputs(t=2)
    want = kvdecode.decode_attention(q, k, v, lens, kv_start=start)
    out = torch.empty_like(q)
    before = out._version
    with torch.no_grad(), DispatchedOps() as seen:
        decode_attention_op(q, k, v, lens, kv_start=start, max_seq_len=k.shape[2], out=out)
    assert "kvdecode.decode_attention" in seen.names
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    assert out._version > before  # autograd sees the write
    k8, v8 = (torch.zeros(2, 2, 8, 16, dtype=torch.float8_e4m3fn) for _ in range(2))
    new = torch.ones(2, 2, 1, 16, dtype=torch.bfloat16)
    versions = (k8._version, v8._version)
    torch.ops.kvdecode.append_kv(k8, v8, new, new, torch.tensor(3), torch.tensor(1.0), torch.tensor(1.0))
    assert (k8._version, v8._version) > versions and k8[:, :, 2].float().eq(1).all()


def test_what_sees_ops_still_sees_the_op_on_an_eager_call():
    """What once bypassed the op (a direct eager path, since replaced) lost: torch.jit.trace recorded
    nothing (on a GPU the traced graph would return an unwritten buffer), meta tensors skipped the op's
    fake implementation, and the profiler lost the op's name."""
    q, k, v, lens, start = _inputs()

    def step(q, k, v, lens, start):
        return decode_attention_op(q, k, v, lens, kv_start=start, scale=0.25, max_seq_len=48)  # (capacity)

    with torch.no_grad():
        traced = torch.jit.trace(step, (q, k, v, lens, start), check_trace=False)
        assert "kvdecode::decode_attention" in str(traced.graph)
        torch.testing.assert_close(traced(q, k, v, lens, start), step(q, k, v, lens, start), atol=0, rtol=0)
        meta = [t.to("meta") for t in (q, k, v, lens, start)]
        got = decode_attention_op(*meta[:4], kv_start=meta[4], max_seq_len=k.shape[2])
        assert got.is_meta and got.shape == q.shape
        k8, v8 = (t.to("meta", torch.float8_e4m3fn) for t in (k, v))
        new = torch.zeros(2, 2, 1, 16, dtype=torch.bfloat16, device="meta")
        torch.ops.kvdecode.append_kv(
            k8, v8, new, new, lens.to("meta"), torch.ones((), device="meta"), torch.ones((), device="meta")
        )
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step(q, k, v, lens, start)
        assert "kvdecode::decode_attention" in {e.name for e in prof.events()}


def test_bad_input_raises_kvdecode_error():
    q, k, v, lens, _ = _inputs()
    with pytest.raises(kvdecode.KVDecodeError, match=r"seq_lens\.dtype"):
        decode_attention_op(q, k, v, lens.long(), max_seq_len=k.shape[2])
    with pytest.raises(kvdecode.KVDecodeError, match="max_seq_len"):
        decode_attention_op(q, k, v, lens, max_seq_len=1.5)
    with pytest.raises(kvdecode.KVDecodeError, match="q must be a 4-D"):
        decode_attention_op(q[0], k, v, lens)
    with pytest.raises(kvdecode.KVDecodeError, match=r"out\.shape"):
        OP(q, k, v, lens, None, None, torch.empty(1), 0.25, None)


# ---- GPU ----


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_opcheck_gpu(dtype):
    q, k, v, lens, start = _inputs(hq=32, hkv=8, t=2, cap=2048, d=128, dtype=dtype, device="cuda")
    mask = torch.ones(q.shape[0], 1, 2, k.shape[2], dtype=torch.bool, device="cuda")
    for kv_start, m in ((None, None), (start, None), (start, mask)):
        torch.library.opcheck(OP, (q, k, v, lens, kv_start, m, torch.empty_like(q), 0.0884, k.shape[2]))


@pytest.mark.gpu
def test_reduce_overhead_replays_follow_device_lengths():
    q, k, v, lens, start = _inputs(b=4, hq=32, hkv=8, cap=4096, d=128, dtype=torch.bfloat16, device="cuda")

    @torch.compile(mode="reduce-overhead", fullgraph=True)
    def step(q, k, v, lens, start):
        return decode_attention_op(q, k, v, lens, kv_start=start, max_seq_len=k.shape[2])

    for n in (100, 1000, 4000, 17, 4096):
        lens.fill_(n)
        got = step(q, k, v, lens, start).clone()
        ref, _ = reference_decode_attention(q, k, v, lens, kv_start=start)
        assert_close_to_reference(got, ref, got.dtype, f"reduce-overhead replay at length {n}")


def test_append_op_refuses_a_tensor_on_another_device_before_any_launch():
    """The append kernel's direct launch takes raw addresses: a tensor on another device than the
    cache would be read at a host (or another GPU's) address, so the op's implementation names it.
    (Called directly: with a meta tensor among the arguments the dispatcher runs the op's fake.)"""
    from kvdecode.ops import _append_impl

    k = torch.zeros(2, 2, 8, 16)
    new = torch.ones(2, 2, 1, 16)
    lens = torch.tensor([3, 1], dtype=torch.int32)
    with pytest.raises(kvdecode.KVDecodeError, match=r"k_new must be on k_cache's device \(cpu\)"):
        _append_impl(k, k, new.to("meta"), new, lens)
    with pytest.raises(kvdecode.KVDecodeError, match="seq_lens must be on k_cache's device"):
        _append_impl(k, k, new, new, lens.to("meta"))
    assert k.eq(0).all()  # nothing written
