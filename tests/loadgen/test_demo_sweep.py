"""`disco demo --sweep`: each policy's capacity curve on one testbed (slow: Ray, Serve, real
llama.cpp device), and its bad input refused before anything starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from needs import require

from disco.loadgen.sweep import ROW_TAIL

for _module in ("ray", "llama_cpp", "locust"):
    require(_module, load=False)


@pytest.mark.slow
def test_demo_sweep_draws_every_policy_on_one_figure(tmp_path: Path) -> None:
    """Two policies x two rates, 12 s each (2 s warm-up), two emulated phones beside the real
    agent: ~2-3 min on 2 cores."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "disco.cluster.cli", "demo", "--sweep", "--quick", "--rates",
           "0.5,1.5", "--duration", "12", "--warmup", "2", "--devices", "2", "--policies",
           "server-only,length", "--slo", "ttft=3s", "--out", str(out)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "[demo] [4/4] length at 1.5/s" in res.stdout
    data = json.loads((out / "sweep.json").read_text())
    rows = data["rows"]
    assert [(r["policy"], r["rate"]) for r in rows] == [
        ("server-only", 0.5), ("length", 0.5), ("server-only", 1.5), ("length", 1.5)]  # fmt: skip
    for r in rows:
        assert list(r) == ["policy", "rate", *ROW_TAIL]
        assert r["requests"] > 0 and r["errors"] == 0 and r["server_cost"] > 0
        assert 0 <= r["slo_attainment"] <= 1 and r["goodput"] is not None
    server_only = [r for r in rows if r["policy"] == "server-only"]
    assert all(r["budget_used"] == pytest.approx(0.0) for r in server_only)
    assert data["slo"]["ttft_s"] == 3.0 and data["config"]["policies"] == ["server-only", "length"]
    assert data["commit"] and data["command"].startswith("disco demo --sweep")
    png = (out / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    for pol in ("server-only", "length"):
        for point in ("rate-0.5", "rate-1.5"):
            s = json.loads((out / pol / point / "summary.json").read_text())
            assert s["policy"] == pol and s["phases"]["warmup"]["requests"] >= 0
            assert s["measured_window_s"] == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--rates", "1,2"], "add --sweep"),
        (["--sweep", "--rates", "1,1"], "twice"),
        (["--sweep", "--rate", "2"], "drop --rate"),
        (["--sweep", "--slo", "ttft=2"], "with its unit"),
        (["--sweep", "--warmup", "30"], "nothing left to measure"),
    ],
)
def test_demo_sweep_bad_input_exits_2_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], match: str
) -> None:
    from disco.cluster import cli

    rc = cli.main(["demo", "--quick", *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and match in err[0], err
    assert not (tmp_path / "o").exists()
