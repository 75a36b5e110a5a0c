"""The device side's construction rules and Ray start-up, without starting Ray."""

from __future__ import annotations

import pytest
from needs import require

ray = require("ray")

from disco.cluster import device_actors  # noqa: E402
from disco.cluster.config import (  # noqa: E402
    AgentConfig,
    FleetConfig,
    RayConfig,
    SchedulerConfig,
    TestbedConfig,
    to_dict,
)
from disco.cluster.runtime import connect_ray  # noqa: E402

URL = "http://127.0.0.1:9/unused"
SCHED = to_dict(SchedulerConfig())


def _fleet(server: str, handle=None) -> device_actors.FleetActor:
    fleet = to_dict(FleetConfig(devices=2, server=server))
    return device_actors.FleetActor(
        fleet, 0, 2, SCHED, URL, "disco-server", None, server_handle=handle
    )


def test_fleet_set_to_reach_the_server_by_handle_refuses_to_start_without_one():
    # It used to fall back to its own emulated server without a word.
    with pytest.raises(ValueError, match=r"fleet\.server is 'handle' but no Serve"):
        _fleet("handle")


async def test_fleet_without_a_handle_starts_when_not_set_to_use_one():
    for server in ("http", "emulated"):
        actor = _fleet(server)
        assert len(actor.device_ids()) == 2
        await actor.close()


def test_start_fleets_and_start_agent_refuse_a_missing_handle_before_starting_actors():
    cfg = TestbedConfig(fleet=FleetConfig(devices=3), agent=AgentConfig(enabled=True))
    with pytest.raises(ValueError, match=r"fleet\.server is 'handle'"):
        device_actors.start_fleets(cfg, URL, None)
    with pytest.raises(ValueError, match=r"agent\.server is 'handle'"):
        device_actors.start_agent(cfg, URL, None)


def test_device_agent_set_to_reach_the_server_by_handle_refuses_to_start_without_one():
    with pytest.raises(ValueError, match=r"agent\.server is 'handle' but no Serve"):
        device_actors.DeviceAgentActor(
            to_dict(AgentConfig(engine="emulated")), URL, "disco-server", SCHED, None,
        )  # fmt: skip


@pytest.fixture
def fake_ray(monkeypatch):
    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls, monkeypatch


def test_connect_ray_without_an_address_starts_a_local_ray(fake_ray):
    calls, _ = fake_ray
    cfg = TestbedConfig(ray=RayConfig(num_cpus=3, include_dashboard=False, namespace="ns"))
    assert connect_ray(cfg) is True
    # "local": never joins a Ray cluster someone else started on this machine
    assert calls == [{"address": "local", "num_cpus": 3, "include_dashboard": False,
                      "namespace": "ns", "log_to_driver": False}]  # fmt: skip


@pytest.mark.parametrize("where", ["config", "env"])
def test_connect_ray_joins_the_configured_cluster(fake_ray, where):
    calls, monkeypatch = fake_ray
    if where == "env":
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
        cfg = TestbedConfig(ray=RayConfig(namespace="ns"))
    else:
        cfg = TestbedConfig(ray=RayConfig(address="10.0.0.1:6379", namespace="ns"))
    assert connect_ray(cfg) is True
    assert calls == [{"address": "10.0.0.1:6379", "namespace": "ns", "log_to_driver": False}]
