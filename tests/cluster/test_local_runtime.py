"""One local Ray for the whole module: the Serve app over HTTP and the scheduler actor.

Run from the repository root (Ray workers import ``tests.cluster.doubles`` from there).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

import httpx
import pytest
from needs import require

ray = require("ray")
serve = require("ray.serve")

from disco.cluster.config import HttpConfig, SchedulerConfig, ServerConfig  # noqa: E402
from disco.cluster.planner_client import ActorPlanner  # noqa: E402
from disco.cluster.runtime import deploy_server, free_port, server_url  # noqa: E402
from disco.cluster.scheduler_actor import start_scheduler  # noqa: E402
from disco.scheduler.types import EndpointKind, Request, RequestOutcome  # noqa: E402

FAST_SERVER = {"profile": "gpt-4o-mini", "time_scale": 0.01}


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, namespace="disco-test", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def server(cluster):
    cfg = ServerConfig(engine="emulated", engine_kwargs=FAST_SERVER, num_cpus=0.1)
    handle = deploy_server(cfg)
    return server_url(cfg, cluster), handle


def _sse_events(url: str, body: dict, headers: dict | None = None) -> tuple[list[dict], bool]:
    chunks, done = [], False
    with (
        httpx.Client(timeout=30, headers=headers) as c,
        c.stream("POST", f"{url}/v1/completions", json=body) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunks.append(json.loads(line[6:]))
    return chunks, done


def test_serve_streams_one_chunk_per_token_in_order(server):
    url, _ = server
    chunks, done = _sse_events(url, {"prompt": "Hello there", "max_tokens": 12, "stream": True})
    assert done
    assert [c["disco"]["index"] for c in chunks] == list(range(12))
    assert all(c["object"] == "text_completion" and len(c["choices"]) == 1 for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_prefix_resume_continues_the_same_text(server):
    url, _ = server
    full, _ = _sse_events(url, {"prompt": "Say it", "max_tokens": 10, "stream": True})
    text = [c["choices"][0]["text"] for c in full]
    resumed, done = _sse_events(
        url,
        {
            "prompt": "Say it",
            "max_tokens": 6,
            "stream": True,
            "prefix": "".join(text[:4]),
            "start_index": 4,
        },
    )
    assert done
    assert [c["disco"]["index"] for c in resumed] == list(range(4, 10))
    assert [c["choices"][0]["text"] for c in resumed] == text[4:]


def test_official_openai_client_streams(server):
    openai = require("openai")
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    stream = client.completions.create(model="disco-server", prompt="Hi", max_tokens=5, stream=True)
    texts = [c.choices[0].text for c in stream]
    assert len(texts) == 5 and all(texts)


@pytest.mark.parametrize(
    "body,status",
    [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        (b'{"max_tokens": 5}', 400),
        (b'{"prompt": "   "}', 400),
        (b'{"prompt": "x", "max_tokens": 0}', 400),
        (b'{"prompt": "x", "max_tokens": 100000000}', 400),
        (b'{"prompt": "x", "max_tokens": "5"}', 400),
        (b'{"prompt": "x", "model": "gpt-9"}', 404),
        (b'{"prompt": "' + b"a" * 1_100_000 + b'"}', 413),
        (b"[" * 50_000, 400),  # nested past the parser's recursion limit, under the cap
        (b'{"prompt": "x", "top_p": 0}', 400),
    ],
)
def test_bad_input_is_a_4xx_json_error(server, body, status):
    url, _ = server
    r = httpx.post(
        f"{url}/v1/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == status
    assert r.json()["error"]["message"]


def test_engine_context_limit_is_a_400_not_a_broken_stream(server):
    url, _ = server
    r = httpx.post(
        f"{url}/v1/completions",
        json={"prompt": "x", "max_tokens": 4, "stream": True, "prompt_tokens_hint": 100_000},
        timeout=30,
    )
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]


async def test_handle_generate_streams_chunks(server):
    _, handle = server
    gen = handle.options(stream=True).generate.remote({"prompt": "Hi", "max_tokens": 4})
    chunks = [c async for c in gen]
    assert [c["disco"]["index"] for c in chunks] == [0, 1, 2, 3]
    bad = [c async for c in handle.options(stream=True).generate.remote({"prompt": ""})]
    assert bad[0]["status"] == 400


def test_client_disconnect_cancels_the_engine(server):
    url, handle = server
    before = handle.engine_stats.remote().result()
    body = {"prompt": "Hi", "max_tokens": 2000, "stream": True}
    with httpx.Client(timeout=30) as c, c.stream("POST", f"{url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        got = [ln for ln in (next(lines) for _ in range(6)) if ln.startswith("data: ")]
        assert got  # a few tokens arrived, then the client goes away mid-stream
    for _ in range(200):  # bounded wait for the replica to see the disconnect
        after = handle.engine_stats.remote().result()
        if after["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.05)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["active"] == 0 and after["tokens"] - before["tokens"] < 2000


def test_batched_app_with_api_key(cluster):
    """A second app: Serve-LLM-style stream batching on (20 ms) and an API key required."""
    cfg = ServerConfig(
        engine="emulated", engine_kwargs=FAST_SERVER, num_cpus=0.1, app_name="batched",
        route_prefix="/batched", stream_batching_interval_ms=20,
        http=HttpConfig(api_key="sesame"),
    )  # fmt: skip
    deploy_server(cfg)
    url = server_url(cfg, cluster)
    body = {"prompt": "Hi", "max_tokens": 15, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        chunks, done = _sse_events(url, body, {"Authorization": "Bearer sesame"})
        assert done
        assert [c["disco"]["index"] for c in chunks[:-1]] == list(range(15))
        assert chunks[-1]["usage"]["completion_tokens"] == 15
    finally:
        serve.delete("batched")


def test_chunked_upload_over_the_cap_is_a_413(server):
    url, _ = server

    def parts():  # no Content-Length: the cap applies while reading
        for _ in range(12):
            yield b"x" * 100_000

    r = httpx.post(f"{url}/v1/completions", content=parts(), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["message"]


# ---- the replica class in-process (no Serve): body bound, engine streams closed -------------


class _Events:
    """An engine stream that yields ``n`` tokens, then raises ``fail`` (or ends); counts
    ``aclose``."""

    def __init__(self, n: int, fail: BaseException | None) -> None:
        self.n, self.fail, self.i, self.closed = n, fail, 0, 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        from disco.scheduler.types import TokenEvent

        if self.i < self.n:
            self.i += 1
            return TokenEvent(index=self.i - 1, text="t", time=0.0)
        if self.fail is not None:
            raise self.fail
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed += 1


class _Engine:
    def __init__(self, n: int, fail: BaseException | None) -> None:
        self.n, self.fail, self.streams = n, fail, []

    def stream(self, req):
        self.streams.append(_Events(self.n, self.fail))
        return self.streams[-1]

    def count_tokens(self, text: str) -> int:
        return len(text.split())


def _replica(engine=None, **cfg):
    from dataclasses import asdict

    from disco.cluster.serve_app import DiscoServer

    cls = DiscoServer.func_or_class.__mro__[1]  # the user class under @serve.ingress
    assert "completions" in cls.__dict__

    class Local(cls):
        def __del__(self) -> None:  # Serve awaits the async one; nothing would here
            pass

    conf = ServerConfig(engine="emulated", engine_kwargs=FAST_SERVER, **cfg)
    replica = Local(asdict(conf))
    if engine is not None:
        replica.engine = engine
    return replica


def _request(chunks, headers=()):
    from starlette.requests import Request as StarletteRequest

    it = iter(chunks)

    async def receive():  # an empty part ends the body
        part = next(it)
        return {"type": "http.request", "body": part, "more_body": part != b""}

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"",
             "headers": [(k.encode(), v.encode()) for k, v in headers]}  # fmt: skip
    return StarletteRequest(scope, receive)


async def test_a_body_without_length_is_read_only_up_to_the_cap():
    from disco.scheduler.wire import ApiError

    replica = _replica(http=HttpConfig(max_body_bytes=4096))
    sent = []

    def endless():  # a client that never stops sending
        while True:
            assert len(sent) < 50, "the replica read far past its body cap"
            sent.append(1)
            yield b" " * 1000

    with pytest.raises(ApiError) as e:
        await replica.completions(_request(endless()))
    assert e.value.status == 413 and len(sent) <= 5


# (a failure after the SSE headers went out is the SSE generator's, which closes the stream)
@pytest.mark.parametrize(("stream", "n_before_failure"), [(False, 0), (True, 0), (False, 2)])
async def test_the_engine_stream_is_closed_when_the_request_fails(stream, n_before_failure):
    from disco.scheduler.endpoint import EndpointFailedError
    from disco.scheduler.wire import ApiError

    engine = _Engine(n_before_failure, EndpointFailedError("engine died"))
    replica = _replica(engine)
    body = json.dumps({"prompt": "hi", "max_tokens": 5, "stream": stream}).encode()
    with pytest.raises(ApiError) as e:
        await replica.completions(_request([body, b""]))
    assert e.value.status == 503
    assert engine.streams[0].closed >= 1


async def test_the_engine_stream_is_closed_after_a_whole_completion():
    engine = _Engine(3, None)
    replica = _replica(engine)
    body = json.dumps({"prompt": "hi", "max_tokens": 5}).encode()
    out = await replica.completions(_request([body, b""]))
    assert out["choices"][0]["text"] == "ttt"
    assert engine.streams[0].closed >= 1


async def test_usage_counts_the_prompt_with_the_engine_not_the_hint():
    replica = _replica(_Engine(3, None))
    body = {"prompt": "one two three", "max_tokens": 5, "prompt_tokens_hint": 99}
    out = await replica.completions(_request([json.dumps(body).encode(), b""]))
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


async def test_the_chat_route_answers_in_the_chat_shape():
    replica = _replica(_Engine(2, None))
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    out = await replica.chat_completions(_request([json.dumps(body).encode(), b""]))
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "tt"}


async def test_handle_generate_closes_the_engine_stream_on_a_first_token_failure():
    from disco.scheduler.endpoint import EndpointFailedError

    engine = _Engine(0, EndpointFailedError("engine died"))
    replica = _replica(engine)
    out = [c async for c in replica.generate({"prompt": "hi", "max_tokens": 5})]
    assert out[0]["status"] == 503 and engine.streams[0].closed >= 1


class _LocalHandle:
    """A DeploymentHandle stand-in: ``options(stream=True).generate.remote(body)`` iterates the
    in-process replica's ``generate`` (what Serve would run in the replica)."""

    def __init__(self, replica) -> None:
        self.replica, self.cancelled = replica, 0

    def options(self, stream: bool):
        assert stream
        return self

    @property
    def generate(self):
        return self

    def remote(self, body):
        outer, gen = self, self.replica.generate(body)

        class Response:
            def __aiter__(self):
                return gen

            def cancel(self):
                outer.cancelled += 1

        return Response()


async def test_the_handle_endpoint_reads_the_replicas_chunks():
    from disco.cluster.handle_endpoint import ServeHandleEndpoint
    from disco.scheduler.endpoint import (
        EndpointFailedError,
        GenerationRequest,
        InvalidRequestError,
    )

    handle = _LocalHandle(_replica())
    ep = ServeHandleEndpoint(handle, "disco-server")
    req = GenerationRequest("Hi", 4, prefix="so far", start_index=3)
    events = [ev async for ev in ep.stream(req)]
    assert [e.index for e in events] == [3, 4, 5, 6] and all(e.text for e in events)
    assert events[-1].finish_reason == "length" and handle.cancelled == 1
    with pytest.raises(InvalidRequestError, match="context"):  # the replica's 400
        await anext(ep.stream(GenerationRequest("Hi", 4, prompt_tokens_hint=100_000)))
    failing = _replica(_Engine(2, EndpointFailedError("x")))
    broken = ServeHandleEndpoint(_LocalHandle(failing), "disco-server")
    got = []
    with pytest.raises(EndpointFailedError, match="x"):
        async for ev in broken.stream(GenerationRequest("Hi", 4)):
            got.append(ev)
    assert len(got) == 2


# ---- scheduler actor --------------------------------------------------------------------------


def _outcome(i: int) -> RequestOutcome:
    return RequestOutcome(
        request_id=f"o{i}",
        arrival=0.0,
        prompt_tokens=100,
        server_prompt_tokens=100,
        device_prompt_tokens=100,
        first_token_from=EndpointKind.SERVER,
    )


def _kill_and_wait_for_restart(actor) -> None:
    """Kill the actor's process and wait until Ray has restarted it (a new pid answers)."""
    pid = ray.get(actor.ping.remote())
    ray.kill(actor, no_restart=False)
    for _ in range(600):
        try:
            if ray.get(actor.ping.remote(), timeout=30) != pid:
                return
        except ray.exceptions.RayActorError:
            pass
        time.sleep(0.05)
    raise AssertionError("the scheduler actor did not restart")


def _sched_cfg(name: str, **kw) -> SchedulerConfig:
    return SchedulerConfig(
        policy="tests.cluster.doubles:CountingPolicy", regime="device", actor_name=name, **kw
    )


def test_scheduler_plans_and_accounts_budget(cluster):
    actor = start_scheduler(_sched_cfg("sched-a"))
    try:
        plan = ray.get(actor.plan.remote(Request("r1", 0.0, 50)))
        assert plan.request_id == "r1" and plan.device_start == 0.0
        plans = ray.get(actor.plan_many.remote([Request(f"r{i}", 0.0, 50) for i in range(7)]))
        assert [p.request_id for p in plans] == [f"r{i}" for i in range(7)]
        ray.get(actor.report_many.remote([_outcome(i) for i in range(4)]))
        stats = ray.get(actor.stats.remote())
        assert stats["plans"] == 8 and stats["ledger"]["requests"] == 4
        assert stats["spent_ratio"] == pytest.approx(1.0)
    finally:
        ray.kill(actor, no_restart=True)


@pytest.mark.parametrize("interval", [0.0, 0.05])
def test_scheduler_restart_keeps_budget_state(cluster, interval):
    actor = start_scheduler(_sched_cfg(f"sched-r{interval}", checkpoint_interval_s=interval))
    try:
        # 10 x 100 device prompt tokens exhaust the double's budget: it stops using the device
        ray.get(actor.report_many.remote([_outcome(i) for i in range(10)]))
        if interval:
            ray.get(actor.checkpoint.remote())
        assert ray.get(actor.plan.remote(Request("a", 0.0, 5))).device_start is None
        _kill_and_wait_for_restart(actor)
        stats = ray.get(actor.stats.remote(), timeout=60)
        assert stats["restores"] == 1
        assert stats["ledger"]["requests"] == 10 and stats["ledger"]["device_prompt_tokens"] == 1000
        assert ray.get(actor.plan.remote(Request("b", 0.0, 5))).device_start is None
    finally:
        ray.kill(actor, no_restart=True)


async def test_agents_fallback_is_read_from_the_live_actor_and_follows_reconfigure(cluster):
    from disco.cluster.config import to_dict

    cfg = SchedulerConfig(policy="disco", regime="server", budget=0.4, actor_name="sched-fb",
                          checkpoint="none")  # fmt: skip
    actor = start_scheduler(cfg)
    try:
        planner = ActorPlanner.connect(actor, refresh_s=0.0)
        assert planner.fallback.config == to_dict(cfg)
        assert planner.fallback.local.policy.name == "disco"
        await actor.reconfigure.remote(to_dict(replace(cfg, policy="length", budget=0.1)))
        await planner.refresh()
        assert planner.fallback.local.policy.name == "length"
        assert planner.fallback.local.policy.config.budget == 0.1
    finally:
        ray.kill(actor, no_restart=True)


def test_scheduler_restart_keeps_a_reconfigured_config(cluster):
    from disco.cluster.config import to_dict

    cfg = _sched_cfg("sched-reconf", checkpoint_interval_s=0.05)
    actor = start_scheduler(cfg)
    try:
        assert ray.get(actor.plan.remote(Request("a", 0.0, 5))).device_start == 0.0
        new = replace(cfg, policy="tests.cluster.doubles:ServerOnlyPolicy", regime="server",
                      budget=0.2)  # fmt: skip
        ray.get(actor.reconfigure.remote(to_dict(new)))
        _kill_and_wait_for_restart(actor)
        stats = ray.get(actor.stats.remote(), timeout=60)
        assert stats["restores"] == 1
        assert stats["config"] == to_dict(new)  # not the creation-time config
        assert stats["policy"] == "server-only" and stats["regime"] == "server"
        assert ray.get(actor.plan.remote(Request("b", 0.0, 5))).device_start is None
    finally:
        ray.kill(actor, no_restart=True)


async def test_requests_keep_flowing_through_a_scheduler_restart(cluster):
    actor = start_scheduler(_sched_cfg("sched-flow", checkpoint_interval_s=0.0))
    planner = ActorPlanner(actor)
    try:
        first = await asyncio.gather(*(planner.plan(Request(f"a{i}", 0.0, 5)) for i in range(50)))
        assert len(first) == 50
        await asyncio.gather(*(planner.report(_outcome(i)) for i in range(3)))
        pid = await actor.ping.remote()
        ray.kill(actor, no_restart=False)
        # calls made while the actor restarts are retried by Ray and answered by the new one
        plans = await asyncio.gather(*(planner.plan(Request(f"b{i}", 0.0, 5)) for i in range(50)))
        assert [p.request_id for p in plans] == [f"b{i}" for i in range(50)]
        for _ in range(600):  # the restart may finish after those calls were answered
            if await actor.ping.remote() != pid:
                break
            await asyncio.sleep(0.05)
        stats = await actor.stats.remote()
        assert stats["restores"] == 1 and stats["ledger"]["requests"] == 3
    finally:
        ray.kill(actor, no_restart=True)


@pytest.mark.parametrize(
    "server,needle",
    [
        (ServerConfig(num_replicas=10, num_cpus=1.0), "needs 10 CPUs"),
        (ServerConfig(resources={"disco_server": 1}), "no Ray node offers it"),
    ],
)
def test_testbed_refuses_what_the_cluster_cannot_place(cluster, server, needle):
    from disco.cluster.config import ConfigError, TestbedConfig
    from disco.cluster.runtime import Testbed

    with pytest.raises(ConfigError, match=needle):
        Testbed.start(TestbedConfig(server=server))
    assert ray.is_initialized()  # it did not own Ray, so it left it running


def test_restart_device_side_gives_fresh_actors_and_per_device_http(cluster):
    """What ``disco demo`` does per policy: a new scheduler, fleet (HTTP front per device) and
    counters, while Ray, Serve and the server app stay up."""
    from disco.cluster.config import FleetConfig, NetworkConfig, TestbedConfig
    from disco.cluster.runtime import Testbed

    cfg = TestbedConfig(
        server=ServerConfig(engine="emulated", engine_kwargs=FAST_SERVER, num_cpus=0.1,
                            app_name="restart", route_prefix="/restart"),
        scheduler=SchedulerConfig(policy="race", actor_name="sched-restart", checkpoint="none"),
    )  # fmt: skip
    fleet = FleetConfig(devices=2, time_scale=0.01,
                        network=NetworkConfig(rtt_ms=1, jitter_ms=0, distribution="constant"))  # fmt: skip
    tb = Testbed.start(cfg)
    try:
        assert tb.fleets == [] and tb.device_urls == []
        tb.restart_device_side(fleet=fleet, fleet_http=True)
        assert len(tb.fleets) == 1 and len(tb.device_urls) == 2
        first = tb.scheduler
        for url in tb.device_urls:
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3},
                           timeout=60)  # fmt: skip
            assert r.status_code == 200, r.text
        assert ray.get(tb.scheduler.stats.remote())["plans"] == 2
        tb.restart_device_side(replace(cfg.scheduler, policy="server-only"), fleet=fleet,
                               fleet_http=True)  # fmt: skip
        assert tb.scheduler is not first and tb.config.scheduler.policy == "server-only"
        stats = ray.get(tb.scheduler.stats.remote())
        assert stats["plans"] == 0 and stats["policy"] == "server-only"
        assert ray.get(tb.fleets[0].stats.remote())["completed"] == 0
        assert httpx.get(f"{tb.device_urls[0]}/health", timeout=10).status_code == 200
        tb.stop_device_side()
        assert tb.scheduler is None and tb.fleets == [] and tb.device_urls == []
    finally:
        tb.shutdown()
    assert ray.is_initialized()  # it did not own Ray
