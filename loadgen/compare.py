"""The simulator's prediction next to a live run's measurement, for the same requests.

The live run's schedule (arrival, prompt tokens as the device tokenizer counts them, output
tokens = the ``max_tokens`` sent) becomes a trace that ``disco.scheduler.simulator`` replays
through the same policies, under two sets of profiles:

- ``configured``: the profiles the scheduler actor planned with (what the policy believes);
- ``calibrated``: profiles refitted from the live baseline runs themselves: server TTFTs and gaps
  measured in the server-only run, device TTFT = a + l / prefill_tps and decode speed fitted on
  the device-only run, so the simulator sees the endpoints this machine really has.

The differences that remain after calibration are what the simulator does not model (see
:data:`EXPLANATIONS`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from disco.scheduler.migration import MigrationConfig
from disco.scheduler.profiles import DeviceProfile, ServerProfile
from disco.scheduler.simulator import SimSettings, SweepSpec, World, sweep
from disco.scheduler.traces import TraceRecord
from disco.scheduler.types import Regime

from .records import RequestRecord
from .schedule import ScheduledRequest

COMPARED = ("ttft_mean", "ttft_p50", "ttft_p99", "tbt_p99", "qoe_mean", "budget_used",
            "migrations")  # fmt: skip

EXPLANATIONS = (
    "Server queueing: the live server is one llama.cpp replica that serves one stream at a time, "
    "so its TTFT grows with the requests in flight; the simulator draws each request's server "
    "TTFT independently from a distribution (queueing only as far as the calibration run saw it).",
    "Shared CPU: the server replica, the real device agent, Ray, Locust and the emulated fleet "
    "share the machine's cores, so the real device's prefill and decode slow down under load; "
    "the simulator's device is a fixed a + c*l line and a constant decode speed.",
    "Online estimates: the live policy starts from the configured server profile and learns the "
    "server's TTFTs and the output lengths from reports that arrive only as requests end (under "
    "queueing, seconds later); the simulator's policy updates on the same window and schedule "
    "but sees each outcome at once, so it reacts sooner to a slow server.",
    "Real streams: live gaps include HTTP, SSE and event-loop jitter and the emulated last-hop "
    "network; the simulator's gaps are each endpoint's mean time between tokens.",
    "Mixed devices: the live devices are one real llama.cpp agent (slow, CPU-bound, its TTFT "
    "grows with its queue) and emulated phones; the calibrated device is one a + c*l line "
    "fitted over all of them, so it misses the real device's tail (device TTFT P99).",
    "Migrations: the simulator switches at the planned token as soon as the target's modelled "
    "prefill is done; live, the target must really prefill prompt + generated text (on a busy "
    "CPU, or behind other streams on the one-stream server replica) before the source finishes, "
    "so with responses of a few dozen tokens most planned migrations never happen.",
    "Requests: live errors and early stops (a model that ends before max_tokens) shorten "
    "responses; the simulator generates exactly max_tokens for every request.",
)


def trace_of(reqs: Sequence[ScheduledRequest]) -> list[TraceRecord]:
    """The schedule as the simulator's trace: what was really sent, not the original trace."""
    return [TraceRecord(r.due, r.prompt_tokens, r.max_tokens, r.session) for r in reqs]


def calibrate_server(base: ServerProfile, server_only: Sequence[RequestRecord]) -> ServerProfile:
    """``base`` with the TTFTs and the mean gap measured when every request went to the server."""
    ok = [r for r in server_only if r.ok and r.ttft is not None]
    if not ok:
        return base
    gaps = np.concatenate([np.diff(r.token_times) for r in ok]) if ok else np.zeros(0)
    tbt = float(gaps.mean()) if gaps.size else base.tbt_s
    cv = float(gaps.std() / tbt) if gaps.size and tbt > 0 else base.tbt_cv
    return replace(
        base, name=f"{base.name}@live", ttft_samples=tuple(float(r.ttft) for r in ok),
        ttft_mixture=(), ttft_per_prompt_token_s=0.0, tbt_s=max(tbt, 1e-4), tbt_cv=cv,
        source="calibrated from the live server-only run",
    )  # fmt: skip


def calibrate_device(base: DeviceProfile, device_only: Sequence[RequestRecord]) -> DeviceProfile:
    """``base`` with TTFT = a + l / prefill_tps (least squares) and the decode speed measured
    when every request ran on the device."""
    ok = [r for r in device_only if r.ok and r.ttft is not None]
    if len(ok) < 3:
        return base
    lens = np.array([r.prompt_tokens for r in ok], dtype=float)
    ttft = np.array([r.ttft for r in ok], dtype=float)
    slope, intercept = np.polyfit(lens, ttft, 1) if np.ptp(lens) > 0 else (0.0, ttft.mean())
    prefill = 1.0 / slope if slope > 1e-6 else base.prefill_tps * 100  # flat: prefill is free
    gaps = np.concatenate([np.diff(r.token_times) for r in ok])
    decode = 1.0 / float(gaps.mean()) if gaps.size and gaps.mean() > 0 else base.decode_tps
    return replace(
        base, name=f"{base.name}@live", ttft_base_s=max(0.0, float(intercept)),
        prefill_tps=float(prefill), decode_tps=decode,
        source="calibrated from the live device-only run",
    )  # fmt: skip


def simulate(
    reqs: Sequence[ScheduledRequest],
    server: ServerProfile,
    device: DeviceProfile,
    *,
    regime: Regime,
    budget: float,
    policies: Sequence[str],
    seed: int = 0,
    window: int = 2000,
    recompute_every: int = 100,
) -> dict[str, dict[str, Any]]:
    """One simulated row per policy (migration as the live run: on), keyed by policy.

    ``window``/``recompute_every`` must be the live scheduler's: with a few dozen requests, a
    policy that recomputes every 100 never leaves its initial state.
    """
    world = World.build(trace_of(reqs), server, device, seed=seed)
    # The live coordinator cancels a race's loser and cold-starts the migration target on prompt +
    # prefix, so the prediction must not assume a warm, already-prefilled loser.
    settings = SimSettings(migration=MigrationConfig(reuse_loser=False))
    spec = SweepSpec(regime=regime, budgets=(budget,), policies=tuple(policies),
                     migration=(True,), seed=seed, window=window,
                     recompute_every=recompute_every, settings=settings)  # fmt: skip
    return {row["policy"]: row for row in sweep(world, spec)}


def side_by_side(
    live: Sequence[Mapping[str, Any]],
    predicted: Mapping[str, Mapping[str, Mapping[str, Any]]],
    keys: Sequence[str] = COMPARED,
) -> list[dict[str, Any]]:
    """Rows of ``policy, source, key...``: live first, then each prediction, per policy."""
    rows = []
    for lv in live:
        p = lv["policy"]
        rows.append({"policy": p, "source": "live", **{k: lv.get(k) for k in keys}})
        for name, pred in predicted.items():
            if p in pred:
                rows.append({"policy": p, "source": f"sim ({name})",
                             **{k: pred[p].get(k) for k in keys}})  # fmt: skip
    return rows
