"""The device's own queue: how many streams its engine runs at once, and who waits (issue 10).

A device engine has a fixed number of stream slots (llama.cpp: one context, one stream at a time).
The agent owns the queue in front of it, instead of leaving it hidden inside the engine, so that:

- a plan sees the work ahead (:meth:`DeviceSlots.state`, a core
  :class:`~disco.scheduler.types.DeviceQueue`) and predicts the device's TTFT behind it;
- a stream's first-token timeout counts from when it gets a slot, not from when it queued
  (waiting behind a planned queue is not a stall, so it never triggers an unplanned hand-over);
- the agent can refuse a request that would only wait, past a queue limit.

FIFO: slots go to waiters in the order they asked. Pure asyncio, no clock of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from disco.scheduler.device_queue import queue_state
from disco.scheduler.types import DeviceQueue


class Progress(Protocol):
    """What the queue reads of a stream (``request_state.Leg`` has it)."""

    produced: int
    context_tokens: int


@dataclass(eq=False)
class Ticket:
    """One stream's place: waiting for a slot, then holding it until :meth:`DeviceSlots.leave`."""

    stream: Progress
    max_tokens: int
    granted: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def running(self) -> bool:
        return self.granted.done() and not self.granted.cancelled()


class DeviceSlots:
    """FIFO admission to a device engine's ``slots`` concurrent streams."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"device slots must be >= 1, got {slots}")
        self.slots = slots
        self._running: list[Ticket] = []
        self._waiting: deque[Ticket] = deque()
        self.admitted = 0  # streams ever given a slot
        self.queued = 0  # of those, streams that had to wait for it
        self.wait_s_total = 0.0  # summed by callers that time the wait (agent metrics)

    def enter(self, stream: Progress, max_tokens: int) -> Ticket:
        """Join the queue; ``await ticket.granted`` until a slot is this stream's."""
        t = Ticket(stream, max_tokens)
        if len(self._running) < self.slots and not self._waiting:
            self._grant(t, waited=False)
        else:
            self._waiting.append(t)
        return t

    def leave(self, ticket: Ticket) -> None:
        """The stream ended, failed or was cancelled, holding a slot or still waiting."""
        if ticket in self._running:
            self._running.remove(ticket)
        else:
            with contextlib.suppress(ValueError):
                self._waiting.remove(ticket)
            if not ticket.granted.done():
                ticket.granted.cancel()
        while self._waiting and len(self._running) < self.slots:
            self._grant(self._waiting.popleft(), waited=True)

    def _grant(self, t: Ticket, waited: bool) -> None:
        self._running.append(t)
        self.admitted += 1
        self.queued += waited
        if not t.granted.done():
            t.granted.set_result(None)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def state(self, expected_output: float) -> DeviceQueue:
        """The queue as a plan sees it (the core's one rule, shared with the causal simulator);
        ``expected_output``: the mean response length (tokens)."""
        return queue_state(
            ((t.stream.produced, t.max_tokens) for t in self._running),
            ((t.stream.context_tokens, t.max_tokens) for t in self._waiting),
            expected_output,
            self.slots,
        )
