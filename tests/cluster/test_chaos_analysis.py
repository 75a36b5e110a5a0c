"""What `disco bench chaos` and `disco bench soak` count, on hand-made records (no Ray)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from disco.cluster import chaos, soak
from disco.cluster.chaos import Fault, classify, device_deaths, recoveries, stream_order, summarize
from disco.cluster.chaos_load import StreamRecord


def rec(i: int, device: str, sent: float, times, sources, *, index=None, done=True, end=None,
        status=200, error=None, prompt_tokens=20) -> StreamRecord:  # fmt: skip
    r = StreamRecord(i, device, sent, 10, len(times), prompt_tokens=prompt_tokens, status=status)
    r.t, r.source = list(times), [{"s": "server", "d": "device"}[c] for c in sources]
    r.index = list(range(len(times))) if index is None else list(index)
    r.done, r.error = done, error
    r.finish_reason = "length" if done and error is None else None
    r.end = end if end is not None else (times[-1] if times else sent + 1.0)
    return r


def test_order_is_judged_from_the_indices_the_user_got():
    ok = rec(0, "d", 0.0, [1, 2, 3], "sss")
    assert stream_order(ok) == (0, 0, 0) and ok.complete
    dup = rec(1, "d", 0.0, [1, 2, 3, 4], "ssdd", index=[0, 1, 1, 2])
    assert stream_order(dup) == (1, 0, 0) and not dup.complete
    back = rec(2, "d", 0.0, [1, 2, 3], "sss", index=[0, 2, 1])
    assert stream_order(back) == (0, 1, 0)
    hole = rec(3, "d", 0.0, [1, 2], "ss", index=[0, 2])
    assert stream_order(hole) == (0, 0, 1)


def test_a_loss_is_excused_only_when_the_users_own_device_died():
    kill = Fault(10.0, "fleet_kill", "fleet0", until=13.0, detail={"devices": ["fleet0-1"]})
    deaths = device_deaths([kill])
    cut = rec(0, "fleet0-1", 9.0, [9.5], "d", done=False, end=10.01, error="ReadError")
    other = rec(1, "fleet1-0", 9.0, [9.5], "d", done=False, end=10.01, error="ReadError")
    later = rec(2, "fleet0-1", 20.0, [20.5], "d", done=False, end=21.0, error="ReadError")
    assert classify(cut, deaths) == "device_lost"
    assert classify(other, deaths) == "lost"
    assert classify(later, deaths) == "lost"
    assert classify(rec(3, "x", 0.0, [], "", status=429, done=False), deaths) == "refused"
    assert classify(rec(4, "x", 0.0, [0.5], "s"), deaths) == "finished"
    hung = rec(5, "agent-0", 0.0, [0.5], "s", done=False, error="hung")
    assert classify(hung, deaths) == "lost"


def test_recovery_is_the_fault_to_the_next_token_of_each_affected_stream():
    kill = Fault(10.0, "replica_kill", "r1")
    handed = rec(0, "fleet0-0", 8.0, [9.8, 9.9, 10.7, 10.8], "ssdd")  # failed over: 0.7 s
    steady = rec(1, "fleet0-1", 8.0, [9.9, 10.0, 10.1], "sss")  # the other replica: untouched
    on_device = rec(2, "fleet0-2", 8.0, [9.9, 10.5], "dd")  # not on the server: out of scope
    rows = recoveries([handed, steady, on_device], [kill])
    assert [(r["request"], round(r["recovery_s"], 3), r["handover"]) for r in rows] == [
        (0, 0.7, True)
    ]
    fail = Fault(20.0, "engine_fail", "agent-0")
    waiting = rec(3, "agent-0", 19.5, [21.0, 21.1], "ss")  # before its first token
    rows = recoveries([waiting], [fail], prefill_of=lambda r, to, k: 0.25)
    assert rows[0]["recovery_s"] == pytest.approx(1.0) and rows[0]["excess_s"] == pytest.approx(0.75)
    part = Fault(30.0, "partition", "fleet0-3")
    stalled = rec(4, "fleet0-3", 29.0, [29.9, 30.0, 31.6], "ssd")
    elsewhere = rec(5, "fleet0-0", 29.0, [29.9, 30.0, 31.6], "ssd")
    assert [r["request"] for r in recoveries([stalled, elsewhere], [part])] == [4]


def test_the_summary_counts_and_the_budget_drift():
    faults = [Fault(10.0, "replica_kill", "r1"), Fault(12.0, "scheduler_kill",
              detail={"restart_s": 1.5}), Fault(14.0, "partition", "x", error="boom")]  # fmt: skip
    records = [rec(0, "d", 8.0, [9.8, 10.6], "sd"), rec(1, "d", 9.0, [9.5], "s", done=False,
               error="stream error: both endpoints failed")]  # fmt: skip
    s = summarize(records, faults, budget={"target": 0.5, "spent_share": 0.52})
    assert (s["requests"], s["finished"], s["lost"], s["device_lost"]) == (2, 1, 1, 0)
    assert s["faults"] == {"replica_kill": 1, "scheduler_kill": 1} and s["faults_failed"] == 1
    assert s["budget_drift"] == pytest.approx(0.02)
    assert s["scheduler_restart_s_max"] == 1.5 and s["recovery_streams"] == 1
    assert s["lost_requests"][0]["request"] == 1
    json.dumps(chaos._finite(s))  # plain JSON


def test_the_timeline_is_drawn(tmp_path: Path):
    faults = [Fault(1.0, "partition", "d", until=2.0), Fault(1.5, "fleet_kill", "f",
              until=3.0, detail={"devices": ["d"]})]  # fmt: skip
    records = [rec(0, "d", 0.0, [0.5, 1.2], "sd"), rec(1, "d", 1.4, [], "", done=False)]
    path = chaos.plot_timeline(records, faults, tmp_path / "t.png")
    assert path.stat().st_size > 10_000


def test_the_cli_refuses_unknown_kinds_and_bad_numbers(tmp_path: Path):
    assert chaos.main(["--out", str(tmp_path), "--kinds", "meteor"]) == 2
    assert chaos.main(["--out", str(tmp_path), "--duration", "0"]) == 2
    assert soak.main(["--out", str(tmp_path), "--sample-every", "0"]) == 2


# ---- soak --------------------------------------------------------------------------------------


def test_growth_is_a_slope_per_hour_after_warm_up():
    ts = [0, 60, 120, 180, 240, 300]
    rss = [50, 100, 101, 102, 103, 104]  # the warm-up jump is not growth
    g = soak.growth(ts, rss, warmup_s=60)
    assert g["after_warmup"] == 100 and g["last"] == 104 and g["samples"] == 5
    assert g["slope_per_h"] == pytest.approx(60.0, rel=0.05)  # 1 MiB/min
    assert g["max_dev_pct"] == pytest.approx(4.0) and g["change_pct"] == pytest.approx(4.0)
    assert soak.growth([0, 1], [1, 2], warmup_s=10) is None


def test_flatness_follows_the_issues_goals():
    samples = [{"t": t, "project": {"agent": {"rss_mib": 100 + 3 * k, "fds": 10, "tasks": 2 + k % 3}},
                "ray": {}, "bench": {}, "object_store": None}
               for k, t in enumerate([0, 10, 20, 30])]  # fmt: skip
    flat = soak.flatness(samples, warmup_s=0)["project:agent"]
    assert flat["rss_within_5pct"] is False and flat["fds_flat"] and flat["tasks_flat"]
    growing = [{"t": 10 * k, "project": {"a": {"rss_mib": 100, "fds": 10 + 3 * k, "tasks": 2}},
                "ray": {}, "bench": {}, "object_store": None} for k in range(8)]  # fmt: skip
    flat = soak.flatness(growing, warmup_s=0)["project:a"]
    assert flat["rss_within_5pct"] and not flat["fds_flat"] and flat["tasks_flat"]
    assert flat["fds_quarters"] == [11.5, 29.5]


def test_process_stats_with_and_without_psutil(monkeypatch: pytest.MonkeyPatch):
    mine = soak.proc_stats(os.getpid())
    assert mine["rss_mib"] > 10 and mine["fds"] >= 3
    import builtins

    real_import = builtins.__import__

    def no_psutil(name, *a, **kw):
        if name == "psutil":
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_psutil)
    proc = soak.proc_stats(os.getpid())
    assert proc["rss_mib"] == pytest.approx(mine["rss_mib"], rel=0.2) and proc["fds"] >= 3
    assert soak.proc_stats(2**22 + 12345) is None  # no such process
