"""One request's state machine: the streams it runs, what the user has seen, what it cost.

Driven by :class:`disco.device_agents.coordinator.Execution`; the behaviour it implements is
described in ``coordinator.py``. Every decision is a synchronous method called from the one driver
coroutine (``RequestRun.events``), so no two decisions interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from disco.scheduler.billing import prompt_charge
from disco.scheduler.endpoint import Endpoint, EndpointFailedError, GenerationRequest
from disco.scheduler.migration import decide_migration, migration_latency
from disco.scheduler.types import EndpointKind, Plan, Request, RequestOutcome, TokenEvent

if TYPE_CHECKING:
    from .coordinator import Coordinator


class StreamFailedError(EndpointFailedError):
    """No endpoint could finish the request; ``causes`` holds each endpoint's error."""

    def __init__(self, message: str, causes: list[BaseException] | None = None) -> None:
        super().__init__(message)
        self.causes = list(causes or [])


@dataclass(eq=False)
class _Leg:
    """One endpoint stream within a request."""

    kind: EndpointKind
    start_index: int
    context_tokens: int  # prompt + prefix tokens this stream prefills
    started_at: float
    task: asyncio.Task | None = None
    produced: int = 0
    first_at: float | None = None
    last_at: float | None = None  # time of the latest token (stall detection)
    it: Any = None  # the stream iterator, when driven directly (no pump task)
    spec: list[TokenEvent] = field(default_factory=list)  # source tokens held during a migration
    live: bool = True
    stopped_at: float | None = None


@dataclass(slots=True)
class _Msg:
    leg: _Leg
    event: TokenEvent | None = None  # None with error None: the stream ended
    error: BaseException | None = None


def _stalled(leg: _Leg, limit: float | None) -> EndpointFailedError:
    what = "first token" if leg.produced == 0 else "next token"
    return EndpointFailedError(f"{leg.kind.value} stream stalled: no {what} within {limit} s")


# asyncio.timeout (3.11+) arms one timer and no extra task; wait_for is the 3.10 fallback.
_TIMEOUT = getattr(asyncio, "timeout", None)
_HAS_UNCANCEL = hasattr(asyncio.Task, "uncancel")  # 3.11+: the stall watchdog needs it


async def _with_timeout(aw, seconds: float):
    if _TIMEOUT is None:
        return await asyncio.wait_for(aw, seconds)
    async with _TIMEOUT(seconds):
        return await aw


class RequestRun:
    """The state machine of one request (see the module docstring)."""

    def __init__(self, coord: Coordinator, request: Request, gen: GenerationRequest, plan: Plan):
        self.c = coord
        self.request = request
        self.gen = gen
        self.plan = plan
        self.clock = coord.clock
        self.q: asyncio.Queue[_Msg] = asyncio.Queue()
        self.legs: list[_Leg] = []
        self.pending: dict[EndpointKind, float] = {}  # not yet started: kind -> absolute time
        self.active: _Leg | None = None  # the leg whose tokens the user gets
        self.target: _Leg | None = None  # migration or failover target not yet producing
        self.winner: EndpointKind | None = None
        self.migrate_at: int | None = None
        self.migrate_to: EndpointKind | None = None
        self.texts: list[str] = []
        self.times: list[float] = []
        self.sources: list[EndpointKind] = []
        self.out: list[TokenEvent] = []  # delivered but not yet yielded
        self.dead: set[EndpointKind] = set()
        self.failures: list[tuple[EndpointKind, BaseException]] = []
        self.failovers = 0
        self.migrated_at: int | None = None
        self.migration_leg: _Leg | None = None
        self.switch_deadline: float | None = None  # abandon the migration if not switched by then
        self.migration_abandoned = False
        self.finish_reason: str | None = None
        self.done = False
        self.fatal: StreamFailedError | None = None
        self.outcome: RequestOutcome | None = None
        self.finished_cb: Callable[[], None] | None = None
        self.direct: _Leg | None = None  # the sole live leg, iterated without a pump task
        self.cancelled = False  # the consumer stopped before the end
        self.wd_leg: _Leg | None = None  # the leg the task is waiting on (stall watchdog)
        self.wd_task: asyncio.Task | None = None
        self.wd_handle: asyncio.TimerHandle | None = None
        self.wd_due = 0.0
        self.wd_fired = False

    # --- the driver -----------------------------------------------------------------------------
    async def events(self):
        cancelled = True
        try:
            for kind in (EndpointKind.SERVER, EndpointKind.DEVICE):
                start = self.plan.start_of(kind)
                if start is not None:
                    self.pending[kind] = self.request.arrival + start
            while not self.done:
                if self.pending:
                    self._start_due()
                    if self.done:
                        break
                leg = self.direct
                if leg is not None and leg.live:
                    # Inlined hot path (one iteration per token): the sole leg, no pump task.
                    limit = self._limit(leg)
                    watched = limit is not None and _HAS_UNCANCEL
                    if watched:
                        self._watch(leg)
                    try:
                        if limit is None or watched:
                            ev = await leg.it.__anext__()
                        else:  # Python 3.10: a timeout per token (slower, same behaviour)
                            ev = await asyncio.wait_for(leg.it.__anext__(), limit)
                    except StopAsyncIteration:
                        self._on_end(leg)
                    except asyncio.CancelledError:
                        if not self._stall_fired(leg):
                            raise
                        self._on_failure(leg, _stalled(leg, limit))
                    except asyncio.TimeoutError:
                        self._on_failure(leg, _stalled(leg, limit))
                    except Exception as e:  # any engine or transport error: this endpoint failed
                        self._on_failure(leg, e)
                    else:
                        self._on_token(leg, ev)
                    finally:
                        self.wd_leg = None
                else:
                    if not any(leg.live for leg in self.legs) and not self.pending:
                        self._fail("no endpoint left to run the request")
                        break
                    msg = await self._next_msg()
                    if msg is not None:
                        self._handle(msg)
                while self.out:
                    yield self.out.pop(0)
            while self.out:
                yield self.out.pop(0)
            cancelled = False
        finally:
            # Synchronous first: under an anyio cancel scope (Starlette on client disconnect)
            # every await in here is cancelled again, and the outcome must not depend on one.
            tasks = self._stop_legs()
            self._finalize(cancelled)
            await self._reap(tasks)
        if self.fatal is not None:
            raise self.fatal

    # --- stall watchdog of a directly driven leg -------------------------------------------------
    # One timer per request, re-armed only when it fires (not per token): when it finds the leg
    # silent for longer than its limit while the request's task waits on it, it cancels that
    # task, and the wait turns the cancellation into a stall failure (as asyncio.timeout does).
    def _watch(self, leg: _Leg) -> None:
        self.wd_leg = leg
        self.wd_task = asyncio.current_task()
        limit = self._limit(leg)
        # Re-arm only if the deadline moved earlier (the first token turns the long first-token
        # limit into the shorter stall limit); a later deadline is handled when the timer fires.
        if limit is not None and (
            self.wd_handle is None or (leg.last_at or leg.started_at) + limit < self.wd_due
        ):
            self._arm_watchdog(leg)

    def _arm_watchdog(self, leg: _Leg) -> None:
        limit = self._limit(leg)
        if limit is None:
            return
        if self.wd_handle is not None:
            self.wd_handle.cancel()
        self.wd_due = (leg.last_at or leg.started_at) + limit
        delay = max(0.0, self.wd_due - self.clock())
        self.wd_handle = asyncio.get_running_loop().call_later(delay, self._on_watchdog)

    def _on_watchdog(self) -> None:
        self.wd_handle = None
        leg = self.wd_leg
        if leg is None or not leg.live or self.wd_task is None:
            return  # not waiting on an endpoint now: the next wait re-arms
        limit = self._limit(leg)
        if limit is None:
            return
        if self.clock() - (leg.last_at or leg.started_at) < limit:
            self._arm_watchdog(leg)  # tokens came since it was armed
            return
        self.wd_fired = True
        self.wd_task.cancel()

    def _stall_fired(self, leg: _Leg) -> bool:
        """Whether a CancelledError came from the watchdog (then it is absorbed)."""
        if not self.wd_fired:
            return False
        self.wd_fired = False
        task = asyncio.current_task()
        # Someone else cancelled too: that cancellation wins.
        return task is None or task.uncancel() == 0

    async def _next_msg(self) -> _Msg | None:
        # Wake up for the next hedge start or stall deadline even if no endpoint speaks.
        deadlines = list(self.pending.values())
        if self.switch_deadline is not None:
            deadlines.append(self.switch_deadline)
        for leg in self.legs:
            limit = self._limit(leg) if leg.live else None
            if limit is not None:
                deadlines.append((leg.last_at or leg.started_at) + limit)
        if not deadlines:
            return await self.q.get()
        delay = min(deadlines) - self.clock()
        try:
            if delay > 0:
                return await _with_timeout(self.q.get(), delay)
        except asyncio.TimeoutError:
            pass
        self._check_stalls()
        return None

    def _limit(self, leg: _Leg) -> float | None:
        cfg = self.c.config
        return cfg.first_token_timeout_s if leg.produced == 0 else cfg.stall_timeout_s

    def _check_stalls(self) -> None:
        now = self.clock()
        if self.switch_deadline is not None and now >= self.switch_deadline:
            self.switch_deadline = None
            source = self.active
            if (
                self.target is not None
                and self.target is self.migration_leg
                and source is not None
                and source.live
            ):
                # Abandon only while the source can still finish the request.
                self.migration_abandoned = True
                self._abort_target()  # the source's held tokens go out now
        for leg in list(self.legs):
            limit = self._limit(leg) if leg.live else None
            if limit is not None and now - (leg.last_at or leg.started_at) >= limit:
                self._on_failure(leg, _stalled(leg, limit))

    def _start_due(self) -> None:
        now = self.clock()
        for kind, at in list(self.pending.items()):
            if at <= now:
                del self.pending[kind]
                self._start(kind, 0)

    def _start(self, kind: EndpointKind, index: int) -> _Leg:
        """Start a stream on ``kind`` that continues after the first ``index`` delivered tokens."""
        for leg in self.legs:  # a kept loser of this kind is a different generation: stop it
            if leg.kind is kind and leg.live:
                self._cancel(leg)
        ep = self.c.endpoints[kind]
        context = self.request.prompt_tokens + index if ep is not None else 0
        leg = _Leg(kind, index, context, self.clock())
        self.legs.append(leg)
        req = replace(
            self.gen,
            prefix=self.gen.prefix + "".join(self.texts[:index]),
            start_index=self.gen.start_index + index,
            max_tokens=self.gen.max_tokens - index,
            prompt_tokens_hint=self.request.prompt_tokens,
            request_id=self.request.id,
        )
        if ep is not None and self._can_go_direct(kind):
            try:
                leg.it = ep.stream(req)
                self.direct = leg
            except Exception as e:  # an endpoint may validate before returning its iterator
                self.q.put_nowait(_Msg(leg, error=e))
        else:
            leg.task = asyncio.get_running_loop().create_task(self._pump(leg, ep, req))
        return leg

    def _can_go_direct(self, kind: EndpointKind) -> bool:
        """A leg that will be the only one running (no race, no hedge to come, no migration from
        it) is iterated by the request's own task: one task switch per token instead of two,
        which is what lets one event loop hold thousands of streams on time."""
        if self.pending or any(leg.live for leg in self.legs[:-1]):
            return False
        rule = self.plan.migration
        may_migrate = rule is not None and rule.from_kind is kind and self.failovers == 0
        return not may_migrate

    async def _pump(self, leg: _Leg, ep: Endpoint | None, req: GenerationRequest) -> None:
        if ep is None:
            self.q.put_nowait(_Msg(leg, error=EndpointFailedError(f"no {leg.kind.value} endpoint")))
            return
        it = None
        try:
            it = ep.stream(req)
            async for ev in it:
                self.q.put_nowait(_Msg(leg, ev))
            self.q.put_nowait(_Msg(leg))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # any engine or transport error is a failure of this endpoint
            self.q.put_nowait(_Msg(leg, error=e))
        finally:
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    # --- events ---------------------------------------------------------------------------------
    def _handle(self, msg: _Msg) -> None:
        leg = msg.leg
        if not leg.live:
            return
        if msg.error is not None:
            self._on_failure(leg, msg.error)
        elif msg.event is None:
            self._on_end(leg)
        else:
            self._on_token(leg, msg.event)

    def _on_token(self, leg: _Leg, ev: TokenEvent) -> None:
        expected = self.gen.start_index + leg.start_index + leg.produced
        if ev.index != expected:
            self._on_failure(
                leg, EndpointFailedError(f"token index {ev.index}, expected {expected}")
            )
            return
        leg.produced += 1
        leg.last_at = self.clock()
        if leg.first_at is None:
            leg.first_at = leg.last_at
        if self.winner is None:
            self._on_first_token(leg)
        if leg is self.target:
            self._switch_to(leg)
        if leg is self.active:
            if self.target is not None:
                leg.spec.append(ev)  # the target will continue after what was delivered
                if ev.finish_reason is not None:
                    self._abort_target()  # the source finished first: nothing left to move
            else:
                self._deliver(ev, leg)
                self._maybe_migrate()
        # Tokens of a kept loser are discarded: only its work counts.

    def _on_first_token(self, leg: _Leg) -> None:
        self.winner = leg.kind
        self.active = leg
        self.pending.clear()  # hedges that have not started never will
        for other in self.legs:
            if other is not leg and other.live and self.plan.cancel_loser:
                self._cancel(other)
        self._decide_migration(leg.kind)

    def _decide_migration(self, winner: EndpointKind) -> None:
        rule = self.plan.migration
        if rule is None or rule.target in self.dead or self.c.endpoints[rule.target] is None:
            return
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
            self.migrate_at = d.at_index
            self.migrate_to = d.target

    def _maybe_migrate(self) -> None:
        if self.done or self.migrate_at is None or self.migrate_to is None:
            return
        n = len(self.texts)
        if n < self.migrate_at:
            return
        # Delivery buffer rule: switch only when the unread buffer hides t_m at reading speed.
        cfg = self.c.config.migration
        t_m = migration_latency(
            self.migrate_to,
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
        target, self.migrate_at, self.migrate_to = self.migrate_to, None, None
        if target in self.dead:
            return
        self.target = self.migration_leg = self._start(target, n)
        # The reader drains the buffer in unread / r_c seconds: a target slower than that would
        # stall the user while the source holds tokens, so the switch is abandoned then.
        self.switch_deadline = now + unread / cfg.read_tps

    def _switch_to(self, leg: _Leg) -> None:
        """The target produced its first token: it takes over at the delivered boundary."""
        source = self.active
        if source is not None and source is not leg:
            source.spec.clear()
            self._cancel(source)
        self.switch_deadline = None
        if leg is self.migration_leg:
            self.migrated_at = self.gen.start_index + leg.start_index
        self.active = leg
        self.target = None

    def _abort_target(self) -> None:
        """Migration target failed or became moot: the source's held tokens go to the user."""
        self.switch_deadline = None
        if self.target is not None:
            self._cancel(self.target)
            self.target = None
        src = self.active
        if src is None:
            return
        held, src.spec = src.spec, []
        for ev in held:
            if self.done:
                break
            self._deliver(ev, src)

    def _on_end(self, leg: _Leg) -> None:
        leg.live = False
        if leg is self.active and self.target is None:
            self.done = True
            self.finish_reason = self.finish_reason or "stop"
        elif leg is self.active:  # source ended during a migration: deliver what it held
            self._abort_target()
            self.done = True
            self.finish_reason = self.finish_reason or "stop"
        elif leg is self.target or self.winner is None:
            # A stream that ends without producing anything is a failed stream.
            leg.live = True
            self._on_failure(leg, EndpointFailedError("stream ended without a token"))

    def _on_failure(self, leg: _Leg, err: BaseException) -> None:
        self._cancel(leg)
        self.failures.append((leg.kind, err))
        self.dead.add(leg.kind)
        if self.winner is None:  # still racing for the first token
            if any(other.live for other in self.legs):
                return
            other = leg.kind.other
            if other in self.pending:
                del self.pending[other]
                self._start(other, 0)
            elif other not in self.dead and self.c.config.failover:
                self.failovers += 1
                self._start(other, 0)
            else:
                self._fail("every endpoint failed before the first token")
            return
        if leg is self.target:
            if self.active is not None and self.active.live:
                self._abort_target()  # migration failed: keep the source
            else:
                self._fail("both endpoints failed")
            return
        if leg is self.active:
            self.active = None
            if self.target is not None:
                # The migration target, already prefilling from the delivered boundary, becomes
                # the failover target: no switch deadline can abandon it now (it is the only
                # endpoint left), and it takes over as a failover, not as a migration.
                leg.spec.clear()  # held tokens of a dead source are never delivered
                self.switch_deadline = None
                self.migration_leg = None
                self.failovers += 1
                self.migrate_at = self.migrate_to = None  # no migration after a failover
                return
            other = leg.kind.other
            if other in self.dead or not self.c.config.failover:
                self._fail("both endpoints failed" if other in self.dead else "endpoint failed")
                return
            self.failovers += 1
            self.migrate_at = self.migrate_to = None  # no migration after a failover
            self.target = self._start(other, len(self.texts))

    # --- helpers --------------------------------------------------------------------------------
    def _deliver(self, ev: TokenEvent, leg: _Leg) -> None:
        now = self.clock()
        index = self.gen.start_index + len(self.texts)
        last = ev.finish_reason is not None or len(self.texts) + 1 >= self.gen.max_tokens
        reason = ev.finish_reason or ("length" if last else None)
        self.texts.append(ev.text)
        self.times.append(now)
        self.sources.append(leg.kind)
        self.out.append(TokenEvent(index, ev.text, now, ev.token_id, leg.kind, reason))
        if last:
            self.done = True
            self.finish_reason = reason

    def _cancel(self, leg: _Leg) -> None:
        if leg.live:
            leg.live = False
            leg.stopped_at = self.clock()
            if leg.task is not None:
                leg.task.cancel()

    def _fail(self, why: str) -> None:
        causes = [e for _, e in self.failures]
        detail = "; ".join(f"{k.value}: {e}" for k, e in self.failures)
        self.fatal = StreamFailedError(f"{why}" + (f" ({detail})" if detail else ""), causes)
        self.done = True

    def _stop_legs(self) -> list[asyncio.Task]:
        if self.wd_handle is not None:
            self.wd_handle.cancel()
            self.wd_handle = None
        tasks = [leg.task for leg in self.legs if leg.task is not None and not leg.task.done()]
        for leg in self.legs:
            self._cancel(leg)
        return tasks

    async def _reap(self, tasks: list[asyncio.Task]) -> None:
        """Wait for cancelled pumps and close directly driven streams (best effort)."""
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for leg in self.legs:
            if leg.it is not None:
                with contextlib.suppress(Exception):
                    await leg.it.aclose()

    def _finalize(self, cancelled: bool) -> None:
        if self.outcome is not None:
            return
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
        now = self.clock()
        for leg in self.legs:
            prompt = self._prompt_work(leg, now)
            if leg.kind is EndpointKind.SERVER:
                o.server_prompt_tokens += prompt
                o.server_output_tokens += leg.produced
            else:
                o.device_prompt_tokens += prompt
                o.device_output_tokens += leg.produced
        o.server_cost = self.c.server_profile.prices.cost(
            o.server_prompt_tokens, o.server_output_tokens
        )
        o.device_energy_j = self.c.device_profile.energy_j(
            o.device_prompt_tokens + o.device_output_tokens
        )
        if self.fatal is not None:
            o.error = str(self.fatal)
        elif cancelled:
            self.cancelled = True
            o.error = "cancelled before the end of the stream"
        elif self.finish_reason == "stop":
            self.c.lengths.observe(len(self.texts))
        self.outcome = o
        if self.finished_cb is not None:
            self.finished_cb()

    def _started_fresh(self, kind: EndpointKind) -> bool:
        """Whether ``kind`` started on the original prompt (not as a resume after tokens)."""
        return any(leg.kind is kind and leg.start_index == 0 for leg in self.legs)

    def _prompt_work(self, leg: _Leg, now: float) -> int:
        """Prompt tokens charged to a leg: the core's one rule (``disco.scheduler.billing``)."""
        return prompt_charge(
            leg.kind,
            leg.context_tokens,
            leg.started_at,
            leg.stopped_at if leg.stopped_at is not None else now,
            leg.first_at is not None,
            float(self.c.device_profile.ttft(leg.context_tokens)),
        )
