"""Fit a continuous-batching replica's step model from what a client of the server can measure.

``disco profile --fit-batching`` measures a live OpenAI-compatible server (DESIGN.md section 8)
and this module turns the measurements into a :class:`~disco.scheduler.batching.ServerPreset`, so
the simulator and the emulated replica run with the owner's own server's step times. It is pure:
no I/O, no clock.

What a client sees, in the step model's terms (``step_s = base + prefill * P + decode * D +
context * C``):

- TTFT of one request on an idle server: its prefill, in ``k = ceil(l / max_batched_tokens)``
  budget-sized chunks, plus a floor the model does not hold (HTTP, tokenization, the network):
  ``ttft(l) = floor + k * base + prefill * l``.
- Mean gap between tokens while N streams decode together: one decode step each,
  ``gap = base + decode * N + context * N * c`` where ``c`` is a sequence's context length. Gaps
  are differences of arrival times, so the floor cancels.

The fit runs in that order. (1) Each gap measurement is one synthetic step record (P = 0, D = N,
C = N * c) and :meth:`StepModel.fit` (non-negative least squares) gives base, decode and context
time. The context term is only identifiable where the measured contexts differ (by at least
``MIN_CONTEXT_SPREAD`` times), otherwise it is confounded with the decode term and left at 0.
(2) With base known, ``ttft - k * base = floor + prefill * l`` is a line: its slope is the prefill
time per token and its intercept the floor (a given floor is used as is). The fit error carried by
the preset is the median absolute relative error of :func:`predict` on all the measurements.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .batching import ServerPreset, StepModel

# Per-sequence contexts must span this ratio before the context term is fitted (see module doc).
MIN_CONTEXT_SPREAD = 2.0


@dataclass(frozen=True, slots=True)
class TtftPoint:
    """Time to first token of a single request on an idle server (a median of repeats)."""

    prompt_tokens: float
    ttft_s: float


@dataclass(frozen=True, slots=True)
class GapPoint:
    """Mean inter-token gap while ``concurrency`` streams decode together, each with a mean
    context (prompt plus tokens generated so far) of ``context_tokens``."""

    concurrency: int
    context_tokens: float
    gap_s: float


@dataclass(frozen=True)
class BatchingFit:
    """A fitted preset and how well it reproduces what it was fitted on."""

    preset: ServerPreset
    floor_s: float  # TTFT the server model does not hold (HTTP, tokenization, network)
    ttft_error: float  # median absolute relative error on the TTFTs
    gap_error: float  # ... on the inter-token gaps
    context_fitted: bool  # whether the contexts differed enough to fit context_token_s

    @property
    def fit_error(self) -> float:
        return self.preset.step.fit_error or 0.0


def _check(ttft: Sequence[TtftPoint], gaps: Sequence[GapPoint], max_num_seqs: int) -> None:
    for p in ttft:
        if not (math.isfinite(p.prompt_tokens) and p.prompt_tokens > 0):
            raise ValueError(f"prompt length must be a positive number, got {p.prompt_tokens}")
        if not (math.isfinite(p.ttft_s) and p.ttft_s > 0):
            raise ValueError(f"TTFT must be a positive number of seconds, got {p.ttft_s}")
    for g in gaps:
        if isinstance(g.concurrency, bool) or not isinstance(g.concurrency, int | np.integer):
            raise ValueError(f"concurrency must be an integer, got {g.concurrency!r}")
        if not 1 <= g.concurrency <= max_num_seqs:
            raise ValueError(
                f"concurrency must be in 1..max_num_seqs ({max_num_seqs}), got {g.concurrency}"
            )
        if not (math.isfinite(g.context_tokens) and g.context_tokens > 0):
            raise ValueError(f"context length must be a positive number, got {g.context_tokens}")
        if not (math.isfinite(g.gap_s) and g.gap_s > 0):
            raise ValueError(f"inter-token gap must be a positive number of seconds, got {g.gap_s}")
    if len({p.prompt_tokens for p in ttft}) < 2:
        raise ValueError(
            "fitting prefill time needs TTFTs at >= 2 different prompt lengths, "
            f"got {sorted({p.prompt_tokens for p in ttft})}"
        )
    if len({g.concurrency for g in gaps}) < 2:
        raise ValueError(
            "separating step base time from per-sequence decode time needs inter-token gaps at "
            f">= 2 different concurrencies, got {sorted({g.concurrency for g in gaps})}"
        )


def gap_point(streams: Sequence[tuple[float, Sequence[float]]]) -> GapPoint | None:
    """The mean inter-token gap of streams started together, each given as (prompt tokens, token
    arrival times), over the window where all of them are decoding: from the last first token to
    the first last token. Outside it some streams are still prefilling or already done, so the
    batch is not the one measured. Token ``i`` ends the decode step whose sequence has ``prompt +
    i`` tokens of context. None when the window holds no gap (a stream got a single token)."""
    if not streams:
        return None
    times = [np.asarray(t, dtype=float) for _, t in streams]
    if any(t.size == 0 for t in times):
        return None
    start = max(float(t[0]) for t in times)
    end = min(float(t[-1]) for t in times)
    gaps: list[np.ndarray] = []
    contexts: list[np.ndarray] = []
    for (prompt, _), t in zip(streams, times, strict=True):
        inside = (t[:-1] >= start) & (t[1:] <= end)
        gaps.append(np.diff(t)[inside])
        contexts.append(prompt + np.arange(1, t.size)[inside])
    gap = np.concatenate(gaps)
    if gap.size == 0:
        return None
    return GapPoint(len(streams), float(np.concatenate(contexts).mean()), float(gap.mean()))


def chunks(prompt_tokens: np.ndarray | float, max_batched_tokens: int) -> np.ndarray:
    """Steps a lone prompt's prefill takes under a token budget per step (chunked prefill)."""
    return np.maximum(1, np.ceil(np.asarray(prompt_tokens, dtype=float) / max_batched_tokens))


def fit_batching(
    name: str,
    ttft: Sequence[TtftPoint],
    gaps: Sequence[GapPoint],
    *,
    kv_tokens: int,
    max_num_seqs: int = 256,
    max_batched_tokens: int = 8192,
    floor_s: float | None = None,
    **preset_fields: Any,
) -> BatchingFit:
    """Fit a :class:`ServerPreset` named ``name`` (see the module doc for the method).

    ``floor_s``: the TTFT floor outside the server model if it was measured separately; None
    estimates it from the TTFT line's intercept. ``preset_fields``: the preset's other fields
    (``usd_per_hour``, ``model``, ``hardware``, ``source``, ``block_size``...).
    """
    if max_num_seqs <= 0 or max_batched_tokens <= 0 or kv_tokens <= 0:
        raise ValueError("max_num_seqs, max_batched_tokens and kv_tokens must be > 0")
    if floor_s is not None and not (math.isfinite(floor_s) and floor_s >= 0):
        raise ValueError(f"the TTFT floor must be >= 0 seconds, got {floor_s}")
    _check(ttft, gaps, max_num_seqs)

    # (1) Decode steps: base, per-sequence and per-context-token time.
    d = np.array([g.concurrency for g in gaps], dtype=float)
    ctx = np.array([g.context_tokens for g in gaps], dtype=float)
    gap = np.array([g.gap_s for g in gaps], dtype=float)
    context_fitted = bool(ctx.max() >= MIN_CONTEXT_SPREAD * ctx.min())
    decode = StepModel.fit(np.zeros_like(d), d, d * ctx if context_fitted else 0 * d, gap)

    # (2) Prefill: ttft - k * base = floor + prefill * l.
    lens = np.array([p.prompt_tokens for p in ttft], dtype=float)
    measured = np.array([p.ttft_s for p in ttft], dtype=float)
    y = measured - chunks(lens, max_batched_tokens) * decode.base_s
    if floor_s is None:
        x = np.column_stack([np.ones_like(lens), lens])
        (floor, slope), *_ = np.linalg.lstsq(x, y, rcond=None)
        if slope < 0:  # TTFT does not grow with the prompt: no measurable prefill time
            floor, slope = float(np.mean(y)), 0.0
        if floor < 0:  # faster than a decode step's base: no floor, line through the origin
            floor, slope = 0.0, float(lens @ y / (lens @ lens))
    else:
        floor, slope = floor_s, float(lens @ (y - floor_s) / (lens @ lens))
    step = StepModel(
        base_s=decode.base_s,
        prefill_token_s=max(float(slope), 0.0),
        decode_seq_s=decode.decode_seq_s,
        context_token_s=decode.context_token_s,
    )
    preset = ServerPreset(
        name=name,
        step=step,
        kv_tokens=kv_tokens,
        max_batched_tokens=max_batched_tokens,
        max_num_seqs=max_num_seqs,
        **preset_fields,
    )
    floor = max(float(floor), 0.0)
    t_pred, g_pred = predict(preset, lens, d, context_tokens=ctx, floor_s=floor)
    t_rel = np.abs(t_pred - measured) / measured
    g_rel = np.abs(g_pred - gap) / gap
    err = float(np.median(np.concatenate([t_rel, g_rel])))
    preset = replace(preset, step=replace(step, fit_error=err))
    return BatchingFit(
        preset=preset,
        floor_s=floor,
        ttft_error=float(np.median(t_rel)),
        gap_error=float(np.median(g_rel)),
        context_fitted=context_fitted,
    )


def predict(
    preset: ServerPreset,
    lengths: Sequence[float] | np.ndarray,
    concurrencies: Sequence[int] | np.ndarray,
    *,
    context_tokens: float | Sequence[float] | np.ndarray = 1024.0,
    floor_s: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """What the preset says a client measures: (TTFT of a lone request at each prompt length,
    mean inter-token gap of each number of concurrent decoding streams whose sequences have
    ``context_tokens`` of context, one value or one per concurrency)."""
    m = preset.step
    lens = np.asarray(lengths, dtype=float)
    ttft = floor_s + chunks(lens, preset.max_batched_tokens) * m.base_s + m.prefill_token_s * lens
    # Beyond max_num_seqs the extra streams wait; the ones that run decode at the cap.
    n = np.minimum(np.asarray(concurrencies, dtype=float), preset.max_num_seqs)
    ctx = np.broadcast_to(np.asarray(context_tokens, dtype=float), n.shape)
    gap = m.base_s + m.decode_seq_s * n + m.context_token_s * n * ctx
    return ttft, gap
