"""`disco load` against real device agents (the emulated fleet's engines behind the agent's own
HTTP API, on loopback): the server fails mid-stream, the agents fail over to the device, and the
run's summary and timeline show it as the streams and the agents' counters say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from needs import require

from disco.cluster import cli
from disco.loadgen.records import read_records

require("locust", load=False)
require("uvicorn")
require("starlette")


@pytest.fixture
def failing_server_agents():
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from disco.device_agents.agent_http import BackgroundServer, create_app
    from disco.device_agents.config import FleetConfig, NetworkConfig
    from disco.device_agents.fleet import EmulatedFleet
    from disco.device_agents.local_planner import StaticPlanner

    net = NetworkConfig(rtt_ms=1, jitter_ms=1, distribution="exponential")
    fleet = EmulatedFleet(
        FleetConfig(devices=2, server_fail_after_tokens=3, time_scale=0.02, network=net),
        planner=StaticPlanner(server_start=0.0, device_start=None),  # server first, always
    )
    ids = fleet.device_ids()
    routes = [Mount(f"/devices/{d}", app=create_app(fleet.agent(d))) for d in ids]
    srv = BackgroundServer(Starlette(routes=routes))
    base = srv.start()
    yield [f"{base}/devices/{d}" for d in ids]
    srv.stop()


def test_failovers_show_in_the_split_the_counters_and_the_timeline(
    tmp_path: Path, failing_server_agents: list[str]
) -> None:
    trace = tmp_path / "t.csv"
    rows = [f"2023-11-16 18:15:{10 + i * 0.1:010.7f},{40 + 5 * i},12" for i in range(6)]
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    rc = cli.main([
        "load", "--target", ",".join(failing_server_agents), "--trace", str(trace),
        "--max-tokens", "10", "--tokenizer", "estimate", "--label", "failover", "--out", str(out),
    ])  # fmt: skip
    assert rc == 0
    recs = read_records(out / "requests.jsonl")
    s = json.loads((out / "summary.json").read_text())
    assert s["ok"] == len(recs) == 6 and s["label"] == "failover"
    # Every stream: the server's first tokens, then the device's after one hand-over.
    assert all(r.sources[:3] == ["server"] * 3 and set(r.sources[3:]) == {"device"} for r in recs)
    assert (s["first_from_server"], s["handovers"], s["requests_with_handover"]) == (6, 6, 6)
    # The agents counted the same tokens, and knew these hand-overs were failovers.
    c = s["agent_counters"]
    assert (c["tokens_server"], c["tokens_device"]) == (s["tokens_server"], s["tokens_device"])
    assert (s["failovers"], s["migrations"]) == (6, 0)
    assert s["server_cost_usd"] > 0 and s["device_energy_j"] > 0
    assert s["budget_used"] is None
    png = (out / "timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
