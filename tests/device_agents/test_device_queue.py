"""The device's own queue (issue 10): FIFO slots, the state a plan sees, stall limits that start
with the slot, and the agent refusing past its queue limit."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest
from fakes import Script, ScriptedEndpoint, cheap_device_profiles

from disco.device_agents.agent import DeviceAgent, DeviceSaturatedError
from disco.device_agents.config import AgentConfig
from disco.device_agents.coordinator import Coordinator, CoordinatorConfig
from disco.device_agents.device_queue import DeviceSlots
from disco.device_agents.local_planner import LocalPlanner, StaticPlanner
from disco.scheduler.endpoint import GenerationRequest
from disco.scheduler.migration import MigrationConfig
from disco.scheduler.policies.base import PolicyConfig, make_policy
from disco.scheduler.types import DeviceQueue, EndpointKind, Plan, Request

S, D = EndpointKind.SERVER, EndpointKind.DEVICE


@dataclass
class _Stream:
    produced: int = 0
    context_tokens: int = 10


def test_slots_are_granted_in_arrival_order_and_freed_by_leave():
    async def main():
        slots = DeviceSlots(1)
        a, b, c = _Stream(), _Stream(), _Stream()
        ta, tb, tc = slots.enter(a, 50), slots.enter(b, 50), slots.enter(c, 50)
        assert ta.granted.done() and not tb.granted.done() and not tc.granted.done()
        assert (slots.running, slots.waiting) == (1, 2)
        slots.leave(tb)  # a waiter gives up: it leaves the queue, the slot stays a's
        assert tb.granted.cancelled() and (slots.running, slots.waiting) == (1, 1)
        slots.leave(ta)
        assert tc.granted.done() and (slots.running, slots.waiting) == (1, 0)
        assert (slots.admitted, slots.queued) == (2, 1)

    asyncio.run(main())


def test_state_counts_the_work_ahead():
    async def main():
        slots = DeviceSlots(1)
        run = _Stream(produced=30, context_tokens=100)
        wait = _Stream(context_tokens=200)
        slots.enter(run, 1000)
        slots.enter(wait, 20)
        q = slots.state(expected_output=100.0)
        # running: 100 - 30 still expected; waiting: its 200-token context, min(20, 100) tokens
        assert q == DeviceQueue(1, 1, 200, 70.0 + 20.0, 1)
        run.produced = 150  # longer than the mean: at least one more token
        assert slots.state(100.0).decode_tokens == 1.0 + 20.0

    asyncio.run(main())


def test_queue_delay_of_the_profile():
    _, dev = cheap_device_profiles()
    assert dev.queue_delay(None) == 0.0
    assert dev.queue_delay(DeviceQueue(0, 0, 0, 0.0, 1)) == 0.0
    q = DeviceQueue(1, 2, 1000, 500.0, 1)
    want = 2 * dev.ttft_base_s + 1000 / dev.prefill_tps + 500 / dev.decode_tps
    assert dev.queue_delay(q) == pytest.approx(want)
    assert dev.queue_delay(DeviceQueue(2, 2, 1000, 500.0, 2)) == pytest.approx(want / 2)


def _coord(device_script, **cfg):
    server = ScriptedEndpoint(S, Script(ttft=5.0))
    device = ScriptedEndpoint(D, device_script)
    sp, dp = cheap_device_profiles()
    config = CoordinatorConfig(migration=MigrationConfig(rtt_s=0.005), **cfg)
    return Coordinator(server, device, sp, dp, config), server, device


def test_waiting_for_the_device_is_not_a_stall():
    """Three device-only requests on a one-slot device, each 0.3 s long; first-token limit 0.2 s.
    Without the queue each later request would have 'stalled' (0.3-0.6 s of silence) and been
    handed to the server; with it, each waits its turn and the device serves all of them."""

    async def main():
        coord, server, device = _coord(
            Script(ttft=0.05, tbt=0.025, length=10), first_token_timeout_s=0.2, device_slots=1
        )
        gen = GenerationRequest(prompt="hi", max_tokens=100)
        exs = []
        for i in range(3):
            req = Request(f"r{i}", time.monotonic(), 8)
            exs.append(coord.execute(req, gen, Plan(f"r{i}", None, 0.0)))
        results = await asyncio.gather(*(ex.collect() for ex in exs))
        firsts = []
        for events, outcome in results:
            assert outcome.error is None
            assert {e.source for e in events} == {D}
            assert [e.index for e in events] == list(range(10))
            firsts.append(outcome.token_times[0])
        assert server.calls == []
        # FIFO: each first token after the previous request's last one.
        for (_, prev), t in zip(results, firsts[1:], strict=False):
            assert t >= prev.token_times[-1]
        assert coord.device_slots is not None and coord.device_slots.queued == 2

    asyncio.run(main())


def test_a_device_that_stalls_after_its_slot_still_fails_over():
    async def main():
        coord, server, device = _coord(
            Script(ttft=0.01, stall_after=0), first_token_timeout_s=0.1, device_slots=1
        )
        server.scripts = (Script(ttft=0.01, length=5),)
        gen = GenerationRequest(prompt="hi", max_tokens=100)
        ex = coord.execute(Request("r", time.monotonic(), 8), gen, Plan("r", None, 0.0))
        events, outcome = await ex.collect()
        assert ex.failovers == 1 and {e.source for e in events} == {S}
        assert [e.index for e in events] == list(range(5))

    asyncio.run(main())


def test_a_race_loser_waiting_for_the_slot_leaves_the_queue():
    async def main():
        coord, server, device = _coord(Script(ttft=0.3, tbt=0.01, length=5), device_slots=1)
        server.scripts = (Script(ttft=0.02, length=5),)
        gen = GenerationRequest(prompt="hi", max_tokens=100)
        slow = coord.execute(Request("a", time.monotonic(), 8), gen, Plan("a", None, 0.0))
        task = asyncio.ensure_future(slow.collect())
        await asyncio.sleep(0.01)
        race = coord.execute(Request("b", time.monotonic(), 8), gen, Plan("b", 0.0, 0.0))
        _, out_b = await race.collect()
        assert out_b.first_token_from is S
        # It never ran: no device prefill charged, and the device did not start (billing rule).
        assert out_b.device_prompt_tokens == 0 and out_b.device_started is False
        slots = coord.device_slots
        assert slots is not None and slots.waiting == 0  # b's device leg left the queue
        _, out_a = await task
        assert out_a.error is None and len(device.calls) == 1  # b's device leg never ran

    asyncio.run(main())


def test_the_plan_sees_the_queue_and_races_a_busy_device():
    """DiSCo-S at b = 0.5 after a fit: a short prompt stays on an idle device, and is raced with
    the server when the device has a long queue ahead of it."""
    sp, dp = cheap_device_profiles()
    cfg = PolicyConfig(budget=0.5, window=200, recompute_every=100)
    policy = make_policy("disco", cfg, sp, dp)
    from disco.scheduler.types import RequestOutcome

    for i in range(200):  # a window of lengths 1..200 (server barely used: budget to spare)
        policy.observe(RequestOutcome(f"w{i}", 0.0, 1 + i, token_times=[0.1]))
    idle = policy.plan(Request("idle", 0.0, 10), 0.0)
    assert idle.server_start is None and idle.device_start == 0.0
    busy_q = DeviceQueue(1, 3, 600, 400.0, 1)
    busy = policy.plan(Request("busy", 0.0, 10, device_queue=busy_q), 0.0)
    assert busy.server_start == 0.0
    off = make_policy("disco", PolicyConfig(budget=0.5, window=200, recompute_every=100,
                                            device_queue_aware=False), sp, dp)  # fmt: skip
    for i in range(200):
        off.observe(RequestOutcome(f"w{i}", 0.0, 1 + i, token_times=[0.1]))
    assert off.plan(Request("busy", 0.0, 10, device_queue=busy_q), 0.0).server_start is None


def _agent(max_queue, planner=None):
    server = ScriptedEndpoint(S, Script(ttft=0.01, length=3))
    device = ScriptedEndpoint(D, Script(ttft=0.2, tbt=0.01, length=3))
    sp, dp = cheap_device_profiles()
    coord = Coordinator(server, device, sp, dp, CoordinatorConfig(device_slots=1))
    planner = planner or StaticPlanner(None, 0.0, policy="device-only")
    return DeviceAgent(coord, planner, AgentConfig(max_device_queue=max_queue))


def test_agent_refuses_past_the_queue_limit_and_keeps_what_it_accepted():
    async def main():
        agent = _agent(max_queue=1)
        gen = GenerationRequest(prompt="hello", max_tokens=3)
        first = await agent.start(gen)  # runs
        running = asyncio.ensure_future(first.collect())
        await asyncio.sleep(0)
        second = await agent.start(gen)  # waits (queue 0 -> 1)
        waiting = asyncio.ensure_future(second.collect())
        await asyncio.sleep(0)
        assert agent.saturated() and agent.metrics.device_saturated == 1
        assert "disco_agent_device_saturated 1" in agent.metrics.render()
        with pytest.raises(DeviceSaturatedError) as err:
            await agent.start(gen)
        assert err.value.status == 429 and err.value.code == "device_saturated"
        (ev1, o1), (ev2, o2) = await asyncio.gather(running, waiting)
        assert o1.error is None and o2.error is None and len(ev1) == len(ev2) == 3
        m = agent.metrics
        assert m.device_saturated == 0  # the queue drained
        assert m.device_refused == 1 and m.completed == 2 and m.device_queued == 1
        assert "disco_agent_device_refused_total 1" in m.render()
        await agent.drain()

    asyncio.run(main())


def test_a_refusal_releases_the_policy_reservation():
    async def main():
        sp, dp = cheap_device_profiles()
        policy = make_policy("device-only", PolicyConfig(budget=0.5), sp, dp)
        agent = _agent(max_queue=0, planner=LocalPlanner(policy))
        gen = GenerationRequest(prompt="hello", max_tokens=3)
        first = await agent.start(gen)
        running = asyncio.ensure_future(first.collect())
        await asyncio.sleep(0)  # it takes the slot; nothing waits yet
        with pytest.raises(DeviceSaturatedError):
            await agent.start(gen)
        await running
        await agent.drain()
        assert policy.inflight_seen == 0.0  # both reservations released
        assert policy.window.n == 1  # the refused request is not in the budget window

    asyncio.run(main())


def test_disco_races_a_busy_device_before_its_first_fit():
    """Before the first fit DiSCo-S races nothing; a busy device would then queue (or refuse)
    every request and never teach the policy. It races those, within the budget guard."""
    sp, dp = cheap_device_profiles()
    policy = make_policy("disco", PolicyConfig(budget=0.3), sp, dp)
    from disco.scheduler.types import RequestOutcome

    for i in range(10):  # fewer than recompute_every: no fit yet, some tokens in the window
        policy.observe(RequestOutcome(f"w{i}", 0.0, 50, token_times=[0.1]))
    busy_q = DeviceQueue(1, 2, 300, 200.0, 1)
    assert policy.plan(Request("idle", 0.0, 50), 0.0).server_start is None
    assert policy.plan(Request("busy", 0.0, 50, device_queue=busy_q), 0.0).server_start == 0.0
    # The guard still binds: at most b + 0.01 of the seen and in-flight tokens.
    plans = [policy.plan(Request(f"b{i}", 0.0, 50, device_queue=busy_q), 0.0) for i in range(20)]
    raced = sum(p.server_start is not None for p in plans) + 1
    assert raced > 1 and raced * 50 <= 0.31 * (50 * 32)
