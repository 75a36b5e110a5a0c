"""The device agent's OpenAI-compatible HTTP API (Starlette): the user side of the testbed.

Routes: POST /v1/completions, POST /v1/chat/completions (SSE with ``"stream": true``, JSON
otherwise), GET /v1/models, GET /health, GET /metrics (Prometheus text).
The wire format (body parsing, chunks, errors, the ``disco`` extension that tells which endpoint
produced each token) is :mod:`disco.scheduler.wire`'s, the same as the Serve app's.
Chat messages are rendered with the device engine's own chat template (a GGUF's, for llama.cpp)
and travel on with the request, so that the server renders them with its own model's template.
Bad input is answered with a 4xx JSON error in OpenAI's shape, never a 500 or a hang: the body is
read with a size cap, every field is checked before any work starts. The API binds 127.0.0.1 by
default; any other address needs an API key, which is then checked on every request.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from disco.scheduler import wire
from disco.scheduler.endpoint import InvalidRequestError
from disco.scheduler.types import EndpointKind, TokenEvent

from .agent import DeviceAgent, DeviceSaturatedError
from .config import API_KEY_ENV, HttpConfig
from .coordinator import Execution, StreamFailedError
from .drain import Drain, DrainMiddleware
from .snapshot_planner import render_status
from .telemetry import AgentMetrics, merge_metrics


def resolve_api_key(cli_value: str | None) -> str | None:
    """``--api-key`` wins over the environment variable DISCO_API_KEY."""
    return cli_value or os.environ.get(API_KEY_ENV) or None


def _response(err: wire.ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


DEVICE_HEADER = "x-disco-device"


def create_app(
    agent: DeviceAgent | Mapping[str, DeviceAgent],
    config: HttpConfig | None = None,
    *,
    models: tuple[str, ...] = ("disco",),
    chat_template: wire.ChatTemplate | None = None,
    drain: Drain | None = None,
) -> Starlette:
    """The ASGI app over one agent, or over many (an emulated fleet: ``fleet.agents``).

    ``models``: the accepted ``model`` names (the first is the default); ``chat_template`` turns
    chat messages into the prompt; None: each agent's device engine's own template
    (:func:`wire.chat_template_of`: a GGUF's for llama.cpp). The messages travel on with the
    request, so that a server endpoint renders them with its own model's template. ``drain``
    (:class:`~disco.device_agents.drain.Drain`) lets a graceful shutdown refuse new requests
    (503) and end the streams still open with an error event (``disco agent`` on SIGTERM).

    With many agents a request names its device with the ``X-Disco-Device`` header or OpenAI's
    ``user`` field; /metrics then sums the devices. The cluster side can mount the app or serve it
    with uvicorn (see :func:`serve` and :class:`BackgroundServer`).
    """
    cfg = config or HttpConfig()
    if not models:
        raise ValueError("create_app needs at least one model name")
    agents = {agent.config.device_id: agent} if isinstance(agent, DeviceAgent) else dict(agent)
    if not agents:
        raise ValueError("create_app needs at least one agent")
    only = next(iter(agents.values())) if len(agents) == 1 else None
    # One template for every request (one agent, or one given), else each device's own.
    shared = chat_template or (_device_template(only) if only is not None else None)
    rejected = AgentMetrics()  # requests refused before reaching any device

    def pick(request: Request, user: str | None) -> DeviceAgent:
        if only is not None:
            return only
        name = request.headers.get(DEVICE_HEADER) or user
        if not name:
            raise wire.ApiError(
                400, "name a device: X-Disco-Device header or the user field", param="user"
            )
        if name not in agents:
            raise wire.ApiError(
                404, f"no device {name!r} here", code="device_not_found", param="user"
            )
        return agents[name]

    async def generate(request: Request, chat: bool) -> Response:
        try:
            raw = await wire.read_body(
                request.stream(), request.headers.get("content-length"), cfg.max_body_bytes
            )
            p = wire.parse_request(
                wire.parse_json(raw),
                chat=chat,
                models=models,
                max_tokens_limit=cfg.max_tokens_limit,
                chat_template=shared or wire.default_chat_template,
            )
            agent = pick(request, p.user)
            if p.chat and shared is None:
                p = _rendered(p, _device_template(agent))
            ex = await agent.start(p.request)
        except wire.ApiError as e:
            if not isinstance(e, DeviceSaturatedError):  # counted by the agent as refused
                rejected.rejected += 1
            return _response(e)
        except InvalidRequestError as e:
            rejected.rejected += 1
            return _response(wire.ApiError(400, str(e)))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{ex.request_id}"
        head = wire.ResponseHead(rid, p.model, int(time.time()), chat)
        try:
            first = await ex.__anext__()  # fail before the headers if nothing can be served
        except (StreamFailedError, StopAsyncIteration) as e:
            await ex.aclose()
            return _response(wire.engine_failed(f"no endpoint could serve the request: {e}"))
        except BaseException:
            await ex.aclose()
            raise
        if p.stream:
            stream = _sse(ex, first, head, p)
            if drain is not None:  # a graceful shutdown can end it with an error event
                stream = drain.track(stream)
            return StreamingResponse(
                stream, media_type=wire.SSE_MEDIA_TYPE, headers=wire.SSE_HEADERS
            )
        return await _whole(ex, first, head)

    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    async def health(request: Request) -> Response:
        body: dict[str, Any] = {"status": "ok", "devices": len(agents)}
        if only is not None:
            body["device_id"] = only.config.device_id
        return JSONResponse(body)

    async def list_models(request: Request) -> Response:
        data = [{"id": m, "object": "model", "owned_by": "disco"} for m in models]
        return JSONResponse({"object": "list", "data": data})

    async def prometheus(request: Request) -> Response:
        total = merge_metrics([rejected, *(a.metrics for a in agents.values())])
        if only is not None:
            labels = f'device_id="{_label(only.config.device_id)}"'
        else:
            labels = f'devices="{len(agents)}"'
        text = total.render(labels=labels)
        seen: set[int] = set()
        for a in agents.values():  # snapshot planners (issue 11): one holder, shown once
            status = getattr(a.planner, "status", None)
            if status is not None and id(a.planner) not in seen:
                seen.add(id(a.planner))
                text += render_status(status())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    key = cfg.key()  # the config's, else DISCO_API_KEY's
    if key:
        app.add_middleware(_ApiKeyMiddleware, api_key=key)
    if drain is not None:  # outermost: while draining, every request but /metrics is a 503
        app.add_middleware(DrainMiddleware, drain=drain)
    return app


def _device_template(agent: DeviceAgent) -> wire.ChatTemplate:
    return wire.chat_template_of(agent.coordinator.endpoints.get(EndpointKind.DEVICE))


def _rendered(p: wire.ApiRequest, template: wire.ChatTemplate) -> wire.ApiRequest:
    """``p`` with its chat messages rendered by ``template``."""
    if template is wire.default_chat_template:
        return p  # parse_request rendered them with it already
    prompt = template(p.request.chat_messages() or [])
    return replace(p, request=replace(p.request, prompt=prompt))


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 in the same JSON shape as every other error."""
    status = getattr(exc, "status_code", 400)
    detail = str(getattr(exc, "detail", "") or exc)
    err = wire.route_error(status, detail, request.method, request.url.path)
    return JSONResponse(err.body(), status_code=status, headers=getattr(exc, "headers", None))


class _ApiKeyMiddleware:
    """Checks ``Authorization: Bearer <key>`` on every HTTP request (pure ASGI: streams pass)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.key = api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            try:
                header = dict(scope.get("headers") or []).get(b"authorization")
                wire.check_api_key(header, self.key)
            except wire.ApiError as err:
                await _response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _label(value: str) -> str:
    """Escape a Prometheus label value."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def _sse(
    ex: Execution, first: TokenEvent, head: wire.ResponseHead, p: wire.ApiRequest
) -> AsyncIterator[str]:
    sent = 1
    try:
        yield wire.sse(wire.chunk(head, [first], first=True))
        async for ev in ex:
            sent += 1
            yield wire.sse(wire.chunk(head, [ev]))
        if p.include_usage:
            yield wire.sse(wire.usage_chunk(head, _usage(ex, sent)))
    except StreamFailedError as e:
        yield wire.sse(wire.engine_failed(str(e)).event())  # no [DONE]: the stream broke
        return
    finally:
        await ex.aclose()  # the client may have gone away: stop every endpoint
    yield wire.SSE_DONE


async def _whole(ex: Execution, first: TokenEvent, head: wire.ResponseHead) -> Response:
    events = [first]
    try:
        events += [ev async for ev in ex]
    except StreamFailedError as e:
        return _response(wire.engine_failed(str(e)))
    finally:
        await ex.aclose()
    o = ex.outcome
    body = wire.completion(head, events, _usage(ex, len(events)), o.migrated_at if o else None)
    return JSONResponse(body)


def _usage(ex: Execution, completion_tokens: int) -> wire.Usage:
    """The prompt as the agent counted it for planning (the device engine's tokenizer)."""
    o = ex.outcome
    return wire.Usage(o.prompt_tokens if o else 0, completion_tokens)


async def serve(agent: DeviceAgent, config: HttpConfig) -> None:
    """Serve the agent's API until cancelled or signalled (uvicorn's own shutdown; ``disco
    agent`` drains instead: :func:`disco.device_agents.drain.serve_until_signalled`)."""
    import uvicorn

    config.check_exposure()

    server = uvicorn.Server(
        uvicorn.Config(
            create_app(agent, config),
            host=config.host,
            port=config.port,
            log_level="warning",
            lifespan="off",
        )  # fmt: skip
    )
    await server.serve()


class BackgroundServer:
    """uvicorn in a daemon thread (tests, notebooks, an agent inside a larger process)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout_s: float = 10.0) -> str:
        """Start serving; returns the base URL (``http://host:port``)."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)
