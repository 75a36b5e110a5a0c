"""The device queue a plan sees: one rule for the live agent and the causal simulator (issue 10).

A device engine serves ``slots`` streams at a time (llama.cpp: one); the rest wait in FIFO order.
:func:`queue_state` turns what holds a slot and what waits into the
:class:`~disco.scheduler.types.DeviceQueue` a policy plans with
(``WindowPolicy.decision_length``, ``DeviceProfile.queue_delay``). Pure: no clock, no asyncio.
"""

from __future__ import annotations

from collections.abc import Iterable

from .types import DeviceQueue


def queue_state(
    running: Iterable[tuple[int, int]],
    waiting: Iterable[tuple[int, int]],
    expected_output: float,
    slots: int,
) -> DeviceQueue:
    """The queue as a plan sees it.

    ``running``: (tokens produced so far, max_tokens) of each stream holding a slot;
    ``waiting``: (context tokens, max_tokens) of each stream waiting for one, in FIFO order;
    ``expected_output``: the expected response length (tokens; the live agent's running mean of
    finished lengths). A running stream is expected to decode the mean minus what it produced (at
    least one more token), a waiting one the mean and to prefill its context; neither more than
    its ``max_tokens``.
    """
    decode = 0.0
    n_run = 0
    for produced, max_tokens in running:
        n_run += 1
        decode += max(1.0, min(max_tokens - produced, expected_output - produced))
    prefill = 0
    n_wait = 0
    for context, max_tokens in waiting:
        n_wait += 1
        decode += min(max_tokens, expected_output)
        prefill += context
    return DeviceQueue(n_run, n_wait, prefill, decode, slots)
