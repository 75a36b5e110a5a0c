"""One device's agent: asks the planner for a plan, runs it on the coordinator, reports back.

Shared by the HTTP front (``agent_http``), the emulated fleet (``fleet``) and the cluster side.
The planner may be remote (the scheduler actor) and may fail or hang: after
``AgentConfig.planner_timeout_ms`` (the only planner timeout on the request path) the request is
planned by a local fallback planner instead and counted (``planner_fallbacks``), so a scheduler
restart neither stops requests nor adds seconds to their TTFT. The fallback is the one given, else
the planner's own ``fallback`` attribute (the scheduler client keeps a local copy of the
scheduler's policy there, budget guard included), else a race of both endpoints. Every outcome is
reported to the fallback too, so its estimates and budget window are current when it takes over.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from disco.scheduler.endpoint import GenerationRequest
from disco.scheduler.planner import Planner
from disco.scheduler.tokens import estimate_tokens
from disco.scheduler.types import EndpointKind, Plan, Request

from .config import AgentConfig
from .coordinator import Coordinator, Execution
from .local_planner import StaticPlanner
from .results import ResultsLog
from .telemetry import AgentMetrics

log = logging.getLogger(__name__)
REPORT_TIMEOUT_S = 10.0  # a report that long overdue is dropped (counted in planner_errors)


# No planner's fallback known: race both endpoints (the safest latency choice; no budget guard).
RACE_FALLBACK = StaticPlanner(0.0, 0.0, True, None, "fallback-race")


class DeviceAgent:
    def __init__(
        self,
        coordinator: Coordinator,
        planner: Planner,
        config: AgentConfig | None = None,
        *,
        results: ResultsLog | None = None,
        count_tokens: Callable[[str], int] | None = None,
        fallback: Planner | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.planner = planner
        self.config = config or AgentConfig()
        if fallback is None:
            fallback = getattr(planner, "fallback", None) or RACE_FALLBACK
        self.fallback: Planner = fallback
        self._timeout_s = self.config.planner_timeout_ms / 1000.0
        self.results = results
        self.count_tokens = count_tokens or _engine_counter(coordinator) or estimate_tokens
        self.metrics = AgentMetrics()
        self._ids = itertools.count()
        self._reports: set[asyncio.Task] = set()  # in-flight planner reports (kept referenced)

    async def start(
        self,
        gen: GenerationRequest,
        request_id: str | None = None,
        output_tokens: int | None = None,
    ) -> Execution:
        """Validate, plan and start one request. Raises InvalidRequestError on bad input."""
        gen.validate()
        rid = request_id or f"{self.config.device_id}-{next(self._ids)}"
        gen = _with_id(gen, rid)
        request = Request(
            rid,
            self.coordinator.clock(),
            max(1, self.count_tokens(gen.prompt)),
            output_tokens,
            self.config.device_id,
        )
        self.metrics.requests += 1
        plan = await self._plan(request)
        return self.coordinator.execute(request, gen, plan, on_done=self._done)

    async def _plan(self, request: Request) -> Plan:
        try:
            return await asyncio.wait_for(self.planner.plan(request), self._timeout_s)
        except Exception as e:  # the scheduler is down or slow: plan here, at once
            self.metrics.planner_fallbacks += 1
            log.warning("planner failed for %s (%r); planned by the fallback", request.id, e)
            return await self.fallback.plan(request)

    def _done(self, ex: Execution) -> None:
        o = ex.outcome
        assert o is not None
        self.metrics.observe(o, ex.failovers, ex.cancelled)
        if self.results is not None:
            self.results.write(
                o, device_id=self.config.device_id, policy=ex.plan.policy, failovers=ex.failovers
            )
        task = asyncio.get_running_loop().create_task(self._report(o))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _report(self, outcome: Any) -> None:
        if self.fallback is not self.planner:
            await self.fallback.report(outcome)  # local: keeps the stand-in's window current
        try:
            # Off the request path (the stream is over): a slow scheduler may take longer.
            await asyncio.wait_for(self.planner.report(outcome), REPORT_TIMEOUT_S)
        except Exception as e:
            self.metrics.planner_errors += 1
            log.warning("planner report failed for %s: %r", outcome.request_id, e)

    async def drain(self) -> None:
        """Wait for outstanding planner reports (call before shutting down)."""
        if self._reports:
            await asyncio.gather(*list(self._reports), return_exceptions=True)


def _with_id(gen: GenerationRequest, rid: str) -> GenerationRequest:
    return gen if gen.request_id == rid else replace(gen, request_id=rid)


def _engine_counter(coord: Coordinator) -> Callable[[str], int] | None:
    """The device engine's own tokenizer if it has one, else the server's, else None."""
    for kind in (EndpointKind.DEVICE, EndpointKind.SERVER):
        fn = getattr(coord.endpoints.get(kind), "count_tokens", None)
        if callable(fn):
            return fn
    return None
