"""The Locust runner's sizing, without starting Locust."""

from __future__ import annotations

from disco.loadgen.runner import default_users
from disco.loadgen.schedule import ScheduledRequest


def test_default_users_cover_the_peak_concurrency() -> None:
    burst = [ScheduledRequest(f"r{i}", 0.01 * i, "x", "p", 1, 1, 1) for i in range(40)]
    calm = [ScheduledRequest(f"s{i}", 100.0 + 30 * i, "x", "p", 1, 1, 1) for i in range(5)]
    assert default_users(burst + calm) == 40
    assert default_users(calm) == 4  # at least a few
    assert default_users([]) == 1
