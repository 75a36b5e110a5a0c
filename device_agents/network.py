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
from dataclasses import dataclass

import numpy as np

from disco.scheduler.endpoint import Endpoint, GenerationRequest
from disco.scheduler.types import TokenEvent

DISTRIBUTIONS = ("constant", "normal", "exponential", "lognormal", "pareto")


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """One-way delay = rtt_s / 2 + a jitter sample whose scale is ``jitter_s``.

    ``normal``: |N(0, jitter)|; ``exponential``: mean jitter; ``lognormal``: jitter * LogN(0, 1)
    (a heavier tail); ``pareto``: jitter * Pareto(shape 2.5) (rare long stalls, the last hop's
    tail); ``constant``: no jitter.
    """

    rtt_s: float = 0.05
    jitter_s: float = 0.0
    distribution: str = "constant"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rtt_s < 0 or self.jitter_s < 0:
            raise ValueError("rtt_s and jitter_s must be >= 0")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}"
            )

    def one_way(self, rng: np.random.Generator) -> float:
        j = self.jitter_s
        if self.distribution == "constant" or j == 0:
            extra = 0.0
        elif self.distribution == "normal":
            extra = abs(float(rng.normal(0.0, j)))
        elif self.distribution == "exponential":
            extra = float(rng.exponential(j))
        elif self.distribution == "lognormal":
            extra = j * float(rng.lognormal(0.0, 1.0))
        else:
            extra = j * float(rng.pareto(2.5))
        return self.rtt_s / 2 + extra


_END = object()


class NetworkEndpoint:
    """Wraps an endpoint (usually the server) with the device's last-hop delays."""

    def __init__(self, inner: Endpoint, config: NetworkConfig) -> None:
        self.inner = inner
        self.config = config
        self.kind = inner.kind
        self.name = f"{inner.name}+net"

    def _rng(self, req: GenerationRequest) -> np.random.Generator:
        key = zlib.crc32(req.request_id.encode())
        return np.random.default_rng([self.config.seed, key, req.start_index])

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
