"""CPU tests of the decode benchmark's floor and baselines (bench/decode_bandwidth.py, bench/decode_sdpa.py).

The floor's bandwidth is the best read-only bandwidth of the run, the copy and datasheet figures beside it;
any result above 100 % of its floor is flagged; the SDPA backend that served a call is identified from
bitwise evidence and kernel names. The streaming-read kernel runs through the Triton interpreter.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kvdecode.timing import floor_us, pct_of_floor

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import decode_bandwidth as bw  # noqa: E402
import decode_grid  # noqa: E402
import decode_markdown  # noqa: E402
import decode_measure  # noqa: E402
import decode_report  # noqa: E402
import decode_sdpa  # noqa: E402
import verdicts  # noqa: E402

# ---- the ceiling ----


def test_ceiling_is_the_best_read_with_copy_and_datasheet_beside_it():
    reads = {"triton a": {"gbps": 4500.0}, "triton b": {"gbps": 4650.0}, "torch.sum": {"error": "x"}}
    ceil = bw.ceiling(reads, copy_gbps=4220.0, datasheet=4800.0)
    assert ceil["floor_gbps"] == 4650.0 and ceil["floor_source"] == "streaming read: triton b"
    assert ceil["copy_gbps"] == 4220.0 and ceil["datasheet_gbps"] == 4800.0
    assert ceil["floor_pct_datasheet"] == pytest.approx(96.875)
    assert ceil["reads"] is reads  # every way is kept, the failed one with its reason
    fallback = bw.ceiling({"triton a": {"error": "out of resources"}}, copy_gbps=4220.0, datasheet=None)
    assert fallback["floor_gbps"] == 4220.0 and "copy" in fallback["floor_source"]
    assert fallback["floor_pct_datasheet"] is None
    with pytest.raises(ValueError, match="no bandwidth"):
        bw.ceiling({}, copy_gbps=None, datasheet=None)


def test_read_size_is_8_gib_where_a_quarter_of_free_memory_holds_it():
    gib = 1 << 30
    assert bw.read_size(100 * gib) == 8 * gib  # an H200: 8 GiB, the size a long decode layer reads
    assert bw.read_size(20 * gib) == 5 * gib  # whole GiBs of a quarter of what is free
    assert bw.read_size(2 * gib) == gib  # never below 1 GiB (20x an H100 / H200 L2)


def test_datasheet_numbers_match_the_most_specific_name():
    assert bw.datasheet_gbps("NVIDIA H200") == 4800.0
    assert bw.datasheet_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert bw.datasheet_gbps("NVIDIA H100 PCIe") == 2000.0
    assert bw.datasheet_gbps("NVIDIA H100 NVL") == 3900.0
    assert bw.datasheet_gbps("Some GPU") is None and bw.datasheet_gbps(None) is None


@pytest.mark.parametrize(("block", "unroll"), [(64, 1), (32, 4)])
def test_stream_read_reads_every_element_exactly_once(block, unroll):
    """Through the interpreter: the per-program sums are the sums of disjoint chunks covering the whole
    buffer (a kernel that skipped or re-read a load would get them wrong), ragged tail masked."""
    n = 1000  # not a multiple of block * unroll
    x = torch.randint(-50, 50, (n,), dtype=torch.int32, generator=torch.Generator().manual_seed(block))
    chunk = block * unroll
    partial = torch.full((-(-n // chunk),), 12345, dtype=torch.int32)
    bw.stream_read(x, partial, block, unroll, 4)
    want = torch.stack([x[i : i + chunk].sum() for i in range(0, n, chunk)]).to(torch.int32)
    assert torch.equal(partial, want)


# ---- percent of the floor and the > 100 % flag ----


def _cell(steady_us: float, isolated_us: float, floor_gbps: float) -> dict:
    spec = decode_grid.CellSpec("gqa", 8, 32, 8, 128, seq_len=16384, capacity=16384)
    floor = floor_us(spec.kv_bytes, floor_gbps)
    rec = decode_report.backend_ok(steady_us, isolated_us, spec.kv_bytes, floor, check_ok=True)
    return {**decode_measure.cell_record(spec), "status": "ok", "floor_us": floor, "check_ok": True,
            "results": {"kvdecode-triton": rec}}  # fmt: skip


def test_percent_of_the_floor_is_achieved_over_ceiling_bandwidth():
    # 536.9 MB at 4800 GB/s is a 111.8 us floor; read in 120 us that is 4474 GB/s, 93.2 % of 4800.
    cell = _cell(120.0, 130.0, 4800.0)
    rec = cell["results"]["kvdecode-triton"]
    assert cell["floor_us"] == pytest.approx(111.85, abs=0.01)
    assert rec["pct_floor"] == pytest.approx(100 * rec["gbps"] / 4800.0)
    assert rec["pct_floor"] == pytest.approx(93.2, abs=0.05)
    assert bw.over_ceiling({"cells": [cell]}) == []


def test_results_above_the_floor_are_flagged_everywhere():
    # a floor from the 4220 GB/s copy: a 4680 GB/s read is 110.9 % of it (the H200's overstatement)
    cell = _cell(536.87 / 4.68, 130.0, 4220.0)
    skipped = {**_cell(50.0, 50.0, 4220.0), "status": "skipped"}  # not measured: never flagged
    static = {
        "lengths": [1024, 32768],
        "floor_us": [10.0, 300.0],
        "results": {
            "kvdecode-triton": {
                "status": "ok",
                "per_length": [
                    {"seq_len": 1024, "status": "ok", "steady_us": 12.0},
                    {"seq_len": 32768, "status": "ok", "steady_us": 290.0},
                ],
            }
        },
    }
    step = {"results": {"kvdecode-auto": {"status": "ok", "steady_us": 5.0, "floor_us": 5.5}}}
    doc = {"cells": [cell, skipped], "static_cache": static, "captured_step": step}
    flags = bw.over_ceiling(doc)
    assert len(flags) == 3, flags
    assert flags[0].startswith(cell["name"] + " kvdecode-triton (steady): 110.9%")
    assert flags[1] == "static cache kvdecode-triton L 32768: 103.4% of the floor"
    assert flags[2] == f"captured step kvdecode-auto: {pct_of_floor(5.0, 5.5):.1f}% of the floor"
    fast_isolated = _cell(200.0, 100.0, 4800.0)  # isolated faster than the floor: flagged as such
    assert bw.over_ceiling({"cells": [fast_isolated]}) == [
        f"{fast_isolated['name']} kvdecode-triton (isolated): "
        f"{fast_isolated['results']['kvdecode-triton']['isolated_pct_floor']:.1f}% of the floor"
    ]


def test_report_shows_the_floor_bandwidth_and_the_flags():
    doc = decode_report.new_result({"gpu_name": "NVIDIA H200", "date": "2026-12-02"}, {"backends": []})
    doc["bandwidth"] = bw.ceiling({"triton a": {"gbps": 4650.0}}, copy_gbps=4220.0, datasheet=4800.0)
    doc["floor_bandwidth_gbps"] = 4650.0
    doc["copy_bandwidth_gbps"] = 4220.0
    assert decode_report.validate_result(doc) == []
    doc["cells"].append(_cell(536.87 / 4.7, 130.0, 4650.0))
    doc["over_ceiling"] = bw.over_ceiling(doc)
    md = decode_markdown.render_markdown(doc)
    assert "Floor bandwidth: 4650 GB/s" in md and "streaming read: triton a" in md
    assert "97% of the datasheet's 4800 GB/s" in md and "copy 4220 GB/s" in md
    assert "**results above 100% of the floor** (the floor would not be a ceiling): 1: " in md
    del doc["floor_bandwidth_gbps"]
    assert any("floor_bandwidth_gbps" in p for p in decode_report.validate_result(doc))


# ---- which SDPA backend served ----


def test_backend_from_kernel_names():
    assert decode_sdpa.backend_from_kernels(["cudnn_generated_fort_native_sdpa_sm90_flash_fprop"]) == (
        "CUDNN_ATTENTION"
    )
    assert (
        decode_sdpa.backend_from_kernels(["void pytorch_flash::flash_fwd_kernel<...>"]) == "FLASH_ATTENTION"
    )
    assert decode_sdpa.backend_from_kernels(["fmha_cutlassF_bf16_aligned_64x64_rf_sm80"]) == (
        "EFFICIENT_ATTENTION"
    )
    assert decode_sdpa.backend_from_kernels(["sm90_xmma_gemm_bf16", "cunn_SoftMaxForward"]) == "MATH"
    assert decode_sdpa.backend_from_kernels([]) is None


def test_served_by_combines_bitwise_and_kernel_evidence():
    only_cudnn = {
        "CUDNN_ATTENTION": True,
        "FLASH_ATTENTION": None,
        "EFFICIENT_ATTENTION": False,
        "MATH": False,
    }
    assert decode_sdpa.served_by(only_cudnn, "CUDNN_ATTENTION") == "CUDNN_ATTENTION"
    assert decode_sdpa.served_by(only_cudnn, None) == "CUDNN_ATTENTION"
    assert decode_sdpa.served_by(only_cudnn, "MATH") == "ambiguous: bitwise CUDNN_ATTENTION, kernels MATH"
    two = {**only_cudnn, "EFFICIENT_ATTENTION": True}
    assert decode_sdpa.served_by(two, "EFFICIENT_ATTENTION") == "EFFICIENT_ATTENTION"
    assert decode_sdpa.served_by(two, None) == "ambiguous: CUDNN_ATTENTION, EFFICIENT_ATTENTION"
    none = dict.fromkeys(only_cudnn, False)
    assert decode_sdpa.served_by(none, "FLASH_ATTENTION") == "FLASH_ATTENTION"
    assert decode_sdpa.served_by(none, None) == "unknown"


# ---- issue 18's verdicts on result files ----


def _verdict_cell(batch, length, auto_us, sdpa_us, pct=99.5, nbytes=10**6):
    ok = {"status": "ok"}
    return {"case": "gqa", "batch": batch, "seq_len": length, "kv_bytes": nbytes,
            "results": {"kvdecode-auto": {**ok, "steady_us": auto_us, "pct_floor": pct, "chosen": "triton"},
                        "sdpa": {**ok, "steady_us": sdpa_us}}}  # fmt: skip


def test_verdicts_name_every_miss_and_nothing_else():
    cells = [
        _verdict_cell(16, 1024, 24.1, 19.9),  # a miss
        _verdict_cell(64, 4096, 243.2, 243.1),  # 1.0004x: "<= 1.00x" holds
        _verdict_cell(1, 1024, 9.0, 7.0),  # B 1: not a batch cell
        _verdict_cell(
            4, 16384, 80.0, 70.0, pct=97.0, nbytes=2 * 10**9
        ),  # not a batch cell; large, below the floor
    ]
    lines = verdicts.decode_verdicts({"cells": cells})
    assert [line.split(":")[0] for line in lines[:-1]] == ["miss  gqa B 16 L 1024", "floor gqa B 4 L 16384"]
    assert lines[-1] == "decode: 2 cells with B >= 4, L <= 4k; 1 slower than torch SDPA"
    rows = [dict(backend=b, batch=1, capacity=2048, filled=1024, window=0, mode=m, ms_per_step=ms)
            for b, m, ms in (("sdpa", "captured", 2.39), ("flex_attention", "captured", 1.98),
                             ("kvdecode", "captured", 2.01), ("sdpa", "eager", 12.0),
                             ("kvdecode", "eager", 11.0))]  # fmt: skip
    rows.append(dict(backend="flex_attention", batch=1, capacity=2048, filled=1024, mode="eager", error="x"))
    lines = verdicts.generate_verdicts({"results": rows})
    assert lines[0].startswith("miss  B 1 cap 2048 L 1024 captured: kvdecode 2.01 ms vs flex_attention 1.98")
    assert lines[1:] == ["generate: 2 (row, mode) pairs; 1 where kvdecode is not the fastest"]
