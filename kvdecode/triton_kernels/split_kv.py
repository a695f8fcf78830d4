r"""Split-KV ("flash-decoding") vector SDPA kernels.

For one row ``b`` and one KV head, the ``GROUP = H_q / H_kv`` query heads times the ``T_q`` new tokens form
``M = GROUP * T_q`` query rows that share every K/V tile load (GQA packing). The visible key range
``[kv_start[b], seq_lens[b])`` is cut on the device into ``num_splits`` chunks, so lengths can change every
step without a host sync or a recompilation. ``num_splits`` is a run-time argument (never specialized):
a new batch size or capacity that changes it reuses the compiled kernels; the merge reads at most
``SPLITS_P2`` (a compile-time bucket, see ``launcher.merge_bucket``) splits. Split ``s`` computes, in
base 2 (``exp2``/``log2`` are the fast hardware paths; ``1.44269504 = 1/ln 2`` converts)::

    s_ij  = log2(e) * cap(scale * <q_i, k_j>)  (+ log2(e) * additive mask)  j in split s, visible to i
            cap(x) = softcap * tanh(x / softcap) with a logit softcap, else x
    m_i   = max_j s_ij,  l_i = sum_j 2^(s_ij - m_i)
    O_si  = sum_j 2^(s_ij - m_i) v_j / l_i,   LSE2_si = m_i + log2(l_i)

and the merge combines the splits with LSE weights::

    LSE2_i = log2 (sum_s 2^LSE2_si  (+ 2^(log2(e) sink_h) with attention sinks)),
    out_i  = sum_s 2^(LSE2_si - LSE2_i) O_si

Query row ``i = g * T_q + t`` is head ``h_kv * GROUP + g`` at position ``p = seq_lens[b] - T_q + t``; it
sees keys ``kv_start[b] <= j <= p`` (bottom-right causal), and with a sliding window only
``j >= p - window + 1``: the tiles before the first query's window are never read. A row with nothing
visible writes zeros and ``LSE = -inf``. With ``num_splits == 1`` the split kernel writes the final output
itself; with ``FUSED_MERGE`` the last of a program row's splits to finish merges them (a per-row counter
in ``Counters``, which it leaves at zero for the next call), and no merge kernel runs.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _to_out(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    """Cast fp32 to the output dtype with round-to-nearest-even.

    The Triton 3.9 interpreter truncates fp32 -> bf16 (seen 2026-11-25), doubling the rounding error;
    there we round the bits ourselves so that the cast that follows is exact.
    """
    if INTERP_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _tanh(x):
    """tanh in fp32 to a few ulp, with Triton ops only (libdevice is not the interpreter's): the odd Taylor
    series below 1/8, where ``1 - 2 / (e^2x + 1)`` would cancel, that form above. -inf gives -1 (masked
    scores are set to -inf after the cap anyway)."""
    x2 = x * x
    small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))  # error < x^9 / 45
    large = 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)  # e^(2x) = 2^(2x log2(e))
    return tl.where(tl.abs(x) < 0.125, small, large)


@triton.jit
def _with_sink(lse2, sink):
    """``(log2(2^lse2 + e^sink), 2^(lse2 - that))``: the LSE with a sink logit in the denominator, and
    the share the keys keep (0 where ``lse2 = -inf``: nothing visible, the sink takes all)."""
    sink2 = sink.to(tl.float32) * 1.4426950408889634
    top = tl.maximum(lse2, sink2)  # finite: the sink is
    total = top + tl.log2(tl.exp2(lse2 - top) + tl.exp2(sink2 - top))
    return total, tl.exp2(lse2 - total)


@triton.jit
def _fp8_to_fp16_tl(x):
    """fp8 -> fp16 (exact) with Triton ops. An e5m2 value is the high byte of the fp16 with its value, so
    it is shifted into place: Triton 3.9's interpreter converts e5m2 subnormals wrongly (2^-16 -> 0)."""
    if x.dtype == tl.float8e5:
        return (x.to(tl.uint8, bitcast=True).to(tl.uint16) << 8).to(tl.float16, bitcast=True)
    return x.to(tl.float16)


@triton.jit
def _fp8_to_fp16(x):
    """fp8 -> fp16 (exact), one ``cvt`` per pair, in PTX that Triton must leave where it is.

    With ``tl`` casts Triton moves the conversion past the shared-memory staging of the V tile, where an
    fp8 tile in the B-operand layout of ``p @ v`` is gathered byte by byte (64 ``LDS.U8`` per thread and
    tile on sm90); converted where it is loaded, the fp16 tile is staged and read with ``ldmatrix``
    (the loop body went from 551 to 351 instructions). Not for the interpreter (no inline PTX there).
    """
    bits = x.to(tl.uint8, bitcast=True)
    # is_pure=False: a pure elementwise op would be hoisted past the staging again
    if x.dtype == tl.float8e5:
        y = tl.inline_asm_elementwise(
            "{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.rn.f16x2.e5m2x2 $0, l; cvt.rn.f16x2.e5m2x2 $1, h; }",
            "=r,=r,r", [bits], dtype=tl.float16, is_pure=False, pack=4,
        )  # fmt: skip
    else:
        y = tl.inline_asm_elementwise(
            "{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.rn.f16x2.e4m3x2 $0, l; cvt.rn.f16x2.e4m3x2 $1, h; }",
            "=r,=r,r", [bits], dtype=tl.float16, is_pure=False, pack=4,
        )  # fmt: skip
    return y


@triton.jit
def _kv_tile(x, dtype: tl.constexpr, KV_FP8: tl.constexpr, IS_V: tl.constexpr):
    """A K or V tile in the dtype of the dots (see ``split_kv_kernel``'s ``KV_FP8``); every conversion is
    exact (fp8 values are representable in fp16 and bf16). 16-bit tiles come back as they are."""
    if KV_FP8 == 1:  # q's dtype
        x = x.to(dtype)
    if KV_FP8 == 2:  # fp16 through Triton casts (the interpreter's path)
        x = _fp8_to_fp16_tl(x)
    if KV_FP8 == 3:  # fp16, V in PTX where it is loaded
        x = _fp8_to_fp16(x) if IS_V else x.to(tl.float16)
    return x


@triton.jit
def _dot(a, b, acc, INTERP_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``acc + a @ b`` in fp32 (``acc`` None: ``a @ b``); in fp32 operands under the interpreter (see
    ``INTERP_BF16``), else in ``b``'s dtype."""
    if INTERP_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT_PRECISION)
    return tl.dot(a.to(b.dtype), b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _online_softmax(
    s,
    m_i,
    l_i,
    offs_n,
    offs_m,
    lo,
    hi,
    q_pos0,
    win_lo0,
    mask_row_ptr,
    stride_mask_n,
    mask_needed,
    qk_scale,
    softcap,
    M: tl.constexpr,
    T_Q: tl.constexpr,
    MASK_KIND: tl.constexpr,  # 0 none, 1 bool (True = attend), 2 additive, 3 bool with one row of keys
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """One K/V tile's raw scores ``s = q @ k^T`` through the online softmax, in base 2; returns
    ``(p, alpha, m_new, l_new)``: the tile's probabilities and the factor the accumulator is rescaled by.

    Key ``j`` is visible to row ``i`` (token ``t = i % T_Q``) when ``lo <= j < hi``,
    ``j <= q_pos0 + t`` (bottom-right causal), ``j >= win_lo0 + t`` with a window (for T_Q = 1 ``lo``
    already says so), and where a bool mask is True. Rows ``>= M`` are padding: their mask is not read.
    ``mask_row_ptr``: each row's mask row, or with ``MASK_KIND == 3`` the one row every query row shares,
    read only where ``mask_needed`` (False: the program found it True on every key it sees).
    """
    s = s * qk_scale
    if HAS_SOFTCAP:  # base 2: s = log2(e) x, so log2(e) cap(x) = c2 tanh(s / c2), c2 = log2(e) softcap
        c2 = softcap * 1.4426950408889634
        s = c2 * _tanh(s / c2)
    visible = ((offs_n >= lo) & (offs_n < hi))[None, :]
    if T_Q > 1:
        visible = visible & (offs_n[None, :] <= q_pos0 + (offs_m % T_Q)[:, None])
        if HAS_WINDOW:
            visible = visible & (offs_n[None, :] >= win_lo0 + (offs_m % T_Q)[:, None])
    row_ok = (offs_m < M)[:, None]  # padded query rows point past the last head: never load for them
    if MASK_KIND == 1:
        mvals = tl.load(
            mask_row_ptr[:, None] + offs_n[None, :] * stride_mask_n, mask=visible & row_ok, other=0
        )
        visible = visible & (mvals != 0)
    if MASK_KIND == 2:
        mvals = tl.load(
            mask_row_ptr[:, None] + offs_n[None, :] * stride_mask_n, mask=visible & row_ok, other=0.0
        )
        s = s + mvals.to(tl.float32) * 1.4426950408889634  # additive mask, natural log -> base 2
    if MASK_KIND == 3:  # noqa: SIM102 (a constexpr test, then a run-time one)
        if mask_needed:  # one [BLOCK_N] load for all rows, not one per row and key
            n_ok = (offs_n >= lo) & (offs_n < hi)
            seen = tl.load(mask_row_ptr + offs_n * stride_mask_n, mask=n_ok, other=0) != 0
            visible = visible & seen[None, :]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return p, alpha, m_new, l_i


@triton.jit
def _mask_row_all_true(mask_row_ptr, stride_mask_n, tile, step, lo, hi, BLOCK_N: tl.constexpr,
                       CHECK_TILES: tl.constexpr):  # fmt: skip
    """True when a mask row shared by the query rows (``MASK_KIND == 3``) is True on every key in
    ``[lo, hi)`` of a program's tiles ``tile, tile + step, ...`` (all of them read at once: at most
    ``CHECK_TILES``; a program with more answers False). Keys outside the range (left padding, unfilled
    slots) are not read: the lengths already hide them."""
    count = tl.cdiv(tl.maximum(tl.cdiv(hi, BLOCK_N) - tile, 0), step)
    offs_t = tl.arange(0, CHECK_TILES)
    keys = (tile + offs_t * step)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    seen = (keys >= lo) & (keys < hi)
    ptrs = (mask_row_ptr + keys.to(tl.int64) * stride_mask_n).to(tl.pointer_type(tl.uint8), bitcast=True)
    vals = tl.load(ptrs, mask=seen, other=1)  # (bytes: a bool is one, 0 or 1)
    return (count <= CHECK_TILES) & (tl.min(tl.min(vals, axis=1), axis=0) != 0)


@triton.jit
def _tile_update(
    acc, m_i, l_i, q, k_tile, v_tile, offs_n, offs_m, lo, hi, q_pos0, win_lo0, mask_row_ptr, stride_mask_n,
    mask_needed, qk_scale, softcap, M: tl.constexpr, T_Q: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, INTERP_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One K/V tile of one KV head (tiles in the dots' dtype): ``q @ k^T``, the online softmax (see
    :func:`_online_softmax`), ``p @ v``; returns ``(acc, m, l)``."""
    zeros = tl.zeros([acc.shape[0], k_tile.shape[0]], tl.float32)
    s = _dot(q, tl.trans(k_tile), zeros, INTERP_BF16, DOT_PRECISION)
    p, alpha, m_i, l_i = _online_softmax(
        s, m_i, l_i, offs_n, offs_m, lo, hi, q_pos0, win_lo0, mask_row_ptr, stride_mask_n, mask_needed,
        qk_scale, softcap, M, T_Q, MASK_KIND, HAS_WINDOW, HAS_SOFTCAP,
    )  # fmt: skip
    return _dot(p, v_tile, acc * alpha[:, None], INTERP_BF16, DOT_PRECISION), m_i, l_i


@triton.jit
def _write_out(
    o,
    lse2,
    Out,
    stride_ob,
    stride_oh,
    stride_ot,
    Lse,
    stride_lb,
    stride_lh,
    Sinks,
    b64,
    head,
    tok,
    m_ok,
    offs_d,
    HEAD_DIM: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):
    """Store a program's final rows: ``o`` normalized over the keys, ``lse2`` their base-2 LSE; a sink
    joins the denominator (``o`` keeps its share ``2^(lse2 - total)``)."""
    if HAS_SINKS:
        lse2, share = _with_sink(lse2, tl.load(Sinks + head, mask=m_ok, other=0.0))
        o = o * share[:, None]
    out_ptrs = Out + b64 * stride_ob + head[:, None].to(tl.int64) * stride_oh + tok[:, None] * stride_ot
    tl.store(out_ptrs + offs_d[None, :], _to_out(o, Out.dtype.element_ty, INTERP_BF16),
             mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM))  # fmt: skip
    if WRITE_LSE:
        lse_ptrs = Lse + b64 * stride_lb + head.to(tl.int64) * stride_lh + tok
        tl.store(lse_ptrs, lse2 * 0.6931471805599453, mask=m_ok)  # base 2 -> natural log


@triton.jit
def _merge_partials(
    PartO,
    PartLse,
    row,
    num_splits,
    m_ok,
    offs_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``(o, LSE2)`` of rows ``row`` from their ``num_splits`` partials, in split order, LSE-weighted with a
    running maximum (one pass; the loads of split ``s`` do not wait for split ``s - 1``'s sums). Loaded
    through L2 (``.cg``): other CTAs wrote them during this kernel."""
    d_ok = offs_d[None, :] < HEAD_DIM
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    w_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):
        lse_s = tl.load(PartLse + row * num_splits + s, mask=m_ok, other=float("-inf"), cache_modifier=".cg")
        o_s = tl.load(PartO + (row[:, None] * num_splits + s) * HEAD_DIM + offs_d[None, :],
                      mask=m_ok[:, None] & d_ok, other=0.0, cache_modifier=".cg")  # fmt: skip
        m_new = tl.maximum(m, lse_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no split with anything visible yet
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse_s - m_safe)  # 0 for an empty split
        acc = acc * alpha[:, None] + o_s * w[:, None]
        w_sum = w_sum * alpha + w
        m = m_new
    has_any = w_sum > 0.0
    o = acc / tl.where(has_any, w_sum, 1.0)[:, None]
    lse2 = tl.where(has_any, m + tl.log2(tl.where(has_any, w_sum, 1.0)), float("-inf"))
    return o, lse2


@triton.jit(do_not_specialize=["window", "softcap", "num_splits"])
def split_kv_kernel(
    Out,
    stride_ob,
    stride_oh,
    stride_ot,  # [B, H_q, T_q, D]
    Lse,
    stride_lb,
    stride_lh,  # float32 [B, H_q, T_q] (T_q stride 1); used when WRITE_LSE
    PartO,  # float32 [B * H_kv, M, num_splits, D] contiguous
    PartLse,  # float32 [B * H_kv, M, num_splits] contiguous
    Q,
    stride_qb,
    stride_qh,
    stride_qt,  # [B, H_q, T_q, D]
    K,
    stride_kb,
    stride_kh,
    stride_kn,  # [B, H_kv, capacity, D]
    V,
    stride_vb,
    stride_vh,
    stride_vn,  # [B, H_kv, capacity, D]
    SeqLens,  # int32 [B]
    KvStart,  # int32 [B]; used when HAS_KV_START
    Mask,
    stride_mb,
    stride_mh,
    stride_mt,
    stride_mn,  # broadcast view [B, H_q, T_q, capacity]
    KScale,  # float32 [1] or [H_kv]: dequantizes fp8 K (used when SCALE_KIND > 0)
    VScale,  # float32 [1] or [H_kv]: dequantizes fp8 V
    Sinks,  # [H_q] fp32/bf16/fp16: attention sinks (used when HAS_SINKS, by this kernel when SINGLE)
    Counters,  # int32 [grid 1 x grid 2], zeros: splits done per program row (used when FUSED_MERGE)
    qk_scale,  # scale * log2(e)
    capacity,
    window,  # sliding window (keys a query sees, itself included); used when HAS_WINDOW
    softcap,  # logit softcap (natural-log units); used when HAS_SOFTCAP
    num_splits,  # programs per (row, KV head) on grid axis 0; run time, so it never recompiles
    SINGLE: tl.constexpr,  # num_splits == 1: write the output directly (a variant of its own: no merge)
    H_KV: tl.constexpr,
    GROUP: tl.constexpr,
    T_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_KV_START: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    MASK_KIND: tl.constexpr,  # 0 none, 1 bool, 2 additive, 3 bool shared by every query row of a batch row
    WRITE_LSE: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
    KV_FP8: tl.constexpr,  # 0 K/V in q's dtype; fp8 tiles converted (exactly) to 1 q's dtype, 2 fp16,
    # 3 fp16 with V converted in PTX where it is loaded (the GPU default, see _fp8_to_fp16)
    SCALE_KIND: tl.constexpr,  # 0 none, 1 one k/v scale, 2 one per KV head
    HEADS: tl.constexpr,  # KV heads per program (their query rows packed into one BLOCK_M block)
    FUSED_MERGE: tl.constexpr,  # the last split of a program row merges the partials (no merge kernel)
    MASK_CHECK: tl.constexpr,  # MASK_KIND 3: check the mask row on the program's tiles first (see below)
):
    """One program: the tiles ``split, split + num_splits, ...`` of one row and ``HEADS`` KV heads, for one
    block of packed query rows.

    Rows are packed head-major: row ``i`` is query row ``i % M`` of KV head ``h_kv0 + i // M`` (its query
    head is ``h_kv0 * GROUP + i // T_Q`` either way). With ``HEADS > 1`` (one row block: ``HEADS * M <=
    BLOCK_M``) a tile's scores come from one dot per KV head, each row keeping its own head's (a
    ``tl.where``), gathered into one ``[BLOCK_M, BLOCK_N]`` tile; the softmax then runs once for all the
    heads' rows, which fill the rows a dot must have (16) instead of padding them; ``p @ v`` is one dot
    per head with the other heads' rows of ``p`` zeroed.

    With one head, tiles are dealt round-robin so that, without ``kv_start``, the first tile's address does
    not depend on the length: its K/V loads are issued together with the loads of ``seq_lens`` and ``q``
    (one memory round trip instead of two); the length then masks what is not visible. With several,
    ``HEADS`` tiles of K and of V would have to be held in registers for that; their first tile is loaded
    in the loop.

    With a mask row shared by the query rows (``MASK_KIND == 3``, a transformers step's) and
    ``MASK_CHECK``, a program first reads the mask on all its tiles' visible keys at once (up to 2048
    keys): where it is True on every one (left padding and unfilled slots are outside the lengths
    already) the tiles skip their mask loads.
    """
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs at least 16 rows")
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D must cover the head dim")
    tl.static_assert(H_KV % HEADS == 0, "HEADS must divide H_KV")
    tl.static_assert(HEADS == 1 or HEADS * GROUP * T_Q <= BLOCK_M, "packed heads need one row block")
    tl.static_assert(MASK_KIND == 3 or not MASK_CHECK, "MASK_CHECK is for a mask row shared by the rows")
    M: tl.constexpr = GROUP * T_Q
    ROWS: tl.constexpr = HEADS * M  # real query rows of a program (HEADS == 1: of all its row blocks)
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // (H_KV // HEADS)
    h_kv = (bh % (H_KV // HEADS)) * HEADS  # the program's first KV head
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < ROWS
    d_ok = offs_d[None, :] < HEAD_DIM
    head = h_kv * GROUP + offs_m // T_Q
    tok = offs_m % T_Q
    kv_of_row = offs_m // M  # 0..HEADS-1 (padding rows: HEADS and beyond)
    b64 = b.to(tl.int64)
    k_ptrs = K + b64 * stride_kb + h_kv.to(tl.int64) * stride_kh + offs_d[None, :]
    v_ptrs = V + b64 * stride_vb + h_kv.to(tl.int64) * stride_vh + offs_d[None, :]
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # everything below may read what the previous kernel wrote
        tl.extra.cuda.gdc_launch_dependents()

    # fp8 caches: s = scale * <q, k_scale * k8> folds k_scale into the logit scale; out = v_scale * sum p v8
    v_scale = 1.0
    if SCALE_KIND == 1:
        qk_scale = qk_scale * tl.load(KScale)
        v_scale = tl.load(VScale)
    if SCALE_KIND == 2:
        if HEADS == 1:
            qk_scale = qk_scale * tl.load(KScale + h_kv)
            v_scale = tl.load(VScale + h_kv)
        else:  # per row: its KV head's
            qk_scale = qk_scale * tl.load(KScale + h_kv + kv_of_row, mask=m_ok, other=1.0)[:, None]
            v_scale = tl.load(VScale + h_kv + kv_of_row, mask=m_ok, other=1.0)[:, None]

    # lengths are clamped so that nothing outside the cache is ever read
    seq_len = tl.minimum(tl.maximum(tl.load(SeqLens + b), 0), capacity)
    lo = 0
    tile = split
    if HAS_KV_START:
        lo = tl.minimum(tl.maximum(tl.load(KvStart + b), 0), seq_len)
    win_lo0 = 0
    if HAS_WINDOW:  # the first key the first query may see; the tiles before it are skipped
        win_lo0 = seq_len - T_Q - window + 1
        lo = tl.maximum(lo, tl.minimum(tl.maximum(win_lo0, 0), seq_len))
    if HAS_KV_START or HAS_WINDOW:
        tile = lo // BLOCK_N + split
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    # one head: the first tile loaded before the length is known; not for 16-bit caches where the mask row
    # is checked first: that tile and the check's loads held at once took 140 registers instead of 87
    # (bf16, 64 keys, sm90, Triton 3.6), where the fp8 loop keeps its 128 and loses 68 instructions with it
    PEEL: tl.constexpr = (HEADS == 1) & ((MASK_CHECK == 0) | (KV_FP8 != 0))
    if PEEL:
        in_cache = offs_n[:, None] < capacity
        k_tile = tl.load(k_ptrs + offs_n[:, None].to(tl.int64) * stride_kn, mask=in_cache & d_ok, other=0.0)
        v_tile = tl.load(v_ptrs + offs_n[:, None].to(tl.int64) * stride_vn, mask=in_cache & d_ok, other=0.0)
    q_ptrs = Q + b64 * stride_qb + head[:, None].to(tl.int64) * stride_qh + tok[:, None] * stride_qt
    q = tl.load(q_ptrs + offs_d[None, :], mask=m_ok[:, None] & d_ok, other=0.0)
    if KV_FP8 >= 2 and Q.dtype.element_ty == tl.bfloat16:
        # fp16 dots (e4m3/e5m2 -> fp16 is one hardware conversion per pair; -> bf16 costs three): each
        # bf16 query row is scaled by a power of two that puts its largest |q| in [2^13, 2^14), where
        # every bf16 value down to 2^-30 of the row's max is exact in fp16; the logit scale undoes it
        qf = q.to(tl.float32)
        amax_exp = (tl.max(tl.abs(qf), axis=1).to(tl.uint32, bitcast=True) >> 23).to(tl.int32)
        shift = tl.minimum(tl.maximum(140 - amax_exp, -126), 126)  # 13 - (biased exponent - 127)
        up = ((shift + 127) << 23).to(tl.float32, bitcast=True)
        down = ((127 - shift) << 23).to(tl.float32, bitcast=True)
        q = (qf * up[:, None]).to(tl.float16)
        qk_scale = qk_scale * down[:, None]  # [BLOCK_M, 1]: s_ij * qk_scale broadcasts over the keys
    if MASK_KIND == 3:  # one row of keys for the whole batch row (a transformers step's [B, 1, 1, L])
        mask_row_ptr = Mask + b64 * stride_mb
    else:
        mask_row_ptr = Mask + b64 * stride_mb + head.to(tl.int64) * stride_mh + tok * stride_mt
    q_pos0 = seq_len - T_Q

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    step = 1 if SINGLE else num_splits
    mask_needed = True
    if MASK_CHECK:
        # A transformers step's mask is True on every key its lengths let a query see (left padding and
        # causality are in kv_start and seq_lens): where it is so on all of this program's tiles, they
        # are read without it (the same result, without a mask load per tile)
        CHECK_TILES: tl.constexpr = 2048 // BLOCK_N
        all_true = _mask_row_all_true(mask_row_ptr, stride_mn, tile, step, lo, seq_len, BLOCK_N, CHECK_TILES)
        mask_needed = all_true == 0
    if PEEL:
        k_tile = _kv_tile(k_tile, q.dtype, KV_FP8, False)
        v_tile = _kv_tile(v_tile, q.dtype, KV_FP8, True)
        # the speculative tile may cover unfilled or left-padded slots, which may hold anything (NaN too):
        # zero their V rows, since p = 0 times NaN would still poison p @ v
        v_tile = tl.where(((offs_n >= lo) & (offs_n < seq_len))[:, None], v_tile, 0.0)
        acc, m_i, l_i = _tile_update(
            acc, m_i, l_i, q, k_tile, v_tile, offs_n, offs_m, lo, seq_len, q_pos0, win_lo0, mask_row_ptr,
            stride_mn, mask_needed, qk_scale, softcap, ROWS, T_Q, MASK_KIND, HAS_WINDOW, HAS_SOFTCAP,
            INTERP_BF16, DOT_PRECISION,
        )  # fmt: skip
        tile += step
    for t in range(tile, tl.cdiv(seq_len, BLOCK_N), step):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = ((offs_n >= lo) & (offs_n < seq_len))[:, None]  # invisible slots load as zeros
        if HEADS == 1:  # both tiles loaded and converted first: V loaded after the softmax held 137
            # registers instead of 126 in the fp8 kernel (sm90, Triton 3.6), one CTA an SM fewer
            v_1 = tl.load(v_ptrs + offs_n[:, None].to(tl.int64) * stride_vn, mask=n_ok & d_ok, other=0.0)
            k_1 = tl.load(k_ptrs + offs_n[:, None].to(tl.int64) * stride_kn, mask=n_ok & d_ok, other=0.0)
            k_1 = _kv_tile(k_1, q.dtype, KV_FP8, False)
            v_1 = _kv_tile(v_1, q.dtype, KV_FP8, True)
            acc, m_i, l_i = _tile_update(
                acc, m_i, l_i, q, k_1, v_1, offs_n, offs_m, lo, seq_len, q_pos0, win_lo0, mask_row_ptr,
                stride_mn, mask_needed, qk_scale, softcap, ROWS, T_Q, MASK_KIND, HAS_WINDOW, HAS_SOFTCAP,
                INTERP_BF16, DOT_PRECISION,
            )  # fmt: skip
        else:
            zeros = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            s = zeros
            for j in tl.static_range(HEADS):  # one dot per KV head; each row keeps its own head's scores
                # (q masked per head instead: 4 A operands staged, slower)
                k_j = tl.load(
                    k_ptrs + stride_kh.to(tl.int64) * j + offs_n[:, None].to(tl.int64) * stride_kn,
                    mask=n_ok & d_ok,
                    other=0.0,
                )
                k_j = tl.trans(_kv_tile(k_j, q.dtype, KV_FP8, False))
                s = tl.where((kv_of_row == j)[:, None], _dot(q, k_j, zeros, INTERP_BF16, DOT_PRECISION), s)
            p, alpha, m_i, l_i = _online_softmax(
                s, m_i, l_i, offs_n, offs_m, lo, seq_len, q_pos0, win_lo0, mask_row_ptr, stride_mn,
                mask_needed, qk_scale, softcap, ROWS, T_Q, MASK_KIND, HAS_WINDOW, HAS_SOFTCAP,
            )  # fmt: skip
            acc = acc * alpha[:, None]
            for j in tl.static_range(HEADS):  # p @ v per KV head, with the other heads' rows of p zeroed
                v_j = tl.load(
                    v_ptrs + stride_vh.to(tl.int64) * j + offs_n[:, None].to(tl.int64) * stride_vn,
                    mask=n_ok & d_ok,
                    other=0.0,
                )
                p_j = tl.where((kv_of_row == j)[:, None], p, 0.0)
                acc = _dot(p_j, _kv_tile(v_j, q.dtype, KV_FP8, True), acc, INTERP_BF16, DOT_PRECISION)

    has_any = l_i > 0.0
    o = acc / tl.where(has_any, l_i, 1.0)[:, None]  # zeros where nothing was visible
    if SCALE_KIND > 0:
        o = o * v_scale  # the merge is linear in the partials: scaling them scales the output
    lse2 = tl.where(has_any, m_i + tl.log2(tl.where(has_any, l_i, 1.0)), float("-inf"))
    if SINGLE:
        _write_out(o, lse2, Out, stride_ob, stride_oh, stride_ot, Lse, stride_lb, stride_lh, Sinks, b64, head,
                   tok, m_ok, offs_d, HEAD_DIM, HAS_SINKS, WRITE_LSE, INTERP_BF16)  # fmt: skip
    else:
        # every split writes its partial (zeros when empty) so the merge loads LSEs and partials at once
        row = (b64 * H_KV + h_kv) * M + offs_m  # = (b * H_kv + h_kv of the row) * M + its query row
        tl.store(PartLse + row * num_splits + split, lse2, mask=m_ok)
        po_ptrs = PartO + (row[:, None] * num_splits + split) * HEAD_DIM + offs_d[None, :]
        tl.store(po_ptrs, o, mask=m_ok[:, None] & d_ok)
        if FUSED_MERGE:
            # The last split of this program row to finish merges: every thread's stores precede the
            # counter's release (bar.sync, then one thread's acq_rel atomic at GPU scope); its acquire
            # precedes the merge's loads. It then zeroes the counter for the next call (none of this
            # call's programs touches it again).
            tl.debug_barrier()
            counter = Counters + tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)
            done = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if done == num_splits - 1:
                tl.store(counter, 0)
                o, lse2 = _merge_partials(
                    PartO, PartLse, row, num_splits, m_ok, offs_d, HEAD_DIM, BLOCK_M, BLOCK_D
                )
                _write_out(
                    o, lse2, Out, stride_ob, stride_oh, stride_ot, Lse, stride_lb, stride_lh, Sinks, b64,
                    head, tok, m_ok, offs_d, HEAD_DIM, HAS_SINKS, WRITE_LSE, INTERP_BF16,
                )  # fmt: skip


@triton.jit(do_not_specialize=["num_splits"])
def merge_kernel(
    Out,
    stride_ob,
    stride_oh,
    stride_ot,  # [B, H_q, T_q, D]
    Lse,
    stride_lb,
    stride_lh,  # float32 [B, H_q, T_q]
    PartO,  # float32 [B * H_kv, M, num_splits, D]
    PartLse,  # float32 [B * H_kv, M, num_splits]
    Sinks,  # [H_q] fp32/bf16/fp16, read as fp32; used when HAS_SINKS
    num_splits,  # 2..SPLITS_P2, run time
    H_KV: tl.constexpr,
    GROUP: tl.constexpr,
    T_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One program per query row: LSE-weighted sum of the splits' partial outputs, in split order."""
    M: tl.constexpr = GROUP * T_Q
    row = tl.program_id(0).to(tl.int64)  # = (b * H_kv + h_kv) * M + m
    m = row % M
    bh = row // M
    b = bh // H_KV
    head = (bh % H_KV) * GROUP + m // T_Q
    tok = m % T_Q
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, BLOCK_D)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # the split kernel's partials are visible after this
        tl.extra.cuda.gdc_launch_dependents()  # a PDL successor may launch now; it waits for our end
    part = tl.load(  # issued together with the LSE load: no dependent round trip
        PartO + (row * num_splits + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
        mask=(offs_s[:, None] < num_splits) & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    lse_s = tl.load(PartLse + row * num_splits + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    lse_max = tl.max(lse_s, axis=0)
    lse_ref = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    if HAS_SINKS:  # a sink logit joins the denominator (and the reference point: it is finite)
        sink2 = tl.load(Sinks + head).to(tl.float32) * 1.4426950408889634
        lse_ref = tl.maximum(lse_max, sink2)
    w = tl.exp2(lse_s - lse_ref)  # 0 for empty splits
    w_sum = tl.sum(w, axis=0)
    if HAS_SINKS:
        w_sum = w_sum + tl.exp2(sink2 - lse_ref)
    o = tl.sum(part * w[:, None], axis=0) / tl.where(w_sum > 0.0, w_sum, 1.0)
    out_ptrs = Out + b * stride_ob + head * stride_oh + tok * stride_ot + offs_d
    tl.store(out_ptrs, _to_out(o, Out.dtype.element_ty, INTERP_BF16), mask=offs_d < HEAD_DIM)
    if WRITE_LSE:
        lse = tl.where(w_sum > 0.0, (lse_ref + tl.log2(w_sum)) * 0.6931471805599453, float("-inf"))
        tl.store(Lse + b * stride_lb + head * stride_lh + tok, lse)
