"""Arrival schedules: synthetic rates and burstiness, and trace windows, time scaling, thinning."""

from __future__ import annotations

import numpy as np
import pytest

from disco.loadgen.arrivals import (
    ARRIVAL_PROCESSES,
    GammaBursts,
    LogNormalLengths,
    Poisson,
    TraceLengths,
    from_trace,
    mean_rate,
    synthetic,
)
from disco.scheduler.traces import TraceRecord


def _trace(n: int = 200, gap: float = 0.5) -> list[TraceRecord]:
    return [TraceRecord(i * gap, 100 + i, 10 + i % 7, f"s{i % 5}") for i in range(n)]


def _cv(times: list[float]) -> float:
    g = np.diff([0.0, *times])
    return float(g.std() / g.mean())


def test_poisson_rate_and_cv() -> None:
    arr = synthetic(Poisson(20.0), LogNormalLengths(), duration=500.0, seed=1)
    assert mean_rate(arr, 500.0) == pytest.approx(20.0, rel=0.03)
    assert _cv([a.time for a in arr]) == pytest.approx(1.0, abs=0.05)
    assert all(0 < a.time < 500.0 for a in arr)


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_cv_sets_burstiness_at_the_same_rate(cv: float) -> None:
    arr = synthetic(GammaBursts(10.0, cv), LogNormalLengths(), count=40_000, seed=2)
    times = [a.time for a in arr]
    assert len(arr) / times[-1] == pytest.approx(10.0, rel=0.05)
    assert _cv(times) == pytest.approx(cv, rel=0.08)


def test_registry_and_bad_parameters() -> None:
    assert ARRIVAL_PROCESSES.names() == ["gamma", "poisson"]
    with pytest.raises(ValueError):
        Poisson(0)
    with pytest.raises(ValueError):
        GammaBursts(1.0, cv=0)
    with pytest.raises(ValueError):
        synthetic(Poisson(1.0), LogNormalLengths())


def test_synthetic_is_seeded_and_draws_lengths() -> None:
    trace = _trace()
    a = synthetic(Poisson(5.0), TraceLengths.of(trace), count=50, seed=7)
    b = synthetic(Poisson(5.0), TraceLengths.of(trace), count=50, seed=7)
    c = synthetic(Poisson(5.0), TraceLengths.of(trace), count=50, seed=8)
    assert a == b and a != c
    pairs = {(r.prompt_tokens, r.output_tokens) for r in trace}
    assert all((x.prompt_tokens, x.output_tokens) in pairs for x in a)  # joint pairs kept


def test_window_and_speedup() -> None:
    trace = _trace()  # arrivals 0, 0.5, ..., 99.5
    arr = from_trace(trace, start=10.0, duration=5.0, speedup=2.0)
    assert len(arr) == 10  # 10.0 .. 14.5
    assert arr[0].time == 0.0
    assert arr[-1].time == pytest.approx(4.5 / 2.0)
    assert [a.prompt_tokens for a in arr] == [r.prompt_tokens for r in trace[20:30]]
    assert arr[0].session == trace[20].session


def test_thinning_to_a_rate_keeps_order_and_count() -> None:
    trace = _trace(400, 0.1)  # 10 req/s for 40 s
    arr = from_trace(trace, duration=20.0, rate=2.5, seed=3)
    assert len(arr) == 50
    times = [a.time for a in arr]
    assert times == sorted(times) and times[-1] < 20.0
    assert from_trace(trace, duration=20.0, rate=2.5, seed=3) == arr
    with pytest.raises(ValueError, match="speedup"):
        from_trace(trace, duration=20.0, rate=50.0)


def test_empty_window_and_bad_arguments() -> None:
    trace = _trace(10)
    with pytest.raises(ValueError, match="holds no request"):
        from_trace(trace, start=1000.0, duration=5.0)
    for kw in ({"speedup": 0}, {"start": -1}, {"duration": 0}, {"rate": -1}):
        with pytest.raises(ValueError):
            from_trace(trace, **kw)
