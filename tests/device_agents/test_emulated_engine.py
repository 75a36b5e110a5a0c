"""The emulated engine: profile replay, determinism, fault injection, many streams at once."""

from __future__ import annotations

import asyncio

import pytest

from disco.device_agents.engines.emulated import EmulatedEndpoint, resolve_profile
from disco.scheduler.endpoint import EndpointFailedError, GenerationRequest
from disco.scheduler.profiles import DeviceProfile, ServerProfile, save_profile
from disco.scheduler.types import EndpointKind

FAST = 0.01  # time_scale: replay 100x faster than real time


async def run(ep: EmulatedEndpoint, req: GenerationRequest) -> list:
    return [ev async for ev in ep.stream(req)]


def test_kind_follows_profile_and_names_resolve(tmp_path):
    assert EmulatedEndpoint("gpt-4o-mini").kind is EndpointKind.SERVER
    assert EmulatedEndpoint("xiaomi14-qwen0.5b").kind is EndpointKind.DEVICE
    path = tmp_path / "dev.json"
    save_profile(resolve_profile("pixel7pro-bloom1.1b"), path, measured=False)
    assert isinstance(resolve_profile(str(path)), DeviceProfile)
    with pytest.raises(ValueError, match="unknown profile 'nope'"):
        EmulatedEndpoint("nope")


def test_same_seed_same_timeline_other_seed_differs():
    req = GenerationRequest("hello there", 20, request_id="r1")
    a, b = EmulatedEndpoint("gpt-4o-mini", seed=1), EmulatedEndpoint("gpt-4o-mini", seed=1)
    c = EmulatedEndpoint("gpt-4o-mini", seed=2)
    ta, tb, tc = (e._timeline(req, 10) for e in (a, b, c))
    assert ta[0] == tb[0] and list(ta[1]) == list(tb[1])
    assert ta[0] != tc[0]


def test_device_ttft_grows_with_prompt_length():
    ep = EmulatedEndpoint("pixel7pro-bloom1.1b")
    short = ep._timeline(GenerationRequest("x", 4), 50)[0]
    long = ep._timeline(GenerationRequest("x", 4), 500)[0]
    assert long - short == pytest.approx(450 / ep.profile.prefill_tps)


async def test_resume_continues_placeholder_text():
    ep = EmulatedEndpoint("gpt-4o-mini", time_scale=FAST)
    full = await run(ep, GenerationRequest("p", 12, request_id="x"))
    rest = await run(ep, GenerationRequest("p", 7, start_index=5, request_id="x"))
    assert [e.text for e in rest] == [e.text for e in full[5:]]
    assert [e.index for e in rest] == list(range(5, 12))


async def test_fail_after_tokens_raises_mid_stream():
    ep = EmulatedEndpoint("gpt-4o-mini", time_scale=FAST, fail_after_tokens=3)
    got = []
    with pytest.raises(EndpointFailedError, match="after 3 tokens"):
        async for ev in ep.stream(GenerationRequest("p", 10)):
            got.append(ev)
    assert [e.index for e in got] == [0, 1, 2]
    assert ep.stats.failed == 1 and ep.stats.active == 0


async def test_fail_before_first_token():
    ep = EmulatedEndpoint("gpt-4o-mini", time_scale=FAST, fail_after_tokens=0)
    with pytest.raises(EndpointFailedError):
        await anext(ep.stream(GenerationRequest("p", 10)))


async def test_stall_hangs_until_cancelled():
    ep = EmulatedEndpoint("gpt-4o-mini", time_scale=FAST, stall_after_tokens=2)
    it = ep.stream(GenerationRequest("p", 10))
    assert [(await anext(it)).index for _ in range(2)] == [0, 1]
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(anext(it), 0.2)
    await it.aclose()
    assert ep.stats.active == 0 and ep.stats.cancelled == 1


async def test_a_thousand_concurrent_streams():
    prof = ServerProfile("flat", prices=resolve_profile("gpt-4o-mini").prices, tbt_s=0.02,
                         ttft_samples=(0.05, 0.1, 0.2))  # fmt: skip
    ep = EmulatedEndpoint(prof, seed=3, time_scale=0.1)
    reqs = [GenerationRequest("hello", 20, request_id=str(i)) for i in range(1000)]
    results = await asyncio.gather(*(run(ep, r) for r in reqs))
    assert all(len(r) == 20 and r[-1].finish_reason == "length" for r in results)
    assert ep.stats.completed == 1000 and ep.stats.active == 0
    assert all([e.index for e in r] == list(range(20)) for r in results)


def test_bad_construction_is_refused():
    with pytest.raises(ValueError, match="fail_after_tokens"):
        EmulatedEndpoint("gpt-4o-mini", fail_after_tokens=-1)
    with pytest.raises(ValueError, match="time_scale"):
        EmulatedEndpoint("gpt-4o-mini", time_scale=-1)


@pytest.mark.parametrize("model", ["gemma3-270m", "smollm2-135m"])
async def test_committed_llamacpp_profiles_replay(model):
    from importlib.resources import files

    path = files("disco.scheduler.data") / f"profile-llamacpp-{model}.json"
    ep = EmulatedEndpoint(str(path), time_scale=FAST)
    assert ep.kind is EndpointKind.DEVICE and ep.profile.prefill_tps > 0
    events = await run(ep, GenerationRequest("hello", 3))
    assert [e.index for e in events] == [0, 1, 2]
