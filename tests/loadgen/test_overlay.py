"""`disco load --overlay`: finished runs on one figure (a legend entry per label) and side by side
in one table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from disco.cluster import cli
from disco.loadgen.overlay import load_runs, overlay_figure, overlay_table
from disco.loadgen.records import RecordWriter, RequestRecord
from disco.loadgen.report import summarize_records, write_json


def _run_dir(path: Path, label: str, ttft: float, n: int = 6, old_keys: bool = False) -> Path:
    """A finished run's folder as disco load writes it (records and summary)."""
    path.mkdir(parents=True)
    recs = [
        RequestRecord(id=f"r{i}", target="http://x", due=i * 0.1, sent=i * 0.1, prompt_tokens=8,
                      max_tokens=4, status=200, token_times=[ttft + 0.01 * i + 0.02 * k for k in range(4)],
                      token_sources=["server"] * 2 + ["device"] * 2, end=i * 0.1 + 1.0)
        for i in range(n)
    ]  # fmt: skip
    w = RecordWriter(path / "requests.jsonl")
    for r in recs:
        w.write(r)
    w.close()
    summary = {"label": label, **summarize_records(recs), "migrations": n, "server_cost_usd": 0.01}
    if old_keys:  # written before the keys carried their units
        summary = {"label": label, "requests": n, "ttft_mean": ttft}
    write_json(path / "summary.json", summary)
    return path


def test_overlay_draws_one_legend_entry_per_label_and_a_table(tmp_path: Path, capsys) -> None:
    dirs = [_run_dir(tmp_path / "a", "disco", 0.1), _run_dir(tmp_path / "b", "server-only", 0.4),
            _run_dir(tmp_path / "c", "race", 0.2, old_keys=True)]  # fmt: skip
    out = tmp_path / "cmp"
    rc = cli.main(["load", "--overlay", ",".join(map(str, dirs)), "--out", str(out)])
    assert rc == 0
    runs = load_runs(dirs)
    fig = overlay_figure(runs)
    assert len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["disco", "server-only", "race"]
    assert [len(ax.lines) for ax in fig.axes] == [3, 3]  # TTFT and TBT curves, one per run
    data = (out / "overlay.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    md = (out / "overlay.md").read_text()
    head = next(line for line in md.splitlines() if line.startswith("| |"))
    assert head == "| | disco | server-only | race |"
    # Recomputed from the records, so the older run compares too: TTFT means of 125/425/225 ms.
    ttft_row = next(line for line in md.splitlines() if line.startswith("| TTFT mean"))
    assert ttft_row == "| TTFT mean (ms) | 125 | 425 | 225 |"
    assert "| migrations (agents) | 6 | 6 | - |" in md  # the agents' counters as each run wrote
    got = json.loads((out / "overlay.json").read_text())
    assert got["labels"] == ["disco", "server-only", "race"]
    assert "| tokens from device | 12 | 12 | 12 |" in capsys.readouterr().out


def test_a_repeated_label_is_told_apart_by_its_folder(tmp_path: Path) -> None:
    runs = load_runs(
        [_run_dir(tmp_path / "x1", "disco", 0.1), _run_dir(tmp_path / "x2", "disco", 0.2)]
    )
    assert [r.label for r in runs] == ["disco (x1)", "disco (x2)"]
    assert overlay_table(runs).splitlines()[0] == "| | disco (x1) | disco (x2) |"


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--overlay", "MISSING"], "not a disco load output folder"),
        (["--overlay", "GOOD", "--target", "http://127.0.0.1:1"], "drop --target"),
        ([], "--target is required"),
    ],
)
def test_overlay_input_errors_exit_2(tmp_path: Path, capsys, extra: list[str], match: str) -> None:
    good = _run_dir(tmp_path / "good", "disco", 0.1)
    args = [str(good) if a == "GOOD" else str(tmp_path / "nope") if a == "MISSING" else a
            for a in extra]  # fmt: skip
    assert cli.main(["load", *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("disco load: error:") and match in err
