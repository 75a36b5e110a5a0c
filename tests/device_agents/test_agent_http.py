"""The agent's OpenAI-compatible API: the official client, the bad-input matrix, the API key."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from fakes import Script, ScriptedEndpoint, cheap_device_profiles

from disco.device_agents.agent import AgentConfig, DeviceAgent
from disco.device_agents.agent_http import BackgroundServer, create_app, resolve_api_key
from disco.device_agents.config import HttpConfig
from disco.device_agents.coordinator import Coordinator
from disco.device_agents.local_planner import StaticPlanner
from disco.scheduler.types import EndpointKind
from disco.scheduler.wire import DEFAULT_MAX_TOKENS, ApiError, SSEDecoder, Usage, parse_request

S, D = EndpointKind.SERVER, EndpointKind.DEVICE


def make_agent(server_script=None, device_script=None):
    server_script = server_script or Script(ttft=0.01)
    device_script = device_script or Script(ttft=0.2)
    sp, dp = cheap_device_profiles()
    coord = Coordinator(
        ScriptedEndpoint(S, server_script), ScriptedEndpoint(D, device_script), sp, dp
    )
    return DeviceAgent(coord, StaticPlanner(0.0, 0.0), AgentConfig(device_id="dev-7"))


@pytest.fixture(scope="module")
def served():
    agent = make_agent()
    srv = BackgroundServer(
        create_app(agent, HttpConfig(max_body_bytes=4096, max_tokens_limit=64))
    )
    url = srv.start()
    yield url, agent
    srv.stop()


@pytest.fixture(scope="module")
def keyed():
    srv = BackgroundServer(create_app(make_agent(), HttpConfig(api_key="sekret")))
    url = srv.start()
    yield url
    srv.stop()


def test_openai_client_streams_a_completion(served):
    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=10)
    chunks = list(
        client.completions.create(model="disco", prompt="Tell me", max_tokens=12, stream=True)
    )
    assert len(chunks) == 12
    assert "".join(c.choices[0].text for c in chunks) == "".join(f"s{i} " for i in range(12))
    tags = [c.model_extra["disco"] for c in chunks]
    assert tags == [{"index": i, "source": "server", "token_id": None} for i in range(12)]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_client_streams_a_chat_completion(served):
    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=10)
    stream = client.chat.completions.create(
        model="disco", messages=[{"role": "user", "content": "hi"}], max_tokens=30, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "".join(f"s{i} " for i in range(20))  # the script stops at 20 tokens
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_usage_is_the_agents_count_and_max_tokens_has_the_wire_default(served):
    url, agent = served
    body = {"prompt": "one two three four five six seven eight", "stream": True,
            "prompt_tokens_hint": 999, "stream_options": {"include_usage": True}}  # fmt: skip
    chunks, done = [], False
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=10) as r:
        dec = SSEDecoder()
        for line in r.iter_lines():
            c = dec.feed(line)
            done = done or bool(c and c.done)
            if c is not None and not c.done:
                chunks.append(c)
    assert done and sum(len(c.tokens) for c in chunks) == DEFAULT_MAX_TOKENS
    expected = agent.count_tokens(body["prompt"])
    assert chunks[-1].usage == Usage(expected, DEFAULT_MAX_TOKENS) and expected != 999


def test_a_resume_through_the_agent_starts_at_its_index(served):
    url, _ = served
    body = {"prompt": "p", "prefix": "s0 s1 s2 ", "start_index": 3, "max_tokens": 2}
    r = httpx.post(url + "/v1/completions", json=body, timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "s3 s4 "


@pytest.mark.parametrize("field,value", [("top_p", 0), ("top_p", 1.5), ("temperature", -1)])
def test_the_agent_refuses_as_the_one_parser_does(served, field, value):
    """One parser: what the Serve app refuses, the agent refuses first, with the same message,
    so no bad request reaches the server as a 'server failure'."""
    url, _ = served
    body = {"prompt": "x", "max_tokens": 4, field: value}
    with pytest.raises(ApiError) as e:
        parse_request(body)
    r = httpx.post(url + "/v1/completions", json=body, timeout=10)
    assert (r.status_code, e.value.status) == (400, 400)
    assert r.json() == e.value.body() and field in e.value.message


def test_non_streaming_completion_and_chat(served):
    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=10)
    c = client.completions.create(model="disco", prompt="x", max_tokens=5)
    assert c.choices[0].text == "s0 s1 s2 s3 s4 " and c.usage.completion_tokens == 5
    chat = client.chat.completions.create(
        model="disco", messages=[{"role": "user", "content": "y"}], max_tokens=3
    )
    assert chat.choices[0].message.content == "s0 s1 s2 "


BAD = [
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", b"[1, 2]", 400),
    ("/v1/completions", b'{"max_tokens": 5}', 400),
    ("/v1/completions", b'{"prompt": "   ", "max_tokens": 5}', 400),
    ("/v1/completions", b'{"prompt": 17}', 400),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 0}', 400),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": -3}', 400),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 100000000}', 400),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": "ten"}', 400),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": true}', 400),
    ("/v1/completions", b'{"prompt": "hi", "model": "gpt-17"}', 404),
    ("/v1/completions", b'{"prompt": "hi", "n": 3}', 400),
    ("/v1/completions", b'{"prompt": "hi", "temperature": 9}', 400),
    ("/v1/completions", b'{"prompt": "hi", "stream": "yes"}', 400),
    ("/v1/completions", b"", 400),
    ("/v1/chat/completions", b'{"messages": []}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user"}]}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": " "}]}', 400),
    ("/v1/chat/completions", b'{"prompt": "hi"}', 400),
    # nested deeper than the JSON parser's recursion limit, well under the body cap
    ("/v1/completions", b"[" * 4000, 400),
    ("/v1/completions", b'{"prompt": "hi", "top_p": 0}', 400),
    ("/v1/completions", b'{"prompt": "hi", "top_p": 1e400}', 400),
    ("/v1/completions", b'{"prompt": "hi", "temperature": ' + b"9" * 400 + b"}", 400),
    ("/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}', 400),
    ("/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": [{"type": "text"}]}]}', 400),
    ("/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": ["hi"]}]}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": '
     b'[{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "hi"}]}]}',
     400),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "status"), BAD)
def test_bad_input_gets_a_4xx_json_error(served, path, body, status):
    url, _ = served
    r = httpx.post(
        url + path, content=body, headers={"content-type": "application/json"}, timeout=10
    )
    assert r.status_code == status
    assert r.json()["error"]["message"]


def test_chat_content_parts_with_text_are_joined(served):
    url, _ = served
    msg = {
        "role": "user",
        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
    }
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [msg], "max_tokens": 2},
                   timeout=10)  # fmt: skip
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "s0 s1 "


def test_wrong_route_or_method_is_a_json_4xx(served):
    url, _ = served
    for r in (httpx.get(url + "/v1/completions"), httpx.post(url + "/v2/nothing", json={})):
        assert r.status_code in (404, 405) and r.json()["error"]["message"]


def test_oversized_body_is_refused(served):
    url, _ = served
    body = b'{"prompt": "' + b"x" * 10_000 + b'"}'
    assert httpx.post(url + "/v1/completions", content=body, timeout=10).status_code == 413

    def chunks():  # no Content-Length: the cap applies while reading
        yield body[:3000]
        yield body[3000:]

    r = httpx.post(url + "/v1/completions", content=chunks(), timeout=10)
    assert r.status_code == 413 and r.json()["error"]


def test_health_and_metrics(served):
    url, _ = served
    assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"
    httpx.post(url + "/v1/completions", json={"prompt": "m", "max_tokens": 2}, timeout=10)
    text = httpx.get(url + "/metrics", timeout=10).text
    assert 'disco_agent_requests_total{device_id="dev-7"}' in text
    assert "disco_agent_ttft_seconds_bucket" in text and "disco_agent_failovers_total" in text
    count = [ln for ln in text.splitlines() if ln.startswith("disco_agent_ttft_seconds_count")]
    assert int(count[0].split()[-1]) >= 1


def test_api_key_is_checked_on_every_request(keyed):
    url = keyed
    assert httpx.get(url + "/health", timeout=10).status_code == 401
    bad = httpx.post(
        url + "/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"}
    )
    assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
    ok = httpx.get(url + "/health", headers={"Authorization": "Bearer sekret"}, timeout=10)
    assert ok.status_code == 200
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0, timeout=10)
    chunks = list(client.completions.create(model="disco", prompt="k", max_tokens=4, stream=True))
    assert len(chunks) == 4
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="disco", prompt="k", max_tokens=4)


def test_exposed_binding_requires_a_key(monkeypatch):
    monkeypatch.delenv("DISCO_API_KEY", raising=False)
    with pytest.raises(ValueError, match="API key"):
        HttpConfig(host="0.0.0.0").check_exposure()
    HttpConfig(host="0.0.0.0", api_key="k").check_exposure()
    HttpConfig(host="::1").check_exposure()
    with pytest.raises(ValueError, match="DISCO_SERVER_API_KEY"):  # each front names its variable
        HttpConfig(host="10.0.0.5").check_exposure("DISCO_SERVER_API_KEY")
    monkeypatch.setenv("DISCO_API_KEY", "from-env")
    HttpConfig(host="0.0.0.0").check_exposure()  # the environment's key counts
    assert resolve_api_key(None) == "from-env" and resolve_api_key("cli") == "cli"


def test_the_environment_key_is_enforced_by_the_app(monkeypatch):
    monkeypatch.setenv("DISCO_API_KEY", "env-key")
    srv = BackgroundServer(create_app(make_agent()))
    url = srv.start()
    try:
        body = {"prompt": "hi", "max_tokens": 2}
        assert httpx.post(url + "/v1/completions", json=body).status_code == 401
        ok = httpx.post(url + "/v1/completions", json=body,
                        headers={"Authorization": "Bearer env-key"})  # fmt: skip
        assert ok.status_code == 200
    finally:
        srv.stop()


def test_no_endpoint_left_gives_503_not_500():
    agent = make_agent(Script(ttft=0.01, fail_after=0), Script(ttft=0.01, fail_after=0))
    srv = BackgroundServer(create_app(agent))
    url = srv.start()
    try:
        for stream in (False, True):
            r = httpx.post(
                url + "/v1/completions", json={"prompt": "x", "stream": stream}, timeout=10
            )
            err = r.json()["error"]
            assert r.status_code == 503 and "failed" in err["message"]
            assert (err["type"], err["code"]) == ("server_error", "engine_failed")
    finally:
        srv.stop()
    assert agent.metrics.failed == 2


def test_client_going_away_stops_the_endpoints():
    agent = make_agent(
        Script(ttft=0.01, tbt=0.05, length=200), Script(ttft=0.01, tbt=0.05, length=200)
    )
    srv = BackgroundServer(create_app(agent))
    url = srv.start()
    try:
        body = {"prompt": "x", "stream": True, "max_tokens": 200}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=10) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]
        assert all(line.startswith("data: ") or not line for line in got)
        ends = agent.coordinator.endpoints.values()

        def stopped():
            return agent.metrics.cancelled, sum(ep.closed_early for ep in ends)

        deadline = time.monotonic() + 5
        while stopped() != (1, 2) and time.monotonic() < deadline:
            time.sleep(0.02)  # bounded wait for the server to notice the disconnect
        assert stopped() == (1, 2)  # the request counted as cancelled; winner and loser stopped
    finally:
        srv.stop()


def test_one_app_over_a_fleet_routes_by_device():
    from disco.device_agents.config import FleetConfig, NetworkConfig
    from disco.device_agents.fleet import EmulatedFleet

    fleet = EmulatedFleet(FleetConfig(devices=3, time_scale=0.02, network=NetworkConfig(1, 0)))
    srv = BackgroundServer(create_app(fleet.agents))
    url = srv.start()
    try:
        body = {"prompt": "hi", "max_tokens": 4}
        r = httpx.post(url + "/v1/completions", json=body, headers={"X-Disco-Device": "emu-2"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        r = httpx.post(url + "/v1/completions", json=body | {"user": "emu-0"})
        assert r.status_code == 200
        assert httpx.post(url + "/v1/completions", json=body).status_code == 400
        assert httpx.post(url + "/v1/completions", json=body | {"user": "emu-9"}).status_code == 404
        assert [fleet.agents[f"emu-{i}"].metrics.completed for i in range(3)] == [1, 0, 1]
        text = httpx.get(url + "/metrics").text
        assert 'disco_agent_requests_completed_total{devices="3"} 2' in text
        assert 'disco_agent_requests_rejected_total{devices="3"} 2' in text
    finally:
        srv.stop()


def test_the_app_answers_to_the_model_names_it_is_given():
    srv = BackgroundServer(create_app(make_agent(), models=("small", "alias")))
    url = srv.start()
    try:
        listed = httpx.get(url + "/v1/models").json()["data"]
        assert [m["id"] for m in listed] == ["small", "alias"]
        body = {"prompt": "hi", "max_tokens": 2}
        r = httpx.post(url + "/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["model"] == "small"  # the first is the default
        assert httpx.post(url + "/v1/completions", json=body | {"model": "alias"}).status_code == 200
        assert httpx.post(url + "/v1/completions", json=body | {"model": "disco"}).status_code == 404
    finally:
        srv.stop()
