"""Executes one Plan over a server and a device endpoint and merges them into one user stream.

What it does, per request (DESIGN.md section 2, paper-notes.md "Token-level migration"):
- Starts each endpoint at ``arrival + plan.<kind>_start``. A start later than 0 is a hedge: it is
  skipped if the other endpoint's first token arrived before it was due.
- The first first token wins; the loser is cancelled (``plan.cancel_loser``) or kept running with
  its tokens discarded until the request ends (its work is charged either way).
- Migration: at the winner's first token ``decide_migration`` picks a switch index k. Once k tokens
  are delivered *and* the user's unread buffer holds B = r_c * t_m tokens (the delivery buffer rule),
  the target is started with prompt + delivered text (text-level, the models may differ) while the
  source keeps generating speculatively. When the target's first token arrives the source's
  speculative tokens are dropped and the source is stopped; if the target fails first, the source's
  tokens are delivered instead. Either way every index reaches the user exactly once, in order.
- Failover is the same hand-over: if the active endpoint fails, the other endpoint resumes from the
  delivered prefix. An endpoint that failed is retried only once both have failed, at most
  ``retries`` times per request (after a back-off); then the stream ends with
  :class:`StreamFailedError` and the outcome carries the error.

- Silence is failure too: no first token within ``first_token_timeout_s`` or no next token within
  ``stall_timeout_s`` (a hung replica never raises) fails the stream over the same way.
- The device's queue (``device_queue.py``): a device engine runs ``device_slots`` streams at once
  (llama.cpp: one); more wait in FIFO order, and a stream's first-token limit counts from when it
  gets its slot. The agent plans with the queue (``device_queue()``), so waiting on a busy device
  is a planned decision, never a timeout hand-over.

Pure asyncio, no Ray. Where the parts live: the request's statuses and transitions in
``request_state.py``, the asyncio driver (stream pumps, the sole-stream fast path) in ``run.py``,
the stall limits and watchdog in ``watchdog.py``, and the work accounting in ``billing.py``
(every stream's prompt and output tokens are charged, the loser's and the speculative ones
included, by the core's one rule, ``disco.scheduler.billing``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from disco.scheduler.endpoint import Endpoint, GenerationRequest
from disco.scheduler.migration import MigrationConfig
from disco.scheduler.profiles import DeviceProfile, ServerProfile
from disco.scheduler.types import (
    DeviceQueue,
    EndpointKind,
    Plan,
    Request,
    RequestOutcome,
    TokenEvent,
)

from .device_queue import DeviceSlots
from .request_state import RequestStatus, StreamFailedError
from .run import RequestRun

__all__ = [
    "Coordinator",
    "CoordinatorConfig",
    "Execution",
    "OutputLengthEstimator",
    "RequestStatus",
    "StreamFailedError",
]

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    failover: bool = True  # hand over to the other endpoint when the active one fails
    # A stream that goes silent is a failed stream (a hung replica never raises): no first token
    # within first_token_timeout_s, or no next token within stall_timeout_s. None: wait forever.
    first_token_timeout_s: float | None = 60.0
    stall_timeout_s: float | None = 10.0
    # [R] prior for the expected response length (tokens) until outcomes have been observed.
    prior_output_tokens: float = 128.0
    length_ewma_alpha: float = 0.05
    # Streams the device engine runs at once; more wait in the agent's FIFO (device_queue.py),
    # whose wait does not count towards first_token_timeout_s. None: the engine's own
    # ``max_concurrency`` (llama.cpp: 1), or no queue if it has none. 0: never queue.
    device_slots: int | None = None
    # Once both endpoints have failed, start the one that failed first again (a failure is
    # often transient: another replica, an engine that restarted), up to ``retries`` times per
    # request, after retry_backoff_s, doubling. 0: a request fails when each endpoint failed once.
    retries: int = 0
    retry_backoff_s: float = 0.2

    def __post_init__(self) -> None:
        if self.device_slots is not None and self.device_slots < 0:
            raise ValueError(f"device_slots must be >= 0, got {self.device_slots}")
        if self.retries < 0 or self.retry_backoff_s < 0:
            raise ValueError("retries and retry_backoff_s must be >= 0")
        for name in ("first_token_timeout_s", "stall_timeout_s"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be > 0 (or None: no limit), got {v}")


class OutputLengthEstimator:
    """Online mean of finished response lengths (an EWMA), for the migration saving estimate."""

    def __init__(self, prior: float, alpha: float) -> None:
        self.mean = prior
        self.alpha = alpha

    def observe(self, tokens: int) -> None:
        self.mean += self.alpha * (tokens - self.mean)


class Coordinator:
    """Runs plans for one device: a server endpoint (usually behind the network) and a local one."""

    def __init__(
        self,
        server: Endpoint | None,
        device: Endpoint | None,
        server_profile: ServerProfile,
        device_profile: DeviceProfile,
        config: CoordinatorConfig | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.endpoints = {EndpointKind.SERVER: server, EndpointKind.DEVICE: device}
        self.server_profile = server_profile
        self.device_profile = device_profile
        self.config = config or CoordinatorConfig()
        self.clock = clock
        self.lengths = OutputLengthEstimator(
            self.config.prior_output_tokens, self.config.length_ewma_alpha
        )
        slots = self.config.device_slots
        if slots is None:
            slots = getattr(device, "max_concurrency", None) if device is not None else None
        self.device_slots: DeviceSlots | None = DeviceSlots(int(slots)) if slots else None

    def device_queue(self) -> DeviceQueue | None:
        """The device's queue as a plan sees it (None: the device has no queue of its own)."""
        if self.device_slots is None:
            return None
        return self.device_slots.state(self.lengths.mean)

    def execute(
        self,
        request: Request,
        gen: GenerationRequest,
        plan: Plan,
        on_done: Callable[[Execution], None] | None = None,
    ) -> Execution:
        """An async iterator of the user's TokenEvents; ``.outcome`` is set when it ends.

        ``request.arrival`` must be on this coordinator's clock. ``on_done`` is called once (sync)
        when the request ends for any reason, with the finished execution.
        """
        return Execution(RequestRun(self, request, gen, plan), on_done)


class Execution:
    """One request in flight. Iterate it for the user's tokens; read ``outcome`` afterwards."""

    def __init__(self, run: RequestRun, on_done: Callable[[Execution], None] | None) -> None:
        self._run = run
        self._gen = run.events()
        self._on_done = on_done
        run.finished_cb = self._finished

    @property
    def outcome(self) -> RequestOutcome | None:
        return self._run.outcome

    @property
    def failures(self) -> list[str]:
        """Endpoint errors seen, including ones the request recovered from."""
        return [f"{k.value}: {e!r}" for k, e in self._run.state.failures]

    @property
    def failovers(self) -> int:
        return self._run.state.failovers

    @property
    def status(self) -> RequestStatus:
        """Where the request stands (``request_state.py`` draws the transitions)."""
        return self._run.state.status

    @property
    def migration_abandoned(self) -> bool:
        """A migration started but its target was too slow to take over before the reader's
        buffer ran dry, so the source kept the stream."""
        return self._run.state.migration_abandoned

    @property
    def cancelled(self) -> bool:
        """The consumer stopped iterating before the end (e.g. the HTTP client went away)."""
        return self._run.state.status is RequestStatus.CANCELLED

    @property
    def request_id(self) -> str:
        return self._run.state.request.id

    @property
    def plan(self) -> Plan:
        return self._run.state.plan

    def __aiter__(self):
        return self._gen  # iterate the generator itself: no wrapper call per token

    async def __anext__(self) -> TokenEvent:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        """Stop early (the user went away): every endpoint stream is cancelled."""
        await self._gen.aclose()

    async def collect(self) -> tuple[list[TokenEvent], RequestOutcome]:
        """Drain the stream. Raises StreamFailedError if it failed (``outcome`` is still set)."""
        events = [ev async for ev in self]
        assert self.outcome is not None
        return events, self.outcome

    def _finished(self) -> None:
        if self._on_done is not None:
            self._on_done(self)
