"""Last-hop network emulation: per-device RTT and jitter on the path to a server endpoint.

The server's TTFT the device sees includes the uplink (request) and downlink (first token) delays;
every later token is delayed too, in order (a stream cannot overtake itself, as on one TCP
connection). Delays are drawn per stream from an RNG keyed by (seed, request id, start index), so a
run does not depend on how concurrent streams interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator

import numpy as np

from disco.scheduler.endpoint import Endpoint, GenerationRequest
from disco.scheduler.types import TokenEvent

from .config import NetworkConfig

_END = object()


class NetworkEndpoint:
    """Wraps an endpoint (usually the server) with the device's last-hop delays; ``seed`` keys
    this device's delays (a fleet gives each device its own)."""

    def __init__(self, inner: Endpoint, config: NetworkConfig, seed: int = 0) -> None:
        self.inner = inner
        self.config = config
        self.seed = seed
        self.kind = inner.kind
        self.name = f"{inner.name}+net"

    def _rng(self, req: GenerationRequest) -> np.random.Generator:
        key = zlib.crc32(req.request_id.encode())
        return np.random.default_rng([self.seed, key, req.start_index])

    async def stream(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        rng = self._rng(req)
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self.config.one_way(rng))  # the request travels up
        q: asyncio.Queue = asyncio.Queue()

        async def pump() -> None:
            try:
                async for ev in self.inner.stream(req):
                    q.put_nowait((loop.time(), ev))
                q.put_nowait((loop.time(), _END))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the error notice travels down like a token
                q.put_nowait((loop.time(), e))

        task = loop.create_task(pump())
        last = 0.0
        try:
            while True:
                sent, item = await q.get()
                due = max(last, sent + self.config.one_way(rng))
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                last = due
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def close(self) -> None:
        await self.inner.close()
