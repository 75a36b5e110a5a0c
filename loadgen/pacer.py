"""Open-loop pacing: one schedule shared by every simulated user.

Each user claims the next unclaimed slot, sleeps until the slot is due, sends, and only then
claims another. A slow response therefore holds one user, never the schedule: the next slot is
sent on time by another user (no coordinated omission). If every user is busy when a slot falls
due, that slot goes out late; the pacer measures the lateness and reports that the users are
falling behind (the cure is more users), or, if the slot was claimed in time, that the machine
woke the user late (a busy CPU).

Pure Python, no gevent: the clock and the sleep are injected, so it runs under Locust's greenlets,
under threads in the tests, and with a fake clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Slot:
    index: int
    due: float  # seconds after the pacer's start


@dataclass(frozen=True, slots=True)
class PacerStats:
    total: int
    claimed: int
    sent: int
    late: int  # sends later than ``late_s`` after their due time
    max_lag_s: float
    late_no_user: int = 0  # of those, claimed only after they were due: every user was busy


@dataclass
class Pacer:
    """Hands out ``offsets`` (seconds after :meth:`start`, ascending) as slots, in order."""

    offsets: Sequence[float]
    clock: Callable[[], float] = time.monotonic
    late_s: float = 0.05  # a send this late means the users did not keep up
    warn: Callable[[str], None] | None = None
    warn_every_s: float = 5.0
    # Sleep until this long before the due time, then yield in a tight loop: a timer wake-up
    # on a busy machine can come a few ms late, a process already running does not wait for one.
    spin_s: float = 0.0
    _t0: float | None = field(default=None, init=False)
    _next: int = field(default=0, init=False)
    _sent: int = field(default=0, init=False)
    _late: int = field(default=0, init=False)
    _late_no_user: int = field(default=0, init=False)
    _max_lag: float = field(default=0.0, init=False)
    _last_warn: float = field(default=-1e18, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        if any(b < a for a, b in zip(self.offsets, self.offsets[1:], strict=False)):
            raise ValueError("pacer offsets must be in ascending order")

    def start(self, t0: float | None = None) -> float:
        """Fix time zero (idempotent: the first caller wins, so every user shares one origin)."""
        with self._lock:
            if self._t0 is None:
                self._t0 = self.clock() if t0 is None else t0
            return self._t0

    @property
    def started(self) -> bool:
        return self._t0 is not None

    @property
    def t0(self) -> float:
        if self._t0 is None:
            raise RuntimeError("pacer not started")
        return self._t0

    def claim(self) -> Slot | None:
        """The next slot, or None once the schedule is used up."""
        with self._lock:
            if self._next >= len(self.offsets):
                return None
            slot = Slot(self._next, float(self.offsets[self._next]))
            self._next += 1
            return slot

    def wait(self, slot: Slot, sleep: Callable[[float], None]) -> float:
        """Sleep until ``slot`` is due; return the absolute send time (the clock's reading)."""
        due_abs = self.t0 + slot.due
        while True:
            left = due_abs - self.clock()
            if left <= 0:
                return self.clock()
            sleep(left - self.spin_s if left > self.spin_s else 0.0)

    def sent(self, slot: Slot, at: float, claimed_at: float | None = None) -> float:
        """Record that ``slot`` went out at ``at`` (absolute clock); returns its lag in seconds.

        ``claimed_at`` tells the two causes of lateness apart: a slot claimed after it was due
        waited for a free user (add users); one claimed in time but sent late woke up late (the
        machine is busy).
        """
        lag = at - (self.t0 + slot.due)
        message = None
        with self._lock:
            self._sent += 1
            self._max_lag = max(self._max_lag, lag)
            if lag > self.late_s:
                self._late += 1
                no_user = claimed_at is not None and claimed_at > self.t0 + slot.due + self.late_s
                self._late_no_user += no_user
                if at - self._last_warn >= self.warn_every_s:
                    self._last_warn = at
                    cause = "every user was busy: add users" if no_user else "the CPU is busy"
                    message = (
                        f"falling behind the schedule: request {slot.index} went out "
                        f"{lag * 1000:.0f} ms late ({self._late} late so far; {cause})"
                    )
        if message and self.warn:
            self.warn(message)
        return lag

    @property
    def exhausted(self) -> bool:
        return self._next >= len(self.offsets)

    def stats(self) -> PacerStats:
        with self._lock:
            return PacerStats(
                len(self.offsets), self._next, self._sent, self._late, self._max_lag,
                self._late_no_user,
            )  # fmt: skip


@dataclass
class ClosedLoop:
    """Closed-loop pacing: the same interface as :class:`Pacer`, but a slot is due as soon as
    a user claims it. Each user claims the next request when its previous one has ended, so at
    most as many requests are in flight as there are users, and they go out in the schedule's
    order. No slot is handed out before :meth:`start`'s time zero (users spawned early wait for
    it), after ``duration_s`` seconds, or past the last request.
    """

    total: int
    duration_s: float | None = None  # stop handing out slots this long after time zero
    clock: Callable[[], float] = time.monotonic
    _t0: float | None = field(default=None, init=False)
    _next: int = field(default=0, init=False)
    _sent: int = field(default=0, init=False)
    _max_lag: float = field(default=0.0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def start(self, t0: float | None = None) -> float:
        with self._lock:
            if self._t0 is None:
                self._t0 = self.clock() if t0 is None else t0
            return self._t0

    @property
    def started(self) -> bool:
        return self._t0 is not None

    @property
    def t0(self) -> float:
        if self._t0 is None:
            raise RuntimeError("closed loop not started")
        return self._t0

    def claim(self) -> Slot | None:
        """The next request, due now (or at time zero), or None when the run is over."""
        now = self.clock()
        with self._lock:
            if self._next >= self.total or self._past_deadline(now):
                return None
            slot = Slot(self._next, max(0.0, now - self.t0))
            self._next += 1
            return slot

    def _past_deadline(self, now: float) -> bool:
        return self.duration_s is not None and now - self.t0 >= self.duration_s

    def wait(self, slot: Slot, sleep: Callable[[float], None]) -> float:
        due_abs = self.t0 + slot.due
        while (left := due_abs - self.clock()) > 0:
            sleep(left)
        return self.clock()

    def sent(self, slot: Slot, at: float, claimed_at: float | None = None) -> float:
        lag = at - (self.t0 + slot.due)
        with self._lock:
            self._sent += 1
            self._max_lag = max(self._max_lag, lag)
        return lag

    @property
    def exhausted(self) -> bool:
        return self._next >= self.total or (self.started and self._past_deadline(self.clock()))

    def stats(self) -> PacerStats:
        with self._lock:
            return PacerStats(self.total, self._next, self._sent, 0, self._max_lag)
