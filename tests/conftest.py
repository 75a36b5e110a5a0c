"""Shared pytest setup: GPU-marked tests are skipped on machines without a CUDA GPU."""

from __future__ import annotations

import pytest

from disco.cluster.gpu import has_cuda_gpu


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if has_cuda_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
