"""Coordinator: races, hedges, loser handling, migration and failover over scripted endpoints.

Timing margins are wide (10x or more) so that outcomes depend on the script, not on machine load.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace

import pytest
from fakes import Script, ScriptedEndpoint, cheap_device_profiles, cheap_server_profiles

from disco.device_agents.coordinator import (
    Coordinator,
    CoordinatorConfig,
    RequestStatus,
    StreamFailedError,
)
from disco.scheduler.endpoint import GenerationRequest
from disco.scheduler.migration import MigrationConfig
from disco.scheduler.types import EndpointKind, MigrationRule, Plan, Request

S, D = EndpointKind.SERVER, EndpointKind.DEVICE
SLOW, FAST = 0.4, 0.01


def make(server_script, device_script, profiles=cheap_device_profiles, **cfg):
    server = ScriptedEndpoint(S, *_tuple(server_script))
    device = ScriptedEndpoint(D, *_tuple(device_script))
    sp, dp = profiles()
    config = CoordinatorConfig(migration=MigrationConfig(rtt_s=0.005), **cfg)
    return Coordinator(server, device, sp, dp, config), server, device


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def request(output_tokens=None, prompt_tokens=16):
    return Request("r1", time.monotonic(), prompt_tokens, output_tokens)


GEN = GenerationRequest(prompt="hello there", max_tokens=100)


async def run(coord, plan, req=None, gen=GEN):
    ex = coord.execute(req or request(), gen, plan)
    events, outcome = await ex.collect()
    return ex, events, outcome


def assert_exactly_once(events, n):
    assert [e.index for e in events] == list(range(n))
    assert len({e.index for e in events}) == n


def text_of(events):
    return "".join(e.text for e in events)


async def test_server_wins_race_and_loser_is_cancelled():
    coord, server, device = make(Script(ttft=FAST), Script(ttft=SLOW))
    ex, events, o = await run(coord, Plan("r1", 0.0, 0.0))
    assert_exactly_once(events, 20)
    assert {e.source for e in events} == {S}
    assert o.first_token_from is S and o.error is None
    assert len(device.calls) == 1 and device.closed_early == 1
    assert o.device_output_tokens == 0
    assert o.device_prompt_tokens == 16  # the loser's prefill is charged (see the test below)
    assert o.server_output_tokens == 20 and o.server_prompt_tokens == 16
    assert o.server_cost > 0 and events[-1].finish_reason == "stop"
    assert ex.status is RequestStatus.FINISHED and not ex.cancelled


async def test_cut_short_device_prefill_is_charged_its_whole_prompt():
    # The core's one billing rule (disco.scheduler.billing): a leg that started is charged its
    # whole context, even a device prefill cut short by the server's first token.
    coord, server, device = make(Script(ttft=FAST), Script(ttft=SLOW))
    _, _, o = await run(coord, Plan("r1", 0.0, 0.0), request(prompt_tokens=100))
    assert o.first_token_from is S and len(device.calls) == 1 and device.closed_early == 1
    assert o.device_prompt_tokens == 100 and o.device_output_tokens == 0
    assert o.device_energy_j == pytest.approx(coord.device_profile.energy_j(100))


async def test_device_wins_race():
    coord, server, device = make(Script(ttft=SLOW), Script(ttft=FAST))
    _, events, o = await run(coord, Plan("r1", 0.0, 0.0))
    assert_exactly_once(events, 20)
    assert {e.source for e in events} == {D} and o.first_token_from is D
    assert server.closed_early == 1 and o.device_energy_j > 0
    assert o.server_output_tokens == 0 and o.server_prompt_tokens == 16  # a sent request is billed


async def test_hedge_not_triggered_when_first_token_came_in_time():
    coord, server, device = make(Script(ttft=FAST), Script(ttft=FAST))
    _, events, o = await run(coord, Plan("r1", 0.0, SLOW))
    assert len(events) == 20 and o.first_token_from is S
    assert device.calls == []  # never started
    assert o.server_started is True and o.device_started is False
    assert o.device_prompt_tokens == 0 and o.device_energy_j == 0


async def test_hedge_triggered_when_server_is_slow():
    coord, server, device = make(Script(ttft=2.0), Script(ttft=FAST))
    _, events, o = await run(coord, Plan("r1", 0.0, 0.05))
    assert_exactly_once(events, 20)
    assert len(device.calls) == 1 and o.first_token_from is D
    assert server.closed_early == 1 and o.server_started and o.device_started


async def test_kept_loser_keeps_running_and_is_charged():
    coord, server, device = make(Script(ttft=FAST, tbt=0.01), Script(ttft=0.05, tbt=0.001))
    _, events, o = await run(coord, Plan("r1", 0.0, 0.0, cancel_loser=False))
    assert {e.source for e in events} == {S}  # the loser's tokens never reach the user
    assert o.device_output_tokens > 0


async def test_migration_server_to_device_every_index_once():
    coord, server, device = make(Script(ttft=FAST), Script(ttft=FAST, length=40))
    server.scripts = (Script(ttft=FAST, length=40),)
    plan = Plan("r1", 0.0, None, migration=MigrationRule(target=D, from_kind=S))
    _, events, o = await run(coord, plan, request(output_tokens=40))
    assert_exactly_once(events, 40)
    k = o.migrated_at
    assert k is not None and 0 < k < 40
    assert [e.source for e in events] == [S] * k + [D] * (40 - k)
    # The device re-prefilled prompt + exactly the delivered text and continued at index k.
    (call,) = device.calls
    assert call.start_index == k and call.prefix == text_of(events[:k])
    assert text_of(events) == "".join(f"s{i} " for i in range(k)) + "".join(
        f"d{i} " for i in range(k, 40)
    )
    assert o.device_prompt_tokens == 16 + k and o.device_output_tokens == 40 - k
    assert o.server_output_tokens >= k  # speculative tokens during the switch are charged


async def test_migration_device_to_server_every_index_once():
    coord, server, device = make(
        Script(ttft=FAST, length=60), Script(ttft=FAST, length=60), profiles=cheap_server_profiles
    )
    plan = Plan("r1", None, 0.0, migration=MigrationRule(target=S, from_kind=D))
    _, events, o = await run(coord, plan, request(output_tokens=60))
    assert_exactly_once(events, 60)
    k = o.migrated_at
    assert k is not None
    assert [e.source for e in events] == [D] * k + [S] * (60 - k)
    assert server.calls[0].prefix == text_of(events[:k])


async def test_buffer_rule_holds_migration_while_the_reader_keeps_up():
    # The profile promises a fast source, but the real one is slower than the reader (30 tok/s):
    # the unread buffer never reaches B = r_c * t_m, so a switch would stall the reader.
    server, device = (
        ScriptedEndpoint(S, Script(ttft=FAST, tbt=0.04, length=15)),
        ScriptedEndpoint(D),
    )
    sp, dp = cheap_device_profiles()
    cfg = CoordinatorConfig(
        migration=MigrationConfig(rtt_s=0.005, read_tps=30.0, min_remaining_tokens=1)
    )
    coord = Coordinator(server, device, sp, dp, cfg)
    plan = Plan("r1", 0.0, None, migration=MigrationRule(target=D, from_kind=S))
    _, events, o = await run(coord, plan, request(output_tokens=15))
    assert_exactly_once(events, 15)
    assert o.migrated_at is None and device.calls == []


async def test_a_target_slower_than_the_buffer_is_abandoned_without_a_stall():
    # A fast reader (50 tok/s) drains the buffer in ~0.1 s; the device needs 0.5 s to start.
    server = ScriptedEndpoint(S, Script(ttft=FAST, length=100))
    device = ScriptedEndpoint(D, Script(ttft=0.5))
    sp, dp = cheap_device_profiles()
    cfg = CoordinatorConfig(migration=MigrationConfig(rtt_s=0.005, read_tps=50.0))
    coord = Coordinator(server, device, sp, dp, cfg)
    plan = Plan("r1", 0.0, None, migration=MigrationRule(target=D, from_kind=S))
    ex, events, o = await run(coord, plan, request(output_tokens=100))
    assert_exactly_once(events, 100)
    assert {e.source for e in events} == {S} and o.migrated_at is None
    assert ex.migration_abandoned and len(device.calls) == 1 and device.closed_early == 1


async def test_no_migration_when_rule_does_not_match_winner():
    coord, server, device = make(Script(ttft=FAST), Script(ttft=SLOW))
    plan = Plan("r1", 0.0, 0.0, migration=MigrationRule(target=S, from_kind=D))
    _, events, o = await run(coord, plan, request(output_tokens=20))
    assert o.migrated_at is None and {e.source for e in events} == {S}


@pytest.mark.parametrize("dying", [S, D])
async def test_failover_mid_stream_loses_and_repeats_nothing(dying):
    dies = Script(ttft=FAST, fail_after=7)
    ok = Script(ttft=SLOW)
    # The dying side wins the race, the other side is only used for failover.
    coord, server, device = make(dies if dying is S else ok, ok if dying is S else dies)
    plan = Plan("r1", 0.0 if dying is S else None, 0.0 if dying is D else None)
    ex, events, o = await run(coord, plan)
    assert_exactly_once(events, 20)
    assert [e.source for e in events] == [dying] * 7 + [dying.other] * 13
    survivor = device if dying is S else server
    assert survivor.calls[-1].start_index == 7
    assert survivor.calls[-1].prefix == text_of(events[:7])
    assert o.error is None and ex.failovers == 1 and len(ex.failures) == 1


async def test_failure_before_first_token_starts_the_hedge_at_once():
    coord, server, device = make(Script(ttft=FAST, fail_after=0), Script(ttft=FAST))
    _, events, o = await run(coord, Plan("r1", 0.0, 30.0))  # a hedge far in the future
    assert_exactly_once(events, 20)
    assert o.first_token_from is D and len(device.calls) == 1


async def test_both_die_gives_a_clear_error():
    coord, server, device = make(Script(ttft=FAST, fail_after=5), Script(ttft=FAST, fail_after=3))
    ex = coord.execute(request(), GEN, Plan("r1", 0.0, None))
    got = []
    with pytest.raises(StreamFailedError) as err:
        async for ev in ex:
            got.append(ev)
    assert "both endpoints failed" in str(err.value) and len(err.value.causes) == 2
    assert ex.status is RequestStatus.FAILED
    assert_exactly_once(got, 8)  # what was delivered before the end stays valid
    o = ex.outcome
    assert o is not None and o.error and "both endpoints failed" in o.error
    assert len(o.token_times) == 8


async def test_failover_disabled_ends_with_error():
    coord, server, device = make(Script(ttft=FAST, fail_after=5), Script(), failover=False)
    ex = coord.execute(request(), GEN, Plan("r1", 0.0, None))
    with pytest.raises(StreamFailedError):
        await ex.collect()
    assert device.calls == [] and ex.outcome.error


async def test_migration_target_failure_keeps_the_source():
    coord, server, device = make(
        Script(ttft=FAST, length=40, tbt=0.005), Script(ttft=0.02, fail_after=0)
    )
    plan = Plan("r1", 0.0, None, migration=MigrationRule(target=D, from_kind=S))
    ex, events, o = await run(coord, plan, request(output_tokens=40))
    assert_exactly_once(events, 40)
    assert {e.source for e in events} == {S}
    assert len(device.calls) == 1 and o.migrated_at is None and o.error is None


async def test_source_failure_during_migration_hands_over_to_target():
    coord, server, device = make(
        Script(ttft=FAST, length=40, tbt=0.002, fail_after=9), Script(ttft=0.1, length=40)
    )
    plan = Plan("r1", 0.0, None, migration=MigrationRule(target=D, from_kind=S))
    _, events, o = await run(coord, plan, request(output_tokens=40))
    assert_exactly_once(events, 40)
    k = [e.source for e in events].index(D)
    assert [e.source for e in events] == [S] * k + [D] * (40 - k)
    assert device.calls[-1].start_index == k


async def test_source_failure_during_a_slow_migration_fails_over_to_the_target():
    # The switch starts at ~7 delivered tokens with ~6 unread: at 40 tok/s the switch deadline
    # (unread / read_tps) is ~0.15 s away. The source dies ~5 ms into the switch, and the
    # target needs 1.5 s to start, 10x the deadline: the deadline must not abandon the target,
    # which is now the failover target and the only endpoint left.
    server = ScriptedEndpoint(S, Script(ttft=FAST, length=40, tbt=0.002, fail_after=9))
    device = ScriptedEndpoint(D, Script(ttft=1.5, length=40))
    sp, dp = cheap_device_profiles()
    cfg = CoordinatorConfig(migration=MigrationConfig(rtt_s=0.005, read_tps=40.0))
    coord = Coordinator(server, device, sp, dp, cfg)
    plan = Plan("r1", 0.0, None, migration=MigrationRule(target=D, from_kind=S))
    ex, events, o = await run(coord, plan, request(output_tokens=40))
    assert_exactly_once(events, 40)
    assert o.error is None and events[-1].finish_reason == "stop"
    k = [e.source for e in events].index(D)
    assert 0 < k <= 9 and [e.source for e in events] == [S] * k + [D] * (40 - k)
    assert text_of(events[k:]) == "".join(f"d{i} " for i in range(k, 40))
    (call,) = device.calls  # the migration's stream took over; none was started again
    assert call.start_index == k and call.prefix == text_of(events[:k])
    assert ex.failovers == 1 and not ex.migration_abandoned and o.migrated_at is None
    assert len(ex.failures) == 1 and ex.failures[0].startswith("server: ")


async def test_a_stalled_stream_fails_over():
    coord, server, device = make(
        Script(ttft=FAST, stall_after=5), Script(ttft=FAST), stall_timeout_s=0.1
    )
    ex, events, o = await run(coord, Plan("r1", 0.0, None))
    assert_exactly_once(events, 20)
    assert [e.source for e in events] == [S] * 5 + [D] * 15
    assert "stalled" in ex.failures[0] and server.closed_early == 1


async def test_no_first_token_in_time_starts_the_hedge():
    coord, server, device = make(
        Script(stall_after=0), Script(ttft=FAST), first_token_timeout_s=0.1
    )
    ex, events, o = await run(coord, Plan("r1", 0.0, 30.0))
    assert_exactly_once(events, 20)
    assert o.first_token_from is D and "first token" in ex.failures[0]


async def test_silent_sole_stream_before_first_token_fails_over():
    coord, server, device = make(
        Script(stall_after=0), Script(ttft=FAST), first_token_timeout_s=0.1
    )
    ex, events, o = await run(coord, Plan("r1", 0.0, None))
    assert_exactly_once(events, 20)
    assert o.first_token_from is D and ex.failovers == 1


async def test_slow_but_steady_stream_is_not_a_stall():
    # 20 tokens 30 ms apart (0.6 s in all) outlast the 0.5 s stall limit, and no gap comes within
    # 10x of it: the limit applies per gap, not to the whole stream.
    coord, server, device = make(Script(ttft=FAST, tbt=0.03), Script(), stall_timeout_s=0.5)
    ex, events, o = await run(coord, Plan("r1", 0.0, None))
    assert {e.source for e in events} == {S} and ex.failures == [] and device.calls == []


async def test_cancelling_the_consumer_is_not_taken_for_a_stall():
    coord, server, device = make(
        Script(ttft=FAST, tbt=0.05, length=100), Script(), stall_timeout_s=0.5
    )
    ex = coord.execute(request(), GEN, Plan("r1", 0.0, None))
    got = []

    async def consume():
        async for ev in ex:
            got.append(ev)

    task = asyncio.get_running_loop().create_task(consume())
    while len(got) < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ex.cancelled and ex.failures == [] and device.calls == []


async def test_max_tokens_caps_the_stream():
    coord, *_ = make(Script(ttft=FAST), Script(ttft=SLOW))
    _, events, o = await run(coord, Plan("r1", 0.0, 0.0), gen=GenerationRequest("hi", 5))
    assert_exactly_once(events, 5)
    assert events[-1].finish_reason == "length"


async def test_client_going_away_stops_every_stream():
    coord, server, device = make(Script(ttft=FAST, tbt=0.01), Script(ttft=FAST, tbt=0.01))
    ex = coord.execute(request(), GEN, Plan("r1", 0.0, 0.0, cancel_loser=False))
    seen = 0
    async for _ in ex:
        seen += 1
        if seen == 3:
            break
    await ex.aclose()
    assert ex.outcome is not None and ex.outcome.error and "cancelled" in ex.outcome.error
    assert ex.status is RequestStatus.CANCELLED and ex.cancelled
    assert server.closed_early + device.closed_early == 2


async def test_missing_endpoint_fails_over_to_the_present_one():
    sp, dp = cheap_device_profiles()
    device = ScriptedEndpoint(D, Script(ttft=FAST))
    coord = Coordinator(None, device, sp, dp)
    _, events, o = await run(coord, Plan("r1", 0.0, None))
    assert_exactly_once(events, 20)
    assert o.first_token_from is D and {e.source for e in events} == {D}


@pytest.mark.parametrize("seed", range(12))
async def test_random_scripts_never_lose_or_repeat_a_token(seed):
    rng = random.Random(seed)

    def script():
        return Script(
            ttft=rng.choice([0.002, 0.01, 0.03]),
            tbt=rng.choice([0.001, 0.003]),
            length=30,
            fail_after=rng.choice([None, None, 0, 3, 12]),
        )

    coord, *_ = make((script(), script()), (script(), script()))
    rule = rng.choice([None, MigrationRule(D, S), MigrationRule(S, D)])
    starts = rng.choice([(0.0, 0.0), (0.0, 0.02), (0.02, 0.0), (0.0, None), (None, 0.0)])
    plan = Plan("r1", *starts, cancel_loser=rng.random() < 0.7, migration=rule)
    ex = coord.execute(request(output_tokens=30), GEN, plan)
    got = []
    try:
        async for ev in ex:
            got.append(ev)
    except StreamFailedError:
        assert ex.outcome.error
    else:
        assert len(got) == 30 and ex.outcome.error is None
    assert [e.index for e in got] == list(range(len(got)))
    # Each token's text names the endpoint that produced it: the tag must match its source.
    assert [e.text for e in got] == [f"{e.source.value[0]}{e.index} " for e in got]


# --- the same key cases against the emulated engine ------------------------------------------
def emulated(
    server_ttft, device_base, scale=0.02, server_fail=None, device_fail=None, server_tbt=None
):
    from disco.device_agents.engines.emulated import EmulatedEndpoint

    sp, dp = cheap_device_profiles()
    sp = replace(sp, ttft_samples=(server_ttft,), ttft_mixture=())
    if server_tbt is not None:
        sp = replace(sp, tbt_s=server_tbt)
    dp = replace(dp, ttft_base_s=device_base)
    server = EmulatedEndpoint(sp, seed=1, time_scale=scale, fail_after_tokens=server_fail)
    device = EmulatedEndpoint(dp, seed=2, time_scale=scale, fail_after_tokens=device_fail)
    config = CoordinatorConfig(migration=MigrationConfig(rtt_s=0.005))
    return Coordinator(server, device, sp, dp, config), server, device


@pytest.mark.parametrize(("server_ttft", "device_base", "winner"), [(0.1, 5.0, S), (5.0, 0.1, D)])
async def test_emulated_race_is_won_by_the_faster_side(server_ttft, device_base, winner):
    coord, server, device = emulated(server_ttft, device_base)
    _, events, o = await run(coord, Plan("r1", 0.0, 0.0), gen=GenerationRequest("hi", 30))
    assert_exactly_once(events, 30)
    assert o.first_token_from is winner and {e.source for e in events} == {winner}
    loser = device if winner is S else server
    assert loser.stats.cancelled == 1


async def test_emulated_migration_server_to_device():
    # Real time. The switch starts at a few tokens; the device's first token comes ~25 ms later,
    # while the 20 ms/token source needs over 1 s more to finish and the switch deadline
    # (unread / read_tps) is ~0.4 s away: the target wins by 10x or more, so the switch happens.
    coord, server, device = emulated(0.05, 0.02, scale=1.0, server_tbt=0.02)
    plan = Plan("r1", 0.0, None, migration=MigrationRule(target=D, from_kind=S))
    _, events, o = await run(coord, plan, request(output_tokens=60), GenerationRequest("hi", 60))
    assert_exactly_once(events, 60)
    k = o.migrated_at
    assert k is not None and [e.source for e in events] == [S] * k + [D] * (60 - k)
    assert [e.text for e in events[k:]] == [device.token_text(i) for i in range(k, 60)]
    assert [e.text for e in events[:k]] == [server.token_text(i) for i in range(k)]


@pytest.mark.parametrize("dying", [S, D])
async def test_emulated_failover(dying):
    coord, server, device = emulated(
        0.1, 0.1, server_fail=6 if dying is S else None, device_fail=6 if dying is D else None
    )
    plan = Plan("r1", 0.0 if dying is S else None, 0.0 if dying is D else None)
    ex, events, o = await run(coord, plan, gen=GenerationRequest("hi", 30))
    assert_exactly_once(events, 30)
    assert [e.source for e in events] == [dying] * 6 + [dying.other] * 24
    assert ex.failovers == 1 and o.error is None


async def test_emulated_both_die():
    coord, *_ = emulated(0.1, 0.1, server_fail=4, device_fail=3)
    ex = coord.execute(request(), GenerationRequest("hi", 30), Plan("r1", 0.0, None))
    with pytest.raises(StreamFailedError):
        await ex.collect()
    assert ex.outcome.error and len(ex.outcome.token_times) == 7
