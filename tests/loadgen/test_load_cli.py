"""`disco load` end to end against a loopback SSE server, bad input, and Ctrl-C."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from disco.cluster import cli
from disco.loadgen.mock_server import MockConfig, MockServer
from disco.loadgen.records import read_records


def _azure_trace(path: Path, n: int, gap: float = 0.2) -> Path:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    lines += [f"2023-11-16 18:15:{10 + i * gap:010.7f},{30 + 7 * i},{20 + i}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_load_end_to_end_writes_every_file(tmp_path: Path) -> None:
    trace = _azure_trace(tmp_path / "t.csv", 5)
    out = tmp_path / "out"
    # Two tokens per SSE chunk: the client must still count (and time) each token.
    with MockServer(MockConfig(ttft_s=0.01, tbt_s=0.002, tokens_per_chunk=2)) as srv:
        rc = cli.main([
            "load", "--target", srv.url, "--trace", str(trace), "--max-tokens", "6",
            "--tokenizer", "estimate", "--label", "mock", "--out", str(out),
        ])  # fmt: skip
        assert rc == 0
        assert len(srv.arrivals) == 5
    recs = read_records(out / "requests.jsonl")
    assert len(recs) == 5 and all(r.ok for r in recs)
    assert all(r.tokens == 6 and r.finish_reason == "length" for r in recs)
    assert all(r.ttft is not None and r.ttft > 0 for r in recs)
    assert sorted(r.due for r in recs) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] == 5 and summary["errors"] == 0 and summary["label"] == "mock"
    with open(out / "locust_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    assert rows["TTFT"]["Request Count"] == "5"
    assert rows["TBT"]["Request Count"] == str(5 * 5)  # every inter-token gap
    assert rows["completion"]["Failure Count"] == "0"
    for name in ("locust.html", "ttft_cdf.png", "tbt_cdf.png", "timeline.png", "load.png"):
        assert (out / name).stat().st_size > 0, name
    # A plain OpenAI server: untagged tokens, and no agent counters (null, with the reason).
    assert summary["first_from_unknown"] == 5 and summary["tokens_unknown_source"] == 30
    assert summary["migrations"] is None and summary["server_cost_usd"] is None
    assert "HTTP 404" in summary["notes"]["counters"]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_load_reports_the_endpoint_split_handovers_and_the_agents_counters(tmp_path: Path) -> None:
    trace = _azure_trace(tmp_path / "t.csv", 5, gap=0.1)
    out = tmp_path / "out"
    # The mock plays a device agent: server tokens, two requests handed to the device mid-stream,
    # and the agent's counters at /metrics.
    cfg = MockConfig(ttft_s=0.01, tbt_s=0.002, source="server", metrics=True,
                     handover_at={"r000001": 2, "r000003": 4})  # fmt: skip
    with MockServer(cfg) as srv:
        rc = cli.main([
            "load", "--target", srv.url, "--trace", str(trace), "--max-tokens", "6",
            "--tokenizer", "estimate", "--label", "agent", "--out", str(out),
        ])  # fmt: skip
    assert rc == 0
    recs = {r.id: r for r in read_records(out / "requests.jsonl")}
    assert recs["r000001"].token_sources == ["server"] * 2 + ["device"] * 4
    s = json.loads((out / "summary.json").read_text())
    assert (s["first_from_server"], s["first_from_device"]) == (5, 0)
    assert (s["handovers"], s["requests_with_handover"]) == (2, 2)
    assert (s["tokens_server"], s["tokens_device"]) == (5 * 6 - 6, 6) and s["tokens"] == 30
    # The agents' counters agree with what the streams showed, and price it.
    c = s["agent_counters"]
    assert (c["completed"], c["tokens_server"], c["tokens_device"]) == (5, 24, 6)
    assert (s["migrations"], s["failovers"]) == (2, 0)
    assert s["server_cost_usd"] == pytest.approx(24 * cfg.usd_per_server_token)
    assert s["device_energy_j"] == pytest.approx(6 * cfg.j_per_device_token)
    assert (
        s["budget_used"] is None and s["regime"] is None and "budget_regime" in s["notes"]["budget"]
    )
    w, h = _png_size(out / "timeline.png")
    assert 500 <= w <= 2000 and 250 <= h <= 2000


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing", "trace not found"),
        ("format", "unknown format"),
        ("unreachable", "unreachable"),
        ("url", "not an http"),
        ("window", "holds no request"),
    ],
)
def test_bad_input_fails_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, match: str
) -> None:
    trace = _azure_trace(tmp_path / "t.csv", 3)
    target = f"http://127.0.0.1:{_closed_port()}"
    args = ["--trace", str(trace)]
    if case == "missing":
        args = ["--trace", str(tmp_path / "nope.csv")]
    elif case == "format":
        (tmp_path / "odd.csv").write_text("a,b,c\n1,2,3\n")
        args = ["--trace", str(tmp_path / "odd.csv")]
    elif case == "url":
        target = "ftp://127.0.0.1:1"
    elif case == "window":
        args += ["--start", "3600"]
    out = tmp_path / "out"
    with MockServer() as srv:
        if case not in ("unreachable", "url"):
            target = srv.url
        rc = cli.main(["load", "--target", target, *args, "--out", str(out)])
        assert not srv.arrivals  # nothing was sent
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("disco load: error:") and match in err[0]
    assert not out.exists()


def test_ctrl_c_keeps_what_was_measured(tmp_path: Path) -> None:
    trace = _azure_trace(tmp_path / "t.csv", 3, gap=0.1)
    out = tmp_path / "out"
    # Slow streams: 200 ms per token, 50 tokens: every request is still streaming when we stop.
    with MockServer(MockConfig(ttft_s=0.01, tbt_s=0.2)) as srv:
        cmd = [sys.executable, "-m", "disco.cluster.cli", "load", "--target", srv.url,
               "--trace", str(trace), "--max-tokens", "50", "--tokenizer", "estimate",
               "--out", str(out)]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 60
            while len(srv.arrivals) < 3 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(srv.arrivals) == 3
            time.sleep(0.5)  # a few tokens each
            proc.send_signal(signal.SIGINT)
            output, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, output
    recs = read_records(out / "requests.jsonl")
    assert len(recs) == 3
    assert all(r.error == "interrupted" and 0 < r.tokens < 50 for r in recs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["errors"] == 3
    assert (out / "locust_stats.csv").exists() and (out / "locust.html").exists()
    assert "interrupted" in output


def test_help_is_cheap() -> None:
    # The subcommand registers without importing Locust or Ray (fast `disco --help`).
    code = "import sys, disco.cluster.cli as c; c.build_parser(); print('locust' in sys.modules, 'ray' in sys.modules)"
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ}
    )
    assert res.stdout.strip() == "False False", res.stderr
