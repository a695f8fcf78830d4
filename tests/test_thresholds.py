"""Tuning tables: schema round trip, lookups, the lookup order, mismatch refusal, the config hook."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kvdecode import thresholds
from kvdecode.errors import KVDecodeError
from kvdecode.problem import DecodeProblem
from kvdecode.thresholds import NEVER, load_table, resolve_table, save_table, threshold_for
from kvdecode.triton_kernels import config as config_mod
from kvdecode.tuning import environment
from kvdecode.tuning.crossover import add_point, crossover, finalize, measured_points, new_table

GPU = "Test GPU"
FAM = {"key": "hq32_hkv8_d128_tq1_bf16", "num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128,
       "q_len": 1, "dtype": "bf16"}  # fmt: skip


def _point(triton_us, cudnn_us, splits=8, block_n=64):
    cfg = {"num_splits": splits, "block_n": block_n, "num_warps": 4, "num_stages": 2}
    return {"config": cfg, "triton_us": triton_us, "default_us": triton_us * 1.1,
            "default_config": dict(cfg, num_splits=33), "cudnn_us": cudnn_us, "searched": 5}  # fmt: skip


def _meta(**over):
    versions = {k: v for k, v in environment.current_versions() if v is not None}
    return {"gpu_name": GPU, "sm_count": 132, "versions": versions, "date": "2026-11-26", **over}


def _table(**meta_over) -> dict:
    raw = new_table(_meta(**meta_over))
    # b1: cuDNN wins from 4096 on (a noisy win at 1024 does not count); b16: never
    for n, (t, c) in {1024: (10.0, 9.0), 2048: (12.0, 13.0), 4096: (20.0, 19.0), 8192: (40.0, 30.0)}.items():
        add_point(raw, FAM, 1, n, _point(t, c, splits=n // 256))
    for n in (1024, 8192):
        add_point(raw, FAM, 16, n, _point(10.0 * n / 1024, 99.0 * n / 1024, splits=2))
    return finalize(raw, partial=False)


@pytest.fixture(autouse=True)
def _clean(monkeypatch, tmp_path):
    monkeypatch.delenv("KVDECODE_TUNING_TABLE", raising=False)
    monkeypatch.delenv(environment.ENV_MATCH, raising=False)
    monkeypatch.setenv("KVDECODE_CACHE_DIR", str(tmp_path / "cache"))
    thresholds.use_table(None)
    yield
    thresholds.use_table(None)


def test_crossover_is_where_cudnn_wins_for_good():
    assert crossover({1: (5, 6), 2: (5, 4), 4: (5, 6), 8: (9, 8), 16: (20, 10)}) == 8
    assert crossover({1: (5, 4), 2: (5, 4)}) == 1
    assert crossover({1: (5, 4), 2: (5, 6)}) is None  # loses at the longest: never
    assert crossover({1: (5, None), 2: (5, None)}) is None
    assert crossover({1: (5, 5.0)}) is None  # a tie keeps Triton


def test_round_trip_and_lookups(tmp_path):
    raw = _table()
    path = save_table(raw, tmp_path / "t.json")
    assert json.loads(path.read_text()) == raw
    table = load_table(path)
    assert table.schema_version == 2 and table.gpu_name == GPU and not table.metadata["partial"]
    assert table.batch_buckets == (1, 16)
    assert table.family_threshold(FAM["key"], 1) == 4096
    assert table.family_threshold(FAM["key"], 2) == NEVER  # batch 2 falls in bucket 16
    assert table.family_threshold("hq1_hkv1_d64_tq1_bf16", 1) is None
    assert table.thresholds == {"d128_bf16_b1": 4096, "d128_bf16_b16": NEVER}
    assert table.lookup(128, "bf16", 1) == 4096 and table.lookup(64, "bf16", 1) == table.default_threshold
    b, n, point = table.tuned_point(FAM["key"], 1, 3000)
    assert (b, n, point["config"]["num_splits"]) == (1, 4096, 16)
    assert table.tuned_point(FAM["key"], 1, 10**6)[1] == 8192  # beyond the longest: the longest
    assert measured_points(raw) == {(FAM["key"], 1, n) for n in (1024, 2048, 4096, 8192)} | {
        (FAM["key"], 16, n) for n in (1024, 8192)
    }


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda r: r["metadata"].pop("sm_count"), "sm_count"),
        (lambda r: r["metadata"].update(versions="x"), "versions"),
        (lambda r: r.pop("families"), "families"),
        (lambda r: r["families"][FAM["key"]]["batches"]["1"].update(threshold=0), "threshold"),
        (lambda r: r["families"][FAM["key"]]["batches"]["1"]["lengths"]["1024"]["config"].pop("block_n"),
         "config"),
        (lambda r: r["families"][FAM["key"]]["batches"]["1"]["lengths"]["1024"]["config"].update(
            heads_per_cta=3), r"config.heads_per_cta must be a power of two in 1..64, got 3"),
        (lambda r: r["families"][FAM["key"]]["batches"]["1"]["lengths"]["1024"]["config"].update(
            heads_per_cta=True), r"config.heads_per_cta must be .* got True"),
    ],
)  # fmt: skip
def test_malformed_v2_tables_are_refused(tmp_path, mutate, match):
    raw = _table()
    mutate(raw)
    with pytest.raises(KVDecodeError, match=match):
        load_table(save_table(raw, tmp_path / "bad.json"))


def test_mismatch_reasons_name_what_differs():
    env = environment.Environment(GPU, 132, {"triton": "3.6.0", "torch": "2.11.0+cu130", "kvdecode": "0.1.0"})
    ok = {"gpu_name": GPU, "sm_count": 132, "versions": {"triton": "3.6.1", "torch": "2.11.0"}}
    assert environment.mismatch_reasons(ok, env) == []
    bad = {"gpu_name": "Other", "sm_count": 114, "versions": {"triton": "3.5.0", "kvdecode": "0.2.0"}}
    reasons = environment.mismatch_reasons(bad, env)
    assert len(reasons) == 4
    assert "'Other'" in reasons[0] and "114 SMs" in reasons[1]
    assert any("triton 3.5.0" in r for r in reasons) and any("kvdecode 0.2.0" in r for r in reasons)
    assert len(environment.mismatch_reasons(bad, env, check_versions=False)) == 2


def test_explicit_table_for_other_versions_raises_with_the_reason(tmp_path):
    path = save_table(_table(versions={"triton": "0.1.0"}), tmp_path / "t.json")
    thresholds.use_table(path)
    with pytest.raises(KVDecodeError, match=r"refused: it was measured with triton 0\.1\.0"):
        threshold_for(128, "bf16", 1, GPU)
    with pytest.raises(KVDecodeError, match="measured on 'Test GPU'"):
        resolve_table("Another GPU")


def test_version_check_can_be_relaxed(tmp_path, monkeypatch):
    path = save_table(_table(versions={"triton": "0.1.0"}), tmp_path / "t.json")
    monkeypatch.setenv(environment.ENV_MATCH, "gpu")
    thresholds.use_table(path)
    assert threshold_for(128, "bf16", 1, GPU).value == 4096


def test_lookup_order_explicit_env_user_cache(tmp_path, monkeypatch):
    user = thresholds.user_table_path(GPU)
    assert user.parent == tmp_path / "cache" / "tuning"
    raw = _table()
    save_table(raw, user)
    assert resolve_table(GPU).source == "user cache"
    raw["families"][FAM["key"]]["batches"]["1"]["lengths"]["8192"]["cudnn_us"] = 99.0
    env_path = save_table(finalize(raw, partial=False), tmp_path / "env.json")  # cuDNN never wins
    monkeypatch.setenv("KVDECODE_TUNING_TABLE", str(env_path))
    thresholds.table_for_gpu.cache_clear()
    assert resolve_table(GPU).source == "env"
    assert threshold_for(128, "bf16", 1, GPU).value == NEVER
    thresholds.use_table(user)
    res = resolve_table(GPU)
    assert res.source == "explicit" and res.table.path == str(user)
    thresholds.use_table(thresholds.NO_TABLE)
    assert resolve_table(GPU).table is None
    assert threshold_for(128, "bf16", 1, GPU).provisional


def test_refused_env_table_warns_and_the_next_one_is_used(tmp_path, monkeypatch):
    save_table(_table(), thresholds.user_table_path(GPU))
    bad = save_table(_table(versions={"kvdecode": "0.0.1"}), tmp_path / "env.json")
    monkeypatch.setenv("KVDECODE_TUNING_TABLE", str(bad))
    res = resolve_table(GPU)
    assert res.source == "user cache"
    (reason,) = res.refused
    assert "KVDECODE_TUNING_TABLE" in reason and "kvdecode 0.0.1" in reason
    thresholds.table_for_gpu.cache_clear()
    with pytest.warns(RuntimeWarning, match="kvdecode 0.0.1"):
        assert thresholds.table_for_gpu(GPU).path == str(thresholds.user_table_path(GPU))


def test_threshold_for_prefers_the_family_entry(tmp_path):
    raw = _table()
    raw["thresholds"]["d128_bf16_b1"] = 512  # the per-D key says otherwise
    thresholds.use_table(save_table(raw, tmp_path / "t.json"))
    assert threshold_for(128, "bf16", 1, GPU).value == 512
    t = threshold_for(128, "bf16", 1, GPU, num_q_heads=32, num_kv_heads=8)
    assert t.value == 4096 and FAM["key"] in t.source and not t.provisional
    assert threshold_for(128, "bf16", 1, GPU, num_q_heads=28, num_kv_heads=4).value == 512


def _cuda_problem(batch, capacity):
    s = (8 * capacity * 128, capacity * 128, 128, 1)
    return DecodeProblem(batch, 32, 8, 128, 1, capacity, torch.bfloat16, torch.device("cuda", 0),
                         (32 * 128, 128, 128, 1), s, s, 1 / math.sqrt(128))  # fmt: skip


def test_default_config_follows_the_table_and_keeps_the_heuristic(tmp_path, monkeypatch):
    monkeypatch.setattr(config_mod, "interpreter_active", lambda: False)
    monkeypatch.setattr(environment, "device_gpu_name", lambda device: GPU)
    p = _cuda_problem(1, 2048)
    heuristic = config_mod.heuristic_config(p, 132)
    thresholds.use_table(thresholds.NO_TABLE)
    assert config_mod.default_config(p, 132) == heuristic and config_mod.tuned_config(p) is None
    thresholds.use_table(save_table(_table(), tmp_path / "t.json"))
    cfg, source = config_mod.tuned_config(p)
    assert (cfg.num_splits, cfg.block_n) == (8, 64) and "b1 L2048" in source
    assert config_mod.default_config(p) == cfg != heuristic
    assert config_mod.default_config(p, 100) == config_mod.heuristic_config(p, 100)  # other SM count
    small = _cuda_problem(1, 128)  # bucket 1024 says 4 splits; 128 keys hold 2 tiles of 64
    assert config_mod.default_config(small).num_splits == 2
    assert config_mod.default_config(_cuda_problem(9, 8192)).num_splits == 2  # batch bucket 16
    other = DecodeProblem(**{**p.__dict__, "num_q_heads": 64})
    assert config_mod.default_config(other, 132) == config_mod.heuristic_config(other, 132)


def test_a_packed_point_gives_a_packed_config_and_an_unpacked_one_does_not(tmp_path, monkeypatch):
    """``heads_per_cta`` travels from the table to the plan's config (absent: 1, as tables written before
    the field); one that does not fit the problem (a table edited by hand) leaves it to the heuristic."""
    monkeypatch.setattr(config_mod, "interpreter_active", lambda: False)
    monkeypatch.setattr(environment, "device_gpu_name", lambda device: GPU)
    p = _cuda_problem(1, 2048)
    raw = _table()
    point = raw["families"][FAM["key"]]["batches"]["1"]["lengths"]["2048"]
    assert "heads_per_cta" not in point["config"]
    thresholds.use_table(save_table(raw, tmp_path / "plain.json"))
    assert config_mod.tuned_config(p)[0].heads_per_cta == 1
    point["config"]["heads_per_cta"] = 4
    thresholds.use_table(save_table(raw, tmp_path / "packed.json"))
    cfg = config_mod.default_config(p)
    assert cfg.heads_per_cta == 4 and cfg.name.endswith("_hp4") and cfg.num_splits == 8
    fp8 = DecodeProblem(**{**p.__dict__, "kv_dtype": torch.float8_e4m3fn, "kv_scale_kind": "scalar"})
    from_table = config_mod.default_config(fp8)  # a 16-bit point's packing is not fp8's: unmeasured
    assert from_table.heads_per_cta == 1 and from_table.num_splits == 2 and from_table.num_stages == 3
    point["config"]["heads_per_cta"] = 16  # 8 KV heads: does not divide
    thresholds.use_table(save_table(raw, tmp_path / "bad.json"))
    assert config_mod.tuned_config(p) is None
    assert config_mod.default_config(p, 132) == config_mod.heuristic_config(p, 132)


def test_masked_problems_take_the_masked_family_and_leave_the_crossovers_alone(tmp_path, monkeypatch):
    """A transformers step (a bool mask shared by the heads, kv_start) is served by the family's masked
    twin (``kvdecode tune --mask``), never by the mask-free points; without a twin, or with a mask per
    head, the heuristic. Masked families (Triton only) add no batch bucket and no crossover."""
    monkeypatch.setattr(config_mod, "interpreter_active", lambda: False)
    monkeypatch.setattr(environment, "device_gpu_name", lambda device: GPU)
    p = _cuda_problem(8, 2048)
    row = p.capacity + 1
    hf = DecodeProblem(**{**p.__dict__, "has_kv_start": True, "mask_kind": "bool", "mask_dtype": torch.bool,
                          "mask_strides": (row, 0, row, 1)})  # fmt: skip
    per_head = DecodeProblem(**{**hf.__dict__, "mask_strides": (32 * row, row, row, 1)})
    plain = _table()
    thresholds.use_table(save_table(plain, tmp_path / "plain.json"))
    assert config_mod.tuned_config(hf) is None and config_mod.tuned_config(p) is not None
    raw = _table()
    masked = dict(FAM, key=FAM["key"] + "_mask", mask="bool")
    add_point(raw, masked, 8, 2048, _point(5.0, None, splits=6, block_n=32))
    raw = finalize(raw, partial=False)
    assert raw["batch_buckets"] == plain["batch_buckets"] and raw["thresholds"] == plain["thresholds"]
    thresholds.use_table(save_table(raw, tmp_path / "masked.json"))
    cfg, source = config_mod.tuned_config(hf)
    assert (cfg.num_splits, cfg.block_n) == (6, 32) and "_mask b8 L2048" in source
    assert config_mod.default_config(hf) == cfg
    assert config_mod.tuned_config(per_head) is None
    additive = DecodeProblem(**{**hf.__dict__, "mask_kind": "additive", "mask_dtype": torch.float32})
    strided_keys = DecodeProblem(**{**hf.__dict__, "mask_strides": (row, 0, 1, row)})  # (found in review)
    assert config_mod.tuned_config(additive) is None and config_mod.tuned_config(strided_keys) is None
    # one query head: the broadcast view keeps the head dim's real stride, and the mask is still shared
    one_head = DecodeProblem(
        **{**hf.__dict__, "num_q_heads": 1, "num_kv_heads": 1, "mask_strides": (row,) * 3 + (1,)}
    )
    twin = dict(masked, key="hq1_hkv1_d128_tq1_bf16_mask", num_q_heads=1, num_kv_heads=1)
    add_point(raw, twin, 8, 2048, _point(5.0, None, splits=4, block_n=64))
    thresholds.use_table(save_table(finalize(raw, partial=False), tmp_path / "one_head.json"))
    assert config_mod.tuned_config(one_head)[0].num_splits == 4
    assert config_mod.tuned_config(p)[0].num_splits == 2  # the mask-free problem: batch bucket 16, unmasked


def test_version1_tables_still_load():
    table = load_table(thresholds.TUNING_DIR / "default_h100.json")
    assert table.gpu_name.startswith("NVIDIA H100") and table.lookup(128, "bf16", 1) >= 1


# ---- corrupt tables are refused at load, with the file and the reason (issue 12, defect 2) ----


def _cfg(raw, **over):
    raw["families"][FAM["key"]]["batches"]["1"]["lengths"]["1024"]["config"].update(over)


def _rekey(mapping, old, new):
    mapping[new] = mapping.pop(old)


CORRUPT = {
    "non_utf8": lambda raw: b'{"schema_version": 2, "note": "\xff\xfe"}',
    "deep_nesting": lambda raw: b"[" * 100_000 + b"]" * 100_000,
    "float_bucket": lambda raw: raw.update(batch_buckets=[1, 2.5, 16]),
    "str_bucket": lambda raw: raw.update(batch_buckets=[1, "4"]),
    "negative_bucket": lambda raw: raw.update(batch_buckets=[-4, 1, 16]),
    "unsorted_mixed": lambda raw: raw.update(batch_buckets=[1, None]),
    "superscript_batch": lambda raw: _rekey(raw["families"][FAM["key"]]["batches"], "1", "\u00b2"),
    "padded_length": lambda raw: _rekey(
        raw["families"][FAM["key"]]["batches"]["1"]["lengths"], "1024", "01024"
    ),
    "block_n_3": lambda raw: _cfg(raw, block_n=3),
    "block_n_huge": lambda raw: _cfg(raw, block_n=2**20),
    "num_warps_3": lambda raw: _cfg(raw, num_warps=3),
    "num_splits_huge": lambda raw: _cfg(raw, num_splits=10**6),
    "num_stages_str": lambda raw: _cfg(raw, num_stages="2"),
    "num_splits_bool": lambda raw: _cfg(raw, num_splits=True),
    "num_splits_float": lambda raw: _cfg(raw, num_splits=8.0),
    "threshold_bool": lambda raw: raw.update(default_threshold=True),
    "threshold_huge": lambda raw: raw["thresholds"].update(d128_bf16_b1=2**70),
    "family_threshold_str": lambda raw: raw["families"][FAM["key"]]["batches"]["1"].update(threshold="4096"),
    "family_not_dict": lambda raw: raw["families"].update(bad=[1, 2]),
    "point_not_dict": lambda raw: raw["families"][FAM["key"]]["batches"]["1"]["lengths"].update({"64": 3}),
    "versions_not_str": lambda raw: raw["metadata"]["versions"].update(triton=[3, 6]),
    "provisional_str": lambda raw: raw["metadata"].update(provisional="no"),
    "v1_bad_families": lambda raw: raw.update(schema_version=1, families={"x": {"batches": {"1": 7}}}),
}


def _write_corrupt(tmp_path, name):
    raw = _table()
    data = CORRUPT[name](raw)
    path = tmp_path / f"corrupt-{name}.json"
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        save_table(raw, path)
    return path


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_table_is_refused_by_load_table(tmp_path, name):
    path = _write_corrupt(tmp_path, name)
    with pytest.raises(KVDecodeError, match=f"tuning table .*{path.name}"):
        load_table(path)


@pytest.mark.parametrize("name", sorted(CORRUPT))
@pytest.mark.parametrize("source", ["env", "user cache"])
def test_corrupt_table_warns_and_the_call_goes_on_without_it(tmp_path, monkeypatch, name, source):
    path = _write_corrupt(tmp_path, name)
    if source == "env":
        monkeypatch.setenv("KVDECODE_TUNING_TABLE", str(path))
    else:
        user = thresholds.user_table_path(GPU)
        user.parent.mkdir(parents=True)
        path.rename(user)
        path = user
    thresholds.table_for_gpu.cache_clear()
    with pytest.warns(RuntimeWarning, match=f"{path.name}.*ignoring it"):
        t = threshold_for(128, "bf16", 1, GPU, num_q_heads=32, num_kv_heads=8)
    assert t.value == thresholds.FALLBACK_THRESHOLD and t.provisional


def test_explicit_corrupt_table_raises_kvdecode_error(tmp_path):
    path = _write_corrupt(tmp_path, "num_warps_3")
    with pytest.raises(KVDecodeError, match="num_warps must be one of"):
        thresholds.use_table(path)


def test_a_table_that_is_not_a_regular_file_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setenv("KVDECODE_TUNING_TABLE", "/dev/zero")  # read whole, this never ends
    thresholds.table_for_gpu.cache_clear()
    with pytest.warns(RuntimeWarning, match="/dev/zero.*regular file"):
        assert thresholds.table_for_gpu(GPU) is None


def test_an_oversized_table_is_not_read(tmp_path):
    path = tmp_path / "huge.json"
    with open(path, "wb") as f:
        f.truncate(thresholds.MAX_TABLE_BYTES + 1)  # sparse: no disk used
    with pytest.raises(KVDecodeError, match=f"{path.name}.*at most {thresholds.MAX_TABLE_BYTES} bytes"):
        load_table(path)


def test_cli_plan_with_a_corrupt_table_exits_with_the_reason(tmp_path, capsys):
    from kvdecode import cli

    path = _write_corrupt(tmp_path, "num_splits_huge")
    code = cli.main(["plan", "--preset", "llama3-8b", "--capacity", "4096", "--table", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and path.name in err and "num_splits must be an int in 1..128" in err
