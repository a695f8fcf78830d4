"""The mask-lengths kernel (``torch.ops.kvdecode.mask_lengths``): a decode step's lengths from its mask.

Checked against a plain-Python reading of the contract (per row: the smallest length whose
bottom-right causal range covers every attended key, and the first attended key), on random masks
that are strided views with marker columns, with empty rows and queries, and with several tiles per
row; the kernel under the interpreter (CPU), on the GPU, and the torch-ops path the op takes on a CPU.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import check_direct_arguments

import kvdecode.hf
from kvdecode import ops  # noqa: F401  (registers torch.ops.kvdecode.mask_lengths)
from kvdecode._mask_lengths import mask_lengths_torch, mask_lengths_triton
from kvdecode.errors import KVDecodeError


def _contract(mask: torch.Tensor, q_len: int) -> tuple[list[int], list[int]]:
    """The lengths as the contract states them, element by element."""
    rows = mask[:, 0].cpu()
    batch, _, capacity = rows.shape
    seq_lens, kv_start = [], []
    for b in range(batch):
        seen = [(t, j) for t in range(q_len) for j in range(capacity) if rows[b, t, j]]
        filled = max((j + 1 + q_len - 1 - t for t, j in seen), default=0)
        seq_lens.append(min(max(filled, q_len), capacity))
        kv_start.append(min((j for _, j in seen), default=capacity))
    return seq_lens, kv_start


@st.composite
def masks(draw, device: str = "cpu") -> tuple[torch.Tensor, int]:
    """A bool ``[B, 1, T_q, capacity]`` view of a wider buffer (marker columns), with left padding,
    a causal edge, random holes, and rows or queries that attend nothing. As transformers' masks of a
    static cache, ``T_q <= capacity`` and query ``t`` attends no key past ``capacity - T_q + t`` (the
    position of the newest token is at most the last slot)."""
    batch = draw(st.integers(1, 4))
    q_len = draw(st.sampled_from([1, 2, 3, 5, 16]))
    capacity = draw(st.integers(q_len, 300))
    markers = draw(st.integers(0, 2))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    buf = torch.zeros(batch, 1, q_len, capacity + markers, dtype=torch.bool)
    style = draw(st.sampled_from(["causal", "random", "empty-rows"]))
    for b in range(batch):
        start = int(torch.randint(0, capacity + 1, (1,), generator=g))
        end = int(torch.randint(start, capacity + 1, (1,), generator=g))
        for t in range(q_len):
            if style == "random":
                reach = capacity - (q_len - 1 - t)
                buf[b, 0, t, :reach] = torch.rand(reach, generator=g) < 0.05
            elif not (style == "empty-rows" and b % 2 == 1):
                last = min(capacity, end - (q_len - 1 - t))
                buf[b, 0, t, start : max(start, last)] = True
    buf[..., capacity:] = True  # the marker columns are outside the view
    return buf.to(device)[..., :capacity], q_len


@given(case=masks(), tile=st.sampled_from([16, 64, 8192]), chunk=st.sampled_from([16, 128, 65536]))
def test_the_kernel_and_the_torch_path_give_the_contracts_lengths(case, tile, chunk):
    """Tiles of 16 to 8192 bools; chunks of 16 to 65536 (one program per row, or a row cut into
    chunks scanned apart and merged by the second kernel)."""
    mask, q_len = case
    want = _contract(mask, q_len)
    got = mask_lengths_triton(mask, q_len, tile=tile, chunk=chunk)
    for seq_lens, kv_start in (got, mask_lengths_torch(mask, q_len)):
        assert seq_lens.dtype == kv_start.dtype == torch.int32
        assert (seq_lens.tolist(), kv_start.tolist()) == want


@given(case=masks())
def test_the_lengths_cover_every_attended_key_and_are_the_smallest_that_do(case):
    """What the attention kernel relies on: query t of row b attends only keys in
    ``kv_start[b] .. seq_lens[b] - T_q + t``; one less would drop an attended key (or go below T_q)."""
    mask, q_len = case
    seq_lens, kv_start = (x.tolist() for x in torch.ops.kvdecode.mask_lengths(mask, q_len))
    rows = mask[:, 0]
    for b in range(mask.shape[0]):
        attended = rows[b].nonzero().tolist()
        assert all(kv_start[b] <= j <= seq_lens[b] - q_len + t for t, j in attended)
        shorter = seq_lens[b] - 1
        assert shorter < q_len or any(j > shorter - q_len + t for t, j in attended)


def test_zero_rows_and_zero_keys():
    for shape in ((0, 1, 1, 8), (2, 1, 3, 0)):
        mask = torch.zeros(shape, dtype=torch.bool)
        for seq_lens, kv_start in (mask_lengths_triton(mask, shape[2]), mask_lengths_torch(mask, shape[2])):
            assert seq_lens.tolist() == [0] * shape[0] and kv_start.tolist() == [0] * shape[0]


def test_long_rows_are_cut_into_chunks_merged_by_a_second_kernel(monkeypatch):
    """A row of more than one chunk launches the scan on a (B, chunks) grid and the merge; the chunk
    count is capped (1024) by making chunks longer."""
    import kvdecode._mask_lengths as ml

    launched = []
    for name in ("_mask_lengths_kernel", "_mask_lengths_merge"):
        real = getattr(ml, name)

        class Spy:
            def __getitem__(self, grid, real=real, name=name):
                launched.append((name, grid))
                return real[grid]

        monkeypatch.setattr(ml, name, Spy())
    mask = torch.zeros(2, 1, 3, 700, dtype=torch.bool)
    mask[0, 0, 2, 650] = mask[1, 0, 0, 5] = True
    got = mask_lengths_triton(mask, 3, tile=64, chunk=64 * 4)  # 4 rows x 16 keys... x 4 tiles = 64 keys
    assert [n for n, _ in launched] == ["_mask_lengths_kernel", "_mask_lengths_merge"]
    assert launched[0][1] == (2, 11, 1) and launched[1][1] == (2, 1, 1)  # ceil(700 / 64) chunks
    assert (got[0].tolist(), got[1].tolist()) == _contract(mask, 3) == ([651, 8], [650, 5])
    launched.clear()
    mask_lengths_triton(torch.zeros(1, 1, 1, 5000, dtype=torch.bool), 1, tile=16, chunk=16)
    assert launched[0][1] == (1, 313, 1)  # 5000 / 16
    monkeypatch.setattr(ml, "_MAX_CHUNKS", 64)
    launched.clear()
    got = mask_lengths_triton(torch.ones(1, 1, 1, 5000, dtype=torch.bool), 1, tile=16, chunk=16)
    assert launched[0][1] == (1, 63, 1) and got[0].tolist() == [5000] and got[1].tolist() == [0]


@pytest.mark.parametrize(
    "mask, q_len, message",
    [
        (torch.zeros(2, 1, 3, 8, dtype=torch.bool), 4, r"mask must be \[B, 1, q_len=4, capacity\]"),
        (torch.zeros(2, 2, 1, 8, dtype=torch.bool), 1, r"mask must be \[B, 1, q_len=1, capacity\]"),
        (torch.zeros(2, 1, 1, 8), 1, "mask must be a bool"),
        (torch.zeros(2, 8, dtype=torch.bool), 1, "mask must be a bool"),
        ([[True]], 1, "got list"),
        (torch.zeros(2, 1, 1, 8, dtype=torch.bool), 0, "q_len must be an int in 1..1024"),
        (torch.zeros(2, 1, 1, 8, dtype=torch.bool), True, "q_len must be an int"),
    ],
)
def test_a_mask_the_kernel_cannot_read_is_refused_before_any_launch(mask, q_len, message):
    """Rows past the view (q_len larger than the mask's rows) would be read out of bounds on a GPU, and
    a float mask's nonzero entries are not 'attend': both are refused, as is a bad q_len."""
    with pytest.raises(KVDecodeError, match=message):
        kvdecode.hf.lengths_from_mask(mask, q_len)
    if isinstance(mask, torch.Tensor) and not isinstance(q_len, bool):  # (the schema takes what is left)
        with pytest.raises(KVDecodeError, match=message):
            torch.ops.kvdecode.mask_lengths(mask, q_len)


def test_the_op_has_a_fake_for_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        seq_lens, kv_start = torch.ops.kvdecode.mask_lengths(torch.zeros(3, 1, 2, 40, dtype=torch.bool), 2)
    assert seq_lens.shape == kv_start.shape == (3,) and seq_lens.dtype == kv_start.dtype == torch.int32


@pytest.mark.gpu
@given(case=masks("cuda"))
def test_gpu_the_kernel_gives_the_contracts_lengths(case):
    mask, q_len = case
    seq_lens, kv_start = torch.ops.kvdecode.mask_lengths(mask, q_len)  # the Triton kernel on a GPU
    assert (seq_lens.tolist(), kv_start.tolist()) == _contract(mask, q_len)


@pytest.mark.gpu
def test_gpu_long_rows_match_the_torch_path():
    """Many tiles per row at the default tile (a 128k cache, left padding, holes)."""
    g = torch.Generator(device="cuda").manual_seed(3)
    mask = torch.rand(8, 1, 4, 131072 + 1, device="cuda", generator=g) < 0.5
    mask[:, :, :, 120000:131072] = False
    mask[3] = False
    view = mask[..., :131072]
    got = torch.ops.kvdecode.mask_lengths(view, 4)
    want = mask_lengths_torch(view, 4)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("capacity", [64, 4096])
def test_direct_launch_arguments_are_the_binder_arguments_as_pointers(monkeypatch, capacity):
    """One chunk (the scan alone) and several (scan and merge): the direct launches' integers are the
    binder's tensors' pointers, and the key holds the partials' alignment (``first`` is a view at an
    offset that follows B)."""
    from kvdecode import _mask_lengths

    seen = []

    def recorder(fn, name, device, **options):
        return lambda grid, args, spec, binder: seen.append((name, args, binder(), spec))

    monkeypatch.setattr(_mask_lengths, "bound_kernel", recorder)
    mask = torch.ones(3, 1, 1, capacity, dtype=torch.bool)
    mask_lengths_triton(mask, 1, tile=16, chunk=256)
    names = [name for name, *_ in seen]
    assert names == (
        ["mask_lengths_kernel"] if capacity <= 256 else ["mask_lengths_kernel", "mask_lengths_merge"]
    )
    for _, args, binder, _ in seen:
        assert check_direct_arguments(args, binder) >= 3
    seen.clear()
    base = torch.ones(3 * capacity + 1, dtype=torch.bool)
    mask_lengths_triton(base[: 3 * capacity].view(3, 1, 1, capacity), 1, tile=16, chunk=256)
    mask_lengths_triton(base[1:].view(3, 1, 1, capacity), 1, tile=16, chunk=256)  # 1 byte off 16
    scans = [spec for name, _, _, spec in seen if name == "mask_lengths_kernel"]
    assert scans[0] != scans[1] and scans[0][0] is True and scans[1][0] is False
