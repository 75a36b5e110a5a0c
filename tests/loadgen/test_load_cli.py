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
    for name in ("locust.html", "ttft_cdf.png", "tbt_cdf.png", "timeline.png"):
        assert (out / name).stat().st_size > 0, name


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
