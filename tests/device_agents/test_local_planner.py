"""LocalPlanner over real core policies, and the agent's plan -> execute -> report loop."""

from __future__ import annotations

import asyncio
import time

from disco.device_agents.agent import DeviceAgent
from disco.device_agents.config import AgentConfig
from disco.device_agents.coordinator import Coordinator
from disco.device_agents.engines.emulated import EmulatedEndpoint
from disco.device_agents.local_planner import LocalPlanner, StaticPlanner
from disco.scheduler.endpoint import GenerationRequest
from disco.scheduler.policies import PolicyConfig
from disco.scheduler.profiles import DEVICE_PROFILES, SERVER_PROFILES
from disco.scheduler.types import Regime, Request

SP = SERVER_PROFILES.get("gpt-4o-mini")
DP = DEVICE_PROFILES.get("xiaomi14-qwen0.5b")


class CountingPlanner:
    def __init__(self, inner):
        self.inner, self.plans, self.reports = inner, 0, []

    async def plan(self, request):
        self.plans += 1
        return await self.inner.plan(request)

    async def report(self, outcome):
        self.reports.append(outcome)
        await self.inner.report(outcome)


class BrokenPlanner:
    async def plan(self, request):
        raise ConnectionError("scheduler actor is restarting")

    async def report(self, outcome):
        raise ConnectionError("scheduler actor is restarting")


class HangingPlanner:
    """A scheduler that never answers (a hung actor, a partitioned network)."""

    async def plan(self, request):
        await asyncio.Event().wait()

    async def report(self, outcome):
        await asyncio.Event().wait()


def agent_with(planner, fallback=None, timeout_ms=100.0):
    server = EmulatedEndpoint(SP, seed=1, time_scale=0.02)
    device = EmulatedEndpoint(DP, seed=2, time_scale=0.02)
    cfg = AgentConfig(device_id="d0", planner_timeout_ms=timeout_ms)
    return DeviceAgent(Coordinator(server, device, SP, DP), planner, cfg, fallback=fallback)


async def test_race_policy_plans_both_endpoints():
    planner = LocalPlanner.from_name("race", PolicyConfig(), SP, DP)
    plan = await planner.plan(Request("q", 0.0, 50))
    assert plan.server_start == 0.0 and plan.device_start == 0.0 and plan.request_id == "q"


async def test_agent_runs_policy_plans_and_reports_every_outcome():
    cfg = PolicyConfig(regime=Regime.SERVER_CONSTRAINED, budget=0.5, recompute_every=5)
    planner = CountingPlanner(LocalPlanner.from_name("disco", cfg, SP, DP))
    agent = agent_with(planner)

    async def one(i):
        ex = await agent.start(GenerationRequest("word " * (5 + 20 * (i % 4)), 16))
        return await ex.collect()

    done = await asyncio.gather(*[one(i) for i in range(20)])
    await agent.drain()
    for events, outcome in done:
        assert [e.index for e in events] == list(range(16)) and outcome.error is None
    assert planner.plans == 20 and len(planner.reports) == 20
    assert agent.metrics.completed == 20 and agent.metrics.planner_errors == 0


async def test_planner_failure_falls_back_and_keeps_serving():
    agent = agent_with(BrokenPlanner())
    ex = await agent.start(GenerationRequest("hello", 8))
    events, outcome = await ex.collect()
    await agent.drain()
    assert len(events) == 8 and outcome.error is None
    assert ex.plan.policy == "fallback-race"  # no fallback given or offered by the planner
    assert agent.metrics.planner_fallbacks == 1 and agent.metrics.planner_errors == 1  # report


async def test_a_hanging_planner_costs_one_short_timeout_and_keeps_the_budget_guard():
    cfg = PolicyConfig(regime=Regime.SERVER_CONSTRAINED, budget=0.5)
    local = CountingPlanner(LocalPlanner.from_name("disco", cfg, SP, DP))
    agent = agent_with(HangingPlanner(), fallback=local, timeout_ms=50)
    t0 = time.monotonic()
    ex = await agent.start(GenerationRequest("word " * 40, 8))
    waited = time.monotonic() - t0
    assert waited < 0.5, f"planning took {waited:.2f} s"  # not the old 2 s
    assert local.plans == 1 and ex.plan.policy == "disco"
    # The guard: nothing seen yet, so a server start would spend 100 % > b = 50 %. A race (the
    # old fallback) would start the server at once.
    assert ex.plan.server_start is None and ex.plan.device_start == 0.0
    await ex.collect()
    await asyncio.sleep(0)  # the report task starts
    assert len(local.reports) == 1  # the stand-in learns every outcome
    assert agent.metrics.planner_fallbacks == 1
    assert "disco_agent_planner_fallbacks_total 1" in agent.metrics.render()


async def test_the_fallback_is_offered_by_the_planner():
    class WithFallback(BrokenPlanner):
        fallback = StaticPlanner(None, 0.0, policy="offered")

    agent = agent_with(WithFallback())
    ex = await agent.start(GenerationRequest("hello", 4))
    await ex.collect()
    assert ex.plan.policy == "offered" and agent.metrics.planner_fallbacks == 1


async def test_static_planner_copies_its_plan():
    plan = await StaticPlanner(None, 0.0, policy="p").plan(Request("z", 1.0, 3))
    assert (plan.request_id, plan.server_start, plan.device_start, plan.policy) == (
        "z",
        None,
        0.0,
        "p",
    )
