"""The full-trace claims (shipped Azure conv trace, gpt-4o-mini + xiaomi14-qwen0.5b).

Rule: for budgets 0.1..0.9 in both regimes, DiSCo's P99 TTFT is at most 0.5 % above every
baseline that stays within the budget, and its mean TTFT within 10 % of the oracle's. The 0.5 %
is the noise between two near-identical splits: at server b = 0.1-0.3 the P99 is the device
prefill of a prompt in a dense cluster of ~4,090-token prompts that neither DiSCo-S nor the plain
length split can afford to race, and which one lands at the 99th percentile moves by a few ms with
the window's estimates (the measured gaps are in bench/results/sim.md, not here).
``test_claims_within_two_percent`` holds everywhere with more margin.
"""

from __future__ import annotations

import pytest

from disco.scheduler.profiles import DEVICE_PROFILES, SERVER_PROFILES
from disco.scheduler.report import claim_failures
from disco.scheduler.simulator import SweepSpec, World, sweep
from disco.scheduler.traces import default_trace_path, load_trace
from disco.scheduler.types import Regime

BUDGETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
POLICIES = ("disco", "server-only", "device-only", "race", "random", "length", "oracle")
P99_TOLERANCE = 0.005


@pytest.fixture(scope="module")
def rows_by_regime() -> dict[str, list[dict]]:
    world = World.build(
        load_trace(default_trace_path()),
        SERVER_PROFILES.get("gpt-4o-mini"),
        DEVICE_PROFILES.get("xiaomi14-qwen0.5b"),
        0,
    )
    return {r.value: sweep(world, SweepSpec(r, BUDGETS, POLICIES, (False,))) for r in Regime}


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("regime", ["device", "server"])
def test_disco_claims_on_full_trace(rows_by_regime, regime: str, budget: float) -> None:
    fails = claim_failures(rows_by_regime[regime], [budget], p99_tolerance=P99_TOLERANCE)
    assert fails[budget] == []


@pytest.mark.parametrize("regime", ["device", "server"])
def test_claims_within_two_percent(rows_by_regime, regime: str) -> None:
    rows = rows_by_regime[regime]
    for b in BUDGETS:
        at = {r["policy"]: r for r in rows if r["budget"] == b}
        d = at["disco"]
        assert d["budget_used"] <= b + 0.01
        assert d["ttft_mean"] <= 1.10 * at["oracle"]["ttft_mean"]
        for name, r in at.items():
            if name not in ("disco", "oracle") and r["budget_used"] <= b + 0.02:
                assert d["ttft_p99"] <= 1.02 * r["ttft_p99"], (b, name)
