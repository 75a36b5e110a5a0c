"""cluster/deploy/README.md's commands, step by step, on one machine, as a user types them.

`ray start --head` (token auth on, the README's custom resources), `disco serve` with the shipped
testbed.yaml (only its ports changed), `disco agent --scheduler`, `disco status --json`, a request
through the agent, `disco serve` again with another budget (updated in place, printed), `disco
down` twice, then this Ray's processes stopped by PID (tests/cluster/ray_head.py: never `ray
stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from needs import require

require("ray")
require("psutil")

from ray_head import RayHead  # noqa: E402

from disco.cluster.runtime import free_port  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[2] / "cluster" / "deploy"
ROOT = Path(__file__).resolve().parents[2]
STEP_TIMEOUT_S = 90


def disco(
    head: RayHead, *args: str, timeout: float = STEP_TIMEOUT_S
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "disco.cluster.cli", *args], env=head.env, cwd=ROOT, text=True,
        capture_output=True, timeout=timeout,
    )  # fmt: skip


def ok(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 0, f"rc {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def the_readme_config(tmp_path: Path, port: int, budget: float) -> Path:
    """The shipped testbed.yaml with a free port for Serve's proxy and the given budget."""
    doc = yaml.safe_load((DEPLOY / "testbed.yaml").read_text())
    doc["server"]["http"]["port"] = port
    doc["scheduler"]["budget"] = budget
    path = tmp_path / "testbed.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_shipped_configs_ask_for_the_readmes_resources():
    readme = (DEPLOY / "README.md").read_text()
    for phrase in ("""--resources '{"disco_server": 4}'""", """--resources '{"disco_device": 4}'""",
                   "server.resources: {disco_server: 0.01}", "fleet.resources: {disco_device: 0.01}",
                   "agent.resources: {disco_device: 0.01}"):  # fmt: skip
        assert phrase in readme, phrase
    testbed = yaml.safe_load((DEPLOY / "testbed.yaml").read_text())
    assert testbed["server"]["resources"] == {"disco_server": 0.01}
    assert testbed["fleet"]["resources"] == testbed["agent"]["resources"] == {"disco_device": 0.01}
    serve_app = yaml.safe_load((DEPLOY / "serve.yaml").read_text())["applications"][0]
    assert serve_app["args"]["resources"] == {"disco_server": 0.01}
    ray_service = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    app = yaml.safe_load(ray_service["spec"]["serveConfigV2"])["applications"][0]
    assert app["args"]["resources"] == {"disco_server": 0.01}
    [gpu] = ray_service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert json.loads(json.loads(gpu["rayStartParams"]["resources"])) == {"disco_server": 1}


@pytest.mark.slow
def test_the_deploy_readme_step_by_step(tmp_path):
    t0 = time.monotonic()
    head = RayHead(num_cpus=4, resources={"disco_server": 4, "disco_device": 4})
    agent = None
    try:
        head.start()
        # Ray 2.60: with token auth on, a client without RAY_AUTH_MODE=token is refused
        env = {k: v for k, v in head.env.items() if k != "RAY_AUTH_MODE"}
        no_mode = subprocess.run([sys.executable, "-m", "disco.cluster.cli", "status"], env=env,
                                 cwd=ROOT, text=True, capture_output=True, timeout=STEP_TIMEOUT_S)  # fmt: skip
        assert no_mode.returncode == 2 and "Traceback" not in no_mode.stderr, no_mode.stderr
        assert "cannot connect" in no_mode.stderr or "no Ray cluster" in no_mode.stderr

        serve_port = free_port()
        cfg = the_readme_config(tmp_path, serve_port, budget=0.3)
        out = ok(disco(head, "serve", "--config", str(cfg)))
        assert f"http://127.0.0.1:{serve_port}/v1/completions" in out
        assert "scheduler: actor 'disco-scheduler' in namespace 'disco': created" in out

        agent_port = free_port()
        agent = subprocess.Popen(
            [sys.executable, "-m", "disco.cluster.cli", "agent", "--engine", "emulated",
             "--server", f"http://127.0.0.1:{serve_port}", "--scheduler", head.address,
             "--device-id", "phone-1", "--port", str(agent_port), "--grace-s", "1"],
            env=head.env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        agent_url = f"http://127.0.0.1:{agent_port}"
        for _ in range(600):  # bounded: ~60 s
            assert agent.poll() is None, agent.stdout.read()[-3000:]
            try:
                httpx.get(f"{agent_url}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        body = {"prompt": "Hello from the README", "max_tokens": 8, "stream": True}
        with httpx.stream("POST", f"{agent_url}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) == 9, lines
        metrics = httpx.get(f"{agent_url}/metrics", timeout=10).text
        assert "disco_agent_requests_total" in metrics and "disco_agent_ttft_seconds" in metrics

        status = json.loads(ok(disco(head, "status", "--json", "--sample-s", "0.2")))
        s = status["scheduler"]
        assert s["policy"] == "disco" and s["regime"] == "server" and s["config_version"] == 1
        assert s["budget"]["target"] == pytest.approx(0.3) and s["plans"] >= 1
        [app] = status["server_apps"]
        assert app["name"] == "disco" and app["status"] == "RUNNING"
        assert app["deployments"][0]["replicas"] == {"RUNNING": 1}
        assert len(app["replicas"]) == 1 and app["replicas"][0]["engine"] == "emulated"
        [phone] = [d for d in status["devices"] if d["id"] == "phone-1"]
        assert phone["kind"] == "agent" and phone["url"] == agent_url

        cfg = the_readme_config(tmp_path, serve_port, budget=0.5)
        out = ok(disco(head, "serve", "--config", str(cfg)))
        assert "updated in place (config version 2)" in out and "budget: 0.3 -> 0.5" in out, out
        out = ok(disco(head, "serve", "--config", str(cfg)))
        assert "unchanged (config version 2)" in out, out
        table = ok(disco(head, "status", "--sample-s", "0.2"))
        assert "b = 0.5" in table and "version 2" in table and "phone-1" in table, table
        status = json.loads(ok(disco(head, "status", "--json", "--sample-s", "0")))
        assert status["scheduler"]["budget"]["target"] == pytest.approx(0.5)

        out = ok(disco(head, "down"))
        assert "scheduler actor 'disco-scheduler'" in out and "server app 'disco'" in out, out
        assert "Serve (its controller and HTTP proxy)" in out
        assert "still running (not Ray's to stop): agent phone-1" in out
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{serve_port}/health", timeout=2)  # the port is free
        assert "nothing was running" in ok(disco(head, "down"))
        gone = disco(head, "status")
        assert gone.returncode == 2 and "no scheduler actor 'disco-scheduler'" in gone.stderr

        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0
        agent = None
    finally:
        if agent is not None:
            agent.kill()
            agent.wait(10)
        head.stop()
    assert not head.processes()
    assert time.monotonic() - t0 < 150  # the README's whole journey, bounded


@pytest.mark.parametrize("command", ["status", "down"])
def test_no_cluster_is_one_line_and_exit_2(command):
    port = free_port()  # nothing listens there
    p = subprocess.run(
        [sys.executable, "-m", "disco.cluster.cli", command, "--address", f"127.0.0.1:{port}"],
        cwd=ROOT, text=True, capture_output=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert f"disco {command}: error: no Ray cluster at '127.0.0.1:{port}'" in p.stderr
