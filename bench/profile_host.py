"""Where the host time of one eager call goes: cProfile over back-to-back calls (B 1, H 32/8, D 128).

    python bench/profile_host.py [--calls 2000]

Prints, per entry point, µs per call and the functions with the most own time; for Triton plans also
whether the direct launch path is in use (:class:`kvdecode.triton_kernels.bound.BoundKernel`).

``--parts`` times the pieces of one ``DecodePlan.run`` (Triton) separately, 1000 back-to-back calls each
then one sync (:func:`kvdecode.timing.host_overhead_us`): the signature test, the partials' allocation,
each kernel's launch through :class:`BoundKernel`, the compiled kernel's own launcher called bare, the
stream lookup, the whole ``run``, ``decode_attention``, the torch op and its implementation called
directly (the op's dispatch), beside torch SDPA, so the host cost can be attributed.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

import kvdecode


def profile(name: str, fn, calls: int) -> None:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    us = (time.perf_counter() - t0) / calls * 1e6
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(14)
    lines = [ln for ln in text.getvalue().splitlines() if ln.strip()][4:]
    print(f"== {name}: {us:.1f} µs per call (unprofiled)")
    print("\n".join(lines))


def parts(q, k, lens, out) -> None:
    from dataclasses import replace

    from kvdecode._checks import inputs_match
    from kvdecode.timing import host_overhead_us
    from kvdecode.triton_kernels import SplitKVLauncher
    from kvdecode.triton_kernels.bound import _hooks

    tri = kvdecode.plan(kvdecode.DecodeProblem.from_tensors(q, k, k, lens), backend="triton")
    tri.run(q, k, k, lens, out=out)  # the default: the fused merge for an eager call
    la = SplitKVLauncher(
        tri.problem, replace(tri.launcher.config, fused_merge=False)
    )  # split + merge kernels
    merge_plan = kvdecode.DecodePlan(tri.problem, tri.choice, False, la)
    merge_plan.run(q, k, k, lens, out=out)
    fused = SplitKVLauncher(tri.problem, replace(la.config, fused_merge=True))  # one kernel
    fused_plan = kvdecode.DecodePlan(tri.problem, tri.choice, False, fused)
    fused_plan.run(q, k, k, lens, out=out)
    captured = {}

    def spy(bound, label):
        real = bound.__call__

        def call(grid, args, spec, binder_args=None):
            # the direct launch's arguments (pointers as integers) and the binder's (tensors)
            captured[label] = (grid, list(args), spec, list(binder_args() if binder_args else args))
            real(grid, args, spec, binder_args)

        return call

    split, merge, fused_split = la._split, la._merge, fused._split_fused
    labels = {split: split.name, merge: merge.name, fused_split: f"{fused_split.name} (fused merge)"}
    la._split, la._merge, fused._split_fused = (spy(b, labels[b]) for b in (split, merge, fused_split))
    merge_plan.run(q, k, k, lens, out=out)
    fused_plan.run(q, k, k, lens, out=out)
    la._split, la._merge, fused._split_fused = split, merge, fused_split
    rows = {
        "python loop (lambda: None)": lambda: None,
        "torch._C._cuda_getCurrentRawStream": lambda: torch._C._cuda_getCurrentRawStream(0),
        "torch.cuda.current_device()": torch.cuda.current_device,
        "_hooks()": _hooks,
        "inputs_match": lambda: inputs_match(tri._sig, q, k, k, lens),
        "torch.empty(partials)": lambda: torch.empty(la._part_elems, dtype=torch.float32, device=q.device),
    }
    for bound, label in labels.items():
        if label not in captured:
            continue
        grid, args, spec, with_tensors = captured[label]
        name = f"BoundKernel {label} ({len(args)} args)"
        rows[name] = lambda b=bound, g=grid, a=args, s=spec, t=with_tensors: b(g, a, s, lambda: t)
        kernel = bound._compiled.get(spec)
        if kernel is not None:
            stream = torch._C._cuda_getCurrentRawStream(0)
            for how, a in (("pointers as integers", args), ("tensors", with_tensors)):
                rows[f"bare kernel.run {label}, {how}"] = lambda kn=kernel, g=grid, a=a, st=stream: kn.run(
                    g[0], g[1], g[2], st, kn.function, kn.packed_metadata, None, None, None, *a
                )
    rows["launcher, merge kernel (allocation + both launches)"] = lambda: la(
        q, k, k, lens, None, None, out, None
    )
    rows["launcher, fused merge (one launch, the stream's scratch)"] = lambda: fused(
        q, k, k, lens, None, None, out, None
    )
    rows["DecodePlan.run, merge kernel (triton, out=)"] = lambda: merge_plan.run(q, k, k, lens, out=out)
    rows["DecodePlan.run, fused merge (triton, out=)"] = lambda: fused_plan.run(q, k, k, lens, out=out)
    rows["DecodePlan.run, the default (triton, out=)"] = lambda: tri.run(q, k, k, lens, out=out)
    rows["decode_attention(max_seq_len=1000, out=)"] = lambda: kvdecode.decode_attention(
        q, k, k, lens, max_seq_len=1000, out=out
    )
    from kvdecode.ops import _decode_attention_impl

    scale = q.shape[-1] ** -0.5
    rows["torch.ops.kvdecode.decode_attention (positional)"] = lambda: torch.ops.kvdecode.decode_attention(
        q, k, k, lens, None, None, out, scale, 1000
    )
    rows["the op's implementation called directly"] = lambda: _decode_attention_impl(
        q, k, k, lens, None, None, out, scale, 1000
    )
    rows["torch SDPA (exact slice, enable_gqa)"] = lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :, :1000], k[:, :, :1000], enable_gqa=True
    )
    print(f"== parts of one call, µs (1000 calls, then one sync); splits {la.num_splits}")
    for _ in range(2):  # the second round is the one to read: the first warms caches and clocks
        for name, fn in rows.items():
            print(f"  {name:55s} {host_overhead_us(fn, 1000):8.2f}")
        print("  --")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--parts", action="store_true", help="time the pieces of one DecodePlan.run instead")
    args = ap.parse_args()
    calls = args.calls
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, 1024, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((1,), 1000, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    if args.parts:
        parts(q, k, lens, out)
        return
    problem = kvdecode.DecodeProblem.from_tensors(q, k, k, lens)
    tri = kvdecode.plan(problem, backend="triton")
    profile("DecodePlan.run triton", lambda: tri.run(q, k, k, lens, out=out), calls)
    print("direct:", tri.launcher._split.direct, len(tri.launcher._split._compiled), tri.launcher.num_splits)
    profile("launcher only", lambda: tri.launcher(q, k, k, lens, None, None, out, None), calls)
    try:
        cud = kvdecode.plan(problem, backend="cudnn")
        profile("DecodePlan.run cudnn", lambda: cud.run(q, k, k, lens, out=out), calls)
    except kvdecode.UnsupportedError as exc:
        print("cudnn:", exc)
    profile("decode_attention max_seq_len", lambda: kvdecode.decode_attention(q, k, k, lens, max_seq_len=1000,
                                                                            out=out), calls)  # fmt: skip
    profile("torch SDPA", lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :, :1000], k[:, :, :1000], enable_gqa=True), calls)  # fmt: skip


if __name__ == "__main__":
    main()
