"""kvdecode's own Python per call, with the kernel launches stubbed out: no GPU needed.

The host time of an eager call is kvdecode's Python (checks, plan lookup, argument lists) plus Triton's
launches. On the GPU machine the two are measured together (``bench/bench_launch.py``) on a host whose
timings swing by +-30% between runs; this isolates the first part, on any machine, so two checkouts can
be compared in one sitting::

    (cd /path/to/old/checkout && PYTHONPATH=$PWD python /path/to/bench/host_python_ab.py old)
    python bench/host_python_ab.py new

Problem: B 1, H 32/8, D 128, bf16, capacity 256 on the CPU (the Triton interpreter's plan; its launches
replaced by no-ops). Prints the best of 5 rounds of 20000 calls, µs per call, for ``DecodePlan.run(out=)``
and ``decode_attention(out=, backend="triton", max_seq_len=)``; with ``--fused`` ``DecodePlan.run`` at 4
splits, with a merge kernel and with ``fused_merge``; with ``--attend``
``StaticKVCache.attend(layer, q, out=)`` (plain and left-padded); with ``--hf`` also (best of 3 rounds of
5000) the call one layer of a transformers decode step makes, ``decode_attention_op`` with kv_start, a
sliced bool mask and a BSHD out, and the whole attention function of that layer
(``kvdecode_attention_forward`` with kvdecode's marked mask, not the first layer: lengths memoized).
"""

from __future__ import annotations

import sys

import torch

import kvdecode
from kvdecode.plan import PLANS
from kvdecode.timing import host_overhead_us

B, HQ, HKV, D, CAP = 1, 32, 8, 128, 256


class _NoLaunch:
    def __call__(self, grid, args, spec, binder_args=None) -> None:
        pass


def _stub_launches() -> None:
    """Every plan made so far launches nothing (its kernels replaced by no-ops)."""
    for the_plan in PLANS._plans.values():
        la = the_plan.launcher
        la._split = la._split_fused = la._merge = _NoLaunch()


def main() -> None:
    label = sys.argv[1] if len(sys.argv) > 1 else "this checkout"
    q = torch.randn(B, HQ, 1, D, dtype=torch.bfloat16)
    k = torch.randn(B, HKV, CAP, D, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lens = torch.full((B,), CAP, dtype=torch.int32)
    out = torch.empty_like(q)
    kvdecode.decode_attention(q, k, v, lens, out=out, backend="triton", max_seq_len=CAP)
    (the_plan,) = PLANS._plans.values()  # the one plan that call made
    _stub_launches()
    rounds = [
        (
            host_overhead_us(lambda: the_plan.run(q, k, v, lens, out=out), n=20000),
            host_overhead_us(
                lambda: kvdecode.decode_attention(q, k, v, lens, out=out, backend="triton", max_seq_len=CAP),
                n=20000,
            ),
        )
        for _ in range(5)
    ]
    run_us, call_us = min(r for r, _ in rounds), min(c for _, c in rounds)
    print(f"{label}: DecodePlan.run {run_us:.2f} us, decode_attention {call_us:.2f} us", end="")
    print(" (best of 5 rounds, launches stubbed)")
    if "--fused" in sys.argv:
        _fused(label, the_plan, q, k, v, lens, out)
    if "--attend" in sys.argv:
        _attend(label, q)
    if "--hf" in sys.argv:
        _hf_layer(label, q, k, v)


def _fused(label: str, the_plan, q, k, v, lens, out) -> None:
    """``DecodePlan.run`` with 4 splits, a merge kernel against ``fused_merge`` (one launch, the stream's
    scratch instead of partials allocated per call)."""
    from dataclasses import replace

    from kvdecode.triton_kernels import SplitKVLauncher

    times = {}
    for fused in (False, True):
        config = replace(the_plan.launcher.config, num_splits=4, fused_merge=fused)
        launcher = SplitKVLauncher(the_plan.problem, config)
        split_plan = kvdecode.DecodePlan(the_plan.problem, the_plan.choice, False, launcher)
        split_plan.run(q, k, v, lens, out=out)  # (interpreter launches)
        launcher._split = launcher._split_fused = launcher._merge = _NoLaunch()
        times["fused merge" if fused else "merge kernel"] = min(
            host_overhead_us(lambda p=split_plan: p.run(q, k, v, lens, out=out), n=20000) for _ in range(5)
        )
    print(
        f"{label}: DecodePlan.run, 4 splits: " + ", ".join(f"{n} {us:.2f} us" for n, us in times.items()),
        end="",
    )
    print(" (best of 5 rounds, launches stubbed)")


def _attend(label: str, q) -> None:
    """``StaticKVCache.attend(layer, q, out=)``, plain and left-padded (kv_start), 2 layers."""
    times = {}
    for left in (False, True):
        cache = kvdecode.StaticKVCache(2, B, HKV, CAP, D, dtype=q.dtype, device="cpu", left_padded=left,
                                       backend="triton")  # fmt: skip
        out = torch.empty_like(q)
        cache.advance(1)
        cache.attend(0, q, out=out)  # the plan made (an interpreter launch)
        _stub_launches()
        name = "left-padded" if left else "plain"
        times[name] = min(
            host_overhead_us(lambda c=cache, o=out: c.attend(1, q, out=o), n=10000) for _ in range(3)
        )
    print(
        f"{label}: StaticKVCache.attend " + ", ".join(f"{n} {us:.2f} us" for n, us in times.items()), end=""
    )
    print(" (best of 3 rounds, launches stubbed)")


def _hf_layer(label: str, q, k, v) -> None:
    from kvdecode.hf.attention import kvdecode_attention_forward
    from kvdecode.hf.mask import kvdecode_mask
    from kvdecode.ops import decode_attention_op

    class Layer(torch.nn.Module):
        is_causal, layer_idx, num_key_value_groups = True, 1, HQ // HKV

    layer, scale = Layer(), D**-0.5
    mask = kvdecode_mask(batch_size=B, q_length=1, kv_length=CAP, q_offset=torch.tensor(100), device="cpu")
    lens, starts = torch.full((B,), 101, dtype=torch.int32), torch.zeros(B, dtype=torch.int32)
    out = torch.empty(B, 1, HQ, D, dtype=q.dtype).transpose(1, 2)  # what the HF layer hands over
    with torch.no_grad():
        kvdecode_attention_forward(layer, q, k, v, mask, scaling=scale)  # plans made (interpreter launches)
        _stub_launches()
        op_us = min(
            host_overhead_us(
                lambda: decode_attention_op(
                    q,
                    k,
                    v,
                    lens,
                    scale=scale,
                    kv_start=starts,
                    mask=mask[..., :CAP],
                    out=out,
                    max_seq_len=CAP,
                ),
                n=5000,
            )
            for _ in range(3)
        )
        layer_us = min(
            host_overhead_us(lambda: kvdecode_attention_forward(layer, q, k, v, mask, scaling=scale), n=5000)
            for _ in range(3)
        )
    print(f"{label}: decode_attention_op as an HF layer calls it {op_us:.2f} us, ", end="")
    print(f"kvdecode_attention_forward {layer_us:.2f} us (best of 3 rounds, launches stubbed)")


if __name__ == "__main__":
    main()
