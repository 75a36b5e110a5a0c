"""The graceful-shutdown pieces in process (the real process: tests/cluster/test_agent_shutdown.py)."""

from __future__ import annotations

import asyncio
import json

import pytest

from disco.device_agents.drain import SHUTTING_DOWN, Drain


class Body:
    """An SSE body: ``n`` events ``delay`` apart, then ``fail`` if given; records its closing."""

    def __init__(self, n: int, delay: float = 0.0, fail: Exception | None = None) -> None:
        self.n, self.delay, self.fail = n, delay, fail
        self.closed = False

    async def gen(self):
        try:
            for i in range(self.n):
                await asyncio.sleep(self.delay)
                yield f"data: {i}\n\n"
            if self.fail is not None:
                raise self.fail
        finally:
            self.closed = True


async def test_a_tracked_stream_passes_everything_through():
    body = Body(5)
    assert [x async for x in Drain().track(body.gen())] == [f"data: {i}\n\n" for i in range(5)]
    assert body.closed


async def test_ended_streams_send_the_shutting_down_event_and_close_their_body():
    drain = Drain()
    slow, fresh = Body(1000, delay=0.01), Body(1000, delay=0.01)
    got: list[str] = []

    async def read(stream):
        async for x in stream:
            got.append(x)

    reader = asyncio.ensure_future(read(drain.track(slow.gen())))
    await asyncio.sleep(0.05)
    fresh_stream = drain.track(fresh.gen())
    fresh_first = asyncio.ensure_future(fresh_stream.__anext__())
    await asyncio.sleep(0)  # its pump exists but has not run a step yet
    assert drain.end_streams() == 2
    await asyncio.wait_for(reader, 5)
    last = json.loads(got[-1].removeprefix("data: "))
    assert last["error"]["code"] == SHUTTING_DOWN and last["status"] == 503
    assert 1 <= len(got) - 1 < 1000 and slow.closed
    first = await asyncio.wait_for(fresh_first, 5)
    assert SHUTTING_DOWN in first
    await fresh_stream.aclose()


async def test_a_failing_body_raises_in_the_consumer():
    with pytest.raises(RuntimeError, match="boom"):
        async for _ in Drain().track(Body(2, fail=RuntimeError("boom")).gen()):
            pass


async def test_a_consumer_that_goes_away_closes_the_body():
    body = Body(1000, delay=0.01)
    stream = Drain().track(body.gen())
    assert await stream.__anext__() == "data: 0\n\n"
    await stream.aclose()
    assert body.closed


async def test_wait_returns_once_nothing_is_in_flight():
    drain = Drain()
    drain.in_flight = 1

    async def finish():
        await asyncio.sleep(0.05)
        drain.in_flight = 0

    task = asyncio.ensure_future(finish())
    t0 = asyncio.get_running_loop().time()
    assert await drain.wait(5.0) == 0
    assert asyncio.get_running_loop().time() - t0 < 1.0
    await task
