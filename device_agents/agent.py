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
from disco.scheduler.types import EndpointKind, Plan, Request, RequestOutcome
from disco.scheduler.wire import ApiError

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
        self._metrics = AgentMetrics(regime=_regime_of(planner))
        self._ids = itertools.count()
        self._reports: set[asyncio.Task] = set()  # in-flight planner reports (kept referenced)

    @property
    def metrics(self) -> AgentMetrics:
        """The agent's counters, with the device queue's gauges read now."""
        m, slots = self._metrics, self.coordinator.device_slots
        if slots is not None:
            m.device_running, m.device_waiting, m.device_queued = (
                slots.running,
                slots.waiting,
                slots.queued,
            )
            m.device_saturated = int(self.saturated())
        return m

    def saturated(self) -> bool:
        """The device's queue is at its limit: requests that need the device alone are refused."""
        slots, limit = self.coordinator.device_slots, self.config.max_device_queue
        if slots is None or limit is None:
            return False
        return slots.running + slots.waiting >= slots.slots + limit  # a new one would wait past it

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
        queue = self.coordinator.device_queue()
        request = Request(
            rid,
            self.coordinator.clock(),
            max(1, self.count_tokens(gen.prompt)),
            output_tokens,
            self.config.device_id,
            device_queue=queue,
        )
        self._metrics.requests += 1
        plan = await self._plan(request)
        if self._refuse(plan):
            self._metrics.device_refused += 1
            self._spawn(self._report(_refused(request, plan)))
            log.info(
                "%s refused: device saturated (%d waiting)", rid, queue.waiting if queue else 0
            )
            raise DeviceSaturatedError(
                f"the device is saturated: {queue.waiting if queue else 0} requests wait for it "
                f"(limit {self.config.max_device_queue}) and the plan ({plan.policy}) does not "
                "start the server for this one (budget); retry later"
            )
        return self.coordinator.execute(request, gen, plan, on_done=self._done)

    def _refuse(self, plan: Plan) -> bool:
        """Past the queue limit, a plan that needs the device alone is refused (issue 10): the
        budget keeps it off the server and the device cannot start it for a long while."""
        return plan.server_start is None and self.saturated()

    async def _plan(self, request: Request) -> Plan:
        local = getattr(self.planner, "plan_now", None)
        if local is not None:  # plans on the device from a snapshot: no call, no timeout
            return local(request)
        try:
            return await asyncio.wait_for(self.planner.plan(request), self._timeout_s)
        except Exception as e:  # the scheduler is down or slow: plan here, at once
            self._metrics.planner_fallbacks += 1
            log.warning("planner failed for %s (%r); planned by the fallback", request.id, e)
            return await self.fallback.plan(request)

    def _done(self, ex: Execution) -> None:
        o = ex.outcome
        assert o is not None
        self._metrics.observe(o, ex.failovers, ex.cancelled)
        if self.results is not None:
            self.results.write(
                o, device_id=self.config.device_id, policy=ex.plan.policy, failovers=ex.failovers
            )
        if log.isEnabledFor(logging.INFO):
            log.info("%s", request_line(ex))
        self._spawn(self._report(o))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _report(self, outcome: Any) -> None:
        local = getattr(self.planner, "report_now", None)
        if local is not None:  # into the holder's next batch
            local(outcome)
            return
        if self.fallback is not self.planner:
            await self.fallback.report(outcome)  # local: keeps the stand-in's window current
        try:
            # Off the request path (the stream is over): a slow scheduler may take longer.
            await asyncio.wait_for(self.planner.report(outcome), REPORT_TIMEOUT_S)
        except Exception as e:
            self._metrics.planner_errors += 1
            log.warning("planner report failed for %s: %r", outcome.request_id, e)

    async def drain(self) -> None:
        """Wait for outstanding planner reports (call before shutting down)."""
        if self._reports:
            await asyncio.gather(*list(self._reports), return_exceptions=True)


class DeviceSaturatedError(ApiError):
    """A request refused because the device's queue is full and the budget keeps the server out
    (HTTP 429, OpenAI's rate-limit error class, code ``device_saturated``)."""

    def __init__(self, message: str) -> None:
        super().__init__(429, message, code="device_saturated")


def _refused(request: Request, plan: Plan) -> RequestOutcome:
    return RequestOutcome(
        request.id, request.arrival, request.prompt_tokens, error="device saturated",
        server_started=False, device_started=False, refused=True,
    )  # fmt: skip


def request_line(ex: Execution) -> str:
    """One log line per finished request: id, plan, winner, hand-overs, TTFT, tokens, status."""
    o = ex.outcome
    assert o is not None
    p = ex.plan

    def start(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}ms"

    ttft = "-" if o.ttft is None else f"{o.ttft * 1000:.0f}ms"
    winner = o.first_token_from.value if o.first_token_from is not None else "-"
    mig = "-" if o.migrated_at is None else f"@{o.migrated_at}"
    return (
        f"{o.request_id} plan={p.policy}(server {start(p.server_start)}, device "
        f"{start(p.device_start)}) winner={winner} migration={mig} failovers={ex.failovers} "
        f"ttft={ttft} tokens={len(o.token_times)} status={ex.status.value}"
        + (f" error={o.error!r}" if o.error else "")
    )


def _regime_of(planner: Any) -> str | None:
    """The budget's regime of a local policy's planner, or of the scheduler's last known config
    (an ActorPlanner's fallback); None when neither says."""
    policy = getattr(planner, "policy", None)
    regime = getattr(getattr(policy, "config", None), "regime", None)
    if regime is None:
        regime = getattr(planner, "regime", None)  # a SnapshotPlanner
    if regime is None:
        config = getattr(getattr(planner, "fallback", None), "config", None)
        regime = config.get("regime") if isinstance(config, dict) else None
    return getattr(regime, "value", regime)


def _with_id(gen: GenerationRequest, rid: str) -> GenerationRequest:
    return gen if gen.request_id == rid else replace(gen, request_id=rid)


def _engine_counter(coord: Coordinator) -> Callable[[str], int] | None:
    """The device engine's own tokenizer if it has one, else the server's, else None."""
    for kind in (EndpointKind.DEVICE, EndpointKind.SERVER):
        fn = getattr(coord.endpoints.get(kind), "count_tokens", None)
        if callable(fn):
            return fn
    return None
