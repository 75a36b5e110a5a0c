"""A minimal OpenAI-compatible ``/v1/completions`` SSE server over our own engines, for tests.

It runs uvicorn on 127.0.0.1 (an ephemeral port) in a background thread. ``model`` in the request
picks one of the wrapped endpoints. Like a real server it answers bad requests with a 400 and an
OpenAI-style error body, and when the engine fails mid-stream it drops the connection (the client
must see a truncated stream, not a clean end).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator, Mapping

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from disco.scheduler.endpoint import Endpoint, GenerationRequest, InvalidRequestError


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status)


def build_app(endpoints: Mapping[str, Endpoint]) -> Starlette:
    async def completions(request: Request) -> JSONResponse | StreamingResponse:
        body = await request.json()
        ep = endpoints.get(body.get("model"))
        if ep is None:
            return _error(404, f"model {body.get('model')!r} does not exist")
        prompt = body.get("prompt", "")
        try:
            req = GenerationRequest(
                prompt=prompt,
                max_tokens=body.get("max_tokens", 16),
                prefix=body.get("prefix", ""),
                start_index=body.get("start_index", 0),
                temperature=body.get("temperature", 0.0),
                top_p=body.get("top_p", 1.0),
                seed=body.get("seed"),
            )
            events = ep.stream(req)
            first = await anext(events)  # bad input surfaces here, before any byte is sent
        except InvalidRequestError as e:
            return _error(400, str(e))

        async def sse() -> AsyncIterator[str]:
            ev = first
            try:
                while True:
                    chunk = {
                        "object": "text_completion",
                        "choices": [
                            {"index": 0, "text": ev.text, "finish_reason": ev.finish_reason}
                        ],
                        "disco": {"index": ev.index, "token_id": ev.token_id},
                    }
                    yield f"data: {json.dumps(chunk)}\n\n"
                    try:
                        ev = await anext(events)
                    except StopAsyncIteration:
                        break
                yield "data: [DONE]\n\n"
            finally:
                await events.aclose()  # client gone or engine failed: stop the engine

        return StreamingResponse(sse(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])


@contextlib.contextmanager
def serve_openai(endpoints: Mapping[str, Endpoint]) -> Iterator[str]:
    """Serve ``endpoints`` on loopback; yields the base URL. Stops the server on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(build_app(endpoints), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    try:
        for _ in range(500):  # wait for startup (up to ~5 s)
            if server.started:
                break
            threading.Event().wait(0.01)
        else:
            raise RuntimeError("stub OpenAI server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
