"""The OpenAI SSE client's failure modes, wire details and the chat API (the happy path of
completions is in the contract suite). Servers are the loopback stub (127.0.0.1, an ephemeral
port) or an in-memory transport replaying what OpenAI sends."""

from __future__ import annotations

import json
import socket
from dataclasses import replace

import httpx
import pytest
from openai_stub import serve_openai, serve_stub

from disco.device_agents.engines.emulated import EmulatedEndpoint
from disco.device_agents.engines.openai_http import (
    CONTINUE_INSTRUCTION,
    OpenAIConfig,
    OpenAIEndpoint,
)
from disco.scheduler.endpoint import EndpointFailedError, GenerationRequest
from disco.scheduler.types import EndpointKind


def _emulated(**kw) -> EmulatedEndpoint:
    return EmulatedEndpoint("gpt-4o-mini", time_scale=0.01, **kw)


class Recording:
    """An endpoint that records the requests the server handed it."""

    def __init__(self, inner: EmulatedEndpoint) -> None:
        self.inner, self.kind, self.name, self.calls = inner, inner.kind, "recording", []

    def stream(self, req: GenerationRequest):
        self.calls.append(req)
        return self.inner.stream(req)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    async def close(self) -> None:
        return None


@pytest.fixture(scope="module")
def server():
    endpoints = {"healthy": _emulated(), "faulty": _emulated(fail_after_tokens=3)}
    with serve_openai(endpoints) as url:
        yield url


@pytest.fixture(scope="module")
def chat_only():
    """A chat-only service (as GPT-4o-mini is): no /v1/completions route."""
    rec = Recording(_emulated())
    with serve_stub({"gpt-4o-mini": rec}, apis=("chat",)) as stub:
        yield stub, rec


async def test_connection_lost_mid_stream_is_endpoint_failed(server):
    ep = OpenAIEndpoint(server, model="faulty")
    got = []
    with pytest.raises(EndpointFailedError):
        async for ev in ep.stream(GenerationRequest("hello", 10)):
            got.append(ev)
    assert [e.index for e in got] == [0, 1, 2]  # the tokens before the loss are kept
    await ep.close()


async def test_an_error_event_mid_stream_is_endpoint_failed():
    with serve_openai({"faulty": _emulated(fail_after_tokens=2)}, error_events=True) as url:
        ep = OpenAIEndpoint(url, model="faulty")
        got = []
        with pytest.raises(EndpointFailedError, match="mid-stream.*engine_failed"):
            async for ev in ep.stream(GenerationRequest("hello", 10)):
                got.append(ev)
        await ep.close()
    assert [e.index for e in got] == [0, 1]


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
    assert events[-1].finish_reason == "length"
    await ep.close()


def test_urls_and_options():
    assert OpenAIConfig("http://h:1").url() == "http://h:1/v1/completions"
    assert OpenAIConfig("https://api.x.com/v1/").url() == "https://api.x.com/v1/completions"
    assert OpenAIConfig("http://h:1", api="chat").url() == "http://h:1/v1/chat/completions"
    with pytest.raises(ValueError, match="api must be"):
        OpenAIConfig("http://h:1", api="responses")
    with pytest.raises(ValueError, match="chat_resume"):
        OpenAIConfig("http://h:1", chat_resume="guess")


async def test_chat_streams_from_a_chat_only_service(chat_only):
    stub, rec = chat_only
    ep = OpenAIEndpoint(stub.url, model="gpt-4o-mini", api="chat")
    events = [ev async for ev in ep.stream(GenerationRequest("Tell me", 6, request_id="c1"))]
    await ep.close()
    direct = [ev async for ev in _emulated().stream(GenerationRequest("x", 6, request_id="c1"))]
    assert [e.index for e in events] == list(range(6))
    assert [e.text for e in events] == [e.text for e in direct]  # the emulator's own tokens
    assert events[-1].finish_reason == "length" and {e.source for e in events} == {
        EndpointKind.SERVER
    }
    assert stub.received[-1]["messages"] == [{"role": "user", "content": "Tell me"}]
    assert rec.calls[-1].prompt == "user: Tell me\nassistant:"


async def test_completions_against_a_chat_only_service_fail_loudly(chat_only):
    stub, _ = chat_only
    ep = OpenAIEndpoint(stub.url, model="gpt-4o-mini")
    with pytest.raises(EndpointFailedError, match="HTTP 404"):
        await anext(ep.stream(GenerationRequest("hi", 2)))
    await ep.close()


async def test_chat_resume_with_vllm_continue_final_message(chat_only):
    stub, rec = chat_only
    ep = OpenAIEndpoint(stub.url, model="gpt-4o-mini", api="chat",
                        chat_resume="continue_final_message")  # fmt: skip
    req = GenerationRequest("Tell me", 3, prefix=" Once upon", start_index=2)
    events = [ev async for ev in ep.stream(req)]
    await ep.close()
    body = stub.received[-1]
    assert body["messages"] == [{"role": "user", "content": "Tell me"},
                                {"role": "assistant", "content": " Once upon"}]  # fmt: skip
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    # the server continued inside the assistant's turn: the same resume as a `prefix`
    got = rec.calls[-1]
    assert (got.prompt, got.prefix) == ("user: Tell me\nassistant:", " Once upon")
    assert [e.index for e in events] == [2, 3, 4]  # numbered by the client from start_index


async def test_chat_resume_elsewhere_is_an_assistant_turn_and_a_continuation(chat_only):
    stub, rec = chat_only
    ep = OpenAIEndpoint(stub.url, model="gpt-4o-mini", api="chat")
    req = GenerationRequest("Tell me", 3, prefix=" Once upon", start_index=2)
    events = [ev async for ev in ep.stream(req)]
    await ep.close()
    body = stub.received[-1]
    assert body["messages"] == [
        {"role": "user", "content": "Tell me"},
        {"role": "assistant", "content": " Once upon"},
        {"role": "user", "content": CONTINUE_INSTRUCTION},
    ]
    assert not {"continue_final_message", "prefix", "start_index"} & set(body)
    assert rec.calls[-1].prefix == "" and rec.calls[-1].prompt.endswith(
        f"user: {CONTINUE_INSTRUCTION}\nassistant:"
    )  # a new turn: the documented limit (the model may repeat or rephrase)
    assert [e.index for e in events] == [2, 3, 4]


OPENAI_CHAT_STREAM = "".join(
    f"data: {json.dumps(obj)}\n\n"
    for obj in [
        {"object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]},
        {"object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"content": "lo"}, "finish_reason": None}]},
        {"object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"object": "chat.completion.chunk", "choices": [],
         "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
    ]
) + "data: [DONE]\n\n"  # fmt: skip


async def test_a_stream_as_openai_sends_it_follows_the_empty_text_rule():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, text=OPENAI_CHAT_STREAM,
                              headers={"content-type": "text/event-stream"})  # fmt: skip

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    ep = OpenAIEndpoint("https://api.example.com/v1", model="gpt-4o-mini", api="chat",
                        client=client, request_logprobs=True)  # fmt: skip
    events = [ev async for ev in ep.stream(GenerationRequest("hi", 8))]
    await client.aclose()
    # no token for the role-only delta; the finish-only chunk is the end-of-generation token
    assert [(e.index, e.text, e.finish_reason) for e in events] == [
        (0, "Hel", None), (1, "lo", None), (2, "", "stop"),
    ]  # fmt: skip
    assert seen[0]["logprobs"] is True and seen[0]["max_tokens"] == 8


CHAT = (("system", "Be brief."), ("user", "Tell me"))


def test_a_chat_request_goes_to_the_chat_route_as_its_messages():
    # Its prompt is the device model's rendering; the server renders the messages itself.
    req = GenerationRequest("<device template>", 3, messages=CHAT)
    turns = [{"role": r, "content": c} for r, c in CHAT]
    for api in ("completions", "chat"):
        ep = OpenAIEndpoint("http://h:1", api=api, disco_extensions=True)
        body = ep._body(replace(req, prefix=" Once", start_index=1))
        assert ep.config.url(ep._chat(req)) == "http://h:1/v1/chat/completions"
        assert body["messages"] == turns and "prompt" not in body
        assert (body["prefix"], body["start_index"]) == (" Once", 1)  # the same assistant turn
    plain = OpenAIEndpoint("http://h:1", api="chat", chat_resume="continue_final_message")
    body = plain._body(replace(req, prefix=" Once"))
    assert body["messages"] == [*turns, {"role": "assistant", "content": " Once"}]
    assert body["continue_final_message"] is True
    completion = GenerationRequest("Tell me", 3)
    assert OpenAIEndpoint("http://h:1")._chat(completion) is False


async def test_the_chat_service_receives_the_conversation(chat_only):
    stub, rec = chat_only
    ep = OpenAIEndpoint(stub.url, model="gpt-4o-mini")  # api="completions": chat goes to chat
    events = [ev async for ev in ep.stream(GenerationRequest("x", 2, messages=CHAT))]
    await ep.close()
    assert len(events) == 2
    assert stub.received[-1]["messages"] == [{"role": r, "content": c} for r, c in CHAT]
    assert rec.calls[-1].messages == CHAT
    assert rec.calls[-1].prompt == "system: Be brief.\nuser: Tell me\nassistant:"
