"""The split kernel compiles for sm90 in every constexpr family the launcher can ask for (no GPU needed).

The interpreter runs the kernel's Python, not Triton's compiler: a kernel it runs correctly may still be
refused by the compiler (a loop-carried variable whose type changes, a layout the lowering rejects), and
that would first show on the GPU. Here the local Triton compiles it for an H100/H200 (``sm_90``) with
its own ``ptxas``, as ``bench/kernel_sass.py`` does, for the variants that differ in structure: one and
several KV heads per program, 16-bit and fp8 K/V, masks, windows, softcap, sinks, T_q > 1, one split.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

# isort: off
# kvdecode first: on a machine without CUDA it turns the interpreter on, which must precede `import triton`
# for every other test in this process
import kvdecode  # noqa: F401
import triton

# isort: on

KERNEL = Path(__file__).resolve().parents[2] / "kvdecode" / "triton_kernels" / "split_kv.py"
POINTERS = ("Out", "Lse", "PartO", "PartLse", "Q", "K", "V", "SeqLens", "KvStart", "Mask", "KScale", "VScale",
            "Sinks")  # fmt: skip
FLOATS = ("qk_scale", "softcap")

# (HEADS, T_Q, KV, KV_FP8, MASK_KIND, window, softcap, sinks, SINGLE, stages)
VARIANTS = [
    (1, 1, "bf16", 0, 0, False, False, False, False, 2),
    (1, 1, "fp8e4nv", 3, 3, False, False, False, False, 3),
    (4, 1, "bf16", 0, 3, False, False, False, False, 2),
    (4, 1, "fp8e4nv", 3, 0, False, False, False, False, 3),
    (2, 3, "bf16", 0, 1, True, True, True, True, 3),
    (4, 1, "fp8e5", 3, 2, True, False, True, False, 2),
]


def _compiler_kernel(monkeypatch):
    """A fresh ``split_kv_kernel`` made with the interpreter off (``triton.jit`` reads the variable when
    the function is decorated), so that ``triton.compile`` gets a ``JITFunction``."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = importlib.util.spec_from_file_location("split_kv_for_sm90", KERNEL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.split_kv_kernel


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "h{}_tq{}_{}_m{}".format(*v[:3], v[4]))
def test_split_kernel_compiles_for_sm90(monkeypatch, variant):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    heads, t_q, kv, kv_fp8, mask_kind, window, softcap, sinks, single, stages = variant
    fn = _compiler_kernel(monkeypatch)
    if not hasattr(fn, "arg_names"):
        pytest.skip(f"this Triton ({triton.__version__}) has no JITFunction.arg_names")
    names = fn.arg_names
    block_m = max(16, triton.next_power_of_2(4 * t_q * heads))  # GROUP 4
    const = dict(SINGLE=single, H_KV=8, GROUP=4, T_Q=t_q, HEAD_DIM=128, BLOCK_M=block_m, BLOCK_N=64,
                 BLOCK_D=128, HAS_KV_START=True, HAS_WINDOW=window, HAS_SOFTCAP=softcap, HAS_SINKS=sinks,
                 MASK_KIND=mask_kind, WRITE_LSE=True, INTERP_BF16=False, DOT_PRECISION="ieee", USE_PDL=True,
                 KV_FP8=kv_fp8, SCALE_KIND=2 if kv_fp8 else 0, HEADS=heads)  # fmt: skip
    assert set(const) <= set(names), f"the kernel lost parameters {set(const) - set(names)}"
    types = dict.fromkeys(POINTERS, "*fp32")
    types.update(Out="*bf16", Q="*bf16", K=f"*{kv}", V=f"*{kv}", SeqLens="*i32", KvStart="*i32")
    types["Mask"] = "*i1" if mask_kind in (1, 3) else "*bf16"
    signature = {
        n: "constexpr" if n in const else types.get(n, "fp32" if n in FLOATS else "i32") for n in names
    }
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in POINTERS}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs=aligned)  # fmt: skip
    compiled = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=stages)
    )
    assert compiled.asm.get("cubin"), "no cubin"
    assert compiled.metadata.shared <= 227 * 1024, f"{compiled.metadata.shared} B of shared memory"
