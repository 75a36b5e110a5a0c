"""`disco bench soak` for 40 s (issue 15): the sampling works and soak.json says what it should,
every process the project starts (agent, fleet actors, scheduler, replicas) with its RSS, open
file descriptors and live asyncio tasks, Ray's own processes apart, the object store and the
scheduler's state size, with a growth line per series. The long run's numbers are in the README.
"""

from __future__ import annotations

import json

import pytest
from needs import missing, require

require("ray")
require("ray.serve")
require("llama_cpp")
require("httpx")

from disco.cluster.soak import SoakOptions, run_soak  # noqa: E402
from disco.device_agents.models import ModelUnavailableError, resolve_model  # noqa: E402

pytestmark = pytest.mark.slow


def test_a_short_soak_samples_every_process(tmp_path):
    try:
        resolve_model("smollm2-135m")
    except ModelUnavailableError as e:
        missing(str(e))
    out = tmp_path / "soak"
    s = run_soak(SoakOptions(duration_s=40, out=str(out), rate=2, sample_every_s=4, warmup_s=8))
    doc = json.loads((out / "soak.json").read_text())
    assert (out / "soak.png").stat().st_size > 20_000
    assert doc["samples"] == s["samples"] >= 8 and doc["requests"] >= 40
    assert len((out / "samples.jsonl").read_text().splitlines()) == s["samples"]
    last = doc["sample_list"][-1]
    project = last["project"]
    assert {"scheduler", "agent", "fleet0", "fleet1"} <= set(project), sorted(project)
    assert sum(k.startswith("replica:") for k in project) == 2, sorted(project)
    for label, st in project.items():
        assert st["rss_mib"] > 20 and st["fds"] > 3, (label, st)
    for label in ("scheduler", "agent", "fleet0", "fleet1"):
        assert project[label]["tasks"] >= 1, (label, project[label])
    assert project["scheduler"]["state_bytes"] > 1000
    assert {"gcs_server", "raylet"} <= set(last["ray"]), sorted(last["ray"])
    assert last["object_store"] is not None and last["object_store"]["used_mib"] >= 0
    g = doc["growth"]
    for key in ("project:agent", "project:scheduler", "ray:raylet", "object_store"):
        metric = "used_mib" if key == "object_store" else "rss_mib"
        assert g[key][metric]["slope_per_h"] is not None, (key, g[key])
    assert set(doc["flat"]) >= {"project:agent", "project:scheduler"}
