"""``kvdecode tune`` / ``plan`` / ``info``: argument errors, dry run, the search, and a real tune (GPU)."""

from __future__ import annotations

import io
import math
import re
import time

import pytest
import torch

from kvdecode import DecodeProblem, cli, thresholds
from kvdecode.presets import PRESETS
from kvdecode.triton_kernels.config import SplitKVConfig, packing_options
from kvdecode.tuning import crossover
from kvdecode.tuning.measure import config_dict
from kvdecode.tuning.runner import Progress
from kvdecode.tuning.search import search, search_size, split_candidates, split_cap, wave_splits
from kvdecode.tuning.spec import length_grid, parse_int_list


def _main(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def _clean(monkeypatch, tmp_path):
    monkeypatch.delenv("KVDECODE_TUNING_TABLE", raising=False)
    monkeypatch.setenv("KVDECODE_CACHE_DIR", str(tmp_path / "cache"))
    thresholds.use_table(None)
    yield
    thresholds.use_table(None)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--preset", "llama9-1t"], "--preset must be one of"),
        (["--heads", "32:8", "--head-dim", "128", "--batch", "1,x"], "each item of --batch"),
        (["--heads", "32:8", "--head-dim", "128", "--batch", "1,,4"], "--batch must be a comma"),
        (["--heads", "32:7", "--head-dim", "128"], r"H_q \(32\) must be a multiple of H_kv \(7\)"),
        (["--heads", "32", "--head-dim", "128"], "--heads must be H_q:H_kv"),
        (["--heads", "32:8"], "must be given together"),
        (["--heads", "32:8", "--head-dim", "300"], "--head-dim must be in 1..256"),
        (["--preset", "llama3-8b", "--capacity", "12q"], "--capacity must be a positive integer"),
        (["--preset", "llama3-8b", "--dtype", "fp8"], "--dtype must be bf16 or fp16"),
        ([], "needs --preset"),
        (["--preset", "llama3-8b", "--fresh", "--remeasure"], "--fresh and --remeasure exclude each other"),
    ],
)
def test_tune_argument_errors_exit_nonzero_with_one_line(args, match, capsys):
    code, out, err = _main(["tune", *args, "--dry-run"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("kvdecode: error:") and err.count("\n") == 1
    assert re.search(match, err), err


def test_plan_argument_errors(capsys):
    code, _, err = _main(["plan", "--heads", "32:7", "--head-dim", "64"], capsys)
    assert code == 2 and "multiple of H_kv" in err and err.count("\n") == 1
    code, _, err = _main(["plan", "--preset", "nope"], capsys)
    assert code == 2 and "--preset must be one of" in err


def test_dry_run_lists_points_and_an_estimate(tmp_path, capsys):
    out_path = tmp_path / "t.json"
    argv = ["tune", "--preset", "llama3-8b,mistral-7b,gemma2-9b", "--batch", "1,16", "--capacity", "16k",
            "--coarse", "--out", str(out_path), "--dry-run"]  # fmt: skip
    code, out, _ = _main(argv, capsys)
    assert code == 0, out
    # llama3-8b and mistral-7b share a family: 2 families x 2 batches x (1k, 4k, 16k... coarse) lengths
    lengths = length_grid(16384, coarse=True)
    assert f"2 families x 2 batch sizes x {len(lengths)} lengths = {4 * len(lengths)} points" in out
    rows = [line for line in out.splitlines() if line.startswith("hq")]
    assert len(rows) == 4 * len(lengths)
    assert {r.split()[0] for r in rows} == {"hq32_hkv8_d128_tq1_bf16", "hq16_hkv8_d256_tq1_bf16"}
    assert "estimated duration: ~" in out and str(out_path) in out
    # points already in --out are not measured again
    raw = crossover.new_table({"gpu_name": "G", "sm_count": 132, "versions": {}, "date": "2026-01-01"})
    fam = {"key": "hq32_hkv8_d128_tq1_bf16", "num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128,
           "q_len": 1, "dtype": "bf16"}  # fmt: skip
    cfg = {"num_splits": 4, "block_n": 64, "num_warps": 4, "num_stages": 2}
    crossover.add_point(raw, fam, 16, 16384, {"config": cfg, "triton_us": 1.0, "default_us": 1.0})
    thresholds.save_table(crossover.finalize(raw, partial=True), out_path)
    code, out2, _ = _main(argv, capsys)
    assert code == 0 and "(1 already in --out)" in out2
    assert len([line for line in out2.splitlines() if line.startswith("hq")]) == len(rows) - 1


def test_presets_have_the_published_shapes():
    assert PRESETS["llama3-8b"].heads == "32:8" and PRESETS["qwen2-7b"].heads == "28:4"
    assert (PRESETS["gemma2-9b"].heads, PRESETS["gemma2-9b"].head_dim) == ("16:8", 256)
    assert PRESETS["llama2-7b"].heads == "32:32"
    for p in PRESETS.values():
        assert p.num_q_heads % p.num_kv_heads == 0


def test_length_grid_and_lists():
    assert length_grid(131072, coarse=False) == tuple(1 << k for k in range(8, 18))
    assert length_grid(131072, coarse=True) == (512, 2048, 8192, 32768, 131072)
    assert length_grid(100000, coarse=False)[-2:] == (65536, 100000)
    assert length_grid(100, coarse=False) == (100,)
    assert parse_int_list("16,1,4k,4", "--batch") == (1, 4, 16, 4096)


def test_split_candidates_stay_in_range():
    for h in (1, 3, 9, 33, 64, 128):
        for tiles in (1, 2, 16, 4096):
            for coarse in (False, True):
                for cap in (64, 128):
                    c = split_candidates(h, tiles, coarse=coarse, cap=cap)
                    assert c == sorted(set(c)) and 1 in c and all(1 <= s <= min(cap, tiles) for s in c)
                    assert min(h, tiles, cap) in c
    assert split_cap(128) == 128 and split_cap(256) == 64


def test_search_finds_the_best_along_each_axis_and_measures_each_config_once():
    best = SplitKVConfig(num_splits=16, block_n=128, num_warps=8, num_stages=3)
    calls = []

    def measure(cfg):
        calls.append(cfg)
        if cfg.block_n == 32:
            return math.inf  # "does not compile": skipped
        return (
            10 + abs(math.log2(cfg.num_splits / best.num_splits)) + abs(cfg.block_n - best.block_n) / 64
            + (cfg.num_warps != best.num_warps) + (cfg.num_stages != best.num_stages)
        )  # fmt: skip

    default = SplitKVConfig(num_splits=33, block_n=64, num_warps=4, num_stages=2)
    found, us, n = search(default, 65536, 128, measure, coarse=False)
    assert found == best and us == 10 and n == len(calls) == len(set(calls))


def test_search_tries_one_warp_and_then_the_splits_again():
    """One warp is worth it only with more CTAs: a config space where 1 warp at 4x the splits is best
    (and 1 warp at the old split count is only a little better) is found, because the split axis is
    searched again after the warps changed (it was only after block_n changed)."""

    def measure(cfg):
        if cfg.num_warps == 1:
            return 9.0 - (cfg.num_splits >= 32) * 2  # 1 warp: 9 µs, 7 with 32+ splits
        return 10.0  # every multi-warp config alike

    default = SplitKVConfig(num_splits=8, block_n=64, num_warps=4, num_stages=2)
    found, us, _ = search(default, 65536, 128, measure, coarse=False)
    assert found.num_warps == 1 and found.num_splits >= 32 and us == 7.0


@pytest.mark.parametrize("coarse", [False, True])
def test_search_reaches_one_split_with_a_deep_pipeline(coarse):
    """The H200's B 16 L 1k (``call25-kernel-variants.log``, µs): 3 splits x 2 stages 24.1 (where the axes
    meet), 1 split x 2 stages 28.6, 3 splits x 4 stages 29.5, but 1 split x 4 stages 20.4. Coordinate
    descent along one axis at a time stays at the first; the few-split, deep-pipeline corner finds the
    last, in coarse runs too."""

    def measure(cfg):
        if cfg.num_splits == 1 and cfg.num_stages == 4:
            return 20.4
        if cfg.num_splits == 3 and cfg.num_stages == 2:
            return 24.1
        return 28.0 + cfg.num_stages + cfg.num_splits / 64  # every other config slower

    default = SplitKVConfig(num_splits=3, block_n=64, num_warps=4, num_stages=2)
    found, us, n = search(default, 1024, 128, measure, coarse=coarse)
    assert (found.num_splits, found.num_stages, found.block_n, us) == (1, 4, 64, 20.4)
    assert n <= search_size(3, 16, 128, coarse=coarse) + 2  # (the estimate the dry run prints)


def test_the_deep_corner_tries_one_wave_of_ctas():
    """At B 4 (32 CTAs a split on 132 SMs) the deep-pipeline shape is four splits, one CTA an SM: the
    corner tries the one-wave split count beside 1 and 2, and stages up to 5; without ``wave`` it does
    not reach it."""

    def measure(cfg):
        if (cfg.num_splits, cfg.num_stages) == (4, 5):
            return 18.0
        return 22.0 + cfg.num_stages + cfg.num_splits / 64

    default = SplitKVConfig(num_splits=9, block_n=64, num_warps=4, num_stages=2)
    assert wave_splits(132, 4 * 8) == 4 and wave_splits(132, 64 * 8) == 1 and wave_splits(132, 0) == 132
    for coarse in (False, True):
        found, us, n = search(default, 4096, 128, measure, coarse=coarse, wave=4)
        assert (found.num_splits, found.num_stages, us) == (4, 5, 18.0)
        assert n <= search_size(9, 64, 128, coarse=coarse) + 2
    assert search(default, 4096, 128, measure, coarse=True)[0].num_splits != 4


def test_search_tries_packed_heads_with_the_splits_scaled_and_only_when_asked():
    """Packing 4 KV heads per CTA quarters the CTAs: the search starts it at 4x the split count (and halves
    block_n once, for the shared memory), and never tries it without ``heads``."""

    def measure(cfg):
        if cfg.heads_per_cta == 4:
            return 6.0 - (cfg.num_splits >= 32) - (cfg.block_n == 32)  # best: hp4, 32+ splits, n32
        return 10.0 - (cfg.num_splits == 8)

    default = SplitKVConfig(num_splits=8, block_n=64, num_warps=4, num_stages=2)
    found, us, _ = search(default, 65536, 128, measure, coarse=False, heads=(2, 4))
    assert (found.heads_per_cta, found.block_n, us) == (4, 32, 4.0) and found.num_splits >= 32
    tried = []
    search(default, 65536, 128, lambda cfg: tried.append(cfg) or measure(cfg), coarse=True)
    assert {cfg.heads_per_cta for cfg in tried} == {1}
    assert config_dict(found)["heads_per_cta"] == 4 and "heads_per_cta" not in config_dict(default)


def test_packing_options_replace_padding_rows_only():
    def problem(hq, hkv, q_len):
        return DecodeProblem(1, hq, hkv, 128, q_len, 1024, torch.bfloat16, torch.device("cpu"),
                             (hq * 128, 128, 128, 1), (1,) * 4, (1,) * 4, 0.1)  # fmt: skip

    assert packing_options(problem(32, 8, 1)) == (2, 4)  # group 4: 4 heads fill the 16 rows
    assert packing_options(problem(32, 8, 2)) == (2,)
    assert packing_options(problem(32, 4, 1)) == (2,)  # group 8
    assert packing_options(problem(32, 2, 1)) == ()  # group 16 fills a dot alone
    assert packing_options(problem(6, 6, 1)) == (2,)  # MHA: 4 and 8 do not divide 6 KV heads
    assert packing_options(problem(16, 16, 1)) == (2, 4, 8, 16)


def test_format_results_and_progress():
    raw = crossover.new_table({"gpu_name": "G", "sm_count": 1, "versions": {}, "date": "2026-01-01"})
    fam = {"key": "hq8_hkv8_d64_tq1_fp16", "num_q_heads": 8, "num_kv_heads": 8, "head_dim": 64,
           "q_len": 1, "dtype": "fp16"}  # fmt: skip
    cfg = {"num_splits": 4, "block_n": 64, "num_warps": 4, "num_stages": 2}
    for n, c in ((1024, 9.0), (4096, 5.0)):
        crossover.add_point(
            raw, fam, 1, n, {"config": cfg, "triton_us": 8.0, "default_us": 10.0, "cudnn_us": c}
        )
    text = crossover.format_results(crossover.finalize(raw, partial=False))
    assert "1.250x" in text and "cuDNN from L >= 4096" in text
    stream = io.StringIO()
    bar = Progress(2, stream)
    bar.step("a")
    bar.step("b")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("[" + "#" * 20 + "] 2/2") and lines[1].endswith("b")


def test_plan_without_gpu_explains_and_says_what_is_missing(capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU output")
    code, out, _ = _main(["plan", "--preset", "qwen2-7b", "--batch", "4", "--length", "4k"], capsys)
    assert code == 0, out
    assert "b4_hq28_hkv4_d128_tq1_cap131072_bf16" in out
    assert "backend" in out and "triton" in out and "cuDNN needs a CUDA device" in out
    assert "no CUDA GPU" in out and "triton config" in out
    assert "on NVIDIA H100" in out  # what the shipped table would decide there
    code, out, _ = _main(["plan", "--preset", "qwen2-7b", "--backend", "cudnn"], capsys)
    assert code == 1 and "cannot serve" in out
    code, out, _ = _main(["plan", "--preset", "qwen2-7b", "--batch", "8", "--mask"], capsys)  # an HF step
    assert code == 0 and "_kvstart_maskbool" in out and "a bool mask is given" in out


def test_info_prints_the_table_and_the_graph_cache(capsys):
    code, out, _ = _main(["info"], capsys)
    assert code == 0
    for name in ("tuning table", "user tuning table", "packaged table", "cuDNN graph cache", "cuDNN usable"):
        assert name in out, out
    assert "default_h100.json" in out


@pytest.mark.gpu
@pytest.mark.slow  # tens of seconds on the GPU: started first (conftest)
def test_short_real_tune_changes_the_planner_as_measured(tmp_path):
    from kvdecode.planner import choose
    from kvdecode.triton_kernels.config import default_config
    from kvdecode.tuning.runner import run_tune
    from kvdecode.tuning.spec import Family, TuneSpec, family_problem

    fam = Family(32, 8, 128, "bf16")
    spec = TuneSpec((fam,), (1, 16), length_grid(16384, coarse=True), coarse=True)
    out = tmp_path / "t.json"
    start = time.perf_counter()
    raw = run_tune(spec, out, stream=io.StringIO())
    assert time.perf_counter() - start < 180
    table = thresholds.load_table(out)
    assert not table.metadata["partial"] and table.gpu_name == torch.cuda.get_device_name()
    thresholds.use_table(out)
    device = torch.device("cuda", torch.cuda.current_device())
    for batch in spec.batches:
        entry = raw["families"][fam.key]["batches"][str(batch)]
        points = {int(n): p for n, p in entry["lengths"].items()}
        assert set(points) == set(spec.lengths)
        threshold = entry["threshold"]
        for n, p in points.items():
            assert p["triton_us"] <= p["default_us"]
            wins = p["cudnn_us"] is not None and p["cudnn_us"] < p["triton_us"]
            if threshold is not None and n >= threshold:
                assert wins, (batch, n, p)  # at or above the crossover cuDNN measured faster
            problem = family_problem(fam, batch, n, device)
            expected = "cudnn" if threshold is not None and n >= threshold else "triton"
            assert choose(problem, "auto", max_seq_len=n).backend == expected
            got = default_config(problem)
            assert (got.num_splits, got.block_n, got.num_warps, got.num_stages) == tuple(
                p["config"][k] for k in ("num_splits", "block_n", "num_warps", "num_stages")
            )


def test_masked_families_are_tuned_with_a_mask_and_kv_start(tmp_path, monkeypatch):
    """``kvdecode tune --mask``: each point runs with a bool mask [B, 1, T_q, L] (a slice of one column
    more, hiding nothing) and kv_start, the problem matches the family's, cuDNN is not measured, and
    the table names the family ``..._mask`` with ``"mask": "bool"``."""
    from kvdecode.tuning import measure
    from kvdecode.tuning.runner import run_tune
    from kvdecode.tuning.spec import Family, TuneSpec, family_problem

    seen = []

    def fake_time(self, launch, replays):
        (q, k, v), o = self.layers[0], self.outs[0]
        launch(q, k, v, self.seq_lens, self.kv_start, self.mask, o, None)  # through the interpreter
        seen.append((self.problem, self.mask.shape, self.mask.stride(), self.kv_start.tolist()))
        return 10.0 + abs(launch.config.num_splits - 2)

    monkeypatch.setattr(measure.PointBench, "_time", fake_time)
    fam = Family(4, 2, 16, "fp16", q_len=2, masked=True)
    assert fam.key == "hq4_hkv2_d16_tq2_fp16_mask"
    out = tmp_path / "t.json"
    raw = run_tune(
        TuneSpec((fam,), (2,), (256,), coarse=True), out, stream=io.StringIO(), device=torch.device("cpu")
    )
    problem, shape, strides, starts = seen[0]
    assert problem == family_problem(fam, 2, 256, torch.device("cpu")) and problem.mask_kind == "bool"
    assert shape == (2, 1, 2, 256) and strides[2:] == (257, 1) and starts == [0, 0]
    entry = raw["families"][fam.key]
    point = entry["batches"]["2"]["lengths"]["256"]
    assert entry["mask"] == "bool" and point["cudnn_us"] is None and point["config"]["num_splits"] == 2
    assert thresholds.load_table(out).families[fam.key]["mask"] == "bool"


def test_a_new_table_of_masked_families_starts_from_the_table_in_use(tmp_path, monkeypatch):
    """A table holding only masked twins would be looked up before the table in use for the GPU and
    hide its crossovers and mask-free configurations from every other call: a masked-only tune into a
    new file starts from the table in use (found in review: thresholds {} and default 8192, not
    provisional, for every mask-free call)."""
    from kvdecode.tuning import measure
    from kvdecode.tuning.environment import current_environment
    from kvdecode.tuning.runner import run_tune
    from kvdecode.tuning.spec import Family, TuneSpec

    monkeypatch.setenv("KVDECODE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(measure.PointBench, "_time", lambda self, launch, replays: 10.0)
    plain = crossover.new_table(current_environment("cpu").metadata() | {"sm_count": 4})
    fam = {"key": "hq4_hkv2_d16_tq1_fp16", "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 16, "q_len": 1,
           "dtype": "fp16"}  # fmt: skip
    cfg = {"num_splits": 2, "block_n": 16, "num_warps": 4, "num_stages": 2}
    for n, cudnn in ((256, 9.0), (512, 5.0)):
        crossover.add_point(plain, fam, 1, n, {"config": cfg, "triton_us": 8.0, "default_us": 9.0,
                                               "cudnn_us": cudnn})  # fmt: skip
    in_use = thresholds.save_table(crossover.finalize(plain, partial=False), tmp_path / "in_use.json")
    thresholds.use_table(in_use)
    try:
        masked = Family(4, 2, 16, "fp16", masked=True)
        out = tmp_path / "new.json"
        stream = io.StringIO()
        raw = run_tune(TuneSpec((masked,), (1,), (128,), coarse=True), out, stream=stream,
                       device=torch.device("cpu"))  # fmt: skip
    finally:
        thresholds.use_table(None)
    assert "starting from" in stream.getvalue()
    assert set(raw["families"]) == {fam["key"], masked.key}
    assert raw["thresholds"] == plain["thresholds"] and raw["batch_buckets"] == plain["batch_buckets"]
    assert raw["families"][fam["key"]]["batches"]["1"]["threshold"] == 512
    assert thresholds.load_table(out).families[masked.key]["mask"] == "bool"


@pytest.mark.parametrize("heads, q_len, batch", [(1, 1, 1), (1, 4, 3), (4, 1, 1), (8, 4, 3)])
def test_a_masked_familys_problem_is_the_one_its_tensors_make(heads, q_len, batch):
    """The tuner's problem (from tensors) and the family's (no tensors: dry run, lookups) agree, a single
    query head included (a size-1 dim keeps its stride in the broadcast view: found in review)."""
    from kvdecode.problem import DecodeProblem
    from kvdecode.tuning.spec import Family, family_mask, family_problem

    fam = Family(heads, 1, 16, "fp16", q_len=q_len, masked=True)
    cpu = torch.device("cpu")
    q = torch.zeros(batch, heads, q_len, 16, dtype=torch.float16)
    k = torch.zeros(batch, 1, 64, 16, dtype=torch.float16)
    mask, starts = family_mask(fam, batch, 64, cpu)
    lens = torch.full((batch,), 64, dtype=torch.int32)
    made = DecodeProblem.from_tensors(q, k, k, lens, kv_start=starts, mask=mask)
    assert made == family_problem(fam, batch, 64, cpu)


def test_remeasure_runs_the_named_points_again_and_keeps_the_others(tmp_path, monkeypatch):
    """``tune --remeasure`` (after the search changed): the run's points are measured again although the
    table holds them, the table's other points stay as they were, and the command is recorded."""
    from kvdecode.tuning import measure
    from kvdecode.tuning.runner import run_tune
    from kvdecode.tuning.spec import Family, TuneSpec

    prefer = {"splits": 2}
    launched = []

    def fake_time(self, launch, replays):
        (q, k, v), o = self.layers[0], self.outs[0]
        launch(q, k, v, self.seq_lens, None, None, o, None)
        launched.append(launch.config)
        return 10.0 + abs(launch.config.num_splits - prefer["splits"])

    monkeypatch.setattr(measure.PointBench, "_time", fake_time)
    fam = Family(4, 2, 16, "fp16")
    out, cpu = tmp_path / "t.json", torch.device("cpu")
    run_tune(TuneSpec((fam,), (1,), (128, 256), coarse=True), out, stream=io.StringIO(), device=cpu)
    before = thresholds.load_table(out).families[fam.key]["batches"]["1"]["lengths"]
    assert {n: p["config"]["num_splits"] for n, p in before.items()} == {"128": 2, "256": 2}
    prefer["splits"] = 1  # "the search changed": another best
    n_launched, stream = len(launched), io.StringIO()
    run_tune(TuneSpec((fam,), (1,), (256,), coarse=True), out, stream=stream, device=cpu, remeasure=True,
             command="kvdecode tune --remeasure")  # fmt: skip
    after = thresholds.load_table(out)
    lengths = after.families[fam.key]["batches"]["1"]["lengths"]
    assert len(launched) > n_launched and "remeasuring 1 of" in stream.getvalue()
    assert lengths["256"]["config"]["num_splits"] == 1 and lengths["128"] == before["128"]
    assert after.metadata["command"].endswith("kvdecode tune --remeasure ({}, remeasured)".format(
        after.metadata["date"]))  # fmt: skip
    n_launched = len(launched)
    run_tune(TuneSpec((fam,), (1,), (256,), coarse=True), out, stream=io.StringIO(), device=cpu)
    assert len(launched) == n_launched  # without it, a point in the table is not measured again


def test_tune_plumbing_on_the_interpreter_resumes_and_writes_a_checked_table(tmp_path, monkeypatch):
    """The whole loop on CPU (Triton interpreter) with a fake clock: real launches and checks, fake µs.

    The fake time prefers 2 splits and block_n 64, so the search must move away from the default; the
    tuned configuration is checked against float32 math by the tuner itself before it is recorded.
    """
    from kvdecode.tuning import measure
    from kvdecode.tuning.runner import run_tune
    from kvdecode.tuning.spec import Family, TuneSpec

    launched = []

    def fake_time(self, launch, replays):
        (q, k, v), o = self.layers[0], self.outs[0]
        launch(q, k, v, self.seq_lens, None, None, o, None)  # a real launch through the interpreter
        cfg = launch.config
        launched.append(cfg)
        return 10.0 + abs(cfg.num_splits - 2) + (cfg.block_n != 64) + 0.5 * (cfg.num_warps != 8)

    monkeypatch.setattr(measure.PointBench, "_time", fake_time)
    fam = Family(4, 2, 16, "fp16")
    spec = TuneSpec((fam,), (1,), (128, 256), coarse=True)
    out = tmp_path / "t.json"
    cpu = torch.device("cpu")
    raw = run_tune(spec, out, stream=io.StringIO(), device=cpu)
    entry = raw["families"][fam.key]["batches"]["1"]
    assert set(entry["lengths"]) == {"128", "256"} and entry["threshold"] is None  # no cuDNN on CPU
    for point in entry["lengths"].values():
        assert point["config"]["num_splits"] == 2 and point["config"]["block_n"] == 64
        assert point["triton_us"] < point["default_us"] and point["cudnn_us"] is None
        assert "cpu" in point["cudnn_reason"] and "note" not in point
    table = thresholds.load_table(out)
    assert table.gpu_name == "cpu" and not table.metadata["partial"]
    n_launched = len(launched)
    raw2 = run_tune(spec, out, stream=io.StringIO(), device=cpu)  # resume: nothing left to measure
    assert len(launched) == n_launched and raw2["families"] == raw["families"]
    bigger = TuneSpec((fam,), (1, 2), (128, 256), coarse=True)
    stream = io.StringIO()
    run_tune(bigger, out, stream=stream, device=cpu)
    assert "2 points already measured" in stream.getvalue()
    assert set(thresholds.load_table(out).families[fam.key]["batches"]) == {"1", "2"}
