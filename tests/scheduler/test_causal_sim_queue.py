"""The causal simulator with shared devices: FIFO slots, the queue a plan sees, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from disco.cluster.cli import main
from disco.scheduler.batching import ServerPreset, StepModel
from disco.scheduler.causal_sim import CausalSettings, CausalSim, assign_devices, run_causal
from disco.scheduler.device_queue import queue_state
from disco.scheduler.policies import PolicyConfig, make_policy
from disco.scheduler.presets import preset_profile
from disco.scheduler.profiles import DEVICE_PROFILES, DeviceProfile
from disco.scheduler.traces import TraceRecord, default_trace_path, load_trace
from disco.scheduler.types import DeviceQueue, EndpointKind, Plan, Regime

PRESET = ServerPreset(
    name="test-gpu", step=StepModel(0.006, 6e-5, 1.5e-4, 2e-8), kv_tokens=200_000,
    max_batched_tokens=4096, max_num_seqs=64, usd_per_hour=3.0, input_per_mtok=0.15,
    output_per_mtok=0.6, model="test", hardware="test", source="test",
)  # fmt: skip
# Constant speeds for hand-computed times: TTFT = 0.5 + context / 100 s, a token every 0.1 s.
CONST = DeviceProfile("const", ttft_base_s=0.5, prefill_tps=100.0, decode_tps=10.0, params_b=0.5,
                      j_per_gflop=0.1)  # fmt: skip
DEVICE = DEVICE_PROFILES.get("xiaomi14-qwen0.5b")
NO_RTT = CausalSettings(rtt_s=0.0)
RACE, ALONE = (0.0, 0.0), (None, 0.0)


class Scripted:
    """Plans each request as told (server start, device start); logs what it sees."""

    def __init__(self, starts: dict[str, tuple[float | None, float | None]]) -> None:
        self.starts = starts
        self.queues: dict[str, DeviceQueue | None] = {}
        self.observed: list = []

    def plan(self, request, now):
        self.queues[request.id] = request.device_queue
        s, d = self.starts[request.id]
        return Plan(request.id, s, d, policy="scripted")

    def observe(self, outcome):
        self.observed.append(outcome)

    def expected_output_tokens(self, prompt_tokens):
        return np.atleast_1d(np.asarray(prompt_tokens, dtype=float)) * 0 + 128.0


def scripted_run(records, starts, settings=NO_RTT, device_ids=None):
    pol = Scripted({str(i): s for i, s in enumerate(starts)})
    ids = [0] * len(records) if device_ids is None else device_ids
    res = run_causal(pol, records, PRESET, CONST, settings, Regime.SERVER_CONSTRAINED,
                     device_ids=ids)  # fmt: skip
    return pol, res


def test_device_only_ttft_grows_with_the_queue_as_fifo_predicts():
    recs = [TraceRecord(0.0, 50, 10), TraceRecord(0.1, 50, 10), TraceRecord(0.2, 100, 5)]
    pol, res = scripted_run(recs, [ALONE] * 3)
    a, b, c = res.outcomes
    # Served one after the other; each prefill starts when the slot frees, not at the arrival.
    assert a.token_times == pytest.approx(1.0 + 0.1 * np.arange(10))
    assert b.token_times == pytest.approx(1.9 + 1.0 + 0.1 * np.arange(10))
    assert c.token_times == pytest.approx(3.8 + 1.5 + 0.1 * np.arange(5))
    assert [o.ttft for o in res.outcomes] == pytest.approx([1.0, 2.8, 5.1])
    assert res.device_waits == pytest.approx([0.0, 1.8, 3.6])
    assert res.summary["device_wait_mean"] == pytest.approx(1.8)
    # The queue each plan saw (the agent's rule; expected length: the prior, nothing finished).
    assert pol.queues["0"] == DeviceQueue(0, 0, 0, 0.0, 1)
    assert pol.queues["1"] == DeviceQueue(1, 0, 0, 10.0, 1)  # min(max_tokens 10, 128)
    assert pol.queues["2"] == DeviceQueue(1, 1, 50, 20.0, 1)
    # Two slots: the second request starts at once, the third when the first ends.
    _, two = scripted_run(recs, [ALONE] * 3, CausalSettings(rtt_s=0.0, device_slots=2))
    assert [o.ttft for o in two.outcomes] == pytest.approx([1.0, 1.0, 1.9 + 1.5 - 0.2])
    # Separate devices: nobody waits.
    _, own = scripted_run(recs, [ALONE] * 3, device_ids=[0, 1, 2])
    assert [o.ttft for o in own.outcomes] == pytest.approx([1.0, 1.0, 1.5])


def test_a_cancelled_loser_frees_its_slot_at_the_cancel_time():
    # A race whose device loses (a 400-token prompt takes 4.5 s on the device), then a request
    # for the device alone: it gets the slot when the loser is cancelled, at the server's first
    # token as the device receives it (rtt/2 after the replica emits it).
    recs = [TraceRecord(0.0, 400, 8), TraceRecord(0.01, 50, 5)]
    _, res = scripted_run(recs, [RACE, ALONE], CausalSettings(rtt_s=0.05))
    race, alone = res.outcomes
    assert race.first_token_from is EndpointKind.SERVER
    t_cancel = race.token_times[0]
    assert t_cancel < 4.5
    assert alone.token_times[0] == pytest.approx(t_cancel + 1.0)
    assert res.device_waits == pytest.approx([0.0, t_cancel - 0.01])
    assert race.device_prompt_tokens == 400 and race.device_started  # it had its slot


def test_a_stream_cancelled_while_waiting_leaves_the_queue_without_work():
    recs = [TraceRecord(0.0, 50, 10), TraceRecord(0.1, 50, 8), TraceRecord(0.2, 50, 5)]
    _, res = scripted_run(recs, [ALONE, RACE, ALONE])
    first, race, last = res.outcomes
    assert race.first_token_from is EndpointKind.SERVER and race.ttft < 1.0
    assert race.device_prompt_tokens == 0 and race.device_output_tokens == 0
    assert race.device_started is False  # it never got the slot
    assert last.token_times[0] == pytest.approx(1.9 + 1.0)  # next after the first, not the race
    assert res.device_waits == pytest.approx([0.0, 1.7])


def test_a_request_for_the_saturated_device_alone_is_refused():
    recs = [TraceRecord(0.1 * i, 50, 10) for i in range(4)]
    settings = CausalSettings(rtt_s=0.0, max_device_queue=1)
    pol, res = scripted_run(recs, [ALONE, ALONE, ALONE, RACE], settings)
    refused = res.outcomes[2]
    assert refused.refused and refused.error and len(refused.token_times) == 0
    assert refused.server_prompt_tokens == refused.device_prompt_tokens == 0
    assert not refused.server_started and not refused.device_started
    assert refused in pol.observed  # the policy drops its reservation
    # One waits already: the race still runs (its server needs no device slot).
    assert not any(o.refused for i, o in enumerate(res.outcomes) if i != 2)
    assert res.outcomes[3].first_token_from is EndpointKind.SERVER
    s = res.summary
    assert (s["requests"], s["refused"], s["errors"]) == (4, 1, 0)
    ttfts = [o.ttft for i, o in enumerate(res.outcomes) if i != 2]
    assert s["ttft_mean"] == pytest.approx(np.mean(ttfts))  # the refused one is not in it
    # Without a limit nobody is refused.
    _, free = scripted_run(recs, [ALONE, ALONE, ALONE, RACE])
    assert free.summary["refused"] == 0 and free.summary["errors"] == 0


def test_queue_state_is_the_agents_rule():
    q = queue_state([(3, 10), (0, 500)], [(40, 200), (60, 20)], 100.0, 2)
    # running: max(1, min(10 - 3, 100 - 3)) + max(1, min(500, 100)); waiting: 100 + 20
    assert q == DeviceQueue(2, 2, 100, 7.0 + 100.0 + 100.0 + 20.0, 2)
    assert queue_state([(120, 500)], [], 100.0, 1).decode_tokens == 1.0  # past the mean


@pytest.mark.parametrize("slots", [1, 2])
def test_shared_devices_never_exceed_their_slots_and_serve_in_fifo_order(slots):
    trace = load_trace(default_trace_path())[:300]
    recs = [TraceRecord(r.arrival / 2, r.prompt_tokens, r.output_tokens) for r in trace]
    for name in ("race", "disco"):
        cfg = PolicyConfig(regime=Regime.SERVER_CONSTRAINED, budget=0.5, migration=True,
                           window=200, recompute_every=10)  # fmt: skip
        pol = make_policy(name, cfg, preset_profile(PRESET), DEVICE)
        settings = CausalSettings(replicas=1, users=20, device_slots=slots, max_device_queue=3)
        sim = CausalSim(pol, PRESET, DEVICE, settings)
        outs = sim.run(recs)
        assert len(outs) == len(recs) and not any(o.error and not o.refused for o in outs)
        for o in outs:
            if not o.refused:
                n = recs[int(o.request_id)].output_tokens
                assert len(o.token_times) == n and np.all(np.diff(o.token_times) >= -1e-12)
        legs = [(r.box.id, x) for r in sim.reqs for x in r.legs if x.kind is EndpointKind.DEVICE]
        assert all(x.freed_at is not None for _, x in legs)  # every slot given back
        for box in sim.boxes.values():
            assert not box.running and not box.waiting
            mine = sorted((x for b, x in legs if b == box.id and x.granted),
                          key=lambda x: (x.asked, x.start))  # fmt: skip
            starts = np.array([x.start for x in mine])
            ends = np.array([x.freed_at for x in mine])
            assert np.all(np.diff(starts) >= 0)  # FIFO: asked earlier, served no later
            for t in starts:  # streams holding a slot at each start
                assert np.sum((starts <= t) & (ends > t)) <= slots
        if name == "race":
            assert sum(o.migrated_at is not None for o in outs) > 0


def test_users_draws_devices_with_the_seed():
    ids = assign_devices(1000, 4, seed=3)
    assert set(ids.tolist()) == {0, 1, 2, 3} and np.array_equal(ids, assign_devices(1000, 4, 3))
    assert not np.array_equal(ids, assign_devices(1000, 4, 4))
    trace = load_trace(default_trace_path())[:120]
    recs = [TraceRecord(r.arrival * 20, r.prompt_tokens, r.output_tokens) for r in trace]

    def run(settings, device_ids=None):
        cfg = PolicyConfig(regime=Regime.SERVER_CONSTRAINED, budget=0.3, window=200,
                           recompute_every=10)  # fmt: skip
        pol = make_policy("disco", cfg, preset_profile(PRESET), DEVICE)
        return run_causal(pol, recs, PRESET, DEVICE, settings, device_ids=device_ids).summary

    drawn = run(CausalSettings(seed=3, users=4))
    assert drawn == run(CausalSettings(seed=3), assign_devices(len(recs), 4, 3).tolist())
    assert drawn["device_wait_mean"] > 0


# --- (b) the server-constrained regime with a few devices ----------------------------------------


def at_rate(records, rate: float, seed: int = 1) -> list[TraceRecord]:
    """The trace's lengths with Poisson arrivals at ``rate`` per second."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(records))
    t = np.cumsum(gaps) - gaps[0]
    return [TraceRecord(float(a), r.prompt_tokens, r.output_tokens) for a, r in zip(t, records, strict=True)]


class ColdSpy:
    """Wraps DiSCo; notes whether it had fitted a threshold yet when it planned each request."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.cold: dict[str, bool] = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def plan(self, request, now):
        self.cold[request.id] = bool(np.isinf(self.inner.threshold))
        return self.inner.plan(request, now)


def test_budget_refusals_and_queue_awareness_with_two_devices():
    # 200 requests on 2 devices (xiaomi14-qwen0.5b: ~10 s of device work per request on this
    # trace): 0.1 req/s loads each device about half (carriable), 0.4 req/s twice over (not).
    trace = load_trace(default_trace_path())[:200]
    b, lo, hi = 0.3, 0.1, 0.4
    res = {}
    for rate in (lo, hi):
        recs = at_rate(trace, rate)
        for limit in (None, 2):
            for aware in (True, False):
                cfg = PolicyConfig(regime=Regime.SERVER_CONSTRAINED, budget=b, migration=False,
                                   window=200, recompute_every=10, device_queue_aware=aware)  # fmt: skip
                pol = ColdSpy(make_policy("disco", cfg, preset_profile(PRESET), DEVICE))
                r = run_causal(pol, recs, PRESET, DEVICE,
                               CausalSettings(users=2, max_device_queue=limit))  # fmt: skip
                res[rate, limit, aware] = (r, pol)
                assert r.summary["budget_used"] <= b + 0.02, (rate, limit, aware, r.summary)
                assert pol.inner.inflight_seen == 0.0  # refused ones released their reservation
    summary = {k: v[0].summary for k, v in res.items()}
    for rate in (lo, hi):
        assert summary[rate, None, True]["refused"] == 0
    # Refusals: many when the devices cannot carry the load; at the carriable rate at most the
    # cold start's (DiSCo-S races nothing before its first fit, whatever the queue).
    over = summary[hi, 2, True]
    assert over["refused"] >= 0.1 * len(trace)
    r_lo, spy_lo = res[lo, 2, True]
    assert all(spy_lo.cold[o.request_id] for o in r_lo.outcomes if o.refused)
    assert over["device_wait_p99"] < summary[hi, None, True]["device_wait_p99"]  # bounded queue
    # Seeing the queue: a request behind a busy device races the server.
    assert summary[lo, None, True]["ttft_mean"] < summary[lo, None, False]["ttft_mean"]


# --- (c) the CLI ------------------------------------------------------------------------------

PRESET_ARGS = ["--server-preset", "llamacpp-gemma3-270m-cpu2"]


def test_sim_users_flags(tmp_path: Path, capsys) -> None:
    args = ["sim", "--limit", "150", "--budgets", "0.3", "--policies", "disco,device-only",
            *PRESET_ARGS, "--migration", "off", "--no-plots", "--users", "3",
            "--device-slots", "1", "--max-device-queue", "2", "--out", str(tmp_path / "q")]  # fmt: skip
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "refused" in table and "dq_wait" in table
    data = json.loads((tmp_path / "q" / "sim.json").read_text())
    meta, rows = data["meta"], data["rows"]
    assert (meta["users"], meta["device_slots"], meta["max_device_queue"]) == (3, 1, 2)
    for r in rows:
        assert r["refused"] >= 0 and r["device_wait_mean"] >= 0 and r["device_wait_p99"] >= 0
    only = next(r for r in rows if r["policy"] == "device-only")
    assert only["refused"] > 0  # 3 devices cannot carry the trace's rate
    header = (tmp_path / "q" / "sim.csv").read_text().splitlines()[0].split(",")
    assert {"refused", "device_wait_mean", "device_wait_p99"} <= set(header)
    # Without --users: no device-queue columns.
    plain = ["sim", "--limit", "40", "--budgets", "0.3", "--policies", "disco", *PRESET_ARGS,
             "--migration", "off", "--no-plots", "--quiet", "--out", str(tmp_path / "p")]  # fmt: skip
    assert main(plain) == 0
    row = json.loads((tmp_path / "p" / "sim.json").read_text())["rows"][0]
    assert "refused" not in row and "users" not in json.loads(
        (tmp_path / "p" / "sim.json").read_text())["meta"]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ([*PRESET_ARGS, "--users", "0"], "--users must be >= 1"),
        ([*PRESET_ARGS, "--users", "2", "--device-slots", "0"], "--device-slots must be >= 1"),
        ([*PRESET_ARGS, "--users", "2", "--max-device-queue", "-1"], "--max-device-queue must be"),
        ([*PRESET_ARGS, "--device-slots", "2"], "--device-slots needs --users"),
        ([*PRESET_ARGS, "--max-device-queue", "2"], "--max-device-queue needs --users"),
        (["--users", "2"], "--users needs --server-preset"),
    ],
)
def test_sim_users_errors_exit_2(tmp_path: Path, capsys, extra, needle) -> None:
    assert main(["sim", "--limit", "20", "--quiet", "--out", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and err.startswith("disco sim: error:")
