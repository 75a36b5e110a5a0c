"""`disco load`'s modes end to end on loopback, each run a few seconds: the SLO's attainment and
goodput, closed-loop users, warm-up/cool-down/ramp, rate and speed-up sweeps against the mock
server, a concurrency sweep against emulated device agents; provenance in every result file;
bad flags refused before anything is sent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from needs import require

from disco.cluster import cli
from disco.loadgen.mock_server import MockConfig, MockServer
from disco.loadgen.records import read_records
from disco.loadgen.sweep import ROW_TAIL

require("locust", load=False)

PROVENANCE = ("commit", "versions", "machine", "seed", "command")


def _azure_trace(path: Path, n: int, gap: float = 0.2) -> Path:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    lines += [f"2023-11-16 18:15:{10 + i * gap:010.7f},{30 + 7 * i},{20 + i}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _load(*args: str) -> int:
    return cli.main(["load", "--tokenizer", "estimate", *args])


def _has_provenance(obj: dict, *expect: str) -> None:
    for key in PROVENANCE:
        assert obj.get(key) is not None, key
    assert obj["command"].startswith("disco load ")
    for part in expect:
        assert part in obj["command"]


def test_slo_attainment_and_goodput_end_to_end(tmp_path: Path) -> None:
    trace = _azure_trace(tmp_path / "t.csv", 5)
    out = tmp_path / "out"
    # Two of five requests wait 0.4 s for their first token: they miss a 200 ms TTFT SLO.
    cfg = MockConfig(ttft_s=0.01, tbt_s=0.002, slow={"r000001": 0.4, "r000003": 0.4})
    with MockServer(cfg) as srv:
        rc = _load("--target", srv.url, "--trace", str(trace), "--max-tokens", "4",
                   "--slo", "ttft=200ms,tbt=150ms", "--out", str(out))  # fmt: skip
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["slo"] == {"ttft_s": 0.2, "tbt_s": 0.15, "tpot_s": None}
    assert (s["requests"], s["slo_met"], s["slo_attainment"]) == (5, 3, 0.6)
    assert s["slo_missed"] == {"ttft": 2, "tbt": 0, "tpot": 0, "error": 0}
    # The trace ends inside the 60 s window: the run's window ends at its last send (0.8 s).
    assert s["measured_window_s"] == pytest.approx(0.8)
    assert s["goodput_per_s"] == pytest.approx(3 / 0.8)
    recs = {r.id: r for r in read_records(out / "requests.jsonl")}
    assert [recs[f"r00000{i}"].slo_ok for i in range(5)] == [True, False, True, False, True]
    assert recs["r000001"].slo_missed == ["ttft"] and recs["r000000"].phase == "measured"
    _has_provenance(s, "--slo ttft=200ms,tbt=150ms")


def test_closed_loop_keeps_n_in_flight_and_sends_on_the_previous_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # ~50 ms per request: 12 requests by 3 users is ~4 rounds.
    with MockServer(MockConfig(ttft_s=0.02, tbt_s=0.01)) as srv:
        rc = _load("--target", srv.url, "--concurrency", "3", "--requests", "12",
                   "--max-tokens", "4", "--out", str(out))  # fmt: skip
        assert rc == 0
        assert len(srv.arrivals) == 12 and srv.max_inflight == 3  # the server's own view
    recs = read_records(out / "requests.jsonl")
    assert len(recs) == 12 and all(r.ok and r.tokens == 4 for r in recs)
    # Never more than 3 in flight, from the client's records too.
    edges = sorted([(r.sent, 1) for r in recs] + [(r.end, -1) for r in recs])
    level, peak = 0, 0
    for _, d in edges:
        level += d
        peak = max(peak, level)
    assert peak == 3
    by_user: dict[int, list] = {}
    for r in sorted(recs, key=lambda r: r.sent):
        by_user.setdefault(r.user, []).append(r)
    assert len(by_user) == 3
    for mine in by_user.values():  # each user's next request goes out as its previous ends
        gaps = [b.sent - a.end for a, b in zip(mine, mine[1:], strict=False)]
        assert gaps and all(0 <= g < 0.05 for g in gaps), gaps
    # In the trace's order (ids follow it), and due when the user became free.
    assert sorted(r.id for r in recs) == [f"r{i:06d}" for i in range(12)]
    assert all(abs(r.lag) < 0.05 for r in recs)
    s = json.loads((out / "summary.json").read_text())
    assert (s["mode"], s["concurrency"], s["requests"], s["offered_rate_per_s"]) == (
        "closed", 3, 12, None)  # fmt: skip


def test_closed_loop_stops_sending_at_its_duration(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # ~0.25 s per request, 2 users, 1 s: about 8 sent of the 40 prepared.
    with MockServer(MockConfig(ttft_s=0.05, tbt_s=0.05)) as srv:
        rc = _load("--target", srv.url, "--concurrency", "2", "--duration", "1",
                   "--requests", "40", "--max-tokens", "5", "--out", str(out))  # fmt: skip
    assert rc == 0
    recs = read_records(out / "requests.jsonl")
    assert 4 <= len(recs) <= 14 and all(r.ok for r in recs)
    assert max(r.due for r in recs) < 1.0
    assert json.loads((out / "summary.json").read_text())["scheduled"] == 40


def test_warmup_cooldown_and_ramp_are_flagged_and_left_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # Poisson at 20/s for 3 s; the rate ramps up over the first 1 s, 0.5 s warm-up after it,
    # 0.5 s cool-down. The first three requests (in the ramp) are slow: out of every number.
    slow = {f"r{i:06d}": 0.5 for i in range(3)}
    with MockServer(MockConfig(ttft_s=0.01, tbt_s=0.002, slow=slow)) as srv:
        rc = _load("--target", srv.url, "--arrivals", "poisson", "--rate", "20",
                   "--duration", "3", "--ramp", "1", "--warmup", "0.5", "--cooldown", "0.5",
                   "--slo", "ttft=300ms", "--max-tokens", "3", "--out", str(out))  # fmt: skip
        sent = len(srv.arrivals)
    assert rc == 0
    recs = read_records(out / "requests.jsonl")
    assert len(recs) == sent  # every request kept
    want = ["warmup" if r.due < 1.5 else "cooldown" if r.due >= 2.5 else "measured" for r in recs]
    assert [r.phase for r in recs] == want
    counted = [r for r in recs if r.phase == "measured"]
    n_warm, n_cool = want.count("warmup"), want.count("cooldown")
    assert counted and n_warm >= 3 and n_cool >= 1
    s = json.loads((out / "summary.json").read_text())
    assert s["requests"] == len(counted) and s["scheduled"] == sent
    assert s["phases"]["warmup"]["requests"] == n_warm
    assert s["phases"]["cooldown"]["requests"] == n_cool
    assert (s["ramp_s"], s["warmup_s"], s["cooldown_s"]) == (1.0, 0.5, 0.5)
    assert (s["measured_from_s"], s["measured_to_s"], s["measured_window_s"]) == (1.5, 2.5, 1.0)
    assert s["ttft_p99_s"] < 0.3  # the slow warm-up requests are not in it
    assert s["slo_attainment"] == 1.0 and s["goodput_per_s"] == pytest.approx(len(counted) / 1.0)
    assert s["offered_rate_per_s"] == pytest.approx(len(counted) / 1.0)
    # Even at the ramp's end the rate is below 20/s: fewer requests than a flat 20/s would send.
    assert sum(1 for r in recs if r.due < 1.0) < 20


def test_rate_sweep_writes_rows_curves_and_a_folder_per_point(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    with MockServer(MockConfig(ttft_s=0.01, tbt_s=0.002)) as srv:
        rc = _load("--target", srv.url, "--rates", "2,5", "--duration", "2", "--slo",
                   "ttft=1s", "--max-tokens", "3", "--label", "mock", "--out", str(out))  # fmt: skip
    assert rc == 0
    data = json.loads((out / "sweep.json").read_text())
    assert data["kind"] == "rate" and data["x"] == "rate"
    assert [list(r) for r in data["rows"]] == [["policy", "rate", *ROW_TAIL]] * 2
    assert [(r["policy"], r["rate"]) for r in data["rows"]] == [("mock", 2.0), ("mock", 5.0)]
    for r, name in zip(data["rows"], ("rate-2", "rate-5"), strict=True):
        point = json.loads((out / name / "summary.json").read_text())
        assert r["requests"] == point["requests"] > 0 and r["errors"] == 0
        assert r["slo_attainment"] == 1.0 and r["goodput"] == pytest.approx(r["requests"] / 2)
        assert r["server_cost"] is None  # a mock is no agent: unknown, not 0
        assert point["sweep_point"] == name and point["label"] == f"mock {name}"
        _has_provenance(point, "--rates 2,5")
        assert (out / name / "requests.jsonl").stat().st_size > 0
    assert data["slo"]["ttft_s"] == 1.0 and data["config"]["points"] == ["rate-2", "rate-5"]
    _has_provenance(data, "--rates 2,5")
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| mock |" in (out / "sweep.md").read_text()


def test_speedup_sweep_replays_the_trace_faster(tmp_path: Path) -> None:
    trace = _azure_trace(tmp_path / "t.csv", 6, gap=0.2)  # 6 requests over 1 s
    out = tmp_path / "sweep"
    with MockServer(MockConfig(ttft_s=0.01, tbt_s=0.002)) as srv:
        rc = _load("--target", srv.url, "--trace", str(trace), "--speedups", "1,2",
                   "--max-tokens", "3", "--out", str(out))  # fmt: skip
    assert rc == 0
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [(r["speedup"], r["requests"], r["policy"]) for r in rows] == [(1.0, 6, None),
                                                                          (2.0, 6, None)]  # fmt: skip
    # The offered rate: 6 requests over the replayed span (1 s, then 0.5 s).
    assert rows[0]["rate"] == pytest.approx(6 / 1.0) and rows[1]["rate"] == pytest.approx(6 / 0.5)
    dues = [r.due for r in read_records(out / "speedup-2" / "requests.jsonl")]
    assert sorted(dues) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])


@pytest.fixture
def agents():
    """Two emulated devices behind the agent's own HTTP API: server first, always."""
    require("uvicorn")
    require("starlette")
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from disco.device_agents.agent_http import BackgroundServer, create_app
    from disco.device_agents.config import FleetConfig, NetworkConfig
    from disco.device_agents.fleet import EmulatedFleet
    from disco.device_agents.local_planner import StaticPlanner

    net = NetworkConfig(rtt_ms=1, jitter_ms=1, distribution="exponential")
    fleet = EmulatedFleet(FleetConfig(devices=2, time_scale=0.02, network=net),
                          planner=StaticPlanner(server_start=0.0, device_start=None))  # fmt: skip
    routes = [Mount(f"/devices/{d}", app=create_app(fleet.agent(d))) for d in fleet.device_ids()]
    srv = BackgroundServer(Starlette(routes=routes))
    base = srv.start()
    yield [f"{base}/devices/{d}" for d in fleet.device_ids()]
    srv.stop()


def test_concurrency_sweep_against_device_agents(tmp_path: Path, agents: list[str]) -> None:
    out = tmp_path / "sweep"
    rc = _load("--target", ",".join(agents), "--concurrencies", "1,2", "--requests", "6",
               "--max-tokens", "6", "--slo", "ttft=5s", "--label", "static",
               "--out", str(out))  # fmt: skip
    assert rc == 0
    data = json.loads((out / "sweep.json").read_text())
    rows = data["rows"]
    assert [list(r) for r in rows] == [["policy", "concurrency", *ROW_TAIL]] * 2
    assert [(r["policy"], r["concurrency"], r["requests"], r["errors"]) for r in rows] == [
        ("static", 1, 6, 0), ("static", 2, 6, 0)]  # fmt: skip
    assert all(r["server_cost"] > 0 and r["slo_attainment"] == 1.0 for r in rows)
    assert data["x"] == "concurrency" and data["points"][1]["mode"] == "closed"
    # The same six requests (prompts built once) at each point.
    first = [r.prompt_tokens for r in read_records(out / "concurrency-1" / "requests.jsonl")]
    second = [r.prompt_tokens for r in read_records(out / "concurrency-2" / "requests.jsonl")]
    assert sorted(first) == sorted(second)
    assert len({r.user for r in read_records(out / "concurrency-2" / "requests.jsonl")}) == 2


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--slo", "ttft=1"], "with its unit"),
        (["--slo", "p99=1s"], "unknown part"),
        (["--concurrency", "0"], "--concurrency must be >= 1"),
        (["--concurrency", "2", "--rate", "3"], "drop --rate"),
        (["--rates", "1,2", "--arrivals", "trace"], "--speedups"),
        (["--rates", "1,2", "--concurrencies", "1,2"], "one of"),
        (["--speedups", "1,2", "--arrivals", "poisson"], "--rates"),
        (["--concurrencies", "1,x"], "not a number"),
        (["--ramp", "1"], "--ramp needs synthetic"),
        (["--concurrency", "2", "--ramp", "1"], "--ramp needs synthetic"),
        (
            ["--concurrency", "2", "--duration", "4", "--warmup", "3", "--cooldown", "1"],
            "nothing left",
        ),
        (["--warmup", "-1"], "--warmup must be >= 0"),
    ],
)
def test_bad_modes_exit_2_before_anything_is_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], match: str
) -> None:
    out = tmp_path / "out"
    with MockServer() as srv:
        rc = _load("--target", srv.url, *args, "--out", str(out))
        assert not srv.arrivals
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("disco load: error:"), err
    assert match in err[0]
    assert not out.exists()
