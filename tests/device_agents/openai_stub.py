"""A minimal OpenAI-compatible SSE server over our own engines, for tests.

It parses and writes through :mod:`disco.scheduler.wire`, like the production servers, and runs
uvicorn on 127.0.0.1 (an ephemeral port) in a background thread. ``model`` in the request picks
one of the wrapped endpoints. ``apis`` chooses the routes (``("chat",)`` is a chat-only service
such as GPT-4o-mini); every body it accepted is kept in ``received`` for tests to inspect. When
the engine fails mid-stream it drops the connection (the client must see a truncated stream,
not a clean end), or with ``error_events`` it sends the error event our servers send.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from disco.scheduler import wire
from disco.scheduler.endpoint import Endpoint, EndpointFailedError, InvalidRequestError
from disco.scheduler.types import TokenEvent


@dataclass
class Stub:
    url: str
    received: list[dict[str, Any]] = field(default_factory=list)


def build_app(
    endpoints: Mapping[str, Endpoint],
    apis: Sequence[str] = ("completions", "chat"),
    received: list[dict[str, Any]] | None = None,
    error_events: bool = False,
) -> Starlette:
    async def answer(request: Request, chat: bool) -> Response:
        try:
            data = wire.parse_json(await request.body())
            p = wire.parse_request(data, chat=chat, models=tuple(endpoints))
            if received is not None:
                received.append(data)
            events = endpoints[p.model].stream(p.request)
            first = await anext(events)  # bad input surfaces here, before any byte is sent
        except wire.ApiError as e:
            return JSONResponse(e.body(), e.status)
        except InvalidRequestError as e:
            return JSONResponse(wire.ApiError(400, str(e)).body(), 400)
        head = wire.ResponseHead("stub", p.model, int(time.time()), chat)
        stream = _sse(head, first, events, error_events)
        return StreamingResponse(stream, media_type=wire.SSE_MEDIA_TYPE)

    async def completions(request: Request) -> Response:
        return await answer(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await answer(request, chat=True)

    routes = {
        "completions": Route("/v1/completions", completions, methods=["POST"]),
        "chat": Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    }
    return Starlette(routes=[routes[a] for a in apis])


async def _sse(
    head: wire.ResponseHead,
    first: TokenEvent,
    events: AsyncIterator[TokenEvent],
    error_events: bool,
) -> AsyncIterator[str]:
    try:
        yield wire.sse(wire.chunk(head, [first], first=True))
        async for ev in events:
            yield wire.sse(wire.chunk(head, [ev]))
        yield wire.SSE_DONE
    except EndpointFailedError as e:
        if not error_events:
            raise  # uvicorn drops the connection mid-stream
        yield wire.sse(wire.engine_failed(str(e)).event())
    finally:
        await events.aclose()  # client gone or engine failed: stop the engine


@contextlib.contextmanager
def serve_stub(endpoints: Mapping[str, Endpoint], **options: Any) -> Iterator[Stub]:
    """Serve ``endpoints`` on loopback (options: :func:`build_app`'s); stops on exit."""
    stub = Stub("")
    app = build_app(endpoints, received=stub.received, **options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    stub.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    try:
        for _ in range(500):  # wait for startup (up to ~5 s)
            if server.started:
                break
            threading.Event().wait(0.01)
        else:
            raise RuntimeError("stub OpenAI server did not start")
        yield stub
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextlib.contextmanager
def serve_openai(endpoints: Mapping[str, Endpoint], **options: Any) -> Iterator[str]:
    """:func:`serve_stub` yielding only the base URL."""
    with serve_stub(endpoints, **options) as stub:
        yield stub.url
