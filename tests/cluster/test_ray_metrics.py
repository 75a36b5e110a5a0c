"""The testbed's live metrics as Prometheus sees them: a local Ray whose metrics agent exports on
a known port, the scheduler actor and an emulated batching replica behind Ray Serve, a few plans,
outcomes, registrations and streams, then ``GET /metrics`` scraped until the ``ray_disco_*``
series hold what was done (one stream still open: the replica's running batch and KV cache).

Bounded: Ray exports every second here (``metrics_report_interval_ms``; 10 s by default), the
scrape waits at most ``SCRAPE_TIMEOUT_S``. This test starts its own Ray and shuts it down.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest
from needs import require

ray = require("ray")
serve = require("ray.serve")
parser = require("prometheus_client.parser")

from disco.cluster.config import SchedulerConfig, ServerConfig  # noqa: E402
from disco.cluster.metrics import METRICS, defined_metric  # noqa: E402
from disco.cluster.runtime import deploy_server, free_port  # noqa: E402
from disco.cluster.scheduler_actor import start_scheduler  # noqa: E402
from disco.scheduler.types import EndpointKind, Request, RequestOutcome  # noqa: E402

SCRAPE_TIMEOUT_S = 40.0
SCHEDULER = "metrics-scheduler"


@pytest.fixture
def local_ray():
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="disco-metrics",
             log_to_driver=False, _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 1000})  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


def scrape(port: int) -> dict[str, list[tuple[dict, float]]]:
    """The disco_* samples Ray's exporter serves now: name -> [(labels, value)]."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict, float]]] = {}
    for fam in parser.text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("ray_disco_"):
                out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def one(series: dict, name: str, **labels: str) -> float | None:
    vals = [v for lab, v in series.get(name, []) if all(lab.get(k) == x for k, x in labels.items())]
    assert len(vals) <= 1, (name, labels, vals)
    return vals[0] if vals else None


async def test_disco_series_reach_rays_prometheus_endpoint(local_ray):
    t0 = time.monotonic()
    handle = deploy_server(ServerConfig(
        engine="emulated", engine_kwargs={"preset": "llama3-8b-a10g"}, num_cpus=0.1,
        http={"port": 0},
    ))  # fmt: skip
    sched = start_scheduler(SchedulerConfig(policy="disco", regime="device", budget=0.3,
                                            checkpoint="none", actor_name=SCHEDULER))  # fmt: skip
    await sched.plan_many.remote([Request(f"q{i}", 0.0, 80) for i in range(6)])
    outcomes = [RequestOutcome(request_id=f"q{i}", arrival=0.0, prompt_tokens=80,
                               server_prompt_tokens=80, device_prompt_tokens=40 * (i % 2),
                               first_token_from=EndpointKind.SERVER) for i in range(4)]  # fmt: skip
    await sched.report_many.remote(outcomes)
    await sched.register.remote({"id": "fleet-0", "kind": "fleet", "devices": 12})
    await sched.register.remote({"id": "agent-0", "kind": "agent", "devices": 1,
                                 "metrics": {"planner_fallbacks": 2}})  # fmt: skip
    # One long stream stays open while the replica is scraped; three short ones finish.
    long = handle.options(stream=True).generate.remote({"prompt": "hi " * 200, "max_tokens": 4000})
    await long.__anext__()
    for _ in range(3):
        chunks = [c async for c in handle.options(stream=True).generate.remote(
            {"prompt": "hello", "max_tokens": 5})]  # fmt: skip
        assert len(chunks) == 5

    s = {"scheduler": SCHEDULER}
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while True:
        got = scrape(local_ray)
        ready = (one(got, "ray_disco_scheduler_plans_total", **s) == 6
                 and one(got, "ray_disco_replica_streams_total") == 4
                 and one(got, "ray_disco_scheduler_devices", kind="agent") == 1
                 and (one(got, "ray_disco_replica_running") or 0) >= 1)  # fmt: skip
        if ready or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    long.cancel()
    assert ready, f"after {SCRAPE_TIMEOUT_S} s: {sorted(got)}"

    # Every series Prometheus shows is one cluster/metrics.py defines; every gauge is there, and
    # every counter that counted something (Ray exports a counter from its first increment).
    names = {defined_metric(n) for n in got}
    assert None not in names, sorted(got)
    counted = {"disco_scheduler_plans", "disco_scheduler_outcomes", "disco_scheduler_prompt_tokens",
               "disco_scheduler_prefill_tokens", "disco_replica_streams",
               "disco_replica_generated_tokens"}  # fmt: skip
    gauges = {n for n, d in METRICS.items() if d.kind == "gauge"}
    assert gauges | counted <= names, sorted(gauges | counted - names)
    assert one(got, "ray_disco_scheduler_budget_window_share", regime="device") == 80 / 320
    assert one(got, "ray_disco_scheduler_budget_target", regime="device") == 0.3
    assert one(got, "ray_disco_scheduler_budget_spent_share", regime="device") == 80 / 320
    assert one(got, "ray_disco_scheduler_prompt_tokens_total") == 320
    assert one(got, "ray_disco_scheduler_outcomes_total") == 4
    assert one(got, "ray_disco_scheduler_config_version") == 1
    assert one(got, "ray_disco_scheduler_policy_info", regime="device", migration="true") == 1
    assert one(got, "ray_disco_scheduler_devices", kind="fleet") == 12
    assert one(got, "ray_disco_scheduler_planner_fallbacks") == 2
    labels = got["ray_disco_replica_open_streams"][0][0]
    assert labels["deployment"] == "DiscoServer" and labels["application"] == "disco"
    assert labels["engine"] == "emulated" and labels["replica"]  # Serve's replica id
    assert one(got, "ray_disco_replica_open_streams") == 1
    assert one(got, "ray_disco_replica_queue") == 0
    assert one(got, "ray_disco_replica_kv_used_tokens") > 100  # the long prompt and more
    assert 0 < one(got, "ray_disco_replica_kv_usage") < 0.1
    assert one(got, "ray_disco_replica_generated_tokens_total") >= 15
    assert time.monotonic() - t0 < 60
