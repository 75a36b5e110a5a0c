"""The one OpenAI wire protocol: requests, chunks, errors, the disco extension, the SSE codec."""

from __future__ import annotations

import asyncio
import json

import pytest

from disco.scheduler import wire
from disco.scheduler.endpoint import GenerationRequest, InvalidRequestError
from disco.scheduler.types import EndpointKind, TokenEvent
from disco.scheduler.wire import ApiError, ResponseHead, SSEDecoder

S, D = EndpointKind.SERVER, EndpointKind.DEVICE
HEAD = ResponseHead("cmpl-1", "m", 1_700_000_000)
CHAT = ResponseHead("chatcmpl-1", "m", 1_700_000_000, chat=True)


def parse(chat: bool = False, **body):
    return wire.parse_request(body, chat=chat, models=("m", "n"), max_tokens_limit=100,
                              request_id="rid")  # fmt: skip


def decode_all(text: str) -> list[wire.Chunk]:
    dec, out = SSEDecoder(), []
    for line in text.splitlines(keepends=True):
        c = dec.feed(line.encode())
        if c is not None:
            out.append(c)
    return out


# ---- requests ----------------------------------------------------------------------------------


def test_extensions_and_stream_options_reach_the_request():
    b = parse(prompt=["hi"], max_tokens=5, prefix="so far", start_index=2, prompt_tokens_hint=7,
              stream=True, seed=3, stream_options={"include_usage": True}, user="u1")  # fmt: skip
    r = b.request
    assert (r.prompt, r.max_tokens, r.prefix, r.start_index, r.prompt_tokens_hint, r.seed) == (
        "hi", 5, "so far", 2, 7, 3,
    )  # fmt: skip
    assert (b.model, b.stream, b.include_usage, b.user) == ("m", True, True, "u1")
    assert r.request_id == "rid"


def test_one_default_max_tokens_on_both_routes():
    assert wire.DEFAULT_MAX_TOKENS == 16
    assert parse(prompt="x").request.max_tokens == wire.DEFAULT_MAX_TOKENS
    msgs = [{"role": "user", "content": "x"}]
    assert parse(chat=True, messages=msgs).request.max_tokens == wire.DEFAULT_MAX_TOKENS
    both = parse(chat=True, messages=msgs, max_tokens=9, max_completion_tokens=4)
    assert both.request.max_tokens == 4  # OpenAI's newer field wins


def test_chat_messages_become_a_transcript_that_the_prefix_continues():
    parts = [{"type": "text", "text": "a"}, {"text": "b"}]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": parts}]
    r = parse(chat=True, messages=msgs).request
    assert r.prompt == "system: be brief\nuser: ab\nassistant:"


def test_vllm_continue_final_message_is_the_prefix():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": " partial"}]
    r = parse(chat=True, messages=msgs, continue_final_message=True,
              add_generation_prompt=False, start_index=3).request  # fmt: skip
    assert (r.prompt, r.prefix, r.start_index) == ("user: q\nassistant:", " partial", 3)
    plain = parse(chat=True, messages=msgs).request  # without the flag it is just a turn
    assert plain.prefix == "" and plain.prompt.endswith("assistant:  partial\nassistant:")


def test_a_chat_keeps_its_messages_and_is_rendered_by_the_given_template():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": " part"}]
    r = wire.parse_request({"messages": msgs, "continue_final_message": True}, chat=True,
                           chat_template=lambda m: f"<{len(m)} turns>").request  # fmt: skip
    assert (r.prompt, r.prefix, r.messages) == ("<1 turns>", " part", (("user", "q"),))
    assert r.chat_messages() == msgs[:1] and parse(prompt="x").request.messages is None
    assert wire.chat_template_of(object()) is wire.default_chat_template

    def refuse(messages):
        raise InvalidRequestError("roles must alternate")

    with pytest.raises(ApiError) as e:
        wire.parse_request({"messages": msgs}, chat=True, chat_template=refuse)
    assert (e.value.status, e.value.param) == (400, "messages")


def test_a_missing_route_is_an_openai_error():
    err = wire.route_error(404, "Not Found", "GET", "/v1/nothing")
    assert err.body() == {"error": {"message": "Not Found: GET /v1/nothing",
                                    "type": "invalid_request_error", "param": None,
                                    "code": None}}  # fmt: skip


BAD = [
    ({"prompt": "x", "n": 2}, 400, "n=1"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "top_p": 10**400}, 400, "top_p"),
    ({"prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, 400, "'temperature' must be a number"),
    ({"prompt": "x", "prefix": 5}, 400, "'prefix' must be a string"),
    ({"prompt": "x", "start_index": -1}, 400, "start_index"),
    ({"prompt": "x", "prompt_tokens_hint": 0}, 400, "prompt_tokens_hint"),
    ({"prompt": "x", "stream": "yes"}, 400, "'stream' must be a boolean"),
    ({"prompt": "x", "stream_options": {"include_usage": 1}}, 400, "include_usage"),
    ({"prompt": "x", "max_tokens": True}, 400, "'max_tokens' must be an integer, got a boolean"),
    ({"prompt": "x", "max_tokens": 101}, 400, "'max_tokens' must be in [1, 100]"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "user": 7}, 400, "'user' must be a string"),
    ({"prompt": ["a", "b"]}, 400, "prompt"),
    ({"prompt": "  "}, 400, "prompt"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "x", "model": "other"}, 404, "does not exist"),
]


@pytest.mark.parametrize(("body", "status", "needle"), BAD)
def test_bad_completion_bodies_are_refused_with_a_clear_message(body, status, needle):
    with pytest.raises(ApiError) as e:
        parse(**body)
    assert e.value.status == status and needle in e.value.message, e.value.message
    assert e.value.body()["error"]["type"] == "invalid_request_error"


BAD_CHAT = [
    ({"prompt": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}]}, "content"),
    ({"messages": [{"content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": " "}]}, "empty"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text parts"),
    ({"messages": [{"role": "user", "content": "q"}], "continue_final_message": True},
     "final assistant message"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "continue_final_message": True, "add_generation_prompt": True}, "add_generation_prompt"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "continue_final_message": True, "prefix": "b"}, "prefix once"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "needle"), BAD_CHAT)
def test_bad_chat_bodies_are_a_400(body, needle):
    with pytest.raises(ApiError) as e:
        parse(chat=True, **body)
    assert e.value.status == 400 and needle in e.value.message, e.value.message


def test_an_unknown_model_is_openais_404():
    with pytest.raises(ApiError) as e:
        parse(prompt="x", model="gpt-9")
    err = e.value.body()["error"]
    assert e.value.status == 404 and err["code"] == "model_not_found" and err["param"] == "model"
    assert wire.parse_request({"prompt": "x", "model": "any"}).model == "any"  # models=None


def test_json_bodies():
    with pytest.raises(ApiError) as e:
        wire.parse_json(b"x" * 11, limit=10)
    assert e.value.status == 413
    for raw, needle in [(b'"a string"', "JSON object"), (b"\xff\xfe", "not valid JSON"),
                        (b"[" * 50_000, "nested too deeply"),
                        (b'{"max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON")]:  # fmt: skip
        with pytest.raises(ApiError, match=needle) as e:
            wire.parse_json(raw)
        assert e.value.status == 400


async def _aiter(parts):
    for p in parts:
        yield p


def test_read_body_stops_at_the_cap_with_or_without_a_length():
    assert asyncio.run(wire.read_body(_aiter([b"ab", b"c"]), None, 3)) == b"abc"
    read = []

    async def endless():
        while True:
            read.append(1)
            yield b"x" * 10

    with pytest.raises(ApiError) as e:
        asyncio.run(wire.read_body(endless(), None, 25))
    assert e.value.status == 413 and len(read) == 3
    with pytest.raises(ApiError) as e:
        asyncio.run(wire.read_body(_aiter([]), "26", 25))
    assert e.value.status == 413
    with pytest.raises(ApiError, match="Content-Length"):
        asyncio.run(wire.read_body(_aiter([]), "-1", 25))


def test_a_client_body_parses_back_to_the_same_request():
    req = GenerationRequest("p", 7, prefix="so far", start_index=2, temperature=0.5, top_p=0.9,
                            seed=4, prompt_tokens_hint=11)  # fmt: skip
    got = wire.parse_request(wire.request_body(req, "m"), models=("m",)).request
    assert got == req
    plain = wire.request_body(req, "m", extensions=False)
    assert plain["prompt"] == "pso far" and not {"prefix", "start_index"} & set(plain)
    msgs = [{"role": "user", "content": "p"}]
    chat = wire.request_body(req, "m", messages=msgs)
    assert chat["messages"] == msgs and "prompt" not in chat and chat["stream"] is True


def test_api_key():
    wire.check_api_key(None, None)  # no key configured: open
    wire.check_api_key(b"Bearer k", "k")
    for bad in (None, "Bearer K", "k", b"Bearer k2"):
        with pytest.raises(ApiError) as e:
            wire.check_api_key(bad, "k")
        err = e.value.body()["error"]
        assert (e.value.status, err["type"], err["code"]) == (
            401, "authentication_error", "invalid_api_key",
        )  # fmt: skip


# ---- errors ------------------------------------------------------------------------------------


def test_one_error_shape_with_the_status_as_an_int_and_a_string_code():
    e = ApiError(404, "gone", code="model_not_found", param="model")
    assert e.body() == {"error": {"message": "gone", "type": "invalid_request_error",
                                  "param": "model", "code": "model_not_found"}}  # fmt: skip
    assert e.event()["status"] == 404 and isinstance(e.status, int)
    failed = wire.engine_failed("boom")
    assert (failed.status, failed.type, failed.code) == (503, "server_error", "engine_failed")
    back = ApiError.from_body(404, e.body())
    assert (back.status, back.message, back.type, back.code, back.param) == (
        404, "gone", "invalid_request_error", "model_not_found", "model",
    )  # fmt: skip
    assert ApiError.from_body(500, "plain text").message == "plain text"
    assert ApiError.from_body(400, {"error": {"message": "m", "code": 400}}).code == "400"


def test_an_error_event_decodes_with_its_status_and_without_it():
    [c] = decode_all(wire.sse(ApiError(400, "bad", param="x").event()))
    assert c.error is not None and (c.error.status, c.error.message, c.error.param) == (
        400, "bad", "x",
    )  # fmt: skip
    assert not c.tokens and not c.done
    foreign = wire.decode_data('{"error": {"message": "overloaded"}}')
    assert foreign.error.status == 500 and foreign.error.message == "overloaded"
    assert wire.decode_data("not json").error.status == 502
    assert wire.decode_data("[1, 2]").error is not None


# ---- chunks: the disco extension and the round trip --------------------------------------------


def test_the_disco_extension_has_one_shape():
    ev = TokenEvent(4, "lo", 0.0, token_id=99, source=D, finish_reason="stop")
    c = wire.chunk(HEAD, [ev])
    assert c["disco"] == {"index": 4, "source": "device", "token_id": 99}
    assert c["object"] == "text_completion" and c["choices"][0]["text"] == "lo"
    assert c["choices"][0]["finish_reason"] == "stop" and c["created"] == HEAD.created
    anon = wire.chunk(HEAD, [TokenEvent(0, "a", 0.0)])
    assert anon["disco"] == {"index": 0, "source": None, "token_id": None}
    two = wire.chunk(HEAD, [TokenEvent(5, "a", 0.0, 1, S), TokenEvent(6, "b", 0.0, 2, S)])
    assert two["disco"] == {"index": 5, "source": "server", "token_id": None}
    assert wire.DiscoTag.from_dict({"index": True}) is None
    assert wire.DiscoTag.from_dict({"index": 1, "source": 3}) == wire.DiscoTag(1)


@pytest.mark.parametrize("head", [HEAD, CHAT], ids=["completions", "chat"])
def test_events_survive_the_round_trip(head):
    sent = [TokenEvent(3, "Hel", 0.0, 11, S), TokenEvent(4, "lo", 0.0, 12, S),
            TokenEvent(5, "!", 0.0, 13, S, "length")]  # fmt: skip
    text = "".join(wire.sse(wire.chunk(head, [ev], first=i == 0)) for i, ev in enumerate(sent))
    text += wire.sse(wire.usage_chunk(head, wire.Usage(7, 3))) + wire.SSE_DONE
    chunks = decode_all(text)
    got = [ev for c in chunks[:3] for ev in c.events(c.disco.index, 1.0, S)]
    assert [(e.index, e.text, e.token_id, e.source, e.finish_reason) for e in got] == [
        (e.index, e.text, e.token_id, e.source, e.finish_reason) for e in sent
    ]
    assert chunks[3].usage == wire.Usage(7, 3) and not chunks[3].tokens
    assert chunks[4].done and len(chunks) == 5
    if head.chat:
        first = json.loads(text.split("\n\n")[0][6:])
        assert first["choices"][0]["delta"]["role"] == "assistant"
        assert first["object"] == "chat.completion.chunk"


@pytest.mark.parametrize("head", [HEAD, CHAT], ids=["completions", "chat"])
def test_a_chunk_of_several_tokens_is_split_back_into_them(head):
    evs = [TokenEvent(0, "a", 0.0), TokenEvent(1, " b", 0.0), TokenEvent(2, " c", 0.0, None, None,
                                                                          "stop")]  # fmt: skip
    c = wire.decode_chunk(wire.chunk(head, evs))
    assert c.tokens == ("a", " b", " c") and c.finish_reason == "stop"
    out = c.events(10, 2.0, D)
    assert [e.index for e in out] == [10, 11, 12] and [e.finish_reason for e in out] == [
        None, None, "stop",
    ]  # fmt: skip
    # listed pieces that do not spell the text are ignored: the text is one token
    odd = {"choices": [{"text": "xyz", "logprobs": {"tokens": ["x", "q"]}}]}
    assert wire.decode_chunk(odd).tokens == ("xyz",)


def test_the_empty_text_rule():
    def tokens(choice):
        return wire.decode_chunk({"choices": [choice]}).tokens

    assert tokens({"text": ""}) == ()  # a token that completes no character yet: nothing seen
    assert tokens({"text": "", "finish_reason": "stop"}) == ("",)  # end of generation
    assert tokens({"delta": {"role": "assistant", "content": ""}}) == ()  # chat's role-only delta
    assert tokens({"delta": {}, "finish_reason": "stop"}) == ("",)  # OpenAI's finish-only chunk
    assert tokens({"text": "ab", "logprobs": {"tokens": ["a", "", "b"]}}) == ("a", "b")
    tagged = {"choices": [{"text": ""}], "disco": {"index": 3, "source": "server", "token_id": 9}}
    assert wire.decode_chunk(tagged).tokens == ()  # the same rule for our own servers
    assert wire.decode_chunk({"choices": []}).tokens == ()


def test_a_whole_response_and_real_usage():
    evs = [TokenEvent(0, "a", 0.0, source=S), TokenEvent(1, "b", 0.0, source=D)]
    body = wire.completion(CHAT, evs, wire.Usage(5, 2), migrated_at=1)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "ab"}
    assert body["choices"][0]["finish_reason"] == "stop" and body["object"] == "chat.completion"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert body["disco"] == {"sources": ["server", "device"], "migrated_at": 1}
    req = GenerationRequest("one two three", 4, prefix="four", prompt_tokens_hint=999)
    usage = wire.Usage.counted(req, lambda t: len(t.split()), 2)
    assert usage == wire.Usage(4, 2)  # the engine's count of prompt + prefix, never the hint


def test_the_decoder_handles_comments_multiline_data_and_an_unterminated_event():
    chunks = decode_all(': keep-alive\n\nevent: x\ndata: {"choices":\ndata: [{"text": "z"}]}\n\n')
    assert [c.tokens for c in chunks] == [("z",)]
    dec = SSEDecoder()
    assert dec.feed('data: {"choices": [{"text": "y"}]}\r\n') is None
    assert dec.flush().tokens == ("y",) and dec.flush() is None

    async def collect():
        lines = _aiter(["data: [DONE]", "", 'data: {"choices": [{"text": "w"}]}'])
        return [c async for c in wire.decode_stream(lines)]

    done, last = asyncio.run(collect())
    assert done.done and last.tokens == ("w",)


def test_token_events_number_the_tokens_and_notice_a_cut_or_broken_stream():
    def run(chunks):
        async def go():
            ticks = iter(range(100))
            got = wire.token_events(_aiter(chunks), 5, S, lambda: float(next(ticks)))
            return [e async for e in got]

        return asyncio.run(go())

    tok = wire.decode_chunk
    a, b = tok({"choices": [{"text": ""}]}), tok({"choices": [{"text": "x"}]})
    end = tok({"choices": [{"text": "y", "finish_reason": "length"}]})
    events = run([a, b, end, wire.Chunk(done=True), b])  # nothing after [DONE] is read
    assert [(e.index, e.text, e.time, e.source) for e in events] == [
        (5, "x", 1.0, S), (6, "y", 2.0, S),
    ]  # fmt: skip
    assert events[-1].finish_reason == "length"
    assert run([b, end])[-1].index == 6  # a finish reason without [DONE] is a whole stream
    with pytest.raises(ApiError) as e:
        run([b, b])  # cut: neither a finish reason nor [DONE]
    assert e.value.status == 502
    with pytest.raises(ApiError) as e:
        run([b, wire.decode_chunk(wire.engine_failed("died").event())])
    assert (e.value.status, e.value.code, e.value.message) == (503, "engine_failed", "died")


def test_cache_key_travels_from_client_to_server() -> None:
    from disco.scheduler.endpoint import GenerationRequest
    from disco.scheduler.wire import parse_request, request_body

    req = GenerationRequest("hello there", 8, prefix="a b", start_index=2, request_id="dev-7")
    body = request_body(req, "m")
    assert body["cache_key"] == "dev-7"
    parsed = parse_request(body, request_id="cmpl-x")
    assert parsed.request.request_id == "cmpl-x"  # the server's own id...
    assert parsed.request.cache_key == "dev-7"  # ...and the request's, for the prefix cache
    assert "cache_key" not in request_body(req, "m", extensions=False)
