"""The device agent's OpenAI-compatible HTTP API (Starlette): the user side of the testbed.

Routes: POST /v1/completions, POST /v1/chat/completions (SSE with ``"stream": true``, JSON
otherwise), GET /v1/models, GET /health, GET /metrics (Prometheus text).
Bad input is answered with a 4xx JSON error in OpenAI's shape, never a 500 or a hang: the body is
read with a size cap, every field is checked before any work starts. The API binds 127.0.0.1 by
default; any other address needs an API key, which is then checked on every request.
Each SSE chunk carries a ``disco`` field (token index and which endpoint produced it) that the
OpenAI client ignores and our load generator reads.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from disco.scheduler.endpoint import GenerationRequest, InvalidRequestError
from disco.scheduler.types import TokenEvent

from .agent import DeviceAgent
from .coordinator import Execution, StreamFailedError
from .telemetry import AgentMetrics, merge_metrics

API_KEY_ENV = "DISCO_API_KEY"


def resolve_api_key(cli_value: str | None) -> str | None:
    """``--api-key`` wins over the environment variable DISCO_API_KEY."""
    return cli_value or os.environ.get(API_KEY_ENV) or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_chat_template(messages: list[dict[str, str]]) -> str:
    """A plain role-prefixed transcript; engines with a chat template may reformat it."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_tokens_cap: int = 4096
    default_max_tokens: int = 256
    models: tuple[str, ...] = ("disco",)  # accepted model names; the first is the default
    chat_template: Callable[[list[dict[str, str]]], str] = default_chat_template

    def __post_init__(self) -> None:
        if not is_loopback(self.host) and not self.api_key:
            raise ValueError(
                f"binding {self.host} exposes the agent: set an API key (--api-key or "
                f"{API_KEY_ENV}) or bind 127.0.0.1"
            )
        if not self.models:
            raise ValueError("HttpConfig.models must name at least one model")
        if self.max_tokens_cap <= 0 or not 0 < self.default_max_tokens <= self.max_tokens_cap:
            raise ValueError("need 0 < default_max_tokens <= max_tokens_cap")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}  # fmt: skip
        return JSONResponse(body, status_code=self.status)


@dataclass(frozen=True, slots=True)
class _Parsed:
    gen: GenerationRequest
    model: str
    stream: bool
    chat: bool


DEVICE_HEADER = "x-disco-device"


def create_app(
    agent: DeviceAgent | Mapping[str, DeviceAgent], config: HttpConfig | None = None
) -> Starlette:
    """The ASGI app over one agent, or over many (an emulated fleet: ``fleet.agents``).

    With many agents a request names its device with the ``X-Disco-Device`` header or OpenAI's
    ``user`` field; /metrics then sums the devices. The cluster side can mount the app or serve it
    with uvicorn (see :func:`serve` and :class:`BackgroundServer`).
    """
    cfg = config or HttpConfig()
    agents = {agent.config.device_id: agent} if isinstance(agent, DeviceAgent) else dict(agent)
    if not agents:
        raise ValueError("create_app needs at least one agent")
    only = next(iter(agents.values())) if len(agents) == 1 else None
    rejected = AgentMetrics()  # requests refused before reaching any device

    def pick(request: Request, data: dict[str, Any]) -> DeviceAgent:
        if only is not None:
            return only
        name = request.headers.get(DEVICE_HEADER) or data.get("user")
        if not isinstance(name, str) or not name:
            raise ApiError(
                400, "name a device: X-Disco-Device header or the user field", param="user"
            )
        if name not in agents:
            raise ApiError(404, f"no device {name!r} here", "not_found_error", "user")
        return agents[name]

    async def body_json(request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, "bad Content-Length header")
            if int(declared) > cfg.max_body_bytes:
                raise ApiError(413, f"request body over {cfg.max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cfg.max_body_bytes:
                raise ApiError(413, f"request body over {cfg.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "request body is not valid JSON") from None
        except RecursionError:
            raise ApiError(400, "request body is not valid JSON: nested too deeply") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        return data

    def parse(data: dict[str, Any], chat: bool) -> _Parsed:
        model = data.get("model", cfg.models[0])
        if not isinstance(model, str) or model not in cfg.models:
            raise ApiError(404, f"unknown model {model!r} (served: {', '.join(cfg.models)})",
                           "model_not_found", "model")  # fmt: skip
        if chat:
            prompt = cfg.chat_template(_messages(data.get("messages")))
            mt = data.get("max_completion_tokens", data.get("max_tokens"))
        else:
            prompt = _prompt(data.get("prompt"))
            mt = data.get("max_tokens")
        max_tokens = cfg.default_max_tokens if mt is None else mt
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise ApiError(400, "max_tokens must be an integer", param="max_tokens")
        if not 0 < max_tokens <= cfg.max_tokens_cap:
            raise ApiError(
                400, f"max_tokens must be in 1..{cfg.max_tokens_cap}", param="max_tokens"
            )
        if data.get("n", 1) != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        stream = data.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be a boolean", param="stream")
        # Types here; the ranges are GenerationRequest.validate's (below), shared with the server.
        temperature = _number(data, "temperature", 0.0)
        top_p = _number(data, "top_p", 1.0)
        seed = data.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ApiError(400, "seed must be an integer", param="seed")
        gen = GenerationRequest(prompt, max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        try:
            gen.validate()
        except InvalidRequestError as e:
            raise ApiError(400, str(e)) from None
        return _Parsed(gen, model, stream, chat)

    async def generate(request: Request, chat: bool) -> Response:
        try:
            data = await body_json(request)
            p = parse(data, chat)
            agent = pick(request, data)
            ex = await agent.start(p.gen)
        except ApiError as e:
            rejected.rejected += 1
            return e.response()
        except InvalidRequestError as e:
            rejected.rejected += 1
            return ApiError(400, str(e)).response()
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{ex.request_id}"
        try:
            first = await ex.__anext__()  # fail before the headers if nothing can be served
        except (StreamFailedError, StopAsyncIteration) as e:
            await ex.aclose()
            return ApiError(
                503, f"no endpoint could serve the request: {e}", "server_error"
            ).response()
        except BaseException:
            await ex.aclose()
            raise
        if p.stream:
            return StreamingResponse(
                _sse(ex, first, rid, p), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )  # fmt: skip
        return await _whole(ex, first, rid, p)

    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    async def health(request: Request) -> Response:
        body: dict[str, Any] = {"status": "ok", "devices": len(agents)}
        if only is not None:
            body["device_id"] = only.config.device_id
        return JSONResponse(body)

    async def models(request: Request) -> Response:
        data = [{"id": m, "object": "model", "owned_by": "disco"} for m in cfg.models]
        return JSONResponse({"object": "list", "data": data})

    async def prometheus(request: Request) -> Response:
        total = merge_metrics([rejected, *(a.metrics for a in agents.values())])
        if only is not None:
            labels = f'device_id="{_label(only.config.device_id)}"'
        else:
            labels = f'devices="{len(agents)}"'
        return PlainTextResponse(
            total.render(labels=labels), media_type="text/plain; version=0.0.4"
        )

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
    if cfg.api_key:
        app.add_middleware(_ApiKeyMiddleware, api_key=cfg.api_key)
    return app


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 in the same JSON shape as every other error."""
    status = getattr(exc, "status_code", 400)
    return ApiError(
        status, str(getattr(exc, "detail", "") or exc), "invalid_request_error"
    ).response()


class _ApiKeyMiddleware:
    """Checks ``Authorization: Bearer <key>`` on every HTTP request (pure ASGI: streams pass)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                err = ApiError(401, "missing or wrong API key", "authentication_error")
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _label(value: str) -> str:
    """Escape a Prometheus label value."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, "prompt must be a non-empty string", param="prompt")
    return value


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, "each message needs a string role", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: text only
            if not all(
                isinstance(p, dict) and p.get("type", "text") == "text"
                and isinstance(p.get("text"), str)
                for p in content
            ):  # fmt: skip
                raise ApiError(
                    400, "content parts must be text parts with a string text", param="messages"
                )
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, "message content must be a string", param="messages")
        out.append({"role": m["role"], "content": content})
    if not any(m["content"].strip() for m in out):
        raise ApiError(400, "messages are all empty", param="messages")
    return out


def _number(data: dict[str, Any], key: str, default: float) -> float:
    """A JSON number (not a boolean); its range is checked by GenerationRequest.validate."""
    v = data.get(key, default)
    if v is None:
        return default
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise ApiError(400, f"{key} must be a number", param=key)
    try:
        return float(v)
    except OverflowError:  # an integer too large for a float
        raise ApiError(400, f"{key} is out of range", param=key) from None


def _chunk(ev: TokenEvent, rid: str, p: _Parsed, created: int, first: bool) -> dict[str, Any]:
    ext = {"index": ev.index, "source": ev.source.value if ev.source else None}
    if p.chat:
        delta = {"role": "assistant", "content": ev.text} if first else {"content": ev.text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": ev.finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": ev.text, "logprobs": None, "finish_reason": ev.finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": p.model, "choices": [choice],
            "disco": ext}  # fmt: skip


async def _sse(ex: Execution, first: TokenEvent, rid: str, p: _Parsed) -> AsyncIterator[str]:
    created = int(time.time())
    try:
        yield f"data: {json.dumps(_chunk(first, rid, p, created, True))}\n\n"
        async for ev in ex:
            yield f"data: {json.dumps(_chunk(ev, rid, p, created, False))}\n\n"
    except StreamFailedError as e:
        err = {"error": {"message": str(e), "type": "server_error", "code": 503}}
        yield f"data: {json.dumps(err)}\n\n"
        return
    finally:
        await ex.aclose()  # the client may have gone away: stop every endpoint
    yield "data: [DONE]\n\n"


async def _whole(ex: Execution, first: TokenEvent, rid: str, p: _Parsed) -> Response:
    events = [first]
    try:
        events += [ev async for ev in ex]
    except StreamFailedError as e:
        return ApiError(503, str(e), "server_error").response()
    finally:
        await ex.aclose()
    text = "".join(ev.text for ev in events)
    finish = events[-1].finish_reason or "stop"
    o = ex.outcome
    usage = {"prompt_tokens": o.prompt_tokens if o else 0, "completion_tokens": len(events)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    if p.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finish}  # fmt: skip
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    sources = [ev.source.value if ev.source else None for ev in events]
    body = {"id": rid, "object": obj, "created": int(time.time()), "model": p.model,
            "choices": [choice], "usage": usage,
            "disco": {"sources": sources, "migrated_at": o.migrated_at if o else None}}  # fmt: skip
    return JSONResponse(body)


async def serve(agent: DeviceAgent, config: HttpConfig) -> None:
    """Serve the agent's API until cancelled (what ``disco agent`` runs)."""
    import uvicorn

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
