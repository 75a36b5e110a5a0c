"""Network partitions (fault injection, issue 15): a ``hang`` holds requests and tokens until it
heals, a ``fail`` fails every stream at once; either way order and completeness survive, and the
coordinator fails over to the device within its stall limit."""

from __future__ import annotations

import asyncio
import time

import pytest
from fakes import Script, ScriptedEndpoint, cheap_device_profiles

from disco.device_agents.config import NetworkConfig
from disco.device_agents.coordinator import Coordinator, CoordinatorConfig
from disco.device_agents.network import NetworkEndpoint
from disco.scheduler.endpoint import EndpointFailedError, GenerationRequest
from disco.scheduler.types import EndpointKind, Plan, Request

REQ = GenerationRequest("p", 40, request_id="r")


def _net(length: int = 40, tbt: float = 0.005) -> tuple[ScriptedEndpoint, NetworkEndpoint]:
    inner = ScriptedEndpoint(EndpointKind.SERVER, Script(ttft=0.001, tbt=tbt, length=length))
    return inner, NetworkEndpoint(inner, NetworkConfig(2, 0, "constant"))


async def test_no_partition_keeps_the_old_behaviour():
    _, net = _net()
    got = [ev.index async for ev in net.stream(REQ)]
    assert got == list(range(40))


async def test_hang_holds_tokens_until_it_heals_then_delivers_them_in_order():
    _, net = _net()
    it = net.stream(REQ)
    first = await it.__anext__()
    net.partition(0.3, "hang")
    t0 = time.monotonic()
    rest = [ev async for ev in it]
    assert time.monotonic() - t0 >= 0.25  # nothing came through while partitioned
    assert [first.index] + [ev.index for ev in rest] == list(range(40))
    assert rest[0].time >= first.time  # produced during the partition, delivered at the heal


async def test_hang_holds_the_request_itself_before_it_leaves():
    inner, net = _net(length=3)
    net.partition(0.2, "hang")
    t0 = time.monotonic()
    got = [ev.index async for ev in net.stream(REQ)]
    assert got == [0, 1, 2] and time.monotonic() - t0 >= 0.2
    assert len(inner.calls) == 1


async def test_fail_breaks_a_stream_waiting_for_its_first_token_at_once():
    inner = ScriptedEndpoint(EndpointKind.SERVER, Script(ttft=5.0))
    net = NetworkEndpoint(inner, NetworkConfig(0, 0, "constant"))
    it = net.stream(REQ)
    waiting = asyncio.ensure_future(it.__anext__())
    await asyncio.sleep(0.05)
    net.partition(1.0, "fail")
    t0 = time.monotonic()
    with pytest.raises(EndpointFailedError, match="partitioned"):
        await waiting
    assert time.monotonic() - t0 < 0.5
    await it.aclose()
    assert inner.closed_early == 1  # the server's stream was closed


async def test_fail_refuses_new_streams_until_it_heals():
    _, net = _net(length=2)
    net.partition(0.2, "fail")
    assert net.partitioned
    with pytest.raises(EndpointFailedError):
        [ev async for ev in net.stream(REQ)]
    await asyncio.sleep(0.25)
    assert not net.partitioned
    assert [ev.index async for ev in net.stream(REQ)] == [0, 1]


def test_bad_mode_is_refused():
    _, net = _net()
    with pytest.raises(ValueError):
        net.partition(1.0, "flaky")


@pytest.mark.parametrize("mode", ["hang", "fail"])
async def test_a_partitioned_server_stream_fails_over_to_the_device(mode):
    """The whole point: the device's own stream finishes the request, every index once."""
    sp, dp = cheap_device_profiles()
    server, net = _net(length=30, tbt=0.01)
    device = ScriptedEndpoint(EndpointKind.DEVICE, Script(ttft=0.02, tbt=0.002, length=30))
    cfg = CoordinatorConfig(stall_timeout_s=0.2, first_token_timeout_s=1.0)
    coord = Coordinator(net, device, sp, dp, cfg)
    req = Request("r", coord.clock(), 10)
    ex = coord.execute(req, GenerationRequest("p", 30), Plan("r", server_start=0.0, device_start=None))
    got = []
    async for ev in ex:
        got.append(ev)
        if len(got) == 5:
            net.partition(5.0, mode)
    assert [ev.index for ev in got] == list(range(30))
    assert {ev.source for ev in got[:5]} == {EndpointKind.SERVER}
    assert got[-1].source is EndpointKind.DEVICE and ex.failovers == 1
    gap = max(b.time - a.time for a, b in zip(got, got[1:], strict=False))
    assert gap < (0.2 + 0.5 if mode == "hang" else 0.5)  # the stall limit, or at once
