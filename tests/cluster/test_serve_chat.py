"""The Serve app's chat and error shapes, on a replica object without Ray running.

``/v1/chat/completions`` renders the messages with the replica's engine's own template (the
GGUF's for llama.cpp, the plain transcript for the emulated engine), a ``prefix`` continues the
assistant's turn, a chat over the Ray handle is a chat too, and routes or methods the app does
not have answer OpenAI's error body, not FastAPI's ``{"detail": ...}``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict

import httpx
import pytest
from needs import missing, require

require("ray")
require("fastapi")

from disco.cluster.config import ServerConfig  # noqa: E402
from disco.scheduler.wire import default_chat_template  # noqa: E402

SUM = [{"role": "user", "content": "What is 2+2?"}]


def replica(engine: str, **engine_kwargs):
    from disco.cluster.serve_app import DiscoServer

    cls = DiscoServer.func_or_class.__mro__[1]  # the user class under @serve.ingress

    class Local(cls):
        def __del__(self) -> None:  # Serve awaits the async one; nothing would here
            pass

    return Local(asdict(ServerConfig(engine=engine, engine_kwargs=engine_kwargs)))


def post(body: dict):
    from starlette.requests import Request

    parts = iter([json.dumps(body).encode(), b""])

    async def receive():
        part = next(parts)
        return {"type": "http.request", "body": part, "more_body": part != b""}

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "query_string": b"", "headers": []}  # fmt: skip
    return Request(scope, receive)


@pytest.fixture(scope="module")
def llama_replica():
    require("llama_cpp")
    from disco.device_agents.models import ModelUnavailableError

    try:
        r = replica("llamacpp", model="smollm2-135m", n_ctx=512, n_threads=1)
    except ModelUnavailableError as e:
        missing(str(e))
    yield r
    asyncio.run(r.engine.close())


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v1/nothing", 404), ("POST", "/v2/chat", 404), ("GET", "/v1/chat/completions", 405)],
)
async def test_unknown_routes_and_methods_answer_openai_error_json(method, path, status):
    from disco.cluster.serve_app import api

    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://replica") as c:
        r = await c.request(method, path)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(r.json()) == {"error"} and set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and path in err["message"]
    if status == 405:
        assert r.headers["allow"] == "POST"


async def test_chat_is_rendered_with_the_engine_template_and_answered(llama_replica):
    body = llama_replica._parse({"messages": SUM, "max_tokens": 24}, chat=True)
    assert body.request.prompt == llama_replica.engine.render_chat(SUM)
    assert body.request.prompt.endswith("<|im_start|>assistant\n")
    out = await llama_replica.chat_completions(post({"messages": SUM, "max_tokens": 24}))
    choice = out["choices"][0]
    assert out["object"] == "chat.completion" and choice["finish_reason"] == "stop"
    reply = choice["message"]["content"]
    assert "4" in reply and "What is 2+2?" not in reply and "<|im_" not in reply
    # A resume (the agent's prefix, cut at a token boundary) continues the same assistant turn.
    prefix = " ".join(reply.split(" ")[:4])
    more = await llama_replica.chat_completions(
        post({"messages": SUM, "max_tokens": 24, "prefix": prefix})
    )
    assert prefix + more["choices"][0]["message"]["content"] == reply


async def test_a_template_that_refuses_the_messages_is_a_400(llama_replica, monkeypatch):
    from disco.scheduler.endpoint import InvalidRequestError
    from disco.scheduler.wire import ApiError

    def refuse(messages):
        raise InvalidRequestError("roles must alternate")

    monkeypatch.setattr(llama_replica.engine, "render_chat", refuse)
    with pytest.raises(ApiError) as e:
        await llama_replica.chat_completions(post({"messages": SUM}))
    assert (e.value.status, e.value.param) == (400, "messages")


async def test_the_emulated_engine_uses_the_plain_transcript_and_the_handle_speaks_chat():
    r = replica("emulated", profile="gpt-4o-mini", time_scale=0.01)
    data = {"messages": SUM, "max_tokens": 3}
    assert r._parse(data, chat=True).request.prompt == default_chat_template(SUM)
    chunks = [c async for c in r.generate(data)]
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 3
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
