"""Any OpenAI-compatible server, streamed over SSE, behind the Endpoint protocol.

This is how a device talks to a Ray Serve replica, a ``vllm serve`` process or a commercial API.
The wire format (request bodies, chunk decoding, the empty-text rule) is
:mod:`disco.scheduler.wire`'s. Cancel closes the HTTP response, which vLLM and Ray Serve turn
into an abort of the request.

Two APIs (``api=``):

- ``"completions"`` (default): ``POST /v1/completions``. Resume: a server of this testbed
  (``disco_extensions=True``) gets ``prefix``/``start_index``; any other server gets
  ``prompt + prefix`` as the prompt and re-prefills it.
- ``"chat"``: ``POST /v1/chat/completions``, so that a chat-only service (GPT-4o-mini, the
  paper's server) can be the server. The prompt is one user message. A chat API has no field
  for "continue this text", so resume is what the server allows (``chat_resume=``):

  - ``"continue_final_message"`` (vLLM): the prefix is a final assistant message, sent with
    vLLM's ``continue_final_message: true`` and ``add_generation_prompt: false``; the model
    goes on inside its own turn, right after the prefix, as an uninterrupted run would (greedy
    decoding gives the same tokens up to how the prefix re-tokenizes). Only vLLM (and this
    testbed's servers) accept these fields; OpenAI refuses them with a 400.
  - ``"assistant_turn"`` (default, any chat service): the prefix as an assistant message, then
    a user message asking to continue (``continue_instruction``). Limits: the model answers in
    a new turn, so it may repeat or rephrase the prefix's end, change the whitespace at the
    seam, restart, or add a preamble; the text is not the uninterrupted run's tail even at
    temperature 0; the server bills the prefix and the instruction as prompt tokens again; and
    the token indices are the client's count. A migration *to* such a server is therefore a
    visible seam, and failover to it is best effort.

  With ``disco_extensions=True`` the prefix travels as ``prefix`` instead (our agent and Serve
  app accept it on chat too).

A chat request (``req.messages`` set: a user's chat reached the agent) always goes to
``/v1/chat/completions`` with its messages, whatever ``api`` says: its ``prompt`` is rendered with
the device model's template, which the server's model does not share, so the server renders the
messages with its own. Resume as above (our servers: ``prefix``, inside the assistant's turn).

Tokens: one event per token the decoder counts (one per chunk on vLLM and llama.cpp servers). A
server that packs several tokens into a chunk and lists them in ``logprobs`` (ask with
``request_logprobs=True``) is split into one event per token, all stamped with the chunk's
arrival time; otherwise such a chunk counts as one event.

Errors: an HTTP 400/413/422 (bad request, prompt too long) raises :class:`InvalidRequestError` with
the server's message; anything else that goes wrong (connect failure, 5xx, the connection lost
mid-stream, an error event, a stream that ends without a finish reason or ``[DONE]``) raises
:class:`EndpointFailedError`.

``count_tokens`` is the core estimate (:func:`disco.scheduler.tokens.estimate_tokens`): the
server's tokenizer is not local.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from disco.scheduler.endpoint import EndpointFailedError, GenerationRequest, InvalidRequestError
from disco.scheduler.tokens import estimate_tokens
from disco.scheduler.types import EndpointKind, TokenEvent
from disco.scheduler.wire import ApiError, decode_stream, request_body, token_events

APIS = ("completions", "chat")
CHAT_RESUMES = ("assistant_turn", "continue_final_message")
CONTINUE_INSTRUCTION = (
    "Continue your previous answer exactly where it stopped, without repeating any of it."
)


@dataclass(frozen=True, slots=True)
class OpenAIConfig:
    base_url: str  # e.g. http://127.0.0.1:8000 or https://api.example.com/v1
    model: str = "default"
    api_key: str | None = None  # None: $OPENAI_API_KEY if set, else no Authorization header
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 120.0  # longest silence tolerated between two chunks
    request_logprobs: bool = False
    # Our own servers (disco.cluster, the device agent) accept ``prefix``/``start_index``/
    # ``prompt_tokens_hint``; plain OpenAI servers may reject those fields.
    disco_extensions: bool = False
    extra_body: tuple[tuple[str, Any], ...] = ()  # extra JSON fields, e.g. (("ignore_eos", True),)
    api: str = "completions"  # or "chat" (module docstring)
    chat_resume: str = "assistant_turn"  # or "continue_final_message" (vLLM)
    continue_instruction: str = CONTINUE_INSTRUCTION

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ValueError(f"openai: api must be one of {', '.join(APIS)}, got {self.api!r}")
        if self.chat_resume not in CHAT_RESUMES:
            raise ValueError(f"openai: chat_resume must be one of {', '.join(CHAT_RESUMES)}, "
                             f"got {self.chat_resume!r}")  # fmt: skip

    def url(self, chat: bool | None = None) -> str:
        """The route: chat when ``chat`` says so (None: as ``api`` says)."""
        base = self.base_url.rstrip("/")
        chat = self.api == "chat" if chat is None else chat
        path = "chat/completions" if chat else "completions"
        return f"{base}/{path}" if base.endswith("/v1") else f"{base}/v1/{path}"


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
        cfg = self.config
        chat = self._chat(req)
        messages = self._messages(req) if chat else None
        body = request_body(req, cfg.model, messages=messages, extensions=cfg.disco_extensions)
        vllm_resume = cfg.chat_resume == "continue_final_message"
        if chat and req.prefix and not cfg.disco_extensions and vllm_resume:
            body |= {"continue_final_message": True, "add_generation_prompt": False}
        if cfg.request_logprobs:
            body["logprobs"] = True if chat else 1  # chat takes a flag, completions a count
        body.update(dict(cfg.extra_body))
        return body

    def _chat(self, req: GenerationRequest) -> bool:
        return self.config.api == "chat" or req.messages is not None

    def _messages(self, req: GenerationRequest) -> list[dict[str, str]]:
        """The chat turns for ``req``: its messages (else the prompt as one user message), and
        on a resume the prefix (module docstring)."""
        messages = req.chat_messages() or [{"role": "user", "content": req.prompt}]
        if req.prefix and not self.config.disco_extensions:
            messages.append({"role": "assistant", "content": req.prefix})
            if self.config.chat_resume == "assistant_turn":
                messages.append({"role": "user", "content": self.config.continue_instruction})
        return messages

    async def stream(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        req.validate()
        try:
            async with self._client.stream(
                "POST",
                self.config.url(self._chat(req)),
                json=self._body(req),
                headers=self._headers,
            ) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise _status_error(self.name, resp)
                chunks = decode_stream(resp.aiter_lines())
                async for ev in token_events(chunks, req.start_index, self.kind, time.monotonic):
                    yield ev
        except httpx.HTTPError as e:
            raise EndpointFailedError(f"{self.name}: {type(e).__name__}: {e}") from e
        except ApiError as e:  # an error event, or a cut stream: it broke after the headers
            what = f"{e.status} {e.code or e.type}"
            raise EndpointFailedError(f"{self.name}: mid-stream ({what}): {e.message}") from None

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def _status_error(name: str, resp: httpx.Response) -> Exception:
    try:
        err = ApiError.from_body(resp.status_code, resp.json())
    except ValueError:
        err = ApiError(resp.status_code, resp.text[:500])
    text = f"{name}: HTTP {resp.status_code}: {err.message}"
    if resp.status_code in _INVALID_STATUS:
        return InvalidRequestError(text)
    return EndpointFailedError(text)
