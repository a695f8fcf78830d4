"""Test configuration: hypothesis profiles and the ``gpu`` marker.

Profiles: ``cpu`` keeps the Triton interpreter runs within CI's budget; ``gpu`` runs >= 500 examples per
property; ``gpu-smoke`` is a quicker GPU pass (50 examples), run sharded over processes so that it ends
within 5 minutes on one GPU (kernel compiles are host work):
``HYPOTHESIS_PROFILE=gpu-smoke python -m pytest -m gpu -n 8 --dist load``; tests marked ``slow`` run
first. ``gpu`` is loaded when CUDA is available, else ``cpu``; ``HYPOTHESIS_PROFILE=<name>`` overrides.
Tests marked ``gpu`` are skipped without CUDA.
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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        # The slow ones first: under ``-n 8 --dist load`` xdist deals the first tests round-robin, so each
        # worker starts on one of them instead of one worker meeting them all at the end (a run in which
        # they came last took > 280 s; bench/results/h200-2026-12-04/gpu-test-times-run2.txt)
        items.sort(key=lambda item: "slow" not in item.keywords)
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config: pytest.Config) -> str:
    examples = settings().max_examples
    return f"hypothesis profile: {PROFILE} ({examples} examples); CUDA: {torch.cuda.is_available()}"
