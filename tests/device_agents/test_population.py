"""The emulated device population (issue 11): arrivals, the tick release, outcomes, budget.

Most tests step a population on a virtual clock with an in-process planner (snapshot mode needs
no event loop); one runs central mode on a real loop for a second. No timing is asserted.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from disco.device_agents.population import (
    Arrivals,
    Hist,
    Population,
    PopulationConfig,
    count_due,
    due_times,
    merge_wire,
    summarize,
    timelines,
)
from disco.device_agents.snapshot_planner import SnapshotPlanner, pending_totals
from disco.scheduler.migration import MigrationConfig
from disco.scheduler.policies import PolicyConfig, make_policy
from disco.scheduler.profiles import DEVICE_PROFILES, SERVER_PROFILES
from disco.scheduler.simulator import SimSettings, World, simulate_request
from disco.scheduler.snapshot import snapshot_of
from disco.scheduler.types import EndpointKind, MigrationRule, Plan, Regime

SERVER = SERVER_PROFILES.get("gpt-4o-mini")
XIAOMI = DEVICE_PROFILES.get("xiaomi14-qwen0.5b")
PIXEL = DEVICE_PROFILES.get("pixel7pro-bloom1.1b")
MIGRATE = MigrationRule(EndpointKind.DEVICE, EndpointKind.SERVER)


class FakePlanner:
    """Plans with ``choose(request) -> (server_start, device_start)``; keeps every plan and
    report."""

    def __init__(self, choose=None, migration=None) -> None:
        self.choose = choose or (lambda r: (0.0, 0.0))
        self.migration = migration
        self.plans: dict[str, Plan] = {}
        self.reports: list = []

    def plan_now(self, request):
        s, d = self.choose(request)
        plan = Plan(request.id, s, d, True, self.migration, "fake")
        assert request.id not in self.plans
        self.plans[request.id] = plan
        return plan

    def report_now(self, outcome) -> None:
        self.reports.append(outcome)


def small(**kw) -> PopulationConfig:
    base = dict(devices=500, rate_per_device=0.04, prompt="lognormal", prompt_median=200,
                output_min=20, output_max=60, seed=3)  # fmt: skip
    return PopulationConfig(**(base | kw))


def drive(pop: Population, seconds: float, tick: float = 0.005, drain: float = 60.0) -> list:
    """Step on a virtual clock: ``seconds`` of arrivals, then until every stream ended;
    returns the tick times."""
    t, ticks = 0.0, []
    pop.begin(0.0)
    while t < seconds:
        pop.step(t)
        ticks.append(t)
        t += tick
    pop._stopped_arrivals = True
    end = t + drain
    while pop.in_flight and t < end:
        pop.step(t)
        ticks.append(t)
        t += tick
    return ticks


# ---- arrivals ----------------------------------------------------------------------------------


def test_arrivals_are_reproducible_per_seed_whatever_the_ticks():
    rates = np.random.default_rng(0).lognormal(0, 1, 1000) * 0.05
    a, b, c = (Arrivals(rates, (), seed=s, chunk=64) for s in (7, 7, 8))
    ta, da = a.until(30.0)
    parts = [b.until(t) for t in np.arange(0.0, 30.0, 0.37)] + [b.until(30.0)]
    tb = np.concatenate([p[0] for p in parts])
    db = np.concatenate([p[1] for p in parts])
    assert np.array_equal(ta, tb) and np.array_equal(da, db)
    assert np.all(np.diff(ta) >= 0) and ta.size and ta[-1] <= 30.0
    tc, _ = c.until(30.0)
    assert not (tc.size == ta.size and np.allclose(tc, ta))


def test_the_superposition_has_the_total_rate_and_picks_devices_by_rate():
    rates = np.array([1.0, 2.0, 3.0, 4.0])  # total 10/s
    t, d = Arrivals(rates, (), seed=0).until(2000.0)
    n = t.size
    assert abs(n - 20_000) < 5 * math.sqrt(20_000)
    share = np.bincount(d, minlength=4) / n
    assert np.allclose(share, rates / rates.sum(), atol=0.0175)  # 5 sigma
    gaps = np.diff(t)
    assert abs(gaps.mean() - 0.1) < 0.005 and abs(gaps.std() / gaps.mean() - 1.0) < 0.05


def test_a_burst_phase_multiplies_the_rate():
    arr = Arrivals(np.full(100, 0.1), ((100.0, 200.0, 10.0),), seed=2)  # 10/s, 100/s in the burst
    t, _ = arr.until(300.0)
    before = np.sum(t < 100)
    during = np.sum((t >= 100) & (t < 200))
    after = np.sum(t >= 200)
    assert abs(before - 1000) < 5 * math.sqrt(1000) and abs(after - 1000) < 5 * math.sqrt(1000)
    assert abs(during - 10_000) < 5 * math.sqrt(10_000)
    assert arr.rate_at(150.0) == pytest.approx(100.0) and arr.rate_at(50.0) == pytest.approx(10.0)


def test_heterogeneous_rates_keep_the_mean():
    pop = Population(small(devices=20_000, rate_per_device=0.001, rate_sigma=1.0), FakePlanner())
    r = pop.devices.rate
    assert r.mean() == pytest.approx(0.001, rel=0.05) and r.std() / r.mean() > 0.9
    assert set(np.unique(pop.devices.profile)) == {0, 1}  # round-robin over two profiles
    assert np.median(pop.devices.server_rtt_s) == pytest.approx(0.040, rel=0.05)


# ---- the timeline model --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "starts,rule",
    [((0.0, 0.0), None), ((0.0, 0.0), MIGRATE), ((None, 0.0), None), ((0.0, None), None),
     ((0.0, 0.4), None), ((0.3, 0.0), MIGRATE)],
)  # fmt: skip
def test_timelines_are_the_core_simulators(starts, rule):
    rng = np.random.default_rng(4)
    n = 40
    prompt = np.round(rng.lognormal(6, 0.8, n)).clip(1, 4000)
    output = rng.integers(20, 400, n)
    ts, tsm = SERVER.sample_ttft(rng, prompt), SERVER.sample_ttft(rng, prompt)
    world = World(np.zeros(n), prompt, output, ts, tsm, np.asarray(XIAOMI.ttft(prompt)), SERVER,
                  XIAOMI)  # fmt: skip
    plans = [Plan(str(i), starts[0], starts[1], True, rule) for i in range(n)]
    tl = timelines(plans, prompt, output, ts, tsm, np.zeros(n, int), SERVER, [XIAOMI], 300.0,
                   MigrationConfig())  # fmt: skip
    for i in range(n):
        o = simulate_request(world, i, plans[i], np.array([300.0]), SimSettings())
        due = due_times(tl.t0[i], int(tl.n[i]), int(tl.k[i]), tl.gw[i], tl.gt[i])
        assert np.allclose(due, o.token_times)
        assert tl.server_prompt[i] == o.server_prompt_tokens
        assert tl.device_prompt[i] == o.device_prompt_tokens
        assert tl.server_output[i] + tl.device_output[i] == output[i]
        assert bool(tl.started_s[i]) == o.server_started and bool(tl.migrated[i]) == (
            o.migrated_at is not None
        )


def test_count_due_counts_the_due_times():
    rng = np.random.default_rng(5)
    for _ in range(200):
        n = int(rng.integers(1, 60))
        k = int(rng.integers(0, n + 1))
        t0, gw, gt = rng.uniform(0.05, 3), rng.uniform(0.005, 0.1), rng.uniform(0.005, 0.1)
        due = due_times(t0, n, k, gw, gt)
        for rel in rng.uniform(0, due[-1] + 1, 5):
            c = count_due(np.array([rel]), np.array([t0]), np.array([k]), np.array([n]),
                          np.array([gw]), np.array([gt]))  # fmt: skip
            assert int(c[0]) == int(np.sum(due <= rel + 1e-12)), (n, k, rel)


# ---- the population on a virtual clock ------------------------------------------------------------


def test_every_request_is_planned_once_and_reported_once_with_all_its_tokens_in_order():
    planner = FakePlanner(lambda r: (0.0, 0.0) if r.prompt_tokens > 200 else (None, 0.0), MIGRATE)
    seen: list = []
    pop = Population(small(), planner)
    pop.on_outcome = seen.append
    ticks = np.asarray(drive(pop, 40.0))  # past 4,096 ticks: the tick history is trimmed
    assert pop._ticks.size <= 8192
    c = pop.c
    assert c.arrivals > 200 and c.arrivals == c.planned == c.completed == c.reported
    assert len(planner.reports) == c.arrivals == len(planner.plans)
    assert {o.request_id for o in planner.reports} == set(planner.plans)
    assert pop.in_flight == 0 and pop.active == 0
    total = 0
    for o in planner.reports:
        times = np.asarray(o.token_times)
        n = o.server_output_tokens + o.device_output_tokens
        assert 20 <= n <= 60 and times.size == n == len(o.token_sources)
        assert np.all(np.diff(times) >= 0)  # in order
        assert np.all(np.isin(times, ticks))  # each token's time is the tick that released it
        assert o.ttft is not None and o.ttft > 0
        total += n
    assert c.tokens == total
    s = summarize([pop.stats()])
    assert s["timing_ms"]["n"] == total  # every token's timing error measured
    # ticks every 5 ms on a virtual clock: a token is out within one tick of its due time
    assert pop.timing.min >= -1e-9 and s["timing_ms"]["max"] <= 5.0 + 1e-6
    assert s["plan_overhead_ms"]["n"] == c.arrivals
    assert seen == planner.reports
    assert any(o.migrated_at is not None for o in planner.reports)


def test_local_budget_accounting_matches_the_outcomes():
    # server-constrained: the server prefills only prompts above 200 tokens (and races them)
    planner = FakePlanner(lambda r: (0.0, 0.0) if r.prompt_tokens > 200 else (None, 0.0))
    pop = Population(small(seed=9), planner)
    drive(pop, 15.0)
    outs = planner.reports
    prompt = sum(o.prompt_tokens for o in outs)
    server = sum(o.server_prompt_tokens for o in outs)
    want = sum(o.prompt_tokens for o in outs if o.prompt_tokens > 200)
    assert server == want and 0.2 < want / prompt < 0.9
    st = pop.stats()
    assert st["budget_used"] == pytest.approx(want / prompt)
    assert st["budget_used_planned"] == pytest.approx(want / prompt)  # everything completed
    assert st["counters"]["server_prompt_tokens"] == server
    # device-constrained count: the device prefills every prompt here (always started at 0)
    pop_d = Population(small(seed=9, regime="device"), FakePlanner(planner.choose))
    drive(pop_d, 15.0)
    assert pop_d.stats()["budget_used"] == pytest.approx(1.0)


def test_streams_in_flight_are_user_visible_until_their_last_token():
    planner = FakePlanner(lambda r: (None, 0.0))  # device only: slow streams
    pop = Population(small(), planner)
    pop.begin(0.0)
    t = 0.0
    while t < 5.0:
        pop.step(t)
        t += 0.005
    assert pop.in_flight == pop.active > 0
    assert pop.c.arrivals == pop.c.completed + pop.in_flight
    assert pop.series and pop.series[-1]["streams"] == pytest.approx(pop.in_flight, abs=20)


def test_with_a_snapshot_planner_outcomes_reach_its_batch():
    policy = make_policy("disco", PolicyConfig(regime=Regime.SERVER_CONSTRAINED, budget=0.3),
                         SERVER, XIAOMI)  # fmt: skip
    planner = SnapshotPlanner(
        "pop0", None, devices=500, budget=0.3, snapshot=snapshot_of(policy, 1)
    )
    pop = Population(small(), planner)
    drive(pop, 10.0)
    assert pending_totals(planner).requests == pop.c.completed == pop.c.arrivals > 50
    st = pop.stats()
    assert st["planner"]["plans"] == pop.c.arrivals and st["planner"]["reports"] == pop.c.completed
    assert st["planner"]["plan_overhead_ms_p50"] > 0


# ---- central mode on a real loop ----------------------------------------------------------------


class SlowPlanner:
    """A per-request planner with a round trip of ``delay`` seconds (central mode)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.plans: list[str] = []
        self.reports: list[str] = []

    async def plan(self, request):
        await asyncio.sleep(self.delay)
        self.plans.append(request.id)
        return Plan(request.id, 0.0, 0.0, True, None, "slow")

    async def report(self, outcome):
        await asyncio.sleep(self.delay)
        self.reports.append(outcome.request_id)


async def test_central_mode_awaits_each_plan_and_reports_off_the_tick():
    planner = SlowPlanner(0.03)
    cfg = small(rate_per_device=0.1, output_min=5, output_max=10, prompt_median=50)
    pop = Population(cfg, planner, mode="central")
    await pop.run(duration_s=1.0, drain_s=20.0)
    await asyncio.wait(list(pop._tasks), timeout=5)
    c = pop.c
    assert c.arrivals > 10 and c.completed == c.arrivals == c.reported
    assert sorted(planner.plans) == sorted(planner.reports)
    assert len(set(planner.plans)) == c.arrivals
    s = summarize([pop.stats()])
    assert s["plan_overhead_ms"]["p50"] >= 30.0  # the round trip is in the overhead


# ---- histograms ---------------------------------------------------------------------------------


def test_histograms_give_percentiles_and_merge_exactly():
    rng = np.random.default_rng(6)
    x = rng.uniform(0, 0.01, 50_000)
    h1, h2 = Hist(-0.005, 1.0, 50_250), Hist(-0.005, 1.0, 50_250)
    h1.add(x[:20_000])
    for v in x[20_000:20_100]:
        h2.add1(float(v))
    h2.add(x[20_100:])
    merged = merge_wire([h1.to_wire(), None, h2.to_wire()])
    assert merged is not None and merged.n == x.size
    for q in (1, 50, 99):
        assert merged.percentile(q) == pytest.approx(np.percentile(x, q), abs=2e-5)
    lg = Hist(-7, 3, 1000, log=True)
    y = rng.lognormal(-9, 1, 10_000)
    lg.add(y)
    assert lg.percentile(50) == pytest.approx(np.median(y), rel=0.03)
    assert lg.summary(1e3)["max"] == pytest.approx(y.max() * 1e3)
