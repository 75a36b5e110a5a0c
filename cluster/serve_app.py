"""The Ray Serve application: server replicas hosting one engine each behind an OpenAI-style API.

Routes (all JSON errors are OpenAI-shaped, 4xx for bad input, never a 500 for a client mistake):
- ``POST /v1/completions``: ``stream: true`` answers Server-Sent Events, one chunk per token,
  written as soon as the engine yields it; ``prefix`` resumes a generation (see
  :mod:`disco.cluster.openai_wire`). A client that disconnects cancels the engine's work.
- ``GET /v1/models``, ``GET /health``.
The deployment also answers ``generate(body)`` over a Ray handle (``stream=True``), yielding the
same chunk dicts, for callers inside the cluster that skip HTTP.

Why our own deployment when Ray Serve LLM exists: ``build_openai_app`` coalesces stream chunks
for 50 ms by default (ray#59681), which adds that much to every TTFT, and it has no ``prefix``
resume; DiSCo's race and migration live on first-token latency and on resuming text. Our chunks
go out one per token (``stream_batching_interval_ms: 0``); a non-zero interval reproduces the
coalescing only so that its cost can be measured (bench/bench_runtime.py).
"""

import contextlib
import hmac
import itertools
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from disco.cluster.config import ServerConfig, from_dict, to_dict
from disco.cluster.openai_wire import (
    SSE_DONE,
    ApiError,
    CompletionBody,
    chunk,
    completion,
    parse_completion,
    parse_json,
    sse,
    usage_chunk,
)
from disco.cluster.resolve import build_engine
from disco.cluster.stream_batching import coalesce, prepend
from disco.scheduler.endpoint import EndpointFailedError, InvalidRequestError
from disco.scheduler.types import TokenEvent

DEPLOYMENT_NAME = "DiscoServer"
API_KEY_ENV = "DISCO_SERVER_API_KEY"

api = FastAPI(title="disco server", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class DiscoServer:
    """One replica: one engine, many concurrent streams (the engine's own batching applies)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = from_dict(ServerConfig, config)
        self.engine = build_engine(self.cfg.engine, dict(self.cfg.engine_kwargs))
        self.api_key = self.cfg.api_key or os.environ.get(API_KEY_ENV) or None
        self.replica_id = uuid.uuid4().hex[:8]
        self._ids = itertools.count()

    # ---- HTTP ---------------------------------------------------------------------------------

    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key", "invalid_api_key")

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
        self._check_key(request)
        data = parse_json(await self._read_body(request), self.cfg.max_body_bytes)
        body = self._parse(data)
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
                raise ApiError(503, str(e), "engine_failed") from None
            finally:
                await events.aclose()
            out = ([first] if first else []) + rest
            return completion(body.request.request_id, body.model, body, out)
        return StreamingResponse(
            self._sse(body, first, events),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # ---- Ray handle ---------------------------------------------------------------------------

    async def generate(self, data: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream chunk dicts over a Ray handle: ``handle.options(stream=True).generate.remote``.

        Bad input yields one ``{"error": ...}`` dict (exceptions would lose their type).
        """
        try:
            body = self._parse(data)
            events = self._events(body)
        except ApiError as e:
            yield e.body() | {"status": e.status}
            return
        try:
            first = await self._first(events)
        except ApiError as e:
            await events.aclose()
            yield e.body() | {"status": e.status}
            return
        except BaseException:
            await events.aclose()
            raise
        created = int(time.time())
        rid = body.request.request_id
        try:
            if first is not None:
                yield chunk(rid, body.model, first, created)
            async for ev in events:
                yield chunk(rid, body.model, ev, created)
        except EndpointFailedError as e:
            yield ApiError(503, str(e), "engine_failed").body() | {"status": 503}
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
        return {"replica": self.replica_id, "samples": samples() if callable(samples) else []}

    # ---- internals ----------------------------------------------------------------------------

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with a 413 as soon as it passes the cap (with or without a
        Content-Length header: a chunked upload is counted while it is read)."""
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise ApiError(400, "bad Content-Length header")
            if int(declared) > limit:
                raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}")
        chunks, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise ApiError(413, f"request body is over the limit of {limit} bytes")
            chunks.append(part)
        return b"".join(chunks)

    def _parse(self, data: dict[str, Any]) -> CompletionBody:
        rid = f"cmpl-{self.replica_id}-{next(self._ids)}"
        return parse_completion(data, self.cfg.model_name, self.cfg.max_tokens_limit, rid)

    def _events(self, body: CompletionBody) -> AsyncIterator[TokenEvent]:
        try:
            body.request.validate()
        except InvalidRequestError as e:
            raise ApiError(400, str(e)) from None
        return self.engine.stream(body.request)

    @staticmethod
    async def _first(events: AsyncIterator[TokenEvent]) -> TokenEvent | None:
        try:
            return await events.__anext__()
        except StopAsyncIteration:
            return None
        except InvalidRequestError as e:
            raise ApiError(400, str(e)) from None
        except EndpointFailedError as e:
            raise ApiError(503, str(e), "engine_failed") from None

    async def _sse(
        self, body: CompletionBody, first: TokenEvent | None, events: AsyncIterator[TokenEvent]
    ) -> AsyncIterator[str]:
        rid, model, created = body.request.request_id, body.model, int(time.time())
        sent = 0

        def fmt(ev: TokenEvent) -> str:
            nonlocal sent
            sent += 1
            return sse(chunk(rid, model, ev, created))

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
                yield sse(usage_chunk(rid, model, created, body, sent))
            yield SSE_DONE
        except EndpointFailedError as e:
            # Headers are gone already: an error event and no [DONE] tells the client the
            # stream broke, so it can resume elsewhere from the tokens it has.
            yield sse(ApiError(503, str(e), "engine_failed").body())
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
