"""A snapshot plans as its policy does (before the budget guard), and survives the wire."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from disco.scheduler.policies import PolicyConfig, make_policy
from disco.scheduler.policies.example import HedgeAfter  # noqa: F401 - registers hedge-after
from disco.scheduler.profiles import DEVICE_PROFILES, SERVER_PROFILES
from disco.scheduler.simulator import SimSettings, run_scalar
from disco.scheduler.snapshot import FrozenPolicy, PolicySnapshot, WaitTable, snapshot_of
from disco.scheduler.types import DeviceQueue, Regime, Request

SERVER = SERVER_PROFILES.get("gpt-4o-mini")
DEVICE = DEVICE_PROFILES.get("xiaomi14-qwen0.5b")
CASES = [
    ("disco", Regime.SERVER_CONSTRAINED, 0.3),
    ("disco", Regime.DEVICE_CONSTRAINED, 0.3),
    ("length", Regime.SERVER_CONSTRAINED, 0.4),
    ("length", Regime.DEVICE_CONSTRAINED, 0.4),
    ("server-only", Regime.SERVER_CONSTRAINED, 0.5),
    ("device-only", Regime.DEVICE_CONSTRAINED, 0.5),
    ("race", Regime.SERVER_CONSTRAINED, 0.5),
    ("hedge-after", Regime.DEVICE_CONSTRAINED, 0.5),
    ("disco", Regime.DEVICE_CONSTRAINED, 1.0),
    ("disco", Regime.SERVER_CONSTRAINED, 0.0),
]


def fitted(name: str, regime: Regime, budget: float, world):
    """The policy after a replay of the world (fits done, the state a publish would ship)."""
    policy = make_policy(name, PolicyConfig(regime=regime, budget=budget, recompute_every=100),
                         world.server, world.device)  # fmt: skip
    run_scalar(policy, world, SimSettings())
    return policy


def requests(n: int, seed: int) -> list[Request]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        q = None
        if i % 3 == 0:
            q = DeviceQueue(running=1, waiting=int(rng.integers(0, 4)),
                            prefill_tokens=int(rng.integers(0, 3000)),
                            decode_tokens=float(rng.integers(0, 500)))  # fmt: skip
        out.append(Request(f"r{i}", 0.0, int(rng.lognormal(6.0, 1.2)) + 1, device_queue=q))
    return out


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize(("name", "regime", "budget"), CASES)
def test_snapshot_decides_as_the_policy(name, regime, budget, small_world):
    policy = fitted(name, regime, budget, small_world)
    snap = snapshot_of(policy, version=3)
    wired = PolicySnapshot.from_wire(json.loads(json.dumps(snap.to_wire())))
    for r in requests(400, seed=1):
        ss, ds = policy._decide_one(r)
        want = (float(ss[0]), float(ds[0]))
        for s in (snap, wired):
            got = s.decide(r)
            assert same(got[0], want[0]) and same(got[1], want[1]), (name, r, got, want)
    assert wired.version == 3 and wired.migration == policy.migration
    assert wired.regime is regime and wired.budget == budget


def test_disco_d_ships_its_fitted_wait_table_compactly(small_world):
    policy = fitted("disco", Regime.DEVICE_CONSTRAINED, 0.3, small_world)
    snap = snapshot_of(policy, version=1)
    assert isinstance(snap.table, WaitTable) and snap.fits > 0
    assert any(math.isfinite(w) for w in snap.table.waits)  # it hedges somewhere
    assert len(json.dumps(snap.to_wire())) < 4096
    # A hedge reserves its prompt times the chance that it fires; an immediate start all of it.
    finite = [w for w in snap.table.waits if math.isfinite(w) and w > 0]
    if finite:
        share = snap.hedge_survival(finite[0])
        assert 0.0 <= share <= 1.0
        assert snap.reserve(1000, (0.0, finite[0])) == pytest.approx(1000 * share)
    assert snap.reserve(1000, (0.0, 0.0)) == 1000.0
    assert snap.reserve(1000, (0.0, math.nan)) == 0.0


def test_a_policy_without_a_table_ships_frozen(small_world):
    policy = fitted("hedge-after", Regime.DEVICE_CONSTRAINED, 0.5, small_world)
    snap = snapshot_of(policy, version=1)
    assert isinstance(snap.table, FrozenPolicy)
    assert snap.decide(Request("x", 0.0, 100)) == (0.0, 0.5)


def test_disco_s_cold_start_races_a_busy_device():
    policy = make_policy("disco", PolicyConfig(regime=Regime.SERVER_CONSTRAINED, budget=0.3),
                         SERVER, DEVICE)  # fmt: skip
    snap = snapshot_of(policy, version=1)
    idle = Request("a", 0.0, 50)
    busy = Request("b", 0.0, 50, device_queue=DeviceQueue(running=1, waiting=2))
    assert math.isnan(snap.decide(idle)[0]) and snap.decide(busy)[0] == 0.0
    assert policy._decide_one(busy)[0][0] == 0.0


def test_random_split_keeps_its_share_per_holder():
    policy = make_policy("random", PolicyConfig(regime=Regime.SERVER_CONSTRAINED, budget=0.3),
                         SERVER, DEVICE)  # fmt: skip
    snap = snapshot_of(policy, version=1)
    raced = sum(snap.decide(Request(f"r{i}", 0.0, 100))[0] == 0.0 for i in range(4000))
    assert abs(raced / 4000 - 0.3) < 0.03
