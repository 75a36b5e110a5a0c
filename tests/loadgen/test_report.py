"""Run summaries, tables and plots from raw per-request records."""

from __future__ import annotations

from pathlib import Path

import pytest

from disco.loadgen.records import RecordWriter, RequestRecord, read_records
from disco.loadgen.report import (
    device_side,
    plot_request_timeline,
    summarize_records,
    table,
    timeline_figure,
    timeline_sample,
    write_plots,
)


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
    assert s["ttft_mean_s"] == pytest.approx(0.2)
    assert s["tbt_mean_s"] == pytest.approx((0.1 + 0.2 + 0 + 0 + 0.2) / 5)
    assert s["send_lag_p50_s"] == pytest.approx(0.002)
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
    assert names == ["load_a.png", "load_b.png", "tbt_cdf.png", "timeline_a.png",
                     "timeline_b.png", "ttft_cdf.png"]  # fmt: skip
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the server/device split, hand-overs and units of a run's summary ----------------------------

S, D = "server", "device"


def _tagged(i: int, sources: list[str | None], error: str | None = None) -> RequestRecord:
    rec = _rec(i, [0.1 + 0.01 * k for k in range(len(sources))], error)
    rec.token_sources = list(sources)
    return rec


def _split_records() -> list[RequestRecord]:
    return [
        _tagged(0, [S] * 4),
        _tagged(1, [S, S, D, D, D]),  # migrated at token 2
        _tagged(2, [D, S, D]),  # two hand-overs
        _tagged(3, [None, None]),  # a target that does not tag its tokens
        _tagged(4, [S, D], error="HTTP 503: gone"),  # failed: not in any aggregate
    ]


def test_summary_splits_requests_and_tokens_by_endpoint_and_counts_handovers() -> None:
    recs = _split_records()
    s = summarize_records(recs)
    ok = [r for r in recs if r.ok]
    srcs = [x for r in ok for x in r.token_sources]
    assert (s["first_from_server"], s["first_from_device"], s["first_from_unknown"]) == (2, 1, 1)
    assert s["first_from_server"] + s["first_from_device"] + s["first_from_unknown"] == s["ok"]
    assert (s["tokens_server"], s["tokens_device"]) == (srcs.count(S), srcs.count(D)) == (7, 5)
    assert s["tokens_server"] + s["tokens_device"] + s["tokens_unknown_source"] == s["tokens"]
    assert (s["handovers"], s["requests_with_handover"]) == (3, 2)
    assert recs[1].handovers == [2] and recs[2].handovers == [1, 2] and recs[3].handovers == []


def test_a_record_whose_sources_do_not_line_up_counts_as_unknown() -> None:
    rec = _rec(0, [0.1, 0.2, 0.3])
    rec.token_sources = [S]  # an older record: only the chunks that said
    assert rec.sources == [None, None, None] and rec.first_source is None and rec.handovers == []


UNITLESS = {"requests", "ok", "errors", "tokens", "scheduled", "qoe_mean", "budget_used",
            "first_from_server", "first_from_device", "first_from_unknown", "tokens_server",
            "tokens_device", "tokens_unknown_source", "handovers", "requests_with_handover",
            "migrations", "failovers", "refused"}  # fmt: skip
UNITS = ("_s", "_usd", "_j", "_per_s")


def test_every_numeric_summary_key_names_its_unit() -> None:
    s = {**summarize_records(_split_records()), **device_side({"server_cost_usd": 1.0})}
    for key, value in s.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) or value is None:
            assert key in UNITLESS or key.endswith(UNITS) or key == "regime", key


def test_device_side_is_null_with_the_reason_when_no_agent_counted() -> None:
    d = device_side("http://x: GET /metrics answered HTTP 404")
    for key in ("migrations", "failovers", "server_cost_usd", "device_energy_j", "budget_used",
                "regime", "agent_counters"):  # fmt: skip
        assert d[key] is None, key
    assert "HTTP 404" in d["notes"]["counters"] and "budget_regime" in d["notes"]["budget"]
    got = device_side({"migrations": 2.0, "failovers": 1.0, "server_cost_usd": 0.5,
                       "device_energy_j": 3.0, "completed": 4.0})  # fmt: skip
    assert (got["migrations"], got["failovers"], got["server_cost_usd"]) == (2, 1, 0.5)
    assert got["budget_used"] is None and got["agent_counters"]["completed"] == 4


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _marks(fig) -> dict[str, int]:
    return {c.get_gid(): len(c.get_offsets()) for c in fig.axes[0].collections if c.get_gid()}


def test_timeline_marks_every_token_by_its_endpoint_and_each_handover(tmp_path: Path) -> None:
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    recs = _split_records()
    fig = timeline_figure(recs, "disco")
    marks = _marks(fig)
    every = [x for r in recs for x in r.sources]  # failed requests are drawn too
    assert marks["tokens:server"] == every.count(S) and marks["tokens:device"] == every.count(D)
    assert marks["tokens:unknown"] == every.count(None) == 2
    assert marks["handovers"] == sum(len(r.handovers) for r in recs) == 4
    assert marks["errors"] == 1
    assert "5 requests" in fig.axes[0].get_title()
    plt.close(fig)
    path = plot_request_timeline(recs, tmp_path / "timeline.png", "disco")
    w, h = _png_size(path)
    assert 500 <= w <= 2000 and 250 <= h <= 2000
    assert mpimg.imread(path).shape[:2] == (h, w)  # decodes as an image


def test_timeline_samples_a_large_run_and_says_so() -> None:
    import matplotlib.pyplot as plt

    recs = [_tagged(i, [S, S, D]) for i in range(700)]
    fig = timeline_figure(recs, max_requests=300)
    assert len(timeline_sample(recs, 300)) == 300
    assert _marks(fig)["handovers"] == 300  # one per request shown
    assert "300 of 700 requests" in fig.axes[0].get_title()
    plt.close(fig)


def test_budget_used_comes_from_the_agents_prefill_counters_and_regime() -> None:
    from disco.device_agents.telemetry import AgentMetrics
    from disco.loadgen.counters import Reading, parse_metrics, run_counters

    m = AgentMetrics(regime="server", prompt_tokens=1000, prefill_server=250, prefill_device=900)
    before = parse_metrics(AgentMetrics(regime="server").render())
    after = parse_metrics(m.render())
    assert before is not None and after is not None
    total = run_counters(Reading({"u": before}), Reading({"u": after}), ["u"])
    assert not isinstance(total, str)
    d = device_side(total)
    assert d["regime"] == "server" and d["budget_used"] == pytest.approx(0.25)
    m.regime = "device"
    dd = device_side(run_counters(Reading({"u": before}), Reading({"u": parse_metrics(m.render())}),
                                  ["u"]))  # fmt: skip
    assert dd["regime"] == "device" and dd["budget_used"] == pytest.approx(0.9)
