"""Probe: does cuDNN's capacity graph stay inside the cache when ``seq_len_kv`` is out of range?

kvdecode's cuDNN route clamps the lengths into ``0..capacity`` with a torch kernel before every call
(``CudnnLauncher._execute``), so that no length points cuDNN past the cache. That kernel is a graph node
per layer (~1-2 µs steady state); at the batched short rows where kvdecode's cuDNN route trails torch
SDPA by ~2 µs it may be the whole gap. It can go only if cuDNN itself never reads outside the K/V
tensors whatever the lengths. This executes the plan's own cuDNN graph with unclamped lengths
(capacity + 1, capacity + 4096, 2**30, 0, -1, -7) and reports what came back; run it under
compute-sanitizer with torch's caching allocator off, so that every tensor is its own allocation and a
read past the cache is reported::

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --print-limit 5 \\
        python3 bench/cudnn_lengths_probe.py

Per length it prints whether the output is finite and how it compares with the clamped call's.
"""

from __future__ import annotations

import torch

import kvdecode
from kvdecode.cudnn_graphs.builder import UID_K, UID_O, UID_Q, UID_SEQ_KV, UID_SEQ_Q, UID_V
from kvdecode.cudnn_graphs.cuda_env import current_stream, handle_for

B, HQ, HKV, D, CAP = 4, 32, 8, 128, 1024


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, HKV, CAP, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    lens = torch.full((B,), CAP, dtype=torch.int32, device="cuda")
    the_plan = kvdecode.plan(kvdecode.DecodeProblem.from_tensors(q, k, v, lens), backend="cudnn")
    launcher = the_plan.launcher
    built = launcher._graphs[False]
    clamped = the_plan.run(q, k, v, lens)
    torch.cuda.synchronize()
    for value in (CAP + 1, CAP + 4096, 2**30, 0, -1, -7):
        seq_kv = torch.full((B, 1, 1, 1), value, dtype=torch.int32, device="cuda")
        out = torch.full_like(q, float("nan"))
        pack = {UID_Q: q, UID_K: k, UID_V: v, UID_O: out, UID_SEQ_Q: launcher._seq_len_q, UID_SEQ_KV: seq_kv}
        workspace = torch.empty(max(1, launcher.workspace_size), dtype=torch.uint8, device="cuda")
        handle = handle_for(launcher.device_index, current_stream(launcher.device_index))
        try:
            built.graph.execute(pack, workspace, handle=handle)
            torch.cuda.synchronize()
            finite = bool(torch.isfinite(out).all())
            same = bool(torch.equal(out, clamped)) if value > CAP else None
            print(f"seq_len_kv {value}: ran, finite {finite}, equal to the clamped call {same}")
        except Exception as exc:  # a CUDA error poisons the context: report and stop
            print(f"seq_len_kv {value}: {type(exc).__name__}: {str(exc)[:200]}")
            break


if __name__ == "__main__":
    main()
