"""Properties of the Triton split-KV kernel against the float64 reference.

Every property runs twice: on CPU tensors through the Triton interpreter (only where there is no CUDA, so
``TRITON_INTERPRET=1``; small shapes, the ``cpu`` hypothesis profile) and on CUDA behind the ``gpu`` marker
(full-size shapes, the ``gpu`` profile). Outputs are prefilled with NaN, so an element the kernel never
writes fails the check. A failure prints the problem's name, the seed and a ``make_inputs(Case(...))``
line that rebuilds the exact tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import smoke_examples
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import (
    DTYPES,
    TOLERANCES,
    Case,
    cases,
    check_close,
    check_empty_rows,
    check_lse,
    make_inputs,
    make_out,
    packed_heads_options,
    poison_unfilled,
    tiles_that_fit,
    with_,
)

import kvdecode
from kvdecode import DecodeProblem, UnsupportedError, reference_decode_attention
from kvdecode.problem import SUPPORTED_DTYPES
from kvdecode.triton_kernels import SplitKVConfig, SplitKVLauncher, TritonBackend
from kvdecode.triton_kernels.config import MAX_SPLITS, interpreter_active
from kvdecode.triton_kernels.launcher import FUSED_SCRATCH

DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            torch.cuda.is_available() or not interpreter_active(),
            reason="CPU tensors run only through the Triton interpreter (TRITON_INTERPRET=1, no CUDA)",
        ),
    ),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
# The slowest GPU properties (each example a new kernel family to compile) run as one item per dtype there,
# so that three workers share their examples; one item drawing every dtype under the interpreter.
DTYPE_SHARDS = DTYPES if torch.cuda.is_available() else (None,)


def _dtypes(shard: torch.dtype | None) -> tuple[torch.dtype, ...]:
    return DTYPES if shard is None else (shard,)


def run_triton(case: Case, x, **kw):
    out, lse = kvdecode.decode_attention(
        x.q, x.k, x.v, x.seq_lens, backend="triton", out=x.out, return_lse=True, **x.kwargs(), **kw
    )
    assert out is x.out, "out= must be written in place and returned"
    return out, lse


def check_all(case: Case, out, lse, ref_out, ref_lse) -> None:
    where = f"{case.name} seed={case.seed}\n  reproduce: {case.repro()}"
    check_close(out, ref_out, case.dtype, case.name, case.seed, repro=case.repro())
    check_empty_rows(out, ref_out, where)
    if lse is not None:
        check_lse(lse, ref_lse, case.dtype, case.name, case.seed, repro=case.repro())


def reference(x):
    return reference_decode_attention(x.q, x.k, x.v, x.seq_lens, **x.kwargs())


def launch_and_check(case: Case, x, launch, what: str, ref_out, ref_lse, device):
    """One launch into NaN-poisoned ``out`` and ``lse``, checked against the reference; ``(out, lse)``."""
    out = make_out(case, device)
    lse = torch.full((case.batch, case.num_q_heads, case.q_len), math.nan, device=device)
    launch(x.q, x.k, x.v, x.seq_lens, x.kv_start, x.mask, out, lse, sinks=x.sinks)
    try:
        check_all(case, out, lse, ref_out, ref_lse)
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}") from None
    return out, lse


# ---- the main property ----


@pytest.mark.slow  # tens of seconds on the GPU: started first (conftest)
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_matches_reference(device, data):
    """Any valid call: shapes, GQA/MQA, T_q, ragged lengths, kv_start, masks, dtypes, layouts."""
    case = data.draw(cases(device), label="case")
    x = make_inputs(case, device)
    ref_out, ref_lse = reference(x)
    out, lse = run_triton(case, x)
    check_all(case, out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [80, 96, 112, 128, 160, 192, 256])
def test_large_and_odd_head_dims(device, head_dim):
    """Explicit examples for the head dims the interpreter property keeps out (too slow there)."""
    i = [80, 96, 112, 128, 160, 192, 256].index(head_dim)
    case = Case(
        batch=2, num_q_heads=6, num_kv_heads=2, head_dim=head_dim, q_len=1 + i % 3, capacity=72,
        dtype=(torch.bfloat16, torch.float16, torch.float32)[i % 3], seq_lens=(72, 33 + i),
        kv_start=(3, 0) if i % 2 else None, mask_kind=("none", "bool", "additive")[i % 3],
        mask_shape=(2, 1, 1, 72), kv_layout=("bshd", "bhsd", "slice", "packed")[i % 4], seed=1000 + i,
    )  # fmt: skip
    x = make_inputs(case, device)
    ref_out, ref_lse = reference(x)
    out, lse = run_triton(case, x)
    check_all(case, out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("device", DEVICES)
def test_many_packed_rows_span_several_row_blocks(device):
    """GROUP * T_q = 64 packed query rows at D 256 exceed one row block (32 rows there), so several
    programs (program_id(2) > 0) share each K/V tile range; T_q 16 is the longest speculation DESIGN names."""
    case = Case(
        batch=1, num_q_heads=4, num_kv_heads=1, head_dim=256, q_len=16, capacity=40, dtype=torch.float16,
        seq_lens=(37,), kv_start=(2,), seed=77,
    )  # fmt: skip
    x = make_inputs(case, device)
    ref_out, ref_lse = reference(x)
    out, lse = run_triton(case, x)
    check_all(case, out, lse, ref_out, ref_lse)
    problem = DecodeProblem.from_tensors(x.q, x.k, x.v, x.seq_lens, **x.kwargs(), out=x.out)
    cfg = SplitKVConfig(num_splits=3, block_n=16, fused_merge=True)  # each row block its own counter
    launch = TritonBackend().make_launcher(problem, config=cfg)
    assert launch.split_grid[2] == 2
    for call in range(2):
        launch_and_check(case, x, launch, f"{cfg.name}, call {call}", ref_out, ref_lse, device)


def _step_mask(case: Case, hole: tuple[int, int] | None = None) -> torch.Tensor:
    """A transformers step's mask ``[B, 1, 1, capacity]``: True on each row's keys ``kv_start .. seq_len - 1``
    (what the lengths already admit), False before (left padding) and after (unfilled slots), and False at
    ``hole = (row, key)`` when given."""
    mask = torch.zeros(case.batch, 1, 1, case.capacity, dtype=torch.bool)
    for b, n in enumerate(case.seq_lens):
        mask[b, ..., (case.kv_start[b] if case.kv_start else 0) : n] = True
    if hole is not None:
        mask[hole[0], ..., hole[1]] = False
    return mask


@pytest.mark.parametrize("device", DEVICES)
@smoke_examples(25)
@given(data=st.data())
def test_a_step_mask_true_on_every_visible_key_gives_the_masked_result(device, data):
    """A one-row mask (``MASK_KIND`` 3) True on every key a row's lengths admit lets a program skip its
    loads (it checks its own tiles first: ``mask_check``, on, off or by default); one hole among those
    keys must still be seen by the programs whose tiles hold it. Any split count, tile, KV heads per
    program, T_q, kv_start, window; the cache outside the lengths poisoned with NaN."""
    case = data.draw(cases(device, dtypes=(torch.bfloat16, torch.float32), masks=False), label="case")
    assume(all(n > (case.kv_start[b] if case.kv_start else 0) for b, n in enumerate(case.seq_lens)))
    hole = None
    if data.draw(st.booleans(), label="hole"):
        row = data.draw(st.integers(0, case.batch - 1), label="row")
        start = case.kv_start[row] if case.kv_start else 0
        hole = (row, data.draw(st.integers(start, case.seq_lens[row] - 1), label="key"))
    case = with_(case, mask_kind="bool", mask_shape=(case.batch, 1, 1, case.capacity))
    x = make_inputs(with_(case, mask_kind="none", mask_shape=None), device)
    x.mask = _step_mask(case, hole).to(device)
    heads = data.draw(st.sampled_from([1, *packed_heads_options(case)]), label="heads_per_cta")
    block_n = data.draw(st.sampled_from(tiles_that_fit(case, heads)), label="block_n")
    splits = data.draw(st.sampled_from((1, 2, 3, 5) if device == "cpu" else (1, 2, 8, 33)), label="splits")
    check = data.draw(st.sampled_from((None, True, False)), label="mask_check")
    ref_out, ref_lse = reference(x)
    poison_unfilled(x, case)
    problem = DecodeProblem.from_tensors(x.q, x.k, x.v, x.seq_lens, **x.kwargs(), out=x.out)
    cfg = SplitKVConfig(num_splits=splits, block_n=block_n, heads_per_cta=heads, mask_check=check)
    launch = TritonBackend().make_launcher(problem, config=cfg)
    assert launch.mask_kind == 3 and (check is None or launch.mask_check == check)
    launch_and_check(case, x, launch, f"config {cfg.name}, hole {hole}", ref_out, ref_lse, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "splits, block_n, holes",
    [(1, 16, (2540, 3, 2549)), (2, 64, (2437, 2497, 3))],
    ids=["more-tiles-than-checked", "tiles-spread-past-the-checked-span"],
)
def test_a_program_checks_its_own_tiles_of_the_mask(device, splits, block_n, holes):
    """A program checks at most 2048 keys of its mask row up front (``CHECK_TILES`` tiles): one with more
    tiles (160 of 16 keys) must read the mask per tile, and one whose tiles are dealt every ``num_splits``
    (20 of 64 keys each, spread over 40) must check those, not the next 32: a hole past either span (tile
    158; tiles 38 and 39) is seen."""
    case = Case(
        batch=1, num_q_heads=2, num_kv_heads=1, head_dim=16, q_len=1, capacity=2560, dtype=torch.float32,
        seq_lens=(2550,), kv_start=(3,), mask_kind="bool", mask_shape=(1, 1, 1, 2560), seed=17,
    )  # fmt: skip
    x = make_inputs(with_(case, mask_kind="none", mask_shape=None), device)
    for hole in (None, *((0, key) for key in holes)):
        x.mask = _step_mask(case, hole).to(device)
        ref_out, ref_lse = reference(x)
        problem = DecodeProblem.from_tensors(x.q, x.k, x.v, x.seq_lens, **x.kwargs(), out=x.out)
        cfg = SplitKVConfig(num_splits=splits, block_n=block_n)
        launch = TritonBackend().make_launcher(problem, config=cfg)
        assert launch.mask_check  # (several tiles a program: on by default)
        launch_and_check(case, x, launch, f"{cfg.name}, hole {hole}", ref_out, ref_lse, device)


def test_packed_heads_with_a_shared_mask_row_and_several_tokens():
    """Packed heads (2 per program) with the one-row mask kernel (MASK_KIND 3: a ``[B, 1, 1, L]`` bool
    mask broadcast over heads and tokens, with holes), T_q 3, kv_start, sinks, one split and several."""
    case = Case(
        batch=2, num_q_heads=8, num_kv_heads=4, head_dim=32, q_len=3, capacity=80, dtype=torch.bfloat16,
        seq_lens=(80, 41), kv_start=(5, 0), mask_kind="bool", mask_shape=(2, 1, 1, 80), mask_density=0.6,
        sinks=True, seed=91,
    )  # fmt: skip
    x = make_inputs(case, "cpu")
    ref_out, ref_lse = reference(x)
    problem = DecodeProblem.from_tensors(x.q, x.k, x.v, x.seq_lens, **x.kwargs(), out=x.out)
    for splits in (1, 3):
        cfg = SplitKVConfig(num_splits=splits, block_n=16, heads_per_cta=2, fused_merge=splits == 3)
        launch = TritonBackend().make_launcher(problem, config=cfg)
        assert launch.mask_kind == 3
        launch_and_check(case, x, launch, cfg.name, ref_out, ref_lse, "cpu")


def test_packed_heads_reach_kv_heads_past_2_gib_of_elements():
    """The offset of a program's later KV heads (``j * stride_kh``) is 64-bit: with 8 heads per program
    and a head stride of 2^29 elements, head 7 starts 3.8e9 elements in (an overflow in 32 bits read far
    outside the cache). A head-major buffer viewed as BHSD; the untouched storage is never paged in."""
    stride_h, cap, d = 1 << 29, 32, 16
    storage = torch.empty(7 * stride_h + cap * d, dtype=torch.float8_e4m3fn)
    gen = torch.Generator().manual_seed(5)
    k = storage.as_strided((1, 8, cap, d), (cap * d, stride_h, d, 1))
    v = torch.empty(8 * cap * d, dtype=torch.float8_e4m3fn).view(1, 8, cap, d)
    k.copy_(torch.randn(1, 8, cap, d, generator=gen).to(torch.float8_e4m3fn))
    v.copy_(torch.randn(1, 8, cap, d, generator=gen).to(torch.float8_e4m3fn))
    q = torch.randn(1, 16, 1, d, generator=gen).to(torch.bfloat16)
    lens = torch.tensor([cap - 3], dtype=torch.int32)
    ref, _ = reference_decode_attention(q, k, v, lens)
    problem = DecodeProblem.from_tensors(q, k, v, lens)
    out = torch.full_like(q, math.nan)
    SplitKVLauncher(problem, SplitKVConfig(num_splits=2, block_n=16, heads_per_cta=8))(
        q, k, v, lens, None, None, out, None
    )
    check_close(out, ref, torch.bfloat16, "heads 8, stride_kh 2^29", 5)


# ---- split-count invariance ----


@pytest.mark.slow  # tens of seconds on the GPU: started first (conftest)
@pytest.mark.parametrize("device", DEVICES)
@smoke_examples(25)  # ~4 compiles an example: half the smoke examples keep the GPU pass under 5 minutes
@given(data=st.data())
def test_split_count_invariance(device, data):
    """Different split counts and tile sizes (including more splits than tiles, so some splits are
    empty) all match the reference and each other; NaN-poisoned out and lse prove every element is written."""
    case = data.draw(cases(device), label="case")
    if device == "cuda":  # each count past 1 compiles a merge kernel for its bucket: three counts, not four
        splits = sorted({1, data.draw(st.integers(2, 8), label="s"), data.draw(st.integers(9, MAX_SPLITS))})
    else:  # the interpreter pays for every program, empty ones included
        splits = sorted(
            {1, data.draw(st.integers(2, 5), label="s"), data.draw(st.integers(9, 16), label="S")}
        )
    block_n = data.draw(st.sampled_from((16, 32, 64)), label="block_n")
    x = make_inputs(case, device)
    ref_out, ref_lse = reference(x)
    problem = DecodeProblem.from_tensors(x.q, x.k, x.v, x.seq_lens, **x.kwargs(), out=x.out)
    results = []
    for s in splits:
        cfg = SplitKVConfig(num_splits=s, block_n=block_n)
        launch = TritonBackend().make_launcher(problem, config=cfg)
        out, lse = launch_and_check(case, x, launch, f"config {cfg.name}", ref_out, ref_lse, device)
        results.append((cfg.name, out, lse))
    first_name, first_out, first_lse = results[0]
    for cfg_name, out, lse in results[1:]:
        try:
            vs = f"{case.name} {cfg_name} vs {first_name}"
            check_close(out, first_out, case.dtype, vs, case.seed)
            check_lse(lse, first_lse, case.dtype, vs, case.seed)
        except AssertionError as e:
            raise AssertionError(f"{e}\n  reproduce: {case.repro()}") from None


@pytest.mark.slow  # tens of seconds on the GPU: started first (conftest)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shard", DTYPE_SHARDS, ids=str)
@smoke_examples(9)
@given(data=st.data())
def test_packed_kv_heads_match_reference(device, shard, data):
    """Several KV heads per program (``heads_per_cta``: their query rows share one row block, one dot per
    head summed into one score tile, one softmax) against the float64 reference, with everything the one-head
    path has: masks, kv_start, T_q > 1, windows, softcap, sinks, layouts, one split (the output written
    directly) and several (the merge); NaN-poisoned out and lse prove every element is written."""
    kv_heads = (2, 4) if device == "cpu" else (2, 4, 8)
    splits = (1, 2, 3, 5) if device == "cpu" else (1, 2, 8, 33)
    case, x, cfg, launch, ref_out, ref_lse = _draw_packed_call(data, device, shard, kv_heads, (), splits)
    assert launch.split_grid[1:] == (case.batch * case.num_kv_heads // cfg.heads_per_cta, 1)
    launch_and_check(case, x, launch, f"config {cfg.name}", ref_out, ref_lse, device)


def _draw_packed_call(data, device, shard, kv_heads, extra_heads, splits, **config):
    """A case of the ``shard``'s dtypes with ``kv_heads`` KV heads, a ``heads_per_cta`` that serves it (or
    one of ``extra_heads``), a split count of ``splits`` and a tile that fits the shared memory: ``(case,
    inputs, config, launcher, reference out, reference lse)``."""
    case = data.draw(cases(device, dtypes=_dtypes(shard), kv_heads=kv_heads), label="case")
    options = [*extra_heads, *packed_heads_options(case)]
    assume(options)
    heads = data.draw(st.sampled_from(options), label="heads_per_cta")
    num_splits = data.draw(st.sampled_from(splits), label="splits")
    fits = tiles_that_fit(case, heads)
    assume(fits)
    block_n = data.draw(st.sampled_from(fits), label="block_n")
    x = make_inputs(case, device)
    ref_out, ref_lse = reference(x)
    problem = DecodeProblem.from_tensors(x.q, x.k, x.v, x.seq_lens, **x.kwargs(), out=x.out)
    cfg = SplitKVConfig(num_splits=num_splits, block_n=block_n, heads_per_cta=heads, **config)
    return case, x, cfg, TritonBackend().make_launcher(problem, config=cfg), ref_out, ref_lse


@pytest.mark.slow  # tens of seconds on the GPU: started first (conftest)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shard", DTYPE_SHARDS, ids=str)
@smoke_examples(9)
@given(data=st.data())
def test_fused_merge_matches_reference_call_after_call(device, shard, data):
    """The last split of each program row merges (``fused_merge``; no merge kernel): against the float64
    reference, one KV head or several per program, several calls in a row on one launcher (the
    counters it leaves at zero serve the next call), NaN-poisoned outputs each time."""
    kv_heads = (1, 2, 4) if device == "cpu" else (1, 2, 4, 8)
    splits = (2, 3, 5) if device == "cpu" else (2, 8, 33, 128)
    case, x, cfg, launch, ref_out, ref_lse = _draw_packed_call(data, device, shard, kv_heads, (1,), splits,
                                                               fused_merge=True)  # fmt: skip
    assert launch.fused_eager and launch.fused_captured
    FUSED_SCRATCH.clear()
    scratch = []
    for call in range(2):
        launch_and_check(case, x, launch, f"config {cfg.name}, call {call}", ref_out, ref_lse, device)
        ((partials, counters),) = FUSED_SCRATCH.buffers().values()
        scratch.append((partials.data_ptr(), counters.data_ptr()))
    assert scratch[0] == scratch[1]  # the second call used the first one's partials and counters
    assert counters.numel() >= launch.split_grid[1] * launch.split_grid[2] and not counters.any()


@pytest.mark.parametrize("device", DEVICES)
def test_fused_launchers_of_other_sizes_share_and_grow_one_scratch(device):
    """Two fused launchers of other sizes (the second needs more partials and more counters) alternate on
    one stream's scratch, which grows once and is then reused; every output against the reference, the
    counters left at zero."""
    FUSED_SCRATCH.clear()
    calls = []
    for i, (batch, kv_heads, splits) in enumerate(((1, 1, 2), (3, 2, 3))):
        case = Case(batch=batch, num_q_heads=2 * kv_heads, num_kv_heads=kv_heads, head_dim=16, q_len=1,
                    capacity=48, dtype=torch.float32, seq_lens=(48, 17, 1)[:batch], seed=40 + i)  # fmt: skip
        x = make_inputs(case, device)
        problem = DecodeProblem.from_tensors(x.q, x.k, x.v, x.seq_lens, out=x.out)
        cfg = SplitKVConfig(num_splits=splits, block_n=16, fused_merge=True)
        calls.append((case, x, TritonBackend().make_launcher(problem, config=cfg), *reference(x)))
    sizes = []
    for round_ in range(2):
        for case, x, launch, ref_out, ref_lse in calls:
            launch_and_check(case, x, launch, f"fused, round {round_}", ref_out, ref_lse, device)
            ((partials, counters),) = FUSED_SCRATCH.buffers().values()
            sizes.append((partials.data_ptr(), partials.numel(), counters.numel()))
            assert not counters.any()
    assert sizes[1][1:] == (calls[1][2]._part_elems, calls[1][2]._n_counters)  # grown for the larger
    assert sizes[1] == sizes[2] == sizes[3]  # then reused by both


def test_packed_kv_heads_that_do_not_fit_are_refused_by_name():
    """A ``heads_per_cta`` that does not divide H_kv, or whose rows overflow a row block, is a clear
    ``KVDecodeError`` before any launch; a value that is not a power of two is refused by the config."""
    q = torch.zeros(1, 8, 1, 128)
    k = torch.zeros(1, 2, 64, 128)
    problem = DecodeProblem.from_tensors(q, k, k, torch.tensor([64], dtype=torch.int32))
    with pytest.raises(kvdecode.KVDecodeError, match=r"heads_per_cta=4 does not divide the 2 KV heads"):
        SplitKVLauncher(problem, SplitKVConfig(num_splits=1, heads_per_cta=4))
    q = torch.zeros(1, 128, 1, 128)  # group 32: two heads' 64 rows fill one row block at D 128, 4 overflow
    k = torch.zeros(1, 4, 64, 128)
    problem = DecodeProblem.from_tensors(q, k, k, torch.tensor([64], dtype=torch.int32))
    assert SplitKVLauncher(problem, SplitKVConfig(num_splits=1, heads_per_cta=2)).split_grid == (1, 2, 1)
    with pytest.raises(kvdecode.KVDecodeError, match=r"packs 128 query rows .* \(64\)"):
        SplitKVLauncher(problem, SplitKVConfig(num_splits=1, heads_per_cta=4))
    for bad in (0, 3, -2, 2.0):
        with pytest.raises(kvdecode.KVDecodeError, match=rf"a power of two >= 1, got {bad}"):
            SplitKVConfig(num_splits=1, heads_per_cta=bad)


# ---- empty rows and out-of-range device lengths ----


@st.composite
def empty_row_cases(draw, device: str) -> Case:
    """Rows (or single queries) that see nothing: seq_lens < T_q (0 and negative included), kv_start
    past the query position, kv_start < 0; the contract defines each (README.md, "The call")."""
    case = draw(cases(device, masks=False, kv_start=False, sinks=False))  # sinks: the LSE is the sink
    lens, starts = [], []
    for n in case.seq_lens:
        kind = draw(st.sampled_from(("keep", "short", "zero", "negative", "late_start", "neg_start")))
        start = 0
        if kind == "short":
            n = draw(st.integers(0, case.q_len - 1)) if case.q_len > 1 else 0
        elif kind == "zero":
            n = 0
        elif kind == "negative":
            n = draw(st.integers(-5, -1))
        elif kind == "late_start":
            start = draw(st.integers(max(0, n - case.q_len + 1), n + 3))
        elif kind == "neg_start":
            start = draw(st.integers(-4, -1))
        lens.append(n)
        starts.append(start)
    return with_(case, seq_lens=tuple(lens), kv_start=tuple(starts) if any(starts) else None)


@pytest.mark.slow  # tens of seconds on the GPU: started first (conftest)
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_rows_with_nothing_visible_give_zeros_and_neg_inf(device, data):
    case = data.draw(empty_row_cases(device), label="case")
    x = make_inputs(case, device)
    ref_out, ref_lse = reference(x)
    assert torch.isneginf(ref_lse).any() or all(n >= case.q_len for n in case.seq_lens)
    out, lse = run_triton(case, x)
    check_all(case, out, lse, ref_out, ref_lse)


@pytest.mark.slow  # tens of seconds on the GPU: started first (conftest)
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_masks_that_hide_whole_rows(device, data):
    """A bool mask all False, or an additive mask all -inf, over some (row, head, query): zeros, -inf."""
    case = data.draw(cases(device, masks=False), label="case")
    kind = data.draw(st.sampled_from(("bool", "additive")), label="kind")
    x = make_inputs(case, device)
    g = torch.Generator().manual_seed(case.seed)
    full = (case.batch, case.num_q_heads, case.q_len, case.capacity)
    hidden = torch.rand(*full[:3], 1, generator=g) < 0.4
    if kind == "bool":
        mask = (torch.rand(*full, generator=g) < 0.7) & ~hidden
    else:
        mask = torch.randn(*full, generator=g).masked_fill(hidden, -math.inf).to(case.dtype)
    x.mask = mask.to(device)
    case = with_(case, mask_kind=kind, mask_shape=full)
    ref_out, ref_lse = reference(x)
    out, lse = run_triton(case, x)
    check_all(case, out, lse, ref_out, ref_lse)


@pytest.mark.slow  # tens of seconds on the GPU: started first (conftest)
@pytest.mark.parametrize("device", DEVICES)
# Each example a new shape family (compiles): 162 s of the 252 s pass at 50 smoke examples (12-05), 261 s
# at 25 with 14 workers, the pass's critical path (12-05b: bench/results/h200-2026-12-05b/
# call11-gpu-test-times.txt): one item per dtype on the GPU (DTYPE_SHARDS).
@pytest.mark.parametrize("shard", DTYPE_SHARDS, ids=str)
@smoke_examples(9)
@given(data=st.data())
def test_lengths_past_capacity_never_nan(device, shard, data):
    """seq_lens > capacity is invalid (validate=True rejects it); without validation the kernel clamps:
    it must still write every element, finite, and never read outside the cache."""
    case = data.draw(cases(device, dtypes=_dtypes(shard), masks=False), label="case")
    lens = tuple(n + data.draw(st.integers(0, 2 * case.capacity)) for n in case.seq_lens)
    case = with_(case, seq_lens=lens)
    x = make_inputs(case, device)
    out, lse = run_triton(case, x)
    assert torch.isfinite(out).all(), f"{case.name} seed={case.seed}: non-finite output\n{case.repro()}"
    assert not torch.isnan(lse).any(), f"{case.name} seed={case.seed}: NaN lse\n{case.repro()}"


# ---- nothing outside [kv_start, seq_len) is read into the result ----


@pytest.mark.slow  # tens of seconds on the GPU: started first (conftest)
@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_unfilled_cache_slots_do_not_leak(device, data):
    """Slots past seq_lens and before kv_start may hold garbage (torch.empty): NaN there must not reach
    the output. The reference is computed on the clean cache first."""
    case = data.draw(cases(device), label="case")
    x = make_inputs(case, device)
    ref_out, ref_lse = reference(x)
    poison_unfilled(x, case)
    out, lse = run_triton(case, x)
    check_all(case, out, lse, ref_out, ref_lse)


# ---- sliding windows ----


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("q_len", [1, 3])
def test_window_of_one_returns_each_querys_own_value(device, q_len):
    """window = 1: every query sees only its own key, so the output is that key's V row exactly and the
    LSE its scaled score; unfilled slots and the keys before the window hold NaN and must not matter."""
    case = Case(2, 4, 2, 32, q_len, 80, torch.float32, (q_len + 4, 80), kv_start=(0, 30), seed=3, window=1)
    x = make_inputs(case, device)
    pos = [n - q_len + t for n in case.seq_lens for t in range(q_len)]
    for b, n in enumerate(case.seq_lens):
        first = n - q_len
        x.k[b, :, :first] = math.nan  # before every query's window
        x.v[b, :, :first] = math.nan
        x.k[b, :, n:] = math.nan  # unfilled
        x.v[b, :, n:] = math.nan
    out, lse = run_triton(case, x)
    for b in range(2):
        for t in range(q_len):
            p = pos[b * q_len + t]
            want = x.v[b, :, p].repeat_interleave(2, dim=0)  # [H_q, D]
            assert torch.equal(out[b, :, t], want), (b, t)
            score = (x.q[b, :, t] * x.k[b, :, p].repeat_interleave(2, dim=0)).sum(-1) / math.sqrt(32)
            torch.testing.assert_close(lse[b, :, t], score, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_a_window_as_long_as_the_rows_changes_nothing(device):
    """window >= every query's position + 1: the same result as no window, bit for bit."""
    case = Case(2, 8, 2, 64, 2, 130, torch.float32, (130, 77), kv_start=(0, 5), seed=4)
    x = make_inputs(case, device)
    base, base_lse = run_triton(case, x)
    base, base_lse = base.clone(), base_lse.clone()
    for window in (130, 131, 10**6):
        x.out.fill_(math.nan)
        out, lse = run_triton(with_(case, window=window), x, window=window)
        assert torch.equal(out, base) and torch.equal(lse, base_lse), window


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits", [1, 3])
def test_sinks_take_their_share_and_nothing_else(device, splits):
    """gpt-oss sinks: out = (keys' softmax output) * (1 - sink share), LSE = logaddexp(keys' LSE, sink);
    a row that sees nothing gives zeros and LSE = the sink, for one split and for merged splits."""
    case = Case(3, 4, 2, 32, 1, 64, torch.float32, (0, 9, 64), seed=12)
    x = make_inputs(case, device)
    sinks = torch.tensor([0.0, 2.5, -3.0, 40.0], device=device)
    problem = DecodeProblem.from_tensors(x.q, x.k, x.v, x.seq_lens, sinks=sinks)
    launch = TritonBackend().make_launcher(problem, config=SplitKVConfig(num_splits=splits, block_n=16))
    out, lse = make_out(case, device), torch.full((3, 4, 1), math.nan, device=device)
    launch(x.q, x.k, x.v, x.seq_lens, None, None, out, lse, sinks=sinks)
    plain, plain_lse = reference(x)
    total = torch.logaddexp(plain_lse, sinks.double().cpu()[None, :, None])
    share = torch.exp(plain_lse - total).nan_to_num(0.0)  # 0 where nothing is visible
    torch.testing.assert_close(lse.double().cpu(), total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double().cpu(), plain * share[..., None], rtol=1e-5, atol=1e-6)
    assert (out[0] == 0).all() and torch.equal(lse[0, :, 0].cpu(), sinks.cpu())  # row 0 sees nothing
    assert out[1:, 3].abs().max() < 1e-12  # a sink of 40 takes (almost) all of head 3's attention


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("sink_dtype", [torch.bfloat16, torch.float16])
def test_sinks_in_16_bits_read_as_their_float32_values(device, splits, sink_dtype):
    """gpt-oss keeps its sinks in the model's dtype; the kernel reads them as they are (no cast per
    step): the same values in bf16 / fp16 and in float32 give the same result, bit for bit, from plans
    made for each dtype (a kernel compiled for float32 sinks never reads 16-bit ones)."""
    case = Case(2, 4, 2, 32, 1, 64, torch.bfloat16, (40, 64), seed=13)
    x = make_inputs(case, device)
    sinks32 = torch.tensor([0.0, 2.5, -3.0, 40.0], device=device)  # exact in bf16 and fp16
    results = []
    for sinks in (sinks32, sinks32.to(sink_dtype)):
        problem = DecodeProblem.from_tensors(x.q, x.k, x.v, x.seq_lens, sinks=sinks)
        launch = TritonBackend().make_launcher(problem, config=SplitKVConfig(num_splits=splits, block_n=16))
        out, lse = make_out(case, device), torch.full((2, 4, 1), math.nan, device=device)
        launch(x.q, x.k, x.v, x.seq_lens, None, None, out, lse, sinks=sinks)
        results.append((problem.name, out, lse))
    (name32, out32, lse32), (name16, out16, lse16) = results
    short = SUPPORTED_DTYPES[sink_dtype]
    assert name32.endswith("_sinks") and name16.endswith(f"_sinks{short}"), (name32, name16)
    assert torch.equal(out16, out32) and torch.equal(lse16, lse32)
    ref, _ = reference_decode_attention(
        x.q, x.k, x.v, x.seq_lens, sinks=sinks32.to(sink_dtype)
    )  # the float64 reference takes any dtype
    check_close(out16, ref, case.dtype, case.name, case.seed)


def test_a_window_caps_the_split_count_at_its_tiles():
    """The configuration is sized for the window's tiles, not the capacity's: a short window in a long
    cache gets the splits of a short row (the split loop then starts at the window's first tile)."""
    from kvdecode.triton_kernels.config import heuristic_config, row_tiles

    q = torch.randn(1, 32, 1, 128)
    k = torch.randn(1, 8, 1 << 15, 128)
    lens = torch.tensor([1 << 15], dtype=torch.int32)
    full = DecodeProblem.from_tensors(q, k, k, lens)
    windowed = DecodeProblem.from_tensors(q, k, k, lens, window=100)
    assert windowed.reach == 100 and full.reach == 1 << 15
    assert row_tiles(windowed, 64) == 3 and row_tiles(full, 64) == 512  # 100 keys touch at most 3 tiles
    assert heuristic_config(windowed, 132).num_splits <= 3 < heuristic_config(full, 132).num_splits
    assert "win100" in windowed.name


# ---- head dims below 16: served correctly or refused ----


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [1, 4, 8])
def test_tiny_head_dims_served_or_refused(device, head_dim):
    case = Case(2, 4, 2, head_dim, 2, 40, torch.float16, (40, 7), seed=head_dim)
    x = make_inputs(case, device)
    try:
        out, lse = run_triton(case, x)
    except UnsupportedError:
        return
    check_all(case, out, lse, *reference(x))


# ---- determinism, host syncs, CUDA graphs ----


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_is_bitwise_reproducible(device):
    case = Case(3, 4, 2, 32, 2, 100, torch.bfloat16, (100, 1 + 2, 65), kv_layout="bshd", seed=7)
    x = make_inputs(case, device)
    outs = [
        kvdecode.decode_attention(x.q, x.k, x.v, x.seq_lens, backend="triton", deterministic=True)
        for _ in range(3)
    ]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    check_close(outs[0], reference(x)[0], case.dtype, case.name, case.seed)


@pytest.mark.gpu
def test_warm_call_does_not_sync_the_host():
    case = Case(
        4, 32, 8, 128, 1, 4096, torch.bfloat16, (1, 4096, 1000, 2049), kv_start=(0, 5, 0, 100), seed=3
    )
    x = make_inputs(case, "cuda")
    run_triton(case, x)  # compile and plan
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x.seq_lens.copy_(torch.tensor([2, 4000, 17, 4096], dtype=torch.int32), non_blocking=True)
        run_triton(case, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    case = with_(case, seq_lens=(2, 4000, 17, 4096))
    check_all(case, x.out, None, *reference(x))


@pytest.mark.gpu
@pytest.mark.parametrize("q_len", [1, 4])
def test_cuda_graph_replay_follows_device_lengths(q_len):
    """One captured plan.run serves every step: lengths change on the device only, no recompilation."""
    case = Case(2, 8, 2, 128, q_len, 2048, torch.float16, (q_len, 2048), kv_start=(0, 0), seed=11)
    x = make_inputs(case, "cuda")
    problem = DecodeProblem.from_tensors(x.q, x.k, x.v, x.seq_lens, kv_start=x.kv_start, out=x.out)
    the_plan = kvdecode.plan(problem, backend="triton")
    lse = None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        the_plan.run(x.q, x.k, x.v, x.seq_lens, kv_start=x.kv_start, out=x.out)  # warm up: compile
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, lse = the_plan.run(x.q, x.k, x.v, x.seq_lens, kv_start=x.kv_start, out=x.out, return_lse=True)
    steps = [((q_len, 2048), (0, 0)), ((700, 65), (3, 64 - q_len)), ((2048, q_len + 1), (1000, 1)),
             ((129, 1500), (0, 0))]  # fmt: skip
    for step, (lens, starts) in enumerate(steps):
        x.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        x.kv_start.copy_(torch.tensor(starts, dtype=torch.int32))
        x.out.fill_(math.nan)
        graph.replay()
        torch.cuda.synchronize()
        step_case = with_(case, seq_lens=lens, kv_start=starts, seed=case.seed * 100 + step)
        check_all(step_case, x.out, lse, *reference(x))


def test_tolerance_table_is_the_issue_table():
    rel_l2 = {dt: t.rel_l2 for dt, t in TOLERANCES.items()}
    assert {torch.bfloat16: 4e-3, torch.float16: 1e-3, torch.float32: 1e-5} == rel_l2
