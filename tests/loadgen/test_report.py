"""Run summaries, tables and plots from raw per-request records."""

from __future__ import annotations

from pathlib import Path

import pytest

from disco.loadgen.records import RecordWriter, RequestRecord, read_records
from disco.loadgen.report import summarize_records, table, write_plots


def _rec(i: int, times: list[float], error: str | None = None) -> RequestRecord:
    return RequestRecord(
        id=f"r{i}", target="http://x", due=float(i), sent=i + 0.002, prompt_tokens=10,
        max_tokens=len(times) or 4, status=200 if error is None else 0, error=error,
        token_times=times, end=i + 1.0,
    )  # fmt: skip


def test_summary_uses_every_token_gap_and_skips_failures() -> None:
    recs = [
        _rec(0, [0.1, 0.2, 0.4]),
        _rec(1, [0.3, 0.3, 0.3, 0.5]),  # three tokens in one chunk: two 0 gaps
        _rec(2, [], error="HTTP 500: boom"),
    ]
    s = summarize_records(recs)
    assert (s["requests"], s["ok"], s["errors"], s["tokens"]) == (3, 2, 1, 7)
    assert s["ttft_mean"] == pytest.approx(0.2)
    assert s["tbt_mean"] == pytest.approx((0.1 + 0.2 + 0 + 0 + 0.2) / 5)
    assert s["send_lag_p50"] == pytest.approx(0.002)
    assert 0 < s["qoe_mean"] <= 1


def test_records_round_trip_and_truncated_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    w = RecordWriter(path)
    w.write(_rec(0, [0.1, 0.2]))
    w.close()
    with open(path, "a") as f:
        f.write('{"id": "r1", "targ')  # a writer killed mid-line
    recs = read_records(path)
    assert (
        len(recs) == 1
        and recs[0].token_times == [0.1, 0.2]
        and recs[0].gaps == [pytest.approx(0.1)]
    )


def test_table_formats_milliseconds_and_missing_values() -> None:
    rows = [{"policy": "disco", "ttft_p99": 0.1234, "qoe_mean": None}]
    text = table(rows, ["policy", "ttft_p99", "qoe_mean"])
    assert "TTFT P99 ms" in text and "123" in text and "-" in text.splitlines()[1]
    md = table(rows, ["policy", "ttft_p99"], markdown=True)
    assert md.startswith("| policy |") and "|---|" in md


def test_plots_are_written(tmp_path: Path) -> None:
    runs = {"a": [_rec(0, [0.1, 0.2]), _rec(1, [], "x")], "b": [_rec(0, [0.3, 0.35, 0.5])]}
    paths = write_plots(runs, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["tbt_cdf.png", "timeline_a.png", "timeline_b.png", "ttft_cdf.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
