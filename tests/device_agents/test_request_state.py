"""The request state machine, one transition at a time: no event loop, a hand-moved clock, and a
launcher that only records what the machine starts and stops."""

from __future__ import annotations

import asyncio

import pytest
from fakes import ScriptedEndpoint, cheap_device_profiles

from disco.device_agents.billing import bill
from disco.device_agents.coordinator import Coordinator, CoordinatorConfig
from disco.device_agents.request_state import (
    Leg,
    RequestState,
    RequestStatus,
    StreamFailedError,
)
from disco.device_agents.watchdog import StallLimits, StallWatchdog
from disco.scheduler.endpoint import EndpointFailedError, GenerationRequest
from disco.scheduler.migration import MigrationConfig
from disco.scheduler.types import (
    EndpointKind,
    MigrationRule,
    Plan,
    Request,
    RequestOutcome,
    TokenEvent,
)

S, D = EndpointKind.SERVER, EndpointKind.DEVICE
St = RequestStatus
T0 = 100.0


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


class Launcher:
    """Records launches and stops; the test plays the streams."""

    def __init__(self) -> None:
        self.launched: list[tuple[Leg, GenerationRequest]] = []
        self.stopped: list[Leg] = []

    def launch(self, leg: Leg, request: GenerationRequest) -> None:
        self.launched.append((leg, request))

    def stop(self, leg: Leg) -> None:
        self.stopped.append(leg)

    def leg(self, kind: EndpointKind, nth: int = 0) -> Leg:
        return [leg for leg, _ in self.launched if leg.kind is kind][nth]

    def request_of(self, leg: Leg) -> GenerationRequest:
        return next(req for lg, req in self.launched if lg is leg)


def machine(plan: Plan, *, output_tokens=60, max_tokens=100, **cfg):
    sp, dp = cheap_device_profiles()
    cfg = {"migration": MigrationConfig(rtt_s=0.005), "stall_timeout_s": None} | cfg
    coord = Coordinator(ScriptedEndpoint(S), ScriptedEndpoint(D), sp, dp, CoordinatorConfig(**cfg))
    clock, launcher = Clock(), Launcher()
    request = Request("r", T0, 16, output_tokens)
    gen = GenerationRequest("hello", max_tokens)
    return RequestState(coord, request, gen, plan, launcher, clock), launcher, clock


def tok(leg: Leg, i: int, reason: str | None = None) -> TokenEvent:
    return TokenEvent(i, f"{leg.kind.value[0]}{i} ", 0.0, None, leg.kind, reason)


def feed(st: RequestState, leg: Leg, start: int, n: int) -> None:
    for i in range(start, start + n):
        st.on_token(leg, tok(leg, i))


def drain(st: RequestState) -> list[TokenEvent]:
    out, st.out[:] = list(st.out), []
    return out


def streaming(plan: Plan | None = None, delivered: int = 3, **kw):
    """A request whose server won and delivered ``delivered`` tokens."""
    st, launcher, clock = machine(plan or Plan("r", 0.0, None), **kw)
    st.start_due()
    server = launcher.leg(S)
    feed(st, server, 0, delivered)
    return st, launcher, clock, server


def test_planned_starts_wait_for_their_time():
    st, launcher, clock = machine(Plan("r", 0.0, 0.5))
    assert st.status is St.WAITING_FIRST_TOKEN and set(st.pending) == {S, D}
    st.start_due()
    assert [leg.kind for leg, _ in launcher.launched] == [S]
    assert st.next_deadline() == T0 + 0.5  # the hedge
    clock.t = T0 + 0.5
    st.start_due()
    assert [leg.kind for leg, _ in launcher.launched] == [S, D] and st.pending == {}


def test_first_token_starts_streaming_and_stops_the_loser():
    st, launcher, clock = machine(Plan("r", 0.0, 0.0))
    st.start_due()
    server, device = launcher.leg(S), launcher.leg(D)
    clock.t += 0.02
    st.on_token(device, tok(device, 0))
    assert st.status is St.STREAMING and st.winner is D and st.active is device
    assert launcher.stopped == [server] and not server.live
    (ev,) = drain(st)
    assert (ev.index, ev.source, ev.time) == (0, D, T0 + 0.02)
    st.on_token(server, tok(server, 0))  # a late token of the stopped loser changes nothing
    assert st.out == [] and st.active is device


def test_a_kept_loser_runs_on_and_its_tokens_never_reach_the_user():
    st, launcher, _ = machine(Plan("r", 0.0, 0.0, cancel_loser=False))
    st.start_due()
    server, device = launcher.leg(S), launcher.leg(D)
    feed(st, server, 0, 2)
    feed(st, device, 0, 5)
    assert launcher.stopped == [] and device.live and device.produced == 5
    assert [ev.source for ev in drain(st)] == [S, S]


def test_the_first_token_clears_hedges_not_yet_started():
    st, launcher, _ = machine(Plan("r", 0.0, 5.0))
    st.start_due()
    feed(st, launcher.leg(S), 0, 1)
    assert st.pending == {} and len(launcher.launched) == 1


def test_the_last_token_finishes():
    st, _, _, server = streaming(delivered=2)
    st.on_token(server, tok(server, 2, "stop"))
    assert st.status is St.FINISHED and st.done and st.finish_reason == "stop"
    assert drain(st)[-1].finish_reason == "stop"


def test_max_tokens_finishes_with_length():
    st, _, _, _ = streaming(delivered=4, max_tokens=4)
    assert st.status is St.FINISHED and st.finish_reason == "length"


def test_end_of_the_active_stream_finishes():
    st, _, _, server = streaming()
    st.on_end(server)
    assert st.status is St.FINISHED and st.finish_reason == "stop" and not server.live


def test_an_out_of_order_token_is_a_failure():
    st, launcher, _, server = streaming()
    st.on_token(server, tok(server, 7))
    assert "expected 3" in str(st.failures[0][1]) and st.status is St.FAILING_OVER


# --- migration ---------------------------------------------------------------------------------
MIG = Plan("r", 0.0, None, migration=MigrationRule(target=D, from_kind=S))


def test_migration_launches_once_the_planned_index_is_delivered():
    st, launcher, _ = machine(MIG)
    st.start_due()
    server = launcher.leg(S)
    feed(st, server, 0, 1)
    assert st.planned is not None and st.planned.target is D
    k = st.planned.at_index
    feed(st, server, 1, k - 2)
    assert st.status is St.STREAMING and len(launcher.launched) == 1  # one token short
    feed(st, server, k - 1, 1)
    # The clock stands still, so the reader has read one token: the buffer rule holds at once.
    assert st.status is St.MIGRATING and st.planned is None
    target = launcher.leg(D)
    assert st.target is target and target.start_index == k
    req = launcher.request_of(target)
    assert req.start_index == k and req.prefix == "".join(f"s{i} " for i in range(k))
    assert st.switch_deadline is not None and st.switch_deadline > T0


def test_the_buffer_rule_holds_a_migration_while_the_reader_keeps_up():
    st, launcher, clock = machine(MIG)
    st.start_due()
    server = launcher.leg(S)
    k = None
    for i in range(40):  # slower than the reader: the unread buffer stays empty
        st.on_token(server, tok(server, i))
        k = k or (st.planned and st.planned.at_index)
        clock.t += 1.5 / st.c.config.migration.read_tps
    assert k is not None and len(st.texts) > k
    assert st.status is St.STREAMING and len(launcher.launched) == 1


def migrating(delivered: int = 5, deadline: float = 0.2):
    st, launcher, clock, server = streaming(MIG, delivered)
    target = st.launch_migration(D, clock.t + deadline)
    assert st.status is St.MIGRATING and launcher.leg(D) is target
    return st, launcher, clock, server, target


def test_during_a_migration_the_source_tokens_are_held():
    st, _, _, server, _ = migrating()
    drain(st)
    feed(st, server, 5, 3)
    assert st.out == [] and [ev.index for ev in server.spec] == [5, 6, 7]


def test_the_target_first_token_switches_and_drops_the_held_tokens():
    st, launcher, _, server, target = migrating()
    drain(st)
    feed(st, server, 5, 3)
    st.on_token(target, tok(target, 5))
    assert st.status is St.STREAMING and st.active is target and st.target is None
    assert st.migrated_at == 5 and st.switch_deadline is None
    assert launcher.stopped == [server] and server.spec == []
    assert [(ev.index, ev.source) for ev in drain(st)] == [(5, D)]


def test_the_switch_is_abandoned_at_its_deadline_and_the_held_tokens_go_out():
    st, launcher, clock, server, target = migrating(deadline=0.2)
    drain(st)
    feed(st, server, 5, 3)
    assert st.next_deadline() == pytest.approx(clock.t + 0.2)
    clock.t += 0.1
    st.check_deadlines()
    assert st.status is St.MIGRATING  # not yet
    clock.t = st.switch_deadline
    st.check_deadlines()
    assert st.status is St.STREAMING and st.migration_abandoned and st.migrated_at is None
    assert launcher.stopped == [target] and st.active is server
    assert [(ev.index, ev.source) for ev in drain(st)] == [(5, S), (6, S), (7, S)]
    st.on_token(target, tok(target, 5))  # the stopped target's late token changes nothing
    assert st.out == [] and st.active is server


def test_a_failed_migration_target_keeps_the_source():
    st, launcher, _, server, target = migrating()
    drain(st)
    feed(st, server, 5, 2)
    st.on_failure(target, EndpointFailedError("target died"))
    assert st.status is St.STREAMING and not st.migration_abandoned
    assert [ev.index for ev in drain(st)] == [5, 6] and D in st.dead


def test_the_source_finishing_first_ends_the_migration():
    st, launcher, _, server, target = migrating()
    drain(st)
    st.on_token(server, tok(server, 5))
    st.on_token(server, tok(server, 6, "stop"))
    assert st.status is St.FINISHED and launcher.stopped == [target]
    assert [ev.index for ev in drain(st)] == [5, 6]


# --- failover ----------------------------------------------------------------------------------
def test_failure_of_the_active_stream_fails_over_from_the_delivered_boundary():
    st, launcher, _, server = streaming(delivered=3)
    st.on_failure(server, EndpointFailedError("replica killed"))
    assert st.status is St.FAILING_OVER and st.failovers == 1 and st.active is None
    target = launcher.leg(D)
    assert st.target is target and launcher.request_of(target).prefix == "s0 s1 s2 "
    assert launcher.request_of(target).start_index == 3
    st.on_token(target, tok(target, 3))
    assert st.status is St.STREAMING and st.active is target and st.migrated_at is None
    assert [ev.source for ev in drain(st)] == [S, S, S, D]


def test_source_failure_during_a_migration_hands_over_to_the_prefilling_target():
    st, launcher, clock, server, target = migrating(deadline=0.05)
    st.on_failure(server, EndpointFailedError("source died"))
    assert st.status is St.FAILING_OVER and st.target is target and len(launcher.launched) == 2
    assert st.switch_deadline is None
    clock.t += 1.0
    st.check_deadlines()  # no deadline can abandon the only endpoint left
    assert st.status is St.FAILING_OVER and not st.migration_abandoned
    st.on_token(target, tok(target, 5))
    assert st.status is St.STREAMING and st.migrated_at is None and st.failovers == 1


def test_failure_before_the_first_token_starts_the_hedge_at_once():
    st, launcher, _ = machine(Plan("r", 0.0, 30.0))
    st.start_due()
    st.on_failure(launcher.leg(S), EndpointFailedError("refused"))
    assert st.status is St.WAITING_FIRST_TOKEN and st.pending == {} and st.failovers == 0
    assert launcher.leg(D).start_index == 0


def test_a_stream_that_ends_without_a_token_failed():
    st, launcher, _ = machine(Plan("r", 0.0, None))
    st.start_due()
    st.on_end(launcher.leg(S))
    assert "without a token" in str(st.failures[0][1]) and st.failovers == 1
    assert launcher.leg(D).start_index == 0 and st.status is St.WAITING_FIRST_TOKEN


def test_a_silent_stream_stalls_at_its_deadline_and_fails_over():
    st, launcher, clock, server = streaming(delivered=2, stall_timeout_s=0.5)
    assert st.next_deadline() == pytest.approx(clock.t + 0.5)
    clock.t += 0.5
    st.check_deadlines()
    assert "stalled: no next token within 0.5 s" in str(st.failures[0][1])
    assert st.status is St.FAILING_OVER and launcher.leg(D).start_index == 2


def test_both_endpoints_failing_fails_the_request():
    st, launcher, _, server = streaming(delivered=2)
    st.on_failure(server, EndpointFailedError("a"))
    st.on_failure(launcher.leg(D), EndpointFailedError("b"))
    assert st.status is St.FAILED and st.done
    assert isinstance(st.fatal, StreamFailedError) and len(st.fatal.causes) == 2
    assert "both endpoints failed" in str(st.fatal)


def test_failover_disabled_fails_at_once():
    st, launcher, _, server = streaming(failover=False)
    st.on_failure(server, EndpointFailedError("a"))
    assert st.status is St.FAILED and len(launcher.launched) == 1


# --- cancel and the outcome --------------------------------------------------------------------
def test_cancel_ends_a_live_request_and_the_outcome_says_so():
    st, launcher, _, server = streaming(delivered=3)
    st.cancel()
    st.stop_all()
    assert st.status is St.CANCELLED and launcher.stopped == [server]
    o = st.outcome()
    assert o.error == "cancelled before the end of the stream" and len(o.token_times) == 3


def test_cancel_after_a_failure_keeps_the_failure():
    st, launcher, _, server = streaming(failover=False)
    st.on_failure(server, EndpointFailedError("a"))
    st.cancel()
    assert st.status is St.FAILED and "endpoint failed" in st.outcome().error


def test_outcome_bills_every_stream_the_loser_included():
    st, launcher, _ = machine(Plan("r", 0.0, 0.0, cancel_loser=False))
    st.start_due()
    feed(st, launcher.leg(S), 0, 4)
    feed(st, launcher.leg(D), 0, 2)
    o = st.outcome()
    assert (o.server_prompt_tokens, o.server_output_tokens) == (16, 4)
    assert (o.device_prompt_tokens, o.device_output_tokens) == (16, 2)
    assert o.server_cost == pytest.approx(st.c.server_profile.prices.cost(16, 4))
    assert o.device_energy_j == pytest.approx(st.c.device_profile.energy_j(18))
    assert o.first_token_from is S and o.server_started and o.device_started


def test_bill_charges_a_resumed_stream_its_prefix_too():
    sp, dp = cheap_device_profiles()
    legs = [Leg(S, 0, 16, 0.0, produced=5), Leg(D, 5, 21, 0.1, produced=10)]
    o = RequestOutcome("r", 0.0, 16)
    bill(o, legs, sp, dp)
    assert (o.server_prompt_tokens, o.device_prompt_tokens) == (16, 21)
    assert (o.server_output_tokens, o.device_output_tokens) == (5, 10)


# --- the watchdog ------------------------------------------------------------------------------
@pytest.mark.skipif(not StallWatchdog.SUPPORTED, reason="needs Task.uncancel (Python 3.11+)")
async def test_watchdog_turns_silence_into_an_absorbed_cancellation():
    loop = asyncio.get_running_loop()
    leg = Leg(S, 0, 16, loop.time(), produced=1, last_at=loop.time())
    wd = StallWatchdog(StallLimits(None, 0.05), loop.time)
    wd.watch(leg)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.Event().wait()  # a stream that never speaks
    assert wd.absorb() and not wd.absorb()  # taken back once: the task is not cancelled
    wd.release()
    wd.close()


@pytest.mark.skipif(not StallWatchdog.SUPPORTED, reason="needs Task.uncancel (Python 3.11+)")
async def test_watchdog_rearms_while_tokens_keep_coming():
    loop = asyncio.get_running_loop()
    leg = Leg(S, 0, 16, loop.time(), produced=1, last_at=loop.time())
    wd = StallWatchdog(StallLimits(None, 0.05), loop.time)
    for _ in range(6):  # 6 x 20 ms > the 50 ms limit, but no gap reaches it
        wd.watch(leg)
        await asyncio.sleep(0.02)
        leg.last_at = loop.time()
        wd.release()
    assert not wd.absorb()
    wd.close()
