"""The no-table rule: its thresholds, the planner following it, explain/info naming it, and its regret
recomputed from the shipped H200 and H100 tables (so a change to the rule cannot silently regress)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import kvdecode
from kvdecode import backends, no_table_rule, planner, thresholds
from kvdecode.errors import KVDecodeError
from kvdecode.plan import PLANS
from kvdecode.planner import choose
from kvdecode.problem import DecodeProblem
from kvdecode.thresholds import FALLBACK_THRESHOLD, NEVER, threshold_for
from kvdecode.triton_kernels.config import heuristic_config
from kvdecode.tuning import environment, info_cmd

GPU = "Some Unmeasured GPU"
MIB = 1 << 20


@pytest.fixture(autouse=True)
def _no_table(monkeypatch, tmp_path):
    monkeypatch.delenv("KVDECODE_TUNING_TABLE", raising=False)
    monkeypatch.delenv(environment.ENV_MATCH, raising=False)
    monkeypatch.setenv("KVDECODE_CACHE_DIR", str(tmp_path / "cache"))
    thresholds.use_table(thresholds.NO_TABLE)
    yield
    thresholds.use_table(None)


def _rule(batch, hkv, head_dim=128, sms=132, hq=32, q_len=1):
    return no_table_rule.no_table_threshold(head_dim, "bf16", batch, hq, hkv, q_len, sms)


@pytest.mark.parametrize(
    ("batch", "hkv", "head_dim", "sms", "regime", "cudnn_bytes"),
    [
        (1, 8, 128, 132, "even", 768 * MIB),  # 264 CTAs: two even waves, Triton keeps long rows
        (4, 8, 128, 132, "even", 768 * MIB),
        (16, 8, 128, 132, "full", 24 * MIB),  # 128 programs >= 66
        (64, 8, 128, 132, "full", 24 * MIB),
        (1, 1, 128, 132, "underfilled", 24 * MIB),  # MQA B 1: 128 splits (the cap) < 264 CTAs
        (4, 1, 128, 132, "even", 768 * MIB),  # MQA B 4: 4 x 66 = 264 CTAs
        (16, 1, 128, 132, "uneven", 12 * MIB),  # MQA B 16: 272 CTAs, 32-row tiles
        (64, 1, 128, 132, "uneven", 12 * MIB),
        (1, 8, 256, 132, "wide head", None),  # cuDNN slower at D 256 on both GPUs
        (16, 8, 256, 132, "wide head", None),  # up to 1.24x Triton's time on the H200 (table off)
        (4, 8, 64, 132, "even", 768 * MIB),  # D 64 B 4 L 128k: cuDNN 1.11x faster (H200)
        (16, 8, 64, 132, "full, narrow head", None),  # D 64 B 16 / 64: cuDNN up to 1.28x slower
        (8, 8, 128, 108, "full", 24 * MIB),  # an A100's 108 SMs: 64 programs >= 54
    ],
)
def test_rule_thresholds(batch, hkv, head_dim, sms, regime, cudnn_bytes):
    got = _rule(batch, hkv, head_dim, sms)
    per_token = 2 * batch * hkv * head_dim * 2
    assert (got.regime, got.cudnn_bytes) == (regime, cudnn_bytes)
    assert got.value == (NEVER if cudnn_bytes is None else math.ceil(cudnn_bytes / per_token))
    assert regime in got.text and f"{sms} SMs" in got.text


def test_rule_uses_the_heuristic_split_count_of_a_long_capacity():
    for batch, hkv in ((1, 8), (4, 1), (16, 1), (64, 32)):
        got = _rule(batch, hkv)
        cap = 1 << 17
        s = (hkv * cap * 128, cap * 128, 128, 1)
        p = DecodeProblem(batch, 32, hkv, 128, 1, cap, torch.bfloat16, torch.device("cpu"),
                          (32 * 128, 128, 128, 1), s, s, 1 / math.sqrt(128))  # fmt: skip
        assert got.ctas == got.programs * heuristic_config(p, 132).num_splits


def test_threshold_for_without_a_table_applies_the_rule():
    t = threshold_for(128, "bf16", 64, GPU, num_q_heads=32, num_kv_heads=8, sm_count=132)
    assert t.value == 96 and t.provisional
    assert "no-table rule (full" in t.source and "kvdecode tune" in t.source and GPU in t.source
    flat = threshold_for(128, "bf16", 64, GPU, num_q_heads=32, num_kv_heads=8)  # no SM count
    assert flat.value == FALLBACK_THRESHOLD and flat.provisional and "flat fallback" in flat.source
    with pytest.raises(KVDecodeError, match="sm_count must be a positive int or None, got 0"):
        threshold_for(128, "bf16", 64, GPU, num_q_heads=32, num_kv_heads=8, sm_count=0)


@pytest.fixture
def unmeasured_gpu(monkeypatch):
    """auto on a GPU without a table: cuDNN (faked) serves everything; 132 SMs."""
    backends.backend_names()
    fake = type("FakeCudnn", (), {"name": "cudnn", "supports": lambda self, problem: None})()
    monkeypatch.setitem(backends._REGISTRY, "cudnn", fake)
    monkeypatch.setattr(planner, "device_gpu_name", lambda device: GPU)
    monkeypatch.setattr(planner, "device_sm_count", lambda device: 132)
    PLANS.clear()
    yield
    PLANS.clear()


def _problem(batch, hkv, capacity=1 << 17, head_dim=128):
    s = (hkv * capacity * head_dim, capacity * head_dim, head_dim, 1)
    return DecodeProblem(batch, 32, hkv, head_dim, 1, capacity, torch.bfloat16, torch.device("cuda", 0),
                         (32 * head_dim, head_dim, head_dim, 1), s, s, 1 / math.sqrt(head_dim))  # fmt: skip


@pytest.mark.parametrize(("batch", "hkv"), [(64, 8), (1, 1), (16, 1), (4, 8)])
def test_the_planner_follows_the_rule_without_a_table(unmeasured_gpu, batch, hkv):
    p = _problem(batch, hkv)
    want = _rule(batch, hkv).value
    assert planner.auto_threshold(p).value == want
    below, at = choose(p, max_seq_len=want - 1), choose(p, max_seq_len=want)
    assert (below.backend, at.backend) == ("triton", "cudnn")
    for choice in (below, at):
        assert "provisional: no-table rule" in choice.reason and "kvdecode tune" in choice.reason


def test_explain_names_the_rule_and_how_to_make_a_table(unmeasured_gpu):
    q = torch.randn(16, 32, 1, 16, dtype=torch.bfloat16)
    k = torch.randn(16, 1, 4096, 16, dtype=torch.bfloat16)
    lens = torch.full((16,), 4096, dtype=torch.int32)
    choice = kvdecode.explain(q, k, k, lens, max_seq_len=4096)
    want = _rule(16, 1, head_dim=16)  # MQA B 16: uneven, cuDNN from 12 MiB = 12288 tokens of D 16
    assert (choice.backend, choice.threshold) == ("triton", want.value)
    assert "no-table rule (uneven" in choice.reason and f"no tuning table for {GPU}" in choice.reason
    assert "'kvdecode tune'" in choice.reason


def test_info_says_the_rule_applies_and_how_to_make_a_table(monkeypatch):
    monkeypatch.setattr(info_cmd, "_gpu_name", lambda: GPU)
    monkeypatch.setattr(info_cmd, "_sm_count", lambda: 132)
    rows = dict(info_cmd.tuning_info_rows())
    assert "no-table rule applies" in rows["tuning table"] and "kvdecode tune" in rows["tuning table"]
    assert "from 24 MiB" in rows["no-table rule"] and "66 (132 SMs / 2)" in rows["no-table rule"]
    monkeypatch.setattr(info_cmd, "_sm_count", lambda: None)
    assert "flat provisional" in dict(info_cmd.tuning_info_rows())["no-table rule"]


def _regrets(table_name: str) -> list[tuple[float, str]]:
    """Regret of the rule on every cell of a shipped table with both backends measured: the time of
    the backend it picks (Triton at its heuristic config) over the faster of the two."""
    raw = json.loads((thresholds.TUNING_DIR / table_name).read_text())
    sms = raw["metadata"]["sm_count"]
    out = []
    for key, fam in raw["families"].items():
        for b, entry in fam["batches"].items():
            rule = no_table_rule.no_table_threshold(
                fam["head_dim"], fam["dtype"], int(b), fam["num_q_heads"], fam["num_kv_heads"],
                fam["q_len"], sms,
            )  # fmt: skip
            for n, point in entry["lengths"].items():
                triton, cudnn = point.get("default_us", point["triton_us"]), point.get("cudnn_us")
                if cudnn is not None:
                    picked = cudnn if int(n) >= rule.value else triton
                    out.append((picked / min(triton, cudnn), f"{key} B{b} L{n}"))
    return out


@pytest.mark.parametrize(("table", "cells"), [("default_h200.json", 106), ("default_h100.json", 43)])
def test_regret_on_the_shipped_tables_stays_within_the_claimed_bound(table, cells):
    """(H200: 106 cells since the batch cells at L 1k/4k were tuned, 2026-12-05; masked families have
    no cuDNN figure and do not count.)"""
    regrets = _regrets(table)
    assert len(regrets) == cells  # every cell with both backends measured
    worst = max(regrets)
    assert worst[0] <= no_table_rule.MEASURED_MAX_REGRET, f"{table}: {worst[1]} regret {worst[0]:.4f}"
