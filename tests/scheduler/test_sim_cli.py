"""`disco sim` end to end (small traces) and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from disco.cluster.cli import main

ROW_KEYS = {
    "policy", "regime", "budget", "budget_used", "migration", "ttft_mean", "ttft_p50", "ttft_p90",
    "ttft_p99", "tbt_p99", "qoe_mean", "server_cost", "device_energy_j", "migrations", "requests",
}  # fmt: skip


def test_sim_writes_rows_plots_and_is_deterministic(tmp_path: Path, capsys) -> None:
    args = ["sim", "--limit", "300", "--budgets", "0,0.5,1", "--regime", "device", "--seed", "7"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr()
    assert "disco" in out.out and "oracle" in out.out  # the table
    assert "sim:" in out.err  # progress
    assert main([*args, "--out", str(tmp_path / "b"), "--quiet", "--no-plots"]) == 0
    a = json.loads((tmp_path / "a" / "sim.json").read_bytes())
    b = json.loads((tmp_path / "b" / "sim.json").read_bytes())
    # Same results; only the recorded command lines differ (--out, --quiet).
    assert a["meta"].pop("command") != b["meta"].pop("command")
    assert a == b
    assert a["meta"]["commit"] and a["meta"]["versions"]["numpy"] and a["meta"]["seed"] == 7
    rows = a["rows"]
    assert len(rows) == 7 * 3 * 2
    assert rows[0].keys() >= ROW_KEYS
    assert {r["requests"] for r in rows} == {300}
    assert (tmp_path / "a" / "sim.csv").read_text().count("\n") == len(rows) + 1
    for png in ("ttft_vs_budget.png", "cost_vs_ttft.png"):
        assert (tmp_path / "a" / png).stat().st_size > 1000


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--policies", "disco,nope"], "unknown policy 'nope'"),
        (["--budgets", "0.5,1.5"], "budgets must be in [0, 1]"),
        (["--budgets", "a,b"], "comma-separated numbers"),
        (["--server-profile", "gpt-9"], "unknown server profile"),
        (["--device-profile", "missing.json"], "device profile file not found"),
        (["--limit", "0"], "--limit must be > 0"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path: Path, capsys, extra, needle) -> None:
    assert main(["sim", "--out", str(tmp_path), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and err.startswith("disco sim: error:")


@pytest.mark.parametrize(
    ("content", "needle"),
    [("", "empty"), ("x,y\n1,2\n", "unknown format"), ("TIMESTAMP,ContextTokens,GeneratedTokens\nbad,1,2\n", "malformed")],
)
def test_bad_traces_exit_2(tmp_path: Path, capsys, content: str, needle: str) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text(content)
    assert main(["sim", "--trace", str(trace), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_sim_with_a_server_preset_runs_the_causal_model(tmp_path: Path, capsys) -> None:
    assert main(["sim", "--list-server-presets"]) == 0
    listed = capsys.readouterr().out
    assert "llamacpp-gemma3-270m-cpu2" in listed and "Source:" in listed
    args = ["sim", "--limit", "150", "--budgets", "0.5", "--policies", "disco,server-only",
            "--server-preset", "llamacpp-gemma3-270m-cpu2", "--replicas", "2", "--quiet",
            "--no-plots", "--migration", "on"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "c")]) == 0
    data = json.loads((tmp_path / "c" / "sim.json").read_text())
    assert data["meta"]["server_preset"] == "llamacpp-gemma3-270m-cpu2"
    assert data["meta"]["replicas"] == 2
    rows = data["rows"]
    assert [r["policy"] for r in rows] == ["disco", "server-only"]
    assert rows[0].keys() >= ROW_KEYS | {"server_gpu_s", "server_cost_tokens"}


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--server-preset", "nope"], "unknown server preset 'nope'"),
        (["--server-preset", "llamacpp-gemma3-270m-cpu2", "--replicas", "0"], "--replicas"),
        (["--server-preset", "llamacpp-gemma3-270m-cpu2", "--policies", "oracle"], "oracle"),
        (["--ray"], "--server-preset"),
    ],
)
def test_sim_preset_errors_are_one_line(tmp_path: Path, capsys, extra, needle) -> None:
    assert main(["sim", "--limit", "20", "--out", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
