"""Issue 10's journey, on one machine: a Serve app, the scheduler actor (DiSCo, server budget
b = 0.3), a device agent whose device runs one stream at a time, and `disco load` (Locust,
open-loop) sending >= 100 requests at a rate the device carries at b and at one it cannot.
The budget must hold in both (spent share <= b + 0.02); past the device's queue limit requests
are refused with a clear 429, and every accepted request finishes.

The emulated server and device run 20x faster than their profiles (and the policy is told the
device's real speed, a scaled profile), so each run takes ~30 s. Loopback only.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from needs import require

ray = require("ray")
serve = require("ray.serve")

from disco.cluster import cli  # noqa: E402
from disco.cluster.config import SchedulerConfig, ServerConfig  # noqa: E402
from disco.cluster.device_actors import build_agent, profiles  # noqa: E402
from disco.cluster.planner_client import ActorPlanner  # noqa: E402
from disco.cluster.resolve import build_engine  # noqa: E402
from disco.cluster.runtime import deploy_server, free_port, server_url  # noqa: E402
from disco.cluster.scheduler_actor import start_scheduler  # noqa: E402
from disco.device_agents.agent_http import BackgroundServer, create_app  # noqa: E402
from disco.device_agents.config import AgentConfig, HttpConfig  # noqa: E402
from disco.scheduler.profiles import DEVICE_PROFILES, profile_to_dict  # noqa: E402

SCALE = 0.05  # every emulated sleep x 0.05
BUDGET = 0.3
QUEUE_LIMIT = 6
DEVICE = "xiaomi14-qwen0.5b"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("journey")
    # The device as the policy must see it: the emulated one runs 1/SCALE times faster.
    dev = DEVICE_PROFILES.get(DEVICE)
    fast = replace(dev, name="xiaomi-x20", ttft_base_s=dev.ttft_base_s * SCALE,
                   prefill_tps=dev.prefill_tps / SCALE, decode_tps=dev.decode_tps / SCALE)  # fmt: skip
    dev_path = tmp / "device.json"
    dev_path.write_text(json.dumps(profile_to_dict(fast)))
    ray.init(num_cpus=4, include_dashboard=False, namespace="disco-journey", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        cfg = ServerConfig(
            engine="emulated",
            engine_kwargs={"profile": "gpt-4o-mini", "time_scale": SCALE},
            num_cpus=0.1,
        )
        deploy_server(cfg)
        yield server_url(cfg, port), str(dev_path), tmp
    finally:
        serve.shutdown()
        ray.shutdown()


def _run(world, name: str, rate: float, duration: float) -> tuple[dict, dict, dict, Path]:
    url, dev_path, tmp = world
    sched_cfg = SchedulerConfig(policy="disco", regime="server", budget=BUDGET,
                                recompute_every=25, device_profile=dev_path,
                                actor_name=f"journey-{name}", checkpoint="none")  # fmt: skip
    actor = start_scheduler(sched_cfg)
    planner = ActorPlanner.connect(actor)
    sp, dp = profiles(sched_cfg.server_profile, dev_path)
    cfg = AgentConfig(
        device_id=f"phone-{name}", engine="emulated",
        engine_kwargs={"profile": DEVICE, "kind": "device", "time_scale": SCALE},
        device_slots=1, max_device_queue=QUEUE_LIMIT, planner_timeout_ms=1000,
    )  # fmt: skip
    agent = build_agent(
        server=build_engine("openai", {"base_url": url, "model": "disco-server"}),
        device=build_engine("emulated", dict(cfg.engine_kwargs)),
        planner=planner, server_profile=sp, device_profile=dp, config=cfg,
    )  # fmt: skip
    front = BackgroundServer(create_app(agent, HttpConfig(port=0)))
    agent_url = front.start()
    out = tmp / name
    try:
        rc = cli.main([
            "load", "--target", agent_url, "--arrivals", "poisson", "--rate", str(rate),
            "--duration", str(duration), "--max-tokens", "24", "--max-prompt-tokens", "1500",
            "--tokenizer", "estimate", "--seed", "3", "--request-timeout", "60", "--out", str(out),
        ])  # fmt: skip
        assert rc == 0
        metrics = httpx.get(f"{agent_url}/metrics", timeout=10).text
        stats = ray.get(actor.stats.remote(), timeout=30)
    finally:
        front.stop()
        ray.kill(actor)
    counters: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("disco_agent_") and 'source="' not in line and "le=" not in line:
            k, v = line.rsplit(" ", 1)
            counters[k.split("{")[0]] = float(v)
    records = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines() if x]
    summary = json.loads((out / "summary.json").read_text())
    # The load report measures the same budget from the agent's own counters.
    assert summary["regime"] == "server"
    assert summary["budget_used"] == pytest.approx(stats["spent_ratio"], abs=0.005)
    assert summary["refused"] == counters["disco_agent_device_refused_total"]
    return stats, counters, {"records": records}, out


def test_the_budget_holds_at_a_rate_the_device_carries(world):
    stats, counters, recs, _ = _run(world, "carried", rate=3.0, duration=40)
    led = stats["ledger"]
    assert led["requests"] >= 100
    assert stats["spent_ratio"] <= BUDGET + 0.02, stats
    assert stats["spent_ratio"] > 0.05  # the server was used, within the budget
    assert led["refused"] == 0 and counters["disco_agent_device_refused_total"] == 0
    assert led["errors"] == 0
    assert counters["disco_agent_failovers_total"] == 0  # no timeout hand-over


def test_the_budget_holds_and_the_device_refuses_at_a_rate_it_cannot_carry(world):
    stats, counters, recs, _ = _run(world, "overload", rate=14.0, duration=10)
    led = stats["ledger"]
    records = recs["records"]
    assert len(records) >= 100
    assert stats["spent_ratio"] <= BUDGET + 0.02, stats
    refused = counters["disco_agent_device_refused_total"]
    assert refused > 0 and led["refused"] == refused
    # Every accepted request finished, nothing lost: the agent counts each one it accepted.
    assert counters["disco_agent_requests_completed_total"] == led["requests"]
    assert led["errors"] == 0 and counters["disco_agent_failovers_total"] == 0
    assert counters["disco_agent_requests_rejected_total"] == 0  # refused is not bad input
    # The refusals reached the client as a clear 429 error, not a broken stream.
    errors = [r for r in records if r.get("error")]
    assert len(errors) == refused
    assert all("429" in str(r["error"]) or "saturated" in str(r["error"]) for r in errors)
