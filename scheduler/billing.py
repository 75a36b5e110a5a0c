"""The one budget accounting rule, shared by the live coordinator and both simulators.

[R] ours, after the paper's budget definition (paper-notes, "Budget ratio": E[I_x(l) * l] <= b *
E[l], where I_x(l) says whether endpoint x prefills a prompt of length l): a leg (one endpoint's
stream for a request) that started is charged its whole context, whether it finished its prefill
or was cancelled first. An API bills the prompt on receipt; a self-hosted replica has queued it;
a device's llama.cpp finishes the prefill batch it is in. The budget counts these prompt tokens
on the constrained side, and cost (money, energy) is computed from the same counts.

Before this rule the live coordinator charged a device prefill cut short pro rata of its expected
duration, and the simulator the whole prompt: one rule now, the simulator's.
"""

from __future__ import annotations

from .types import EndpointKind


def prompt_charge(kind: EndpointKind, context_tokens: int, started: bool = True) -> int:
    """Prompt tokens charged to one leg of ``kind`` with ``context_tokens`` of context."""
    del kind  # one rule for both sides (kept in the signature: the rule is per leg)
    return int(context_tokens) if started else 0
