"""The continuous-batching replica model: load, memory, prefix cache, fast-forward, routing."""

from __future__ import annotations

import numpy as np
import pytest

from disco.scheduler.batching import Replica, ServerPreset, StepModel, power_of_two
from disco.scheduler.presets import (
    SERVER_PRESETS,
    load_preset,
    preset_from_dict,
    preset_profile,
    preset_to_dict,
    save_preset,
)

STEP = StepModel(base_s=0.005, prefill_token_s=1e-4, decode_seq_s=2e-4, context_token_s=1e-7)


def preset(**kw) -> ServerPreset:
    base = dict(name="t", step=STEP, kv_tokens=20_000, max_batched_tokens=2048, max_num_seqs=64)
    base.update(kw)
    return ServerPreset(**base)


def drive(p: ServerPreset, arrivals, prompt=500, out=100, fast=True):
    """Virtual-time driver: submit at arrival, run steps; returns (ttft per seq, replica)."""
    r = Replica(p, record=True)
    arrivals = list(arrivals)
    now, i, step = 0.0, 0, None
    first: dict[str, float] = {}
    tokens: dict[str, list[float]] = {}
    while i < len(arrivals) or not r.idle or step is not None:
        if step is None:
            if r.idle:
                now = max(now, arrivals[i])
            while i < len(arrivals) and arrivals[i] <= now:
                r.submit(str(i), prompt, out, arrivals[i])
                i += 1
            horizon = (arrivals[i] if i < len(arrivals) else np.inf) if fast else None
            step = r.next_step(now, horizon)
            continue
        now = step.end
        for e in r.finish(step):
            tokens.setdefault(e.seq.id, []).extend(e.times.tolist())
            if e.first_index == 0:
                first[e.seq.id] = float(e.times[0]) - e.seq.arrival
        step = None
    return np.array([first[str(k)] for k in range(len(arrivals))]), r, tokens


def poisson(rate: float, n: int, seed: int = 0) -> np.ndarray:
    return np.cumsum(np.random.default_rng(seed).exponential(1 / rate, n))


def test_one_sequence_timing_matches_the_step_model():
    ttft, r, tokens = drive(preset(), [0.0], prompt=500, out=10)
    assert ttft[0] == pytest.approx(STEP.time(500, 0, 0))
    gaps = np.diff(tokens["0"])
    assert len(tokens["0"]) == 10
    assert gaps[0] == pytest.approx(STEP.time(0, 1, 501))  # the decode of token 1 attends 501
    assert r.idle and r.kv_used == 0


def test_ttft_grows_with_offered_load_and_the_queue_drains():
    medians = []
    for rate in (2, 8, 20, 40):
        ttft, r, _ = drive(preset(), poisson(rate, 300))
        medians.append(float(np.median(ttft)))
        assert r.idle and not r.running and not r.waiting and r.kv_used == 0
    assert medians == sorted(medians)
    assert medians[-1] > 5 * medians[0]


def test_fast_forward_gives_the_same_timeline_as_single_steps():
    arr = poisson(15, 200, seed=3)
    a, ra, ta = drive(preset(), arr, fast=True)
    b, rb, tb = drive(preset(), arr, fast=False)
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
    for k in ta:
        np.testing.assert_allclose(ta[k], tb[k], rtol=1e-9, atol=1e-9)
    assert ra.stats.steps == rb.stats.steps


def test_chunked_prefill_respects_the_token_budget():
    p = preset(max_batched_tokens=256)
    r = Replica(p)
    r.submit("a", 1000, 4, 0.0)
    chunks = []
    now = 0.0
    while True:
        step = r.next_step(now)
        chunks.append(step.prefill_tokens)
        now = step.end
        if any(e.first_index == 0 for e in r.finish(step)):
            break
    assert chunks == [256, 256, 256, 232]


def test_running_cap_and_memory_make_requests_wait():
    p = preset(max_num_seqs=2)
    r = Replica(p)
    for k in range(4):
        r.submit(str(k), 100, 50, 0.0)
    r.next_step(0.0)
    assert len(r.running) == 2 and len(r.waiting) == 2
    # Memory: room for one sequence's prompt only.
    r2 = Replica(preset(kv_tokens=160, block_size=16))
    r2.submit("a", 100, 50, 0.0)
    r2.submit("b", 100, 50, 0.0)
    r2.next_step(0.0)
    assert [s.id for s in r2.running] == ["a"] and [s.id for s in r2.waiting] == ["b"]


def test_preemption_when_the_kv_cache_fills_and_everything_still_finishes():
    p = preset(kv_tokens=640, block_size=16)
    _, r, tokens = drive(p, [0.0] * 4, prompt=150, out=150)
    assert r.stats.preemptions > 0
    assert all(len(t) == 150 for t in tokens.values())
    assert r.idle and r.kv_used == 0


def test_prefix_cache_serves_a_resume_of_the_same_request():
    r = Replica(preset())
    r.submit("x/s", 800, 3, 0.0, cache_key="x", shared_tokens=800)
    now = 0.0
    while not r.idle:
        st = r.next_step(now)
        now = st.end
        r.finish(st)
    seq = r.submit("x/m", 800 + 3, 5, now, cache_key="x", shared_tokens=800)
    step = r.next_step(now)
    assert seq.cache_hit == 800 // 16 * 16
    assert step.prefill_tokens == 803 - seq.cache_hit
    off = Replica(preset(prefix_caching=False))
    off.submit("y", 800, 1, 0.0, cache_key="k")
    off.finish(off.next_step(0.0))
    s2 = off.submit("y2", 800, 1, 1.0, cache_key="k")
    off.next_step(1.0)
    assert s2.cache_hit == 0


def test_abort_stops_tokens_and_frees_memory():
    r = Replica(preset())
    r.submit("a", 100, 50, 0.0)
    r.submit("b", 100, 50, 0.0)
    st = r.next_step(0.0)
    r.abort("a", st.start + 1e-6)
    ems = r.finish(st)
    assert [e.seq.id for e in ems] == ["b"]
    assert [s.id for s in r.running] == ["b"]
    assert r.kv_used == r.running[0].kv


def test_cut_shortens_a_decode_run():
    r = Replica(preset())
    r.submit("a", 10, 1000, 0.0)
    first = r.next_step(0.0)
    r.finish(first)
    st = r.next_step(first.end, horizon=np.inf)
    assert len(st.ends) > 10
    r.cut(float(st.ends[4]) + 1e-9)
    assert len(st.ends) == 6  # the sub-steps that started before the cut: 0..5
    r.cut(float(st.ends[2]))
    assert len(st.ends) == 3  # one starting exactly at the cut is not kept


def test_submit_refuses_what_cannot_fit():
    r = Replica(preset(kv_tokens=1000))
    with pytest.raises(ValueError, match="do not fit"):
        r.submit("a", 900, 200, 0.0)
    with pytest.raises(ValueError):
        r.submit("b", 0, 10, 0.0)


def test_step_model_fit_recovers_coefficients_and_refuses_too_little_data():
    rng = np.random.default_rng(0)
    p = rng.integers(0, 4000, 200)
    d = rng.integers(0, 200, 200)
    c = d * rng.integers(100, 4000, 200)
    y = np.array([STEP.time(*x) for x in zip(p, d, c, strict=True)])
    fit = StepModel.fit(p, d, c, y * (1 + 0.01 * rng.standard_normal(y.size)))
    assert fit.prefill_token_s == pytest.approx(STEP.prefill_token_s, rel=0.05)
    assert fit.decode_seq_s == pytest.approx(STEP.decode_seq_s, rel=0.1)
    assert fit.fit_error < 0.02
    with pytest.raises(ValueError):
        StepModel.fit(np.array([1]), np.array([1]), np.array([1]), np.array([0.1]))


def test_power_of_two_prefers_the_less_loaded_replica():
    rng = np.random.default_rng(0)
    picks = [power_of_two([10, 0, 10, 10], rng) for _ in range(400)]
    # Replica 1 is in the pair half of the time (3/6 pairs) and then always wins.
    assert 0.4 < picks.count(1) / 400 < 0.6
    assert power_of_two([5], rng) == 0


def test_presets_round_trip_and_have_sources(tmp_path):
    for name in SERVER_PRESETS.names():
        p = SERVER_PRESETS.get(name)
        assert p.source and p.model and p.hardware
        assert preset_from_dict(preset_to_dict(p)) == p
        prof = preset_profile(p)
        assert prof.tbt_s > 0
    path = tmp_path / "p.json"
    save_preset(preset(), path, date="today", samples=[1, 2])
    assert load_preset(str(path)) == preset()
    with pytest.raises(ValueError, match="not found"):
        load_preset(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="kind"):
        preset_from_dict({"kind": "server", "name": "x"})
