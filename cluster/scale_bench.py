"""``disco bench scale``: many registered devices, thousands of concurrent streams (issue 11).

An embedded Ray of its own (loopback, torn down at the end) runs the scheduler actor and
``--actors`` :class:`~disco.cluster.population_actor.PopulationActor` shards holding
``--devices`` emulated devices in all (:mod:`disco.device_agents.population`: devices as arrays,
one tick timer per shard). The users' total arrival rate is derived from the target of
``--streams`` concurrent streams and the mean stream length (Little's law; the length is
estimated by the core's simulator for this policy and these profiles, or given with
``--mean-stream-s``), spread over the devices with heterogeneous rates. Every
``--poll-s`` the driver polls each shard (aggregates only) and the scheduler's ledger; a progress
line every few seconds.

``--planning snapshot`` (default): shards plan locally from the scheduler's published snapshots
under budget leases and sync every ``sync_s`` over ``--scheduler-rtt-ms``; ``central``: every
request is planned by a call to the scheduler actor over that round trip; ``both``: snapshot,
then central with the same seed, side by side (central at the same scale: choose a scale it
survives).

Writes ``DIR/scale.json`` (the headline keys at the top for the first mode run, each mode's
full result under ``runs``; ``central`` holds the central run's when both ran) and
``DIR/scale.png`` (concurrent streams and budget used over time). Every number's meaning:
``KEYS`` below.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from disco.device_agents.population import (
    PROMPT_DISTS,
    Devices,
    Lengths,
    PopulationConfig,
    summarize,
    timelines,
)

KEYS = {
    "devices": "registered devices, all shards",
    "fleet_actors": "population actors (shards)",
    "concurrent_streams_p50": "median of the user-visible streams in flight, sampled each poll "
    "after warm-up (arrival to last token; a race counts once)",
    "token_timing_error_p99_ms": "99th percentile of (release time - due time) over every token",
    "plan_overhead_ms_p50": "plan() as a device sees it: plan_now (snapshot) or the awaited "
    "per-request call with its round trip (central)",
    "budget_used": "the scheduler ledger's share of prompt tokens on the constrained side",
    "budget_used_actors": "the same from the shards' own counts of completed requests",
    "snapshot_age_ms_p99": "age of the snapshot a plan used (worst shard's p99)",
    "scheduler_cpu_s": "the scheduler actor's process CPU seconds over the run",
}


WORKER_NICENESS = 0


@dataclass(frozen=True)
class ScaleOptions:
    devices: int = 100_000
    streams: int = 3000  # target concurrent streams
    duration_s: float = 60.0
    scheduler_rtt_ms: float = 0.0
    out: str = "scale-out"
    actors: int = 3
    planning: str = "snapshot"  # snapshot | central | both
    budget: float = 0.5
    regime: str = "server"
    policy: str = "disco"
    burst: tuple[float, float, float] | None = None  # (start_s, end_s, multiplier)
    seed: int = 0
    tick_ms: float = 5.0
    drain_s: float = 0.0
    mean_stream_s: float | None = None  # None: estimated by the core's simulator
    device_profiles: tuple[str, ...] = ("xiaomi14-qwen0.5b", "pixel7pro-bloom1.1b")
    server_profile: str = "gpt-4o-mini"
    prompt: str = "azure-conv"
    output_min: int = 200
    output_max: int = 400
    rate_sigma: float = 1.0
    server_rtt_ms: float = 40.0
    sync_s: float = 0.5
    publish_interval_s: float = 1.0
    lease_period_s: float = 2.0
    poll_s: float = 1.0
    progress_s: float = 5.0
    actor_num_cpus: float = 0.5
    actor_resource: str | None = None  # a custom Ray resource each shard needs one unit of
    kill_actor_at_s: float | None = None  # kill shard 0 this long into the run (what is lost)
    num_cpus: int | None = None  # Ray's logical CPUs (placement only); None: actors + 2


# ---- sizing: the mean stream length --------------------------------------------------------------


def estimate_stream_s(pop: PopulationConfig, sched: Any, n: int = 6000) -> float:
    """Mean user-visible stream length (arrival to last token) for these devices and requests
    under ``sched``'s policy, from the core's simulator (``run_batch``: the policy learning and
    its budget guard over ``n`` requests; the second half is averaged)."""
    from disco.cluster.resolve import policy_from_config
    from disco.scheduler.migration import MigrationConfig
    from disco.scheduler.simulator import SimSettings, World, run_batch
    from disco.scheduler.types import Plan

    policy = policy_from_config(sched)
    devs = Devices(replace(pop, devices=max(1, min(pop.devices, n))))
    lengths = Lengths(replace(pop, seed=pop.seed + 7919), _server(pop))
    prompt, output, ts, tsm = lengths.draw(n)
    di = np.arange(n) % devs.n
    rtt = devs.server_rtt_s[di]
    world = World(np.arange(n, dtype=float), prompt, output.astype(np.int64), ts + rtt, tsm + rtt,
                  np.asarray(policy.device.ttft(prompt), dtype=float), policy.server,
                  policy.device)  # fmt: skip
    run = run_batch(policy, world, SimSettings())
    nan = lambda x: None if math.isnan(x) else float(x)  # noqa: E731
    plans = [Plan(str(i), nan(run.server_start[i]), nan(run.device_start[i]), True,
                  policy.migration) for i in range(n)]  # fmt: skip
    tl = timelines(plans, prompt, output, ts + rtt, tsm + rtt, devs.profile[di], _server(pop),
                   devs.profiles, pop.mean_output, MigrationConfig())  # fmt: skip
    k = np.minimum(tl.k, tl.n)
    last = tl.t0 + np.where(k < tl.n, k * tl.gw + (tl.n - k - 1) * tl.gt, (tl.n - 1) * tl.gw)
    return float(last[n // 2 :].mean())


def _server(pop: PopulationConfig) -> Any:
    from disco.scheduler.profiles import load_profile

    return load_profile(pop.server_profile, "server")


def population_config(
    opts: ScaleOptions, mean_stream_s: float, sched_rtt_ms: float
) -> PopulationConfig:
    rate = opts.streams / mean_stream_s  # Little's law: L = lambda W
    phases = () if opts.burst is None else (tuple(opts.burst),)
    return PopulationConfig(
        devices=opts.devices, device_profiles=opts.device_profiles,
        server_profile=opts.server_profile, regime=opts.regime,
        rate_per_device=rate / opts.devices, rate_sigma=opts.rate_sigma,
        server_rtt_ms=opts.server_rtt_ms, scheduler_rtt_ms=sched_rtt_ms, prompt=opts.prompt,
        output_min=opts.output_min, output_max=opts.output_max, phases=phases,
        tick_ms=opts.tick_ms, seed=opts.seed,
    )  # fmt: skip


def scheduler_config(opts: ScaleOptions, planning: str, token: str) -> Any:
    from disco.cluster.config import SchedulerConfig

    return SchedulerConfig(
        policy=opts.policy, regime=opts.regime, budget=opts.budget, migration=True,
        server_profile=opts.server_profile, device_profile=opts.device_profiles[0],
        actor_name=f"disco-scale-{token}-{planning}", planning=planning, seed=opts.seed,
        sync_s=opts.sync_s, publish_interval_s=opts.publish_interval_s,
        lease_period_s=opts.lease_period_s,
    )  # fmt: skip


# ---- one run -------------------------------------------------------------------------------------


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


class Run:
    """One planning mode: scheduler actor, shards, polling, teardown of its actors."""

    def __init__(self, opts: ScaleOptions, planning: str, token: str, mean_stream_s: float) -> None:
        self.opts, self.planning, self.token = opts, planning, token
        self.mean_stream_s = mean_stream_s
        self.sched_cfg = scheduler_config(opts, planning, token)
        self.pop_cfg = population_config(opts, mean_stream_s, opts.scheduler_rtt_ms)
        self.scheduler: Any = None
        self.actors: list[Any] = []
        self.last: dict[int, dict[str, Any]] = {}
        self.dead: dict[int, dict[str, Any]] = {}
        self.series: list[dict[str, Any]] = []

    def _say(self, msg: str) -> None:
        print(f"[{self.planning}] {msg}", flush=True)

    def start(self) -> None:
        import ray

        from disco.cluster.config import to_dict
        from disco.cluster.population_actor import start_populations
        from disco.cluster.scheduler_actor import start_scheduler

        o = self.opts
        self.scheduler = start_scheduler(self.sched_cfg)
        ray.get(self.scheduler.ping.remote(), timeout=120)
        res = {o.actor_resource: 1.0} if o.actor_resource else None
        t0 = time.monotonic()
        self.actors = start_populations(
            o.devices, o.actors, self.pop_cfg, self.scheduler, to_dict(self.sched_cfg),
            planning=self.planning, scheduler_rtt_ms=o.scheduler_rtt_ms,
            num_cpus=o.actor_num_cpus, resources=res, name_prefix=f"disco-scale-{self.token}.",
        )  # fmt: skip
        self._say(f"{o.actors} shards of {o.devices:,} devices up in {time.monotonic() - t0:.1f} s")

    def poll(self) -> list[dict[str, Any]]:
        import ray

        refs = {i: a.poll.remote() for i, a in enumerate(self.actors) if i not in self.dead}
        for i, ref in refs.items():
            try:
                self.last[i] = ray.get(ref, timeout=30)
            except Exception as e:  # noqa: BLE001 - a dead shard: what it took with it
                from disco.cluster.population_actor import lost_of

                self.dead[i] = lost_of(self.last.get(i)) | {"error": type(e).__name__}
                self._say(f"shard {i} is gone ({type(e).__name__}): lost {self.dead[i]}")
        return [self.last[i] for i in sorted(self.last)]

    def ledger(self) -> dict[str, Any]:
        import ray

        st = ray.get(self.scheduler.stats.remote(), timeout=30)
        return st["ledger"]

    def run(self) -> dict[str, Any]:
        import ray

        o = self.opts
        cpu0 = ray.get(self.scheduler.cpu.remote(), timeout=30)
        t_start_wall = time.time() + 1.0
        ray.get([a.start.remote(t_start_wall) for a in self.actors], timeout=60)
        while time.time() < t_start_wall:
            time.sleep(0.05)
        wall0 = time.monotonic()
        next_poll, next_say = wall0, wall0 + o.progress_s
        killed = False
        prev_arrivals, prev_t = 0.0, 0.0
        while True:
            now = time.monotonic()
            t = now - wall0
            if t >= o.duration_s:
                break
            if o.kill_actor_at_s is not None and not killed and t >= o.kill_actor_at_s:
                killed = True
                self._say(f"killing shard 0 at t={t:.1f} s")
                ray.kill(self.actors[0], no_restart=True)
            if now >= next_poll:
                polls = self.poll()
                led = self.ledger()
                s = summarize(polls)
                c = s["counters"]
                self.series.append({
                    "t": t, "streams": s["in_flight"], "arrivals": c["arrivals"],
                    "completed": c["completed"],
                    "planned_prompt": c["planned_prompt_tokens"],
                    "planned_constrained": c["planned_constrained_tokens"],
                    "ledger_prompt": led["prompt_tokens"],
                    "ledger_constrained": led["server_prompt_tokens" if o.regime == "server"
                                              else "device_prompt_tokens"],
                    "ledger_requests": led["requests"],
                })  # fmt: skip
                if now >= next_say:
                    rate = (c["arrivals"] - prev_arrivals) / max(1e-9, t - prev_t)
                    prev_arrivals, prev_t = c["arrivals"], t
                    tm = s["timing_ms"] or {}
                    share = (
                        led["prompt_tokens"]
                        and self.series[-1]["ledger_constrained"] / led["prompt_tokens"]
                    )
                    self._say(
                        f"t={t:5.0f}s streams={s['in_flight']:>6,} arrivals={int(c['arrivals']):,} "
                        f"({rate:.0f}/s) err_p99={_fmt(tm.get('p99'))}ms "
                        f"plan_p50={_fmt((s['plan_overhead_ms'] or {}).get('p50'), 3)}ms "
                        f"budget_used={_fmt(share, 3)} (b={o.budget})"
                    )  # fmt: skip
                    next_say += o.progress_s
                next_poll += o.poll_s
            time.sleep(max(0.0, min(next_poll, wall0 + o.duration_s) - time.monotonic()))
        finals: list[dict[str, Any]] = []
        refs = {
            i: a.stop.remote(o.drain_s) for i, a in enumerate(self.actors) if i not in self.dead
        }
        for i, ref in refs.items():
            try:
                finals.append(ray.get(ref, timeout=o.drain_s + 120))
            except Exception as e:  # noqa: BLE001
                from disco.cluster.population_actor import lost_of

                self.dead[i] = lost_of(self.last.get(i)) | {"error": type(e).__name__}
        for i in self.dead:  # a dead shard's numbers: as of its last poll
            if i in self.last:
                finals.append(self.last[i])
        cpu1 = ray.get(self.scheduler.cpu.remote(), timeout=30)
        status = ray.get(self.scheduler.status.remote(), timeout=30)
        led = self.ledger()
        return self.result(finals, status, led, cpu0, cpu1, time.monotonic() - wall0)

    def result(self, finals: list[dict[str, Any]], status: dict[str, Any], led: dict[str, Any],
               cpu0: dict[str, float], cpu1: dict[str, float], wall_s: float) -> dict[str, Any]:  # fmt: skip
        o = self.opts
        s = summarize(finals)
        c = s["counters"]
        warm = min(1.5 * self.mean_stream_s, o.duration_s / 2)
        steady = [x["streams"] for x in self.series if x["t"] >= warm]
        snaps = status.get("snapshots") or {}
        planners = [f.get("planner") or {} for f in finals]
        ages = [
            p.get("snapshot_age_ms_p99")
            for p in planners
            if p.get("snapshot_age_ms_p99") is not None
        ]
        key = "server_prompt_tokens" if o.regime == "server" else "device_prompt_tokens"
        res: dict[str, Any] = {
            "planning": self.planning,
            "devices": o.devices,
            "fleet_actors": o.actors,
            "target_streams": o.streams,
            "mean_stream_s_estimate": self.mean_stream_s,
            "arrival_rate_per_s": o.streams / self.mean_stream_s,
            "rate_per_device_per_s": o.streams / self.mean_stream_s / o.devices,
            "concurrent_streams_p50": _pct(steady, 50),
            "concurrent_streams_p99": _pct(steady, 99),
            "concurrent_streams_max": max((x["streams"] for x in self.series), default=None),
            "warmup_s": warm,
            "token_timing_error_p50_ms": (s["timing_ms"] or {}).get("p50"),
            "token_timing_error_p99_ms": (s["timing_ms"] or {}).get("p99"),
            "token_timing_error_p999_ms": (s["timing_ms"] or {}).get("p99.9"),
            "token_timing_error_max_ms": (s["timing_ms"] or {}).get("max"),
            "tokens": c.get("tokens"),
            "tick_lateness_ms": s["tick_lateness_ms"],
            "tick_work_ms": s["tick_work_ms"],
            "plan_overhead_ms_p50": (s["plan_overhead_ms"] or {}).get("p50"),
            "plan_overhead_ms_p99": (s["plan_overhead_ms"] or {}).get("p99"),
            "scheduler_rtt_ms": o.scheduler_rtt_ms,
            "ttft_s": s["ttft_s"],
            "budget": o.budget,
            "regime": o.regime,
            "budget_used": led[key] / led["prompt_tokens"] if led["prompt_tokens"] else None,
            "budget_used_actors": s["budget_used"],
            "budget_used_planned": s["budget_used_planned"],
            "snapshot_age_ms_p99": max(ages) if ages else None,
            "scheduler_cpu_s": cpu1["cpu_s"] - cpu0["cpu_s"],
            "scheduler_sync_cpu_s": cpu1["sync_cpu_s"] - cpu0["sync_cpu_s"],
            "requests": led["requests"],
            "arrivals": c.get("arrivals"),
            "completed": c.get("completed"),
            "abandoned_at_stop": c.get("abandoned"),
            "plan_errors": c.get("plan_errors"),
            "report_errors": c.get("report_errors"),
            "syncs": snaps.get("syncs"),
            "publishes": snaps.get("publishes"),
            "fits": snaps.get("fits"),
            "leases_issued": snaps.get("leases_issued"),
            "leases_lost": snaps.get("leases_lost"),
            "lost_allowance_tokens": snaps.get("lost_allowance_tokens"),
            "stale_plans": sum(p.get("stale_plans", 0) for p in planners),
            "lease_denied": sum(p.get("lease_denied", 0) or 0 for p in planners),
            "scheduler_plans": status.get("plans"),
            "lost": {str(i): v for i, v in self.dead.items()},
            "actor_cpu_s": [f.get("cpu_s") for f in finals],
            "actor_niceness": [f.get("nice") for f in finals],
            "wall_s": wall_s,
            "series": self.series,
        }
        if o.burst is not None:
            b0, b1, mult = o.burst
            res["burst"] = {"start_s": b0, "end_s": b1, "multiplier": mult}
            res["burst"] |= _window_share(self.series, b0, b1)
        return res

    def teardown(self) -> None:
        import ray

        for h in [*self.actors, self.scheduler]:
            if h is not None:
                with contextlib.suppress(Exception):
                    ray.kill(h, no_restart=True)
        self.actors, self.scheduler = [], None


def _window_share(series: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Any]:
    """Budget used by the requests planned in [t0, t1] (shards' plan-time counts) and by the
    requests the ledger learned of in [t0, t1 + 10 s] (reported when they end)."""

    def at(t: float) -> dict[str, Any] | None:
        past = [x for x in series if x["t"] <= t]
        return past[-1] if past else (series[0] if series else None)

    a, b = at(t0), at(t1)
    b2 = at(t1 + 10.0)
    out: dict[str, Any] = {"budget_used_planned": None, "budget_used_ledger": None}
    if a is None or b is None:
        return out
    dp = b["planned_prompt"] - a["planned_prompt"]
    if dp > 0:
        out["budget_used_planned"] = (b["planned_constrained"] - a["planned_constrained"]) / dp
        out["requests_planned"] = b["arrivals"] - a["arrivals"]
    dl = b2["ledger_prompt"] - a["ledger_prompt"]
    if dl > 0:
        out["budget_used_ledger"] = (b2["ledger_constrained"] - a["ledger_constrained"]) / dl
    return out


def _fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


# ---- the whole benchmark ---------------------------------------------------------------------------


def _load() -> list[float]:
    with contextlib.suppress(OSError):
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    return []


def run_scale(opts: ScaleOptions, command: str | None = None) -> dict[str, Any]:
    """Run each planning mode asked for on an embedded Ray of its own; write scale.json and
    scale.png under ``opts.out``; returns the document."""
    import ray

    from disco.cluster.config import SchedulerConfig

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    modes = ["snapshot", "central"] if opts.planning == "both" else [opts.planning]
    token = uuid.uuid4().hex[:6]
    load0 = _load()
    mean_s = opts.mean_stream_s
    if mean_s is None:
        t0 = time.monotonic()
        probe = population_config(opts, 1.0, 0.0)
        sched = SchedulerConfig(policy=opts.policy, regime=opts.regime, budget=opts.budget,
                                server_profile=opts.server_profile,
                                device_profile=opts.device_profiles[0], seed=opts.seed)  # fmt: skip
        mean_s = estimate_stream_s(probe, sched)
        print(f"mean stream length {mean_s:.1f} s (core simulator, {time.monotonic() - t0:.1f} s): "
              f"{opts.streams / mean_s:.1f} arrivals/s for {opts.streams:,} streams", flush=True)  # fmt: skip
    for name, value in {"RAY_USAGE_STATS_ENABLED": "0"}.items():
        os.environ.setdefault(name, value)
    num_cpus = opts.num_cpus or (opts.actors + 2)
    resources = {opts.actor_resource: float(opts.actors)} if opts.actor_resource else None
    # Ray starts its workers at niceness 15 (raylet's worker_niceness): on a shared machine
    # every other process then comes first and a shard's 5 ms tick waits behind them. The
    # benchmark's actors run at the ordinary niceness 0, like the driver and everything else.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             namespace=f"disco-scale-{os.getpid()}-{token}", log_to_driver=False,
             resources=resources, _system_config={"worker_niceness": WORKER_NICENESS})  # fmt: skip
    runs: dict[str, dict[str, Any]] = {}
    try:
        for mode in modes:
            r = Run(
                opts,
                mode,
                token,
                mean_s + (opts.scheduler_rtt_ms / 1000 if mode == "central" else 0),
            )
            try:
                r.start()
                runs[mode] = r.run()
            finally:
                r.teardown()
            _headline(runs[mode])
    finally:
        ray.shutdown()
    first = runs[modes[0]]
    doc: dict[str, Any] = {k: v for k, v in first.items() if k != "series"}
    doc |= {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
        "command": command,
        "load_avg_start": load0,
        "load_avg_end": _load(),
        "cpus": os.cpu_count(),
        "ray_worker_niceness": WORKER_NICENESS,
        "options": asdict(opts),
        "keys": KEYS,
        "runs": runs,
    }
    if "central" in runs and modes[0] != "central":
        c = runs["central"]
        doc["central"] = {k: v for k, v in c.items() if k != "series"}
        doc["plan_overhead_ms_p50_central"] = c["plan_overhead_ms_p50"]
        doc["plan_overhead_ms_p99_central"] = c["plan_overhead_ms_p99"]
    (out / "scale.json").write_text(json.dumps(_finite(doc), indent=1) + "\n")
    plot(runs, opts, out / "scale.png")
    return doc


HEADLINE = ("devices", "fleet_actors", "concurrent_streams_p50", "token_timing_error_p99_ms",
            "plan_overhead_ms_p50", "plan_overhead_ms_p99", "budget", "budget_used",
            "budget_used_actors", "snapshot_age_ms_p99", "scheduler_cpu_s", "requests", "syncs",
            "publishes", "leases_lost")  # fmt: skip


def _headline(r: dict[str, Any]) -> None:
    for k in HEADLINE:
        print(f"[{r['planning']}] {k:>26}: {r.get(k)}", flush=True)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def plot(runs: dict[str, dict[str, Any]], opts: ScaleOptions, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    colors = {"snapshot": "tab:blue", "central": "tab:orange"}
    for mode, r in runs.items():
        s = r["series"]
        if not s:
            continue
        t = np.array([x["t"] for x in s])
        ax1.plot(t, [x["streams"] for x in s], color=colors[mode], label=f"{mode}: streams")
        lp = np.array([x["ledger_prompt"] for x in s], dtype=float)
        lc = np.array([x["ledger_constrained"] for x in s], dtype=float)
        pp = np.array([x["planned_prompt"] for x in s], dtype=float)
        pc = np.array([x["planned_constrained"] for x in s], dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            ax2.plot(t, np.where(lp > 0, lc / lp, np.nan), color=colors[mode],
                     label=f"{mode}: scheduler ledger (cumulative)")  # fmt: skip
            # planned share over a sliding 5 s window
            w = max(1, int(round(5.0 / opts.poll_s)))
            dpp, dpc = pp[w:] - pp[:-w], pc[w:] - pc[:-w]
            if dpp.size:
                ax2.plot(t[w:], np.where(dpp > 0, dpc / dpp, np.nan), color=colors[mode],
                         alpha=0.45, linestyle="--", label=f"{mode}: planned, last 5 s")  # fmt: skip
    ax1.axhline(opts.streams, color="grey", linestyle=":", label="target streams")
    ax2.axhline(opts.budget, color="black", linestyle=":", label=f"budget b={opts.budget:g}")
    if opts.burst is not None:
        for ax in (ax1, ax2):
            ax.axvspan(opts.burst[0], opts.burst[1], color="red", alpha=0.08,
                       label=f"{opts.burst[2]:g}x burst")  # fmt: skip
    ax1.set_ylabel("concurrent streams")
    ax2.set_ylabel(f"budget used ({opts.regime} prompt share)")
    ax2.set_xlabel("seconds")
    ax2.set_ylim(0, 1)
    ax1.legend(loc="best", fontsize=8)
    ax2.legend(loc="best", fontsize=8)
    ax1.set_title(f"disco bench scale: {opts.devices:,} devices, {opts.actors} shards, "
                  f"scheduler RTT {opts.scheduler_rtt_ms:g} ms")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the command line ------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="disco bench scale",
        description="Many emulated devices planning from snapshots (or per request); "
        "scale.json + scale.png.",
    )
    p.add_argument(
        "--devices", type=int, default=100_000, help="registered devices (default 100000)"
    )
    p.add_argument("--streams", type=int, default=3000,
                   help="target concurrent streams: sets the arrival rate (default 3000)")  # fmt: skip
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals (default 60)")
    p.add_argument("--scheduler-rtt-ms", type=float, default=0.0,
                   help="emulated device <-> scheduler round trip (default 0)")  # fmt: skip
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--actors", type=int, default=3, help="population actors (default 3)")
    p.add_argument("--planning", default="snapshot", help="snapshot | central | both")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--regime", default="server", help="server | device")
    p.add_argument("--policy", default="disco")
    p.add_argument("--burst", nargs="?", const="auto", default=None, metavar="START:END[:X]",
                   help="a phase of X times the rate (default 10) from START to END seconds; "
                   "bare: the middle third of the run at 10x")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tick-ms", type=float, default=5.0, help="token release tick (default 5)")
    p.add_argument("--drain", type=float, default=0.0,
                   help="seconds streams in flight get to end after the run (default 0)")  # fmt: skip
    p.add_argument(
        "--mean-stream-s",
        type=float,
        default=None,
        help="mean stream length for sizing (default: the core simulator's estimate)",
    )
    p.add_argument("--device-profiles", default="xiaomi14-qwen0.5b,pixel7pro-bloom1.1b",
                   help="device profiles, round-robin over devices")  # fmt: skip
    p.add_argument("--server-profile", default="gpt-4o-mini")
    p.add_argument(
        "--prompt", default="azure-conv", help=f"prompt lengths: {', '.join(PROMPT_DISTS)}"
    )
    p.add_argument("--output-tokens", default="200:400", metavar="MIN:MAX",
                   help="output tokens, uniform (default 200:400)")  # fmt: skip
    p.add_argument("--server-rtt-ms", type=float, default=40.0,
                   help="median device <-> server round trip (default 40)")  # fmt: skip
    p.add_argument("--sync-s", type=float, default=0.5, help="holder sync interval (default 0.5)")
    p.add_argument("--kill-actor-at", type=float, default=None, metavar="S",
                   help="kill shard 0 S seconds in: what it took with it is reported")  # fmt: skip
    p.add_argument(
        "--actor-resource",
        default=None,
        metavar="NAME",
        help="a custom Ray resource the shards are placed by (one unit each)",
    )
    return p


def options_from_args(a: argparse.Namespace) -> ScaleOptions:
    """Checked options; a ValueError names the bad flag."""
    if a.devices < 1:
        raise ValueError("--devices must be >= 1")
    if a.streams < 1:
        raise ValueError("--streams must be >= 1")
    if not a.duration > 0:
        raise ValueError("--duration must be > 0")
    if a.scheduler_rtt_ms < 0 or a.server_rtt_ms < 0:
        raise ValueError("--scheduler-rtt-ms and --server-rtt-ms must be >= 0")
    if not 1 <= a.actors <= a.devices:
        raise ValueError("--actors must be >= 1 and <= --devices")
    if a.planning not in ("snapshot", "central", "both"):
        raise ValueError(f"--planning must be snapshot, central or both, got {a.planning!r}")
    if not 0.0 <= a.budget <= 1.0:
        raise ValueError(f"--budget must be in [0, 1], got {a.budget}")
    if a.regime not in ("server", "device"):
        raise ValueError(f"--regime must be server or device, got {a.regime!r}")
    if not a.tick_ms > 0 or a.drain < 0 or a.sync_s <= 0:
        raise ValueError("--tick-ms and --sync-s must be > 0, --drain >= 0")
    if a.mean_stream_s is not None and not a.mean_stream_s > 0:
        raise ValueError("--mean-stream-s must be > 0")
    if a.prompt not in PROMPT_DISTS:
        raise ValueError(f"--prompt must be one of {', '.join(PROMPT_DISTS)}")
    try:
        lo, hi = (int(x) for x in a.output_tokens.split(":"))
    except ValueError:
        raise ValueError(f"--output-tokens must be MIN:MAX, got {a.output_tokens!r}") from None
    if not 1 <= lo <= hi:
        raise ValueError("--output-tokens: need 1 <= MIN <= MAX")
    burst = None
    if a.burst is not None:
        if a.burst == "auto":
            burst = (a.duration / 3, 2 * a.duration / 3, 10.0)
        else:
            try:
                parts = [float(x) for x in a.burst.split(":")]
            except ValueError:
                raise ValueError(f"--burst must be START:END[:X], got {a.burst!r}") from None
            if (
                len(parts) not in (2, 3)
                or not 0 <= parts[0] < parts[1]
                or (len(parts) == 3 and parts[2] < 0)
            ):
                raise ValueError(
                    f"--burst must be START:END[:X] with START < END, X >= 0, got {a.burst!r}"
                )
            burst = (parts[0], parts[1], parts[2] if len(parts) == 3 else 10.0)
    profiles = tuple(x.strip() for x in a.device_profiles.split(",") if x.strip())
    from disco.scheduler.profiles import load_profile

    try:
        for name in profiles:
            load_profile(name, "device")
        load_profile(a.server_profile, "server")
    except Exception as e:  # noqa: BLE001 - an unknown profile: the registry's message
        raise ValueError(f"--device-profiles/--server-profile: {e}") from None
    if not profiles:
        raise ValueError("--device-profiles: at least one")
    if a.kill_actor_at is not None and not 0 <= a.kill_actor_at < a.duration:
        raise ValueError("--kill-actor-at must be within the run")
    return ScaleOptions(
        devices=a.devices, streams=a.streams, duration_s=a.duration,
        scheduler_rtt_ms=a.scheduler_rtt_ms, out=a.out, actors=a.actors, planning=a.planning,
        budget=a.budget, regime=a.regime, policy=a.policy, burst=burst, seed=a.seed,
        tick_ms=a.tick_ms, drain_s=a.drain, mean_stream_s=a.mean_stream_s,
        device_profiles=profiles, server_profile=a.server_profile, prompt=a.prompt,
        output_min=lo, output_max=hi, server_rtt_ms=a.server_rtt_ms, sync_s=a.sync_s,
        kill_actor_at_s=a.kill_actor_at, actor_resource=a.actor_resource,
    )  # fmt: skip


def _sigterm_as_interrupt() -> None:
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGTERM, handler)


def main(argv: Sequence[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        opts = options_from_args(a)
    except ValueError as e:
        print(f"disco bench scale: {e}", file=sys.stderr)
        return 2
    _sigterm_as_interrupt()
    argv = sys.argv[1:] if argv is None else list(argv)
    run_scale(opts, "disco bench scale " + " ".join(argv))
    print(f"wrote {Path(opts.out) / 'scale.json'} and {Path(opts.out) / 'scale.png'}")
    return 0


__all__ = ["KEYS", "ScaleOptions", "estimate_stream_s", "main", "run_scale"]
