"""Planning on the device from the scheduler's latest policy snapshot (issue 11).

One :class:`SnapshotPlanner` per holder (a fleet actor's devices share one; a device agent has
its own) satisfies :class:`~disco.scheduler.planner.Planner`: ``plan`` decides locally from the
newest :class:`~disco.scheduler.snapshot.PolicySnapshot` under the holder's budget lease
(:class:`~disco.scheduler.lease.LeaseGuard`), in microseconds and with no call to anyone;
``report`` adds the outcome to the next batch. A background task syncs every ``sync_s``: it sends
the batch and the prompt tokens planned since the last sync, and gets the newer snapshot (if any)
and the next lease. ``transport`` is that one call (the cluster side passes the scheduler actor's
``sync``, over an emulated WAN if asked); this module never imports Ray.

When the scheduler does not answer, plans go on from the last snapshot (``stale_plans`` counts
plans made while the last sync failed) and the lease lapses into self-funding (the holder's own
lifetime share may not pass b). Batches are numbered: one whose sync failed is sent again, as
it was, until answered (the scheduler drops a number it already took: a sync that timed out after
the scheduler counted it is not counted twice), while the next batch fills (at most
``max_samples`` rows of it for the policy's window, every total), so no outcome is dropped or
doubled while the scheduler is away. Before the first snapshot it races both endpoints, within
the self-funded share once the first answer gave it a regime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from disco.scheduler.lease import Lease, LeaseGuard
from disco.scheduler.outcome_batch import BatchTotals, OutcomeBatch, constrained_spend
from disco.scheduler.snapshot import PolicySnapshot, RandomShare
from disco.scheduler.types import Plan, Regime, Request, RequestOutcome

log = logging.getLogger(__name__)

Transport = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
PLAN_SAMPLES = 4096  # ring of recent plan times (overhead percentiles)
# Plans whose outcome never came (a caller that planned and then dropped the request): past this
# many in flight the oldest is forgotten, so a leak cannot grow the holder without bound.
MAX_INFLIGHT = 100_000


@dataclass(slots=True)
class SnapshotPlannerStats:
    plans: int = 0
    cold_plans: int = 0  # before any snapshot: a race
    stale_plans: int = 0  # made while the last sync had failed (scheduler away)
    syncs: int = 0
    sync_failures: int = 0
    snapshots: int = 0  # snapshots received
    reports: int = 0
    resent: int = 0  # syncs that sent again a batch whose first sync failed (never merged)


class SnapshotPlanner:
    def __init__(
        self,
        holder: str,
        transport: Transport | None = None,
        *,
        devices: int = 1,
        budget: float = 1.0,
        regime: Regime = Regime.SERVER_CONSTRAINED,
        snapshot: PolicySnapshot | None = None,
        sync_s: float = 0.5,
        timeout_s: float = 5.0,
        max_samples: int = 2000,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        autostart: bool = True,
    ) -> None:
        self.holder = holder
        self.autostart = autostart  # start the sync loop at the first plan (else: start())
        self.transport = transport
        self.devices = devices
        self.sync_s = sync_s
        self.timeout_s = timeout_s
        self.max_samples = max_samples
        self.clock, self.wall = clock, wall
        self.regime = regime if snapshot is None else snapshot.regime
        self.snapshot = snapshot
        self.guard = LeaseGuard(budget if snapshot is None else snapshot.budget)
        self.batch = OutcomeBatch(self.regime, max_samples)
        self.stats = SnapshotPlannerStats()
        # request id -> (planned server start, prompt tokens) until its outcome is reported
        self._inflight: dict[str, tuple[float | None, float]] = {}
        self._inflight_tokens = 0.0
        self._planned_tokens = 0.0
        self._seq = 0  # number of the last batch taken out
        self._plans_taken = 0  # plans counted in batches already taken out
        self._unacked: dict[str, Any] | None = None  # the message last sent, until answered
        self._sync_ok = snapshot is not None
        self._task: asyncio.Task | None = None
        self._closed = False
        self.plan_s = np.zeros(PLAN_SAMPLES)  # plan() durations, ring
        self.snapshot_age_s = np.zeros(PLAN_SAMPLES)  # age of the snapshot each plan used
        self.sync_rtt_s = np.zeros(PLAN_SAMPLES)

    # ---- Planner ----------------------------------------------------------------------------
    async def plan(self, request: Request) -> Plan:
        return self.plan_now(request)

    def plan_now(self, request: Request) -> Plan:
        """The local decision (synchronous: no await, no I/O); called from inside an event loop
        it also makes sure the background sync runs."""
        t0 = time.perf_counter()
        idle = self._task is None or self._task.done()  # not syncing (yet): see lease_now
        if self.autostart and idle:
            with contextlib.suppress(RuntimeError):  # no running loop: a caller that syncs itself
                self._ensure_syncing()
        snap, now = self.snapshot, self.clock()
        length = float(request.prompt_tokens)
        i = self.stats.plans % PLAN_SAMPLES
        self.stats.plans += 1
        if not self._sync_ok:
            self.stats.stale_plans += 1
        # A lease lapses only while the scheduler does not answer: a holder that has not tried
        # to sync (idle, its loop not started yet) keeps spending the lease it has.
        lease_now = now
        if self._sync_ok and idle:
            lease_now = min(now, self.guard.received_at)
        if snap is None:
            self.stats.cold_plans += 1
            starts = (0.0, 0.0)
            c = starts[0] if self.regime.constrained.value == "server" else starts[1]
            reserve = length if c == 0.0 else 0.0
            if not self.guard.allows(length, reserve, lease_now):
                starts = (math.nan, 0.0) if self.regime.value == "server" else (0.0, math.nan)
                reserve = 0.0
            policy, migration = "snapshot-cold", None
            self.snapshot_age_s[i] = math.nan
        else:
            starts = snap.decide(request)
            reserve = snap.reserve(length, starts)
            if reserve > 0.0 and not self.guard.allows(length, reserve, lease_now):
                starts, reserve = snap.unconstrained_only(), 0.0
            policy, migration = snap.policy, snap.migration
            self.snapshot_age_s[i] = max(0.0, self.wall() - snap.published_at)
        self.guard.commit(request.id, length, reserve)
        self._planned_tokens += length
        s, d = starts
        server = None if math.isnan(s) else s
        prev = self._inflight.get(request.id)
        if prev is not None:
            self._inflight_tokens -= prev[1]
        self._inflight[request.id] = (server, length)
        self._inflight_tokens += length
        if len(self._inflight) > MAX_INFLIGHT:
            old, (_, old_len) = next(iter(self._inflight.items()))
            del self._inflight[old]
            self._inflight_tokens -= old_len
            self.guard.settle(old, 0.0)
        plan = Plan(request.id, server, None if math.isnan(d) else d, True, migration, policy)
        self.plan_s[i] = time.perf_counter() - t0
        return plan

    async def report(self, outcome: RequestOutcome) -> None:
        self.report_now(outcome)

    def report_now(self, outcome: RequestOutcome) -> None:
        self.stats.reports += 1
        server, length = self._inflight.pop(outcome.request_id, (None, 0.0))
        self._inflight_tokens = self._inflight_tokens - length if self._inflight else 0.0
        self.batch.add(outcome, server)
        self.guard.settle(outcome.request_id, float(constrained_spend(outcome, self.regime)))

    # ---- sync -------------------------------------------------------------------------------
    def take_message(self) -> dict[str, Any]:
        """The next sync's message: the one last sent again while it is not answered (the
        scheduler drops a batch number it has taken, so a sync that failed after the scheduler
        took it is not counted twice), else a new batch with the next number. The in-flight
        figures and the snapshot held are always current."""
        if self._unacked is None:
            batch, planned = self.batch, self._planned_tokens
            self.batch = OutcomeBatch(self.regime, self.max_samples)
            self._planned_tokens = 0.0
            self._seq += 1
            self._unacked = {"holder": self.holder, "devices": self.devices, "seq": self._seq,
                             "plans": self.stats.plans - self._plans_taken,
                             "batch": batch.to_wire() if len(batch) else None,
                             "planned_tokens": planned}  # fmt: skip
            self._plans_taken = self.stats.plans
        else:
            self.stats.resent += 1
        msg = dict(self._unacked)
        msg |= {"inflight_tokens": self._inflight_tokens, "inflight_spent": self.guard.reserved,
                "have": "" if self.snapshot is None else self.snapshot.id}  # fmt: skip
        return msg

    def apply(self, answer: dict[str, Any]) -> None:
        """The scheduler's answer: the batch it acknowledges is done, a newer snapshot (kept),
        the next lease."""
        now = self.clock()
        if self._unacked is not None and answer.get("seq") in (None, self._unacked["seq"]):
            self._unacked = None
        self.stats.syncs += 1
        self._sync_ok = True
        snap = answer.get("snapshot")
        if snap is not None:
            new = PolicySnapshot.from_wire(snap)
            if isinstance(new.table, RandomShare):
                # One generator per holder, kept across snapshots: a table rebuilt every publish
                # with the policy's seed would replay the same draws on every holder.
                old = self.snapshot.table if self.snapshot is not None else None
                new.table.rng = (old.rng if isinstance(old, RandomShare)
                                 else random.Random(f"{new.table.seed}:{self.holder}"))  # fmt: skip
            self.snapshot = new
            self.stats.snapshots += 1
            if new.regime is not self.regime:  # a reconfigure switched regime
                self.regime = new.regime
                self.batch.regime = new.regime
        if answer.get("lease") is not None:
            lease = Lease.from_wire(answer["lease"])
            self.guard.budget = lease.budget
            self.guard.renew(lease, now)
        if answer.get("sync_s"):
            self.sync_s = float(answer["sync_s"])

    async def sync_once(self) -> bool:
        if self.transport is None:
            return False
        msg = self.take_message()
        t0 = time.perf_counter()
        try:
            answer = await asyncio.wait_for(self.transport(msg), self.timeout_s)
        except Exception as e:  # noqa: BLE001 - the scheduler is away: plan on, send it again
            log.debug("snapshot sync failed: %r", e)
            self.stats.sync_failures += 1
            self._sync_ok = False
            return False
        self.sync_rtt_s[self.stats.syncs % PLAN_SAMPLES] = time.perf_counter() - t0
        try:
            self.apply(answer)
        except Exception as e:  # noqa: BLE001 - e.g. a table kind this version does not know
            log.warning("cannot use the scheduler's answer (%r): planning on from the last", e)
            self._unacked = None  # the scheduler took the batch
            self.stats.sync_failures += 1
            return False
        return True

    async def run(self) -> None:
        """Sync every ``sync_s`` until :meth:`close` (the background task)."""
        while not self._closed:
            await self.sync_once()
            await asyncio.sleep(self.sync_s)

    def _ensure_syncing(self) -> None:
        if self.transport is None or self._closed:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self.run())

    def start(self) -> None:
        """Start syncing now (from inside the event loop) rather than at the first plan."""
        self._ensure_syncing()

    async def close(self, flush: bool = True) -> None:
        """Stop syncing; ``flush``: send what is left (one bounded try). No new loop starts
        once closed, the flush included."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        pending = self._unacked is not None or len(self.batch) or self._planned_tokens
        if flush and self.transport is not None and pending:
            with contextlib.suppress(Exception):
                await self.sync_once()
            if self._unacked is not None or len(self.batch):  # a resend, then the rest
                with contextlib.suppress(Exception):
                    await self.sync_once()

    # ---- what a holder shows ------------------------------------------------------------------
    def overhead_ms(self) -> dict[str, float | None]:
        n = min(self.stats.plans, PLAN_SAMPLES)
        if n == 0:
            return {"plan_overhead_ms_p50": None, "plan_overhead_ms_p99": None}
        p = self.plan_s[:n] * 1e3
        return {"plan_overhead_ms_p50": float(np.percentile(p, 50)),
                "plan_overhead_ms_p99": float(np.percentile(p, 99))}  # fmt: skip

    def status(self) -> dict[str, Any]:
        now = self.clock()
        n = min(self.stats.plans, PLAN_SAMPLES)
        ages = self.snapshot_age_s[:n]
        ages = ages[~np.isnan(ages)] * 1e3
        s = self.stats
        return {
            "holder": self.holder, "mode": "snapshot",
            "version": None if self.snapshot is None else self.snapshot.version,
            "plans": s.plans, "cold_plans": s.cold_plans, "stale_plans": s.stale_plans,
            "syncs": s.syncs, "sync_failures": s.sync_failures, "snapshots": s.snapshots,
            "reports": s.reports, "resent": s.resent,
            "snapshot_age_ms_p99": float(np.percentile(ages, 99)) if ages.size else None,
            "scheduler_reachable": self._sync_ok,
        } | self.overhead_ms() | {f"lease_{k}": v for k, v in self.guard.stats(now).items()}  # fmt: skip


def pending_totals(planner: SnapshotPlanner) -> BatchTotals:
    """What the planner holds that the scheduler has not heard yet (a holder that dies loses it)."""
    return planner.batch.totals


PROMETHEUS = (  # status key, metric, type, help
    ("version", "snapshot_version", "gauge", "Version of the policy snapshot plans use."),
    ("plans", "plans_total", "counter", "Plans made on the device from snapshots."),
    ("stale_plans", "stale_plans_total", "counter",
     "Plans made while the scheduler did not answer (the last snapshot)."),
    ("cold_plans", "cold_plans_total", "counter", "Plans made before any snapshot (a race)."),
    ("sync_failures", "sync_failures_total", "counter", "Syncs with the scheduler that failed."),
    ("scheduler_reachable", "scheduler_reachable", "gauge", "1 while the last sync succeeded."),
    ("lease_denied", "lease_denied_total", "counter",
     "Plans refused the constrained endpoint by the budget lease."),
    ("lease_self_funded", "lease_self_funded_total", "counter",
     "Decisions made without a live lease (own share capped at b)."),
    ("lease_balance", "lease_balance_tokens", "gauge", "Constrained prompt tokens left."),
)  # fmt: skip


def render_status(status: dict[str, Any], prefix: str = "disco_planner", labels: str = "") -> str:
    """A SnapshotPlanner's ``status()`` as Prometheus text (the agent's /metrics)."""
    out = []
    lab = ",".join(x for x in (labels, f'holder="{status.get("holder", "")}"') if x)
    for key, name, kind, help_ in PROMETHEUS:
        v = status.get(key)
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            continue
        full = f"{prefix}_{name}"
        out.append(f"# HELP {full} {help_}\n# TYPE {full} {kind}\n{full}{{{lab}}} {float(v)}\n")
    return "".join(out)
