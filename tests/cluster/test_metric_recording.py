"""The live metrics (cluster/metrics.py) without Ray: what the scheduler actor and a server
replica record, read back from a fake registry in place of ``ray.util.metrics``, how often, and
the Grafana dashboard's expressions against the metrics the code defines.

The same series scraped from a real Ray's Prometheus endpoint: tests/cluster/test_ray_metrics.py.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
from needs import require

require("ray")
require("fastapi")

from disco.cluster import metrics as m  # noqa: E402
from disco.cluster.config import SchedulerConfig, ServerConfig, to_dict  # noqa: E402
from disco.scheduler.types import EndpointKind, Request, RequestOutcome  # noqa: E402

DASHBOARD = Path(__file__).resolve().parents[2] / "cluster" / "deploy" / "grafana-disco.json"


class FakeMetric:
    """Stands in for a ray.util.metrics object: checks tags as Ray does (every tag key given,
    string values) and keeps the value per tag set."""

    def __init__(self, d: m.MetricDef) -> None:
        self.d = d
        self.values: dict[tuple, float] = {}
        self.calls = 0

    def _key(self, tags: dict) -> tuple:
        assert set(tags) == set(self.d.tag_keys), (self.d.name, tags)
        assert all(isinstance(v, str) for v in tags.values()), tags
        return tuple(sorted(tags.items()))

    def set(self, value: float, tags: dict) -> None:
        assert self.d.kind == "gauge"
        self.calls += 1
        self.values[self._key(tags)] = value

    def inc(self, value: float, tags: dict) -> None:
        assert self.d.kind == "counter" and value > 0
        self.calls += 1
        k = self._key(tags)
        self.values[k] = self.values.get(k, 0.0) + value


class FakeRegistry:
    def __init__(self) -> None:
        self.metrics: dict[str, FakeMetric] = {}

    def __call__(self, d: m.MetricDef) -> FakeMetric:
        return self.metrics.setdefault(d.name, FakeMetric(d))

    def value(self, name: str, **tags: str) -> float | None:
        for key, v in self.metrics[name].values.items():
            if all(dict(key).get(k) == t for k, t in tags.items()):
                return v
        return None


def test_every_metric_is_named_disco_with_a_description_and_exports_as_ray_does():
    assert len(m.METRICS) == len(m.SCHEDULER_METRICS) + len(m.REPLICA_METRICS)
    for name, d in m.METRICS.items():
        assert re.fullmatch(r"disco_(scheduler|replica)_[a-z0-9_]+", name), name
        assert d.kind in ("counter", "gauge", "histogram") and d.description
        assert not name.endswith("_total")  # Ray adds it to counters
        exported = m.exported_name(name)
        assert exported == f"ray_{name}" + ("_total" if d.kind == "counter" else "")
        assert m.defined_metric(exported) == name
    assert all("scheduler" in d.tag_keys for d in m.SCHEDULER_METRICS)
    assert all({"deployment", "replica"} <= set(d.tag_keys) for d in m.REPLICA_METRICS)
    assert m.defined_metric("ray_disco_scheduler_plans") is None  # a counter needs _total
    assert m.defined_metric("ray_disco_scheduler_devices_total") is None  # a gauge has none
    assert m.defined_metric("ray_disco_nothing") is None


def _outcome(i: int, device: int) -> RequestOutcome:
    return RequestOutcome(request_id=f"r{i}", arrival=0.0, prompt_tokens=100,
                          server_prompt_tokens=100, device_prompt_tokens=device,
                          first_token_from=EndpointKind.SERVER,
                          migrated_at=5 if i == 0 else None)  # fmt: skip


async def test_the_scheduler_actor_records_its_budget_plans_version_and_registry():
    from disco.cluster.scheduler_actor import SchedulerActor

    cfg = SchedulerConfig(policy="disco", regime="device", budget=0.3, checkpoint="none",
                          actor_name="sched-a")  # fmt: skip
    actor = SchedulerActor(to_dict(cfg))
    reg = FakeRegistry()
    actor.metrics = m.scheduler_sampler(actor, reg)
    actor.metrics.interval_s = 0.0  # every touch records (the actor's own: at most 1/s)
    await actor.plan_many([Request(f"q{i}", 0.0, 50) for i in range(4)])
    await actor.report_many([_outcome(0, 100), _outcome(1, 0), _outcome(2, 50)])
    await actor.register({"id": "agent-0", "kind": "agent", "devices": 1,
                          "metrics": {"planner_fallbacks": 3}})  # fmt: skip
    await actor.register({"id": "fleet-0", "kind": "fleet", "devices": 12})
    s = {"scheduler": "sched-a"}
    assert reg.value("disco_scheduler_budget_target", **s, regime="device") == 0.3
    assert reg.value("disco_scheduler_budget_spent_share", regime="device") == pytest.approx(0.5)
    assert reg.value("disco_scheduler_budget_spent_share", regime="server") == pytest.approx(1.0)
    assert reg.value("disco_scheduler_prompt_tokens") == 300
    assert reg.value("disco_scheduler_prefill_tokens", endpoint="device") == 150
    assert reg.value("disco_scheduler_prefill_tokens", endpoint="server") == 300
    assert reg.value("disco_scheduler_plans") == 4
    assert reg.value("disco_scheduler_outcomes") == 3
    assert reg.value("disco_scheduler_migrations") == 1
    assert reg.value("disco_scheduler_outcome_errors") is None  # never incremented by 0
    assert reg.value("disco_scheduler_config_version") == 1
    assert reg.value("disco_scheduler_policy_info", policy="disco", regime="device",
                     migration="true") == 1  # fmt: skip
    assert reg.value("disco_scheduler_planner_fallbacks") == 3
    assert reg.value("disco_scheduler_devices", kind="agent") == 1
    assert reg.value("disco_scheduler_devices", kind="fleet") == 12
    assert reg.value("disco_scheduler_registry_entries", kind="fleet") == 1

    # A reconfigure (new policy and budget) and an agent that leaves, at the next record.
    await actor.reconfigure(to_dict(cfg) | {"policy": "server-only", "budget": 0.5})
    await actor.unregister("agent-0")
    await actor.plan_many([Request("q9", 0.0, 50)])
    assert reg.value("disco_scheduler_config_version") == 2
    assert reg.value("disco_scheduler_budget_target", regime="device") == 0.5
    assert reg.value("disco_scheduler_policy_info", policy="disco") == 0
    assert reg.value("disco_scheduler_policy_info", policy="server-only") == 1
    assert reg.value("disco_scheduler_devices", kind="agent") == 0
    assert reg.value("disco_scheduler_planner_fallbacks") == 0
    assert reg.value("disco_scheduler_plans") == 5  # counters grow by the difference
    actor.metrics.close()


async def test_the_sampler_records_at_most_once_per_interval_and_catches_up():
    now = [0.0]
    calls: list[float] = []
    busy = [False]
    s = m.Sampler(lambda: calls.append(now[0]), interval_s=0.05, busy=lambda: busy[0],
                  clock=lambda: now[0])  # fmt: skip
    s.touch()
    s.touch()
    s.touch()
    assert calls == [0.0]  # the first at once, the others wait for the timer
    now[0] = 0.05
    await asyncio.sleep(0.2)
    assert calls == [0.0, 0.05]  # one trailing record for all of them
    busy[0] = True  # periodic while busy
    now[0] = 1.0
    s.touch()
    await asyncio.sleep(0.18)
    assert len(calls) >= 4
    busy[0] = False
    await asyncio.sleep(0.12)
    n = len(calls)
    await asyncio.sleep(0.12)
    assert len(calls) == n  # stopped once idle
    s.close()


def test_a_failing_recorder_never_raises_into_the_actor(caplog):
    class Broken(FakeRegistry):
        def __call__(self, d):
            obj = super().__call__(d)
            obj.set = obj.inc = lambda *a, **k: 1 / 0
            return obj

    rec = m.ReplicaMetrics("r1", "emulated", Broken())
    rec.record(1, 1, {})
    rec.record(1, 2, {})
    assert sum("failed" in r.message for r in caplog.records) == 1  # logged once


def _replica(**engine_kwargs):
    from disco.cluster.serve_app import DiscoServer

    cls = DiscoServer.func_or_class.__mro__[1]  # the user class under @serve.ingress

    class Local(cls):
        def __del__(self) -> None:
            pass

    return Local(asdict(ServerConfig(engine="emulated", engine_kwargs=engine_kwargs)))


async def test_a_batching_replica_records_streams_queue_running_and_kv():
    rep = _replica(preset="llama3-8b-a10g", time_scale=0.05)
    reg = FakeRegistry()
    rep._metrics = m.replica_sampler(rep, reg)
    rep._metrics.interval_s = 0.0
    tags = {"replica": rep.replica_id}

    async def one(n: int) -> list:
        return [c async for c in rep.generate({"prompt": "hello " * 50, "max_tokens": n})]

    long = asyncio.create_task(one(400))
    while reg.value("disco_replica_running", **tags) != 1:  # the batch clock admits it
        await asyncio.sleep(0.01)
        rep._metrics.touch()
    assert reg.value("disco_replica_open_streams", **tags) == 1
    assert reg.value("disco_replica_kv_used_tokens", **tags) > 50
    assert 0 < reg.value("disco_replica_kv_usage", **tags) < 1
    assert reg.value("disco_replica_queue", **tags) == 0
    short = await asyncio.gather(*(one(5) for _ in range(3)))
    assert all(len(c) == 5 for c in short)
    long.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long
    rep._metrics.touch()
    assert reg.value("disco_replica_streams", **tags) == 4
    assert reg.value("disco_replica_open_streams", **tags) == 0
    assert reg.value("disco_replica_generated_tokens", **tags) >= 15
    assert reg.value("disco_replica_streams", engine="emulated") == 4
    rep._metrics.close()
    await rep.engine.close()


# ---- the Grafana dashboard ----------------------------------------------------------------------


def _exprs(dash: dict) -> list[str]:
    out = []
    for panel in dash["panels"]:
        out += [t["expr"] for t in panel.get("targets", []) if "expr" in t]
        for sub in panel.get("panels", []):
            out += [t["expr"] for t in sub.get("targets", []) if "expr" in t]
    return out


def test_the_grafana_dashboard_is_valid_and_names_only_defined_metrics():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"] and dash["schemaVersion"] >= 30
    templ = {v["name"]: v for v in dash["templating"]["list"]}
    assert templ["datasource"]["type"] == "datasource"
    assert templ["datasource"]["query"] == "prometheus"
    exprs = _exprs(dash)
    assert len(exprs) >= 10
    for panel in dash["panels"]:
        if panel.get("type") != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel.get("targets"), panel["title"]
    used = set()
    for e in exprs:
        for series in re.findall(r"\b(?:ray_)?disco_[a-z0-9_]+", e):
            assert series.startswith("ray_"), f"{series}: Ray exports it as ray_{series}"
            name = m.defined_metric(series)
            assert name is not None, f"{series} in {e!r} is no metric cluster/metrics.py defines"
            used.add(name)
    # What the issue asks the dashboard to show.
    for name in ("disco_scheduler_budget_spent_share", "disco_scheduler_budget_target",
                 "disco_scheduler_plans", "disco_scheduler_planner_fallbacks",
                 "disco_replica_queue", "disco_replica_running", "disco_replica_kv_usage"):  # fmt: skip
        assert name in used, name
    assert any("ray_serve_" in e and "latency" in e for e in exprs)  # Serve's own beside them
