"""The floor's bandwidth: the best read-only bandwidth measured in the same run, and the cells above it.

A decode call reads the KV cache once and writes almost nothing, so its ceiling is the device's
streaming-read bandwidth, not its copy bandwidth (a copy reads and writes: on the H200 4.22 TB/s of copy
against 4.68 TB/s read by cuDNN decode; the datasheet says 4.8 TB/s). :func:`read_bandwidths` measures
reads of an up-to-8-GiB buffer several ways (a Triton streaming-read kernel in a few configurations that keep
different amounts of bytes in flight, and torch reductions); :func:`ceiling` takes the best as the floor's
bandwidth and keeps the copy figure and the datasheet number beside it. A result that still reads faster
than that ceiling is flagged (:func:`over_ceiling`): the floor would not be a floor.

Pure host logic except :func:`read_bandwidths` and :func:`measure_ceiling`.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from kvdecode.timing import call_times_us, copy_bandwidth, pct_of_floor

__all__ = [
    "DATASHEET_GBPS",
    "READ_BYTES",
    "READ_CONFIGS",
    "ceiling",
    "datasheet_gbps",
    "measure_ceiling",
    "over_ceiling",
    "read_bandwidths",
    "read_size",
    "stream_read",
]

# Peak memory bandwidth from the vendor's datasheet, GB/s (GB = 1e9); the most specific name first.
DATASHEET_GBPS = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # H100 SXM5 80GB HBM3
    ("A100-SXM4-80GB", 2039.0),
    ("A100", 1555.0),
)
# (BLOCK int32 elements per load, UNROLL loads issued before the first add, num_warps): 16-64 KB a CTA.
READ_CONFIGS = ((1024, 4, 4), (2048, 4, 8), (4096, 4, 8), (2048, 8, 8), (4096, 4, 16), (4096, 8, 16))
# 8 GiB where a quarter of the free memory holds it (else the most whole GiB that fits, at least 1):
# 2 GiB passes read 0.1% slower than cuDNN decode in an 8.6 GB-a-layer cell (H200, 2026-12-04), a
# fixed cost per pass (ramp and last wave) that a decode layer of that size pays 4x less of
READ_BYTES = 1 << 33
MIN_READ_BYTES = 1 << 30


@triton.jit
def _stream_read_kernel(x_ptr, partial_ptr, n, BLOCK: tl.constexpr, UNROLL: tl.constexpr):
    """``partial[pid] = sum(x[pid * BLOCK * UNROLL : (pid + 1) * BLOCK * UNROLL])`` (int32, wrapping).

    Each element is read exactly once; the UNROLL loads of a program are independent, so they are all
    in flight before the first add. The sum keeps the loads from being optimised away.
    """
    pid = tl.program_id(0).to(tl.int64)
    base = pid * BLOCK * UNROLL
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for u in tl.static_range(UNROLL):
        offs = base + u * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0, cache_modifier=".cg")
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


def stream_read(x: torch.Tensor, partial: torch.Tensor, block: int, unroll: int, num_warps: int) -> None:
    """Launch the streaming-read kernel over the int32 tensor ``x``; ``partial`` has one int32 per program
    (``cdiv(x.numel(), block * unroll)``)."""
    grid = (triton.cdiv(x.numel(), block * unroll),)
    _stream_read_kernel[grid](x, partial, x.numel(), BLOCK=block, UNROLL=unroll, num_warps=num_warps)


def read_size(free_bytes: int, largest: int = READ_BYTES) -> int:
    """Bytes to read: ``largest`` if a quarter of ``free_bytes`` holds it, else the whole GiBs that fit
    (at least :data:`MIN_READ_BYTES`)."""
    return max(MIN_READ_BYTES, min(largest, free_bytes // 4) // MIN_READ_BYTES * MIN_READ_BYTES)


def read_bandwidths(device: torch.device, *, nbytes: int | None = None, reps: int = 20) -> dict[str, dict]:
    """Read-only bandwidth of ``nbytes`` (default :func:`read_size` of the free memory) several ways:
    name -> ``{"gbps": GB/s, "bytes": nbytes}`` or ``{"error": why}``.

    Each way is timed ``reps`` times with CUDA events after two warm-ups; bytes read / median time.
    """
    if nbytes is None:
        nbytes = read_size(torch.cuda.mem_get_info(device)[0])
    x = torch.ones(nbytes // 4, dtype=torch.int32, device=device)
    ways = _read_ways(x)
    out: dict[str, dict] = {}
    with torch.cuda.device(device):
        for name, fn in ways.items():
            try:
                us = statistics.median(call_times_us(fn, reps))
                out[name] = {"gbps": x.numel() * 4 / (us * 1e-6) / 1e9, "bytes": x.numel() * 4}
            except Exception as exc:  # a config out of resources: the others still measure
                out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    del ways, x
    torch.cuda.empty_cache()
    return out


def _read_ways(x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Zero-argument calls that each read all of the int32 tensor ``x`` once."""
    ways: dict[str, Callable[[], object]] = {}
    for block, unroll, warps in READ_CONFIGS:
        partial = torch.empty(triton.cdiv(x.numel(), block * unroll), dtype=torch.int32, device=x.device)
        ways[f"triton read BLOCK {block} x{unroll} w{warps}"] = functools.partial(
            stream_read, x, partial, block, unroll, warps
        )
    ways["torch.amax"] = functools.partial(torch.amax, x.view(torch.float32))
    ways["torch.sum"] = functools.partial(torch.sum, x, dtype=torch.int32)
    return ways


def datasheet_gbps(gpu_name: str | None) -> float | None:
    """The datasheet memory bandwidth of ``gpu_name`` (GB/s), or None for a GPU not in the table."""
    for key, gbps in DATASHEET_GBPS:
        if gpu_name and key.lower() in gpu_name.lower():
            return gbps
    return None


def ceiling(reads: dict[str, dict], copy_gbps: float | None, datasheet: float | None) -> dict:
    """The floor's bandwidth: the best of ``reads`` (:func:`read_bandwidths`), with the copy figure and
    the datasheet number beside it. Without any read measure the copy figure is used, and said so."""
    measured = {name: r["gbps"] for name, r in reads.items() if r.get("gbps")}
    rec = {"copy_gbps": copy_gbps, "datasheet_gbps": datasheet, "reads": reads}
    if measured:
        best = max(measured, key=measured.get)
        rec.update(floor_gbps=measured[best], floor_source=f"streaming read: {best}")
    elif copy_gbps:
        rec.update(floor_gbps=copy_gbps, floor_source="device-to-device copy (no read measure ran)")
    else:
        raise ValueError("no bandwidth was measured: neither a streaming read nor the copy")
    rec["floor_pct_datasheet"] = 100.0 * rec["floor_gbps"] / datasheet if datasheet else None
    return rec


def measure_ceiling(gpu_name: str | None, device: torch.device | None = None) -> dict:
    """:func:`ceiling` from this run's reads and copy on ``device`` (the current CUDA device)."""
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else device
    return ceiling(read_bandwidths(dev), copy_bandwidth(dev), datasheet_gbps(gpu_name))


def over_ceiling(doc: dict) -> list[str]:
    """Every measured result of ``doc`` faster than its floor (above 100 %): grid cells (steady and
    isolated), static-cache lengths and the captured step. Each line names the place and the percent."""
    flags = []
    for cell in doc.get("cells", []):
        for name, rec in cell.get("results", {}).items() if cell.get("status") == "ok" else ():
            for key in ("pct_floor", "isolated_pct_floor"):
                pct = rec.get(key) if rec.get("status") == "ok" else None
                if pct is not None and pct > 100.0:
                    where = "steady" if key == "pct_floor" else "isolated"
                    flags.append(f"{cell['name']} {name} ({where}): {pct:.1f}% of the floor")
    sc = doc.get("static_cache") or {}
    for name, rec in sc.get("results", {}).items():
        for i, step in enumerate(rec.get("per_length", [])):
            if step.get("status") == "ok" and i < len(sc.get("floor_us", [])):
                pct = pct_of_floor(step["steady_us"], sc["floor_us"][i])
                if pct > 100.0:
                    flags.append(f"static cache {name} L {step['seq_len']}: {pct:.1f}% of the floor")
    for name, rec in (doc.get("captured_step") or {}).get("results", {}).items():
        if rec.get("status") == "ok" and rec.get("floor_us"):
            pct = pct_of_floor(rec["steady_us"], rec["floor_us"])
            if pct > 100.0:
                flags.append(f"captured step {name}: {pct:.1f}% of the floor")
    return flags
