"""The Ray Serve application: server replicas hosting one engine each behind an OpenAI-style API.

Routes (all JSON errors are OpenAI-shaped, 4xx for bad input, never a 500 for a client mistake):
- ``POST /v1/completions`` and ``POST /v1/chat/completions``: ``stream: true`` answers
  Server-Sent Events, one chunk per token, written as soon as the engine yields it; ``prefix``
  resumes a generation. The wire format is :mod:`disco.scheduler.wire`'s, shared with the device
  agent. A client that disconnects cancels the engine's work.
- ``GET /v1/models``, ``GET /health``.
- Chat messages are rendered with the engine's own template (``render_chat``: the GGUF's for
  llama.cpp, the tokenizer's ``apply_chat_template`` for vLLM; the plain transcript of
  :func:`~disco.scheduler.wire.default_chat_template` for the emulated engines, whose text is a
  placeholder anyway); ``prefix`` continues the assistant's turn. A device agent sends a user's
  chat on as its messages, so this side renders them for its own model.
- Any other route or method: OpenAI's error body with 404/405 (422 for a body FastAPI could not
  bind), as the device agent answers, never FastAPI's ``{"detail": ...}``.
The deployment also answers ``generate(body)`` over a Ray handle (``stream=True``), yielding the
same chunk dicts, for callers inside the cluster that skip HTTP.

Why our own deployment when Ray Serve LLM exists: ``build_openai_app`` coalesces stream chunks
for 50 ms by default (ray#59681), which adds that much to every TTFT, and it has no ``prefix``
resume; DiSCo's race and migration live on first-token latency and on resuming text. Our chunks
go out one per token (``stream_batching_interval_ms: 0``); a non-zero interval reproduces the
coalescing only so that its cost can be measured (bench/bench_runtime.py).
"""

import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from disco.cluster.config import SERVER_API_KEY_ENV, ServerConfig, from_dict, to_dict
from disco.cluster.metrics import replica_sampler
from disco.cluster.resolve import build_engine
from disco.cluster.stream_batching import coalesce, prepend
from disco.scheduler.endpoint import EndpointFailedError, InvalidRequestError
from disco.scheduler.types import TokenEvent
from disco.scheduler.wire import (
    SSE_DONE,
    SSE_HEADERS,
    SSE_MEDIA_TYPE,
    ApiError,
    ApiRequest,
    ResponseHead,
    Usage,
    chat_template_of,
    check_api_key,
    chunk,
    completion,
    engine_failed,
    parse_json,
    parse_request,
    read_body,
    route_error,
    sse,
    usage_chunk,
)

DEPLOYMENT_NAME = "DiscoServer"
API_KEY_ENV = SERVER_API_KEY_ENV  # the key when server.http.api_key is not set

api = FastAPI(title="disco server", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """FastAPI's own 404 (no such route) and 405 (wrong method) in OpenAI's shape."""
    err = route_error(exc.status_code, str(exc.detail), request.method, request.url.path)
    return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _unbound(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = route_error(422, f"invalid request: {exc.errors()}", request.method, request.url.path)
    return JSONResponse(err.body(), status_code=422)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class DiscoServer:
    """One replica: one engine, many concurrent streams (the engine's own batching applies)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = from_dict(ServerConfig, config)
        self.engine = build_engine(self.cfg.engine, dict(self.cfg.engine_kwargs))
        self.api_key = self.cfg.http.key(API_KEY_ENV)
        self.replica_id = uuid.uuid4().hex[:8]
        self._ids = itertools.count()
        self._ongoing = 0  # engine streams open now (HTTP and handle callers)
        self._metrics = replica_sampler(self)  # Ray metrics, <= 1/s (cluster/metrics.py)

    # ---- HTTP ---------------------------------------------------------------------------------

    def _check_key(self, request: Request) -> None:
        check_api_key(request.headers.get("authorization"), self.api_key)

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "engine": self.cfg.engine,
            "replica": self.replica_id,
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._check_key(request)
        return {
            "object": "list",
            "data": [{"id": self.cfg.model_name, "object": "model", "owned_by": "disco"}],
        }

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        return await self._answer(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        return await self._answer(request, chat=True)

    async def _answer(self, request: Request, chat: bool) -> Any:
        self._check_key(request)
        raw = await read_body(
            request.stream(), request.headers.get("content-length"), self.cfg.http.max_body_bytes
        )
        body = self._parse(parse_json(raw), chat)
        events = self._events(body)
        try:
            # Pull the first token before answering, so that an engine's own validation
            # (context window...) still becomes a 4xx instead of a broken stream.
            first = await self._first(events)
        except BaseException:
            await events.aclose()
            raise
        if not body.stream:
            try:
                rest = [ev async for ev in events]
            except EndpointFailedError as e:
                raise engine_failed(str(e)) from None
            finally:
                await events.aclose()
            out = ([first] if first else []) + rest
            return completion(self._head(body), out, self._usage(body, len(out)))
        return StreamingResponse(
            self._sse(body, first, events), media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS
        )

    # ---- Ray handle ---------------------------------------------------------------------------

    async def generate(self, data: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream chunk dicts over a Ray handle: ``handle.options(stream=True).generate.remote``.

        Bad input yields one ``{"error": ...}`` dict (exceptions would lose their type). A body
        with ``messages`` is a chat request (chat chunks), as on ``/v1/chat/completions``.
        """
        try:
            body = self._parse(data, chat="messages" in data)
            events = self._events(body)
        except ApiError as e:
            yield e.event()
            return
        try:
            first = await self._first(events)
        except ApiError as e:
            await events.aclose()
            yield e.event()
            return
        except BaseException:
            await events.aclose()
            raise
        head = self._head(body)
        try:
            if first is not None:
                yield chunk(head, [first], first=True)
            async for ev in events:
                yield chunk(head, [ev])
        except EndpointFailedError as e:
            yield engine_failed(str(e)).event()
        finally:
            await events.aclose()

    async def engine_stats(self) -> dict[str, Any]:
        """The engine's counters when it keeps any (the emulated one does), for tests/telemetry."""
        stats = getattr(self.engine, "stats", None)
        out: dict[str, Any] = {}
        if stats is not None:
            out = {k: getattr(stats, k) for k in getattr(stats, "__slots__", ())} or dict(
                getattr(stats, "__dict__", {})
            )
        if hasattr(self.engine, "replica_state"):  # a batching replica: its queue and KV too
            out["replica"] = self.engine.replica_state()
        return out

    async def engine_samples(self) -> dict[str, Any]:
        """This replica's id and its engine's (t, queue, running, kv) time series on the
        monotonic clock, when it records one (a batching replica does), for plotting each
        replica's load over time."""
        samples = getattr(self.engine, "samples", None)
        state = getattr(self.engine, "replica_state", None)
        return {
            "replica": self.replica_id,
            "samples": samples() if callable(samples) else [],
            "state": state() if callable(state) else {},
        }

    async def engine_state(self) -> dict[str, Any]:
        """This replica's load now, small (``disco status``): its id, engine, the engine streams
        open (``ongoing``) and a batching replica's ``replica_state`` (queue, running, KV)."""
        state = getattr(self.engine, "replica_state", None)
        return {
            "replica": self.replica_id,
            "engine": self.cfg.engine,
            "node_id": ray.get_runtime_context().get_node_id(),
            "ongoing": self._ongoing,
            "state": state() if callable(state) else {},
        }

    async def probe(self) -> dict[str, Any]:
        """This replica's process and event loop now (``disco bench soak``); ``actor``: its
        Serve replica actor's name (``disco bench chaos`` kills the busiest)."""
        import asyncio
        import os

        try:
            actor = serve.get_replica_context().replica_id.to_full_id_str()
        except Exception:  # noqa: BLE001 - Serve's private naming moved: unknown
            actor = None
        return {"replica": self.replica_id, "pid": os.getpid(), "actor": actor,
                "tasks": len(asyncio.all_tasks()), "ongoing": self._ongoing}  # fmt: skip

    async def fault(self, kind: str, **kwargs: Any) -> dict[str, Any]:
        """Fault injection (``disco bench chaos``): forwarded to an engine that takes faults
        (``disco.cluster.faults.FaultyEndpoint``: ``fail``, ``stall``); how many streams it hit."""
        inject = getattr(self.engine, "inject", None)
        if inject is None:
            raise ApiError(400, f"engine {self.cfg.engine!r} takes no injected faults")
        return {"replica": self.replica_id, "affected": inject(kind, **kwargs)}

    # ---- internals ----------------------------------------------------------------------------

    def _parse(self, data: dict[str, Any], chat: bool = False) -> ApiRequest:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{self.replica_id}-{next(self._ids)}"
        return parse_request(
            data,
            chat=chat,
            models=(self.cfg.model_name,),
            max_tokens_limit=self.cfg.http.max_tokens_limit,
            request_id=rid,
            chat_template=chat_template_of(self.engine),  # the engine's model's own
        )

    @staticmethod
    def _head(body: ApiRequest) -> ResponseHead:
        return ResponseHead(body.request.request_id, body.model, int(time.time()), body.chat)

    def _usage(self, body: ApiRequest, completion_tokens: int) -> Usage:
        return Usage.counted(body.request, self.engine.count_tokens, completion_tokens)

    def _events(self, body: ApiRequest) -> AsyncIterator[TokenEvent]:
        try:
            body.request.validate()
        except InvalidRequestError as e:
            raise ApiError(400, str(e)) from None
        return self._counted(self.engine.stream(body.request))

    async def _counted(self, events: AsyncIterator[TokenEvent]) -> AsyncIterator[TokenEvent]:
        self._ongoing += 1
        self._metrics.started()
        try:
            async for ev in events:
                yield ev
        finally:
            self._ongoing -= 1
            self._metrics.touch()
            await events.aclose()

    @staticmethod
    async def _first(events: AsyncIterator[TokenEvent]) -> TokenEvent | None:
        try:
            return await events.__anext__()
        except StopAsyncIteration:
            return None
        except InvalidRequestError as e:
            raise ApiError(400, str(e)) from None
        except EndpointFailedError as e:
            raise engine_failed(str(e)) from None

    async def _sse(
        self, body: ApiRequest, first: TokenEvent | None, events: AsyncIterator[TokenEvent]
    ) -> AsyncIterator[str]:
        head = self._head(body)
        sent = 0

        def fmt(ev: TokenEvent) -> str:
            nonlocal sent
            sent += 1
            return sse(chunk(head, [ev], first=sent == 1))

        try:
            if first is not None:
                if self.cfg.stream_batching_interval_ms <= 0:
                    yield fmt(first)
                    async for ev in events:
                        yield fmt(ev)
                else:
                    interval = self.cfg.stream_batching_interval_ms / 1000.0
                    async for text in coalesce(prepend(first, events), interval, fmt):
                        yield text
            if body.include_usage:
                yield sse(usage_chunk(head, self._usage(body, sent)))
            yield SSE_DONE
        except EndpointFailedError as e:
            # Headers are gone already: an error event and no [DONE] tells the client the
            # stream broke, so it can resume elsewhere from the tokens it has.
            yield sse(engine_failed(str(e)).event())
        finally:
            await events.aclose()

    async def __del__(self) -> None:  # Serve calls this on replica shutdown
        with contextlib.suppress(Exception):
            await self.engine.close()


def deployment_options(cfg: ServerConfig) -> dict[str, Any]:
    """Serve deployment options from the typed config (replicas or autoscaling, placement)."""
    actor: dict[str, Any] = {"num_cpus": cfg.num_cpus}
    if cfg.num_gpus:
        actor["num_gpus"] = cfg.num_gpus
    if cfg.resources:
        actor["resources"] = dict(cfg.resources)
    opts: dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "ray_actor_options": actor,
        # Fail fast so a dead replica is replaced quickly; the device side covers the gap.
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 10.0,
    }
    if cfg.autoscaling is not None:
        opts["autoscaling_config"] = cfg.autoscaling.to_serve()
    else:
        opts["num_replicas"] = cfg.num_replicas
    return opts


def build_app(cfg: ServerConfig) -> serve.Application:
    """The Serve application for ``cfg`` (deploy it with ``serve.run``)."""
    return DiscoServer.options(**deployment_options(cfg)).bind(to_dict(cfg))


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for a Serve config file (``import_path: disco.cluster.serve_app:app_builder``):
    ``args`` is the ``server`` section of a testbed config."""
    return build_app(from_dict(ServerConfig, dict(args or {}), "server"))
