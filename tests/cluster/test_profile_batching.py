"""`disco profile --fit-batching` against a real HTTP server on 127.0.0.1 that really batches.

The server is the test OpenAI stub (uvicorn) over the batching engine: one continuous-batching
replica model in real time, so concurrent streams share its step clock like on vLLM. Fitting it
from the outside must land near the preset it runs.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import pytest

from disco.cluster.cli import main
from disco.device_agents.engines.batching import BatchingEndpoint
from disco.scheduler.batching import ServerPreset, StepModel
from disco.scheduler.presets import load_preset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "device_agents"))
from openai_stub import serve_openai  # noqa: E402 - a test helper beside the agent tests

TRUE = ServerPreset(
    name="served",
    step=StepModel(base_s=0.008, prefill_token_s=2e-5, decode_seq_s=1e-3),
    kv_tokens=100_000,
)


def fit_args(url: str, out: Path, *extra: str) -> list[str]:
    return ["profile", "--fit-batching", "--target", url, "--model", "m", "--kv-tokens", "100000",
            "--max-tokens", "16", "--repeats", "2", "--timeout", "10", "--time-limit", "60",
            "--out", str(out), *extra]  # fmt: skip


def test_fits_a_batching_server_from_the_outside(tmp_path, capsys):
    out = tmp_path / "fitted.json"
    t0 = time.monotonic()
    with serve_openai({"m": BatchingEndpoint(TRUE)}) as url:
        argv = fit_args(url, out, "--usd-per-hour", "2.5", "--hardware", "emulated replica")
        assert main(argv) == 0
    elapsed = time.monotonic() - t0
    assert elapsed < 30

    fitted = load_preset(str(out))
    got, want = fitted.step, TRUE.step
    print(f"fitted in {elapsed:.1f} s: {got}")
    for k in ("base_s", "prefill_token_s", "decode_seq_s"):
        assert abs(getattr(got, k) - getattr(want, k)) < 0.3 * getattr(want, k), (k, got)
    # The true context term is 0: what the fit puts there stays a small part of a busy step.
    assert got.context_token_s * 16 * 1040 < 0.15 * TRUE.step.time(0, 16, 0)
    assert got.fit_error is not None and got.fit_error < 0.1
    assert (fitted.kv_tokens, fitted.max_num_seqs, fitted.max_batched_tokens) == (
        100_000,
        256,
        8192,
    )
    assert (fitted.usd_per_hour, fitted.model, fitted.hardware) == (2.5, "m", "emulated replica")

    data = json.loads(out.read_text())
    assert data["kind"] == "server-preset" and data["measured"] is True
    assert data["target"] == url and data["date"] and "CPUs" in data["machine"]
    assert data["ignore_eos"] is True and data["token_counter"].startswith("estimate")
    assert data["fit"]["error"] == got.fit_error and 0 <= data["floor_s"] < 0.05
    assert sorted(p["concurrency"] for p in data["points"]["gaps"])[-5:] == [1, 2, 4, 8, 16]
    # 2 repeats x (4 lone requests + 1+2+4+8+16 concurrent ones)
    assert len(data["samples"]) == 2 * (4 + 31)
    assert all(len(s["times_s"]) == 16 for s in data["samples"])
    assert "wrote" in capsys.readouterr().out


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--fit-batching", "--out", "X"], "needs --target URL"),
        (["--fit-batching", "--target", "ftp://h", "--out", "X"], "must be an http(s) URL"),
        (
            ["--fit-batching", "--target", "http://h", "--concurrency", "8", "--out", "X"],
            "--concurrency needs >= 2",
        ),  # fmt: skip
        (
            ["--fit-batching", "--target", "http://h", "--prompt-lens", "64", "--out", "X"],
            "--prompt-lens needs >= 2",
        ),  # fmt: skip
        (
            ["--fit-batching", "--target", "http://h", "--concurrency", "1,512", "--out", "X"],
            "exceeds --max-num-seqs 256",
        ),  # fmt: skip
        (
            ["--fit-batching", "--target", "http://h", "--max-tokens", "1", "--out", "X"],
            "--max-tokens must be >= 2",
        ),  # fmt: skip
        (
            ["--fit-batching", "--target", "http://h", "--repeats", "200", "--out", "X"],
            "requests (cap",
        ),
        (
            ["--fit-batching", "--endpoint", "emulated", "--target", "http://h", "--out", "X"],
            "takes no --endpoint",
        ),  # fmt: skip
        (
            ["--endpoint", "emulated", "--concurrency", "1,2", "--out", "X"],
            "belongs to --fit-batching",
        ),
        (["--out", "X"], "--endpoint is required"),
        (["--fit-batching", "--target", "http://127.0.0.1:PORT", "--out", "X"], "cannot reach"),
    ],
)
def test_bad_flags_and_unreachable_servers_are_one_line_exit_2(tmp_path, capsys, argv, needle):
    out = tmp_path / "x.json"
    port = str(closed_port())
    argv = [str(out) if a == "X" else a.replace("PORT", port) for a in argv]
    assert main(["profile", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_server_that_does_not_report_its_kv_cache_needs_the_flag(tmp_path, capsys):
    out = tmp_path / "x.json"
    with serve_openai({"m": BatchingEndpoint(TRUE)}) as url:
        argv = ["profile", "--fit-batching", "--target", url, "--out", str(out)]
        assert main(argv) == 2
        assert "--model is required" in capsys.readouterr().err
        assert main([*argv, "--model", "m"]) == 2
        assert "--kv-tokens is required" in capsys.readouterr().err
        # A model the server does not serve: its HTTP 404 is the message.
        assert main([*argv, "--model", "nope", "--kv-tokens", "100000"]) == 2
        err = capsys.readouterr().err
        assert "failed" in err and "does not exist" in err and err.count("\n") == 1
    assert not out.exists()


def test_reads_what_a_vllm_server_reports_about_itself():
    import httpx

    from disco.cluster.commands.profile_batching import (
        ServerTokenizer,
        kv_from_metrics,
        served_model,
    )

    metrics = (
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
        'vllm:cache_config_info{block_size="16",cache_dtype="auto",num_gpu_blocks="9000"} 1.0\n'
    )

    def vllm(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "Qwen/Qwen3-0.6B"}]})
        if request.url.path == "/metrics":
            return httpx.Response(200, text=metrics)
        if request.url.path == "/tokenize":
            return httpx.Response(200, json={"count": len(json.loads(request.content)["prompt"])})
        return httpx.Response(404)

    with httpx.Client(transport=httpx.MockTransport(vllm)) as client:
        url = "http://gpu:8000/v1"  # a base URL with /v1 works too
        assert served_model(client, url) == "Qwen/Qwen3-0.6B"
        assert kv_from_metrics(client, url) == (144_000, 16)
        tok = ServerTokenizer.probe(client, url, "Qwen/Qwen3-0.6B")
        assert tok is not None and tok.count("abc") == 3
    with httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(404))) as client:
        url = "http://other:8000"
        assert served_model(client, url) == "" and kv_from_metrics(client, url) is None
        assert ServerTokenizer.probe(client, url, "m") is None
