"""Simulator vs live: calibration from measured runs, and the side-by-side rows."""

from __future__ import annotations

import pytest

from disco.loadgen.compare import (
    calibrate_device,
    calibrate_server,
    side_by_side,
    simulate,
    trace_of,
)
from disco.loadgen.records import RequestRecord
from disco.loadgen.runner import default_users
from disco.loadgen.schedule import ScheduledRequest
from disco.scheduler.profiles import load_profile
from disco.scheduler.types import Regime

SERVER = load_profile("gpt-4o-mini", "server")
DEVICE = load_profile("xiaomi14-qwen0.5b", "device")


def _rec(i: int, prompt: int, ttft: float, gap: float, n: int = 5) -> RequestRecord:
    return RequestRecord(
        id=f"r{i}", target="x", due=i, sent=i, prompt_tokens=prompt, max_tokens=n,
        token_times=[ttft + k * gap for k in range(n)],
    )  # fmt: skip


def _reqs(n: int = 60) -> list[ScheduledRequest]:
    return [ScheduledRequest(f"r{i}", i * 0.5, "x", "p", 50 + 10 * (i % 20), 50 + i, 16)
            for i in range(n)]  # fmt: skip


def test_device_calibration_recovers_a_line() -> None:
    # TTFT = 0.2 + l / 250, decode 20 ms/token.
    recs = [_rec(i, p, 0.2 + p / 250, 0.02) for i, p in enumerate([40, 80, 160, 320, 640])]
    d = calibrate_device(DEVICE, recs)
    assert d.ttft_base_s == pytest.approx(0.2, abs=1e-6)
    assert d.prefill_tps == pytest.approx(250, rel=1e-6)
    assert d.decode_tps == pytest.approx(50, rel=1e-6)
    assert d.params_b == DEVICE.params_b  # energy model kept
    assert calibrate_device(DEVICE, recs[:2]) is DEVICE  # too few points: unchanged


def test_server_calibration_uses_measured_ttfts() -> None:
    recs = [_rec(i, 100, t, 0.01) for i, t in enumerate([0.3, 0.5, 2.0])]
    recs.append(RequestRecord("bad", "x", 9, 9, 100, 5, error="HTTP 503"))
    s = calibrate_server(SERVER, recs)
    assert sorted(s.ttft_samples) == [0.3, 0.5, 2.0]
    assert s.tbt_s == pytest.approx(0.01)
    assert s.prices == SERVER.prices


def test_simulate_the_schedule_and_line_up_rows() -> None:
    reqs = _reqs()
    assert [(t.arrival, t.prompt_tokens, t.output_tokens) for t in trace_of(reqs)[:2]] == [
        (0.0, 50, 16), (0.5, 60, 16)]  # fmt: skip
    pred = simulate(reqs, SERVER, DEVICE, regime=Regime.SERVER_CONSTRAINED, budget=0.3,
                    policies=["server-only", "device-only"])  # fmt: skip
    assert pred["server-only"]["budget_used"] == pytest.approx(1.0)
    assert pred["device-only"]["budget_used"] == pytest.approx(0.0)
    assert pred["server-only"]["requests"] == len(reqs)
    live = [{"policy": "server-only", "ttft_mean": 0.7}, {"policy": "race", "ttft_mean": 0.4}]
    rows = side_by_side(live, {"configured": pred})
    assert [(r["policy"], r["source"]) for r in rows] == [
        ("server-only", "live"), ("server-only", "sim (configured)"), ("race", "live")]  # fmt: skip


def test_default_users_cover_the_peak_concurrency() -> None:
    burst = [ScheduledRequest(f"r{i}", 0.01 * i, "x", "p", 1, 1, 1) for i in range(40)]
    calm = [ScheduledRequest(f"s{i}", 100.0 + 30 * i, "x", "p", 1, 1, 1) for i in range(5)]
    assert default_users(burst + calm) == 40
    assert default_users(calm) == 4  # at least a few
    assert default_users([]) == 1
