"""The Serve server app as an Endpoint over a Ray Serve DeploymentHandle (no HTTP).

Device agents that run inside the Ray cluster (emulated fleets, the agent actor) reach the server
replicas this way: the handle routes straight to a replica, skipping the HTTP proxy hop, which is
most of Serve's per-request overhead here (bench/results/runtime.md). Agents outside the cluster
use the ``openai`` engine over HTTP instead; both read the same chunks with
:mod:`disco.scheduler.wire` and resume the same way (``prefix``).

Errors: a bad request becomes :class:`InvalidRequestError`; a replica that dies or fails
mid-stream (an actor error, an engine failure chunk) becomes :class:`EndpointFailedError`, so the
coordinator fails over to the device with the tokens delivered so far. Closing the stream cancels
the request in the replica, which stops the engine.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from disco.scheduler.endpoint import EndpointFailedError, GenerationRequest, InvalidRequestError
from disco.scheduler.tokens import estimate_tokens
from disco.scheduler.types import EndpointKind, TokenEvent
from disco.scheduler.wire import ApiError, decode_chunk, request_body, token_events


class ServeHandleEndpoint:
    max_concurrency: int | None = None  # the replicas (and Serve's router) queue requests

    def __init__(self, handle: Any, model: str, *, name: str | None = None) -> None:
        self.handle = handle
        self.model = model
        self.kind = EndpointKind.SERVER
        self.name = name or f"serve-handle:{model}"

    def count_tokens(self, text: str) -> int:
        return estimate_tokens(text)  # no local tokenizer: the server's is remote

    async def stream(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        req.validate()
        # A chat request goes as its messages: the replica renders them with its own template.
        body = request_body(req, self.model, messages=req.chat_messages(), extensions=True)
        gen = self.handle.options(stream=True).generate.remote(body)
        chunks = (decode_chunk(item) async for item in gen)
        try:
            async for ev in token_events(chunks, req.start_index, self.kind, time.monotonic):
                yield ev
        except ApiError as e:  # an error item (bad input is refused before any token)
            if e.status < 500:
                raise InvalidRequestError(e.message) from None
            raise EndpointFailedError(f"{self.name}: {e.message}") from None
        except GeneratorExit:
            raise
        except Exception as e:  # noqa: BLE001 - actor died, replica gone, connection lost
            raise EndpointFailedError(f"{self.name}: {type(e).__name__}: {e}") from e
        finally:
            gen.cancel()

    async def close(self) -> None:
        return None
