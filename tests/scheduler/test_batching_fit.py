"""Fitting a step model from client-side measurements (scheduler/batching_fit.py).

The measurements are a preset's own, made by running the pure Replica model in virtual time the way
``disco profile --fit-batching`` measures a live server: single requests on an idle replica (TTFT
and their decode gaps), then N streams started together (inter-token gaps while all decode).
"""

from __future__ import annotations

import numpy as np
import pytest

from disco.scheduler.batching import Replica, ServerPreset, StepModel
from disco.scheduler.batching_fit import (
    GapPoint,
    TtftPoint,
    fit_batching,
    gap_point,
    predict,
)

TRUE = ServerPreset(
    name="true",
    step=StepModel(base_s=0.006, prefill_token_s=1.2e-4, decode_seq_s=3e-4, context_token_s=2e-7),
    kv_tokens=400_000,
    max_batched_tokens=2048,
    max_num_seqs=64,
)
LENS = (32, 128, 512, 1024, 3000)  # 3000: two prefill chunks under a 2048-token budget
CONCURRENCY = (1, 2, 4, 8, 16, 32)


def run_together(preset: ServerPreset, prompts: list[int], max_tokens: int) -> list[np.ndarray]:
    """Token times of streams all submitted at t = 0 to an idle replica (virtual clock)."""
    rep = Replica(preset)
    for i, p in enumerate(prompts):
        rep.submit(f"s{i}", p, max_tokens, 0.0)
    times: dict[str, list[float]] = {f"s{i}": [] for i in range(len(prompts))}
    now = 0.0
    while (step := rep.next_step(now)) is not None:
        for em in rep.finish(step):
            times[em.seq.id].extend(em.times.tolist())
        now = step.end
    return [np.array(times[f"s{i}"]) for i in range(len(prompts))]


def measure(
    preset: ServerPreset, max_tokens: int = 24, itl_prompt: int = 64
) -> tuple[list[TtftPoint], list[GapPoint]]:
    ttft: list[TtftPoint] = []
    gaps: list[GapPoint] = []
    for n in LENS:
        (t,) = run_together(preset, [n], max_tokens)
        ttft.append(TtftPoint(n, float(t[0])))
        gaps.append(gap_point([(n, t)]))  # a lone stream's decode: D = 1 at growing context
    for c in CONCURRENCY:
        streams = run_together(preset, [itl_prompt] * c, max_tokens)
        gaps.append(gap_point([(itl_prompt, t) for t in streams]))
    assert all(g is not None for g in gaps)
    return ttft, gaps


def rel(a: float, b: float) -> float:
    return abs(a - b) / b


def test_fits_a_presets_own_measurements_back_to_its_coefficients():
    ttft, gaps = measure(TRUE)
    fit = fit_batching("fitted", ttft, gaps, kv_tokens=TRUE.kv_tokens, max_num_seqs=64,
                       max_batched_tokens=2048)  # fmt: skip
    got, want = fit.preset.step, TRUE.step
    for k in ("base_s", "prefill_token_s", "decode_seq_s", "context_token_s"):
        assert rel(getattr(got, k), getattr(want, k)) < 0.03, k
    assert fit.context_fitted and fit.floor_s < 1e-4
    assert fit.fit_error < 0.01 and fit.preset.step.fit_error == fit.fit_error
    assert (fit.preset.name, fit.preset.max_num_seqs, fit.preset.kv_tokens) == (
        "fitted",
        64,
        400_000,
    )

    # ... and reproduces what it was fitted on within 5 %.
    t_pred, g_pred = predict(
        fit.preset,
        [p.prompt_tokens for p in ttft],
        [g.concurrency for g in gaps],
        context_tokens=[g.context_tokens for g in gaps],
    )
    assert np.all(np.abs(t_pred / [p.ttft_s for p in ttft] - 1) < 0.05)
    assert np.all(np.abs(g_pred / [g.gap_s for g in gaps] - 1) < 0.05)


def test_concurrent_prefills_beyond_the_budget_still_measure_the_full_batch():
    # 32 prompts of 200 tokens need four 2048-token steps: streams start decoding at different
    # times, and only the window where all 32 decode is measured.
    streams = run_together(TRUE, [200] * 32, 40)
    point = gap_point([(200, t) for t in streams])
    assert point is not None and point.concurrency == 32
    (want,) = predict(TRUE, [], [32], context_tokens=point.context_tokens)[1]
    assert rel(point.gap_s, want) < 1e-6


def test_a_network_floor_is_separated_from_the_server_and_noise_stays_bounded():
    rng = np.random.default_rng(3)
    ttft, gaps = measure(TRUE)
    floor = 0.015
    noisy_ttft = [
        TtftPoint(p.prompt_tokens, (p.ttft_s + floor) * rng.normal(1, 0.01)) for p in ttft
    ]
    noisy_gaps = [GapPoint(g.concurrency, g.context_tokens, g.gap_s * rng.normal(1, 0.01))
                  for g in gaps]  # fmt: skip
    fit = fit_batching("noisy", noisy_ttft, noisy_gaps, kv_tokens=TRUE.kv_tokens,
                       max_num_seqs=64, max_batched_tokens=2048)  # fmt: skip
    step = fit.preset.step
    assert abs(fit.floor_s - floor) < 0.003
    assert rel(step.prefill_token_s, TRUE.step.prefill_token_s) < 0.05
    assert rel(step.base_s, TRUE.step.base_s) < 0.10
    assert rel(step.decode_seq_s, TRUE.step.decode_seq_s) < 0.15
    assert fit.fit_error < 0.02

    # A floor measured separately is used as given.
    given = fit_batching("given", noisy_ttft, noisy_gaps, kv_tokens=TRUE.kv_tokens,
                         max_num_seqs=64, max_batched_tokens=2048, floor_s=floor)  # fmt: skip
    assert given.floor_s == floor
    assert rel(given.preset.step.prefill_token_s, TRUE.step.prefill_token_s) < 0.05


def test_equal_contexts_leave_the_context_term_out():
    ttft, _ = measure(TRUE)
    gaps = [GapPoint(n, 100.0, 0.006 + 3e-4 * n) for n in (1, 4, 16)]
    fit = fit_batching("x", ttft, gaps, kv_tokens=10_000)
    assert not fit.context_fitted and fit.preset.step.context_token_s == 0.0
    assert rel(fit.preset.step.decode_seq_s, 3e-4) < 1e-6


def test_preset_fields_pass_through():
    ttft, gaps = measure(TRUE)
    fit = fit_batching("x", ttft, gaps, kv_tokens=10_000, max_num_seqs=64, max_batched_tokens=2048,
                       usd_per_hour=2.5, model="m", hardware="h", source="s")  # fmt: skip
    p = fit.preset
    assert (p.usd_per_hour, p.model, p.hardware, p.source) == (2.5, "m", "h", "s")


GOOD_T = [TtftPoint(32, 0.02), TtftPoint(512, 0.08)]
GOOD_G = [GapPoint(1, 100, 0.01), GapPoint(8, 100, 0.012)]


@pytest.mark.parametrize(
    ("ttft", "gaps", "kw", "needle"),
    [
        ([TtftPoint(32, 0.02)], GOOD_G, {}, ">= 2 different prompt lengths"),
        ([TtftPoint(32, 0.02), TtftPoint(32, 0.03)], GOOD_G, {}, ">= 2 different prompt lengths"),
        (GOOD_T, [GapPoint(4, 100, 0.01)], {}, ">= 2 different concurrencies"),
        ([TtftPoint(0, 0.02), TtftPoint(512, 0.08)], GOOD_G, {}, "prompt length must be"),
        ([TtftPoint(32, -1.0), TtftPoint(512, 0.08)], GOOD_G, {}, "TTFT must be"),
        ([TtftPoint(32, float("nan")), TtftPoint(512, 0.08)], GOOD_G, {}, "TTFT must be"),
        (GOOD_T, [GapPoint(0, 100, 0.01), GapPoint(8, 100, 0.01)], {}, "concurrency must be"),
        (GOOD_T, [GapPoint(1, 100, 0.01), GapPoint(300, 100, 0.01)], {}, "max_num_seqs (256)"),
        (GOOD_T, [GapPoint(1, 100, 0.0), GapPoint(8, 100, 0.01)], {}, "inter-token gap must be"),
        (GOOD_T, [GapPoint(1, -5, 0.01), GapPoint(8, 100, 0.01)], {}, "context length must be"),
        (GOOD_T, GOOD_G, {"kv_tokens": 0}, "kv_tokens must be > 0"),
        (GOOD_T, GOOD_G, {"floor_s": -0.1}, "floor must be >= 0"),
    ],
)
def test_bad_measurements_raise_a_clear_value_error(ttft, gaps, kw, needle):
    kw = {"kv_tokens": 10_000, **kw}
    with pytest.raises(ValueError) as e:
        fit_batching("bad", ttft, gaps, **kw)
    assert needle in str(e.value)


def test_gap_point_needs_every_stream_decoding():
    assert gap_point([]) is None
    assert gap_point([(10, [0.1]), (10, [0.1, 0.2, 0.3])]) is None  # one stream got one token
    p = gap_point([(10, [0.1, 0.2, 0.3]), (10, [0.15, 0.25, 0.35, 0.45])])
    # window [0.15, 0.3]: gaps 0.2->0.3 (context 12) and 0.15->0.25 (context 11)
    assert p is not None and p.concurrency == 2
    assert p.gap_s == pytest.approx(0.1) and p.context_tokens == pytest.approx(11.5)
