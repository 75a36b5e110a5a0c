"""Last-hop network emulation: per-device RTT and jitter on the path to a server endpoint.

The server's TTFT the device sees includes the uplink (request) and downlink (first token) delays;
every later token is delayed too, in order (a stream cannot overtake itself, as on one TCP
connection). Delays are drawn per stream from an RNG keyed by (seed, request id, start index), so a
run does not depend on how concurrent streams interleave.

Partitions (fault injection, ``NetworkEndpoint.partition``): for a while the device cannot reach
the server. ``hang`` is a blackhole: requests do not leave and tokens do not arrive until it heals
(then they arrive in order, as TCP delivers after retransmission), so the coordinator's stall
limits fire first when they are shorter; ``fail`` is a link that is down: every stream in flight
and every new one fails at once until it heals. The server side is not told (it keeps generating
until the stream is closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator

import numpy as np

from disco.scheduler.endpoint import Endpoint, EndpointFailedError, GenerationRequest
from disco.scheduler.types import TokenEvent

from .config import NetworkConfig

_END = object()
_CUT = object()  # wakes a stream's reader when a ``fail`` partition starts
PARTITION_MODES = ("hang", "fail")


class NetworkEndpoint:
    """Wraps an endpoint (usually the server) with the device's last-hop delays; ``seed`` keys
    this device's delays (a fleet gives each device its own)."""

    def __init__(self, inner: Endpoint, config: NetworkConfig, seed: int = 0) -> None:
        self.inner = inner
        self.config = config
        self.seed = seed
        self.kind = inner.kind
        self.name = f"{inner.name}+net"
        self._cut_until = 0.0  # loop time at which a partition heals (in the past: none)
        self._cut_mode = "hang"
        self._readers: set[asyncio.Queue] = set()  # streams in flight (a ``fail`` wakes them)

    def partition(self, seconds: float, mode: str = "hang") -> None:
        """Cut this device off the server for ``seconds`` from now (module docstring); a
        partition already in force is extended and takes ``mode``. Call on the event loop."""
        if mode not in PARTITION_MODES:
            raise ValueError(f"mode must be one of {PARTITION_MODES}, got {mode!r}")
        loop = asyncio.get_running_loop()
        self._cut_until = max(self._cut_until, loop.time() + max(0.0, seconds))
        self._cut_mode = mode
        if mode == "fail":
            for q in self._readers:
                q.put_nowait((loop.time(), _CUT))

    @property
    def partitioned(self) -> bool:
        return self._cut_until > asyncio.get_running_loop().time()

    async def _through(self, loop: asyncio.AbstractEventLoop) -> None:
        """Return once the link lets a message through: at once, or when a ``hang`` partition
        heals; raise while a ``fail`` partition is in force."""
        while (wait := self._cut_until - loop.time()) > 0:
            if self._cut_mode == "fail":
                raise EndpointFailedError(f"{self.name}: partitioned from the server")
            await asyncio.sleep(wait)

    def _rng(self, req: GenerationRequest) -> np.random.Generator:
        key = zlib.crc32(req.request_id.encode())
        return np.random.default_rng([self.seed, key, req.start_index])

    async def stream(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        rng = self._rng(req)
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self.config.one_way(rng))  # the request travels up
        if self._cut_until > loop.time():
            await self._through(loop)
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
        self._readers.add(q)
        last = 0.0
        try:
            while True:
                sent, item = await q.get()
                if item is _CUT:
                    await self._through(loop)  # raises while the link is down
                    continue
                due = max(last, sent + self.config.one_way(rng))
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if self._cut_until > loop.time():
                    await self._through(loop)
                last = due
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._readers.discard(q)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def close(self) -> None:
        await self.inner.close()
