"""The Serve server app as an Endpoint over a Ray Serve DeploymentHandle (no HTTP).

Device agents that run inside the Ray cluster (emulated fleets, the agent actor) reach the server
replicas this way: the handle routes straight to a replica, skipping the HTTP proxy hop, which is
most of Serve's per-request overhead here (bench/results/runtime.md). Agents outside the cluster
use the ``openai`` engine over HTTP instead; both speak the same chunk dicts and the same
``prefix`` resume.

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
from disco.scheduler.types import EndpointKind, TokenEvent


class ServeHandleEndpoint:
    max_concurrency: int | None = None  # the replicas (and Serve's router) queue requests

    def __init__(self, handle: Any, model: str, *, name: str | None = None) -> None:
        self.handle = handle
        self.model = model
        self.kind = EndpointKind.SERVER
        self.name = name or f"serve-handle:{model}"

    def count_tokens(self, text: str) -> int:
        return max(1, (len(text) + 3) // 4)  # ~4 characters per token; no local tokenizer

    def _body(self, req: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": req.prompt,
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "prefix": req.prefix,
            "start_index": req.start_index,
            "request_id": req.request_id,
        }
        if req.seed is not None:
            body["seed"] = req.seed
        if req.prompt_tokens_hint is not None:
            body["prompt_tokens_hint"] = req.prompt_tokens_hint
        return body

    async def stream(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        req.validate()
        gen = self.handle.options(stream=True).generate.remote(self._body(req))
        expected = req.start_index
        finished = False
        try:
            async for chunk in gen:
                if "error" in chunk:
                    msg = chunk["error"].get("message", "error")
                    if chunk.get("status", 500) < 500:
                        raise InvalidRequestError(msg)
                    raise EndpointFailedError(f"{self.name}: {msg}")
                choice = chunk["choices"][0]
                ext = chunk.get("disco", {})
                index = ext.get("index", expected)
                reason = choice.get("finish_reason")
                yield TokenEvent(
                    index, choice["text"], time.monotonic(), ext.get("token_id"), self.kind, reason
                )
                expected = index + 1
                finished = finished or reason is not None
        except (InvalidRequestError, EndpointFailedError):
            raise
        except GeneratorExit:
            raise
        except Exception as e:  # noqa: BLE001 - actor died, replica gone, connection lost
            raise EndpointFailedError(f"{self.name}: {type(e).__name__}: {e}") from e
        finally:
            gen.cancel()
        if not finished:
            raise EndpointFailedError(f"{self.name}: stream ended without a finish reason")

    async def close(self) -> None:
        return None
