"""`disco bench chaos` for 60 s, as CI runs it (issue 15): the whole local testbed (two emulated
replicas behind Serve, the scheduler actor, a real llama.cpp agent, two emulated fleets) under
an open-loop load while faults of every kind land every ~4 s. Nothing the users' surviving
devices accepted may be lost, and no token may reach a user twice or out of order; recovery time
and budget drift are reported and held only to generous bounds (a loaded 2-core machine).
About 2 minutes (Ray's start and the model load included)."""

from __future__ import annotations

import json

import pytest
from needs import missing, require

require("ray")
require("ray.serve")
require("llama_cpp")
require("httpx")

from disco.cluster.chaos import ChaosOptions, run_chaos  # noqa: E402
from disco.device_agents.models import ModelUnavailableError, resolve_model  # noqa: E402

pytestmark = pytest.mark.slow


def test_a_minute_of_chaos_loses_nothing(tmp_path):
    try:
        resolve_model("smollm2-135m")
    except ModelUnavailableError as e:
        missing(str(e))
    out = tmp_path / "chaos"
    # The llama.cpp agent's user sends 8 % of the requests (~0.25/s): a CPU-starved llama.cpp
    # is the one part whose queue can outgrow a user's 30 s patience (every raced request's
    # device prefill runs to its end even when the server wins).
    s = run_chaos(ChaosOptions(duration_s=60, kill_every_s=4, seed=0, out=str(out), rate=3,
                               drain_s=45, agent_share=0.08))  # fmt: skip
    on_disk = json.loads((out / "chaos.json").read_text())
    assert on_disk["requests"] == s["requests"] and (out / "timeline.png").stat().st_size > 20_000
    detail = json.dumps({k: s[k] for k in ("faults", "lost_requests", "devices")})[:3000]
    assert s["requests"] >= 60 and s["finished"] >= 0.7 * s["requests"], detail
    assert s["lost"] == 0, detail
    assert s["duplicated_tokens"] == 0 and s["out_of_order_tokens"] == 0, detail
    assert s["missing_tokens"] == 0, detail
    assert s["faults_total"] >= 8 and len(s["faults"]) >= 5, detail  # several of each kind
    assert s["faults_failed"] == 0, json.dumps(s["fault_list"])[:3000]
    # Reported; held to generous bounds only (the README has the numbers of a long run).
    assert s["recovery_s_p99"] is None or s["recovery_s_p99"] < 20.0
    assert s["budget_drift"] is not None and abs(s["budget_drift"]) < 0.25
    assert s["scheduler_restart_s_max"] is None or s["scheduler_restart_s_max"] < 60.0
