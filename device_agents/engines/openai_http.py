"""Any OpenAI-compatible ``/v1/completions`` server, streamed over SSE, behind the Endpoint protocol.

This is how a device talks to a Ray Serve replica, a ``vllm serve`` process or a commercial API.
Resume sends ``prompt + prefix`` as the prompt (the server re-prefills it); cancel closes the HTTP
response, which vLLM and Ray Serve turn into an abort of the request.

Tokens: one event per SSE chunk, which is one token on vLLM and llama.cpp servers. A server that
packs several tokens into a chunk and returns ``logprobs.tokens`` (ask with
``request_logprobs=True``) is split into one event per token, all stamped with the chunk's arrival
time; otherwise such a chunk counts as one event.

Errors: an HTTP 400/413/422 (bad request, prompt too long) raises :class:`InvalidRequestError` with
the server's message; anything else that goes wrong (connect failure, 5xx, the connection lost
mid-stream, a stream that ends without a finish reason or ``[DONE]``) raises
:class:`EndpointFailedError`.

``count_tokens`` is an estimate (~4 characters per token): the server's tokenizer is not local.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from disco.scheduler.endpoint import EndpointFailedError, GenerationRequest, InvalidRequestError
from disco.scheduler.types import EndpointKind, TokenEvent

from .emulated import estimate_tokens


@dataclass(frozen=True, slots=True)
class OpenAIConfig:
    base_url: str  # e.g. http://127.0.0.1:8000 or https://api.example.com/v1
    model: str = "default"
    api_key: str | None = None  # None: $OPENAI_API_KEY if set, else no Authorization header
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 120.0  # longest silence tolerated between two chunks
    request_logprobs: bool = False
    # Our own server (disco.cluster) accepts ``prefix``/``start_index``/``prompt_tokens_hint`` and
    # tags chunks with ``disco: {index, token_id}``; plain OpenAI servers may reject those fields.
    disco_extensions: bool = False
    extra_body: tuple[tuple[str, Any], ...] = ()  # extra JSON fields, e.g. (("ignore_eos", True),)

    def completions_url(self) -> str:
        base = self.base_url.rstrip("/")
        return f"{base}/completions" if base.endswith("/v1") else f"{base}/v1/completions"


_INVALID_STATUS = {400, 413, 422}


class OpenAIEndpoint:
    """A remote server endpoint (kind server by default)."""

    max_concurrency: int | None = None  # the server schedules concurrent requests itself

    def __init__(
        self,
        base_url: str,
        *,
        kind: EndpointKind | str = EndpointKind.SERVER,
        name: str | None = None,
        client: httpx.AsyncClient | None = None,
        **options: Any,
    ) -> None:
        if "extra_body" in options and isinstance(options["extra_body"], dict):
            options["extra_body"] = tuple(options["extra_body"].items())
        self.config = OpenAIConfig(base_url=base_url, **options)
        self.kind = EndpointKind(kind)
        self.name = name or f"openai:{self.config.model}@{base_url}"
        key = self.config.api_key or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        timeout = httpx.Timeout(self.config.read_timeout_s, connect=self.config.connect_timeout_s)
        self._owns_client = client is None
        # No connection limit: each stream holds a connection for its whole duration.
        self._client = client or httpx.AsyncClient(
            headers=headers, timeout=timeout, limits=httpx.Limits(max_connections=None)
        )
        self._headers = headers

    def count_tokens(self, text: str) -> int:
        return estimate_tokens(text)

    def _body(self, req: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.config.model,
            "prompt": req.prompt if self.config.disco_extensions else req.prompt + req.prefix,
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "stream": True,
        }
        if req.seed is not None:
            body["seed"] = req.seed
        if self.config.disco_extensions:
            body["prefix"] = req.prefix
            body["start_index"] = req.start_index
            if req.prompt_tokens_hint is not None:
                body["prompt_tokens_hint"] = req.prompt_tokens_hint
        if self.config.request_logprobs:
            body["logprobs"] = 1
        body.update(dict(self.config.extra_body))
        return body

    async def stream(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        req.validate()
        url = self.config.completions_url()
        index = req.start_index
        try:
            async with self._client.stream(
                "POST", url, json=self._body(req), headers=self._headers
            ) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise _status_error(self.name, resp)
                finished = False
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, event names
                    data = line[5:].strip()
                    if data == "[DONE]":
                        finished = True
                        break
                    now = time.monotonic()
                    choice, token_id = _first_choice(self.name, data)
                    if choice is None:
                        continue  # e.g. a usage-only chunk
                    reason = choice.get("finish_reason")
                    pieces = _split(choice)
                    tid = token_id if len(pieces) == 1 else None
                    for text, last in pieces:
                        yield TokenEvent(index, text, now, tid, self.kind, reason if last else None)
                        index += 1
                    if reason is not None:
                        finished = True
                if not finished:
                    raise EndpointFailedError(f"{self.name}: stream ended before a finish reason")
        except httpx.HTTPError as e:
            raise EndpointFailedError(f"{self.name}: {type(e).__name__}: {e}") from e

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def _status_error(name: str, resp: httpx.Response) -> Exception:
    try:
        detail = resp.json()
        err = detail.get("error", detail) if isinstance(detail, dict) else detail
        msg = err.get("message", err) if isinstance(err, dict) else err
    except ValueError:
        msg = resp.text[:500]
    text = f"{name}: HTTP {resp.status_code}: {msg}"
    if resp.status_code in _INVALID_STATUS:
        return InvalidRequestError(text)
    return EndpointFailedError(text)


def _first_choice(name: str, data: str) -> tuple[dict[str, Any] | None, int | None]:
    try:
        chunk = json.loads(data)
    except ValueError:
        raise EndpointFailedError(f"{name}: malformed SSE data: {data[:200]!r}") from None
    if isinstance(chunk, dict) and "error" in chunk:  # some servers report errors in-stream
        raise EndpointFailedError(f"{name}: server error mid-stream: {chunk['error']}")
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    tag = chunk.get("disco") if isinstance(chunk, dict) else None
    token_id = tag.get("token_id") if isinstance(tag, dict) else None
    return (choices[0] if choices else None), token_id


def _split(choice: dict[str, Any]) -> list[tuple[str, bool]]:
    """The chunk's text as (token text, is-last) pairs."""
    text = choice.get("text") or ""
    lp = choice.get("logprobs") or {}
    pieces = lp.get("tokens") if isinstance(lp, dict) else None
    if pieces and len(pieces) > 1 and "".join(pieces) == text:
        return [(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]
    # An empty text is still a token (e.g. half of a multi-byte character): keep indices aligned.
    return [(text, True)]
