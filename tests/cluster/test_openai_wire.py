"""Request parsing and chunk format of the server API, without Ray or HTTP."""

from __future__ import annotations

import json

import pytest

from disco.cluster.openai_wire import (
    SSE_DONE,
    ApiError,
    chunk,
    parse_completion,
    parse_json,
    sse,
)
from disco.scheduler.types import TokenEvent


def parse(**body):
    return parse_completion(body, "m", 100, "rid")


def test_extensions_reach_the_generation_request():
    b = parse(prompt=["hi"], max_tokens=5, prefix="so far", start_index=2, prompt_tokens_hint=7,
              stream=True, seed=3, stream_options={"include_usage": True})  # fmt: skip
    r = b.request
    assert (r.prompt, r.prefix, r.start_index, r.prompt_tokens_hint, r.seed) == (
        "hi", "so far", 2, 7, 3,
    )  # fmt: skip
    assert b.stream and b.include_usage and r.request_id == "rid"


@pytest.mark.parametrize(
    "body,status,needle",
    [
        ({"prompt": "x", "n": 2}, 400, "n=1"),
        ({"prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"prompt": "x", "temperature": 3}, 400, "temperature"),
        ({"prompt": "x", "prefix": 5}, 400, "prefix"),
        ({"prompt": "x", "start_index": -1}, 400, "start_index"),
        ({"prompt": "x", "stream": "yes"}, 400, "stream"),
        ({"prompt": ["a", "b"]}, 400, "prompt"),
        ({"prompt": "x", "max_tokens": 101}, 400, "max_tokens"),
        ({"prompt": "x", "model": "other"}, 404, "does not exist"),
    ],
)
def test_bad_fields(body, status, needle):
    with pytest.raises(ApiError) as e:
        parse(**body)
    assert e.value.status == status and needle in e.value.message
    assert e.value.body()["error"]["type"] == "invalid_request_error"


def test_body_size_and_json_shape():
    with pytest.raises(ApiError) as e:
        parse_json(b"x" * 11, max_bytes=10)
    assert e.value.status == 413
    with pytest.raises(ApiError, match="JSON object"):
        parse_json(b'"a string"', 100)
    with pytest.raises(ApiError, match="not valid JSON"):
        parse_json(b"\xff\xfe", 100)


def test_chunk_is_an_openai_text_completion_with_the_token_index():
    ev = TokenEvent(index=4, text="lo", time=0.0, token_id=99, finish_reason="stop")
    c = chunk("rid", "m", ev, 123)
    assert c["object"] == "text_completion" and c["choices"][0]["text"] == "lo"
    assert c["choices"][0]["finish_reason"] == "stop" and c["disco"] == {"index": 4, "token_id": 99}
    line = sse(c)
    assert line.startswith("data: ") and line.endswith("\n\n")
    assert json.loads(line[6:]) == c
    assert SSE_DONE == "data: [DONE]\n\n"


def test_malformed_json_is_a_400_not_a_crash():
    for raw in (b"[" * 50_000, b'{"a": ' * 50_000, b'{"max_tokens": ' + b"9" * 5000 + b"}"):
        with pytest.raises(ApiError, match="not valid JSON") as e:
            parse_json(raw, 1 << 20)
        assert e.value.status == 400


def test_numbers_out_of_float_range_are_a_400():
    with pytest.raises(ApiError, match="top_p") as e:
        parse(prompt="x", top_p=10**400)
    assert e.value.status == 400


@pytest.mark.parametrize("field,value", [("top_p", 0), ("top_p", 1.5), ("temperature", -1)])
def test_the_agent_and_the_server_reject_sampling_fields_identically(field, value):
    """One validator (GenerationRequest.validate): what the server refuses, the agent refuses
    first, with the same message, so no bad request reaches the server as a 'server failure'."""
    from starlette.testclient import TestClient

    from disco.device_agents.agent_http import create_app
    from disco.device_agents.fleet import EmulatedFleet, FleetConfig
    from disco.device_agents.network import NetworkConfig

    with pytest.raises(ApiError) as e:
        parse(prompt="x", max_tokens=4, **{field: value})
    fleet = EmulatedFleet(FleetConfig(n_devices=1, time_scale=0.02, network=NetworkConfig(0.001)))
    with TestClient(create_app(fleet.agents)) as client:
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, field: value})
    assert (r.status_code, e.value.status) == (400, 400)
    assert r.json()["error"]["message"] == e.value.message
    assert field in e.value.message
