"""An emulated device population for scale (issue 11): many registered devices as arrays.

A :class:`Population` holds ``devices`` registered devices as numpy arrays, not objects: each
device's profile (round-robin over the given :class:`~disco.scheduler.profiles.DeviceProfile`
names), its round trip to the server (ms, log-normal per device) and the Poisson arrival rate of
its user (log-normal around a mean: heterogeneous). The superposition of the users' processes is
generated as one Poisson process of the total rate, each arrival going to device i with
probability rate_i / total (the same law as every device running its own process), times an
optional rate-multiplier schedule (``phases``: a 10x burst). Arrival times, devices, prompts,
outputs and the server's TTFT draws come from per-purpose generators in fixed-size chunks, so a
seed gives the same arrivals whatever the tick timing (and the same prompts with or without a
burst).

Each arrival becomes a :class:`~disco.scheduler.types.Request` (arrival on ``time.monotonic()``,
asyncio's clock; not ``loop.time()``, which under uvloop, Ray's loop, is cached in 1 ms steps) planned by the holder's planner: ``mode="snapshot"`` calls ``planner.plan_now(request)``
(synchronous, microseconds: :class:`~disco.device_agents.snapshot_planner.SnapshotPlanner`),
``mode="central"`` awaits ``planner.plan(request)`` (a per-request call to the scheduler, the
round trip included); the plan overhead is timed around that call (``time.perf_counter``). Its
timeline is then the core's outcome model (:func:`disco.scheduler.simulator.outcome_arrays`:
race/hedge starts, first-token winner, migration, billing), with the server's TTFT drawn from
the server profile plus the device's server round trip, and the device's from its own profile;
the timeline starts when the plan is made (arrival + plan overhead). Tokens come at each
endpoint's mean inter-token gap (as in the simulator), so a stream's timeline is two arithmetic
segments (the winner's, then the migration target's) and is kept as six numbers.

Tokens are released in ticks: one asyncio timer for the whole population every ``tick_ms``;
each tick counts, for every active stream at once (numpy), the tokens whose due time has
passed, and records each released token's timing error (release time - due time) in a
histogram (every token, not a sample). A stream is user-visible from its arrival until its last
token (a race counts once). When its last token is out, its
:class:`~disco.scheduler.types.RequestOutcome` (token times as released, per-endpoint work and
cost) is reported to the planner: ``report_now`` (snapshot; the planner batches it to the
scheduler at its next sync) or ``await report`` off the tick (central). Everything else stays
here, aggregated: counts, a time series of concurrent streams and budget spent, histograms of
timing error, plan overhead and TTFT.

[R] ours, simplifications: a device runs every stream it is given at its profile's speeds (no
device queue: at the rates of a phone's user, ~0.001/s, a device rarely has two streams), and
the server's TTFT is independent of the load (an API service's profile).
Never imports Ray: the cluster side hosts shards of a population in actors
(:mod:`disco.cluster.population_actor`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from disco.scheduler.migration import MigrationConfig
from disco.scheduler.profiles import DeviceProfile, ServerProfile, load_profile
from disco.scheduler.simulator import World, outcome_arrays
from disco.scheduler.types import EndpointKind, Plan, Regime, Request, RequestOutcome

log = logging.getLogger(__name__)

PROMPT_DISTS = ("lognormal", "azure-conv", "azure-code")
# Planned requests get their timelines in batches this far apart at most (a batch costs about
# what one request does); every shipped profile's first token comes later than this.
ADD_EVERY_S = 0.01
MODES = ("snapshot", "central")
_NAN = math.nan


@dataclass(frozen=True)
class PopulationConfig:
    """One population (or one shard of it: ``device_offset`` numbers its devices globally)."""

    devices: int = 1000
    device_offset: int = 0
    device_profiles: tuple[str, ...] = ("xiaomi14-qwen0.5b", "pixel7pro-bloom1.1b")
    server_profile: str = "gpt-4o-mini"
    regime: str = "server"  # which side's prompt tokens the local budget count is of
    rate_per_device: float = 0.001  # mean arrivals per second per device
    rate_sigma: float = 1.0  # log-normal sigma of the per-device rates (0: all equal)
    server_rtt_ms: float = 40.0  # median device <-> server round trip
    server_rtt_sigma: float = 0.5  # log-normal sigma of it across devices
    scheduler_rtt_ms: float = 0.0  # device <-> scheduler (the planner's transport pays it)
    prompt: str = "azure-conv"  # or "lognormal" (prompt_median, prompt_sigma), "azure-code"
    prompt_median: float = 400.0
    prompt_sigma: float = 0.8
    prompt_max: int = 8192
    output_min: int = 200  # output tokens, uniform in [output_min, output_max]
    output_max: int = 400
    phases: tuple[tuple[float, float, float], ...] = ()  # (start_s, end_s, rate multiplier)
    tick_ms: float = 5.0
    sample_s: float = 1.0  # time-series interval
    seed: int = 0
    id_prefix: str = "pop0"
    chunk: int = 1024  # arrivals drawn per chunk (part of what a seed means)

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError(f"population: devices must be >= 1, got {self.devices}")
        if not self.device_profiles:
            raise ValueError("population: at least one device profile")
        if self.rate_per_device < 0 or self.rate_sigma < 0 or self.server_rtt_sigma < 0:
            raise ValueError("population: rates, sigmas must be >= 0")
        if self.server_rtt_ms < 0 or self.scheduler_rtt_ms < 0:
            raise ValueError("population: round trips must be >= 0")
        if self.prompt not in PROMPT_DISTS:
            raise ValueError(
                f"population: prompt must be one of {PROMPT_DISTS}, got {self.prompt!r}"
            )
        if not 1 <= self.output_min <= self.output_max:
            raise ValueError("population: need 1 <= output_min <= output_max")
        if self.tick_ms <= 0 or self.sample_s <= 0 or self.chunk < 1:
            raise ValueError("population: tick_ms, sample_s and chunk must be > 0")
        for ph in self.phases:
            if len(ph) != 3 or not 0 <= ph[0] < ph[1] or ph[2] < 0:
                raise ValueError(f"population: a phase is (start_s < end_s, multiplier >= 0): {ph}")

    @property
    def mean_output(self) -> float:
        return (self.output_min + self.output_max) / 2.0


def config_from_dict(d: dict[str, Any]) -> PopulationConfig:
    d = dict(d)
    if "device_profiles" in d:
        d["device_profiles"] = tuple(d["device_profiles"])
    if "phases" in d:
        d["phases"] = tuple(tuple(float(x) for x in p) for p in d["phases"])
    return PopulationConfig(**d)


def config_to_dict(cfg: PopulationConfig) -> dict[str, Any]:
    return asdict(cfg)


# ---- histograms (exact merge across shards) ----------------------------------------------------


class Hist:
    """Counts in ``bins`` equal bins over [lo, hi) of x (``log``: of log10 x); values outside
    go to the edge bins (min and max are kept exactly). Arrays are counted at once (a tick's
    work is proportional to its values, never to the bins); single values are buffered."""

    def __init__(self, lo: float, hi: float, bins: int, log: bool = False) -> None:
        self.lo, self.hi, self.bins, self.log = float(lo), float(hi), int(bins), bool(log)
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.n = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self._scalars: list[float] = []

    def _index(self, v: np.ndarray) -> np.ndarray:
        x = np.log10(np.maximum(v, 1e-300)) if self.log else v
        idx = np.floor((x - self.lo) / (self.hi - self.lo) * self.bins).astype(np.int64)
        return np.clip(idx, 0, self.bins - 1, out=idx)

    def add(self, values: np.ndarray) -> None:
        """Count ``values`` now (a bincount over the range of bins they touch)."""
        if values.size == 0:
            return
        v = np.asarray(values, dtype=float)
        self.n += v.size
        self.sum += float(v.sum())
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))
        idx = self._index(v)
        lo = int(idx.min())
        b = np.bincount(idx - lo)
        self.counts[lo : lo + b.size] += b

    def add1(self, v: float) -> None:
        """Buffer one value (counted in bulk every 256, or when read)."""
        self._scalars.append(v)
        if len(self._scalars) >= 256:
            self.fold()

    def fold(self) -> None:
        if self._scalars:
            v = np.asarray(self._scalars, dtype=float)
            self._scalars = []
            self.add(v)

    def percentile(self, q: float) -> float | None:
        self.fold()
        if self.n == 0:
            return None
        if q <= 0:
            return self.min
        if q >= 100:
            return self.max
        cum = np.cumsum(self.counts)
        target = q / 100.0 * self.n
        i = int(np.searchsorted(cum, target, side="left"))
        before = cum[i - 1] if i > 0 else 0
        frac = (target - before) / max(1, self.counts[i])
        w = (self.hi - self.lo) / self.bins
        x = self.lo + (i + frac) * w
        v = 10.0**x if self.log else x
        return float(min(max(v, self.min), self.max))

    @property
    def mean(self) -> float | None:
        self.fold()
        return self.sum / self.n if self.n else None

    def to_wire(self) -> dict[str, Any]:
        self.fold()
        nz = np.nonzero(self.counts)[0]
        return {"lo": self.lo, "hi": self.hi, "bins": self.bins, "log": self.log,
                "idx": nz.tolist(), "cnt": self.counts[nz].tolist(), "n": self.n,
                "sum": self.sum, "min": self.min if self.n else None,
                "max": self.max if self.n else None}  # fmt: skip

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Hist:
        h = cls(d["lo"], d["hi"], d["bins"], d["log"])
        h.counts[np.asarray(d["idx"], dtype=np.int64)] = np.asarray(d["cnt"], dtype=np.int64)
        h.n, h.sum = int(d["n"]), float(d["sum"])
        if h.n:
            h.min, h.max = float(d["min"]), float(d["max"])
        return h

    def merge(self, other: Hist) -> Hist:
        other.fold()
        self.fold()
        if (self.lo, self.hi, self.bins, self.log) != (other.lo, other.hi, other.bins, other.log):
            raise ValueError("histograms with different bins")
        self.counts += other.counts
        self.n += other.n
        self.sum += other.sum
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        return self

    def summary(self, scale: float = 1.0, qs: tuple[float, ...] = (50, 99)) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n}
        for q in qs:
            p = self.percentile(q)
            out[f"p{q:g}"] = None if p is None else p * scale
        m = self.mean
        out["mean"] = None if m is None else m * scale
        out["max"] = self.max * scale if self.n else None
        return out


def timing_hist() -> Hist:
    """Token-timing error, seconds: 0.02 ms bins over [-5 ms, 1 s)."""
    return Hist(-0.005, 1.0, 50_250)


def log_hist() -> Hist:
    """Durations over [0.1 us, 1000 s), 100 bins a decade (about 2.3 % wide)."""
    return Hist(-7.0, 3.0, 1000, log=True)


def merge_wire(hists: list[dict[str, Any] | None]) -> Hist | None:
    out: Hist | None = None
    for d in hists:
        if d is None:
            continue
        h = Hist.from_wire(d)
        out = h if out is None else out.merge(h)
    return out


# ---- the registered devices and their users' arrivals ------------------------------------------


def _lognormal_around(rng: np.random.Generator, mean: float, sigma: float, n: int) -> np.ndarray:
    """n positive values with this (arithmetic) mean, log-normal with this sigma."""
    if sigma <= 0 or n == 0:
        return np.full(n, mean, dtype=float)
    return mean * np.exp(sigma * rng.standard_normal(n) - sigma * sigma / 2.0)


class Devices:
    """The registered devices: profile index, server round trip (s) and user rate (1/s)."""

    def __init__(self, cfg: PopulationConfig) -> None:
        rng = np.random.default_rng([cfg.seed, 1])
        n = cfg.devices
        self.n = n
        self.profiles: list[DeviceProfile] = [
            load_profile(p, "device") for p in cfg.device_profiles
        ]
        self.profile = (np.arange(n) + cfg.device_offset) % len(self.profiles)
        self.server_rtt_s = (cfg.server_rtt_ms / 1000.0) * np.exp(
            cfg.server_rtt_sigma * rng.standard_normal(n)
        )
        self.rate = _lognormal_around(rng, cfg.rate_per_device, cfg.rate_sigma, n)
        self.offset = cfg.device_offset

    def device_id(self, i: int) -> str:
        return f"dev{self.offset + i}"


class Arrivals:
    """The superposed arrivals of every device's user, in run-relative seconds.

    One Poisson process of rate ``sum(rates) x m(t)`` (``m``: the phases' multiplier, piecewise
    constant), generated by time rescaling (unit-rate exponential gaps mapped through the inverse
    of the cumulative rate), each arrival assigned to device i with probability rate_i / sum.
    """

    def __init__(self, rates: np.ndarray, phases: tuple[tuple[float, float, float], ...],
                 seed: int, chunk: int = 1024) -> None:  # fmt: skip
        self.cum = np.cumsum(rates)
        self.total = float(self.cum[-1]) if rates.size else 0.0
        self.chunk = chunk
        self.rng_t = np.random.default_rng([seed, 2])
        self.rng_dev = np.random.default_rng([seed, 3])
        pts = sorted({0.0} | {float(p[0]) for p in phases} | {float(p[1]) for p in phases})
        mult = []
        for a in pts:
            m = 1.0
            for s, e, k in phases:
                if s <= a < e:
                    m *= k
            mult.append(m)
        self.pts = np.asarray(pts)
        self.mult = np.asarray(mult)  # on [pts[i], pts[i+1]); the last one onwards
        seg = np.diff(self.pts) * self.mult[:-1] * self.total
        self.lam = np.concatenate([[0.0], np.cumsum(seg)])  # cumulative rate at pts
        self._e = 0.0
        self._t = np.empty(0)
        self._d = np.empty(0, dtype=np.int64)
        self._i = 0  # next unread in the current chunk
        self.generated = 0

    def rate_at(self, t: float) -> float:
        i = int(np.searchsorted(self.pts, t, side="right")) - 1
        return self.total * float(self.mult[max(0, i)])

    def _inverse(self, e: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self.lam, e, side="right") - 1
        i = np.clip(i, 0, self.pts.size - 1)
        r = self.mult[i] * self.total
        with np.errstate(divide="ignore", invalid="ignore"):
            t = self.pts[i] + (e - self.lam[i]) / r
        # a segment of rate 0 is never landed in (its lam is flat: searchsorted skips it),
        # except a final one: no arrivals ever after it
        return np.where(r > 0, t, np.inf)

    def _more(self) -> None:
        e = self._e + np.cumsum(self.rng_t.exponential(1.0, self.chunk))
        self._e = float(e[-1])
        t = self._inverse(e)
        u = self.rng_dev.random(self.chunk) * self.total
        d = np.minimum(np.searchsorted(self.cum, u, side="right"), self.cum.size - 1)
        self._t, self._d, self._i = t, d.astype(np.int64), 0

    def until(self, t_rel: float) -> tuple[np.ndarray, np.ndarray]:
        """Arrivals at or before ``t_rel`` not returned yet: (times, device indices)."""
        if self.total <= 0:
            return np.empty(0), np.empty(0, dtype=np.int64)
        ts, ds = [], []
        while True:
            if self._i >= self._t.size:
                self._more()
            j = int(np.searchsorted(self._t, t_rel, side="right"))
            if j > self._i:
                ts.append(self._t[self._i : j])
                ds.append(self._d[self._i : j])
                self._i = j
            if j < self._t.size:
                break
        if not ts:
            return np.empty(0), np.empty(0, dtype=np.int64)
        t, d = (ts[0], ds[0]) if len(ts) == 1 else (np.concatenate(ts), np.concatenate(ds))
        self.generated += t.size
        return t, d


class Lengths:
    """Prompt and output tokens, and the server's two TTFT draws (a first one, and a fresh one
    should decoding migrate to the server), per arrival in order."""

    def __init__(self, cfg: PopulationConfig, server: ServerProfile) -> None:
        self.cfg, self.server = cfg, server
        self.rng_len = np.random.default_rng([cfg.seed, 4])
        self.rng_ttft = np.random.default_rng([cfg.seed, 5])
        self.trace: np.ndarray | None = None
        if cfg.prompt != "lognormal":
            from disco.scheduler.traces import code_trace_path, default_trace_path, load_trace

            path = default_trace_path() if cfg.prompt == "azure-conv" else code_trace_path()
            self.trace = np.array([r.prompt_tokens for r in load_trace(path)], dtype=float)

    def draw(self, n: int) -> tuple[np.ndarray, ...]:
        c = self.cfg
        if self.trace is not None:
            prompt = self.trace[self.rng_len.integers(0, self.trace.size, n)]
        else:
            prompt = np.round(
                c.prompt_median * np.exp(c.prompt_sigma * self.rng_len.standard_normal(n))
            )
        prompt = np.clip(prompt, 1, c.prompt_max)
        output = self.rng_len.integers(c.output_min, c.output_max + 1, n)
        ts = self.server.sample_ttft(self.rng_ttft, prompt)
        tsm = self.server.sample_ttft(self.rng_ttft, prompt)
        return prompt, output, ts, tsm


# ---- the timeline of a planned request (the core's outcome model) ------------------------------


@dataclass
class Timelines:
    """Per planned request (relative to its timeline's origin): first token ``t0``, switch index
    ``k`` (= n: no migration), gaps before/after it, and what the core's model bills."""

    t0: np.ndarray
    k: np.ndarray
    n: np.ndarray
    gw: np.ndarray
    gt: np.ndarray
    server_won: np.ndarray
    started_s: np.ndarray
    started_d: np.ndarray
    migrated: np.ndarray
    server_prompt: np.ndarray
    server_output: np.ndarray
    device_prompt: np.ndarray
    device_output: np.ndarray
    server_cost: np.ndarray
    device_energy_j: np.ndarray


def timelines(
    plans: list[Plan], prompt: np.ndarray, output: np.ndarray, server_ttft: np.ndarray,
    server_ttft_migrate: np.ndarray, profile: np.ndarray, server: ServerProfile,
    profiles: list[DeviceProfile], expected_out: float, mcfg: MigrationConfig,
) -> Timelines:  # fmt: skip
    """The core's model (``simulator.outcome_arrays``) for a batch of planned requests, grouped
    by device profile and migration rule. ``server_ttft`` includes the device's round trip."""
    m = len(plans)
    ss = np.array([_NAN if p.server_start is None else p.server_start for p in plans], dtype=float)
    ds = np.array([_NAN if p.device_start is None else p.device_start for p in plans], dtype=float)
    rules = [p.migration for p in plans]
    f = np.zeros(m)
    out = Timelines(f.copy(), np.zeros(m, np.int64), output.astype(np.int64), f.copy(), f.copy(),
                    np.zeros(m, bool), np.zeros(m, bool), np.zeros(m, bool), np.zeros(m, bool),
                    f.copy(), f.copy(), f.copy(), f.copy(), f.copy(), f.copy())  # fmt: skip
    groups: dict[tuple[int, Any], list[int]] = {}
    for i in range(m):
        groups.setdefault((int(profile[i]), rules[i]), []).append(i)
    for (pi, rule), idx_list in groups.items():
        idx = np.asarray(idx_list)
        dev = profiles[pi]
        pr = prompt[idx]
        world = World(np.zeros(idx.size), pr, output[idx].astype(np.int64), server_ttft[idx],
                      server_ttft_migrate[idx], np.asarray(dev.ttft(pr), dtype=float), server,
                      dev)  # fmt: skip
        o = outcome_arrays(world, slice(None), ss[idx], ds[idx], np.full(idx.size, expected_out),
                           rule, mcfg)  # fmt: skip
        won = o.d.server_won
        out.t0[idx] = o.d.t0
        out.k[idx] = o.switch
        out.gw[idx] = np.where(won, server.tbt_s, dev.tbt_s)
        out.gt[idx] = np.where(won, dev.tbt_s, server.tbt_s)
        out.server_won[idx] = won
        out.started_s[idx] = o.d.started_s
        out.started_d[idx] = o.d.started_d
        out.migrated[idx] = o.migrated
        out.server_prompt[idx] = o.server_prompt
        out.server_output[idx] = o.server_output
        out.device_prompt[idx] = o.device_prompt
        out.device_output[idx] = o.device_output
        out.server_cost[idx] = o.server_cost
        out.device_energy_j[idx] = o.device_energy_j
    return out


def due_times(t0: float, n: int, k: int, gw: float, gt: float) -> np.ndarray:
    """Token due times relative to the origin (``simulator.token_times``'s formula)."""
    j = np.arange(n, dtype=float)
    return t0 + np.where(j < k, j * gw, k * gw + (j - k) * gt)


def count_due(rel: np.ndarray, t0: np.ndarray, k: np.ndarray, n: np.ndarray, gw: np.ndarray,
              gt: np.ndarray) -> np.ndarray:  # fmt: skip
    """Tokens whose due time is <= ``rel`` (per stream, vectorised)."""
    x = rel - t0
    c1 = np.where(x < 0, 0, np.minimum(k, np.floor(x / gw).astype(np.int64) + 1))
    y = x - k * gw
    more = (c1 >= k) & (k < n) & (y >= 0)
    c2 = np.where(
        more, np.minimum(n - k, np.floor(np.where(more, y, 0.0) / gt).astype(np.int64) + 1), 0
    )
    return c1 + c2


# ---- the population ------------------------------------------------------------------------------


@dataclass(slots=True)
class Counters:
    arrivals: int = 0
    planned: int = 0
    plan_errors: int = 0
    completed: int = 0
    reported: int = 0
    report_errors: int = 0
    tokens: int = 0
    ticks: int = 0
    late_ticks: int = 0  # ticks more than one tick late
    # prompt tokens, and the constrained side's, counted when planned (the model knows then)
    planned_prompt_tokens: float = 0.0
    planned_constrained_tokens: float = 0.0
    # the same over completed (reported) requests
    prompt_tokens: float = 0.0
    constrained_tokens: float = 0.0
    server_prompt_tokens: float = 0.0
    device_prompt_tokens: float = 0.0
    first_from_server: int = 0
    migrations: int = 0
    abandoned: int = 0  # in flight when the population stopped without draining


_COLS = ("origin", "arrival", "t0", "gw", "gt", "next")
_ICOLS = ("k", "n", "released", "sid")


class Population:
    """``await run(duration_s)`` or :meth:`start` / :meth:`stop`; ``step(now)`` is one tick
    (tests call it on a virtual clock; snapshot mode needs no event loop for it)."""

    def __init__(self, cfg: PopulationConfig, planner: Any, mode: str = "snapshot", *,
                 clock: Callable[[], float] = time.monotonic,
                 migration: MigrationConfig | None = None) -> None:  # fmt: skip
        if mode not in MODES:
            raise ValueError(f"population mode must be one of {MODES}, got {mode!r}")
        self.cfg, self.planner, self.mode, self.clock = cfg, planner, mode, clock
        self.server: ServerProfile = load_profile(cfg.server_profile, "server")  # type: ignore[assignment]
        self.devices = Devices(cfg)
        self.arrivals = Arrivals(self.devices.rate, cfg.phases, cfg.seed, cfg.chunk)
        self.lengths = Lengths(cfg, self.server)
        self.mcfg = migration or MigrationConfig()
        self.constrained_server = Regime(cfg.regime) is Regime.SERVER_CONSTRAINED
        self.c = Counters()
        self.timing = timing_hist()
        self.plan_s = log_hist()
        self.ttft = log_hist()
        self.lateness = log_hist()  # how late each tick ran after its schedule
        self.step_s = log_hist()  # how long each tick's work took
        self.series: list[dict[str, float]] = []
        self.t_start: float | None = None
        self._draw_i = 0
        self._draw: tuple[np.ndarray, ...] | None = None
        # planned, waiting for their timelines:
        # (arrival, plan seconds, device index, draws, plan, request, when planned)
        self._planned: list[tuple] = []
        self._central_inflight = 0
        self._tasks: set[asyncio.Task] = set()
        self._meta: dict[int, tuple] = {}
        self._sid = 0
        self._f = {k: np.empty(0) for k in _COLS}
        self._i = {k: np.empty(0, dtype=np.int64) for k in _ICOLS}
        self._ticks = np.empty(4096)
        self._nticks = 0
        self._next_sample = 0.0
        self._stopped_arrivals = False
        self._run_task: asyncio.Task | None = None
        self._stop_at: float | None = None
        self.on_outcome: Callable[[RequestOutcome], None] | None = None  # tests

    # ---- what is in flight --------------------------------------------------------------------
    @property
    def active(self) -> int:
        return int(self._i["k"].size)

    @property
    def in_flight(self) -> int:
        """User-visible streams now: arrived, last token not out (being planned included)."""
        return self.active + len(self._planned) + self._central_inflight

    # ---- lengths in arrival order, drawn in chunks -------------------------------------------
    def _lengths(self, n: int) -> tuple[np.ndarray, ...]:
        parts: list[tuple[np.ndarray, ...]] = []
        need = n
        while need > 0:
            if self._draw is None or self._draw_i >= self._draw[0].size:
                self._draw, self._draw_i = self.lengths.draw(self.cfg.chunk), 0
            take = min(need, self._draw[0].size - self._draw_i)
            parts.append(tuple(a[self._draw_i : self._draw_i + take] for a in self._draw))
            self._draw_i += take
            need -= take
        if len(parts) == 1:
            return parts[0]
        return tuple(np.concatenate([p[j] for p in parts]) for j in range(4))

    # ---- one tick -----------------------------------------------------------------------------
    def begin(self, t_start: float) -> None:
        self.t_start = t_start
        self._next_sample = t_start

    def step(self, now: float) -> None:
        """Release what is due at ``now`` first (so the tick's other work never delays it),
        then take the arrivals up to ``now`` and give the planned ones their timelines (in
        batches at least ``ADD_EVERY_S`` apart: no first token comes sooner than that)."""
        if self.t_start is None:
            self.begin(now)
        self._record_tick(now)
        if self.active:
            self._release(now)
        if not self._stopped_arrivals:
            self._arrive(now)
        if self._planned and (now - self._planned[0][6] >= ADD_EVERY_S or self._stopped_arrivals):
            self._add_streams()
        if now >= self._next_sample:
            self._sample(now)
            behind = math.floor((now - self._next_sample) / self.cfg.sample_s)
            self._next_sample += (behind + 1) * self.cfg.sample_s

    def _arrive(self, now: float) -> None:
        rel = now - self.t_start
        if self._stop_at is not None:
            rel = min(rel, self._stop_at - self.t_start)
        t, d = self.arrivals.until(rel)
        if t.size == 0:
            return
        prompt, output, ts, tsm = self._lengths(t.size)
        self.c.arrivals += t.size
        prefix = self.cfg.id_prefix
        seq0 = self.c.arrivals - t.size
        dev_ids = self.devices
        for i in range(t.size):
            arrival = self.t_start + float(t[i])
            di = int(d[i])
            req = Request(f"{prefix}-{seq0 + i}", arrival, int(prompt[i]),
                          device_id=dev_ids.device_id(di))  # fmt: skip
            draws = (float(prompt[i]), int(output[i]), float(ts[i]), float(tsm[i]))
            if self.mode == "snapshot":
                t0 = time.perf_counter()
                plan = self.planner.plan_now(req)
                dt = time.perf_counter() - t0
                self.plan_s.add1(dt)
                self._planned.append((arrival, dt, di, draws, plan, req, now))
            else:
                self._central_inflight += 1
                task = asyncio.get_running_loop().create_task(self._plan_central(req, di, draws))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _plan_central(self, req: Request, di: int, draws: tuple) -> None:
        t0 = time.perf_counter()
        try:
            try:
                plan = await asyncio.wait_for(self.planner.plan(req), 30.0)
            except Exception as e:  # noqa: BLE001 - the scheduler is away: its fallback, or a race
                self.c.plan_errors += 1
                log.debug("central plan failed: %r", e)
                fb = getattr(self.planner, "fallback", None)
                plan = (
                    (await fb.plan(req))
                    if fb is not None
                    else Plan(req.id, 0.0, 0.0, policy="race")
                )
            dt = time.perf_counter() - t0
            self.plan_s.add1(dt)
            self._planned.append((req.arrival, dt, di, draws, plan, req, self.clock()))
        finally:
            self._central_inflight -= 1

    def _add_streams(self) -> None:
        planned, self._planned = self._planned, []
        m = len(planned)
        self.c.planned += m
        arr = np.array([p[0] for p in planned])
        plan_s = np.array([p[1] for p in planned])
        di = np.array([p[2] for p in planned], dtype=np.int64)
        draws = np.array([p[3] for p in planned], dtype=float)
        plans = [p[4] for p in planned]
        prompt, output = draws[:, 0], draws[:, 1].astype(np.int64)
        rtt = self.devices.server_rtt_s[di]
        tl = timelines(plans, prompt, output, draws[:, 2] + rtt, draws[:, 3] + rtt,
                       self.devices.profile[di], self.server, self.devices.profiles,
                       self.cfg.mean_output, self.mcfg)  # fmt: skip
        constrained = tl.server_prompt if self.constrained_server else tl.device_prompt
        self.c.planned_prompt_tokens += float(prompt.sum())
        self.c.planned_constrained_tokens += float(np.minimum(constrained, prompt).sum())
        sids = np.arange(self._sid, self._sid + m, dtype=np.int64)
        self._sid += m
        for j in range(m):
            self._meta[int(sids[j])] = (planned[j][5], tl, j)
        origin = arr + plan_s
        new_f = {"origin": origin, "arrival": arr, "t0": tl.t0, "gw": tl.gw, "gt": tl.gt,
                 "next": origin + tl.t0}  # fmt: skip
        new_i = {"k": tl.k, "n": tl.n, "released": np.zeros(m, np.int64), "sid": sids}
        for k in _COLS:
            self._f[k] = np.concatenate([self._f[k], new_f[k]])
        for k in _ICOLS:
            self._i[k] = np.concatenate([self._i[k], new_i[k]])

    def _release(self, now: float) -> None:
        f, i = self._f, self._i
        ready = np.nonzero(f["next"] <= now)[0]  # streams with a token due (the rest: untouched)
        if ready.size == 0:
            return
        origin, t0, gw, gt = f["origin"][ready], f["t0"][ready], f["gw"][ready], f["gt"][ready]
        k, n, released = i["k"][ready], i["n"][ready], i["released"][ready]
        c = np.maximum(count_due(now - origin, t0, k, n, gw, gt), released)
        cnt = c - released
        total = int(cnt.sum())
        if total:
            self.c.tokens += total
            # every newly released token's due time: j runs over [released, c) per stream
            rep = np.repeat(np.arange(ready.size), cnt)
            starts = np.cumsum(cnt) - cnt
            j = released[rep] + (np.arange(total) - np.repeat(starts, cnt))
            kr, gwr = k[rep], gw[rep]
            due = origin[rep] + t0[rep] + np.where(j < kr, j * gwr, kr * gwr + (j - kr) * gt[rep])
            self.timing.add(now - due)
            arrival = f["arrival"]
            for x in ready[(released == 0) & (cnt > 0)]:
                self.ttft.add1(now - float(arrival[x]))
        i["released"][ready] = c
        more = c < n
        nxt = origin + t0 + np.where(c < k, c * gw, k * gw + (c - k) * gt)
        f["next"][ready] = np.where(more, nxt, np.inf)
        done = ready[~more]
        if done.size:
            for x in done:
                self._finish(int(x))
            keep = np.ones(f["next"].size, dtype=bool)
            keep[done] = False
            for key in _COLS:
                f[key] = f[key][keep]
            for key in _ICOLS:
                i[key] = i[key][keep]

    def _record_tick(self, now: float) -> None:
        if self._nticks >= self._ticks.size:
            # keep the ticks a stream in flight may still need (release_times), then grow
            oldest = min([now, *(p[0] for p in self._planned[:1])])
            if self.active:
                oldest = min(oldest, float(self._f["origin"].min()))
            cut = int(np.searchsorted(self._ticks[: self._nticks], oldest - 1.0))
            kept = self._ticks[cut : self._nticks]
            size = max(4096, 2 * kept.size)
            self._ticks = np.concatenate([kept, np.empty(size - kept.size)])
            self._nticks = kept.size
        self._ticks[self._nticks] = now
        self._nticks += 1
        self.c.ticks += 1

    def release_times(self, due_abs: np.ndarray) -> np.ndarray:
        """When tokens due at ``due_abs`` were released: the first tick at or after each."""
        ticks = self._ticks[: self._nticks]
        idx = np.searchsorted(ticks, due_abs, side="left")
        return ticks[np.minimum(idx, ticks.size - 1)]

    def _finish(self, x: int) -> None:
        f, i = self._f, self._i
        sid = int(i["sid"][x])
        req, tl, j = self._meta.pop(sid)
        n, k = int(i["n"][x]), int(i["k"][x])
        due = float(f["origin"][x]) + due_times(float(f["t0"][x]), n, k, float(f["gw"][x]),
                                                float(f["gt"][x]))  # fmt: skip
        times = self.release_times(due)
        won = bool(tl.server_won[j])
        winner = EndpointKind.SERVER if won else EndpointKind.DEVICE
        ks = min(k, n)
        o = RequestOutcome(
            request_id=req.id, arrival=req.arrival, prompt_tokens=req.prompt_tokens,
            token_times=times.tolist(), token_sources=[winner] * ks + [winner.other] * (n - ks),
            server_prompt_tokens=int(tl.server_prompt[j]),
            server_output_tokens=int(tl.server_output[j]),
            device_prompt_tokens=int(tl.device_prompt[j]),
            device_output_tokens=int(tl.device_output[j]),
            server_cost=float(tl.server_cost[j]), device_energy_j=float(tl.device_energy_j[j]),
            first_token_from=winner, migrated_at=k if bool(tl.migrated[j]) else None,
            server_started=bool(tl.started_s[j]), device_started=bool(tl.started_d[j]),
        )  # fmt: skip
        c = self.c
        c.completed += 1
        c.prompt_tokens += o.prompt_tokens
        spent = o.server_prompt_tokens if self.constrained_server else o.device_prompt_tokens
        c.constrained_tokens += min(spent, o.prompt_tokens)
        c.server_prompt_tokens += o.server_prompt_tokens
        c.device_prompt_tokens += o.device_prompt_tokens
        c.first_from_server += won
        c.migrations += o.migrated_at is not None
        if self.on_outcome is not None:
            self.on_outcome(o)
        if self.mode == "snapshot":
            self.planner.report_now(o)
            c.reported += 1
        else:
            task = asyncio.get_running_loop().create_task(self._report_central(o))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _report_central(self, o: RequestOutcome) -> None:
        try:
            await asyncio.wait_for(self.planner.report(o), 30.0)
            self.c.reported += 1
        except Exception as e:  # noqa: BLE001 - counted; the run goes on
            self.c.report_errors += 1
            log.debug("central report failed: %r", e)

    def _sample(self, now: float) -> None:
        c = self.c
        self.series.append({
            "t": now - self.t_start, "streams": float(self.in_flight), "arrivals": float(c.arrivals),
            "completed": float(c.completed), "tokens": float(c.tokens),
            "planned_prompt": c.planned_prompt_tokens,
            "planned_constrained": c.planned_constrained_tokens,
        })  # fmt: skip

    # ---- the timer ----------------------------------------------------------------------------
    async def run(self, duration_s: float | None = None, drain_s: float = 0.0) -> None:
        """Tick until stopped (or ``duration_s`` of arrivals, then up to ``drain_s`` for the
        streams in flight to end)."""
        clock = self.clock  # not loop.time(): uvloop's (Ray's loop) is cached, in 1 ms steps
        tick = self.cfg.tick_ms / 1000.0
        now = clock()
        if self.t_start is None:
            self.begin(now)
        if duration_s is not None:
            self._stop_at = self.t_start + duration_s
        next_t = max(now, self.t_start)
        end_drain: float | None = None
        while True:
            delay = next_t - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            now = clock()
            late = now - next_t
            self.lateness.add1(max(late, 1e-7))
            if late > tick:
                self.c.late_ticks += 1
            self.step(now)
            self.step_s.add1(max(clock() - now, 1e-7))
            if self._stop_at is not None and now >= self._stop_at:
                self._stopped_arrivals = True
                if end_drain is None:
                    end_drain = now + drain_s
                if self.in_flight == 0 or now >= end_drain:
                    break
            next_t += tick
            if next_t < now - tick:  # fell behind by more than a tick: do not burst to catch up
                next_t = now

    def start(self, t_start: float | None = None) -> None:
        """Start ticking on the running loop (arrivals from ``t_start``, loop clock)."""
        loop = asyncio.get_running_loop()
        self.begin(self.clock() if t_start is None else t_start)
        starter = getattr(self.planner, "start", None)
        if starter is not None:
            starter()
        self._run_task = loop.create_task(self.run())

    async def stop(self, drain_s: float = 0.0, timeout_s: float = 30.0) -> None:
        """No more arrivals; let streams in flight end for up to ``drain_s``; the rest are
        abandoned (not reported). Central reports still in flight get ``timeout_s``."""
        self._stop_at = self.clock()
        self._stopped_arrivals = True
        t_end = self.clock() + drain_s
        while self.in_flight and self.clock() < t_end:
            await asyncio.sleep(0.05)
        if self._run_task is not None:
            self._run_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._run_task
        self.c.abandoned += self.in_flight
        self._sample(self.clock())
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    # ---- what a poll shows --------------------------------------------------------------------
    def stats(self, *, series_from: int = 0) -> dict[str, Any]:
        c = self.c
        share = c.constrained_tokens / c.prompt_tokens if c.prompt_tokens else None
        pshare = (c.planned_constrained_tokens / c.planned_prompt_tokens
                  if c.planned_prompt_tokens else None)  # fmt: skip
        out = {
            "mode": self.mode, "devices": self.cfg.devices, "in_flight": self.in_flight,
            "active": self.active, "counters": asdict(c), "budget_used": share,
            "budget_used_planned": pshare,
            "rate_now": self.arrivals.rate_at((self.clock() - self.t_start) if self.t_start else 0.0),
            "timing": self.timing.to_wire(), "plan_s": self.plan_s.to_wire(),
            "ttft": self.ttft.to_wire(), "lateness": self.lateness.to_wire(),
            "step_s": self.step_s.to_wire(),
            "series": self.series[series_from:], "series_len": len(self.series),
        }  # fmt: skip
        status = getattr(self.planner, "status", None)
        if callable(status):
            with contextlib.suppress(Exception):
                out["planner"] = status()
        return out


def summarize(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge shards' :meth:`Population.stats` (histograms exactly, counters summed)."""
    counters: dict[str, float] = {}
    for s in stats:
        for k, v in s["counters"].items():
            counters[k] = counters.get(k, 0) + v
    timing = merge_wire([s["timing"] for s in stats])
    plan_s = merge_wire([s["plan_s"] for s in stats])
    ttft = merge_wire([s["ttft"] for s in stats])
    late = merge_wire([s["lateness"] for s in stats])
    step = merge_wire([s["step_s"] for s in stats])
    pt = counters.get("prompt_tokens", 0.0)
    ppt = counters.get("planned_prompt_tokens", 0.0)
    return {
        "counters": counters,
        "in_flight": sum(s["in_flight"] for s in stats),
        "budget_used": counters.get("constrained_tokens", 0.0) / pt if pt else None,
        "budget_used_planned": counters.get("planned_constrained_tokens", 0.0) / ppt
        if ppt
        else None,
        "timing_ms": None if timing is None else timing.summary(1e3, (1, 50, 99, 99.9)),
        "plan_overhead_ms": None if plan_s is None else plan_s.summary(1e3, (50, 99)),
        "ttft_s": None if ttft is None else ttft.summary(1.0, (50, 90, 99)),
        "tick_lateness_ms": None if late is None else late.summary(1e3, (50, 99, 99.9)),
        "tick_work_ms": None if step is None else step.summary(1e3, (50, 99, 99.9)),
    }


__all__ = [
    "Arrivals", "Devices", "Hist", "Lengths", "Population", "PopulationConfig", "Timelines",
    "config_from_dict", "config_to_dict", "count_due", "due_times", "summarize", "timelines",
]  # fmt: skip
