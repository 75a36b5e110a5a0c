"""Typed records shared by every layer: requests, plans, token events, outcomes.

Pure data: no clock, no I/O. Times are seconds as floats; the caller chooses the clock (virtual
time in the simulator, ``time.monotonic()`` in the live runtime).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class EndpointKind(str, Enum):
    """Which side of the collaboration produces tokens."""

    DEVICE = "device"
    SERVER = "server"

    @property
    def other(self) -> EndpointKind:
        return EndpointKind.SERVER if self is EndpointKind.DEVICE else EndpointKind.DEVICE


class Regime(str, Enum):
    """Which endpoint the budget constrains (paper-notes.md, "Cost and budget")."""

    DEVICE_CONSTRAINED = "device"  # device energy is scarce: DiSCo-D
    SERVER_CONSTRAINED = "server"  # server money is scarce: DiSCo-S

    @property
    def constrained(self) -> EndpointKind:
        return EndpointKind(self.value)


@dataclass(frozen=True, slots=True)
class DeviceQueue:
    """What a device must finish before it can start one more request (issue 10: the device's
    queue is part of the device). A device engine serves ``slots`` streams at a time (llama.cpp:
    one); ``running`` hold a slot, ``waiting`` queue for one in FIFO order.

    ``prefill_tokens``: context tokens the waiting streams still have to prefill;
    ``decode_tokens``: tokens all of them are still expected to decode (the agent's estimate).
    """

    running: int = 0
    waiting: int = 0
    prefill_tokens: int = 0
    decode_tokens: float = 0.0
    slots: int = 1

    def __post_init__(self) -> None:
        if min(self.running, self.waiting, self.prefill_tokens, self.decode_tokens) < 0:
            raise ValueError(f"device queue counts must be >= 0: {self}")
        if self.slots < 1:
            raise ValueError(f"device queue slots must be >= 1, got {self.slots}")

    @property
    def ahead(self) -> int:
        """Streams ahead of a new request."""
        return self.running + self.waiting

    @property
    def busy(self) -> bool:
        """A new request would wait for a slot."""
        return self.ahead >= self.slots


@dataclass(frozen=True, slots=True)
class Request:
    """One user request as the scheduler sees it.

    ``output_tokens`` is known in traces and simulation, unknown live (None). ``server_ttft_hint``
    is only ever set for the oracle policy: the server TTFT this request will see.
    ``device_queue``: the requesting device's queue when it asked (None: an idle device, or one
    that does not say), so a plan predicts the device's TTFT behind it.
    """

    id: str
    arrival: float
    prompt_tokens: int
    output_tokens: int | None = None
    device_id: str | None = None
    server_ttft_hint: float | None = None
    device_queue: DeviceQueue | None = None

    def __post_init__(self) -> None:
        if self.prompt_tokens <= 0:
            raise ValueError(f"request {self.id}: prompt_tokens must be > 0, got {self.prompt_tokens}")
        if self.output_tokens is not None and self.output_tokens <= 0:
            raise ValueError(f"request {self.id}: output_tokens must be > 0, got {self.output_tokens}")


@dataclass(frozen=True, slots=True)
class MigrationRule:
    """Whether, after the first token, the rest of the generation may move to ``target``.

    The migration planner (``disco.scheduler.migration``) decides at first-token time whether it
    pays off and at which token index the switch happens.
    """

    target: EndpointKind
    # Only migrate if the winner is the other endpoint (a server win migrates to the device in the
    # server-constrained regime, and vice versa).
    from_kind: EndpointKind


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do with one request.

    ``server_start`` / ``device_start``: seconds after arrival at which that endpoint starts, or
    None if it never starts. A start later than 0 is a *hedge*: it only happens if no first token
    has arrived from the other endpoint by then (DiSCo-D's wait time w(l)).
    ``cancel_loser``: stop the slower endpoint once the other produced its first token.
    """

    request_id: str
    server_start: float | None
    device_start: float | None
    cancel_loser: bool = True
    migration: MigrationRule | None = None
    policy: str = ""

    def __post_init__(self) -> None:
        if self.server_start is None and self.device_start is None:
            raise ValueError(f"plan for {self.request_id} starts no endpoint")
        for name in ("server_start", "device_start"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"plan for {self.request_id}: {name} must be >= 0, got {v}")

    def start_of(self, kind: EndpointKind) -> float | None:
        return self.server_start if kind is EndpointKind.SERVER else self.device_start


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token as an endpoint emits it.

    ``index`` counts from 0 over the whole response (a migration target resumes at the index after
    the prefix it was given). ``time`` is the producer's monotonic clock, in seconds.
    """

    index: int
    text: str
    time: float
    token_id: int | None = None
    source: EndpointKind | None = None
    finish_reason: str | None = None  # "stop" | "length" on the last token, else None


@dataclass(slots=True)
class RequestOutcome:
    """What one request cost and what its user saw. Filled by the simulator or the coordinator."""

    request_id: str
    arrival: float
    prompt_tokens: int
    # Absolute times at which the user received each token, and who produced it.
    token_times: list[float] = field(default_factory=list)
    token_sources: list[EndpointKind] = field(default_factory=list)
    # Work done per endpoint, the loser's partial work included (it is real cost).
    server_prompt_tokens: int = 0
    server_output_tokens: int = 0
    device_prompt_tokens: int = 0
    device_output_tokens: int = 0
    server_cost: float = 0.0
    device_energy_j: float = 0.0
    first_token_from: EndpointKind | None = None
    migrated_at: int | None = None  # first token index produced by the migration target
    error: str | None = None
    # Whether each endpoint started on the original request (a hedge may never fire); None when
    # the producer does not say (then a policy infers it from the prompt tokens charged).
    server_started: bool | None = None
    device_started: bool | None = None
    # Refused before any endpoint started (the device was saturated and the plan needed it): no
    # work, no tokens; policies drop its reservation and do not count it in the budget window.
    refused: bool = False

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if len(self.token_times) else None

    @property
    def gaps(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]
