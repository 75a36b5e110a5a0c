"""The one budget accounting rule, shared by the live coordinator and the causal simulator.

[R] ours: a leg (one endpoint's stream for a request) is charged the prompt tokens it prefilled.
- A server leg is charged its whole context once the request is sent: an API bills the prompt on
  receipt, and a self-hosted replica has queued it (what it computed before a cancel is not
  observable from the device).
- A device leg is charged its whole context once it produced a token; a device prefill cut short
  (the race's loser, an abandoned migration target) is charged pro rata of its expected duration,
  since the device really stopped computing then.
The budget counts these prompt tokens on the constrained side (paper-notes, "Budget ratio").
"""

from __future__ import annotations

from .types import EndpointKind


def prompt_charge(
    kind: EndpointKind,
    context_tokens: int,
    started_at: float,
    stopped_at: float,
    produced: bool,
    expected_prefill_s: float,
) -> int:
    """Prompt tokens charged to one leg (see the module doc)."""
    if kind is EndpointKind.SERVER or produced:
        return int(context_tokens)
    if expected_prefill_s <= 0:
        return int(context_tokens)
    share = min(1.0, max(0.0, (stopped_at - started_at) / expected_prefill_s))
    return round(context_tokens * share)
