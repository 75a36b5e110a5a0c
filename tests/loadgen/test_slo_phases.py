"""SLO attainment and goodput, warm-up/cool-down phases, the ramp, the closed-loop pacer and the
sweep's rows and figure: exact numbers on hand-made records, no network."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from disco.loadgen import phases as ph
from disco.loadgen import slo as sl
from disco.loadgen.arrivals import Poisson, TraceLengths, ramp_up, synthetic
from disco.loadgen.pacer import ClosedLoop
from disco.loadgen.records import RequestRecord, read_records, write_records
from disco.loadgen.report import plot_ttft_cdf, summarize_records
from disco.loadgen.sweep import ROW_TAIL, Point, parse_points, row, write_sweep


def _rec(i: int, times: list[float], error: str | None = None, due: float | None = None):
    return RequestRecord(
        id=f"r{i}", target="http://x", due=float(i) if due is None else due,
        sent=(float(i) if due is None else due) + 0.001, prompt_tokens=10,
        max_tokens=max(len(times), 1), status=200 if error is None else 0, error=error,
        token_times=times, end=(float(i) if due is None else due) + 2.0,
    )  # fmt: skip


# ---- parsing ---------------------------------------------------------------------------------


def test_parse_slo_units_and_any_subset() -> None:
    s = sl.parse_slo("ttft=1s,tbt=200ms,tpot=50ms")
    assert (s.ttft_s, s.tbt_s, s.tpot_s) == (1.0, 0.2, 0.05)
    assert sl.parse_slo(" TPOT = 1.5ms ") == sl.SLO(tpot_s=0.0015)
    assert sl.parse_slo("tbt=0.25s").to_dict() == {"ttft_s": None, "tbt_s": 0.25, "tpot_s": None}
    assert str(sl.parse_slo("tbt=200ms,ttft=2s")) == "ttft=2s,tbt=200ms"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("ttft", "NAME=VALUE"),
        ("e2e=1s", "unknown part 'e2e'"),
        ("ttft=1", "with its unit"),
        ("ttft=1h", "with its unit"),
        ("ttft=-1s", "with its unit"),
        ("ttft=0ms", "> 0"),
        ("ttft=1s,ttft=2s", "twice"),
    ],
)
def test_parse_slo_refuses_with_a_clear_message(text: str, match: str) -> None:
    with pytest.raises(sl.SloError, match=match):
        sl.parse_slo(text)


# ---- per-request attainment and goodput: exact numbers -----------------------------------------


def _slo_records() -> list[RequestRecord]:
    return [
        _rec(0, [0.1, 0.2, 0.3]),  # ttft 0.1, largest gap 0.1, tpot 0.1: misses tpot
        _rec(1, [0.5, 0.55, 0.6, 1.0]),  # ttft 0.5, gap 0.4, tpot 0.5/3: misses all three
        _rec(2, [0.2, 0.2, 0.2, 0.26]),  # one chunk then a token: gap 0.06, tpot 0.02: meets
        _rec(3, [0.3]),  # one token, TTFT exactly at the bound: no gap, tpot 0: meets
        _rec(4, [], error="HTTP 500: boom"),  # failed: misses
    ]


def test_request_metrics_follow_vllms_tpot() -> None:
    m = [sl.request_metrics(r) for r in _slo_records()[:4]]
    assert [x["ttft"] for x in m] == pytest.approx([0.1, 0.5, 0.2, 0.3])
    assert [x["tbt"] for x in m] == pytest.approx([0.1, 0.4, 0.06, 0.0])
    assert [x["tpot"] for x in m] == pytest.approx([0.1, 0.5 / 3, 0.02, 0.0])


def test_attainment_and_goodput_on_hand_made_records() -> None:
    recs = _slo_records()
    slo = sl.parse_slo("ttft=300ms,tbt=200ms,tpot=50ms")
    assert [slo.missed(r) for r in recs] == [
        ["tpot"], ["ttft", "tbt", "tpot"], [], [], ["error"],
    ]  # fmt: skip
    got = sl.attainment(recs, slo, window_s=4.0)
    assert got["slo"] == {"ttft_s": 0.3, "tbt_s": 0.2, "tpot_s": 0.05}
    assert got["slo_met"] == 2
    assert got["slo_attainment"] == 2 / 5
    assert got["goodput_per_s"] == 2 / 4.0
    assert got["slo_missed"] == {"ttft": 1, "tbt": 1, "tpot": 2, "error": 1}
    # One part only: TTFT <= 0.3 s: r0, r2, r3 meet it.
    only = sl.attainment(recs, sl.SLO(ttft_s=0.3), window_s=2.0)
    assert (only["slo_met"], only["slo_attainment"], only["goodput_per_s"]) == (3, 0.6, 1.5)
    none = sl.attainment(recs, None, 4.0)
    assert none["slo_attainment"] is None and none["goodput_per_s"] is None


def test_flags_are_kept_in_the_records_file(tmp_path: Path) -> None:
    recs = _slo_records()
    sl.mark(recs, sl.parse_slo("ttft=300ms,tbt=200ms,tpot=50ms"))
    path = tmp_path / "requests.jsonl"
    write_records(path, recs)
    back = read_records(path)
    assert [r.slo_ok for r in back] == [False, False, True, True, False]
    assert back[1].slo_missed == ["ttft", "tbt", "tpot"]
    sl.mark(back, None)
    assert all(r.slo_ok is None and r.slo_missed == [] for r in back)


# ---- phases ----------------------------------------------------------------------------------


def test_phases_flag_every_record_and_only_measured_ones_count() -> None:
    # Ten requests due at 0..9 s of a 10 s run; warm-up 2 s, cool-down 3 s.
    recs = [_rec(i, [0.1 + (1.0 if i in (0, 9) else 0.0), 0.2 + i / 100]) for i in range(10)]
    got = ph.mark(recs, ph.Phases(warmup_s=2.0, cooldown_s=3.0), end_s=10.0)
    assert [r.phase for r in recs] == ["warmup"] * 2 + ["measured"] * 5 + ["cooldown"] * 3
    assert (got["measured_from_s"], got["measured_to_s"], got["measured_window_s"]) == (2, 7, 5)
    assert got["phases"]["measured"] == {"requests": 5, "errors": 0}
    assert got["phases"]["warmup"]["requests"] == 2 and got["phases"]["cooldown"]["requests"] == 3
    kept = ph.measured(recs)
    assert [r.id for r in kept] == ["r2", "r3", "r4", "r5", "r6"]
    s = summarize_records(kept)  # the slow r0 and r9 are out of every number
    assert s["requests"] == 5 and s["ttft_p99_s"] == pytest.approx(0.1)


def test_ramp_comes_before_the_warmup_and_the_run_end_defaults_to_the_last_send() -> None:
    recs = [_rec(i, [0.1]) for i in range(6)]
    got = ph.mark(recs, ph.Phases(warmup_s=1.0, ramp_s=2.0), end_s=None)
    assert [r.phase for r in recs] == ["warmup"] * 3 + ["measured"] * 3  # head: 2 + 1 s
    assert (got["measured_from_s"], got["measured_to_s"]) == (3.0, 5.0)
    with pytest.raises(ValueError, match="nothing left to measure: ramp 2 s"):
        ph.Phases(warmup_s=1.0, ramp_s=2.0, cooldown_s=1.0).check(4.0)


def test_ramp_up_rises_linearly() -> None:
    # u -> t: the cumulative count r t^2 / (2 S) in the ramp, then r (t - S / 2).
    t = ramp_up(np.array([0.0, 0.5, 2.5, 5.0, 6.0]), ramp_s=10.0)
    assert t == pytest.approx([0.0, np.sqrt(10.0), np.sqrt(50.0), 10.0, 11.0])
    lengths = TraceLengths((10,), (5,))
    flat = synthetic(Poisson(50.0), lengths, duration=20.0, seed=1)
    ramped = synthetic(Poisson(50.0), lengths, duration=20.0, seed=1, ramp_s=10.0)
    times = np.array([a.time for a in ramped])
    assert times.max() < 20.0 and np.all(np.diff(times) >= 0)
    counts = np.histogram(times, bins=[0, 5, 10, 20])[0]
    expect = np.array([50 * 25 / 20, 50 * 75 / 20, 500])  # 62.5, 187.5, 500
    assert np.all(np.abs(counts - expect) <= 4 * np.sqrt(expect)), counts
    assert len(flat) > len(ramped)  # the ramp sends r S / 2 fewer
    with pytest.raises(ValueError, match="shorter than the duration"):
        synthetic(Poisson(5.0), lengths, duration=5.0, ramp_s=5.0)


# ---- closed loop -----------------------------------------------------------------------------


def test_closed_loop_hands_out_the_schedule_in_order_and_stops_at_its_duration() -> None:
    now = [0.0]
    loop = ClosedLoop(total=5, duration_s=2.0, clock=lambda: now[0])
    loop.start(1.0)  # time zero a second from now: users spawned early wait for it
    s0 = loop.claim()
    assert s0 is not None and (s0.index, s0.due) == (0, 0.0)
    slept: list[float] = []
    assert loop.wait(s0, lambda dt: (slept.append(dt), now.__setitem__(0, now[0] + dt))) == 1.0
    assert slept == [1.0]
    now[0] = 2.5
    s1 = loop.claim()
    assert s1 is not None and (s1.index, s1.due) == (1, 1.5)  # due when claimed
    assert not loop.exhausted
    now[0] = 3.0  # the duration has passed: nothing more
    assert loop.claim() is None and loop.exhausted and loop.stats().claimed == 2


def test_closed_loop_never_has_more_in_flight_than_users() -> None:
    loop = ClosedLoop(total=60)
    loop.start()
    lock = threading.Lock()
    state = {"in": 0, "max": 0}
    order: list[int] = []

    def user() -> None:
        while (slot := loop.claim()) is not None:
            loop.sent(slot, loop.wait(slot, time.sleep))
            with lock:
                order.append(slot.index)
                state["in"] += 1
                state["max"] = max(state["max"], state["in"])
            time.sleep(0.001 * (slot.index % 3))
            with lock:
                state["in"] -= 1

    threads = [threading.Thread(target=user) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(order) == list(range(60)) and state["max"] <= 4
    assert loop.stats().sent == 60


# ---- sweeps ----------------------------------------------------------------------------------


def test_parse_points() -> None:
    assert [p.name for p in parse_points("rate", "1,2.5")] == ["rate-1", "rate-2.5"]
    assert [p.value for p in parse_points("concurrency", "1,16")] == [1, 16]
    for kind, text, match in [("rate", "1,1", "twice"), ("rate", "0", "> 0"),
                              ("concurrency", "1.5", "whole number"), ("speedup", "x", "number"),
                              ("rate", " ", "empty")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            parse_points(kind, text)


def test_sweep_rows_have_the_issues_keys_and_the_figure_has_every_policy(tmp_path: Path) -> None:
    def summary(p99: float, good: float | None) -> dict:
        return {"requests": 10, "errors": 1, "ttft_p50_s": p99 / 2, "ttft_p99_s": p99,
                "tbt_p99_s": 0.05, "qoe_mean": 0.9, "slo_attainment": 0.8,
                "goodput_per_s": good, "server_cost_usd": 1e-4, "budget_used": 0.3,
                "offered_rate_per_s": 2.2, "ok_per_s": 1.9, "mode": "open"}  # fmt: skip

    rows, points = [], []
    for pol, scale in (("disco", 1.0), ("server-only", 2.0)):
        for rate in (1.0, 2.0):
            pt = Point("rate", rate)
            s = summary(0.5 * rate * scale, rate * 0.9 / scale)
            rows.append(row(pol, pt, s, costs={"server_cost_usd": 2e-4, "budget_used": 0.25}))
            points.append({"policy": pol, "point": pt.name, "ok_per_s": 1.9})
    assert list(rows[0]) == ["policy", "rate", *ROW_TAIL]
    assert rows[0]["server_cost"] == 2e-4 and rows[0]["budget_used"] == 0.25
    sp = row(None, Point("speedup", 2.0), summary(1.0, 1.0))
    assert (sp["rate"], sp["speedup"], sp["policy"], sp["server_cost"]) == (2.2, 2.0, None, 1e-4)
    closed = row("x", Point("concurrency", 4), summary(1.0, 1.0))
    assert list(closed)[:2] == ["policy", "concurrency"] and closed["concurrency"] == 4
    paths = write_sweep(tmp_path, "rate", rows, points, slo={"ttft_s": 1.0, "tbt_s": None,
                        "tpot_s": None}, meta={"commit": "abc"})  # fmt: skip
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["rows"] == rows and data["x"] == "rate" and data["commit"] == "abc"
    assert "USD" in data["units"] and "seconds" in data["units"]
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| disco | 1 |" in (tmp_path / "sweep.md").read_text()
    assert [p.name for p in paths] == ["sweep.json", "sweep.md", "sweep.png"]


def test_ttft_cdf_marks_the_slo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    captured = {}
    real = Figure.savefig

    def keep(fig, *a, **kw):  # look at the figure as it is saved
        captured["fig"] = fig
        return real(fig, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", keep)
    plot_ttft_cdf({"run": _slo_records()}, tmp_path / "ttft.png", sl.SLO(ttft_s=0.3))
    ax = captured["fig"].axes[0]
    line = next(ln for ln in ax.lines if ln.get_gid() == "slo:ttft_s")
    assert line.get_xdata()[0] == pytest.approx(300.0)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    # 3 of the 5 requests (the failed one counted) got their first token within 300 ms.
    assert "run, 60 % within (n=4)" in labels and "TTFT SLO 300 ms" in labels


def test_poisson_given_its_count_offers_exactly_its_rate() -> None:
    from disco.loadgen.arrivals import poisson_given_count

    lengths = TraceLengths((10, 20), (5, 6))
    got = poisson_given_count(2.5, lengths, 30.0, seed=3)
    times = [a.time for a in got]
    assert len(got) == 75 and times == sorted(times) and times[0] >= 0 and times[-1] < 30.0
    assert got == poisson_given_count(2.5, lengths, 30.0, seed=3)  # seeded
