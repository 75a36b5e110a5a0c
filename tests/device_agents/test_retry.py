"""Retries (issue 15, found by `disco bench chaos`): two independent faults on one request (its
server stream stalled while the device's engine was restarting) must not lose it while both
endpoints are back a moment later. Once both endpoints have failed, the one that failed first
starts again after a back-off, from the delivered boundary, up to ``retries`` times."""

from __future__ import annotations

import time

import pytest
from fakes import Script, ScriptedEndpoint, cheap_device_profiles
from test_request_state import Clock, Launcher, feed, tok

from disco.device_agents.config import AgentConfig
from disco.device_agents.coordinator import Coordinator, CoordinatorConfig, StreamFailedError
from disco.device_agents.request_state import RequestState, RequestStatus
from disco.scheduler.endpoint import EndpointFailedError, GenerationRequest
from disco.scheduler.types import EndpointKind, Plan, Request

S, D = EndpointKind.SERVER, EndpointKind.DEVICE
St = RequestStatus
GEN = GenerationRequest("hello there", 30)


def machine(plan: Plan, **cfg):
    sp, dp = cheap_device_profiles()
    coord = Coordinator(ScriptedEndpoint(S), ScriptedEndpoint(D), sp, dp,
                        CoordinatorConfig(stall_timeout_s=None, **cfg))  # fmt: skip
    clock, launcher = Clock(), Launcher()
    st = RequestState(coord, Request("r", clock.t, 16, 30), GEN, plan, launcher, clock)
    return st, launcher, clock


def test_after_tokens_the_first_failed_endpoint_resumes_from_the_boundary_after_a_backoff():
    st, launcher, clock = machine(Plan("r", 0.0, None), retries=1, retry_backoff_s=0.3)
    st.start_due()
    server = launcher.leg(S)
    feed(st, server, 0, 4)
    st.on_failure(server, EndpointFailedError("replica killed"))
    device = launcher.leg(D)
    feed(st, device, 4, 2)
    st.on_failure(device, EndpointFailedError("engine crashed"))
    assert st.status is St.FAILING_OVER and not st.done and st.retries == 1
    assert st.next_deadline() == pytest.approx(clock.t + 0.3)  # the back-off
    st.start_due()
    assert len(launcher.launched) == 2  # not before it
    clock.t += 0.3
    st.start_due()
    again = launcher.leg(S, 1)
    assert st.target is again and launcher.request_of(again).start_index == 6
    assert launcher.request_of(again).prefix == "s0 s1 s2 s3 d4 d5 "
    st.on_token(again, tok(again, 6))
    assert st.status is St.STREAMING and st.active is again and st.failovers == 2


def test_before_the_first_token_the_request_is_retried_too():
    st, launcher, clock = machine(Plan("r", 0.0, 0.0), retries=1, retry_backoff_s=0.1)
    st.start_due()
    st.on_failure(launcher.leg(D), EndpointFailedError("engine down"))
    st.on_failure(launcher.leg(S), EndpointFailedError("stalled"))
    assert st.status is St.WAITING_FIRST_TOKEN and set(st.pending) == {D}  # failed first
    clock.t += 0.1
    st.start_due()
    retry = launcher.leg(D, 1)
    assert launcher.request_of(retry).start_index == 0
    st.on_token(retry, tok(retry, 0))
    assert st.status is St.STREAMING and st.winner is D


def test_retries_run_out_and_the_request_fails_with_every_cause():
    st, launcher, clock = machine(Plan("r", 0.0, None), retries=1, retry_backoff_s=0.0)
    st.start_due()
    feed(st, launcher.leg(S), 0, 2)
    st.on_failure(launcher.leg(S), EndpointFailedError("a"))
    st.on_failure(launcher.leg(D), EndpointFailedError("b"))
    st.start_due()
    st.on_failure(launcher.leg(S, 1), EndpointFailedError("c"))
    assert st.status is St.FAILED and len(st.fatal.causes) == 3


def test_without_retries_both_failing_still_fails_at_once():
    st, launcher, _ = machine(Plan("r", 0.0, None))
    st.start_due()
    st.on_failure(launcher.leg(S), EndpointFailedError("a"))
    st.on_failure(launcher.leg(D), EndpointFailedError("b"))
    assert st.status is St.FAILED


async def test_end_to_end_a_stalled_server_and_a_restarting_device_still_finish():
    """The chaos run's lost request: the server stream never produces its first token (a hung
    replica) while the device's engine refuses (restarting); the device is back soon after."""
    server = ScriptedEndpoint(S, Script(ttft=0.005, stall_after=0))
    device = ScriptedEndpoint(D, Script(ttft=0.005, fail_after=0), Script(ttft=0.005, length=30))
    sp, dp = cheap_device_profiles()
    cfg = AgentConfig(first_token_timeout_ms=200, stall_timeout_ms=200).coordinator()
    assert cfg.retries == 2  # the agent's default
    coord = Coordinator(server, device, sp, dp, cfg)
    ex = coord.execute(Request("r", time.monotonic(), 16), GEN, Plan("r", 0.0, 0.0))
    events, outcome = await ex.collect()
    assert [e.index for e in events] == list(range(30)) and outcome.error is None
    assert {e.source for e in events} == {D} and len(device.calls) == 2


async def test_end_to_end_without_retries_that_request_is_lost():
    server = ScriptedEndpoint(S, Script(ttft=0.005, stall_after=0))
    device = ScriptedEndpoint(D, Script(ttft=0.005, fail_after=0), Script(ttft=0.005))
    sp, dp = cheap_device_profiles()
    cfg = CoordinatorConfig(first_token_timeout_s=0.2, stall_timeout_s=0.2)
    coord = Coordinator(server, device, sp, dp, cfg)
    ex = coord.execute(Request("r", time.monotonic(), 16), GEN, Plan("r", 0.0, 0.0))
    with pytest.raises(StreamFailedError):
        await ex.collect()


def test_bad_retry_settings_are_refused():
    with pytest.raises(ValueError):
        CoordinatorConfig(retries=-1)
    with pytest.raises(ValueError):
        AgentConfig(retries=-1)


def test_a_fleet_device_retries_as_an_agent_does():
    from disco.device_agents.config import FleetConfig
    from disco.device_agents.fleet import EmulatedFleet

    fleet = EmulatedFleet(FleetConfig(devices=1))
    assert fleet.agent("emu-0").coordinator.config.retries == AgentConfig().retries == 2


def test_disco_agent_takes_retries_from_a_flag(capsys):
    from disco.cluster.cli import build_parser, main

    base = ["agent", "--server", "http://127.0.0.1:9"]
    assert build_parser().parse_args(base).retries == 2
    assert build_parser().parse_args([*base, "--retries", "0"]).retries == 0
    assert main([*base, "--retries", "-1"]) == 2  # refused before anything starts
    assert "retries must be >= 0" in capsys.readouterr().err
