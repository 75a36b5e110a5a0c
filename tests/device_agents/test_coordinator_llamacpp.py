"""The coordinator over a real llama.cpp engine: failover and migration resume from the text."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from needs import missing, require

require("llama_cpp")

from fakes import FailAfter, cheap_device_profiles  # noqa: E402

from disco.device_agents.coordinator import Coordinator, CoordinatorConfig  # noqa: E402
from disco.device_agents.engines.emulated import EmulatedEndpoint  # noqa: E402
from disco.device_agents.models import ModelUnavailableError  # noqa: E402
from disco.scheduler.endpoint import GenerationRequest  # noqa: E402
from disco.scheduler.migration import MigrationConfig  # noqa: E402
from disco.scheduler.types import EndpointKind, MigrationRule, Plan, Request  # noqa: E402

S, D = EndpointKind.SERVER, EndpointKind.DEVICE
PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def llamas():
    from disco.device_agents.engines.llamacpp import LlamaCppEndpoint

    try:
        server = LlamaCppEndpoint("smollm2-135m", kind=S, n_ctx=512)
        device = LlamaCppEndpoint("smollm2-135m", kind=D, n_ctx=512)
    except ModelUnavailableError as e:
        missing(str(e))
    yield server, device


def request(n):
    return Request("q", time.monotonic(), 8, n)


async def test_failover_to_the_same_model_reproduces_the_uninterrupted_text(llamas):
    server, device = llamas
    gen = GenerationRequest(PROMPT, 24)
    reference = "".join([ev.text async for ev in device.stream(gen)])
    sp, dp = cheap_device_profiles()
    coord = Coordinator(FailAfter(server, 8), device, sp, dp)
    ex = coord.execute(request(24), gen, Plan("q", 0.0, None))
    events, outcome = await ex.collect()
    assert [e.index for e in events] == list(range(len(events)))
    assert [e.source for e in events][:9] == [S] * 8 + [D]
    assert ex.failovers == 1 and outcome.error is None
    # Greedy decoding of the same model resumed from the text continues the same way.
    assert "".join(e.text for e in events) == reference


async def test_migration_from_an_emulated_server_to_llamacpp(llamas):
    _, device = llamas
    sp, dp = cheap_device_profiles()
    # A server slower than llama.cpp's re-prefill, so the switch happens before it finishes.
    sp = replace(sp, tbt_s=0.03, tbt_cv=0.0, ttft_samples=(0.05,), ttft_mixture=())
    server = EmulatedEndpoint(sp, seed=3)
    coord = Coordinator(server, device, sp, dp, CoordinatorConfig(MigrationConfig(rtt_s=0.005)))
    plan = Plan("q", 0.0, None, migration=MigrationRule(D, S))
    events, o = await coord.execute(request(48), GenerationRequest(PROMPT, 48), plan).collect()
    k = o.migrated_at
    assert k is not None and [e.index for e in events] == list(range(len(events)))
    sources = [e.source for e in events]
    assert sources == [S] * k + [D] * (len(events) - k)
    assert [e.text for e in events[:k]] == [server.token_text(i) for i in range(k)]
