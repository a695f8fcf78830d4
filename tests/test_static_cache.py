"""StaticKVCache on the CPU (Triton interpreter): append/advance/reset semantics, overflow, attend.

Every check compares the whole K/V storage (all layers, all rows) against a Python model, with the
buffers poisoned with NaN first, so a write to a wrong slot and a missing write both fail.
"""

from __future__ import annotations

import math

import pytest
import torch
from strategies import TOLERANCES, check_close, check_direct_arguments

import kvdecode
from kvdecode import KVDecodeError, StaticKVCache
from kvdecode.reference import reference_decode_attention

DEV = "cpu"


def make_cache(layout="bhsd", dtype=torch.float32, **kw) -> StaticKVCache:
    args = dict(num_layers=2, batch=3, num_kv_heads=2, capacity=32, head_dim=16)
    args.update({k: kw.pop(k) for k in list(kw) if k in args})
    cache = StaticKVCache(**args, dtype=dtype, device=DEV, layout=layout, backend="triton", **kw)
    cache.k_buffer.fill_(math.nan)
    cache.v_buffer.fill_(math.nan)
    return cache


def new_tokens(cache: StaticKVCache, q_len: int, gen: torch.Generator, *, strided: bool = False):
    """Fresh K/V for one step; ``strided`` gives a non-contiguous [B, H_kv, T_q, D] view of BTHD."""
    b, h, d = cache.batch, cache.num_kv_heads, cache.head_dim
    if strided:
        k = torch.randn(b, q_len, h, d, generator=gen).transpose(1, 2)
        v = torch.randn(b, q_len, h, d, generator=gen).transpose(1, 2)
    else:
        k, v = torch.randn(b, h, q_len, d, generator=gen), torch.randn(b, h, q_len, d, generator=gen)
    return k.to(cache.dtype), v.to(cache.dtype)


def model_append(model_k, model_v, cache, layer, k, v, lens_after):
    """What append must do, written out: token t of row b at lens_after[b] - T_q + t, if < capacity."""
    view = (lambda t: t) if cache.layout == "bhsd" else (lambda t: t.transpose(1, 2))
    mk, mv = view(model_k[layer]), view(model_v[layer])
    q_len = k.shape[2]
    for b, n in enumerate(lens_after):
        for t in range(q_len):
            pos = n - q_len + t
            if 0 <= pos < cache.capacity:
                mk[b, :, pos] = k[b, :, t]
                mv[b, :, pos] = v[b, :, t]


def assert_storage(cache, model_k, model_v):
    for name, got, want in (("K", cache.k_buffer, model_k), ("V", cache.v_buffer, model_v)):
        same = (got == want) | (torch.isnan(got) & torch.isnan(want))
        if not same.all():
            first = (~same).nonzero()[0].tolist()
            raise AssertionError(f"{name} storage differs from the model at [layer, ...] = {first}")


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_append_writes_each_row_at_its_length(layout, dtype):
    gen = torch.Generator().manual_seed(1)
    cache = make_cache(layout, dtype)
    model_k, model_v = cache.k_buffer.clone(), cache.v_buffer.clone()
    lens = [0, 5, 29]
    cache.set_lengths(lens)
    for q_len, layer, strided in [(3, 1, True), (1, 0, False), (2, 1, False)]:
        k, v = new_tokens(cache, q_len, gen, strided=strided)
        cache.advance(q_len)
        lens_after = cache.seq_lens.tolist()
        assert lens_after == [n + q_len for n in lens]
        lens = lens_after
        cache.append(layer, k, v)
        model_append(model_k, model_v, cache, layer, k, v, lens_after)
        assert_storage(cache, model_k, model_v)


@pytest.mark.parametrize("fp8", [False, True])
def test_direct_append_arguments_are_the_binder_arguments_as_pointers(monkeypatch, fp8):
    """The append kernel's direct launch passes integers where Triton's binder gets tensors: every
    integer is that tensor's ``data_ptr()``, every other argument the same, and the specialization key
    tells apart what Triton compiles apart (the tensors' dtypes)."""
    from kvdecode import _append
    from kvdecode.quant import quantize_fp8

    seen = []

    class Recorder:
        def __call__(self, grid, args, spec, binder):
            seen.append((args, binder(), spec))

    monkeypatch.setattr(_append, "bound_kernel", lambda fn, name, device, **options: Recorder())
    new = torch.randn(2, 2, 3, 16, dtype=torch.bfloat16)
    if fp8:
        k, k_scale = quantize_fp8(torch.randn(2, 2, 32, 16))
        v, v_scale = quantize_fp8(torch.randn(2, 2, 32, 16))
        scales = (k_scale, v_scale)
    else:
        k, v, scales = torch.zeros(2, 2, 32, 16), torch.zeros(2, 2, 32, 16), None
    for lens in (torch.tensor([5, 9], dtype=torch.int32), torch.tensor([5, 9])):
        _append.append_kv(k, v, new, new[:, :, :2].float() if not fp8 else new, lens, scales)
    spec32, spec64 = (spec for _, _, spec in seen)
    assert spec32 != spec64  # int32 and int64 lengths compile apart
    if fp8:  # the new tokens' dtype too (an fp8 cache takes fp16, bf16 or fp32 and quantizes)
        _append.append_kv(k, v, new.half(), new.half(), torch.tensor([5, 9], dtype=torch.int32), scales)
        assert seen[-1][2] != spec32
        seen.pop()
    for args, binder, _ in seen:
        assert check_direct_arguments(args, binder) == 7


def test_layout_views_share_the_storage():
    cache = StaticKVCache(3, 2, 4, 24, 8, dtype=torch.float16, device=DEV, layout="bshd")
    assert cache.k_buffer.shape == (3, 2, 24, 4, 8)
    k1 = cache.keys(1)
    assert k1.shape == (2, 4, 24, 8)
    assert k1.stride() == (24 * 4 * 8, 8, 4 * 8, 1)
    assert k1.data_ptr() == cache.k_buffer[1].data_ptr()
    bhsd = StaticKVCache(3, 2, 4, 24, 8, dtype=torch.float16, device=DEV)
    assert bhsd.values(2).shape == (2, 4, 24, 8) and bhsd.values(2).is_contiguous()


def test_reset_zeroes_only_the_given_rows():
    cache = make_cache(batch=4, left_padded=True)
    cases = [
        ([2], [5, 6, 0, 8]),
        (torch.tensor([True, False, False, True]), [0, 6, 7, 0]),
        (torch.tensor([1], dtype=torch.int32), [5, 0, 7, 8]),
        (None, [0, 0, 0, 0]),
    ]
    for rows, want in cases:
        cache.set_lengths([5, 6, 7, 8], kv_start=[1, 2, 3, 4])
        cache.reset(rows)
        assert cache.seq_lens.tolist() == want
        assert cache.kv_start.tolist() == [s if n else 0 for s, n in zip([1, 2, 3, 4], want)]
        assert cache.seq_lens.dtype == torch.int32
    with pytest.raises(KVDecodeError, match=r"rows must hold row indices in 0..3, got 4"):
        cache.reset([4])
    with pytest.raises(KVDecodeError, match=r"rows.shape must be \(4,\)"):
        cache.reset(torch.tensor([True, False]))


def test_advance_by_tensor_and_overflow_raises_naming_the_row():
    cache = make_cache(capacity=8, validate=True)
    cache.set_lengths([7, 2, 0])
    with pytest.raises(KVDecodeError, match=r"seq_lens\[0\] after advance .* got 9; row 0 is full"):
        cache.advance(2)
    assert cache.seq_lens.tolist() == [7, 2, 0]  # nothing changed
    cache.advance(torch.tensor([1, 3, 0], dtype=torch.int32))
    assert cache.seq_lens.tolist() == [8, 5, 0]
    with pytest.raises(KVDecodeError, match=r"seq_lens\[1\] after advance .* got 9; row 1 is full"):
        cache.advance(torch.tensor([0, 4, 1], dtype=torch.int32))
    with pytest.raises(KVDecodeError, match=r"n.dtype must be int32"):
        cache.advance(torch.tensor([0, 4, 1]))


def test_append_before_advance_raises_with_validation():
    cache = make_cache(validate=True)
    cache.set_lengths([3, 0, 4])
    k, v = new_tokens(cache, 1, torch.Generator().manual_seed(2))
    with pytest.raises(KVDecodeError, match=r"seq_lens\[1\] must be >= T_q \(1\)"):
        cache.append(0, k, v)
    assert torch.isnan(cache.k_buffer).all()  # raised before any launch


def test_overflow_without_validation_never_writes_out_of_bounds():
    gen = torch.Generator().manual_seed(3)
    cache = make_cache(capacity=8)
    model_k, model_v = cache.k_buffer.clone(), cache.v_buffer.clone()
    cache.set_lengths([6, 0, 8])
    cache.advance(4)  # rows 0 and 2 go past capacity: 10 and 12
    assert cache.overflowed().tolist() == [True, False, True]
    k, v = new_tokens(cache, 4, gen)
    cache.append(0, k, v)
    model_append(model_k, model_v, cache, 0, k, v, [10, 4, 12])
    assert_storage(cache, model_k, model_v)  # row 0 wrote slots 6, 7 only; row 2 nothing; no spill


def test_bad_append_arguments_raise():
    cache = make_cache()
    k, v = new_tokens(cache, 2, torch.Generator().manual_seed(4))
    with pytest.raises(KVDecodeError, match=r"k_new.shape must be \[3, 2, T_q >= 1, 16\]"):
        cache.append(0, k[:, :1].contiguous(), v)
    with pytest.raises(KVDecodeError, match=r"v_new.dtype must be the cache's dtype"):
        cache.append(0, k, v.double())
    with pytest.raises(KVDecodeError, match=r"v_new.shape must equal k_new.shape"):
        cache.append(0, k, v[:, :, :1])
    with pytest.raises(KVDecodeError, match=r"layer must be an int in 0..1, got 2"):
        cache.append(2, k, v)
    with pytest.raises(KVDecodeError, match="layout must be 'bhsd' or 'bshd'"):
        StaticKVCache(1, 1, 1, 8, 8, dtype=torch.float32, device=DEV, layout="sbhd")
    with pytest.raises(KVDecodeError, match="capacity must be a positive int, got 0"):
        StaticKVCache(1, 1, 1, 0, 8, dtype=torch.float32, device=DEV)


@pytest.mark.parametrize(("layout", "dtype"), [("bhsd", torch.float32), ("bshd", torch.float16)])
def test_decode_steps_match_the_reference(layout, dtype):
    """advance -> append -> attend per layer, T_q 1 and 2, ragged lengths, a reset in between."""
    gen = torch.Generator().manual_seed(5)
    cache = make_cache(layout, dtype, num_kv_heads=1, capacity=48, validate=True)
    for layer in range(2):  # unwritten slots must hold finite data for the reference, not NaN
        cache.keys(layer).copy_(torch.randn(cache.keys(layer).shape, generator=gen))
        cache.values(layer).copy_(torch.randn(cache.values(layer).shape, generator=gen))
    cache.set_lengths([0, 17, 40])
    for step, q_len in enumerate([1, 2, 1]):
        if step == 2:
            cache.reset([2])
        cache.advance(q_len)
        for layer in range(2):
            k, v = new_tokens(cache, q_len, gen)
            q = torch.randn(3, 3, q_len, 16, generator=gen).to(dtype)
            cache.append(layer, k, v)
            out = cache.attend(layer, q)
            ref, _ = reference_decode_attention(q, cache.keys(layer), cache.values(layer), cache.seq_lens)
            check_close(out, ref, dtype, f"cache step {step} layer {layer}", 5)
    assert cache.seq_lens.tolist() == [4, 21, 1]


def test_left_padded_attend_and_plans_are_shared():
    gen = torch.Generator().manual_seed(6)
    cache = make_cache(left_padded=True, num_kv_heads=1, capacity=16)
    prompt_len = 5
    cache.advance(prompt_len)
    k, v = new_tokens(cache, prompt_len, gen)
    cache.append(1, k, v)  # a left-padded prompt written as one chunk
    cache.set_lengths(cache.seq_lens, kv_start=[0, 3, 1])
    q = torch.randn(3, 2, prompt_len, 16, generator=gen)
    out, lse = cache.attend(1, q, return_lse=True)
    ref, ref_lse = reference_decode_attention(
        q, cache.keys(1), cache.values(1), cache.seq_lens, kv_start=cache.kv_start
    )
    check_close(out, ref, torch.float32, "left-padded prefill", 6)
    assert torch.isneginf(lse[1, :, :3]).all() and (out[1, :, :3] == 0).all()  # padded queries see nothing
    torch.testing.assert_close(
        lse[:, :, 3:].double(), ref_lse[:, :, 3:], rtol=TOLERANCES[torch.float32].lse, atol=0
    )
    assert cache.plan_for(q) is cache.plan_for(q.clone())
    assert cache.plan_for(q).problem.has_kv_start
    assert isinstance(cache.plan_for(q), kvdecode.DecodePlan)


def test_window_and_softcap_reach_attend():
    """A cache made with a sliding window and a logit softcap (a Gemma-2 local layer) attends with both."""
    gen = torch.Generator().manual_seed(8)
    cache = make_cache(num_kv_heads=1, capacity=48, window=5, softcap=2.0)
    for layer in range(2):
        cache.keys(layer).copy_(torch.randn(cache.keys(layer).shape, generator=gen))
        cache.values(layer).copy_(torch.randn(cache.values(layer).shape, generator=gen))
    cache.set_lengths([3, 17, 40])
    q = torch.randn(3, 3, 2, 16, generator=gen) * 3
    out = cache.attend(1, q)
    ref, _ = reference_decode_attention(
        q, cache.keys(1), cache.values(1), cache.seq_lens, window=5, softcap=2.0
    )
    check_close(out, ref, torch.float32, "window 5, softcap 2", 8)
    plain, _ = reference_decode_attention(q, cache.keys(1), cache.values(1), cache.seq_lens)
    assert not torch.allclose(out.double(), plain, atol=1e-3)  # both took effect
    assert cache.plan_for(q).problem.window == 5 and cache.plan_for(q).problem.softcap == 2.0
    sinks = torch.tensor([0.5, -1.0, 2.0])  # a layer's attention sinks, one per query head
    out = cache.attend(1, q, sinks=sinks)
    ref, _ = reference_decode_attention(
        q, cache.keys(1), cache.values(1), cache.seq_lens, window=5, softcap=2.0, sinks=sinks
    )
    check_close(out, ref, torch.float32, "window 5, softcap 2, sinks", 8)
    assert cache.plan_for(q, sinks=sinks).problem.has_sinks


def test_attend_with_a_query_the_cache_cannot_serve_raises():
    cache = make_cache()
    with pytest.raises(KVDecodeError, match=r"k_cache.dtype must equal q.dtype"):
        cache.attend(0, torch.randn(3, 2, 1, 16, dtype=torch.float64).half())
    with pytest.raises(KVDecodeError, match=r"num_q_heads \(3\) must be a multiple of num_kv_heads \(2\)"):
        cache.attend(0, torch.randn(3, 3, 1, 16))


def test_attend_checks_only_its_output_and_refuses_one_inside_the_layer(monkeypatch):
    """attend makes its problem from q and the cache's own tensors, so it no longer runs the plan's
    input checks a second time (23 -> 19 µs of host time on a CPU); the output is still checked against
    the layer it attends: an ``out`` inside layer 1's K or V, or kv_start, is refused before a launch."""
    import sys

    plan_module = sys.modules["kvdecode.plan"]  # (kvdecode.plan is also the function)
    gen = torch.Generator().manual_seed(9)
    cache = make_cache(left_padded=True, num_kv_heads=1, capacity=16)
    cache.set_lengths([4, 9, 16], kv_start=[0, 2, 1])
    for layer in range(2):
        cache.keys(layer).copy_(torch.randn(cache.keys(layer).shape, generator=gen))
        cache.values(layer).copy_(torch.randn(cache.values(layer).shape, generator=gen))
    q = torch.randn(3, 2, 1, 16, generator=gen)
    cache.attend(1, q)  # plans made
    seen = []
    monkeypatch.setattr(plan_module, "check_inputs", lambda *a: seen.append(1))
    out = torch.full_like(q, math.nan)
    cache.attend(1, q, out=out)
    ref, _ = reference_decode_attention(
        q, cache.keys(1), cache.values(1), cache.seq_lens, kv_start=cache.kv_start
    )
    check_close(out, ref, torch.float32, "attend(out=)", 9)
    assert seen == []
    with pytest.raises(KVDecodeError, match=r"on q's device \(meta\)"):  # (it aliased the CPU problem)
        cache.attend(1, q.to("meta"))
    for name, inside in (("k_cache", cache.keys(1)), ("v_cache", cache.values(1))):
        before = inside.clone()
        with pytest.raises(KVDecodeError, match=f"out must not share memory with {name}"):
            cache.attend(1, q, out=inside.reshape(-1)[: q.numel()].view(q.shape))
        assert torch.equal(inside, before)


# ---- hostile rows, lengths and arguments (issue 12, defects 3 and 6) ----


def test_reset_with_an_out_of_range_or_negative_host_index_raises_and_changes_nothing():
    cache = make_cache(batch=4, left_padded=True)
    cache.set_lengths([5, 6, 7, 8], kv_start=[1, 2, 3, 4])
    for rows, bad in ((torch.tensor([7]), 7), (torch.tensor([1, -1]), -1), ([-4], -4), ((0, 2**40), 2**40)):
        with pytest.raises(KVDecodeError, match=rf"rows must hold row indices in 0..3, got {bad}"):
            cache.reset(rows)
        assert cache.seq_lens.tolist() == [5, 6, 7, 8] and cache.kv_start.tolist() == [1, 2, 3, 4]
    cache.reset([])  # nothing to reset
    cache.reset(torch.tensor([], dtype=torch.int64))
    assert cache.seq_lens.tolist() == [5, 6, 7, 8]


@pytest.mark.parametrize(
    "rows, match",
    [
        (3, "rows must be None, a bool mask"),
        (1.5, "rows must be None, a bool mask"),
        ([1.0], r"rows must hold row indices in 0..3, got 1.0"),
        ([True], r"rows must hold row indices in 0..3, got True"),
        (torch.tensor([[1]]), r"rows must be a bool mask \[B\] or a 1-D integer index tensor"),
        (torch.tensor([1.0]), r"rows must be a bool mask \[B\] or a 1-D integer index tensor"),
    ],
)
def test_reset_with_a_wrong_type_raises_naming_rows(rows, match):
    with pytest.raises(KVDecodeError, match=match):
        make_cache(batch=4).reset(rows)


def test_device_row_mask_ignores_out_of_range_indices_without_a_sync():
    from kvdecode._cache_checks import device_row_mask

    rows = torch.tensor([7, -1, 1, 2**40, -(2**40), 1, 3])
    assert device_row_mask(rows, 4).tolist() == [False, True, False, True]
    assert device_row_mask(torch.tensor([], dtype=torch.int32), 4).tolist() == [False] * 4


@pytest.mark.parametrize(
    "lens, match",
    [
        ([1.7, 2, 3], r"seq_lens must hold ints .* got 1.7"),
        (torch.tensor([1.0, 2.0, 3.0]), r"seq_lens must hold ints .* got 1.0"),
        ([True, 2, 3], r"seq_lens must hold ints"),
        ([2**40, 0, 0], r"seq_lens\[0\] must be in 0..capacity \(32\), got 1099511627776"),
        ([2**70, 0, 0], r"seq_lens\[0\] must be in 0..capacity \(32\), got 1180591620717411303424"),
        ([1, -1, 0], r"seq_lens\[1\] must be in 0..capacity \(32\), got -1"),
        (torch.tensor([1, 2, 33]), r"seq_lens\[2\] must be in 0..capacity \(32\), got 33"),
        ("abc", r"seq_lens must hold ints"),
        (5, r"seq_lens must hold ints"),
        ([1, 2], r"seq_lens.shape must be \(3,\)"),
    ],
)
def test_set_lengths_checks_host_values_without_validate(lens, match):
    cache = make_cache()
    cache.set_lengths([4, 5, 6])
    with pytest.raises(KVDecodeError, match=match):
        cache.set_lengths(lens)
    assert cache.seq_lens.tolist() == [4, 5, 6]


def test_set_lengths_checks_host_kv_start():
    cache = make_cache(left_padded=True)
    with pytest.raises(KVDecodeError, match=r"kv_start must hold ints .* got 0.5"):
        cache.set_lengths([4, 5, 6], kv_start=[0.5, 0, 0])
    with pytest.raises(KVDecodeError, match=r"kv_start\[2\] must be in 0..capacity \(32\), got -2"):
        cache.set_lengths([4, 5, 6], kv_start=[0, 0, -2])
    cache.set_lengths(torch.tensor([4, 5, 6]), kv_start=torch.tensor([1, 2, 3]))  # int64 host: fine
    assert cache.seq_lens.tolist() == [4, 5, 6] and cache.kv_start.tolist() == [1, 2, 3]
    assert cache.seq_lens.dtype == cache.kv_start.dtype == torch.int32


@pytest.mark.parametrize("n", [2**40, 2**31, -1, 33, 1.0, True, "1", None])
def test_advance_by_an_int_out_of_range_or_of_a_wrong_type_raises(n):
    cache = make_cache(capacity=32)
    cache.set_lengths([1, 2, 3])
    with pytest.raises(KVDecodeError, match=r"^n must be"):
        cache.advance(n)
    assert cache.seq_lens.tolist() == [1, 2, 3]
    cache.advance(32)  # a whole capacity at once is allowed (the rows overflow, as documented)
    assert cache.overflowed().tolist() == [True] * 3


def test_advance_by_a_host_tensor_checks_its_values():
    cache = make_cache(capacity=32)
    with pytest.raises(KVDecodeError, match=r"n\[1\] must be in 0..capacity \(32\), got -1"):
        cache.advance(torch.tensor([1, -1, 0], dtype=torch.int32))
    with pytest.raises(KVDecodeError, match=r"n\[0\] must be in 0..capacity \(32\), got 2147483647"):
        cache.advance(torch.tensor([2**31 - 1, 0, 0], dtype=torch.int32))
    assert cache.seq_lens.tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(device="cuda:99"), r"device must be"),
        (dict(device="nonsense"), r"device must be"),
        (dict(device=3), r"device must be a torch.device or a string"),
        (dict(device="meta"), r"device must be a CPU or CUDA device"),
        (dict(dtype=[]), r"dtype must be one of"),
        (dict(dtype="float32"), r"dtype must be one of"),
        (dict(layout=["bhsd"]), r"layout must be 'bhsd' or 'bshd'"),
        (dict(left_padded="yes"), r"left_padded must be a bool, got 'yes'"),
        (dict(validate=1), r"validate must be a bool, got 1"),
        (dict(deterministic=[]), r"deterministic must be a bool, got \[\]"),
        (dict(scale="x"), r"scale must be None or a positive finite float, got 'x'"),
        (dict(scale=float("nan")), r"scale must be None or a positive finite float, got nan"),
        (dict(scale=-1.0), r"scale must be None or a positive finite float, got -1.0"),
        (dict(backend=3), r"backend must be one of"),
        (dict(capacity=2**31), r"capacity must be a positive int <= 2147483647, got 2147483648"),
        (dict(batch=2.0), r"batch must be a positive int"),
    ],
)
def test_constructor_arguments_of_a_wrong_type_or_value_raise(kw, match):
    args = dict(num_layers=1, batch=1, num_kv_heads=1, capacity=8, head_dim=8, dtype=torch.float32)
    args.setdefault("device", DEV)
    args.update(kw)
    with pytest.raises(KVDecodeError, match=match):
        StaticKVCache(**args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_a_cuda_cache_without_cuda_raises_kvdecode_error():
    with pytest.raises(KVDecodeError, match=r"device must be .*CUDA is not available.*device='cpu'"):
        StaticKVCache(1, 1, 1, 8, 8, dtype=torch.float32, device="cuda")


# ---- on the GPU: device rows and lengths are clamped there, with no host sync ----


def _gpu_cache(**kw) -> StaticKVCache:
    return StaticKVCache(1, 4, 1, 32, 16, dtype=torch.float16, device="cuda", backend="triton", **kw)


@pytest.mark.gpu
def test_gpu_reset_with_out_of_range_device_indices_ignores_them():
    cache = _gpu_cache(left_padded=True)
    cache.set_lengths([5, 6, 7, 8], kv_start=[1, 2, 3, 4])
    cache.reset(torch.tensor([7, -1, 1, 2**40], device="cuda"))  # no device-side assert
    torch.cuda.synchronize()
    assert cache.seq_lens.tolist() == [5, 0, 7, 8] and cache.kv_start.tolist() == [1, 0, 3, 4]
    cache.reset(torch.tensor([2], dtype=torch.int32))  # a host index tensor is checked and copied
    assert cache.seq_lens.tolist() == [5, 0, 0, 8]
    with pytest.raises(KVDecodeError, match=r"rows must hold row indices in 0..3, got 7"):
        cache.reset(torch.tensor([7]))
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_gpu_reset_with_device_indices_under_capture():
    cache = _gpu_cache()
    rows = torch.tensor([3, 9], device="cuda")
    cache.set_lengths([5, 6, 7, 8])
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        cache.reset(rows)  # warm up outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            cache.reset(rows)
    cache.set_lengths([5, 6, 7, 8])
    rows.copy_(torch.tensor([-2, 0]))
    graph.replay()
    torch.cuda.synchronize()
    assert cache.seq_lens.tolist() == [0, 6, 7, 8]


@pytest.mark.gpu
def test_gpu_device_lengths_and_increments_are_clamped_on_the_device():
    cache = _gpu_cache(left_padded=True)
    lens = torch.tensor([40, -3, 5, 2**30], dtype=torch.int32, device="cuda")
    starts = torch.tensor([-1, 0, 99, 2], device="cuda")
    cache.set_lengths(lens, kv_start=starts)
    assert cache.seq_lens.tolist() == [32, 0, 5, 32] and cache.kv_start.tolist() == [0, 0, 32, 2]
    cache.set_lengths([0, 0, 0, 0])
    cache.advance(torch.tensor([2**30, -5, 1, 32], dtype=torch.int32, device="cuda"))
    assert cache.seq_lens.tolist() == [32, 0, 1, 32]
    with pytest.raises(KVDecodeError, match=r"seq_lens must hold ints"):
        cache.set_lengths(torch.tensor([1.5, 0, 0, 0], device="cuda"))
