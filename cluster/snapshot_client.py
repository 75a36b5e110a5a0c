"""Snapshot planning over the scheduler actor (issue 11): the holder's transport and its setup.

:func:`snapshot_planner` builds a :class:`~disco.device_agents.snapshot_planner.SnapshotPlanner`
whose one call is the scheduler actor's ``sync``, behind an emulated scheduler round trip
(``scheduler_rtt_ms``: a phone's WAN to wherever the scheduler runs), starting from the snapshot
the actor answers now. :class:`RttPlanner` puts the same round trip in front of a per-request
planner (``planning: central``), for the comparison that shows why snapshots matter.
"""

from __future__ import annotations

import asyncio
from typing import Any

from disco.device_agents.snapshot_planner import SnapshotPlanner
from disco.scheduler.types import Plan, Regime, Request, RequestOutcome


def actor_transport(actor: Any, rtt_s: float = 0.0):
    async def call(msg: dict[str, Any]) -> dict[str, Any]:
        if rtt_s > 0:
            await asyncio.sleep(rtt_s / 2)
        answer = await actor.sync.remote(msg)
        if rtt_s > 0:
            await asyncio.sleep(rtt_s / 2)
        return answer

    return call


def snapshot_planner(
    actor: Any,
    holder: str,
    scheduler_cfg: dict[str, Any],
    *,
    devices: int = 1,
    rtt_s: float = 0.0,
    timeout_s: float = 30.0,
    fetch: bool = True,
) -> SnapshotPlanner:
    """A holder's planner; ``fetch``: block until its first sync is answered (the current
    snapshot and a first lease), so the first plans are neither cold nor unfunded."""
    planner = SnapshotPlanner(
        holder, actor_transport(actor, rtt_s), devices=devices,
        budget=float(scheduler_cfg.get("budget", 1.0)),
        regime=Regime(scheduler_cfg.get("regime", "server")),
        sync_s=float(scheduler_cfg.get("sync_s", 0.5)),
    )  # fmt: skip
    if fetch:
        import ray

        planner.apply(ray.get(actor.sync.remote(planner.take_message()), timeout=timeout_s))
    return planner


class RttPlanner:
    """A per-request planner behind an emulated round trip of ``rtt_s`` (plan and report)."""

    def __init__(self, inner: Any, rtt_s: float) -> None:
        self.inner, self.rtt_s = inner, rtt_s
        self.fallback = getattr(inner, "fallback", None)

    async def plan(self, request: Request) -> Plan:
        await asyncio.sleep(self.rtt_s / 2)
        plan = await self.inner.plan(request)
        await asyncio.sleep(self.rtt_s / 2)
        return plan

    async def report(self, outcome: RequestOutcome) -> None:
        await asyncio.sleep(self.rtt_s / 2)
        await self.inner.report(outcome)
