"""Where the host time of one eager call goes: cProfile over back-to-back calls (B 1, H 32/8, D 128).

    python bench/profile_host.py [--calls 2000]

Prints, per entry point, µs per call and the functions with the most own time; for Triton plans also
whether the direct launch path is in use (:class:`kvdecode.triton_kernels.bound.BoundKernel`).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    calls = ap.parse_args().calls
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, 1024, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((1,), 1000, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
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
