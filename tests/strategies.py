"""Hypothesis strategies for decode problems, input builders, the shared closeness checks and
:class:`DispatchedOps` (which ops a block dispatches).

A :class:`Case` is pure data (shapes, lengths, layouts, a seed); :func:`make_inputs` turns it into
tensors on a device, always from the same seed, so a failing case is reproduced from its printed repr::

    from strategies import Case, make_inputs
    inputs = make_inputs(Case(...), "cuda")

Sizes are weighted to the edges the kernels get wrong: length T_q (1 for plain decode), length =
capacity, lengths at block (16/32/64/128) and split boundaries, non-power-of-two head dims, GQA ratios
1, 2, 3, 4, 7, 8 and MQA, T_q > 1, strided layouts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from kvdecode.problem import SUPPORTED_DTYPES
from kvdecode.reference import TOLERANCES as TOLERANCES  # the one table, re-exported for the tests
from kvdecode.reference import assert_close_to_reference, assert_lse_close

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GQA_GROUPS = (1, 2, 3, 4, 7, 8)
BLOCK_EDGES = (16, 32, 64, 128)
KV_LAYOUTS = ("bhsd", "bshd", "slice", "packed")
Q_LAYOUTS = ("contiguous", "bthd", "slice")
OUT_LAYOUTS = ("contiguous", "bthd")


@dataclass(frozen=True)
class Sizes:
    """Upper bounds for one device: the interpreter is slow, the GPU is not."""

    max_batch: int
    max_kv_heads: int
    head_dims: tuple[int, ...]
    capacities: tuple[int, ...]
    max_q_len: int
    budget: int  # max B * H_q * T_q * capacity * D (the float64 reference's work)


CPU_SIZES = Sizes(
    max_batch=3,
    max_kv_heads=2,
    head_dims=(16, 32, 64, 40, 24, 48),
    capacities=(16, 17, 31, 32, 33, 64, 65, 100, 128, 129, 255, 256),
    max_q_len=8,
    budget=2**20,
)
GPU_SIZES = Sizes(
    max_batch=8,
    max_kv_heads=8,
    head_dims=(128, 64, 16, 32, 80, 96, 112, 160, 192, 256, 24, 40, 72),
    capacities=(16, 64, 65, 127, 128, 129, 256, 511, 1000, 1024, 1025, 2048, 4096, 8192, 16384),
    max_q_len=16,
    budget=2**25,
)


def sizes_for(device: str) -> Sizes:
    return GPU_SIZES if device == "cuda" else CPU_SIZES


@dataclass(frozen=True)
class Case:
    """One decode call as data; ``make_inputs`` builds its tensors from ``seed``."""

    batch: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    q_len: int
    capacity: int
    dtype: torch.dtype
    seq_lens: tuple[int, ...]
    kv_start: tuple[int, ...] | None = None
    mask_kind: str = "none"  # "none", "bool", "additive"
    mask_shape: tuple[int, ...] | None = None
    mask_dtype: torch.dtype | None = None
    mask_expanded: bool = False  # pass the mask as a stride-0 expand() to the full shape
    mask_density: float = 0.5  # bool: P(True); additive: P(-inf) is 1 - density when < 0.5
    kv_layout: str = "bhsd"
    q_layout: str = "contiguous"
    out_layout: str = "contiguous"
    scale: float | None = None
    seed: int = 0
    window: int | None = None
    softcap: float | None = None
    sinks: bool = False  # attention sinks: randn * 2 per query head, drawn after everything else
    sinks_dtype: torch.dtype = torch.float32  # or q's dtype (gpt-oss keeps its sinks in the model's)

    @property
    def name(self) -> str:
        """Same format as ``DecodeProblem.name`` plus the layouts, for failure messages."""
        names = SUPPORTED_DTYPES  # the library's short names: torch.bfloat16 -> "bf16"
        dt = names[self.dtype]
        parts = [
            f"b{self.batch}_hq{self.num_q_heads}_hkv{self.num_kv_heads}_d{self.head_dim}",
            f"tq{self.q_len}_cap{self.capacity}_{dt}",
        ]
        if self.kv_start is not None:
            parts.append("kvstart")
        if self.mask_kind != "none":
            parts.append(f"mask{self.mask_kind}")
        if self.window is not None:
            parts.append(f"win{self.window}")
        if self.softcap is not None:
            parts.append(f"softcap{self.softcap:g}")
        if self.sinks:
            parts.append("sinks" + ("" if self.sinks_dtype == torch.float32 else names[self.sinks_dtype]))
        parts.append(f"kv{self.kv_layout}_q{self.q_layout}_out{self.out_layout}")
        return "_".join(parts)

    def repro(self) -> str:
        return f"make_inputs({self!r}, device)"


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    seq_lens: torch.Tensor
    kv_start: torch.Tensor | None
    mask: torch.Tensor | None
    out: torch.Tensor  # poisoned with NaN
    scale: float | None
    window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None

    def kwargs(self) -> dict:
        named = (("window", self.window), ("softcap", self.softcap), ("sinks", self.sinks))
        extra = {k: v for k, v in named if v is not None}
        return dict(kv_start=self.kv_start, mask=self.mask, scale=self.scale, **extra)


# ---- building tensors ----


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def _kv_tensors(case: Case, gen: torch.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, n, d = case.batch, case.num_kv_heads, case.capacity, case.head_dim
    dt = case.dtype
    if case.kv_layout == "bhsd":
        return tuple(_randn(gen, b, h, n, d).to(device, dt) for _ in range(2))  # type: ignore[return-value]
    if case.kv_layout == "bshd":
        return tuple(_randn(gen, b, n, h, d).to(device, dt).transpose(1, 2) for _ in range(2))  # type: ignore[return-value]
    if case.kv_layout == "slice":
        pad = 3 if case.seed % 2 else 8  # odd and even row pitches
        bufs = [_randn(gen, b + 1, h + 1, n + 5, d + pad).to(device, dt) for _ in range(2)]
        return tuple(buf[1:, 1:, 2 : n + 2, :d] for buf in bufs)  # type: ignore[return-value]
    if case.kv_layout == "packed":  # one [B, cap, 2, H_kv, D] buffer holds both
        buf = _randn(gen, b, n, 2, h, d).to(device, dt)
        return buf[:, :, 0].transpose(1, 2), buf[:, :, 1].transpose(1, 2)
    raise ValueError(case.kv_layout)


def _q_tensor(case: Case, gen: torch.Generator, device: str) -> torch.Tensor:
    b, h, t, d = case.batch, case.num_q_heads, case.q_len, case.head_dim
    if case.q_layout == "contiguous":
        return _randn(gen, b, h, t, d).to(device, case.dtype)
    if case.q_layout == "bthd":
        return _randn(gen, b, t, h, d).to(device, case.dtype).transpose(1, 2)
    if case.q_layout == "slice":
        return _randn(gen, b, h + 1, t + 1, d + 8).to(device, case.dtype)[:, 1:, :t, :d]
    raise ValueError(case.q_layout)


def _mask_tensor(case: Case, gen: torch.Generator, device: str) -> torch.Tensor | None:
    if case.mask_kind == "none":
        return None
    shape = case.mask_shape
    assert shape is not None
    u = torch.rand(*shape, generator=gen)
    if case.mask_kind == "bool":
        m = (u < case.mask_density).to(device)
    else:
        vals = _randn(gen, *shape) * 2.0
        if case.mask_density < 0.5:
            vals = vals.masked_fill(u < 1.0 - case.mask_density, -math.inf)
        m = vals.to(device, case.mask_dtype or case.dtype)
    if case.mask_expanded:
        m = m.expand(case.batch, case.num_q_heads, case.q_len, case.capacity)
    return m


def make_out(case: Case, device: str) -> torch.Tensor:
    """An output buffer filled with NaN: any element the kernel does not write stays NaN."""
    b, h, t, d = case.batch, case.num_q_heads, case.q_len, case.head_dim
    if case.out_layout == "bthd":
        out = torch.empty(b, t, h, d, dtype=case.dtype, device=device).transpose(1, 2)
    else:
        out = torch.empty(b, h, t, d, dtype=case.dtype, device=device)
    return out.fill_(math.nan)


def make_inputs(case: Case, device: str) -> Inputs:
    gen = torch.Generator().manual_seed(case.seed)
    q = _q_tensor(case, gen, device)
    k, v = _kv_tensors(case, gen, device)
    seq_lens = torch.tensor(case.seq_lens, dtype=torch.int32, device=device)
    kv_start = None
    if case.kv_start is not None:
        kv_start = torch.tensor(case.kv_start, dtype=torch.int32, device=device)
    mask = _mask_tensor(case, gen, device)
    out = make_out(case, device)
    sinks = (_randn(gen, case.num_q_heads) * 2.0).to(device, case.sinks_dtype) if case.sinks else None
    return Inputs(q, k, v, seq_lens, kv_start, mask, out, case.scale, case.window, case.softcap, sinks)


def poison_unfilled(inputs: Inputs, case: Case, value: float = math.nan) -> None:
    """Write ``value`` (NaN by default) into every cache slot outside ``[kv_start, seq_len)``: slots no
    query may see. A large finite value still proves they get zero weight."""
    for b, n in enumerate(case.seq_lens):
        start = case.kv_start[b] if case.kv_start is not None else 0
        for cache in (inputs.k, inputs.v):
            cache[b, :, n:].fill_(value)
            cache[b, :, :start].fill_(value)


# ---- checks ----


def check_close(
    out: torch.Tensor,
    ref: torch.Tensor,
    dtype: torch.dtype,
    problem_name: str,
    seed: int,
    *,
    repro: str | None = None,
) -> None:
    """:func:`kvdecode.reference.assert_close_to_reference` (``TOLERANCES[dtype].rel_l2``, overall and per
    batch row, no NaN), the failure naming the problem, the seed and (when given) a reproduction."""
    _checked(assert_close_to_reference, out, ref, dtype, _where(problem_name, seed, repro))


def check_lse(
    lse: torch.Tensor,
    ref_lse: torch.Tensor,
    dtype: torch.dtype,
    problem_name: str,
    seed: int,
    *,
    repro: str | None = None,
) -> None:
    """:func:`kvdecode.reference.assert_lse_close`: float32 ``[B, H_q, T_q]``, -inf exactly where the
    reference is, finite entries within ``TOLERANCES[dtype].lse * max(1, |ref|)`` (the LSE is accumulated
    in float32, so not the output's tolerance; see :data:`kvdecode.reference.TOLERANCES`)."""
    _checked(assert_lse_close, lse, ref_lse, dtype, _where(problem_name, seed, repro))


def _where(problem_name: str, seed: int, repro: str | None) -> str:
    return f"{problem_name} seed={seed}" + (f"\n  reproduce: {repro}" if repro else "")


def _checked(check, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, where: str) -> None:
    try:
        check(got, ref, dtype, where)
    except AssertionError as exc:
        _fail(str(exc))


def check_empty_rows(out: torch.Tensor, ref: torch.Tensor, where: str) -> None:
    """Where the reference row is all zeros (nothing visible) the output must be exactly zero."""
    empty = (ref == 0).all(dim=-1)
    got = out.detach().to("cpu")[empty]
    if got.numel() and not (got == 0).all():
        _fail(f"{where}: rows with nothing visible must be zeros, got max |x| = {got.abs().max().item()}")


def _fail(msg: str) -> None:
    print(msg)  # shown by pytest with the failure
    raise AssertionError(msg)


# ---- strategies ----


def _edge_or_any(draw: st.DrawFn, lo: int, hi: int, edges: list[int]) -> int:
    """An integer in [lo, hi]: mostly an edge (lo, hi, block/split boundaries), sometimes any."""
    kind = draw(st.integers(0, 9))
    if kind < 2:
        return lo
    if kind < 4:
        return hi
    inside = sorted({e for e in edges if lo <= e <= hi})
    if kind < 8 and inside:
        return draw(st.sampled_from(inside))
    return draw(st.integers(lo, hi))


def length_edges(capacity: int) -> list[int]:
    edges = [capacity - 1, capacity // 2, capacity // 2 + 1]
    for blk in BLOCK_EDGES:
        for m in range(1, capacity // blk + 1):
            edges += [m * blk - 1, m * blk, m * blk + 1]
    for s in (2, 3, 4, 5, 8):  # split boundaries for a few split counts
        edges += [capacity // s, capacity // s + 1, math.ceil(capacity / s)]
    return edges


@st.composite
def heads(draw: st.DrawFn, max_kv_heads: int, kv_heads: tuple[int, ...] | None = None) -> tuple[int, int]:
    """(H_q, H_kv) with ratio in GQA_GROUPS, or MQA (H_kv = 1, many query heads); ``kv_heads``: H_kv
    from these only (no MQA unless 1 is among them)."""
    if kv_heads is not None:
        num_kv = draw(st.sampled_from(kv_heads))
        return draw(st.sampled_from(GQA_GROUPS)) * num_kv, num_kv
    if draw(st.integers(0, 7)) == 0:
        return draw(st.sampled_from((4, 8, 16, 32) if max_kv_heads > 2 else (4, 5, 8))), 1
    group = draw(st.sampled_from(GQA_GROUPS))
    num_kv = draw(st.integers(1, max_kv_heads))
    return group * num_kv, num_kv


@st.composite
def _mask_spec(draw: st.DrawFn, full: tuple[int, int, int, int], dtype: torch.dtype) -> dict:
    kind = draw(st.sampled_from(("none", "none", "bool", "additive")))
    if kind == "none":
        return {}
    rank = draw(st.integers(1, 4))
    keep = [draw(st.booleans()) for _ in range(3)]
    shape = [n if k else 1 for n, k in zip(full[:3], keep)] + [full[3] if draw(st.integers(0, 5)) else 1]
    spec = dict(
        mask_kind=kind,
        mask_shape=tuple(shape[4 - rank :]),
        mask_expanded=draw(st.integers(0, 4)) == 0,
        mask_density=draw(st.sampled_from((0.9, 0.5, 0.1, 1.0) if kind == "bool" else (1.0, 0.8))),
    )
    if kind == "additive":
        spec["mask_dtype"] = draw(st.sampled_from((dtype, torch.float32)))
    return spec


@st.composite
def cases(
    draw: st.DrawFn,
    device: str = "cpu",
    *,
    dtypes: tuple[torch.dtype, ...] = DTYPES,
    masks: bool = True,
    kv_start: bool = True,
    head_dims: tuple[int, ...] | None = None,
    windows: bool = True,
    sinks: bool = True,
    kv_heads: tuple[int, ...] | None = None,
) -> Case:
    """A valid decode call (``T_q <= seq_lens <= capacity``, ``0 <= kv_start <= seq_lens - T_q``), a third
    of them with a sliding window (1, tile and split edges, T_q, the capacity and past it) and a quarter
    with a logit softcap (``windows=False`` leaves out both) and a quarter with attention sinks, float32
    or of q's dtype (``sinks=False`` leaves them out). ``kv_heads``: the KV head counts to draw from."""
    sz = sizes_for(device)
    dtype = draw(st.sampled_from(dtypes))
    head_dim = draw(st.sampled_from(head_dims or sz.head_dims))
    num_q, num_kv = draw(heads(sz.max_kv_heads, kv_heads))
    batch = draw(st.integers(1, sz.max_batch))
    q_lens = (1, 1, 2, 3, 4, 5, 7, 8) + ((9, 16) if sz.max_q_len >= 16 else ())
    q_len = draw(st.sampled_from(q_lens if sz.max_q_len >= 8 else (1, 2)))
    max_cap = max(q_len, sz.budget // (batch * num_q * q_len * head_dim))
    caps = [c for c in sz.capacities if q_len <= c <= max_cap] or [max(q_len, min(sz.capacities[0], max_cap))]
    capacity = draw(st.sampled_from(caps))
    edges = length_edges(capacity)
    lens = tuple(_edge_or_any(draw, q_len, capacity, edges) for _ in range(batch))
    starts = None
    if kv_start and draw(st.booleans()):
        starts = tuple(_edge_or_any(draw, 0, n - q_len, [*BLOCK_EDGES, 64 + 1, n - q_len - 1]) for n in lens)
    spec = draw(_mask_spec((batch, num_q, q_len, capacity), dtype)) if masks else {}
    window = None
    if windows and draw(st.integers(0, 2)) == 0:
        edges = [1, 2, q_len, q_len + 1, *BLOCK_EDGES, 17, 65, capacity // 3, capacity - 1, capacity]
        window = _edge_or_any(draw, 1, capacity + 8, edges)
    softcap = None
    if windows and draw(st.integers(0, 3)) == 0:
        softcap = draw(st.sampled_from((0.5, 5.0, 30.0, 50.0, 1e4)))  # Gemma 2: 50 (attention)
    return Case(
        batch=batch,
        num_q_heads=num_q,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        q_len=q_len,
        capacity=capacity,
        dtype=dtype,
        seq_lens=lens,
        kv_start=starts,
        kv_layout=draw(st.sampled_from(KV_LAYOUTS)),
        q_layout=draw(st.sampled_from(Q_LAYOUTS)),
        out_layout=draw(st.sampled_from(OUT_LAYOUTS)),
        scale=draw(st.sampled_from((None, None, None, 0.3, 1.0))),
        seed=draw(st.integers(0, 2**31 - 1)),
        window=window,
        softcap=softcap,
        sinks=(with_sinks := sinks and draw(st.integers(0, 3)) == 0),
        sinks_dtype=draw(st.sampled_from((torch.float32, dtype))) if with_sinks else torch.float32,
        **spec,
    )


def packed_heads_options(case: Case) -> list[int]:
    """The ``heads_per_cta`` values > 1 that serve ``case``: powers of two dividing H_kv whose query rows
    (``heads * group * T_q``) fit one row block (``8192 // BLOCK_D`` rows, at least 16)."""
    block_d = max(16, 1 << (case.head_dim - 1).bit_length())
    rows = case.num_q_heads // case.num_kv_heads * case.q_len
    options = [1 << k for k in range(1, 4)]
    return [h for h in options if case.num_kv_heads % h == 0 and h * rows <= max(16, 8192 // block_d)]


SHARED_MEMORY_BUDGET = 160 * 1024  # below the 227 KB an H100/H200 CTA may have: room for what is not counted


def tiles_that_fit(case: Case, heads: int, stages: int = 2, block_ns=(16, 32, 64)) -> list[int]:
    """The ``block_n`` values whose K/V staging fits a CTA's shared memory with ``heads`` KV heads per
    program: heads x 2 tiles x block_n x BLOCK_D x element bytes x (stages - 1) buffers (Triton 3.6 gave
    137 KB for 4 bf16 heads of 64 keys at D 128 and 2 stages, 131 KB by this count). On a GPU a config over
    the limit is refused (``KVDecodeError``), which is not what these tests are about."""
    block_d = max(16, 1 << (case.head_dim - 1).bit_length())
    size = case.dtype.itemsize
    return [
        n for n in block_ns if heads * 2 * n * block_d * size * max(1, stages - 1) <= SHARED_MEMORY_BUDGET
    ]


def with_(case: Case, **changes) -> Case:
    return replace(case, **changes)


class DispatchedOps(TorchDispatchMode):
    """The names of the ops a block dispatches, custom ops included (``kvdecode.append_kv``)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def check_direct_arguments(args: list, binder: list) -> int:
    """A direct Triton launch's arguments against the binder's (:class:`BoundKernel`): position by
    position, an integer where the binder has a tensor, equal to its ``data_ptr()``, and the same
    value and type elsewhere. Returns the number of tensors."""
    assert len(args) == len(binder)
    tensors = 0
    for i, (a, b) in enumerate(zip(args, binder)):
        if isinstance(b, torch.Tensor):
            tensors += 1
            assert type(a) is int and a == b.data_ptr(), f"argument {i}: {a!r} is not the tensor's pointer"
        else:
            assert a == b and type(a) is type(b), f"argument {i}: {a!r} != {b!r}"
    return tensors
