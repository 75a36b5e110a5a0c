"""The documented way to add a policy (scheduler/policies/example.py): import it, and it plans in
the simulator by name and live by ``module:Class``, within its budget."""

from __future__ import annotations

import pytest

from disco.scheduler.policies import POLICIES, PolicyConfig, make_policy
from disco.scheduler.policies.example import HedgeAfter
from disco.scheduler.simulator import SweepSpec, World, run_scalar, sweep
from disco.scheduler.types import Regime, Request

BUDGET = 0.2


def test_importing_the_module_registered_it():
    assert POLICIES.get("hedge-after") is HedgeAfter


@pytest.mark.parametrize(
    ("regime", "now", "hedged"), [(Regime.DEVICE_CONSTRAINED, "server", "device"),
                                  (Regime.SERVER_CONSTRAINED, "device", "server")],
)  # fmt: skip
def test_it_plans_a_hedge_on_the_constrained_side(small_world: World, regime, now, hedged):
    # Budget 1: the guard lets the hedge through even before any spend was observed.
    policy = make_policy(
        "hedge-after", PolicyConfig(regime=regime, budget=1.0), small_world.server,
        small_world.device,
    )  # fmt: skip
    plan = policy.plan(Request("r", 0.0, 100), now=0.0)
    assert getattr(plan, f"{now}_start") == 0.0
    assert getattr(plan, f"{hedged}_start") == HedgeAfter.wait_s
    assert plan.policy == "hedge-after"


def test_it_runs_through_the_simulator_within_its_budget(small_world: World):
    spec = SweepSpec(
        Regime.DEVICE_CONSTRAINED, (BUDGET,), ("hedge-after", "server-only"), (False,)
    )
    rows = {r["policy"]: r for r in sweep(small_world, spec)}
    mine, alone = rows["hedge-after"], rows["server-only"]
    assert mine["requests"] == alone["requests"] == len(small_world)
    # The hedge fired (the device did some work) but within the budget's share (the same slack
    # as the full-trace claims), and the first token wins, so no request got slower on average.
    assert 0.0 < mine["budget_used"] <= BUDGET + 0.02
    assert mine["ttft_mean"] < alone["ttft_mean"]


def test_the_scalar_path_agrees_request_by_request(small_world: World):
    cfg = PolicyConfig(regime=Regime.DEVICE_CONSTRAINED, budget=BUDGET)
    policy = make_policy("hedge-after", cfg, small_world.server, small_world.device)
    outs = run_scalar(policy, small_world)
    assert len(outs) == len(small_world) and all(o.error is None for o in outs)
    ttfts = [o.ttft for o in outs]
    assert all(t is not None and t > 0 for t in ttfts)


def test_it_resolves_live_by_module_and_class(small_world: World):
    from disco.cluster.resolve import build_live_policy

    policy = build_live_policy(
        "disco.scheduler.policies.example:HedgeAfter", PolicyConfig(), small_world.server,
        small_world.device,
    )  # fmt: skip
    assert isinstance(policy, HedgeAfter)
