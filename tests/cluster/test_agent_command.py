"""`disco agent` as a real process: the official OpenAI client streams a completion from it.

No Ray here: the agent runs a local policy (``device-only``), so llama.cpp answers alone and the
server URL is never contacted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
from doubles import stop_process
from needs import missing, require

require("llama_cpp")
openai = require("openai")

from disco.cluster.runtime import free_port  # noqa: E402
from disco.device_agents.models import ModelUnavailableError, resolve_model  # noqa: E402


@pytest.fixture
def agent_url():
    try:
        resolve_model("smollm2-135m")
    except ModelUnavailableError as e:
        missing(str(e))
    port = free_port()
    cmd = [
        sys.executable, "-m", "disco.cluster.cli", "agent", "--server", "http://127.0.0.1:9",
        "--model", "smollm2-135m", "--threads", "1", "--policy", "device-only",
        "--port", str(port), "--api-key", "k3y",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "DISCO_API_KEY"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):  # bounded: ~30 s for the model load and the bind
            if proc.poll() is not None:
                pytest.fail(f"disco agent exited: {proc.stdout.read().decode()[-2000:]}")
            try:
                httpx.get(f"{url}/health", timeout=1, headers={"Authorization": "Bearer k3y"})
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url
    finally:
        stop_process(proc)


def test_openai_client_streams_from_disco_agent(agent_url):
    client = openai.OpenAI(base_url=f"{agent_url}/v1", api_key="k3y")
    stream = client.completions.create(
        model="disco", prompt="The capital of France is", max_tokens=8, stream=True
    )
    texts = [c.choices[0].text for c in stream]
    assert 1 <= len(texts) <= 8 and "".join(texts).strip()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{agent_url}/v1", api_key="wrong").completions.create(
            model="disco", prompt="x", max_tokens=2
        )


def test_defaults_are_the_small_model_and_the_local_disco_policy_at_a_stated_budget():
    """No --model, no --policy, no --scheduler: the small device model, and DiSCo at a budget the
    agent prints (it used to race every request at full server cost, on the server's model)."""
    try:
        resolve_model("smollm2-135m")
    except ModelUnavailableError as e:
        missing(str(e))
    cmd = [sys.executable, "-m", "disco.cluster.cli", "agent", "--server", "http://127.0.0.1:9",
           "--threads", "1", "--port", str(free_port())]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "DISCO_API_KEY"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "disco agent:" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail("disco agent exited before it started serving")
        assert "planning: local policy disco (regime server, budget 0.5)" in line, line
        assert "SmolLM2" in line or "smollm2" in line.lower(), line
    finally:
        stop_process(proc)
