"""Scripted endpoints for exact timing and failure scripts in coordinator tests.

Each call to ``stream`` follows the next :class:`Script` (the last one repeats): wait ``ttft``,
then yield one token every ``tbt`` up to ``length`` tokens in all, failing after ``fail_after``
tokens of this call if set. Token text names the endpoint and the index ("s3 "), so a test can see
who produced what and that a resumed call continues after the prefix it was given.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from disco.scheduler.endpoint import EndpointFailedError, GenerationRequest
from disco.scheduler.profiles import DeviceProfile, LogNormalComponent, Prices, ServerProfile
from disco.scheduler.types import EndpointKind, TokenEvent


@dataclass(frozen=True)
class Script:
    ttft: float = 0.01
    tbt: float = 0.002
    length: int = 20  # the response ends (finish "stop") at this total index
    fail_after: int | None = None  # tokens this call yields before raising
    stall_after: int | None = None  # tokens this call yields before going silent forever


class ScriptedEndpoint:
    def __init__(self, kind: EndpointKind, *scripts: Script, tag: str | None = None) -> None:
        self.kind = kind
        self.name = f"scripted-{kind.value}"
        self.tag = tag or kind.value[0]
        self.scripts = scripts or (Script(),)
        self.calls: list[GenerationRequest] = []
        self.closed_early = 0  # calls stopped before their natural end

    async def stream(self, req: GenerationRequest):
        req.validate()
        script = self.scripts[min(len(self.calls), len(self.scripts) - 1)]
        self.calls.append(req)
        finished = False
        try:
            await asyncio.sleep(script.ttft)
            end = min(script.length, req.start_index + req.max_tokens)
            for n, i in enumerate(range(req.start_index, end)):
                if script.fail_after is not None and n >= script.fail_after:
                    raise EndpointFailedError(f"{self.name} died at index {i}")
                if script.stall_after is not None and n >= script.stall_after:
                    await asyncio.Event().wait()  # a hung replica: never raises, never ends
                if n:
                    await asyncio.sleep(script.tbt)
                reason = "stop" if i + 1 == script.length else None
                yield TokenEvent(i, f"{self.tag}{i} ", time.monotonic(), None, self.kind, reason)
            finished = True
        finally:
            if not finished:
                self.closed_early += 1

    async def close(self) -> None:
        return None


def cheap_device_profiles() -> tuple[ServerProfile, DeviceProfile]:
    """Profiles where a device token costs far less than a server token (server->device pays)."""
    server = ServerProfile(
        name="test-server",
        prices=Prices(1.0, 4.0),
        tbt_s=0.002,
        ttft_mixture=(LogNormalComponent(1.0, 0.01, 0.1),),
    )
    device = DeviceProfile(
        name="test-device",
        ttft_base_s=0.005,
        prefill_tps=5000.0,
        decode_tps=500.0,
        params_b=0.1,
        j_per_gflop=0.01,
    )
    return server, device


def cheap_server_profiles() -> tuple[ServerProfile, DeviceProfile]:
    """Profiles where a server token costs far less than a device token (device->server pays)."""
    server = ServerProfile(
        name="test-server-cheap",
        prices=Prices(0.001, 0.001),
        tbt_s=0.002,
        ttft_mixture=(LogNormalComponent(1.0, 0.01, 0.1),),
    )
    device = DeviceProfile(
        name="test-device-costly",
        ttft_base_s=0.005,
        prefill_tps=5000.0,
        decode_tps=500.0,
        params_b=10.0,
        j_per_gflop=1.0,
    )
    return server, device


class FailAfter:
    """Wraps a real endpoint so that each stream dies after ``n`` tokens (failover tests)."""

    def __init__(self, inner, n: int, kind: EndpointKind | None = None) -> None:
        self.inner, self.n = inner, n
        self.kind = kind or inner.kind
        self.name = f"{inner.name}+fail@{n}"

    async def stream(self, req: GenerationRequest):
        it = self.inner.stream(req)
        try:
            async for i, ev in _enumerate(it):
                if i >= self.n:
                    raise EndpointFailedError(f"{self.name}: killed after {i} tokens")
                yield ev
        finally:
            await it.aclose()

    async def close(self) -> None:
        await self.inner.close()


async def _enumerate(ait):
    i = 0
    async for x in ait:
        yield i, x
        i += 1
