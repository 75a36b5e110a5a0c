"""Last-hop network wrapper: delays are seeded and bounded below, order and errors survive."""

from __future__ import annotations

import numpy as np
import pytest
from fakes import Script, ScriptedEndpoint

from disco.device_agents.config import DISTRIBUTIONS, NetworkConfig
from disco.device_agents.network import NetworkEndpoint
from disco.scheduler.endpoint import EndpointFailedError, GenerationRequest
from disco.scheduler.types import EndpointKind


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_delays_are_seeded_and_at_least_half_the_rtt(dist):
    cfg = NetworkConfig(rtt_ms=40, jitter_ms=10, distribution=dist)
    a = [cfg.one_way(np.random.default_rng(7)) for _ in range(3)]
    b = [cfg.one_way(np.random.default_rng(7)) for _ in range(3)]
    assert a == b and min(a) >= 0.02
    many = [cfg.one_way(np.random.default_rng(s)) for s in range(200)]
    assert (len(set(many)) > 1) == (dist != "constant")


def test_units_are_milliseconds_and_the_delay_is_in_seconds():
    rng = np.random.default_rng(0)
    assert NetworkConfig(rtt_ms=80, jitter_ms=0).one_way(rng) == pytest.approx(0.04)
    assert NetworkConfig(rtt_ms=0, jitter_ms=5, distribution="constant").one_way(rng) == 0.0
    # The jitter's scale is milliseconds too: an exponential's mean is jitter_ms / 1000 s.
    cfg = NetworkConfig(rtt_ms=0, jitter_ms=20, distribution="exponential")
    mean = np.mean([cfg.one_way(np.random.default_rng(s)) for s in range(2000)])
    assert mean == pytest.approx(0.02, rel=0.1)


def test_bad_config_is_refused():
    with pytest.raises(ValueError):
        NetworkConfig(rtt_ms=-1)
    with pytest.raises(ValueError):
        NetworkConfig(distribution="cauchy")


async def test_tokens_arrive_complete_and_in_order_under_jitter():
    inner = ScriptedEndpoint(EndpointKind.SERVER, Script(ttft=0.001, tbt=0.0005, length=30))
    net = NetworkEndpoint(inner, NetworkConfig(2, 3, "exponential"), seed=3)
    got = [ev.index async for ev in net.stream(GenerationRequest("p", 30, request_id="r"))]
    assert got == list(range(30)) and net.kind is EndpointKind.SERVER


async def test_inner_failure_reaches_the_caller_after_the_tokens_before_it():
    inner = ScriptedEndpoint(EndpointKind.SERVER, Script(ttft=0.001, fail_after=4))
    net = NetworkEndpoint(inner, NetworkConfig(2, 1, "normal"))
    got = []
    with pytest.raises(EndpointFailedError):
        async for ev in net.stream(GenerationRequest("p", 30, request_id="r")):
            got.append(ev.index)
    assert got == [0, 1, 2, 3]


async def test_closing_the_wrapper_stops_the_inner_stream():
    inner = ScriptedEndpoint(EndpointKind.SERVER, Script(ttft=0.001, tbt=0.01, length=100))
    net = NetworkEndpoint(inner, NetworkConfig(1, 0))
    it = net.stream(GenerationRequest("p", 100, request_id="r"))
    assert (await it.__anext__()).index == 0
    await it.aclose()
    assert inner.closed_early == 1
