"""Compile the split-KV kernel for sm90 on this machine (no GPU needed) and count its main loop's SASS.

A development tool: how many instructions one K/V tile costs per thread, by opcode, for a kernel variant
(``KV_FP8`` 0 bf16 caches, 1 fp8 -> q's dtype, 2 fp8 -> fp16 with Triton casts, 3 fp8 -> fp16 with V in
PTX), pipeline depth and tile size. Uses the local Triton's compiler, ``ptxas`` and ``cuobjdump`` (the
Triton wheel ships them); the GPU machine's Triton may lower differently, so check there too.

    python bench/kernel_sass.py                          # the variants of bench/NOTES.md (fp8 section)
    python bench/kernel_sass.py --kv fp8e4nv --mode 3 --stages 3 --block-n 64 --top 30
    python bench/kernel_sass.py --heads 1 4 --kv bf16 --stages 2 --block-n 32   # KV heads per CTA
    python bench/kernel_sass.py --kernel /tmp/old_split_kv.py                   # another version's kernel
    python bench/kernel_sass.py --kv bf16 --stages 2 --mask-kind 3 --kv-start --loops 2  # a transformers step

With ``--heads``, the loop count is also given per KV head (a program with 4 heads runs 4 heads' tiles
per iteration), and the shared memory each variant asks for (the H200 gives a CTA at most 227 KB).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

KERNEL = Path(__file__).resolve().parent.parent / "kvdecode" / "triton_kernels" / "split_kv.py"
DEFAULT = [
    ("bf16", 0, 2, 64),
    ("fp8e4nv", 1, 3, 64),
    ("fp8e4nv", 2, 3, 64),
    ("fp8e4nv", 3, 3, 64),
    ("fp8e5", 3, 3, 64),
]


# run-time scalars (float ones named; the rest are i32)
RUNTIME = {"qk_scale": "fp32", "softcap": "fp32", "capacity": "i32", "window": "i32", "num_splits": "i32"}
RUNTIME.update({n: "i32" for n in (
    "stride_ob", "stride_oh", "stride_ot", "stride_lb", "stride_lh", "stride_qb", "stride_qh", "stride_qt",
    "stride_kb", "stride_kh", "stride_kn", "stride_vb", "stride_vh", "stride_vn", "stride_mb", "stride_mh",
    "stride_mt", "stride_mn",
)})  # fmt: skip


def _kernel(path: Path = KERNEL):
    # loaded from its file, not through kvdecode: importing kvdecode on a machine without a GPU turns
    # on Triton's interpreter, which cannot compile
    spec = importlib.util.spec_from_file_location("split_kv", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.split_kv_kernel


def compile_sass(
    kv: str,
    mode: int,
    stages: int,
    block_n: int,
    warps: int = 4,
    heads: int = 1,
    kernel: Path = KERNEL,
    fused: bool = False,
    mask_kind: int = 0,
    kv_start: bool = False,
    mask_check: bool = True,
) -> tuple[str, str]:
    """``(SASS, its resources: shared memory, registers, local memory)`` of the split kernel: H_q 32 /
    H_kv 8 (GROUP 4), D 128, T_q 1, bf16 q, several splits, ``heads`` KV heads per program."""
    fn = _kernel(kernel)
    names = fn.arg_names
    ptr = {"Out": "*bf16", "Lse": "*fp32", "PartO": "*fp32", "PartLse": "*fp32", "Q": "*bf16", "K": f"*{kv}",
           "V": f"*{kv}", "SeqLens": "*i32", "KvStart": "*i32", "Mask": "*i32", "KScale": "*fp32",
           "VScale": "*fp32", "Sinks": "*fp32", "Counters": "*i32"}  # fmt: skip
    const = dict(SINGLE=False, H_KV=8, GROUP=4, T_Q=1, HEAD_DIM=128, BLOCK_M=16, BLOCK_N=block_n, BLOCK_D=128,
                 HAS_KV_START=False, MASK_KIND=0, WRITE_LSE=False, INTERP_BF16=False, DOT_PRECISION="ieee",
                 USE_PDL=True, KV_FP8=mode, SCALE_KIND=2 if mode else 0, HAS_WINDOW=False, HAS_SOFTCAP=False,
                 HAS_SINKS=False)  # fmt: skip
    if "HEADS" in names:
        const.update(HEADS=heads, BLOCK_M=max(16, 4 * heads))
    elif heads != 1:
        raise SystemExit(f"{kernel} has no HEADS parameter (one KV head per program)")
    const.update(MASK_KIND=mask_kind, HAS_KV_START=kv_start)
    if "MASK_CHECK" in names:
        const.update(MASK_CHECK=mask_check and mask_kind == 3)
    if mask_kind in (1, 3):
        ptr["Mask"] = "*i1"
    if "FUSED_MERGE" in names:
        const.update(FUSED_MERGE=fused)
    elif fused:
        raise SystemExit(f"{kernel} has no FUSED_MERGE parameter")
    missing = [n for n in names if n not in const and n not in ptr and n not in RUNTIME]
    if missing:  # a new parameter: say what it is rather than compile it as a run-time int
        raise SystemExit(f"kernel_sass.py does not know the kernel's parameters {missing}; add them")
    sig = {n: ptr.get(n, "constexpr" if n in const else RUNTIME.get(n, "i32")) for n in names}
    aligned = {  # what the launcher's specialization tells Triton at run time: 16-byte pointers and strides
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(names)
        if n in ptr or (n.startswith("stride") and n not in ("stride_ot", "stride_mn")) or n == "capacity"
    }
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs=aligned)  # fmt: skip
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps,
                              num_stages=stages))  # fmt: skip
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        cmd = [str(tools / "cuobjdump"), "-sass", str(cubin)]
        sass = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        cmd = [str(tools / "cuobjdump"), "-res-usage", str(cubin)]
        usage = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    spill = re.search(r"LOCAL:(\d+)", usage)
    return sass, f"{compiled.metadata.shared} B shared, {regs.group(1) if regs else '?'} registers, " + (
        f"{spill.group(1) if spill else '?'} B local"
    )


def loops_opcodes(sass: str) -> list[collections.Counter]:
    """Opcodes of each backward-branch loop that no other contains, longest first (the K/V tile loop;
    with ``MASK_KIND`` 3 two: the masked one and the one a program runs when its mask is all True)."""
    ins = [
        (int(m.group(1), 16), m.group(2).strip())
        for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)
    ]
    spans = []
    for addr, text in ins:
        if "BRA" in text:
            targets = re.findall(r"0x([0-9a-f]+)", text)
            if targets and int(targets[-1], 16) < addr:
                spans.append((int(targets[-1], 16), addr))
    outer = [a for a in spans if not any(b != a and b[0] <= a[0] and a[1] <= b[1] for b in spans)]
    counts = [
        collections.Counter(
            t.split()[1] if t.startswith("@") else t.split()[0] for a, t in ins if lo <= a <= hi
        )
        for lo, hi in outer
    ]
    return sorted(counts, key=lambda c: -sum(c.values()))


def loop_opcodes(sass: str) -> collections.Counter:
    """Opcodes of the longest backward-branch loop (the K/V tile loop)."""
    return loops_opcodes(sass)[0]


def main() -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kv", choices=["bf16", "fp8e4nv", "fp8e5"])
    ap.add_argument("--mode", type=int, choices=[0, 1, 2, 3])
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--heads", type=int, nargs="+", default=[1], help="KV heads per program (HEADS)")
    ap.add_argument("--kernel", type=Path, default=KERNEL, help="a split_kv.py (default: this tree's)")
    ap.add_argument("--fused-merge", action="store_true", help="the last split merges (FUSED_MERGE)")
    ap.add_argument("--mask-kind", type=int, choices=[0, 1, 2, 3], default=0, help="MASK_KIND (0: none)")
    ap.add_argument("--kv-start", action="store_true", help="HAS_KV_START (left padding)")
    ap.add_argument("--no-mask-check", action="store_true", help="MASK_CHECK off (mask kind 3)")
    ap.add_argument("--loops", type=int, default=1, help="how many loops to count, longest first")
    args = ap.parse_args()
    variants = DEFAULT if args.kv is None else [(args.kv, args.mode or 0, args.stages, args.block_n)]
    print(
        f"triton {triton.__version__}, sm90, H 32/8, D 128, bf16 q, {args.warps} warps; loop = one "
        f"iteration per thread; kernel {args.kernel}"
    )
    for kv, mode, stages, block_n in variants:
        for heads in args.heads:
            sass, shared = compile_sass(
                kv, mode, stages, block_n, args.warps, heads, args.kernel, args.fused_merge, args.mask_kind,
                args.kv_start, not args.no_mask_check,
            )  # fmt: skip
            head = f"{kv:<8} KV_FP8={mode} stages={stages} block_n={block_n} heads={heads}"
            head += f" mask={args.mask_kind}" + (" kv_start" if args.kv_start else "")
            head += " no-check" if args.no_mask_check and args.mask_kind == 3 else ""
            for i, ops in enumerate(loops_opcodes(sass)[: args.loops]):
                top = ", ".join(f"{op} {n}" for op, n in ops.most_common(args.top))
                total = sum(ops.values())
                per_head = f"({total / heads:.0f} per KV head)"
                print(f"{head} loop {i}: {total} instructions {per_head}, {shared}; {top}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
