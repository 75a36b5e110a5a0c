"""Shared pytest setup: GPU-marked tests are skipped on machines without a CUDA GPU.

A test that needs an installed package or model uses ``needs.require`` / ``needs.missing``
(tests/needs.py): skipped locally, a failure in CI (``CI=true``).
"""

from __future__ import annotations

import pytest
from needs import in_ci

from disco.cluster.gpu import has_cuda_gpu


def pytest_report_header(config: pytest.Config) -> str:
    if in_ci():
        return "CI: a missing required package or model fails the run (tests/needs.py)"
    return "not CI: a missing required package or model skips its tests (tests/needs.py)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if has_cuda_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
