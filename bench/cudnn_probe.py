"""Probe: does cuDNN (capacity graph + padding mask) tolerate NaN / large finite values in unfilled slots?"""

from __future__ import annotations

import torch

import kvdecode
from kvdecode.reference import reference_decode_attention, relative_l2_error


def run(tq: int, lens: list[int], poison: float, cap: int = 256) -> None:
    torch.manual_seed(0)
    b = len(lens)
    q = torch.randn(b, 8, tq, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, 2, cap, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, 2, cap, 128, device="cuda", dtype=torch.bfloat16)
    ref, _ = reference_decode_attention(q, k, v, torch.tensor(lens, dtype=torch.int32))
    for i, n in enumerate(lens):
        k[i, :, n:] = poison
        v[i, :, n:] = poison
    sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
    for backend in ("cudnn", "triton"):
        try:
            out = kvdecode.decode_attention(q, k, v, sl, backend=backend)
            print(f"{backend:6} tq={tq} lens={lens} poison={poison}: nan={torch.isnan(out).any().item()} "
                  f"err={relative_l2_error(out.nan_to_num(0), ref):.2e}")  # fmt: skip
        except Exception as exc:
            print(backend, "ERROR", repr(exc)[:300])


if __name__ == "__main__":
    for tq in (1, 2, 4):
        for poison in (float("nan"), 1e4, 0.0):
            run(tq, [tq, tq + 1, 100, 256], poison)
