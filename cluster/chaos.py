"""``disco bench chaos``: faults at random under a steady load, and what the users lost (issue 15).

The testbed of :mod:`disco.cluster.chaos_bed` (emulated replicas behind Serve, the scheduler
actor, a real llama.cpp agent, emulated fleets) runs the open-loop load of
:mod:`disco.cluster.chaos_load` while a seeded injector, every ``kill_every`` seconds on average
(uniform 0.5-1.5 x), injects the next fault of a shuffled cycle over the kinds:

- ``replica_kill``: the server replica actor with the most streams open is killed (Serve
  replaces it); only while every replica runs, so the server as a whole never dies.
- ``fleet_kill``: a fleet actor is killed with its devices and their streams (the users' own
  devices die: ``device_lost``, not ``lost``); it comes back under a new name 2-4 s later (one
  dead fleet at a time), and its users send nothing meanwhile (``skipped_device_dead``).
- ``engine_fail``: the agent's llama.cpp engine fails every stream in flight and refuses new ones
  for 0.5-2 s (``FaultyEndpoint``).
- ``scheduler_kill``: the scheduler actor is killed; Ray restarts it from its checkpoint and the
  devices plan locally meanwhile (``scheduler_restart_s``).
- ``stream_stall``: one server stream on one replica stops producing without ending (the
  router picks the replica: up to 6 tries to reach one with a stream open; else the next stream
  to start there never produces its first token).
- ``partition``: one fleet device loses the server for 2-5 s (``hang`` or ``fail``): one whose
  user is streaming from the server at that moment when there is one.

What ``chaos.json`` reports (every count from what the users received):

- ``requests`` sent; ``accepted`` (answered anything but a refusal); ``finished`` (complete:
  ``[DONE]``, a finish reason, indices 0..n-1 once each); ``refused`` (429: the device's queue was
  full, by design).
- ``lost``: accepted and not finished, although the user's own device survived (and the server
  app, with at least one replica, always does); ``device_lost``: not finished because the
  user's own device was killed while the request was open. ``lost_requests`` lists each loss
  with its error and the faults around it.
- ``duplicated_tokens`` (a ``disco.index`` seen again in one stream), ``out_of_order_tokens``
  (an index below the one before it), ``missing_tokens`` (indices skipped in a stream that
  claims to have finished).
- ``recovery_s_*``: for each fault and each stream it affected, the time from the fault to that
  stream's next token. A stream is in a fault's scope when it was open at the fault and on the
  faulted part (``replica_kill``/``stream_stall``: its last token came from the server;
  ``engine_fail``: an agent stream on the device or before its first token; ``partition``: a
  stream of that device on the server or before its first token); it is affected when its next
  token came from the other endpoint (a hand-over) or after a silence longer than max(0.25 s,
  4 x its own median gap). ``fleet_kill`` and ``scheduler_kill`` have no stream to recover.
- ``budget_drift``: the scheduler's spent share minus its budget b over the run (its ledger,
  which survives its restarts); ``budget`` has both and the sliding window's share.
- ``timeline.png``: every stream's tokens by endpoint over time, losses marked, and the faults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from disco.cluster.chaos_load import LoadOptions, OpenLoop, StreamRecord

FAULT_KINDS = (
    "replica_kill", "fleet_kill", "engine_fail", "scheduler_kill", "stream_stall", "partition",
)  # fmt: skip
SCOPED = {"replica_kill", "stream_stall", "engine_fail", "partition"}


@dataclass
class Fault:
    t: float  # s from the run's start
    kind: str
    target: str = ""
    until: float | None = None  # when a bounded fault ends (partition, engine down, fleet back)
    affected: int | None = None  # streams the fault hook says it hit (where it knows)
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# ---- analysis: pure functions over the records (tests/cluster/test_chaos_analysis.py) ----------


def stream_order(rec: StreamRecord) -> tuple[int, int, int]:
    """(duplicated, out of order, missing) token indices of one stream, as its user got it."""
    idx = [i for i in rec.index if i is not None]
    dup = len(idx) - len(set(idx))
    ooo = sum(1 for a, b in zip(idx, idx[1:], strict=False) if b < a)
    missing = 0
    if rec.done and idx:
        missing = len(set(range(max(idx) + 1)) - set(idx))
    return dup, ooo, missing


def device_deaths(faults: Sequence[Fault]) -> dict[str, list[tuple[float, float]]]:
    """Device id -> the (from, to) windows in which it was dead (fleet kills)."""
    out: dict[str, list[tuple[float, float]]] = {}
    for f in faults:
        if f.kind == "fleet_kill" and f.error is None:
            for d in f.detail.get("devices", []):
                out.setdefault(d, []).append((f.t, f.until if f.until is not None else math.inf))
    return out


def classify(rec: StreamRecord, deaths: dict[str, list[tuple[float, float]]]) -> str:
    """``finished``, ``refused``, ``device_lost`` or ``lost`` (module docstring)."""
    if rec.complete:
        return "finished"
    if rec.status in (429,) or 400 <= rec.status < 500:
        return "refused"
    end = rec.end if rec.end is not None else math.inf
    for lo, hi in deaths.get(rec.device, []):
        if rec.sent <= hi and end >= lo - 0.5:
            return "device_lost"
    return "lost"


def _median_gap(rec: StreamRecord) -> float:
    gaps = [b - a for a, b in zip(rec.t, rec.t[1:], strict=False)]
    return statistics.median(gaps) if gaps else 0.0


def _in_scope(f: Fault, rec: StreamRecord, last_src: str | None, agent_id: str) -> bool:
    if f.kind in ("replica_kill", "stream_stall"):
        return last_src == "server"
    if f.kind == "engine_fail":
        return rec.device == agent_id and last_src in (None, "device")
    if f.kind == "partition":
        return rec.device == f.target and last_src in (None, "server")
    return False


PrefillOf = Callable[[StreamRecord, str | None, int], float | None]


def recoveries(
    records: Sequence[StreamRecord],
    faults: Sequence[Fault],
    agent_id: str = "agent-0",
    prefill_of: PrefillOf | None = None,
) -> list[dict[str, Any]]:
    """One row per (fault, affected stream): the time from the fault to the stream's next token
    and whether that token came from the other endpoint (module docstring). ``prefill_of(rec,
    endpoint, delivered)`` estimates the prefill of the endpoint that produced that token (its
    profile's TTFT for the prompt plus the delivered tokens): ``excess_s`` is the rest."""
    rows = []
    for fi, f in enumerate(faults):
        if f.kind not in SCOPED or f.error is not None:
            continue
        for rec in records:
            end = rec.end if rec.end is not None else math.inf
            if not (rec.sent <= f.t < end) or not rec.t or rec.t[-1] <= f.t:
                continue
            k = next(i for i, t in enumerate(rec.t) if t > f.t)  # first token after the fault
            last_src = rec.source[k - 1] if k > 0 else None
            if not _in_scope(f, rec, last_src, agent_id):
                continue
            prev = rec.t[k - 1] if k > 0 else rec.sent
            handover = k > 0 and rec.source[k] != last_src
            silence = rec.t[k] - prev
            if not (handover or silence > max(0.25, 4 * _median_gap(rec))):
                continue
            row = {"fault": fi, "kind": f.kind, "request": rec.id, "device": rec.device,
                   "recovery_s": rec.t[k] - f.t, "handover": handover, "to": rec.source[k],
                   "delivered": k}  # fmt: skip
            prefill = prefill_of(rec, rec.source[k], k) if prefill_of is not None else None
            if prefill is not None:
                row["target_prefill_s"] = prefill
                row["excess_s"] = row["recovery_s"] - prefill
            rows.append(row)
    return rows


def prefill_model(cfg: Any) -> PrefillOf:
    """``prefill_of`` for a chaos testbed's config (``chaos_bed.bed_config``): each device's own
    profile (a fleet device's by its index, the agent's llama.cpp profile) and the emulated
    server's profile (its mean TTFT)."""
    from disco.scheduler.profiles import DeviceProfile, ServerProfile, load_profile

    server = load_profile(cfg.scheduler.server_profile, "server")
    assert isinstance(server, ServerProfile)
    base = float(np.mean(server.ttft_samples)) if server.ttft_samples else 0.0
    fleet = [load_profile(n, "device") for n in cfg.fleet.profiles]
    agent = load_profile(cfg.agent.device_profile or cfg.scheduler.device_profile, "device")

    def device_profile(device: str) -> DeviceProfile | None:
        if device == cfg.agent.device_id:
            return agent  # type: ignore[return-value]
        try:
            return fleet[int(device.rsplit("-", 1)[1]) % len(fleet)]  # type: ignore[return-value]
        except (IndexError, ValueError):
            return None

    def prefill_of(rec: StreamRecord, to: str | None, delivered: int) -> float | None:
        tokens = rec.prompt_tokens + delivered
        if to == "server":
            return base + server.ttft_per_prompt_token_s * tokens
        prof = device_profile(rec.device) if to == "device" else None
        return None if prof is None else float(prof.ttft(tokens))

    return prefill_of


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def summarize(
    records: Sequence[StreamRecord],
    faults: Sequence[Fault],
    *,
    agent_id: str = "agent-0",
    budget: dict[str, Any] | None = None,
    prefill_of: PrefillOf | None = None,
) -> dict[str, Any]:
    """``chaos.json``'s numbers (module docstring) from the records and the faults."""
    deaths = device_deaths(faults)
    classes = Counter()
    lost_rows = []
    dup = ooo = missing = 0
    for rec in records:
        d, o, m = stream_order(rec)
        dup, ooo, missing = dup + d, ooo + o, missing + m
        c = classify(rec, deaths)
        classes[c] += 1
        if c == "lost":
            end = rec.end if rec.end is not None else math.inf
            near = [{"t": round(f.t, 2), "kind": f.kind, "target": f.target}
                    for f in faults if rec.sent - 2 <= f.t <= end + 1]  # fmt: skip
            lost_rows.append({"request": rec.id, "device": rec.device, "sent": round(rec.sent, 3),
                              "end": rec.end, "status": rec.status, "error": rec.error,
                              "tokens": len(rec.t), "faults_near": near})  # fmt: skip
    rec_rows = recoveries(records, faults, agent_id, prefill_of)
    rec_s = [r["recovery_s"] for r in rec_rows]
    excess = [r["excess_s"] for r in rec_rows if "excess_s" in r]
    by_kind: dict[str, Any] = {}
    for kind in sorted({r["kind"] for r in rec_rows}):
        v = [r["recovery_s"] for r in rec_rows if r["kind"] == kind]
        by_kind[kind] = {"streams": len(v), "p50_s": _pct(v, 50), "p99_s": _pct(v, 99),
                         "max_s": max(v)}  # fmt: skip
    restarts = [f.detail["restart_s"] for f in faults
                if f.kind == "scheduler_kill" and "restart_s" in f.detail]  # fmt: skip
    out: dict[str, Any] = {
        "requests": len(records),
        "accepted": sum(r.accepted for r in records),
        "finished": classes["finished"],
        "refused": classes["refused"],
        "lost": classes["lost"],
        "device_lost": classes["device_lost"],
        "duplicated_tokens": dup,
        "out_of_order_tokens": ooo,
        "missing_tokens": missing,
        "tokens": sum(len(r.t) for r in records),
        "faults": dict(Counter(f.kind for f in faults if f.error is None)),
        "faults_total": sum(f.error is None for f in faults),
        "faults_failed": sum(f.error is not None for f in faults),
        "recovery_streams": len(rec_s),
        "recovery_handovers": sum(r["handover"] for r in rec_rows),
        "recovery_s_p50": _pct(rec_s, 50),
        "recovery_s_p99": _pct(rec_s, 99),
        "recovery_s_max": max(rec_s) if rec_s else None,
        # recovery less the recovering endpoint's own prefill (its profile's estimate)
        "recovery_excess_s_p99": _pct(excess, 99),
        "recovery_excess_s_max": max(excess) if excess else None,
        "recovery_by_kind": by_kind,
        "scheduler_restart_s_max": max(restarts) if restarts else None,
    }
    if budget is not None:
        out["budget"] = budget
        spent, target = budget.get("spent_share"), budget.get("target")
        out["budget_drift"] = None if spent is None or target is None else spent - target
    out["lost_requests"] = lost_rows[:100]
    out["recoveries"] = rec_rows
    return out


# ---- the plot ----------------------------------------------------------------------------------

FAULT_COLORS = {"replica_kill": "tab:red", "fleet_kill": "gray", "engine_fail": "tab:purple",
                "scheduler_kill": "tab:green", "stream_stall": "tab:olive",
                "partition": "tab:cyan"}  # fmt: skip


def plot_timeline(
    records: Sequence[StreamRecord],
    faults: Sequence[Fault],
    path: Path,
    title: str = "",
    window: tuple[float, float] | None = None,
) -> Path:
    """Top: one row per device, each token a dot at its arrival (blue: server, orange: device;
    a request's streams are spread a little within its device's row), losses marked; faults as
    vertical lines, a partition, a device engine down or a dead fleet shaded in their devices'
    rows. Bottom: tokens/s delivered by endpoint. ``window``: (from, to) seconds only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    lo, hi = window if window is not None else (-math.inf, math.inf)
    deaths = device_deaths(faults)
    devices = sorted({r.device for r in records}, key=lambda d: (not d.startswith("agent"), d))
    row = {d: i for i, d in enumerate(devices)}
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(13, 8), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})  # fmt: skip
    for src, color in (("server", "tab:blue"), ("device", "tab:orange")):
        xs, ys = [], []
        for r in records:
            y = row[r.device] + (r.id % 7) * 0.11
            for t, s in zip(r.t, r.source, strict=False):
                if s == src and lo <= t <= hi:
                    xs.append(t)
                    ys.append(y)
        ax.scatter(xs, ys, s=1.5 if window else 0.6, c=color, label=f"token from the {src}",
                   linewidths=0)  # fmt: skip
    for cls, marker, color in (("lost", "x", "red"), ("device_lost", "|", "black")):
        rs = [r for r in records if classify(r, deaths) == cls
              and lo <= (r.end if r.end is not None else r.sent) <= hi]  # fmt: skip
        ax.scatter([r.end if r.end is not None else r.sent for r in rs],
                   [row[r.device] + (r.id % 7) * 0.11 for r in rs], marker=marker, c=color,
                   s=30, label=f"{cls} ({len(rs)})")  # fmt: skip
    seen: set[str] = set()
    for f in faults:
        if f.error is not None or not lo - 10 <= f.t <= hi:
            continue
        color = FAULT_COLORS.get(f.kind, "gray")
        label = f.kind if f.kind not in seen else None
        seen.add(f.kind)
        rows = []
        if f.kind == "fleet_kill":
            rows = [row[d] for d in f.detail.get("devices", []) if d in row]
        elif f.kind in ("partition", "engine_fail") and f.target in row:
            rows = [row[f.target]]
        until = f.until if f.until is not None and math.isfinite(f.until) else f.t + 1.0
        for y in rows:
            ax.add_patch(Rectangle((f.t, y - 0.1), until - f.t, 0.95, color=color, alpha=0.25,
                                   linewidth=0))  # fmt: skip
        for a in (ax, ax2):
            a.axvline(f.t, color=color, lw=0.7, alpha=0.6, label=label if a is ax else None)
    end = max([r.end or r.sent for r in records], default=1.0)
    bins = np.arange(max(0.0, lo if window else 0.0), min(end, hi) + 1.0, 1.0)
    for src, color in (("server", "tab:blue"), ("device", "tab:orange")):
        ts = [t for r in records for t, s in zip(r.t, r.source, strict=False) if s == src]
        h, _ = np.histogram(ts, bins=bins)
        ax2.plot(bins[:-1], h, color=color, lw=0.8, label=src)
    ax.set_yticks([row[d] + 0.35 for d in devices], devices, fontsize=7)
    ax.set_ylim(-0.3, len(devices) + 0.2)
    if window is not None:
        ax.set_xlim(lo, hi)
    ax.set_title(title or "chaos: tokens by endpoint, faults marked")
    handles, labels = ax.get_legend_handles_labels()
    tokens = [i for i, lab in enumerate(labels) if lab.startswith("token")]
    first = ax.legend([handles[i] for i in tokens], [labels[i] for i in tokens],
                      loc="upper left", fontsize=7, markerscale=6, framealpha=0.9)  # fmt: skip
    ax.add_artist(first)
    rest = [i for i in range(len(labels)) if i not in tokens]
    ax.legend([handles[i] for i in rest], [labels[i] for i in rest], loc="upper right",
              fontsize=7, ncol=4, framealpha=0.9)  # fmt: skip
    ax2.set_ylabel("tokens/s")
    ax2.set_xlabel("time since start (s)")
    ax2.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChaosOptions:
    duration_s: float = 60.0
    kill_every_s: float = 5.0
    seed: int = 0
    out: str = "chaos-out"
    rate: float = 3.0
    kinds: tuple[str, ...] = FAULT_KINDS
    warmup_s: float = 5.0  # no fault before this (s after the load starts)
    quiet_tail_s: float = 6.0  # nor in the last seconds: their recovery is measured too
    drain_s: float = 60.0
    replicas: int = 2
    fleets: int = 2
    devices_per_fleet: int = 4
    agent: bool = True
    agent_share: float = 0.15  # of the requests, the real llama.cpp agent's user's
    budget: float = 0.5
    policy: str = "disco"


class Injector:
    """Injects the faults on schedule (seeded) and records them."""

    def __init__(
        self, bed: Any, opts: ChaosOptions, clock: Any,
        open_streams: Callable[[], Sequence[StreamRecord]] = tuple,
    ) -> None:  # fmt: skip
        self.bed = bed
        self.opts = opts
        self.now = clock
        self.open_streams = open_streams  # the users' streams open now (to aim a partition)
        self.rng = np.random.default_rng([opts.seed, 3])
        self.faults: list[Fault] = []
        self.stopped = False
        self._background: set[asyncio.Task] = set()
        self._scheduler_restarting = False

    def schedule(self) -> list[float]:
        o, rng = self.opts, np.random.default_rng([self.opts.seed, 4])
        out, t = [], o.warmup_s
        while True:
            t += float(rng.uniform(0.5, 1.5)) * o.kill_every_s
            if t >= o.duration_s - o.quiet_tail_s:
                return out
            out.append(t)

    async def run(self) -> None:
        cycle: list[str] = []
        for due in self.schedule():
            delay = due - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.stopped:
                break
            for _ in range(len(self.opts.kinds)):
                if not cycle:
                    cycle = [str(k) for k in self.rng.permutation(list(self.opts.kinds))]
                kind = cycle.pop()
                fault = Fault(self.now(), kind)
                try:
                    ok = await getattr(self, f"_{kind}")(fault)
                except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                    ok, fault.error = True, f"{type(e).__name__}: {e}"[:300]
                if ok:
                    self.faults.append(fault)
                    break
                # Not possible now (a replica still restarting...): the next kind instead, this
                # one later.
                cycle.insert(0, kind)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _replica_kill(self, f: Fault) -> bool:
        bed = self.bed
        if await asyncio.to_thread(bed.running_replicas) < bed.opts.replicas:
            return False
        f.t = self.now()
        killed = await asyncio.to_thread(
            bed.kill_replica, lambda names: names[int(self.rng.integers(0, len(names)))]
        )  # fmt: skip
        if killed is not None:
            f.target, f.affected = killed
        return True

    async def _fleet_kill(self, f: Fault) -> bool:
        bed = self.bed
        up = sorted(i for i, s in bed.fleets.items() if s.up)
        if not up or len(up) < len(bed.fleets):  # one dead fleet at a time
            return False
        index = up[int(self.rng.integers(0, len(up)))]
        down_s = float(self.rng.uniform(2.0, 4.0))
        f.t = self.now()
        f.target = f"fleet{index}"
        f.detail["devices"] = await asyncio.to_thread(bed.kill_fleet, index)
        f.until = math.inf

        async def restart() -> None:
            await asyncio.sleep(down_s)
            try:
                await asyncio.to_thread(bed.start_fleet, index)
            except Exception as e:  # noqa: BLE001 - its devices stay down
                f.detail["restart_error"] = f"{type(e).__name__}: {e}"[:300]
                return
            f.until = self.now()

        self._spawn(restart())
        return True

    async def _engine_fail(self, f: Fault) -> bool:
        bed = self.bed
        if bed.agent is None:
            return False
        down_s = float(self.rng.uniform(0.5, 2.0))
        f.t = self.now()
        f.target = bed.config.agent.device_id
        f.affected = await bed.agent.fault.remote("fail", down_s=down_s)
        f.until = f.t + down_s
        return True

    async def _scheduler_kill(self, f: Fault) -> bool:
        import ray

        if self._scheduler_restarting:
            return False
        sched = self.bed.scheduler
        pid = await asyncio.wait_for(sched.ping.remote(), 30)
        f.t = self.now()
        f.target = "scheduler"
        ray.kill(sched, no_restart=False)
        self._scheduler_restarting = True

        async def back() -> None:
            try:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    with contextlib.suppress(Exception):
                        if await asyncio.wait_for(sched.ping.remote(), 5) != pid:
                            f.detail["restart_s"] = self.now() - f.t
                            f.until = self.now()
                            return
                    await asyncio.sleep(0.1)
            finally:
                self._scheduler_restarting = False

        self._spawn(back())
        return True

    async def _stream_stall(self, f: Fault) -> bool:
        handle = self.bed.server_handle

        def stall(tries: int = 6) -> dict[str, Any]:
            # The router picks the replica: a few tries to find one with a stream to stall,
            # then the next stream to start on whichever replica the last call reaches.
            for i in range(tries):
                out = handle.fault.remote("stall", next_if_idle=i == tries - 1).result(
                    timeout_s=30
                )  # fmt: skip
                if out["affected"]:
                    break
            return out

        f.t = self.now()
        out = await asyncio.to_thread(stall)
        f.target, f.affected = out["replica"], out["affected"]
        return True

    async def _partition(self, f: Fault) -> bool:
        bed = self.bed
        devices = sorted(d for s in bed.fleets.values() if s.up for d in s.urls)
        if not devices:
            return False
        # A device whose user is streaming from the server now, if any (the worst moment).
        busy = sorted({r.device for r in self.open_streams() if r.source and
                       r.source[-1] == "server" and r.device in devices})  # fmt: skip
        pool = busy or devices
        device = pool[int(self.rng.integers(0, len(pool)))]
        seconds = float(self.rng.uniform(2.0, 5.0))
        mode = str(self.rng.choice(["hang", "fail"]))
        slot = bed.fleets[bed.fleet_of(device)]
        f.t = self.now()
        f.target, f.until, f.detail["mode"] = device, f.t + seconds, mode
        await slot.handle.partition.remote(device, seconds, mode)
        return True


def _budget(bed: Any) -> dict[str, Any]:
    import ray

    status = ray.get(bed.scheduler.status.remote(), timeout=60)
    b = status["budget"]
    return {"target": b["target"], "spent_share": b["spent_share"],
            "window_share": b["window_share"], "ledger_requests": status["requests"],
            "ledger_errors": status["errors"], "restores": status["restores"],
            "regime": status["regime"], "policy": status["policy"]}  # fmt: skip


def _device_stats(bed: Any) -> dict[str, Any]:
    import ray

    out: dict[str, Any] = {}
    if bed.agent is not None:
        with contextlib.suppress(Exception):
            m = ray.get(bed.agent.metrics.remote(), timeout=30)
            out["agent"] = {k: m[k] for k in ("requests", "completed", "failed", "failovers",
                            "planner_fallbacks", "planner_errors", "device_refused",
                            "migrations", "device_running", "device_waiting",
                            "device_queued")}  # fmt: skip
    fleets = []
    for slot in bed.fleets.values():
        with contextlib.suppress(Exception):
            s = ray.get(slot.handle.stats.remote(), timeout=30)
            fleets.append({k: s[k] for k in ("requests", "completed", "failed", "failovers",
                           "planner_fallbacks", "migrations")})  # fmt: skip
    out["fleets_now"] = fleets  # since each fleet actor's last (re)start
    return out


async def _drive(bed: Any, opts: ChaosOptions) -> tuple[OpenLoop, Injector]:
    t0 = time.monotonic()
    load = OpenLoop(
        LoadOptions(rate=opts.rate, duration_s=opts.duration_s, drain_s=opts.drain_s,
                    seed=opts.seed, agent_id=bed.config.agent.device_id,
                    agent_share=opts.agent_share),
        bed.targets, clock_origin=t0,
    )  # fmt: skip
    inj = Injector(bed, opts, load.now, load.open_streams)
    await asyncio.gather(load.run(), inj.run())
    return load, inj


def run_chaos(opts: ChaosOptions) -> dict[str, Any]:
    """Bring the testbed up, run the load and the faults, write ``chaos.json`` and
    ``timeline.png`` under ``opts.out``; returns the summary. Always tears down what it
    started (its own Ray included)."""
    from disco.cluster.chaos_bed import BedOptions, ChaosBed

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    bed_opts = BedOptions(seed=opts.seed, replicas=opts.replicas, fleets=opts.fleets,
                          devices_per_fleet=opts.devices_per_fleet, agent=opts.agent,
                          budget=opts.budget, policy=opts.policy)  # fmt: skip
    t_start = time.monotonic()
    bed = ChaosBed(bed_opts, out)
    try:
        bed.start()
        bed.wait_ready()
        up_s = time.monotonic() - t_start
        load, inj = asyncio.run(_drive(bed, opts))
        budget = _budget(bed)
        devices = _device_stats(bed)
    finally:
        bed.shutdown()
    summary = summarize(load.records, inj.faults, agent_id=bed.config.agent.device_id,
                        budget=budget, prefill_of=prefill_model(bed.config))  # fmt: skip
    summary |= {
        "duration_s": opts.duration_s, "kill_every_s": opts.kill_every_s, "seed": opts.seed,
        "rate_per_s": opts.rate, "testbed_start_s": up_s,
        "wall_s": time.monotonic() - t_start, "skipped_device_dead": load.skipped,
        "devices": devices, "options": asdict(opts) | {"kinds": list(opts.kinds)},
        "bed": asdict(bed_opts),
        "fault_list": [asdict(f) for f in inj.faults],
    }  # fmt: skip
    (out / "chaos.json").write_text(json.dumps(_finite(summary), indent=1) + "\n")
    with (out / "records.jsonl").open("w") as fh:
        for r in load.records:
            fh.write(json.dumps(r.to_dict()) + "\n")
    title = (f"chaos: {opts.duration_s:.0f} s, {summary['faults_total']} faults, "
             f"{summary['requests']} requests, lost {summary['lost']}")  # fmt: skip
    plot_timeline(load.records, inj.faults, out / "timeline.png", title)
    if opts.duration_s > 150:  # a minute of it, readable
        plot_timeline(load.records, inj.faults, out / "timeline_zoom.png",
                      title + " (60 s of it)", window=(60.0, 120.0))  # fmt: skip
    return summary


def _finite(obj: Any) -> Any:
    """JSON without Infinity/NaN (a fleet that never came back: null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


HEADLINE = ("requests", "finished", "lost", "device_lost", "refused", "duplicated_tokens",
            "out_of_order_tokens", "missing_tokens", "faults_total", "faults", "recovery_s_p50",
            "recovery_s_p99", "recovery_s_max", "recovery_excess_s_p99", "budget_drift",
            "wall_s")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="disco bench chaos",
        description="Faults at random under a steady open-loop load; chaos.json + timeline.png.",
    )
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--kill-every", type=float, default=5.0,
                   help="mean seconds between faults (default 5)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--rate", type=float, default=3.0, help="requests per second (default 3)")
    p.add_argument("--kinds", default=",".join(FAULT_KINDS),
                   help=f"fault kinds, comma-separated (default all: {','.join(FAULT_KINDS)})")
    p.add_argument("--drain", type=float, default=60.0,
                   help="seconds the open streams get after the load ends (default 60)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--fleets", type=int, default=2)
    p.add_argument("--devices-per-fleet", type=int, default=4)
    p.add_argument("--no-agent", action="store_true", help="no llama.cpp agent")
    p.add_argument("--agent-share", type=float, default=0.15,
                   help="share of the requests that are the agent's user's (default 0.15)")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--policy", default="disco")
    return p


def _sigterm_as_interrupt() -> None:
    """SIGTERM runs the teardown (finally blocks) as Ctrl-C does."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, handler)


def main(argv: Sequence[str] | None = None) -> int:
    a = parser().parse_args(argv)
    kinds = tuple(k.strip() for k in a.kinds.split(",") if k.strip())
    bad = sorted(set(kinds) - set(FAULT_KINDS))
    if bad or not kinds:
        print(f"unknown fault kind(s) {bad}; known: {', '.join(FAULT_KINDS)}", file=sys.stderr)
        return 2
    if a.duration <= 0 or a.kill_every <= 0 or a.rate <= 0 or not 0 <= a.agent_share <= 1:
        print("--duration, --kill-every and --rate must be > 0, --agent-share in [0, 1]",
              file=sys.stderr)  # fmt: skip
        return 2
    opts = ChaosOptions(duration_s=a.duration, kill_every_s=a.kill_every, seed=a.seed,
                        out=a.out, rate=a.rate, kinds=kinds, drain_s=a.drain,
                        replicas=a.replicas, fleets=a.fleets,
                        devices_per_fleet=a.devices_per_fleet, agent=not a.no_agent,
                        agent_share=a.agent_share, budget=a.budget,
                        policy=a.policy)  # fmt: skip
    _sigterm_as_interrupt()
    s = run_chaos(opts)
    for k in HEADLINE:
        print(f"{k:>22}: {s.get(k)}")
    print(f"wrote {Path(a.out) / 'chaos.json'} and {Path(a.out) / 'timeline.png'}")
    return 0


__all__ = ["ChaosOptions", "Fault", "run_chaos", "summarize", "recoveries", "classify", "main"]
