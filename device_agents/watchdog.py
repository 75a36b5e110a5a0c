"""Silence is failure: the stall limits of a stream, and the watchdog of a directly driven one.

A hung replica never raises, so a stream with no first token within ``first_token_s``, or no next
token within ``next_token_s``, is failed like one that raised (see ``coordinator.py``). The same
limits serve the request's two ways of waiting (``run.py``):
- several streams feed one queue: the request waits on it until the earliest
  :meth:`StallLimits.deadline` and then checks each stream;
- one stream is iterated by the request's own task: :class:`StallWatchdog` keeps one timer per
  request instead of arming a timeout per token (a timer per token is what would cap the number of
  streams one event loop holds on time).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from disco.scheduler.endpoint import EndpointFailedError
from disco.scheduler.types import EndpointKind


class Watched(Protocol):
    """What the limits read of a stream (``request_state.Leg`` has it)."""

    kind: EndpointKind
    produced: int
    started_at: float
    last_at: float | None
    live: bool
    queued: bool  # waiting for a device slot: silence is expected, no limit yet


@dataclass(frozen=True, slots=True)
class StallLimits:
    """Seconds of silence a stream may keep before and after its first token (None: forever)."""

    first_token_s: float | None
    next_token_s: float | None

    def of(self, leg: Watched) -> float | None:
        return self.first_token_s if leg.produced == 0 else self.next_token_s

    def deadline(self, leg: Watched) -> float | None:
        """When a live stream that stays silent from now on becomes stalled."""
        limit = self.of(leg) if leg.live and not leg.queued else None
        return None if limit is None else (leg.last_at or leg.started_at) + limit

    def stalled(self, leg: Watched) -> EndpointFailedError:
        """The failure a stalled stream is failed with."""
        what = "first token" if leg.produced == 0 else "next token"
        return EndpointFailedError(
            f"{leg.kind.value} stream stalled: no {what} within {self.of(leg)} s"
        )


class StallWatchdog:
    """One lazily re-armed timer per request, for the stream its task is waiting on.

    The timer is not re-armed per token, only when it fires: if the stream was silent for longer
    than its limit while the task waits on it (:meth:`watch`), it cancels the task, and the wait
    turns that cancellation into a stall failure (:meth:`absorb`), as ``asyncio.timeout`` does.
    Needs ``Task.uncancel`` (Python 3.11+); without it the driver times each token out instead.
    """

    SUPPORTED = hasattr(asyncio.Task, "uncancel")

    def __init__(self, limits: StallLimits, clock: Callable[[], float]) -> None:
        self.limits = limits
        self.clock = clock
        self._leg: Watched | None = None  # the stream the task waits on now
        self._task: asyncio.Task | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._fired = False

    def watch(self, leg: Watched) -> None:
        """The current task is about to wait for ``leg``'s next token."""
        self._leg = leg
        self._task = asyncio.current_task()
        due = self.limits.deadline(leg)
        # Re-arm only if the deadline moved earlier (the first token turns the long first-token
        # limit into the shorter stall limit); a later deadline is handled when the timer fires.
        if due is not None and (self._handle is None or due < self._due):
            self._arm(due)

    def release(self) -> None:
        """The wait is over (a token, an end or an error came)."""
        self._leg = None

    def absorb(self) -> bool:
        """Whether a CancelledError the waiting task caught came from this watchdog (it is then
        taken back); False if someone else cancelled the task too: their cancellation wins."""
        if not self._fired:
            return False
        self._fired = False
        task = asyncio.current_task()
        return task is None or task.uncancel() == 0

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, due: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._due = due
        delay = max(0.0, due - self.clock())
        self._handle = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._handle = None
        leg = self._leg
        if leg is None or self._task is None:
            return  # not waiting on a stream now: the next wait re-arms
        due = self.limits.deadline(leg)
        if due is None:
            return
        if self.clock() < due:
            self._arm(due)  # tokens came since it was armed
            return
        self._fired = True
        self._task.cancel()
