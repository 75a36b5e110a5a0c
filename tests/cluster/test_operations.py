"""Operating a running testbed: ``disco status`` finds its scheduler, replicas, fleets and agents
(and standalone agents' heartbeats), the scheduler's ``reconfigure`` reports what changed, and
``disco down`` removes exactly the testbed. One small local testbed for the module: two fleet
actors, an agent actor on the emulated device engine, one emulated server replica."""

from __future__ import annotations

import pytest
from needs import require

ray = require("ray")
serve = require("ray.serve")

from disco.cluster.commands import down, status  # noqa: E402
from disco.cluster.config import (  # noqa: E402
    AgentConfig,
    FleetConfig,
    NetworkConfig,
    RayConfig,
    SchedulerConfig,
    ServerConfig,
    TestbedConfig,
    to_dict,
)
from disco.cluster.runtime import Testbed  # noqa: E402

NS, SCHED = "disco-ops", "ops-scheduler"


@pytest.fixture(scope="module")
def testbed():
    cfg = TestbedConfig(
        ray=RayConfig(num_cpus=4, namespace=NS),
        server=ServerConfig(engine="emulated", num_cpus=0.1,
                            engine_kwargs={"profile": "gpt-4o-mini", "time_scale": 0.02}),
        scheduler=SchedulerConfig(policy="race", actor_name=SCHED, budget=0.4),
        fleet=FleetConfig(devices=3, devices_per_actor=2, time_scale=0.02, server="handle",
                          network=NetworkConfig(rtt_ms=2, jitter_ms=0, distribution="constant")),
        agent=AgentConfig(enabled=True, engine="emulated", num_cpus=0.1,
                          engine_kwargs={"profile": "xiaomi14-qwen0.5b", "kind": "device",
                                         "time_scale": 0.02}),
    )  # fmt: skip
    tb = Testbed.start(cfg)
    try:
        yield tb
    finally:
        tb.shutdown()


def test_status_shows_the_scheduler_replicas_fleets_and_agents(testbed):
    fleet = testbed.fleets[0]
    dev = ray.get(fleet.device_ids.remote())[0]
    out = ray.get(fleet.generate_many.remote([{"device_id": dev, "prompt": "hi there",
                                               "max_tokens": 4}] * 5), timeout=120)  # fmt: skip
    assert all(o["error"] is None for o in out)
    ray.get(testbed.agent.generate.remote("hello", 3), timeout=120)
    # A standalone `disco agent --scheduler` beats with its counters (any extra fields shown)
    ray.get(testbed.scheduler.register.remote({
        "id": "phone-9", "kind": "agent", "devices": 1, "url": "http://10.0.0.9:8080",
        "metrics": {"requests": 5, "planner_fallbacks": 2, "device_waiting": 3,
                    "device_saturated": True, "failed": 0},
    }))  # fmt: skip

    report = status.collect(NS, SCHED, sample_s=0.3)
    s = report["scheduler"]
    assert s["name"] == SCHED and s["namespace"] == NS and s["policy"] == "race"
    assert s["budget"]["target"] == pytest.approx(0.4) and s["plans"] >= 6
    assert s["plans_per_s"] is not None and s["config_version"] == 1
    [app] = report["server_apps"]
    assert app["name"] == testbed.config.server.app_name and app["status"] == "RUNNING"
    assert len(app["replicas"]) == 1 and app["replicas"][0]["ongoing"] == 0
    by_id = {d["id"]: d for d in report["devices"]}
    assert by_id["fleet0"]["kind"] == "fleet" and by_id["fleet0"]["devices"] == 2
    assert by_id["fleet1"]["devices"] == 1 and by_id["fleet0"]["live"]
    assert by_id["fleet0"]["metrics"]["requests"] == 5
    assert by_id["agent-0"]["kind"] == "agent-actor" and by_id["agent-0"]["live"]
    assert by_id["agent-0"]["metrics"]["requests"] == 1
    assert by_id["phone-9"]["seen_s_ago"] < 60 and report["planner_fallbacks"] >= 2

    text = status.render(report | {"address": "local"})
    assert "policy       race" in text and "b = 0.4" in text and "phone-9" in text
    assert "device_saturated=yes device_waiting=3" in text  # read generically
    assert status.device_load({"device_queue": 0, "saturated": False}) == "-"


def test_reconfigure_reports_what_changed_and_keeps_creation_keys(testbed):
    actor = testbed.scheduler
    cfg = testbed.config.scheduler
    same = ray.get(actor.reconfigure.remote(to_dict(cfg)))
    assert same["changed"] == {} and same["kept"] == {}
    v = same["version"]
    res = ray.get(actor.reconfigure.remote(to_dict(cfg) | {"budget": 0.7, "num_cpus": 0.5,
                                                           "server_profile": "command"}))  # fmt: skip
    assert res["changed"] == {"budget": [0.4, 0.7], "server_profile": ["gpt-4o-mini", "command"]}
    assert res["kept"] == {"num_cpus": [0.0, 0.5]} and res["version"] == v + 1
    st = ray.get(actor.status.remote())
    assert st["budget"]["target"] == 0.7 and st["config"]["num_cpus"] == 0.0
    assert st["config_version"] == v + 1
    ray.get(actor.reconfigure.remote(to_dict(cfg)))  # back, for the tests after this one


def test_down_removes_exactly_the_testbed_and_is_idempotent(testbed):
    from disco.cluster.scheduler_actor import SchedulerActor

    # Not the testbed's: a name that only looks like its actors', and its scheduler's name in
    # another namespace.
    cls = ray.remote(SchedulerActor)
    bystanders = [
        cls.options(name=name, namespace=ns).remote(
            to_dict(SchedulerConfig(policy="race", actor_name=name, checkpoint="none"))
        )
        for name, ns in ((f"{SCHED}-fleet0", NS), (SCHED, "elsewhere"))
    ]
    try:
        removed, left = down.take_down(NS, SCHED)
        text = "\n".join(removed)
        assert text.count("fleet actor ops-scheduler.fleet") == 2
        assert "agent actor ops-scheduler.agent.agent-0." in text
        assert f"scheduler actor {SCHED!r} and its budget checkpoint" in text
        assert f"server app {testbed.config.server.app_name!r}" in text
        assert left == ["agent phone-9 (http://10.0.0.9:8080, pid ?)"]
        assert all(ray.get([b.ping.remote() for b in bystanders]))  # left alone
        with pytest.raises(ValueError):
            ray.get_actor(SCHED, namespace=NS)
        assert serve.status().applications == {}
        assert down.take_down(NS, SCHED) == ([], [])
        collected = status.collect(NS, SCHED, sample_s=0)
        assert collected["scheduler"] is None and collected["devices"] == []
    finally:
        for b in bystanders:
            ray.kill(b)
