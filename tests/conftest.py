"""Test configuration: hypothesis profiles and the ``gpu`` marker.

Profiles: ``cpu`` keeps the Triton interpreter runs within CI's budget; ``gpu`` runs >= 500 examples per
property; ``gpu-smoke`` is a quicker GPU pass (50 examples), run sharded over processes so that it ends
within 5 minutes on one GPU (kernel compiles are host work):
``HYPOTHESIS_PROFILE=gpu-smoke python -m pytest -m gpu -n 8 --dist loadgroup``; tests marked ``slow``
run first, one per worker. ``gpu`` is loaded when CUDA is available, else ``cpu``;
``HYPOTHESIS_PROFILE=<name>`` overrides. Tests marked ``gpu`` are skipped without CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

_COMMON = dict(
    deadline=None,  # first calls compile kernels; interpreter timings vary
    print_blob=True,  # failures print @reproduce_failure(...)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("cpu", max_examples=20, **_COMMON)
settings.register_profile("gpu", max_examples=500, **_COMMON)
settings.register_profile("gpu-min", max_examples=4, **_COMMON)  # a last look on a short device budget
# A quick GPU pass (each new shape family compiles a kernel, ~1 s): HYPOTHESIS_PROFILE=gpu-smoke
settings.register_profile("gpu-smoke", max_examples=50, **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "gpu" if torch.cuda.is_available() else "cpu")
settings.load_profile(PROFILE)


def smoke_examples(n: int) -> settings:
    """``n`` examples under ``gpu-smoke`` for a property whose examples each compile kernels and whose
    worker is the pass's critical path; the profile's own count under every other profile (``gpu``
    keeps its 500). ``test_split_count_invariance`` took 201 s cold of the 233 s pass (12-04c)."""
    return settings(max_examples=n) if PROFILE == "gpu-smoke" else settings()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        # The slow ones first, under ``-n 8 --dist loadgroup``: with no xdist_group marks every test is a
        # work unit of its own and the first units are dealt one per worker, so each worker starts on one
        # slow test. ``--dist load`` deals consecutive chunks (3 tests at -n 8 with ~100 tests): one
        # worker got three slow tests in a row and the pass took 317 s
        # (bench/results/h200-2026-12-04b/gpu-tests-dist-load.log); had they come last, > 280 s
        # (bench/results/h200-2026-12-04/gpu-test-times-run2.txt).
        items.sort(key=lambda item: "slow" not in item.keywords)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config: pytest.Config) -> str:
    examples = settings().max_examples
    return f"hypothesis profile: {PROFILE} ({examples} examples); CUDA: {torch.cuda.is_available()}"
