"""Engine faults on demand (issue 15): a wrapper around any engine with runtime fault hooks.

:class:`FaultyEndpoint` wraps an engine (an emulated server replica's, the agent's llama.cpp) and
behaves exactly like it until :meth:`~FaultyEndpoint.inject` is called:

- ``inject("fail", down_s=...)``: every stream in flight raises :class:`EndpointFailedError` at
  once (not at its next token: a stream waiting on a prefill fails too), and new streams are
  refused for ``down_s`` seconds (an engine that crashed and takes that long to come back).
- ``inject("stall")``: one stream in flight stops producing without ending (a hung generation:
  the one with the most tokens left of those that produced one), or, with none in flight, the
  next stream to start never produces its first token. Only the consumer's stall limit ends it.

As an engine name it is ``disco.cluster.faults:faulty_engine`` with the wrapped engine's name in
``engine`` and its own arguments beside it (``{"engine": "emulated", "profile": ...}``). The Serve
app reaches it through ``DiscoServer.fault`` (one replica, as the router picks), the chaos
benchmark's agent actor through ``ChaosAgentActor.fault``. Light on purpose: Serve replicas
import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from disco.scheduler.endpoint import Endpoint, EndpointFailedError, GenerationRequest
from disco.scheduler.types import TokenEvent

FAULT_KINDS = ("fail", "stall")
_END = object()
_WAKE = object()  # a fault was injected: the reader re-reads its stream's state


class _Live:
    """One stream in flight through the wrapper."""

    __slots__ = ("q", "fault", "produced", "max_tokens")

    def __init__(self, max_tokens: int) -> None:
        self.q: asyncio.Queue[Any] = asyncio.Queue()
        self.fault: str | None = None
        self.produced = 0
        self.max_tokens = max_tokens


class FaultyEndpoint:
    """``inner`` with fault hooks (module docstring); every other attribute is ``inner``'s."""

    def __init__(self, inner: Endpoint) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.name = inner.name
        self.down_until = 0.0  # time.monotonic() before which new streams are refused
        self.stall_next = 0  # streams still to start that will never produce a token
        self.injected = dict.fromkeys(FAULT_KINDS, 0)
        self._live: list[_Live] = []

    def __getattr__(self, name: str) -> Any:  # only for what this class does not define
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def streams(self) -> int:
        return len(self._live)

    def inject(self, kind: str, *, down_s: float = 0.0, next_if_idle: bool = True) -> int:
        """Inject a fault now; returns how many streams in flight it hit. A ``stall`` with no
        stream to hit stalls the next one to start, unless ``next_if_idle`` is False (then it
        does nothing and returns 0)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {FAULT_KINDS}, got {kind!r}")
        self.injected[kind] += 1
        if kind == "fail":
            self.down_until = max(self.down_until, time.monotonic() + max(0.0, down_s))
            hit = [s for s in self._live if s.fault is None]
        else:
            started = [s for s in self._live if s.fault is None and s.produced > 0]
            if not started:
                if not next_if_idle:
                    self.injected[kind] -= 1
                    return 0
                self.stall_next += 1
                return 0
            hit = [max(started, key=lambda s: s.max_tokens - s.produced)]
        for s in hit:
            s.fault = kind
            s.q.put_nowait(_WAKE)
        return len(hit)

    async def stream(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        if time.monotonic() < self.down_until:
            raise EndpointFailedError(f"{self.name}: engine down (injected fault)")
        live = _Live(req.max_tokens)
        if self.stall_next > 0:
            self.stall_next -= 1
            live.fault = "stall"

        async def pump() -> None:
            try:
                async with contextlib.aclosing(self.inner.stream(req)) as it:
                    async for ev in it:
                        live.q.put_nowait(ev)
                live.q.put_nowait(_END)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - handed to the reader, type kept
                live.q.put_nowait(e)

        task = asyncio.get_running_loop().create_task(pump())
        self._live.append(live)
        try:
            while True:
                item = await live.q.get()
                if live.fault == "fail":
                    raise EndpointFailedError(f"{self.name}: injected engine failure")
                if live.fault == "stall":
                    await asyncio.Event().wait()  # never set: hangs until the reader gives up
                if item is _WAKE:
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                live.produced += 1
                yield item
        finally:
            self._live.remove(live)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def close(self) -> None:
        await self.inner.close()


def faulty_engine(engine: str = "emulated", **kwargs: Any) -> FaultyEndpoint:
    """The engine ``engine`` built with ``kwargs`` (as ``server.engine``/``agent.engine`` would),
    wrapped in a :class:`FaultyEndpoint`."""
    from disco.cluster.resolve import build_engine

    if engine == "llamacpp":
        kwargs.setdefault("model", None)
    return FaultyEndpoint(build_engine(engine, kwargs))


__all__ = ["FAULT_KINDS", "FaultyEndpoint", "faulty_engine"]
