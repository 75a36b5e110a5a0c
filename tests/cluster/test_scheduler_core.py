"""SchedulerCore, checkpoint stores and the micro-batching planner client, without Ray."""

from __future__ import annotations

import asyncio
import pickle
import threading

import pytest
from doubles import CountingPolicy, UnpicklablePolicy  # tests/cluster is on sys.path (pytest)

from disco.cluster import wire
from disco.cluster.planner_client import ActorPlanner
from disco.cluster.scheduler_state import BudgetLedger, Checkpointer, FileStore, SchedulerCore
from disco.scheduler.endpoint import GenerationRequest
from disco.scheduler.policies.base import PolicyConfig
from disco.scheduler.profiles import DEVICE_PROFILES, SERVER_PROFILES
from disco.scheduler.types import EndpointKind, Regime, Request, RequestOutcome


def _policy(cls=CountingPolicy):
    return cls(
        PolicyConfig(), SERVER_PROFILES.get("gpt-4o-mini"), DEVICE_PROFILES.get("xiaomi14-qwen0.5b")
    )


def _outcome(i: int, device_tokens: int = 100) -> RequestOutcome:
    return RequestOutcome(
        request_id=f"r{i}",
        arrival=0.0,
        prompt_tokens=100,
        server_prompt_tokens=100,
        device_prompt_tokens=device_tokens,
        first_token_from=EndpointKind.DEVICE,
    )


def test_ledger_spent_ratio_follows_the_regime():
    led = BudgetLedger()
    led.add(_outcome(0, device_tokens=50))
    led.add(_outcome(1, device_tokens=0))
    assert led.requests == 2
    assert led.spent_ratio(Regime.DEVICE_CONSTRAINED) == pytest.approx(0.25)
    assert led.spent_ratio(Regime.SERVER_CONSTRAINED) == pytest.approx(1.0)
    assert led.first_from_device == 2


@pytest.mark.parametrize("cls", [CountingPolicy, UnpicklablePolicy])
def test_snapshot_restores_policy_and_ledger(tmp_path, cls):
    core = SchedulerCore(_policy(cls), Regime.DEVICE_CONSTRAINED)
    core.plan_many([Request(f"q{i}", 0.0, 10) for i in range(3)], now=0.0)
    core.observe_many([_outcome(i) for i in range(12)])
    store = FileStore(tmp_path / "ckpt.bin")
    store.save(core.snapshot())

    fresh = SchedulerCore(_policy(cls), Regime.DEVICE_CONSTRAINED)
    fresh.restore(store.load(), lambda: _policy(cls))
    assert fresh.ledger == core.ledger
    assert fresh.plans == 3 and fresh.restores == 1
    assert fresh.policy.observed == 12  # pickled, or rebuilt by replay
    # 12 x 100 device tokens spent the double's 1000-token budget: server only from now on
    assert fresh.plan_many([Request("x", 0.0, 10)], now=0.0)[0].device_start is None


def test_file_store_missing_and_clear(tmp_path):
    store = FileStore(tmp_path / "sub" / "c.bin")
    assert store.load() is None
    store.save(b"abc")
    assert store.load() == b"abc"
    store.clear()
    assert store.load() is None


class _FakeRemote:
    def __init__(self, fn):
        self.fn = fn
        self.calls = 0
        self.sent: list[asyncio.Future] = []  # every call, to wait for (no sleeps)

    def remote(self, *args):
        self.calls += 1
        self.sent.append(asyncio.ensure_future(self.fn(*args)))
        return self.sent[-1]


class _FakeActor:
    """Looks like an actor handle: ``await actor.plan_wire.remote(...)``; ``hang``: plan calls
    never answer (a hung actor); ``config``: what ``actor.config.remote()`` answers."""

    def __init__(
        self, core: SchedulerCore, fail: bool = False, hang: bool = False, config=None,
        gate: asyncio.Event | None = None,
    ) -> None:  # fmt: skip
        self.config_dict = config

        async def plan_wire(reqs):
            await asyncio.sleep(0.001)
            if fail:
                raise RuntimeError("actor died")
            if hang:
                await asyncio.Event().wait()
            if gate is not None:  # answers once the test opens the gate
                await gate.wait()
            return [wire.plan_to(p) for p in core.plan_many(map(wire.request_from, reqs), 0.0)]

        async def report_many(outs):
            core.observe_many(outs)

        async def config():
            return self.config_dict

        self.plan_wire = _FakeRemote(plan_wire)
        self.report_many = _FakeRemote(report_many)
        self.config = _FakeRemote(config)


async def test_planner_batches_concurrent_callers():
    core = SchedulerCore(_policy(), Regime.SERVER_CONSTRAINED)
    actor = _FakeActor(core)
    planner = ActorPlanner(actor, max_batch=64)
    reqs = [Request(f"r{i}", 0.0, 10) for i in range(200)]
    plans = await asyncio.gather(*(planner.plan(r) for r in reqs))
    assert [p.request_id for p in plans] == [r.id for r in reqs]  # each caller gets its own plan
    assert actor.plan_wire.calls == 4  # 200 callers in one tick -> ceil(200 / 64) calls
    await asyncio.gather(*(planner.report(_outcome(i)) for i in range(10)))
    assert core.ledger.requests == 10 and actor.report_many.calls == 1


async def test_an_actor_error_reaches_the_caller():
    # No fallback inside the client: the agent decides (one layer), with the client's fallback.
    core = SchedulerCore(_policy(), Regime.SERVER_CONSTRAINED)
    planner = ActorPlanner(_FakeActor(core, fail=True))
    with pytest.raises(RuntimeError, match="actor died"):
        await planner.plan(Request("r", 0.0, 10))


async def test_callers_that_give_up_leave_the_batch_alone():
    core = SchedulerCore(_policy(), Regime.SERVER_CONSTRAINED)
    gate = asyncio.Event()
    actor = _FakeActor(core, gate=gate)
    planner = ActorPlanner(actor)
    calls = [asyncio.wait_for(planner.plan(Request(f"r{i}", 0.0, 10)), 0.01) for i in range(5)]
    got = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(g, TimeoutError) for g in got)  # every caller gave up (the agent's
    gate.set()  # timeout), and then the actor answers: the batch completes quietly
    await asyncio.gather(*actor.plan_wire.sent)
    assert actor.plan_wire.calls == 1 and core.plans == 5


SCHED = {"policy": "disco", "regime": "server", "budget": 0.5, "checkpoint": "none"}


async def test_a_hanging_scheduler_is_covered_by_its_own_policy_run_locally():
    """The agent plans locally within its short timeout, with the scheduler's policy and
    config (budget guard included), and counts it; the fleet's stats count it too."""
    from disco.cluster.config import SchedulerConfig, from_dict, to_dict
    from disco.device_agents.config import FleetConfig, NetworkConfig
    from disco.device_agents.fleet import EmulatedFleet

    config = to_dict(from_dict(SchedulerConfig, SCHED))
    planner = ActorPlanner(_FakeActor(None, hang=True, config=config), config=config)
    fleet = EmulatedFleet(
        FleetConfig(devices=2, time_scale=0.02, planner_timeout_ms=50,
                    network=NetworkConfig(rtt_ms=1, jitter_ms=0)),
        planner=planner,
    )  # fmt: skip
    agent = fleet.agent("emu-0")
    assert agent.fallback is planner.fallback
    t0 = asyncio.get_running_loop().time()
    ex = await agent.start(GenerationRequest("word " * 40, 4))
    assert asyncio.get_running_loop().time() - t0 < 0.5  # one short timeout, not seconds
    # The scheduler's policy, with its budget guard: nothing seen yet, so no server start (a
    # race, the old fallback, would start it and spend the whole prompt on the server).
    assert ex.plan.policy == "disco" and ex.plan.server_start is None
    await ex.collect()
    assert agent.metrics.planner_fallbacks == 1 and fleet.stats()["planner_fallbacks"] == 1
    assert "disco_fleet_planner_fallbacks_total" in fleet.metrics_text()


async def test_the_fallback_follows_the_schedulers_config():
    actor = _FakeActor(None, config=dict(SCHED))
    planner = ActorPlanner(actor, refresh_s=0.0)
    assert planner.fallback.local is None  # nothing known yet: it would race
    await planner.refresh()
    assert planner.fallback.local.policy.config.budget == 0.5
    actor.config_dict = dict(SCHED, policy="server-only", budget=0.2)  # reconfigured
    await planner.refresh()
    assert planner.fallback.local.policy.name == "server-only"
    assert planner.fallback.local.policy.config.budget == 0.2
    actor.config_dict = dict(SCHED, policy="no-such-policy")
    await planner.refresh()  # a config it cannot run keeps the last one
    assert planner.fallback.local.policy.name == "server-only"
    assert planner.stats.config_refreshes == 3


async def test_plans_refresh_the_config_in_the_background():
    core = SchedulerCore(_policy(), Regime.SERVER_CONSTRAINED)
    actor = _FakeActor(core, config=dict(SCHED))
    planner = ActorPlanner(actor, refresh_s=3600.0)
    await planner.plan(Request("a", 0.0, 10))
    await asyncio.gather(*actor.config.sent)
    await planner.plan(Request("b", 0.0, 10))
    assert actor.config.calls == 1  # at most once per refresh_s
    assert planner.fallback.config["policy"] == "disco"


def test_wire_round_trip():
    from disco.scheduler.types import EndpointKind, MigrationRule, Plan

    r = Request("x", 1.5, 12, 30, "dev", 0.4)
    assert wire.request_from(wire.request_to(r)) == r
    rule = MigrationRule(EndpointKind.DEVICE, EndpointKind.SERVER)
    for p in (Plan("x", 0.0, None), Plan("y", None, 0.2, False, rule, "disco")):
        assert wire.plan_from(wire.plan_to(p)) == p


class _GatedStore:
    """A store whose writes block their thread until the test opens the gate."""

    def __init__(self, fail_first: bool = False) -> None:
        self.blobs: list[bytes] = []
        self.started = threading.Event()
        self.gate = threading.Event()
        self.fail_first = fail_first
        self.threads: set[str] = set()

    def save(self, blob: bytes) -> None:
        self.threads.add(threading.current_thread().name)
        self.started.set()
        assert self.gate.wait(10), "the test never opened the gate"
        if self.fail_first:
            self.fail_first = False
            raise OSError("disk full")
        self.blobs.append(blob)


async def _until(cond, what: str) -> None:
    for _ in range(2000):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


async def test_checkpoint_writes_do_not_block_plans():
    core = SchedulerCore(_policy(), Regime.SERVER_CONSTRAINED)
    store = _GatedStore()
    ckpt = Checkpointer(store, core.snapshot, interval_s=0.0)
    core.observe_many([_outcome(0)])
    ckpt.touch()
    await _until(store.started.is_set, "the write to start")
    # The write is blocked on its thread; the event loop still answers plans meanwhile.
    plans = core.plan_many([Request(f"r{i}", 0.0, 10) for i in range(50)], now=0.0)
    assert len(plans) == 50 and store.blobs == [] and ckpt.writes == 0
    assert threading.current_thread().name not in store.threads
    store.gate.set()
    await _until(lambda: ckpt.writes == 1, "the write to finish")
    assert pickle.loads(store.blobs[0])["ledger"].requests == 1
    ckpt.close()


async def test_changes_during_a_write_are_coalesced_into_the_newest_snapshot():
    core = SchedulerCore(_policy(), Regime.SERVER_CONSTRAINED)
    store = _GatedStore()
    ckpt = Checkpointer(store, core.snapshot, interval_s=0.0)
    ckpt.touch()
    await _until(store.started.is_set, "the first write to start")
    for i in range(5):  # five reports while the first write is in flight
        core.observe_many([_outcome(i)])
        ckpt.touch()
    store.gate.set()
    await ckpt.flush()
    # The first write, then one with the newest state (the flush finds nothing newer to add).
    ledgers = [pickle.loads(b)["ledger"].requests for b in store.blobs]
    assert ledgers[:2] == [0, 5] and ledgers[-1] == 5 and ckpt.writes == len(ledgers) <= 3
    ckpt.close()


async def test_a_failed_checkpoint_is_counted_and_retried():
    core = SchedulerCore(_policy(), Regime.SERVER_CONSTRAINED)
    store = _GatedStore(fail_first=True)
    store.gate.set()
    ckpt = Checkpointer(store, core.snapshot, interval_s=0.01)
    core.observe_many([_outcome(0)])
    ckpt.touch()
    await _until(lambda: ckpt.writes == 1, "the retry")
    assert ckpt.errors == 1 and ckpt.stats()["checkpoints"] == 1
    assert pickle.loads(store.blobs[-1])["ledger"].requests == 1
    ckpt.close()


def test_flush_after_a_write_finished_unseen_does_not_spin():
    """A write that is done while its done-callback still waits in the loop's queue (the task
    that flushes woke up in the same loop iteration): flush must yield to let it run. It used to
    spin on the done future and freeze the scheduler actor (seen in a CI run)."""

    async def scenario() -> None:
        core = SchedulerCore(_policy(), Regime.SERVER_CONSTRAINED)
        store = _GatedStore()
        store.gate.set()
        ckpt = Checkpointer(store, core.snapshot, interval_s=0.0)
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        ckpt._writing = done
        done.add_done_callback(ckpt._written)  # queued with call_soon, not run yet
        await ckpt.flush()
        assert ckpt.writes == 2  # the one that had ended, then the flush's own
        ckpt.close()

    # On its own thread and loop: a spinning flush never yields, so only a join can time out.
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(scenario())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "flush spun on a finished write"
    assert not errors, errors
