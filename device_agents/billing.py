"""What one request cost: the work fields of its :class:`RequestOutcome`, from its streams.

Every stream (leg) is charged, the race's loser and a migration's speculative tokens included: its
output tokens as produced, its prompt tokens by the core's one rule
(:func:`disco.scheduler.billing.prompt_charge`), so the live coordinator and the simulators bill
alike; server cost and device energy follow from the same counts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from disco.scheduler.billing import prompt_charge
from disco.scheduler.profiles import DeviceProfile, ServerProfile
from disco.scheduler.types import EndpointKind, RequestOutcome


class Billed(Protocol):
    """What billing reads of a stream that started (``request_state.Leg`` has it)."""

    kind: EndpointKind
    context_tokens: int  # prompt + prefix tokens the stream prefills
    produced: int
    queued: bool  # still waiting for a device slot when it ended: it never ran


def bill(
    outcome: RequestOutcome,
    legs: Iterable[Billed],
    server: ServerProfile,
    device: DeviceProfile,
) -> None:
    """Fill ``outcome``'s tokens per endpoint, server cost and device energy from ``legs``."""
    for leg in legs:
        prompt = prompt_charge(leg.kind, leg.context_tokens, started=not leg.queued)
        if leg.kind is EndpointKind.SERVER:
            outcome.server_prompt_tokens += prompt
            outcome.server_output_tokens += leg.produced
        else:
            outcome.device_prompt_tokens += prompt
            outcome.device_output_tokens += leg.produced
    outcome.server_cost = server.prices.cost(
        outcome.server_prompt_tokens, outcome.server_output_tokens
    )
    outcome.device_energy_j = device.energy_j(
        outcome.device_prompt_tokens + outcome.device_output_tokens
    )
