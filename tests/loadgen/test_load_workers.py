"""`disco load --workers N`: Locust's own master/worker mode against the loopback mock server.

Each worker sends the schedule positions ``p % N == i`` on one shared time zero; the parent
merges the workers' records and progress. Checked: every request sent exactly once across the
workers, the merged report, Ctrl-C, a worker killed mid-run (reported, no hang), bad flags.
No timing is asserted (2 shared cores): only counts, ids and bounded waits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from needs import require

from disco.cluster import cli
from disco.loadgen.mock_server import MockConfig, MockServer
from disco.loadgen.records import RequestRecord, read_records, write_records
from disco.loadgen.runner import (
    LocustRunError,
    format_progress,
    merge_progress,
    merge_records,
    run_locust,
)
from disco.loadgen.schedule import ScheduledRequest, read_schedule
from disco.loadgen.spec import LoadSpec, parse_worker, share, worker_path

require("locust", load=False)


def _azure_trace(path: Path, n: int, gap: float = 0.1, out_tokens: int = 4) -> Path:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    lines += [f"2023-11-16 18:15:{10 + i * gap:010.7f},{30 + 7 * (i % 5)},{out_tokens}"
              for i in range(n)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def _cmd(target: str, trace: Path, out: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "disco.cluster.cli", "load", "--target", target,
            "--trace", str(trace), "--tokenizer", "estimate", "--out", str(out), *more]  # fmt: skip


def _pid_of(marker: str) -> int | None:
    """The process whose command line holds ``marker`` (a path unique to this test's run)."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                args = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker.encode() in args:
                return int(d.name)
    return None


def _wait_for(pred, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.05)
    return pred()


def test_two_workers_send_every_request_exactly_once(tmp_path: Path) -> None:
    trace = _azure_trace(tmp_path / "t.csv", 40)  # 40 requests over 3.9 s
    out = tmp_path / "out"
    with MockServer(MockConfig(ttft_s=0.005, tbt_s=0.002)) as srv:
        rc = cli.main(["load", "--target", srv.url, "--trace", str(trace), "--max-tokens", "4",
                       "--tokenizer", "estimate", "--workers", "2", "--out", str(out)])  # fmt: skip
        assert rc == 0
        assert srv.counters.completed == 40  # the server answered each request once
        arrived = set(srv.arrivals)
    scheduled = [r.id for r in read_schedule(out / "schedule.jsonl")]
    recs = read_records(out / "requests.jsonl")
    ids = [r.id for r in recs]
    assert len(ids) == len(set(ids)) == 40 and set(ids) == set(scheduled) == arrived
    assert all(r.ok and r.tokens == 4 for r in recs)
    # Worker i sent exactly the positions p % 2 == i, and both sent some.
    position = {rid: p for p, rid in enumerate(scheduled)}
    assert all(r.worker == position[r.id] % 2 for r in recs)
    assert {r.worker for r in recs} == {0, 1}
    # One clock origin: the records' due times are the schedule's, whichever worker sent them.
    due = {r.id: r.due for r in read_schedule(out / "schedule.jsonl")}
    assert all(r.due == pytest.approx(due[r.id]) for r in recs)
    s = json.loads((out / "summary.json").read_text())
    assert (s["workers"], s["locust"], s["requests"], s["sent"], s["errors"]) == (
        2, "distributed", 40, 40, 0)  # fmt: skip
    assert s["sent_per_worker"] == [20, 20] and s["workers_unfinished"] == {}
    assert s["send_lag_p50_s"] is not None and s["send_lag_p99_s"] is not None
    # The per-worker record files were merged away; Locust's master wrote the CSV from all.
    assert not list(out.glob("requests.w*.jsonl"))
    stats = (out / "locust_stats.csv").read_text()
    assert "SSE,TTFT,40," in stats


def test_ctrl_c_stops_master_and_workers_and_keeps_what_was_measured(tmp_path: Path) -> None:
    trace = _azure_trace(tmp_path / "t.csv", 4, out_tokens=60)
    out = tmp_path / "out"
    # 200 ms per token: every request is still streaming when we stop.
    with MockServer(MockConfig(ttft_s=0.01, tbt_s=0.2)) as srv:
        proc = subprocess.Popen(_cmd(srv.url, trace, out, "--max-tokens", "50", "--workers", "2"),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            assert _wait_for(lambda: len(srv.arrivals) == 4, 60)
            time.sleep(0.5)  # a few tokens each
            proc.send_signal(signal.SIGINT)
            output, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130, output
    # Master and workers are gone (each one's command line names this run's folder).
    assert _pid_of(str(out / "locust.w0.log")) is None
    assert _pid_of(str(out / "locust.w1.log")) is None
    recs = read_records(out / "requests.jsonl")
    assert sorted(r.id for r in recs) == [f"r00000{i}" for i in range(4)]
    assert all(r.error == "interrupted" and 0 < r.tokens < 50 for r in recs)
    assert {r.worker for r in recs} == {0, 1}
    s = json.loads((out / "summary.json").read_text())
    assert s["interrupted"] is True and s["workers"] == 2 and s["errors"] == 4
    assert "interrupted" in output


def test_a_worker_that_dies_is_reported_and_the_run_ends(tmp_path: Path) -> None:
    trace = _azure_trace(tmp_path / "t.csv", 40)
    out = tmp_path / "out"
    with MockServer(MockConfig(ttft_s=0.005, tbt_s=0.002)) as srv:
        proc = subprocess.Popen(_cmd(srv.url, trace, out, "--max-tokens", "4", "--workers", "2"),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            assert _wait_for(lambda: len(srv.arrivals) >= 6, 60)
            pid = _pid_of(str(out / "locust.w1.log"))
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            output, _ = proc.communicate(timeout=90)  # bounded: no waiting on the dead one
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 1, output
    assert "worker 1 exited with code -9" in output
    s = json.loads((out / "summary.json").read_text())
    assert list(s["workers_unfinished"]) == ["1"]
    recs = read_records(out / "requests.jsonl")
    assert len({r.id for r in recs}) == len(recs)
    # The live worker sent its whole share; the dead one some of its share, not all.
    assert sum(1 for r in recs if r.worker == 0) == 20
    assert s["sent_per_worker"][0] == 20 and s["sent_per_worker"][1] < 20


@pytest.mark.parametrize(
    ("more", "match"),
    [
        (["--workers", "0"], "--workers must be >= 1"),
        (["--workers", "-2"], "--workers must be >= 1"),
        (["--workers", "2", "--concurrency", "2"], "drop --workers"),
    ],
)
def test_bad_workers_fail_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], more: list[str], match: str
) -> None:
    trace = _azure_trace(tmp_path / "t.csv", 3)
    out = tmp_path / "out"
    with MockServer() as srv:
        rc = cli.main(["load", "--target", srv.url, "--trace", str(trace), "--tokenizer",
                       "estimate", "--out", str(out), *more])  # fmt: skip
        assert not srv.arrivals
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("disco load: error:") and match in err[0]
    assert not out.exists()


def test_worker_shares_and_paths() -> None:
    assert parse_worker("1/3") == (1, 3)
    for bad in ("3/3", "-1/2", "x", "1/0", "1"):
        with pytest.raises(ValueError, match="DISCO_LOAD_WORKER"):
            parse_worker(bad)
    shares = [share(10, i, 3) for i in range(3)]
    assert sorted(p for s in shares for p in s) == list(range(10))  # each position once
    assert shares[1] == [1, 4, 7]
    assert worker_path("/x/requests.jsonl", 2) == Path("/x/requests.w2.jsonl")


def test_merge_records_and_progress(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    for w in range(2):
        recs = [RequestRecord(f"r{p}", 0.1 * p, "t", 0.1 * p, 1, 1, worker=w)
                for p in share(5, w, 2)]  # fmt: skip
        write_records(worker_path(path, w), recs)
    assert merge_records(path, 2) == 5
    assert [r.id for r in read_records(path)] == [f"r{p}" for p in range(5)]
    assert not worker_path(path, 0).exists()
    prog = [tmp_path / "progress.w0.json", tmp_path / "progress.w1.json"]
    prog[0].write_text(json.dumps({"total": 3, "sent": 3, "done": 3, "max_lag_s": 0.002,
                                   "elapsed_s": 4.0, "finished": True}))  # fmt: skip
    prog[1].write_text(json.dumps({"total": 2, "sent": 1, "done": 0, "inflight": 1,
                                   "max_lag_s": 0.001, "elapsed_s": 4.1}))  # fmt: skip
    p = merge_progress(prog, 2)
    assert p is not None
    assert (p["total"], p["sent"], p["done"], p["inflight"]) == (5, 4, 3, 1)
    assert (p["max_lag_s"], p["elapsed_s"], p["workers_finished"]) == (0.002, 4.1, 1)
    assert "workers 2/2 (1 done)" in format_progress(p)
    assert merge_progress([tmp_path / "none.json"], 1) is None


def test_a_worker_that_cannot_start_ends_the_run_at_once(tmp_path: Path) -> None:
    # The workers cannot read the schedule (the master never reads it): they exit at start,
    # and the run ends with an error instead of the master waiting for them.
    reqs = [ScheduledRequest(f"r{i}", 0.1 * i, "http://127.0.0.1:9", "p", 1, 1, 1)
            for i in range(4)]  # fmt: skip
    spec = LoadSpec(schedule=str(tmp_path / "missing.jsonl"),
                    records=str(tmp_path / "requests.jsonl"),
                    progress=str(tmp_path / "progress.json"), request_timeout_s=5)  # fmt: skip
    with pytest.raises(LocustRunError, match="before the test started"):
        run_locust(spec, tmp_path, reqs, workers=2, html=False)
    for i in range(2):
        assert _pid_of(str(tmp_path / f"locust.w{i}.log")) is None
    assert _pid_of(str(tmp_path / "locust.log")) is None


def test_a_copied_run_folder_is_found_next_to_its_spec(tmp_path: Path) -> None:
    # A worker on another machine reads a copy of the run folder at another path.
    spec = LoadSpec(schedule="/elsewhere/run/schedule.jsonl",
                    records="/elsewhere/run/requests.jsonl",
                    progress="/elsewhere/run/progress.json")  # fmt: skip
    (tmp_path / "schedule.jsonl").write_text("")
    spec.write(tmp_path / "load_spec.json")
    here = LoadSpec.read(tmp_path / "load_spec.json").located(tmp_path / "load_spec.json")
    assert Path(here.schedule) == tmp_path / "schedule.jsonl"
    assert Path(here.records) == tmp_path / "requests.jsonl"
    assert Path(here.progress) == tmp_path / "progress.json"
    local = LoadSpec(str(tmp_path / "schedule.jsonl"), str(tmp_path / "r.jsonl"), "p.json")
    assert local.located(tmp_path / "load_spec.json") == local
