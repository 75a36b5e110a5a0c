"""The batching engine: a continuous-batching replica model driven in real time.

Timing assertions are orderings with margins, never millisecond exact: the event loop adds jitter
and the driver's steps start late when a sleep overshoots.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import numpy as np
import pytest

from disco.device_agents.engines import create_endpoint
from disco.device_agents.engines.batching import BatchingEndpoint
from disco.device_agents.engines.emulated import EmulatedEndpoint
from disco.scheduler.batching import Replica, ServerPreset, StepModel
from disco.scheduler.endpoint import (
    ENDPOINTS,
    EndpointFailedError,
    GenerationRequest,
    InvalidRequestError,
)
from disco.scheduler.types import EndpointKind, TokenEvent

STEP = StepModel(base_s=0.002, prefill_token_s=2e-5, decode_seq_s=5e-4)
FAST = ServerPreset("test-fast", STEP, kv_tokens=16384, max_batched_tokens=2048, max_num_seqs=64)
PROMPT = "Explain continuous batching to a reader who has never seen a GPU."


def req(max_tokens: int, prompt_tokens: int = 200, **kw) -> GenerationRequest:
    return GenerationRequest(PROMPT, max_tokens, prompt_tokens_hint=prompt_tokens, **kw)


async def collect(ep: BatchingEndpoint, r: GenerationRequest) -> tuple[list[TokenEvent], float]:
    """All events and the TTFT seen from the call (first token time minus submit time)."""
    t = time.monotonic()
    events = [ev async for ev in ep.stream(r)]
    return events, events[0].time - t


async def test_one_stream_indices_and_ttft():
    ep = BatchingEndpoint(FAST, seed=1)
    events, ttft = await collect(ep, req(12, prompt_tokens=200))
    assert [e.index for e in events] == list(range(12))
    assert [e.finish_reason for e in events] == [None] * 11 + ["length"]
    assert all(e.source is EndpointKind.SERVER for e in events)
    assert [e.text for e in events] == [
        EmulatedEndpoint("gpt-4o-mini", seed=1).token_text(i) for i in range(12)
    ]
    prefill = FAST.unloaded_ttft(200)  # 6 ms: one step of 200 prompt tokens
    assert 0.8 * prefill <= ttft <= prefill + 0.05
    state = ep.replica_state()
    assert state["queue"] == state["running"] == state["kv_used"] == 0
    assert state["steps"] == 12 and ep.stats.completed == 1 and ep.stats.active == 0
    await ep.close()


async def test_ttft_grows_with_load_and_the_queue_drains():
    ep = BatchingEndpoint(FAST)
    _, alone = await collect(ep, req(20, request_id="solo"))
    results = await asyncio.gather(*(collect(ep, req(20, request_id=f"r{i}")) for i in range(40)))
    loaded = statistics.mean(t for _, t in results)
    # 40 x 200 prompt tokens take 4 chunked-prefill steps of 2,048 tokens: later ones wait.
    assert loaded > 2 * alone
    assert all(len(evs) == 20 for evs, _ in results)
    state = ep.replica_state()
    assert state["queue"] == 0 and state["running"] == 0 and ep.stats.active == 0
    samples = ep.samples()
    assert max(q for _, q, _, _ in samples) > 0 and max(r for _, _, r, _ in samples) >= 40
    assert samples[-1][1:3] == (0, 0)  # the replica went idle
    times = [t for t, *_ in samples]
    assert times == sorted(times) and times[-1] <= time.monotonic()
    await ep.close()


async def test_streams_share_one_batch_clock():
    ep = BatchingEndpoint(FAST)
    a = asyncio.create_task(collect(ep, req(40, request_id="a")))
    await asyncio.sleep(0.01)  # b joins while a is decoding
    b_events, _ = await collect(ep, req(20, request_id="b"))
    a_events, _ = await a
    a_times = np.array([e.time for e in a_events])
    # Every token of b came out of a step that also gave a a token (a outlives b).
    gaps = [float(np.min(np.abs(a_times - e.time))) for e in b_events[1:]]
    assert sum(g < 2e-4 for g in gaps) >= 0.9 * len(gaps)
    await ep.close()


async def test_cancel_aborts_in_the_replica():
    ep = BatchingEndpoint(FAST)
    other = asyncio.create_task(collect(ep, req(200, request_id="other")))
    it = ep.stream(req(200, request_id="cancelled"))
    seen = [await anext(it) for _ in range(5)]
    assert ep.replica_state()["running"] == 2
    await it.aclose()
    assert ep.replica_state()["running"] == 1  # out of the batch at once, not at its next step
    with pytest.raises(StopAsyncIteration):
        await anext(it)
    assert [e.index for e in seen] == list(range(5)) and ep.stats.cancelled == 1
    # Cancelling the consumer task aborts too.
    task = asyncio.create_task(collect(ep, req(200, request_id="task")))
    deadline = time.monotonic() + 10
    while ep.replica_state()["running"] < 2:  # wait until it is in the batch, not a fixed time
        assert time.monotonic() < deadline, "the stream never joined the batch"
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ep.replica_state()["running"] == 1 and ep.stats.cancelled == 2
    events, _ = await other
    assert len(events) == 200 and ep.stats.active == 0
    await ep.close()


async def test_resume_from_prefix_hits_the_prefix_cache():
    ep = BatchingEndpoint(FAST, seed=3)
    full, _ = await collect(ep, req(10, prompt_tokens=64, request_id="r1"))
    assert ep.replica_state()["cache_hit_tokens"] == 0
    k = 4
    prefix = "".join(e.text for e in full[:k])
    resumed, _ = await collect(
        ep, req(6, prompt_tokens=64, request_id="r1", prefix=prefix, start_index=k)
    )
    assert [e.index for e in resumed] == list(range(k, 10))
    assert [e.text for e in resumed] == [e.text for e in full[k:]]
    assert resumed[-1].finish_reason == "length"
    assert ep.replica_state()["cache_hit_tokens"] == 64  # the prompt: 4 whole 16-token blocks
    await ep.close()


def model_ttfts(preset: ServerPreset, arrivals, prompts, outs) -> np.ndarray:
    """TTFTs of the pure model in virtual time: what the live engine should reproduce."""
    rep = Replica(preset)
    t, i, n = 0.0, 0, len(arrivals)
    first: dict[str, float] = {}
    while i < n or not rep.idle:
        if rep.idle:
            t = max(t, arrivals[i])
        while i < n and arrivals[i] <= t:
            rep.submit(str(i), int(prompts[i]), int(outs[i]), float(arrivals[i]))
            i += 1
        step = rep.next_step(t)
        assert step is not None
        for em in rep.finish(step):
            if em.first_index == 0:
                first[em.seq.id] = float(em.times[0])
        t = step.end
    return np.array([first[str(k)] - arrivals[k] for k in range(n)])


async def test_live_engine_matches_the_model():
    # Model steps of 10+ ms at time_scale 0.5: 5+ ms real, against the ~1 ms each live step
    # runs late (timer rounding, the loop's other work); a moderate load (median TTFT ~1.3x
    # unloaded), since near saturation queueing amplifies that lateness. Measured: live/model
    # median 1.05-1.17 on 2 busy cores.
    preset = ServerPreset(
        "cmp",
        StepModel(base_s=0.01, prefill_token_s=1e-4, decode_seq_s=1e-3),
        kv_tokens=32768,
        max_batched_tokens=512,
        max_num_seqs=8,
    )
    scale = 0.5
    rng = np.random.default_rng(1)
    arrivals = np.cumsum(rng.exponential(1 / 8, 60))
    arrivals -= arrivals[0]
    prompts, outs = rng.integers(100, 400, 60), rng.integers(10, 40, 60)
    expected = model_ttfts(preset, arrivals, prompts, outs)

    ep = BatchingEndpoint(preset, time_scale=scale)
    t0 = time.monotonic() + 0.05

    async def one(i: int) -> float:
        await asyncio.sleep(t0 + arrivals[i] * scale - time.monotonic())
        r = GenerationRequest(
            PROMPT, int(outs[i]), request_id=str(i), prompt_tokens_hint=int(prompts[i])
        )
        _, ttft = await collect(ep, r)
        return ttft / scale  # back to model seconds

    live = np.array(await asyncio.gather(*(one(i) for i in range(60))))
    want, got = float(np.median(expected)), float(np.median(live))
    assert want > 1.2 * preset.unloaded_ttft(float(np.median(prompts)))  # load matters here
    assert abs(got - want) <= 0.25 * want + 0.005, (want, got)
    await ep.close()


async def test_fault_injection_and_close():
    ep = BatchingEndpoint(FAST, fail_after_tokens=3)
    got = []
    with pytest.raises(EndpointFailedError, match="after 3 tokens"):
        async for ev in ep.stream(req(10)):
            got.append(ev.index)
    assert got == [0, 1, 2] and ep.stats.failed == 1 and ep.replica_state()["running"] == 0
    early = BatchingEndpoint(FAST, fail_after_tokens=0)
    with pytest.raises(EndpointFailedError):
        await anext(early.stream(req(10)))
    assert early.replica_state()["steps"] == 0
    await early.close()

    stall = BatchingEndpoint(FAST, stall_after_tokens=2)
    it = stall.stream(req(10))
    assert [(await anext(it)).index for _ in range(2)] == [0, 1]
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(anext(it), 0.1)
    assert stall.replica_state()["running"] == 0  # a stalled stream holds no batch slot
    await it.aclose()
    assert stall.stats.active == 0 and stall.stats.cancelled == 1

    it = ep.stream(req(100, request_id="open"))
    await anext(it)
    await ep.close()
    with pytest.raises(EndpointFailedError, match="closed"):
        await anext(it)
    with pytest.raises(EndpointFailedError, match="closed"):
        await anext(ep.stream(req(5)))
    await stall.close()


async def test_bad_requests_are_refused_before_any_token():
    ep = BatchingEndpoint(FAST, context_tokens=1000)
    for bad, needle in (
        (req(0), "max_tokens"),
        (req(900, prompt_tokens=200), "context window"),
        (req(10, prompt_tokens=20_000), "context window"),
    ):
        with pytest.raises(InvalidRequestError, match=needle):
            await anext(ep.stream(bad))
    assert ep.stats.started == 0 and ep.replica_state()["steps"] == 0
    with pytest.raises(ValueError, match="time_scale"):
        BatchingEndpoint(FAST, time_scale=0)
    await ep.close()


async def test_a_thousand_concurrent_streams():
    preset = ServerPreset(
        "wide", STEP, kv_tokens=1 << 20, max_batched_tokens=8192, max_num_seqs=512
    )
    ep = BatchingEndpoint(preset, time_scale=0.1)
    results = await asyncio.gather(
        *(collect(ep, req(20, prompt_tokens=50, request_id=str(i))) for i in range(1000))
    )
    assert all([e.index for e in evs] == list(range(20)) for evs, _ in results)
    assert ep.stats.completed == 1000 and ep.stats.tokens == 20_000
    assert ep.replica_state()["running"] == 0
    await ep.close()


async def test_registry_picks_the_engine_by_name():
    by_kwarg = ENDPOINTS.get("emulated")(preset=FAST, time_scale=0.5)
    assert isinstance(by_kwarg, BatchingEndpoint) and by_kwarg.time_scale == 0.5
    by_name = create_endpoint("emulated", profile="llamacpp-gemma3-270m-cpu2", seed=2)
    assert isinstance(by_name, BatchingEndpoint) and by_name.preset.max_num_seqs == 1
    assert isinstance(
        create_endpoint("emulated", preset="llamacpp-gemma3-270m-cpu2"), BatchingEndpoint
    )
    assert isinstance(create_endpoint("emulated", profile="gpt-4o-mini"), EmulatedEndpoint)
    with pytest.raises(ValueError, match="not both"):
        create_endpoint("emulated", preset=FAST, profile="gpt-4o-mini")
