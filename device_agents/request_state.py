"""One request's state machine: its status, its streams, what the user has seen.

The behaviour is described in ``coordinator.py``; this module is its decisions, without asyncio:
streams are started and stopped through a :class:`Launcher` (the driver in ``run.py``, or a test's
fake), time comes from a clock, and every event is one synchronous method, so a test drives the
request transition by transition.

Statuses (:class:`RequestStatus`) and the methods that move between them::

    WAITING_FIRST_TOKEN --on_token (first)------------------------------> STREAMING
    STREAMING    --on_token, buffer rule met (launch_migration)---------> MIGRATING
    MIGRATING    --on_token of the target (take_over)-------------------> STREAMING  (migrated)
    MIGRATING    --check_deadlines past the switch deadline
                   (abandon_migration), or the target fails-------------> STREAMING  (kept source)
    STREAMING    --on_failure of the active stream (fail_over)----------> FAILING_OVER
    MIGRATING    --on_failure of the source: the target, already
                   prefilling from the delivered boundary, takes over---> FAILING_OVER
    FAILING_OVER --on_token of the new stream (take_over)---------------> STREAMING
    any live     --last token / on_end of the active stream-------------> FINISHED
                   (during a migration the source's held tokens go out first)
    any live     --no endpoint left (fail)------------------------------> FAILED
                   (unless ``retries`` are left: the endpoint that failed first starts again
                   after a back-off, from the delivered boundary; FAILING_OVER after tokens)
    any but FAILED --the consumer stopped early (cancel)----------------> CANCELLED

Before the first token a failed stream is replaced without leaving WAITING_FIRST_TOKEN: the hedge
starts at once, or the other endpoint fails over from the start.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from disco.scheduler.endpoint import EndpointFailedError, GenerationRequest
from disco.scheduler.migration import decide_migration, migration_latency
from disco.scheduler.types import EndpointKind, Plan, Request, RequestOutcome, TokenEvent

from .billing import bill
from .watchdog import StallLimits

if TYPE_CHECKING:
    from .coordinator import Coordinator


class RequestStatus(enum.Enum):
    WAITING_FIRST_TOKEN = "waiting_first_token"  # streams started or due, nothing delivered yet
    STREAMING = "streaming"  # one stream (``active``) delivers to the user
    MIGRATING = "migrating"  # a target prefills the delivered text; the source's tokens are held
    FAILING_OVER = "failing_over"  # the active stream failed; a stream resumes after the delivered
    FINISHED = "finished"  # the last token was delivered
    FAILED = "failed"  # no endpoint could finish the request
    CANCELLED = "cancelled"  # the consumer stopped before the end

    @property
    def ended(self) -> bool:
        return self in _ENDED


_ENDED = frozenset({RequestStatus.FINISHED, RequestStatus.FAILED, RequestStatus.CANCELLED})


class StreamFailedError(EndpointFailedError):
    """No endpoint could finish the request; ``causes`` holds each endpoint's error."""

    def __init__(self, message: str, causes: list[BaseException] | None = None) -> None:
        super().__init__(message)
        self.causes = list(causes or [])


@dataclass(eq=False)
class Leg:
    """One endpoint stream within a request."""

    kind: EndpointKind
    start_index: int  # delivered tokens it continues after
    context_tokens: int  # prompt + prefix tokens this stream prefills
    started_at: float
    produced: int = 0
    last_at: float | None = None  # time of the latest token (stall detection)
    queued: bool = False  # waiting for a device slot (device_queue.py): not started yet
    spec: list[TokenEvent] = field(default_factory=list)  # source tokens held during a migration
    live: bool = True
    # Owned by the driver: the pump task, or the stream iterator when driven directly.
    task: Any = None
    it: Any = None


@dataclass(frozen=True, slots=True)
class PlannedSwitch:
    """The migration decided at the first token: switch to ``target`` after ``at_index`` tokens
    (once the delivery buffer rule allows)."""

    at_index: int
    target: EndpointKind


class Launcher(Protocol):
    """Runs the streams the state machine starts and stops."""

    def launch(self, leg: Leg, request: GenerationRequest) -> None:
        """Start ``request`` for ``leg`` (its events come back as on_token/on_end/on_failure)."""
        ...

    def stop(self, leg: Leg) -> None:
        """Stop the stream of a leg that was just marked not live."""
        ...


class RequestState:
    """The state machine of one request (see the module docstring)."""

    def __init__(
        self,
        coord: Coordinator,
        request: Request,
        gen: GenerationRequest,
        plan: Plan,
        launcher: Launcher,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.c = coord
        self.request = request
        self.gen = gen
        self.plan = plan
        self.launcher = launcher
        self.clock = clock or coord.clock
        cfg = coord.config
        self.limits = StallLimits(cfg.first_token_timeout_s, cfg.stall_timeout_s)
        self.status = RequestStatus.WAITING_FIRST_TOKEN
        self.legs: list[Leg] = []
        self.pending: dict[EndpointKind, float] = {}  # not yet started: kind -> absolute time
        for kind in (EndpointKind.SERVER, EndpointKind.DEVICE):
            start = plan.start_of(kind)
            if start is not None:
                self.pending[kind] = request.arrival + start
        self.winner: EndpointKind | None = None
        self.active: Leg | None = None  # the stream whose tokens the user gets
        self.target: Leg | None = None  # MIGRATING / FAILING_OVER: the stream taking over
        self.planned: PlannedSwitch | None = None
        self.switch_deadline: float | None = None  # MIGRATING: abandon if not switched by then
        self.migrated_at: int | None = None
        self.migration_abandoned = False
        # What the user has seen, and what is delivered but not yet handed out.
        self.texts: list[str] = []
        self.times: list[float] = []
        self.sources: list[EndpointKind] = []
        self.out: list[TokenEvent] = []
        self.dead: set[EndpointKind] = set()  # failed: not started again (but by _retry)
        self.failures: list[tuple[EndpointKind, BaseException]] = []
        self.failovers = 0
        self.retries = 0  # endpoints started again after both had failed
        self.finish_reason: str | None = None
        self.fatal: StreamFailedError | None = None

    @property
    def done(self) -> bool:
        return self.status.ended

    # --- starting streams -----------------------------------------------------------------------
    def start_due(self) -> None:
        """Start the planned streams (and retries) whose time has come."""
        now = self.clock()
        for kind, at in list(self.pending.items()):
            if at <= now:
                del self.pending[kind]
                leg = self.start(kind, len(self.texts))  # a hedge: 0 (pending ends at a token)
                if self.winner is not None:  # a retry after tokens: it takes over (FAILING_OVER)
                    self.target = leg

    def start(self, kind: EndpointKind, index: int) -> Leg:
        """Start a stream on ``kind`` that continues after the first ``index`` delivered tokens."""
        for leg in self.legs:  # a kept loser of this kind is a different generation: stop it
            if leg.kind is kind and leg.live:
                self._stop(leg)
        present = self.c.endpoints[kind] is not None
        leg = Leg(kind, index, self.request.prompt_tokens + index if present else 0, self.clock())
        self.legs.append(leg)
        self.launcher.launch(
            leg,
            replace(
                self.gen,
                prefix=self.gen.prefix + "".join(self.texts[:index]),
                start_index=self.gen.start_index + index,
                max_tokens=self.gen.max_tokens - index,
                prompt_tokens_hint=self.request.prompt_tokens,
                request_id=self.request.id,
            ),
        )
        return leg

    def sole_stream(self, leg: Leg) -> bool:
        """Whether ``leg`` will be the only stream (no race, no hedge to come, no migration from
        it): the driver may then iterate it on the request's own task."""
        if self.pending or any(other.live for other in self.legs if other is not leg):
            return False
        rule = self.plan.migration
        return not (rule is not None and rule.from_kind is leg.kind and self.failovers == 0)

    def any_live(self) -> bool:
        return any(leg.live for leg in self.legs)

    # --- events ---------------------------------------------------------------------------------
    def on_token(self, leg: Leg, ev: TokenEvent) -> None:
        expected = self.gen.start_index + leg.start_index + leg.produced
        if ev.index != expected:
            self.on_failure(
                leg, EndpointFailedError(f"token index {ev.index}, expected {expected}")
            )
            return
        leg.produced += 1
        leg.last_at = self.clock()
        if self.winner is None:
            self._first_token(leg)
        if leg is self.target:
            self.take_over(leg)
        if leg is self.active:
            if self.target is not None:  # MIGRATING: the target continues after the delivered
                leg.spec.append(ev)
                if ev.finish_reason is not None:
                    self._keep_source()  # the source finished first: nothing left to move
            else:
                self._deliver(ev, leg)
                self.maybe_migrate()
        # Tokens of a kept loser are discarded: only its work counts.

    def on_end(self, leg: Leg) -> None:
        """``leg``'s stream ended normally."""
        leg.live = False
        if leg is self.active:
            if self.target is not None:  # source ended during a migration: deliver what it held
                self._keep_source()
            self._finish(self.finish_reason or "stop")
        elif leg is self.target or self.winner is None:
            self._lost(leg, EndpointFailedError("stream ended without a token"))

    def on_failure(self, leg: Leg, err: BaseException) -> None:
        """``leg``'s stream raised, stalled or broke the index order."""
        self._stop(leg)
        self._lost(leg, err)

    def check_deadlines(self) -> None:
        """Act on a passed switch deadline and on silent streams."""
        now = self.clock()
        if self.switch_deadline is not None and now >= self.switch_deadline:
            self.abandon_migration()
        for leg in list(self.legs):
            due = self.limits.deadline(leg)
            if due is not None and now >= due:
                self.on_failure(leg, self.limits.stalled(leg))

    def next_deadline(self) -> float | None:
        """The earliest time something happens without any stream speaking."""
        times = list(self.pending.values())
        if self.switch_deadline is not None:
            times.append(self.switch_deadline)
        for leg in self.legs:
            due = self.limits.deadline(leg)
            if due is not None:
                times.append(due)
        return min(times, default=None)

    def cancel(self) -> None:
        """The consumer stopped iterating: CANCELLED, unless the request had already failed."""
        if self.status is not RequestStatus.FAILED:
            self.status = RequestStatus.CANCELLED

    def stop_all(self) -> None:
        for leg in self.legs:
            self._stop(leg)

    # --- transitions ----------------------------------------------------------------------------
    def _first_token(self, leg: Leg) -> None:
        """WAITING_FIRST_TOKEN -> STREAMING: ``leg`` won the race."""
        self.status = RequestStatus.STREAMING
        self.winner = leg.kind
        self.active = leg
        self.pending.clear()  # hedges that have not started never will
        for other in self.legs:
            if other is not leg and other.live and self.plan.cancel_loser:
                self._stop(other)
        self.planned = self._plan_switch(leg.kind)

    def maybe_migrate(self) -> None:
        """STREAMING -> MIGRATING once the planned switch index is delivered and the user's
        unread buffer hides the target's start (the delivery buffer rule)."""
        switch = self.planned
        if switch is None or self.done:
            return
        n = len(self.texts)
        if n < switch.at_index:
            return
        cfg = self.c.config.migration
        t_m = migration_latency(
            switch.target,
            self.request.prompt_tokens + n,
            self.c.server_profile,
            self.c.device_profile,
            cfg,
        )
        now = self.clock()
        read = 1 + math.floor(cfg.read_tps * (now - self.times[0]))
        unread = n - min(n, read)
        if unread < cfg.read_tps * t_m:
            return
        self.planned = None
        if switch.target not in self.dead:
            # The reader drains the buffer in unread / r_c seconds: a target slower than that
            # would stall the user while the source holds tokens, so the switch is abandoned then.
            self.launch_migration(switch.target, now + unread / cfg.read_tps)

    def launch_migration(self, target: EndpointKind, deadline: float) -> Leg:
        """STREAMING -> MIGRATING: ``target`` re-prefills prompt + delivered text; the source keeps
        generating, its tokens held until the target's first token or ``deadline``."""
        self.target = self.start(target, len(self.texts))
        self.switch_deadline = deadline
        self.status = RequestStatus.MIGRATING
        return self.target

    def take_over(self, leg: Leg) -> None:
        """MIGRATING / FAILING_OVER -> STREAMING: the target produced its first token and takes
        over at the delivered boundary; the source's held tokens are dropped."""
        source = self.active
        if source is not None and source is not leg:
            source.spec.clear()
            self._stop(source)
        if self.status is RequestStatus.MIGRATING:
            self.migrated_at = self.gen.start_index + leg.start_index
        self.switch_deadline = None
        self.active = leg
        self.target = None
        self.status = RequestStatus.STREAMING

    def abandon_migration(self) -> None:
        """MIGRATING -> STREAMING at the switch deadline: the target was too slow to start before
        the reader's buffer ran dry, so the source keeps the stream."""
        self.switch_deadline = None
        if self.status is RequestStatus.MIGRATING:
            self.migration_abandoned = True
            self._keep_source()

    def fail_over(self, leg: Leg) -> None:
        """STREAMING / MIGRATING -> FAILING_OVER: the active ``leg`` failed after tokens were
        delivered; the other endpoint resumes after them (no migration follows a failover)."""
        self.active = None
        self.planned = None
        self.switch_deadline = None
        if self.target is not None:
            # The migration target, already prefilling from the delivered boundary, becomes the
            # failover target: no switch deadline can abandon it now (it is the only endpoint
            # left), and it takes over as a failover, not as a migration.
            leg.spec.clear()  # held tokens of a dead source are never delivered
            self.failovers += 1
            self.status = RequestStatus.FAILING_OVER
            return
        other = leg.kind.other
        if other in self.dead or not self.c.config.failover:
            if not self._retry(leg):
                self.fail("both endpoints failed" if other in self.dead else "endpoint failed")
            return
        self.failovers += 1
        self.status = RequestStatus.FAILING_OVER
        self.target = self.start(other, len(self.texts))

    def fail(self, why: str) -> None:
        """-> FAILED: the stream ends with :class:`StreamFailedError` naming every cause."""
        causes = [e for _, e in self.failures]
        detail = "; ".join(f"{k.value}: {e}" for k, e in self.failures)
        self.fatal = StreamFailedError(why + (f" ({detail})" if detail else ""), causes)
        self.status = RequestStatus.FAILED

    # --- helpers --------------------------------------------------------------------------------
    def _lost(self, leg: Leg, err: BaseException) -> None:
        """``leg`` (already stopped) failed: replace it, keep the other stream, or give up."""
        self.failures.append((leg.kind, err))
        self.dead.add(leg.kind)
        if self.winner is None:  # still racing for the first token
            if self.any_live():
                return
            other = leg.kind.other
            if other in self.pending:
                del self.pending[other]
                self.start(other, 0)
            elif other not in self.dead and self.c.config.failover:
                self.failovers += 1
                self.start(other, 0)
            elif not self._retry(leg):
                self.fail("every endpoint failed before the first token")
            return
        if leg is self.target:
            if self.active is not None and self.active.live:
                self._keep_source()  # the migration failed: keep the source
            elif not self._retry(leg):
                self.fail("both endpoints failed")
        elif leg is self.active:
            self.fail_over(leg)

    def _retry(self, leg: Leg) -> bool:
        """Both endpoints failed (``leg`` last): start the one that failed first again after a
        back-off (``pending``; the other one when there is no such endpoint), if the request has
        ``retries`` left. False: none left, nothing changed."""
        cfg = self.c.config
        if not cfg.failover or self.retries >= cfg.retries:
            return False
        kind = leg.kind.other if self.c.endpoints[leg.kind.other] is not None else leg.kind
        if self.c.endpoints[kind] is None:
            return False
        self.retries += 1
        self.failovers += 1
        self.dead.discard(kind)
        self.target = None
        self.pending[kind] = self.clock() + cfg.retry_backoff_s * 2 ** (self.retries - 1)
        if self.winner is not None:
            self.status = RequestStatus.FAILING_OVER
        return True

    def _plan_switch(self, winner: EndpointKind) -> PlannedSwitch | None:
        rule = self.plan.migration
        if rule is None or rule.target in self.dead or self.c.endpoints[rule.target] is None:
            return None
        expected = self.request.output_tokens or self.c.lengths.mean
        expected = min(float(expected), float(self.gen.max_tokens))
        d = decide_migration(
            rule,
            winner,
            self.request.prompt_tokens,
            1,
            max(0.0, expected - 1),
            self.c.server_profile,
            self.c.device_profile,
            self.c.config.migration,
        )
        if d.migrate and d.at_index is not None and d.at_index < self.gen.max_tokens:
            return PlannedSwitch(d.at_index, d.target)
        return None

    def _keep_source(self) -> None:
        """End a migration with the source in place: stop the target, deliver the held tokens."""
        self.switch_deadline = None
        if self.target is not None:
            self._stop(self.target)
            self.target = None
        if not self.done:
            self.status = RequestStatus.STREAMING
        src = self.active
        if src is None:
            return
        held, src.spec = src.spec, []
        for ev in held:
            if self.done:
                break
            self._deliver(ev, src)

    def _deliver(self, ev: TokenEvent, leg: Leg) -> None:
        now = self.clock()
        index = self.gen.start_index + len(self.texts)
        last = ev.finish_reason is not None or len(self.texts) + 1 >= self.gen.max_tokens
        reason = ev.finish_reason or ("length" if last else None)
        self.texts.append(ev.text)
        self.times.append(now)
        self.sources.append(leg.kind)
        self.out.append(TokenEvent(index, ev.text, now, ev.token_id, leg.kind, reason))
        if last:
            self._finish(reason)

    def _finish(self, reason: str | None) -> None:
        self.finish_reason = reason
        self.status = RequestStatus.FINISHED

    def _stop(self, leg: Leg) -> None:
        if leg.live:
            leg.live = False
            self.launcher.stop(leg)

    # --- the result -----------------------------------------------------------------------------
    def outcome(self) -> RequestOutcome:
        """What the user saw and what every stream cost, as of now."""
        r = self.request
        o = RequestOutcome(
            request_id=r.id,
            arrival=r.arrival,
            prompt_tokens=r.prompt_tokens,
            token_times=list(self.times),
            token_sources=list(self.sources),
            first_token_from=self.winner,
            migrated_at=self.migrated_at,
            server_started=self._started_fresh(EndpointKind.SERVER),
            device_started=self._started_fresh(EndpointKind.DEVICE),
        )
        bill(o, self.legs, self.c.server_profile, self.c.device_profile)
        if self.fatal is not None:
            o.error = str(self.fatal)
        elif self.status is RequestStatus.CANCELLED:
            o.error = "cancelled before the end of the stream"
        return o

    def _started_fresh(self, kind: EndpointKind) -> bool:
        """Whether ``kind`` started on the original prompt (not as a resume after tokens)."""
        return any(
            leg.kind is kind and leg.start_index == 0 and not leg.queued for leg in self.legs
        )
