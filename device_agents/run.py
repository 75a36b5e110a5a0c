"""The asyncio driver of one request: runs the streams its state machine starts, feeds it their
events, and hands the user's tokens out.

The decisions are :class:`~disco.device_agents.request_state.RequestState`'s; this module only
waits. While several streams run (a race, a hedge to come, a migration), one pump task per stream
feeds a single queue, and the request's task takes each message in arrival order, so no two
decisions interleave. A stream that is the only one left is iterated by the request's own task
instead (one task switch per token, not two: what lets one event loop hold thousands of streams on
time), watched by a :class:`~disco.device_agents.watchdog.StallWatchdog`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from disco.scheduler.endpoint import Endpoint, EndpointFailedError, GenerationRequest
from disco.scheduler.types import EndpointKind, Plan, Request, RequestOutcome, TokenEvent

from .device_queue import DeviceSlots
from .request_state import Leg, RequestState, RequestStatus, StreamFailedError
from .watchdog import StallWatchdog

if TYPE_CHECKING:
    from .coordinator import Coordinator

__all__ = ["RequestRun", "StreamFailedError"]


@dataclass(slots=True)
class _Msg:
    leg: Leg
    event: TokenEvent | None = None  # None with error None: the stream ended
    error: BaseException | None = None
    slot: bool = False  # the leg got its device slot (its stall clock starts now)


# asyncio.timeout (3.11+) arms one timer and no extra task; wait_for is the 3.10 fallback.
_TIMEOUT = getattr(asyncio, "timeout", None)


async def _with_timeout(aw, seconds: float):
    if _TIMEOUT is None:
        return await asyncio.wait_for(aw, seconds)
    async with _TIMEOUT(seconds):
        return await aw


class RequestRun:
    """One request in flight: the driver around its :class:`RequestState` (a :class:`Launcher`)."""

    def __init__(self, coord: Coordinator, request: Request, gen: GenerationRequest, plan: Plan):
        self.c = coord
        self.clock = coord.clock
        self.state = RequestState(coord, request, gen, plan, self)
        self.watchdog = StallWatchdog(self.state.limits, self.clock)
        self.q: asyncio.Queue[_Msg] = asyncio.Queue()
        self.direct: Leg | None = None  # the sole live stream, iterated without a pump task
        self.outcome: RequestOutcome | None = None
        self.finished_cb: Callable[[], None] | None = None

    # --- Launcher -------------------------------------------------------------------------------
    def launch(self, leg: Leg, request: GenerationRequest) -> None:
        ep = self.c.endpoints[leg.kind]
        sole = ep is not None and self.state.sole_stream(leg)
        slots = self.c.device_slots if leg.kind is EndpointKind.DEVICE else None
        if ep is not None and slots is not None:
            leg.queued = True  # until it holds a slot: no stall clock (watchdog.StallLimits)
            ep = _Queued(ep, slots, leg, self._got_slot, sole)
        if sole:
            try:
                leg.it = ep.stream(request)
                self.direct = leg
            except Exception as e:  # an endpoint may validate before returning its iterator
                self.q.put_nowait(_Msg(leg, error=e))
        else:
            leg.task = asyncio.get_running_loop().create_task(self._pump(leg, ep, request))

    def _got_slot(self, leg: Leg, direct: bool) -> None:
        leg.queued = False
        leg.started_at = self.clock()
        if direct:  # the request's task waits on this stream: arm its first-token limit now
            self.watchdog.watch(leg)
        else:  # wake the driver so that it re-reads the deadlines
            self.q.put_nowait(_Msg(leg, slot=True))

    def stop(self, leg: Leg) -> None:
        if leg.task is not None:
            leg.task.cancel()

    # --- the driver -----------------------------------------------------------------------------
    async def events(self) -> AsyncIterator[TokenEvent]:
        st, wd = self.state, self.watchdog
        out = st.out
        cancelled = True
        try:
            while not st.done:
                if st.pending:
                    st.start_due()
                leg = self.direct
                if leg is not None and leg.live:
                    # The hot path, one iteration per token: the sole stream, inlined (a call
                    # per token here measured ~5% more time per token).
                    limit = st.limits.of(leg)
                    watched = limit is not None and wd.SUPPORTED
                    if watched:
                        wd.watch(leg)
                    try:
                        if limit is None or watched:
                            ev = await leg.it.__anext__()
                        else:  # Python 3.10: a timeout per token (slower, same behaviour)
                            ev = await asyncio.wait_for(leg.it.__anext__(), limit)
                    except StopAsyncIteration:
                        st.on_end(leg)
                    except asyncio.CancelledError:
                        if not wd.absorb():
                            raise
                        st.on_failure(leg, st.limits.stalled(leg))
                    except asyncio.TimeoutError:
                        st.on_failure(leg, st.limits.stalled(leg))
                    except Exception as e:  # any engine or transport error: this endpoint failed
                        st.on_failure(leg, e)
                    else:
                        st.on_token(leg, ev)
                    finally:
                        wd.release()
                else:
                    if not st.any_live() and not st.pending:
                        st.fail("no endpoint left to run the request")
                        break
                    msg = await self._next_msg()
                    if msg is not None and msg.leg.live:
                        self._handle(msg)
                while out:
                    yield out.pop(0)
            while out:
                yield out.pop(0)
            cancelled = False
        finally:
            # Synchronous first: under an anyio cancel scope (Starlette on client disconnect)
            # every await in here is cancelled again, and the outcome must not depend on one.
            tasks = self._stop_streams()
            self._finalize(cancelled)
            await self._reap(tasks)
        if st.fatal is not None:
            raise st.fatal

    async def _next_msg(self) -> _Msg | None:
        """The next pump message, or None when a deadline (a hedge start, a switch deadline, a
        stall) passed first: those are acted on here."""
        deadline = self.state.next_deadline()
        if deadline is None:
            return await self.q.get()
        delay = deadline - self.clock()
        try:
            if delay > 0:
                return await _with_timeout(self.q.get(), delay)
        except asyncio.TimeoutError:
            pass
        self.state.check_deadlines()
        return None

    def _handle(self, msg: _Msg) -> None:
        if msg.slot:
            return
        if msg.error is not None:
            self.state.on_failure(msg.leg, msg.error)
        elif msg.event is None:
            self.state.on_end(msg.leg)
        else:
            self.state.on_token(msg.leg, msg.event)

    async def _pump(self, leg: Leg, ep: Endpoint | None, req: GenerationRequest) -> None:
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

    # --- the end --------------------------------------------------------------------------------
    def _stop_streams(self) -> list[asyncio.Task]:
        self.watchdog.close()
        legs = self.state.legs
        tasks = [leg.task for leg in legs if leg.task is not None and not leg.task.done()]
        self.state.stop_all()
        return tasks

    async def _reap(self, tasks: list[asyncio.Task]) -> None:
        """Wait for cancelled pumps and close directly driven streams (best effort)."""
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for leg in self.state.legs:
            if leg.it is not None:
                with contextlib.suppress(Exception):
                    await leg.it.aclose()

    def _finalize(self, cancelled: bool) -> None:
        if self.outcome is not None:
            return
        st = self.state
        if cancelled:
            st.cancel()
        self.outcome = st.outcome()
        if st.status is RequestStatus.FINISHED and st.finish_reason == "stop":
            self.c.lengths.observe(len(st.texts))
        if self.finished_cb is not None:
            self.finished_cb()


class _Queued:
    """A device endpoint behind the agent's FIFO of device slots (``device_queue.py``): its
    stream waits for a slot, tells the driver when it has one, and frees it when it ends."""

    def __init__(
        self,
        ep: Endpoint,
        slots: DeviceSlots,
        leg: Leg,
        got_slot: Callable[[Leg, bool], None],
        direct: bool,
    ) -> None:
        self.ep, self.slots, self.leg, self.got_slot, self.direct = ep, slots, leg, got_slot, direct

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        ticket = self.slots.enter(self.leg, request.max_tokens)
        try:
            await ticket.granted
            self.got_slot(self.leg, self.direct)
            async with contextlib.aclosing(self.ep.stream(request)) as it:
                async for ev in it:
                    yield ev
        finally:
            self.slots.leave(ticket)
