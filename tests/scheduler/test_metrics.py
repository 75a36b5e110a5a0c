from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disco.scheduler.metrics import (
    paced_times,
    percentile,
    qoe,
    summarize,
    weighted_percentile,
)
from disco.scheduler.types import EndpointKind, Regime, RequestOutcome


def test_qoe_sanity_on_time_stream_is_perfect() -> None:
    # paper-notes.md: expected TTFT 1 s, 1 token/s, tokens at 0, 1, 2, 3 s -> QoE 1.
    assert qoe([0, 1, 2, 3], arrival=0.0, expected_ttft=1.0, tds=1.0) == 1.0


def test_qoe_sanity_late_stream_is_about_three_quarters() -> None:
    # paper-notes.md: tokens spread over 5-10 s -> about 0.75 (12 tokens, raw delivery curve:
    # S_actual = 30, S_target = 40.5).
    times = np.linspace(5, 10, 12)
    assert qoe(times, 0.0, 1.0, 1.0, paced=False) == pytest.approx(30 / 40.5)
    # Paced, the reader cannot take 12 tokens in 5 s, so the curve stretches and QoE drops.
    assert qoe(times, 0.0, 1.0, 1.0) == pytest.approx(66 / 108)


def test_qoe_late_start_lowers_and_empty_is_zero() -> None:
    early = qoe(np.arange(20) * 0.05 + 0.2, 0.0)
    late = qoe(np.arange(20) * 0.05 + 3.0, 0.0)
    assert early == 1.0 and 0.0 < late < 1.0
    assert qoe([], 0.0) == 0.0
    assert qoe([5.0], 5.0) == 1.0  # one token, before it was expected
    with pytest.raises(ValueError):
        qoe([1.0], 0.0, tds=0)


def test_paced_times_respects_reading_interval() -> None:
    v = paced_times([0.0, 0.01, 0.02, 1.0, 1.01], tds=10.0)
    assert v == pytest.approx([0.0, 0.1, 0.2, 1.0, 1.1])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=20),
    st.lists(st.integers(0, 5), min_size=20, max_size=20),
    st.sampled_from([0, 1, 50, 90, 99, 100]),
)
def test_weighted_percentile_matches_repeat(vals: list[float], ws: list[int], q: int) -> None:
    w = np.array(ws[: len(vals)])
    expected = percentile(np.repeat(vals, w), q)
    got = weighted_percentile(np.array(vals), w, q)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def _outcome(i: int, ttft: float, n: int, side: EndpointKind, prompt: int) -> RequestOutcome:
    times = [10.0 * i + ttft + 0.05 * k for k in range(n)]
    o = RequestOutcome(str(i), 10.0 * i, prompt, times, [side] * n, first_token_from=side)
    if side is EndpointKind.SERVER:
        o.server_prompt_tokens, o.server_output_tokens, o.server_cost = prompt, n, 0.01
    else:
        o.device_prompt_tokens, o.device_output_tokens, o.device_energy_j = prompt, n, 2.0
    return o


def test_summarize_aggregates_and_budget_ratio() -> None:
    outs = [
        _outcome(0, 0.5, 4, EndpointKind.SERVER, 100),
        _outcome(1, 1.5, 4, EndpointKind.DEVICE, 300),
        RequestOutcome("x", 30.0, 100, error="boom"),
    ]
    s = summarize(outs, Regime.SERVER_CONSTRAINED)
    assert s["requests"] == 3 and s["errors"] == 1
    assert s["ttft_mean"] == pytest.approx(1.0)
    assert s["ttft_p50"] == pytest.approx(1.0)
    assert s["tbt_p99"] == pytest.approx(0.05)
    assert s["server_cost"] == pytest.approx(0.01)
    assert s["device_energy_j"] == pytest.approx(2.0)
    assert s["budget_used"] == pytest.approx(100 / 500)
    assert s["budget_used_full"] == pytest.approx((100 + 4) / (500 + 8))
    assert summarize(outs, Regime.DEVICE_CONSTRAINED)["budget_used"] == pytest.approx(300 / 500)
    assert summarize(outs)["budget_used"] is None
    assert s["migrations"] == 0


def test_summarize_empty() -> None:
    s = summarize([])
    assert s["requests"] == 0 and s["ttft_p99"] is None and s["tbt_p99"] is None
