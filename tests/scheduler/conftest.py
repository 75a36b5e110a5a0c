"""Small worlds shared by the scheduler tests."""

from __future__ import annotations

import pytest

from disco.scheduler.profiles import DEVICE_PROFILES, SERVER_PROFILES
from disco.scheduler.simulator import World
from disco.scheduler.traces import TraceRecord, default_trace_path, load_trace


@pytest.fixture(scope="session")
def azure_head() -> list[TraceRecord]:
    return load_trace(default_trace_path(), limit=800)


@pytest.fixture(scope="session")
def small_world(azure_head: list[TraceRecord]) -> World:
    return World.build(
        azure_head, SERVER_PROFILES.get("gpt-4o-mini"), DEVICE_PROFILES.get("xiaomi14-qwen0.5b"), 3
    )
