"""A :class:`~disco.scheduler.planner.Planner` over the scheduler actor's handle, for device agents.

Calls made by concurrent streams in the same event-loop tick travel in one ``plan_many`` /
``report_many`` actor call (micro-batching): one Ray round trip (~1 ms) then carries as many
decisions as there are waiting callers, and several batches may be in flight at once.

The client has no timeout of its own: the device agent's ``planner_timeout_ms`` is the one timeout
on the request path (a caller that gives up leaves the batch and its neighbours alone). What the
agent falls back to is this client's ``fallback``: the scheduler's own policy, run locally from the
scheduler's last known configuration (given at start or fetched from the actor, and re-read from
the actor at most every ``refresh_s`` while plans flow), so a scheduler that is down or slow costs
one short timeout and keeps the budget guard, instead of seconds and a race at full server cost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from disco.cluster import wire
from disco.cluster.config import SchedulerConfig, from_dict
from disco.cluster.resolve import policy_from_config
from disco.device_agents.local_planner import LocalPlanner
from disco.scheduler.types import Plan, Request, RequestOutcome

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def race_plan(request: Request) -> Plan:
    """The fallback when the scheduler cannot be reached: start both, first token wins."""
    return Plan(request.id, server_start=0.0, device_start=0.0, policy="fallback-race")


class _Batcher(Generic[T, R]):
    """Collects items submitted in one loop tick and sends them with one call."""

    def __init__(self, send: Callable[[list[T]], Any], max_batch: int) -> None:
        self._send = send
        self._max = max_batch
        self._items: list[T] = []
        self._futs: list[asyncio.Future[R]] = []
        self._scheduled = False

    def submit(self, item: T) -> asyncio.Future[R]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        self._items.append(item)
        self._futs.append(fut)
        if len(self._items) >= self._max:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._scheduled = False
        if not self._items:
            return
        items, futs = self._items, self._futs
        self._items, self._futs = [], []
        asyncio.ensure_future(self._deliver(items, futs))

    async def _deliver(self, items: list[T], futs: list[asyncio.Future[R]]) -> None:
        try:
            results = await self._send(items)
        except BaseException as e:  # noqa: BLE001 - every waiter must hear about it
            for f in futs:
                if not f.done():
                    f.set_exception(e if isinstance(e, Exception) else RuntimeError(str(e)))
            if not isinstance(e, Exception):
                raise
            return
        results = results if results is not None else [None] * len(futs)
        for f, r in zip(futs, results, strict=True):
            if not f.done():
                f.set_result(r)


class SchedulerFallback:
    """The scheduler's policy run in this process, from the scheduler's last known config.

    A stable object (agents keep a reference to it) whose policy is rebuilt when ``update`` sees
    another config; before any config is known it races both endpoints. It learns from every
    outcome the agents report to it, so its budget window is current when it takes over.
    """

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        self.config: dict[str, Any] | None = None
        self.local: LocalPlanner | None = None
        if config is not None:
            self.update(config)

    def update(self, config: Mapping[str, Any]) -> None:
        """Use ``config`` (a SchedulerConfig as a dict); a bad one keeps the current policy."""
        config = dict(config)
        if config == self.config:
            return
        try:
            policy = policy_from_config(from_dict(SchedulerConfig, config, "scheduler"))
        except Exception as e:  # noqa: BLE001 - e.g. a module:factory policy not importable here
            log.warning("cannot run the scheduler's policy locally (%r): keeping the last one", e)
            return
        self.config, self.local = config, LocalPlanner(policy)

    async def plan(self, request: Request) -> Plan:
        if self.local is None:
            return race_plan(request)
        return await self.local.plan(request)

    async def report(self, outcome: RequestOutcome) -> None:
        if self.local is not None:
            await self.local.report(outcome)


@dataclass(slots=True)
class PlannerStats:
    plans: int = 0
    reports: int = 0
    config_refreshes: int = 0  # the actor's config read (changed or not)


class ActorPlanner:
    """``await planner.plan(request)`` / ``await planner.report(outcome)`` over the actor.

    ``config``: the scheduler's config as a dict (``to_dict(SchedulerConfig)``), for ``fallback``
    until the first refresh; :meth:`connect` fetches it from the actor instead.
    """

    def __init__(
        self,
        actor: Any,
        *,
        config: Mapping[str, Any] | None = None,
        max_batch: int = 512,
        refresh_s: float = 5.0,
    ) -> None:
        self.actor = actor
        self.stats = PlannerStats()
        self.fallback = SchedulerFallback(config)
        self.refresh_s = refresh_s
        self._refreshed_at = time.monotonic() if config is not None else -float("inf")
        self._refresh_task: asyncio.Task | None = None
        self._plans: _Batcher[Request, Plan] = _Batcher(self._send_plans, max_batch)
        self._reports: _Batcher[RequestOutcome, None] = _Batcher(self._send_reports, max_batch)

    @classmethod
    def connect(cls, actor: Any, *, timeout_s: float = 30.0, **kwargs: Any) -> ActorPlanner:
        """A client whose fallback starts from the config the actor answers now (blocking)."""
        import ray

        config = ray.get(actor.config.remote(), timeout=timeout_s)
        return cls(actor, config=config, **kwargs)

    async def refresh(self) -> None:
        """Re-read the actor's config into the fallback (a failure keeps the last one)."""
        self._refreshed_at = time.monotonic()
        try:
            config = await self.actor.config.remote()
        except Exception as e:  # noqa: BLE001 - the actor is down: the last config stands
            log.debug("scheduler config refresh failed: %r", e)
            return
        self.stats.config_refreshes += 1
        if isinstance(config, Mapping):
            self.fallback.update(config)

    def _maybe_refresh(self) -> None:
        due = time.monotonic() - self._refreshed_at >= self.refresh_s
        if due and (self._refresh_task is None or self._refresh_task.done()):
            self._refreshed_at = time.monotonic()  # one refresh in flight at a time
            self._refresh_task = asyncio.get_running_loop().create_task(self.refresh())

    async def _send_plans(self, requests: list[Request]) -> list[Plan]:
        plans = await self.actor.plan_wire.remote([wire.request_to(r) for r in requests])
        return [wire.plan_from(p) for p in plans]

    async def _send_reports(self, outcomes: list[RequestOutcome]) -> None:
        await self.actor.report_many.remote(outcomes)

    async def plan(self, request: Request) -> Plan:
        """The actor's plan; raises what the actor raises. A caller that stops waiting (the
        agent's timeout) cancels only its own future: the batch goes on for the others."""
        self.stats.plans += 1
        self._maybe_refresh()
        return await self._plans.submit(request)

    async def report(self, outcome: RequestOutcome) -> None:
        self.stats.reports += 1
        await self._reports.submit(outcome)
