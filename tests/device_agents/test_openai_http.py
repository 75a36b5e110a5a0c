"""The OpenAI SSE client's failure modes and wire details (the happy path is in the contract suite)."""

from __future__ import annotations

import socket

import pytest
from openai_stub import serve_openai

from disco.device_agents.engines.emulated import EmulatedEndpoint
from disco.device_agents.engines.openai_http import OpenAIConfig, OpenAIEndpoint, _split
from disco.scheduler.endpoint import EndpointFailedError, GenerationRequest


@pytest.fixture(scope="module")
def server():
    healthy = EmulatedEndpoint("gpt-4o-mini", time_scale=0.01)
    faulty = EmulatedEndpoint("gpt-4o-mini", time_scale=0.01, fail_after_tokens=3)
    with serve_openai({"healthy": healthy, "faulty": faulty}) as url:
        yield url


async def test_connection_lost_mid_stream_is_endpoint_failed(server):
    ep = OpenAIEndpoint(server, model="faulty")
    got = []
    with pytest.raises(EndpointFailedError):
        async for ev in ep.stream(GenerationRequest("hello", 10)):
            got.append(ev)
    assert [e.index for e in got] == [0, 1, 2]  # the tokens before the loss are kept
    await ep.close()


async def test_unreachable_server_is_endpoint_failed():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ep = OpenAIEndpoint(f"http://127.0.0.1:{port}", connect_timeout_s=2)
    with pytest.raises(EndpointFailedError, match="ConnectError"):
        await anext(ep.stream(GenerationRequest("hello", 4)))
    await ep.close()


async def test_unknown_model_is_endpoint_failed_with_server_message(server):
    ep = OpenAIEndpoint(server, model="missing")
    with pytest.raises(EndpointFailedError, match="HTTP 404.*does not exist"):
        await anext(ep.stream(GenerationRequest("hello", 4)))
    await ep.close()


async def test_disco_extensions_send_prefix_and_read_token_ids(server):
    ep = OpenAIEndpoint(server, model="healthy", disco_extensions=True)
    req = GenerationRequest("hello", 4, prefix="earlier text ", start_index=5)
    assert ep._body(req)["prompt"] == "hello" and ep._body(req)["prefix"] == "earlier text "
    events = [ev async for ev in ep.stream(req)]
    assert [e.index for e in events] == [5, 6, 7, 8]
    await ep.close()


def test_base_url_with_or_without_v1():
    assert OpenAIConfig("http://h:1").completions_url() == "http://h:1/v1/completions"
    assert (
        OpenAIConfig("https://api.x.com/v1/").completions_url()
        == "https://api.x.com/v1/completions"
    )


def test_multi_token_chunk_is_split_by_logprobs_tokens():
    choice = {
        "text": "Hello world",
        "logprobs": {"tokens": ["Hello", " world"]},
        "finish_reason": None,
    }
    assert _split(choice) == [("Hello", False), (" world", True)]
    assert _split({"text": "Hi", "finish_reason": "stop"}) == [("Hi", True)]
