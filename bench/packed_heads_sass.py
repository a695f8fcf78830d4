"""Experiment (no GPU needed): does serving four KV heads per CTA cut the decode loop's instructions?

``bench/NOTES.md`` (12-05b) proposes it for GQA 32/8 at T_q 1: the score tile of one KV head has 16 rows
(the dot's minimum) of which 4 are real, and the online softmax costs per thread the same for padded
rows as for real ones. With four KV heads per CTA the 16 rows are the four heads' query groups: four QK
dots (one per KV head, each row keeping its own head's scores), one softmax on a tile whose rows are
all real, four PV dots with each row's P masked to its head.

Two minimal kernels with the same loop (not kvdecode's kernel: no masks, splits, windows...), compiled
for sm90 here with the local Triton, ``ptxas`` and ``cuobjdump`` (see ``kernel_sass.py``); printed: the
tile loop's instructions per thread per KV head, for bf16 K/V and for fp8 (e4m3) converted to fp16::

    python bench/packed_heads_sass.py [--block-n 64] [--stages 2] [--warps 4]

The count is a proxy: whether the GPU time follows it is for a run on the GPU.
"""

from __future__ import annotations

import argparse
import os

import triton
import triton.language as tl
from kernel_sass import loop_opcodes
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@triton.jit
def one_head_per_cta(
    Q, K, V, Out, length, qk_scale, BLOCK_N: tl.constexpr, D: tl.constexpr, FP8: tl.constexpr
):
    kvh = tl.program_id(0)
    offs_m = tl.arange(0, 16)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    real = offs_m < 4
    q = tl.load(Q + (kvh * 4 + offs_m[:, None]) * D + offs_d[None, :], mask=real[:, None], other=0.0)
    if FP8:
        q = q.to(tl.float16)
    m_i = tl.full([16], float("-inf"), tl.float32)
    l_i = tl.zeros([16], tl.float32)
    acc = tl.zeros([16, D], tl.float32)
    base = kvh.to(tl.int64) * length * D
    for start in range(0, length, BLOCK_N):
        rows = (start + offs_n)[:, None] * D + offs_d[None, :]
        k = tl.load(K + base + rows)
        v = tl.load(V + base + rows)
        if FP8:
            k = k.to(tl.float16)
            v = v.to(tl.float16)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    tl.store(Out + (kvh * 4 + offs_m[:, None]) * D + offs_d[None, :], acc / l_i[:, None], mask=real[:, None])


@triton.jit
def four_heads_per_cta(
    Q, K, V, Out, length, qk_scale, BLOCK_N: tl.constexpr, D: tl.constexpr, FP8: tl.constexpr
):
    group = tl.program_id(0)  # KV heads 4 * group .. 4 * group + 3; query rows 16 * group ..
    offs_m = tl.arange(0, 16)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    head_of_row = offs_m // 4
    q = tl.load(Q + (group * 16 + offs_m[:, None]) * D + offs_d[None, :])
    if FP8:
        q = q.to(tl.float16)
    m_i = tl.full([16], float("-inf"), tl.float32)
    l_i = tl.zeros([16], tl.float32)
    acc = tl.zeros([16, D], tl.float32)
    for start in range(0, length, BLOCK_N):
        rows = (start + offs_n)[:, None] * D + offs_d[None, :]
        s = tl.zeros([16, BLOCK_N], tl.float32)
        for h in tl.static_range(4):
            k = tl.load(K + (group * 4 + h).to(tl.int64) * length * D + rows)
            if FP8:
                k = k.to(tl.float16)
            s = tl.where(head_of_row[:, None] == h, tl.dot(q, tl.trans(k)), s)
        s = s * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        for h in tl.static_range(4):
            v = tl.load(V + (group * 4 + h).to(tl.int64) * length * D + rows)
            if FP8:
                v = v.to(tl.float16)
            acc += tl.dot(tl.where(head_of_row[:, None] == h, p, 0.0).to(v.dtype), v)
        m_i = m_new
    tl.store(Out + (group * 16 + offs_m[:, None]) * D + offs_d[None, :], acc / l_i[:, None])


def loop_count(fn, kv: str, block_n: int, stages: int, warps: int) -> tuple[int, dict]:
    sig = {"Q": "*bf16", "K": f"*{kv}", "V": f"*{kv}", "Out": "*bf16", "length": "i32", "qk_scale": "fp32",
           "BLOCK_N": "constexpr", "D": "constexpr", "FP8": "constexpr"}  # fmt: skip
    names = list(sig)
    const = {
        (names.index("BLOCK_N"),): block_n,
        (names.index("D"),): 128,
        (names.index("FP8"),): kv != "bf16",
    }
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ("Q", "K", "V", "Out", "length")}
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=warps, num_stages=stages))  # fmt: skip
    import subprocess
    import tempfile
    from pathlib import Path

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(cubin)], check=True,
                              capture_output=True, text=True).stdout  # fmt: skip
    ops = loop_opcodes(sass)
    return sum(ops.values()), dict(ops.most_common(12))


def main() -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--warps", type=int, default=4)
    args = ap.parse_args()
    print(
        f"triton {triton.__version__}, sm90, D 128, GQA group 4, T_q 1, BLOCK_N {args.block_n}, "
        f"{args.stages} stages, {args.warps} warps; tile loop instructions per thread per KV head"
    )
    for kv in ("bf16", "fp8e4nv"):
        one, one_ops = loop_count(one_head_per_cta, kv, args.block_n, args.stages, args.warps)
        four, four_ops = loop_count(four_heads_per_cta, kv, args.block_n, args.stages, args.warps)
        print(f"{kv:8s} one KV head per CTA: {one}   four per CTA: {four} / 4 = {four / 4:.0f}   "
              f"({four / 4 / one:.2f}x)")  # fmt: skip
        print(f"         one:  {one_ops}")
        print(f"         four: {four_ops}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
