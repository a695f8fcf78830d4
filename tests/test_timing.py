"""CPU tests of the timing helpers and the decode benchmark's host logic.

Byte counting, the steady-state layer rule, grid building and skipping, the results schema and the
markdown rendering; the GPU measures themselves run in ``bench/bench_decode.py`` on the device.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvdecode.problem import DecodeProblem
from kvdecode.timing import (
    CPU_BUDGET_BYTES,
    LayerStack,
    floor_us,
    free_device_bytes,
    gbps,
    host_overhead_us,
    kv_bytes,
    layers_that_fit,
    pct_of_floor,
    steady_state_layers,
)

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import bench_decode  # noqa: E402
import decode_grid  # noqa: E402
import decode_markdown  # noqa: E402
import decode_report  # noqa: E402

GB = 10**9


# ---- byte counting ----


@given(
    batch=st.integers(1, 4),
    num_kv_heads=st.sampled_from([1, 2, 8]),
    seq_len=st.integers(1, 300),
    head_dim=st.sampled_from([16, 64, 80, 128]),
    dtype=st.sampled_from(
        [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2]
    ),
)
def test_kv_bytes_equals_the_bytes_of_the_filled_slices(batch, num_kv_heads, seq_len, head_dim, dtype):
    k = torch.empty(batch, num_kv_heads, seq_len, head_dim, dtype=dtype)
    actual = 2 * k.numel() * k.element_size()  # the K slice and the V slice
    assert kv_bytes(batch, num_kv_heads, seq_len, head_dim, dtype) == actual


def test_kv_bytes_agrees_with_the_problem_description():
    q = torch.empty(3, 32, 1, 128, dtype=torch.bfloat16)
    k = torch.empty(3, 8, 4096, 128, dtype=torch.bfloat16)
    problem = DecodeProblem.from_tensors(q, k, k, torch.full((3,), 4096, dtype=torch.int32))
    assert kv_bytes(3, 8, 1000, 128, torch.bfloat16) == problem.kv_bytes(1000)


def test_kv_bytes_known_value_from_the_h100_notes():
    # bench/NOTES.md (H100): B 1, L 1k, H_kv 8, D 128, bf16 has a 1.4 us floor at 3.0 TB/s.
    nbytes = kv_bytes(1, 8, 1024, 128, torch.bfloat16)
    assert nbytes == 4_194_304
    assert floor_us(nbytes, 3000.0) == pytest.approx(1.398, abs=1e-3)


@pytest.mark.parametrize(
    "args",
    [
        (0, 8, 1, 128, torch.bfloat16),
        (1, 0, 1, 128, torch.bfloat16),
        (1, 8, -1, 128, torch.bfloat16),
        (1, 8, 1, 0, torch.bfloat16),
        (1, 8, 1, 128, torch.int8),
    ],
)
def test_kv_bytes_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        kv_bytes(*args)


@given(nbytes=st.integers(1, 10**12), bw=st.floats(1.0, 1e4))
def test_floor_and_bandwidth_are_inverse(nbytes, bw):
    us = floor_us(nbytes, bw)
    assert gbps(nbytes, us) == pytest.approx(bw, rel=1e-9)
    assert pct_of_floor(us, us) == pytest.approx(100.0)
    assert pct_of_floor(2 * us, us) == pytest.approx(50.0)


def test_floor_helpers_reject_non_positive_times():
    for fn, args in ((floor_us, (10, 0.0)), (gbps, (10, 0.0)), (pct_of_floor, (0.0, 1.0))):
        with pytest.raises(ValueError):
            fn(*args)


# ---- the steady-state layer rule ----


def test_layer_rule_examples():
    assert steady_state_layers(4 * 2**20) == 239  # ceil(1 GB / 4 MiB): a replay must outgrow L2
    assert steady_state_layers(300 * 10**6) == 8  # ceil(1 GB / 300 MB) = 4, but never fewer than 8
    assert steady_state_layers(GB) == 8
    assert steady_state_layers(34 * GB, budget_bytes=75 * GB) == 2  # memory caps it
    assert steady_state_layers(4 * 2**20, budget_bytes=10 * 2**20) == 2  # memory caps it
    assert steady_state_layers(34 * GB, budget_bytes=30 * GB) == 0  # does not fit at all


@given(
    read=st.integers(1, 40 * GB),
    extra=st.integers(0, 40 * GB),
    budget=st.one_of(st.none(), st.integers(0, 100 * GB)),
)
def test_layer_rule_properties(read, extra, budget):
    alloc = read + extra
    n = steady_state_layers(read, layer_alloc_bytes=alloc, budget_bytes=budget)
    wanted = max(8, -(-GB // read))
    if budget is not None:
        assert n * alloc <= budget
    # ">= 1 GB per replay and at least 8 layers", unless memory stopped it earlier.
    capped = budget is not None and n == budget // alloc
    assert n == wanted or (capped and n < wanted)


# ---- grid, lengths, skipping ----


def test_parse_and_format_lengths():
    assert decode_grid.parse_length("1k") == 1024
    assert decode_grid.parse_length(" 128K ") == 131072
    assert decode_grid.parse_length("1000") == 1000
    for n in (1024, 4096, 131072, 1000):
        assert decode_grid.parse_length(decode_grid.format_length(n)) == n
    for bad in ("", "k", "1.5k", "-1", "0"):
        with pytest.raises(ValueError):
            decode_grid.parse_length(bad)


def test_parse_grid_and_backends():
    grid = decode_grid.parse_grid("B=1,8; L=1k,32k")
    assert grid == {"B": (1, 8), "L": (1024, 32768)}
    assert decode_grid.parse_grid("L=2k")["B"] == decode_grid.FULL_GRID["B"]
    for bad in ("X=1", "B=", "B1,2", "B=0"):
        with pytest.raises(ValueError):
            decode_grid.parse_grid(bad)
    assert decode_grid.parse_backends("sdpa,kvdecode-triton,sdpa") == ("sdpa", "kvdecode-triton")
    with pytest.raises(ValueError):
        decode_grid.parse_backends("kvdecode-flash")


def test_full_grid_cells_and_skips():
    cells = decode_grid.build_cells(decode_grid.FULL_GRID, decode_grid.VARIANTS, decode_grid.FULL_GRID["L"])
    assert len(cells) == 4 * 5 + 4 * 5
    main = [c for c in cells if c.case == "gqa"]
    assert {(c.num_q_heads, c.num_kv_heads, c.head_dim) for c in main} == {(32, 8, 128)}
    assert all(c.capacity == c.seq_len for c in cells)
    assert all(c.batch == 1 for c in cells if c.case != "gqa")
    shapes = {c.case: (c.num_q_heads, c.num_kv_heads, c.head_dim) for c in cells}
    assert shapes == {
        "gqa": (32, 8, 128),
        "mha": (32, 32, 128),
        "mqa": (32, 1, 128),
        "d64": (32, 8, 64),
        "d256": (32, 8, 256),
    }
    # The largest grid cell (B 64, L 128k: 34.4 GB) stays under the 40 GB limit and gets 1 layer.
    big = next(c for c in main if c.batch == 64 and c.seq_len == 131072)
    assert big.kv_bytes == 2 * 64 * 8 * 131072 * 128 * 2
    assert big.skip_reason() is None
    assert decode_grid.plan_layers(big, 75 * GB) == 2  # 8 wanted, 2 fit
    huge = decode_grid.CellSpec("gqa", 128, 32, 8, 128, seq_len=131072, capacity=131072)
    assert "40 GB" in huge.skip_reason()
    with pytest.raises(ValueError):
        decode_grid.build_cells(decode_grid.FULL_GRID, ("gqa",), (1024,))


def test_cli_resolves_quick_defaults_and_dry_run_needs_no_gpu(capsys):
    args = bench_decode.parse_args(["--quick", "--sections", "grid,static"])
    assert args.grid == decode_grid.QUICK_GRID
    assert args.static_lengths == (1024, 32768)
    assert all(c.case == "gqa" for c in args.cells)  # variants section off
    assert bench_decode.main(["--dry-run", "--grid", "B=64;L=128k", "--variants", ""]) == 0
    out = capsys.readouterr().out
    assert "gqa_b64_hq32_hkv8_d128_L128k_cap128k_bf16" in out
    assert "34359.7" in out  # MB per layer
    with pytest.raises(SystemExit):
        bench_decode.parse_args(["--sections", "grid,nonsense"])


# ---- host overhead (host logic only) ----


def test_host_overhead_counts_every_call_and_measures_per_call():
    calls = []
    us = host_overhead_us(lambda: calls.append(1), n=50, warmup=5)
    assert len(calls) == 55 and us > 0
    slow = host_overhead_us(lambda: time.sleep(0.002), n=5, warmup=0)
    assert slow >= 2000


# ---- the steady-state harness's host side ----


def test_layer_stack_holds_distinct_layers_and_steps_launch_the_right_one():
    cpu = torch.device("cpu")
    stack = LayerStack.random(3, (2, 4, 1, 8), (2, 2, 16, 8), torch.bfloat16, cpu)
    assert len(stack) == 3 and len(stack.outs) == 3
    q, k, v = stack[1]
    assert q.shape == (2, 4, 1, 8) and k.shape == v.shape == (2, 2, 16, 8) and k.dtype == torch.bfloat16
    ptrs = {t.data_ptr() for layer in stack for t in layer} | {o.data_ptr() for o in stack.outs}
    assert len(ptrs) == 3 * 4  # every q, k, v and out its own allocation: no replay reads a shared cache
    assert not torch.equal(stack[0][1], stack[2][1])
    seen = []
    call = stack.step(2, lambda q, k, v, out: seen.append((q, k, v, out)))
    assert seen == []  # step builds the call, it does not run it
    call()
    assert seen[0][:3] == stack[2] and seen[0][3] is stack.outs[2]
    stack.close()
    assert len(stack) == 0 and stack.outs == []


def test_layers_that_fit_caps_the_layer_rule_by_free_memory():
    cpu = torch.device("cpu")
    assert free_device_bytes(cpu, reserve_bytes=10**9) == CPU_BUDGET_BYTES - 10**9
    assert free_device_bytes(cpu, reserve_bytes=CPU_BUDGET_BYTES + 1) == 0
    assert layers_that_fit(4 * 10**6, cpu) == steady_state_layers(4 * 10**6)  # 250 layers fit in 4 GB
    big = 3 * 10**9  # 8 layers wanted; (8 GB - 4 GB reserve) // 3 GB = 1 fits
    assert layers_that_fit(big, cpu) == 1
    assert layers_that_fit(10**8, cpu, layer_alloc_bytes=10**9, reserve_bytes=0) == 8


# ---- results schema and rendering ----


def _doc() -> dict:
    doc = decode_report.new_result(
        {"gpu_name": "NVIDIA H100 80GB HBM3", "date": "2026-11-25", "sm_count": 132},
        {"backends": ["kvdecode-triton", "kvdecode-cudnn", "sdpa"]},
    )
    doc["copy_bandwidth_gbps"] = 3000.0
    spec = decode_grid.CellSpec("gqa", 8, 32, 8, 128, seq_len=16384, capacity=16384)
    floor = floor_us(spec.kv_bytes, 3000.0)
    cell = {
        "name": spec.name,
        "case": "gqa",
        "batch": 8,
        "num_q_heads": 32,
        "num_kv_heads": 8,
        "head_dim": 128,
        "seq_len": 16384,
        "capacity": 16384,
        "dtype": "bf16",
        "kv_bytes": spec.kv_bytes,
        "status": "ok",
        "n_layers": 1,
        "floor_us": floor,
        "check_ok": True,
        "results": {},
    }
    cell["results"]["kvdecode-triton"] = decode_report.backend_ok(
        200.0, 230.0, spec.kv_bytes, floor, check_rel_l2=1e-3, check_ok=True, plan_ms=0.5
    )
    cell["results"]["kvdecode-cudnn"] = decode_report.backend_na("cudnn backend not registered")
    cell["results"]["sdpa"] = decode_report.backend_ok(180.0, 190.0, spec.kv_bytes, floor, check_ok=True)
    decode_report.add_vs_sdpa(cell)
    doc["cells"].append(cell)
    doc["cells"].append(
        {**cell, "name": "oom_cell", "status": "skipped", "reason": "out of memory", "results": {}}
    )
    return doc


def test_backend_record_numbers():
    nbytes = 3 * 10**8
    rec = decode_report.backend_ok(200.0, 250.0, nbytes, 100.0)
    assert rec["gbps"] == pytest.approx(1500.0)
    assert rec["pct_floor"] == pytest.approx(50.0)
    assert rec["isolated_pct_floor"] == pytest.approx(40.0)
    err = decode_report.backend_error(RuntimeError("CUDA out of memory"), skipped=True)
    assert err == {"status": "skipped", "reason": "RuntimeError: CUDA out of memory"}


def test_result_schema_accepts_a_good_document_and_names_what_is_wrong():
    doc = _doc()
    assert decode_report.validate_result(doc) == []
    assert doc["cells"][0]["results"]["kvdecode-triton"]["vs_sdpa"] == pytest.approx(200 / 180)
    bad = json.loads(json.dumps(doc))
    del bad["copy_bandwidth_gbps"]
    bad["cells"][0]["results"]["sdpa"]["status"] = "fine"
    del bad["cells"][0]["results"]["kvdecode-triton"]["gbps"]
    bad["cells"][0]["results"]["kvdecode-cudnn"].pop("reason")
    del bad["cells"][1]["kv_bytes"]
    problems = decode_report.validate_result(bad)
    assert any("copy_bandwidth_gbps" in p for p in problems)
    assert any("'sdpa'" in p and "status" in p for p in problems)
    assert any("'kvdecode-triton'" in p and "gbps" in p for p in problems)
    assert any("kvdecode-cudnn" in p and "no reason" in p for p in problems)
    assert any("cells[1]" in p and "kv_bytes" in p for p in problems)
    nan = _doc()
    nan["cells"][0]["results"]["sdpa"]["isolated_us"] = math.nan
    assert any("strict JSON" in p for p in decode_report.validate_result(nan))


def test_written_files_are_strict_json_and_a_markdown_table(tmp_path):
    doc = _doc()
    doc["cells"][0]["results"]["sdpa"]["isolated_us"] = math.nan  # must not leak as NaN
    stem = decode_report.result_stem(doc["meta"], quick=False)
    assert stem == "nvidia-h100-80gb-hbm3-2026-11-25"
    assert decode_report.result_stem(doc["meta"], quick=True).endswith("-quick")
    json_path, md_path = decode_report.write_result(doc, tmp_path, stem)
    loaded = json.loads(json_path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
    assert loaded["cells"][0]["results"]["sdpa"]["isolated_us"] is None
    md = md_path.read_text()
    # 2 * 8 * 8 * 16384 * 128 * 2 B = 536.9 MB; at 3000 GB/s the floor is 179.0 us; 179/200 = 89 %.
    assert "| gqa | 8 | 16384 | 536.9 | 1 | 179.0 | 200.0 (89%) | n/a | 180.0 (99%) | ok |" in md
    assert "more than 3% above the floor: 1 of 1" in md
    assert "oom_cell: skipped: out of memory" in md
    assert "NVIDIA H100 80GB HBM3" in md and "3000 GB/s" in md
    assert "kvdecode results slower than SDPA on the exact slice by more than 3%: 1" in md


def test_markdown_flags_failed_checks_and_renders_scenarios():
    doc = _doc()
    doc["cells"][0]["check_ok"] = False
    doc["static_cache"] = {
        "status": "ok",
        "batch": 8,
        "num_q_heads": 32,
        "num_kv_heads": 8,
        "head_dim": 128,
        "capacity": 32768,
        "n_layers": 8,
        "lengths": [1024, 32768],
        "floor_us": [11.2, 358.0],
        "results": {
            "kvdecode-triton": {
                "status": "ok",
                "per_length": [
                    {"seq_len": 1024, "status": "ok", "steady_us": 16.0, "check_ok": True},
                    {"seq_len": 32768, "status": "ok", "steady_us": 360.0, "check_ok": True},
                ],
            },
            "sdpa-masked": {
                "status": "ok",
                "per_length": [
                    {"seq_len": 1024, "status": "ok", "steady_us": 376.0, "check_ok": True},
                    {"seq_len": 32768, "status": "ok", "steady_us": 376.0, "check_ok": True},
                ],
            },
        },
    }
    doc["host_overhead"] = {
        "problem": "tiny",
        "n": 1000,
        "calls": {"DecodePlan.run (triton)": {"status": "ok", "us_per_call": 7.5}},
    }
    md = decode_markdown.render_markdown(doc)
    assert "**FAIL**" in md
    assert "| 1024 | 11.2 | 16.0 | 376.0 | 23.5x |" in md
    assert "| 32768 | 358.0 | 360.0 | 376.0 | 1.0x |" in md
    assert "| DecodePlan.run (triton) | 7.5 |" in md
    table = decode_markdown.short_table(doc)
    assert "FAIL" in table.splitlines()[1]
    assert "skipped: out of memory" in table
