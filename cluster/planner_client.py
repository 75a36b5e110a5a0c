"""A :class:`~disco.scheduler.planner.Planner` over the scheduler actor's handle, for device agents.

Calls made by concurrent streams in the same event-loop tick travel in one ``plan_many`` /
``report_many`` actor call (micro-batching): one Ray round trip (~1 ms) then carries as many
decisions as there are waiting callers, and several batches may be in flight at once.

If the actor does not answer within ``timeout_s`` (it is restarting, or gone), ``plan`` returns a
race on both endpoints so the user's request still flows; telemetry that cannot be delivered is
dropped with a count, never raised into the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from disco.cluster import wire
from disco.scheduler.types import Plan, Request, RequestOutcome

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


@dataclass(slots=True)
class PlannerStats:
    plans: int = 0
    fallbacks: int = 0
    reports: int = 0
    reports_dropped: int = 0


class ActorPlanner:
    """``await planner.plan(request)`` / ``await planner.report(outcome)`` over the actor."""

    def __init__(self, actor: Any, *, timeout_s: float = 2.0, max_batch: int = 512) -> None:
        self.actor = actor
        self.timeout_s = timeout_s
        self.stats = PlannerStats()
        self._plans: _Batcher[Request, Plan] = _Batcher(self._send_plans, max_batch)
        self._reports: _Batcher[RequestOutcome, None] = _Batcher(self._send_reports, max_batch)

    async def _send_plans(self, requests: list[Request]) -> list[Plan]:
        plans = await self.actor.plan_wire.remote([wire.request_to(r) for r in requests])
        return [wire.plan_from(p) for p in plans]

    async def _send_reports(self, outcomes: list[RequestOutcome]) -> None:
        await self.actor.report_many.remote(outcomes)

    async def plan(self, request: Request) -> Plan:
        self.stats.plans += 1
        try:
            return await self._await(self._plans.submit(request))
        except Exception:  # noqa: BLE001 - timeout or actor error: keep the request flowing
            self.stats.fallbacks += 1
            return race_plan(request)

    async def report(self, outcome: RequestOutcome) -> None:
        self.stats.reports += 1
        try:
            await self._await(self._reports.submit(outcome))
        except Exception:  # noqa: BLE001 - telemetry must never break a user's stream
            self.stats.reports_dropped += 1

    async def _await(self, fut: asyncio.Future[R]) -> R:
        # A timer rather than asyncio.wait_for: no extra task per call on this hot path. Each
        # caller owns its future, so expiring it leaves the batch (and its neighbours) alone.
        timer = asyncio.get_running_loop().call_later(self.timeout_s, _expire, fut)
        try:
            return await fut
        finally:
            timer.cancel()


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError("the scheduler did not answer in time"))
