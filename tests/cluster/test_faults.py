"""The engine fault hooks of the chaos benchmark (cluster/faults.py), without Ray."""

from __future__ import annotations

import asyncio
import time

import pytest

from disco.cluster.faults import FaultyEndpoint, faulty_engine
from disco.device_agents.engines.emulated import EmulatedEndpoint
from disco.scheduler.endpoint import EndpointFailedError, GenerationRequest, InvalidRequestError
from disco.scheduler.profiles import LogNormalComponent, Prices, ServerProfile

PROFILE = ServerProfile(
    name="t", prices=Prices(1.0, 1.0), tbt_s=0.01, tbt_cv=0.0,
    ttft_mixture=(LogNormalComponent(1.0, 0.01, 0.0),),
)  # fmt: skip


def _ep(ttft_scale: float = 1.0) -> FaultyEndpoint:
    return FaultyEndpoint(EmulatedEndpoint(PROFILE, time_scale=ttft_scale))


def _req(n: int = 20, rid: str = "r") -> GenerationRequest:
    return GenerationRequest("hello there", n, request_id=rid)


async def test_without_faults_it_is_the_inner_engine():
    ep = _ep()
    got = [ev.index async for ev in ep.stream(_req())]
    assert got == list(range(20))
    assert ep.count_tokens("a b c") == ep.inner.count_tokens("a b c")
    assert ep.stats.completed == 1 and ep.kind is ep.inner.kind and ep.streams == 0
    with pytest.raises(InvalidRequestError):  # the inner engine's own errors keep their type
        [ev async for ev in ep.stream(GenerationRequest("", 5))]


async def test_fail_breaks_streams_in_flight_at_once_and_refuses_new_ones_while_down():
    ep = FaultyEndpoint(EmulatedEndpoint(PROFILE, time_scale=100.0))  # first token in ~1 s
    it = ep.stream(_req())
    waiting = asyncio.ensure_future(it.__anext__())
    await asyncio.sleep(0.05)
    assert ep.inject("fail", down_s=0.3) == 1
    t0 = time.monotonic()
    with pytest.raises(EndpointFailedError, match="injected"):
        await waiting
    assert time.monotonic() - t0 < 0.2  # not at its first token
    await it.aclose()
    with pytest.raises(EndpointFailedError, match="down"):
        [ev async for ev in ep.stream(_req())]
    await asyncio.sleep(0.35)
    assert [ev.index async for ev in ep.stream(_req(3))] == [0, 1, 2]
    assert ep.inner.stats.active == 0  # the inner streams were closed


async def test_stall_hangs_one_started_stream_and_leaves_the_others():
    ep = _ep()
    short, long_ = ep.stream(_req(10, "a")), ep.stream(_req(200, "b"))
    await short.__anext__()
    await long_.__anext__()
    assert ep.inject("stall") == 1
    assert [ev.index async for ev in short] == list(range(1, 10))  # untouched
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(long_.__anext__(), 0.3)  # the one with the most left hangs
    await long_.aclose()


async def test_stall_with_nothing_in_flight_hangs_the_next_stream_before_its_first_token():
    ep = _ep()
    assert ep.inject("stall") == 0
    it = ep.stream(_req())
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(it.__anext__(), 0.3)
    await it.aclose()
    assert [ev.index async for ev in ep.stream(_req(2))] == [0, 1]  # only that one
    with pytest.raises(ValueError):
        ep.inject("explode")


def test_the_factory_wraps_a_named_engine():
    ep = faulty_engine("emulated", profile="gpt-4o-mini", time_scale=0.0)
    assert isinstance(ep, FaultyEndpoint) and isinstance(ep.inner, EmulatedEndpoint)


async def test_a_stall_that_finds_no_stream_may_leave_the_next_one_alone():
    ep = _ep()
    assert ep.inject("stall", next_if_idle=False) == 0 and ep.stall_next == 0
    assert [ev.index async for ev in ep.stream(_req(2))] == [0, 1]
