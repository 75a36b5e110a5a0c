"""The vLLM engine on a GPU: per-token streaming, resume via prompt + prefix, abort on cancel,
and the engine inside a Ray Serve replica. Skipped without a CUDA GPU (tests/conftest.py).

The engine-independent promises are in tests/device_agents/test_engines_contract.py (its
``vllm`` case); these add what only vLLM has: token ids from the engine's own tokenizer, the
abort reaching the engine, batching of concurrent streams.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
# One loop for the module: vLLM binds its output task to the loop it first runs on.
module_loop = pytest.mark.asyncio(loop_scope="module")

sys.path.insert(0, str(Path(__file__).parents[1] / "device_agents"))  # the shared GPU helper

PROMPT = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in Europe"
)


@pytest.fixture(scope="module")
def engine():
    from gpu_vllm import make_vllm_endpoint

    ep = make_vllm_endpoint()
    yield ep
    asyncio.run(ep.close())


async def collect(ep, req):
    return [ev async for ev in ep.stream(req)]


@module_loop
async def test_token_ids_match_the_text(engine):
    from disco.scheduler.endpoint import GenerationRequest

    events = await collect(engine, GenerationRequest(PROMPT, 16))
    assert [e.index for e in events] == list(range(len(events)))
    assert all(e.token_id is not None for e in events)
    tok = engine._tokenizer
    assert (
        tok.decode([e.token_id for e in events]).strip() == "".join(e.text for e in events).strip()
    )


@module_loop
async def test_resume_starts_from_the_prefix_tokens(engine):
    from disco.scheduler.endpoint import GenerationRequest

    full = await collect(engine, GenerationRequest(PROMPT, 12))
    prefix = "".join(e.text for e in full[:6])
    resumed = await collect(engine, GenerationRequest(PROMPT, 6, prefix=prefix, start_index=6))
    assert [e.index for e in resumed] == list(range(6, 12))
    # Greedy: the first resumed token follows the same context as the uninterrupted one.
    assert resumed[0].token_id == full[6].token_id


@module_loop
async def test_cancel_aborts_the_request_in_the_engine(engine):
    from disco.scheduler.endpoint import GenerationRequest

    it = engine.stream(GenerationRequest(PROMPT, 400))
    await anext(it)
    await it.aclose()
    unfinished = engine.unfinished_requests
    for _ in range(100):
        if unfinished() == 0:
            break
        await asyncio.sleep(0.02)
    assert unfinished() == 0 and engine.active_streams == 0


@module_loop
async def test_many_concurrent_streams_are_batched(engine):
    from disco.scheduler.endpoint import GenerationRequest

    reqs = [GenerationRequest(f"{PROMPT} ({i})", 16, request_id=str(i)) for i in range(16)]
    results = await asyncio.gather(*(collect(engine, r) for r in reqs))
    assert all(len(r) >= 1 and r[-1].finish_reason in ("length", "stop") for r in results)
    # Batched, not queued: there is an instant when every stream is running, i.e. the last first
    # token came before the first stream ended. (Streams served one after another fail this: each
    # starts after the previous one ended.)
    last_first = max(r[0].time for r in results)
    first_end = min(r[-1].time for r in results)
    assert last_first <= first_end, f"streams did not overlap: {last_first - first_end:.3f} s gap"


def test_in_a_ray_serve_replica():
    from needs import require

    ray = require("ray")
    from ray import serve

    @serve.deployment(ray_actor_options={"num_gpus": 1})
    class Replica:
        def __init__(self) -> None:
            sys.path.insert(0, str(Path(__file__).parents[1] / "device_agents"))
            from gpu_vllm import make_vllm_endpoint

            self.ep = make_vllm_endpoint()

        async def __call__(self, prompt: str):
            from disco.scheduler.endpoint import GenerationRequest

            async for ev in self.ep.stream(GenerationRequest(prompt, 8)):
                yield (ev.index, ev.text)

    ray.init(include_dashboard=False, num_cpus=4)
    try:
        handle = serve.run(Replica.bind(), name="vllm-test", route_prefix=None)
        got = list(handle.options(stream=True).remote(PROMPT))
        assert [i for i, _ in got] == list(range(len(got))) and len(got) >= 1
    finally:
        serve.shutdown()
        ray.shutdown()
