"""The split kernel compiles for sm90 in every constexpr family the launcher can ask for (no GPU needed).

The interpreter runs the kernel's Python, not Triton's compiler: a kernel it runs correctly may still be
refused by the compiler (a loop-carried variable whose type changes, a layout the lowering rejects), and
that would first show on the GPU. Here the local Triton compiles it for an H100/H200 (``sm_90``) with
its own ``ptxas``, as ``bench/kernel_sass.py`` does, for the variants that differ in structure: one and
several KV heads per program, 16-bit and fp8 K/V, masks (the one-row mask with and without its check),
windows, softcap, sinks, T_q > 1, one split, the fused merge.

The compiles run in a child process without ``TRITON_INTERPRET``: in this one, where the interpreter is
on, Triton's own ``tl`` functions are interpreter objects that its compiler cannot use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNEL = Path(__file__).resolve().parents[2] / "kvdecode" / "triton_kernels" / "split_kv.py"
POINTERS = ("Out", "Lse", "PartO", "PartLse", "Q", "K", "V", "SeqLens", "KvStart", "Mask", "KScale", "VScale",
            "Sinks", "Counters")  # fmt: skip
FLOATS = ("qk_scale", "softcap")
RUNTIME_INTS = ("capacity", "window", "num_splits")

# (HEADS, T_Q, KV, KV_FP8, MASK_KIND, window, softcap, sinks, SINGLE, FUSED_MERGE, stages, MASK_CHECK)
VARIANTS = [
    (1, 1, "bf16", 0, 0, False, False, False, False, False, 2, False),
    (1, 1, "fp8e4nv", 3, 3, False, False, False, False, True, 3, True),
    (4, 1, "bf16", 0, 3, False, False, False, False, True, 2, True),
    (4, 1, "fp8e4nv", 3, 0, False, False, False, False, False, 3, False),
    (2, 3, "bf16", 0, 1, True, True, True, True, False, 3, False),
    (4, 1, "fp8e5", 3, 2, True, False, True, False, True, 2, False),
    (1, 1, "bf16", 0, 3, True, False, False, False, False, 2, True),  # the mask check without the peel
    (1, 3, "bf16", 0, 3, False, True, False, True, False, 2, False),
]


def _name(v) -> str:
    return "h{}_tq{}_{}_m{}_fm{:d}_mc{:d}".format(*v[:3], v[4], v[9], v[11])


def compile_variant(variant) -> dict:
    """Compile one variant for sm90 (in a process without the interpreter); its resources."""
    import importlib.util

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    heads, t_q, kv, kv_fp8, mask_kind, window, softcap, sinks, single, fused, stages, check = variant
    spec = importlib.util.spec_from_file_location("split_kv_for_sm90", KERNEL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = module.split_kv_kernel
    names = fn.arg_names
    block_m = max(16, triton.next_power_of_2(4 * t_q * heads))  # GROUP 4
    const = dict(SINGLE=single, H_KV=8, GROUP=4, T_Q=t_q, HEAD_DIM=128, BLOCK_M=block_m, BLOCK_N=64,
                 BLOCK_D=128, HAS_KV_START=True, HAS_WINDOW=window, HAS_SOFTCAP=softcap, HAS_SINKS=sinks,
                 MASK_KIND=mask_kind, WRITE_LSE=True, INTERP_BF16=False, DOT_PRECISION="ieee", USE_PDL=True,
                 KV_FP8=kv_fp8, SCALE_KIND=2 if kv_fp8 else 0, HEADS=heads, FUSED_MERGE=fused,
                 MASK_CHECK=check)  # fmt: skip
    unknown = [n for n in names if n not in const and n not in POINTERS + FLOATS + RUNTIME_INTS]
    unknown = [n for n in unknown if not n.startswith("stride_")]
    if unknown or set(const) - set(names):
        return dict(error=f"parameters unknown to this test {unknown}, lost {set(const) - set(names)}")
    types = dict.fromkeys(POINTERS, "*fp32")
    types.update(Out="*bf16", Q="*bf16", K=f"*{kv}", V=f"*{kv}", SeqLens="*i32", KvStart="*i32")
    types.update(Counters="*i32", Mask="*i1" if mask_kind in (1, 3) else "*bf16")
    signature = {
        n: "constexpr" if n in const else types.get(n, "fp32" if n in FLOATS else "i32") for n in names
    }
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in POINTERS}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs=aligned)  # fmt: skip
    try:
        compiled = triton.compile(
            src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=stages)
        )
    except Exception as exc:  # reported by the test, with the compiler's message
        return dict(error=f"{type(exc).__name__}: {exc}"[-3000:])
    ptx = compiled.asm["ptx"]
    atom = ptx.find("atom.global.gpu.acq_rel.add")  # the fused merge's counter
    found = atom >= 0
    return dict(cubin=bool(compiled.asm.get("cubin")), shared=compiled.metadata.shared, atom=found,
                barrier_first=found and ptx.rfind("bar.sync", 0, atom) > ptx.rfind("st.global", 0, atom),
                cg_loads=found and ".cg" in ptx[atom:])  # fmt: skip


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    if run.returncode != 0:
        pytest.fail(f"the compile process failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", VARIANTS, ids=_name)
def test_split_kernel_compiles_for_sm90(compiled, variant):
    found = compiled[_name(variant)]
    assert "error" not in found, found.get("error")
    assert found["cubin"], "no cubin"
    assert found["shared"] <= 227 * 1024, f"{found['shared']} B of shared memory"
    fused = variant[9]
    # the fused merge's ordering, as compiled: a CTA barrier after the partials' last store, then the
    # GPU-scope acq_rel counter, then the partials loaded through L2; none of it without the fused merge
    assert found["atom"] == fused and found["barrier_first"] == fused and found["cg_loads"] == fused, found


if __name__ == "__main__":
    print(json.dumps({_name(v): compile_variant(v) for v in VARIANTS}))
