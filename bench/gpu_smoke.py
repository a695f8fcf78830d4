"""Quick GPU correctness sweep of decode_attention(backend=...) against the float64 reference."""

from __future__ import annotations

import sys

import torch

import kvdecode
from kvdecode.reference import lse_error, reference_decode_attention, tolerance_for, within_tolerance


def case(b, hq, hkv, tq, d, cap, dt, *, kv_start=False, mask=None, bshd=False, backend="triton", seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    q = torch.randn(b, hq, tq, d, device=dev, dtype=dt, generator=g)
    if bshd:
        k = torch.randn(b, cap, hkv, d, device=dev, dtype=dt, generator=g).transpose(1, 2)
        v = torch.randn(b, cap, hkv, d, device=dev, dtype=dt, generator=g).transpose(1, 2)
    else:
        k = torch.randn(b, hkv, cap, d, device=dev, dtype=dt, generator=g)
        v = torch.randn(b, hkv, cap, d, device=dev, dtype=dt, generator=g)
    lens = torch.randint(tq, cap + 1, (b,), device=dev, dtype=torch.int32, generator=g)
    lens[0] = cap
    start = None
    if kv_start:
        start = (torch.rand(b, device=dev, generator=g) * (lens - tq + 1).float()).to(torch.int32)
    m = None
    if mask == "bool":
        m = torch.rand(b, 1, tq, cap, device=dev, generator=g) > 0.3
    elif mask == "add":
        m = torch.randn(1, hq, 1, cap, device=dev, dtype=dt, generator=g)
    out = torch.full_like(q, float("nan"))
    o, lse = kvdecode.decode_attention(q, k, v, lens, kv_start=start, mask=m, out=out, return_lse=True,
                                       backend=backend)  # fmt: skip
    ref, rlse = reference_decode_attention(q, k, v, lens, kv_start=start, mask=m)
    close, err = within_tolerance(o, ref, dt)  # the table of kvdecode.reference, as the tests use it
    lse_err = lse_error(lse, rlse)
    ok = close and lse_err <= tolerance_for(dt).lse
    name = f"{backend} b{b} hq{hq} hkv{hkv} tq{tq} d{d} cap{cap} {dt} kvs={kv_start} mask={mask} bshd={bshd}"
    print(f"{'ok ' if ok else 'BAD'} {name}: err {err:.2e} lse {lse_err:.1e}", flush=True)
    return ok


def main() -> int:
    good = True
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        good &= case(2, 32, 8, 1, 128, 1000, dt)
    for d in (16, 64, 80, 96, 112, 160, 192, 256):
        good &= case(3, 8, 2, 1, d, 777, torch.bfloat16, seed=d)
    for hq, hkv in ((32, 32), (32, 1), (21, 3), (28, 4), (56, 8)):
        good &= case(2, hq, hkv, 1, 128, 1500, torch.bfloat16)
    for tq in (2, 4, 8):
        good &= case(3, 32, 8, tq, 128, 900, torch.bfloat16, seed=tq)
        good &= case(3, 32, 1, tq, 64, 900, torch.float16, seed=tq)
    good &= case(4, 16, 4, 2, 128, 600, torch.bfloat16, kv_start=True)
    good &= case(4, 16, 4, 3, 64, 600, torch.float16, mask="bool")
    good &= case(4, 16, 4, 1, 64, 600, torch.float32, mask="add")
    good &= case(4, 16, 4, 2, 128, 600, torch.bfloat16, bshd=True, kv_start=True)
    good &= case(1, 32, 8, 1, 128, 131072, torch.bfloat16)
    good &= case(64, 32, 8, 1, 128, 2048, torch.bfloat16)
    print("SMOKE", "PASS" if good else "FAIL")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
