"""The emulated fleet: concurrent requests across devices, per-device profiles, failover."""

from __future__ import annotations

import asyncio
import pickle

import pytest

from disco.device_agents.config import FleetConfig, NetworkConfig
from disco.device_agents.fleet import EmulatedFleet
from disco.device_agents.local_planner import StaticPlanner
from disco.device_agents.results import read_results
from disco.scheduler.types import EndpointKind, MigrationRule

FAST = dict(
    time_scale=0.02, network=NetworkConfig(rtt_ms=1, jitter_ms=1, distribution="exponential")
)


def check_stream(d, n):
    assert d["error"] is None, d["error"]
    times = d["token_times"]
    assert len(times) == n and times == sorted(times)
    assert [e["index"] for e in d["events"]] == list(range(n))


async def test_concurrent_requests_across_devices(tmp_path):
    path = tmp_path / "results.jsonl"
    fleet = EmulatedFleet(FleetConfig(devices=12, **FAST), results_path=str(path))
    ids = fleet.device_ids()
    assert len(ids) == 12 and len(set(ids)) == 12
    jobs = [
        fleet.generate(ids[i % 12], "tell me a story " * 4, 24, with_events=True) for i in range(48)
    ]
    results = await asyncio.gather(*jobs)
    for d in results:
        check_stream(d, 24)
    stats = fleet.stats()
    assert stats["requests"] == 48 and stats["completed"] == 48 and stats["tokens"] == 48 * 24
    await fleet.close()
    rows = read_results(path)
    assert len(rows) == 48 and {r["device_id"] for r in rows} == set(ids)
    assert "disco_fleet_requests_total" in fleet.metrics_text()


async def test_devices_have_their_own_profiles():
    fleet = EmulatedFleet(
        FleetConfig(
            devices=4, profiles=("xiaomi14-qwen0.5b", "pixel7pro-bloom1.1b"), **FAST
        )
    )
    names = [a.coordinator.device_profile.name for a in fleet.agents.values()]
    assert names == ["xiaomi14-qwen0.5b", "pixel7pro-bloom1.1b"] * 2
    await fleet.close()


async def test_server_failure_fails_over_to_each_device():
    fleet = EmulatedFleet(
        FleetConfig(devices=6, server_fail_after_tokens=5, **FAST),
        planner=StaticPlanner(server_start=0.0, device_start=None),
    )
    results = await asyncio.gather(
        *[
            fleet.generate(i, "why is the sky blue", 20, with_events=True)
            for i in fleet.device_ids()
        ]
    )
    for d in results:
        check_stream(d, 20)
        assert d["token_sources"] == ["server"] * 5 + ["device"] * 15 and d["failovers"] == 1
    assert fleet.stats()["failovers"] == 6
    await fleet.close()


async def test_migration_in_the_fleet_moves_decoding_to_the_device():
    fleet = EmulatedFleet(
        FleetConfig(devices=3, **FAST),
        planner=StaticPlanner(
            0.0, None, migration=MigrationRule(EndpointKind.DEVICE, EndpointKind.SERVER)
        ),
    )
    results = await asyncio.gather(
        *[
            fleet.generate(i, "hello", 200, output_tokens=200, with_events=True)
            for i in fleet.device_ids()
        ]
    )
    for d in results:
        check_stream(d, 200)
        k = d["migrated_at"]
        assert k is not None and d["token_sources"] == ["server"] * k + ["device"] * (200 - k)
    await fleet.close()


async def test_stream_yields_dicts_in_order():
    fleet = EmulatedFleet(FleetConfig(devices=2, **FAST))
    got = [ev async for ev in fleet.stream("emu-1", "hi there", 10)]
    assert [e["index"] for e in got] == list(range(10)) and got[-1]["finish_reason"] == "length"
    await fleet.close()


def test_fleet_config_crosses_process_boundaries():
    cfg = FleetConfig(devices=3, **FAST)
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_bad_fleet_config_is_refused():
    with pytest.raises(ValueError):
        FleetConfig(devices=-1)
    with pytest.raises(ValueError):
        FleetConfig(profiles=())
    with pytest.raises(ValueError, match="planner_timeout_ms"):
        FleetConfig(planner_timeout_ms=0)
    with pytest.raises(ValueError, match="devices > 0"):
        EmulatedFleet(FleetConfig(devices=0))  # a config may have none; a fleet may not


def test_outcome_dict_round_trip():
    from disco.device_agents.results import outcome_from_dict, outcome_to_dict
    from disco.scheduler.types import RequestOutcome

    o = RequestOutcome("r", 1.0, 5, [1.5, 1.6], [EndpointKind.SERVER, EndpointKind.DEVICE],
                       first_token_from=EndpointKind.SERVER, migrated_at=1, server_started=True)  # fmt: skip
    d = outcome_to_dict(o, device_id="x")
    assert d["token_sources"] == ["server", "device"] and d["device_id"] == "x"
    assert outcome_from_dict(d) == o
