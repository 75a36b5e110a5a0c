"""Ray Serve LLM's stream batching, reproduced so that its cost to TTFT can be measured.

Ray Serve LLM drains an engine's output every ``stream_batching_interval_ms`` (50 ms by default)
and sends what accumulated as one message (ray#59681): fewer, larger messages through Ray's
streaming path, at the price of up to one interval added to every first token. The server
deployment uses :func:`coalesce` only when its interval is > 0.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from disco.scheduler.endpoint import EndpointFailedError
from disco.scheduler.types import TokenEvent


async def prepend(first: TokenEvent, rest: AsyncIterator[TokenEvent]) -> AsyncIterator[TokenEvent]:
    yield first
    async for ev in rest:
        yield ev


async def coalesce(
    events: AsyncIterator[TokenEvent], interval_s: float, fmt: Callable[[TokenEvent], str]
) -> AsyncIterator[str]:
    """Ray Serve LLM's stream batching, reproduced: drain what arrived every ``interval_s``."""
    queue: asyncio.Queue[TokenEvent | None] = asyncio.Queue()
    failure: list[BaseException] = []

    async def pump() -> None:
        try:
            async for ev in events:
                queue.put_nowait(ev)
        except EndpointFailedError as e:
            failure.append(e)
        finally:
            queue.put_nowait(None)

    task = asyncio.create_task(pump())
    try:
        done = False
        while not done:
            await asyncio.sleep(interval_s)
            parts = []
            while not queue.empty():
                ev = queue.get_nowait()
                if ev is None:
                    done = True
                    break
                parts.append(fmt(ev))
            if parts:
                yield "".join(parts)
        if failure:
            raise failure[0]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
