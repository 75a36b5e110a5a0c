"""Arrival schedules: when each request is sent, with its prompt and output lengths.

Two sources:
- a real trace (``disco.scheduler.traces``), replayed with a time scale (``speedup``), a window
  (``start``/``duration``, in trace seconds) and optional thinning to a target rate;
- synthetic arrivals from an inter-arrival process (Poisson, or Gamma with a chosen coefficient of
  variation for burstiness) with lengths resampled from a trace or drawn from a distribution.

Everything is seeded and pure (numpy only), so a schedule is reproducible and testable without
sending anything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from disco.scheduler.registry import Registry


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request to send ``time`` seconds after the run starts."""

    time: float
    prompt_tokens: int
    output_tokens: int
    session: str | None = None


class TraceLike(Protocol):
    """What a trace record must carry (``disco.scheduler.traces.TraceRecord`` does)."""

    arrival: float
    prompt_tokens: int
    output_tokens: int
    session: str | None


# --- trace replay ---------------------------------------------------------------------------------


def from_trace(
    records: Sequence[TraceLike],
    *,
    speedup: float = 1.0,
    start: float = 0.0,
    duration: float | None = None,
    rate: float | None = None,
    seed: int = 0,
) -> list[Arrival]:
    """Replay ``records`` (arrivals in trace seconds) as a schedule starting at time 0.

    ``start``/``duration`` pick the window ``[start, start + duration)`` in trace seconds, measured
    from the first record; ``speedup`` divides the time axis (2.0 replays twice as fast); ``rate``
    (requests/s of replay time) thins the window by a seeded uniform subsample, which keeps the
    trace's burstiness. A rate above the window's own rate cannot be reached by sampling: raise,
    and let the caller ask for a ``speedup`` instead.
    """
    if speedup <= 0:
        raise ValueError(f"speedup must be > 0, got {speedup}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if duration is not None and duration <= 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if not records:
        return []
    t0 = min(r.arrival for r in records)
    lo = t0 + start
    hi = math.inf if duration is None else lo + duration
    window = sorted((r for r in records if lo <= r.arrival < hi), key=lambda r: r.arrival)
    if not window:
        raise ValueError(f"the window start={start}s duration={duration}s holds no request")
    span = (duration if duration is not None else window[-1].arrival - lo) / speedup
    if rate is not None:
        window = _thin(window, rate, span, seed)
    return [
        Arrival((r.arrival - lo) / speedup, int(r.prompt_tokens), int(r.output_tokens), _session(r))
        for r in window
    ]


def _thin(window: list, rate: float, span: float, seed: int) -> list:
    if span <= 0:  # a single instant: keep one request per requested second, at least one
        return window[:1]
    native = len(window) / span
    if rate > native * (1 + 1e-9):
        raise ValueError(
            f"rate {rate:g}/s is above the window's rate {native:.3g}/s: raise --speedup instead"
        )
    keep = max(1, round(rate * span))
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(window), size=keep, replace=False))
    return [window[i] for i in idx]


def _session(r: TraceLike) -> str | None:
    s = getattr(r, "session", None)
    return None if s is None else str(s)


# --- synthetic arrivals ---------------------------------------------------------------------------


class GapProcess(Protocol):
    """Inter-arrival times of a renewal process."""

    rate: float

    def gaps(self, rng: np.random.Generator, n: int) -> np.ndarray: ...


ARRIVAL_PROCESSES: Registry = Registry("arrival process")


@ARRIVAL_PROCESSES.register("poisson")
@dataclass(frozen=True, slots=True)
class Poisson:
    """Exponential gaps: the memoryless baseline (coefficient of variation 1)."""

    rate: float

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")

    def gaps(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.exponential(1.0 / self.rate, size=n)


@ARRIVAL_PROCESSES.register("gamma")
@dataclass(frozen=True, slots=True)
class GammaBursts:
    """Gamma gaps with mean 1/rate and coefficient of variation ``cv``: cv > 1 is bursty.

    Shape k = 1/cv^2 and scale 1/(rate k) give mean 1/rate and std cv/rate.
    """

    rate: float
    cv: float = 2.0

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.cv <= 0:
            raise ValueError(f"cv must be > 0, got {self.cv}")

    def gaps(self, rng: np.random.Generator, n: int) -> np.ndarray:
        shape = 1.0 / self.cv**2
        return rng.gamma(shape, 1.0 / (self.rate * shape), size=n)


class LengthSource(Protocol):
    """Draws (prompt_tokens, output_tokens) pairs."""

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class TraceLengths:
    """Resample (prompt, output) pairs from a trace, keeping their joint distribution."""

    prompt: tuple[int, ...]
    output: tuple[int, ...]

    @classmethod
    def of(cls, records: Sequence[TraceLike]) -> TraceLengths:
        if not records:
            raise ValueError("cannot draw lengths from an empty trace")
        return cls(
            tuple(int(r.prompt_tokens) for r in records),
            tuple(int(r.output_tokens) for r in records),
        )

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        idx = rng.integers(0, len(self.prompt), size=n)
        return np.asarray(self.prompt)[idx], np.asarray(self.output)[idx]


@dataclass(frozen=True, slots=True)
class LogNormalLengths:
    """Independent log-normal prompt and output lengths (medians in tokens), clipped to [1, max]."""

    prompt_median: float = 256.0
    prompt_sigma: float = 0.8
    output_median: float = 64.0
    output_sigma: float = 0.6
    max_tokens: int = 4096

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        p = self.prompt_median * np.exp(self.prompt_sigma * rng.standard_normal(n))
        o = self.output_median * np.exp(self.output_sigma * rng.standard_normal(n))
        clip = lambda x: np.clip(np.rint(x), 1, self.max_tokens).astype(int)  # noqa: E731
        return clip(p), clip(o)


def synthetic(
    process: GapProcess,
    lengths: LengthSource,
    *,
    duration: float | None = None,
    count: int | None = None,
    seed: int = 0,
    ramp_s: float = 0.0,
) -> list[Arrival]:
    """Arrivals from ``process`` until ``duration`` seconds or ``count`` requests (whichever first).

    The first request arrives after one gap (not at 0), so the count in a window is unbiased.
    ``ramp_s`` > 0: the rate rises linearly from 0 to the process's rate over the first
    ``ramp_s`` seconds (inside ``duration``), then stays there (see :func:`ramp_up`).
    """
    if duration is None and count is None:
        raise ValueError("give a duration or a count")
    if duration is not None and duration <= 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    if ramp_s < 0:
        raise ValueError(f"ramp must be >= 0, got {ramp_s}")
    if ramp_s > 0:
        if duration is not None and ramp_s >= duration:
            raise ValueError(f"ramp {ramp_s:g} s must be shorter than the duration {duration:g} s")
        # Draw at the full rate in the ramp's own time (u), then stretch u into real time.
        op = None if duration is None else duration - ramp_s / 2
        flat = synthetic(process, lengths, duration=op, count=count, seed=seed)
        times = ramp_up(np.array([a.time for a in flat]), ramp_s)
        return [Arrival(float(t), a.prompt_tokens, a.output_tokens)
                for t, a in zip(times, flat, strict=True)]  # fmt: skip
    rng = np.random.default_rng(seed)
    # Draw enough gaps in one go: the expected count plus a generous margin for bursty processes.
    want = count if count is not None else None
    if want is None:
        assert duration is not None
        want = int(process.rate * duration * 1.5 + 50)
    times = np.cumsum(process.gaps(rng, want))
    while duration is not None and count is None and times[-1] < duration:
        more = np.cumsum(process.gaps(rng, want)) + times[-1]
        times = np.concatenate([times, more])
    if duration is not None:
        times = times[times < duration]
    if count is not None:
        times = times[:count]
    prompt, output = lengths.sample(rng, len(times))
    return [
        Arrival(float(t), int(p), int(o)) for t, p, o in zip(times, prompt, output, strict=True)
    ]


def poisson_given_count(
    rate: float, lengths: LengthSource, duration: float, seed: int = 0
) -> list[Arrival]:
    """Poisson arrivals conditioned on their count: exactly ``round(rate * duration)`` requests,
    their times uniform over ``[0, duration)`` and sorted (a Poisson process given its count in
    a window). Bursts as Poisson does, without the count's own noise, so the points of a rate
    sweep offer exactly their rates."""
    if rate <= 0 or duration <= 0:
        raise ValueError(f"rate and duration must be > 0, got {rate}, {duration}")
    rng = np.random.default_rng(seed)
    n = max(1, round(rate * duration))
    times = np.sort(rng.uniform(0.0, duration, size=n))
    prompt, output = lengths.sample(rng, n)
    return [
        Arrival(float(t), int(p), int(o)) for t, p, o in zip(times, prompt, output, strict=True)
    ]


def ramp_up(u: np.ndarray, ramp_s: float) -> np.ndarray:
    """Arrival times ``u`` of a process at a constant rate r, moved so that the rate rises
    linearly from 0 to r over ``[0, ramp_s)`` and stays r after: the time change whose
    cumulative rate r t^2 / (2 ramp_s) (then r (t - ramp_s / 2)) equals r u. Poisson arrivals
    stay Poisson (of the ramped rate); the count by ``ramp_s`` is r ramp_s / 2 on average."""
    u = np.asarray(u, dtype=float)
    if ramp_s <= 0:
        return u
    half = ramp_s / 2
    return np.where(u < half, np.sqrt(2 * ramp_s * np.maximum(u, 0.0)), u + half)


def mean_rate(arrivals: Sequence[Arrival], duration: float | None = None) -> float:
    """Requests per second over ``duration`` (default: up to the last arrival)."""
    if not arrivals:
        return 0.0
    span = duration if duration is not None else arrivals[-1].time
    return len(arrivals) / span if span > 0 else math.inf
