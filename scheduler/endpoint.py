"""The one streaming interface every engine implements (DESIGN.md section 4).

Server and device, real and emulated, all speak this protocol, so the coordinator, the simulator's
calibration, the profiler and the benchmarks never care which engine is behind it.

Contract:
- ``stream(req)`` is an async iterator of :class:`TokenEvent`, yielded as each token is produced
  (never buffered to the end). Indices start at ``req.start_index`` and increase by one.
- A non-empty ``req.prefix`` is text already generated (by this or another endpoint): the engine
  re-prefills ``prompt + prefix`` and continues from there. That is how migration and failover
  resume a generation.
- Chat: ``req.messages`` set means ``prompt`` is those messages rendered by the chat template of
  the model that serves them (the agent renders with its device engine's ``render_chat``, the
  Serve app with its engine's), ending with the assistant turn's header; a resume appends the
  delivered text as ``prefix``, inside that same assistant turn. An endpoint that forwards the
  request to a server (``openai``, the Serve handle) sends the messages instead, so the server
  renders them with its own model's template; an engine with a template may also end the turn
  on that template's stop strings.
- Cancellation: closing the iterator (``await it.aclose()``) or cancelling the task that drives it
  stops the engine's work at the next token boundary; no token is yielded after that.
- Bad input raises :class:`InvalidRequestError` before any token; an engine that fails mid-stream
  raises :class:`EndpointFailedError` so the coordinator can hand over to the other endpoint.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .registry import Registry
from .types import EndpointKind, TokenEvent


class EndpointError(Exception):
    """Base class of every endpoint error."""


class InvalidRequestError(EndpointError, ValueError):
    """The request cannot be served as given (empty prompt, too long, bad max_tokens...)."""


class EndpointFailedError(EndpointError):
    """The endpoint died or lost its connection; the generation so far is still valid."""


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    prompt: str
    max_tokens: int
    prefix: str = ""  # text already generated; the engine continues after it
    start_index: int = 0  # index of the first token this call yields (= tokens in prefix)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    request_id: str = ""
    # Emulated engines need the prompt length in tokens without a tokenizer; real engines ignore it.
    prompt_tokens_hint: int | None = None
    # Prefix-cache key: the device-side request id, shared by a request's legs (the original,
    # a migration target, a failover), so a re-prefill on the same replica finds the prompt
    # already computed. None: ``request_id``.
    cache_key: str | None = None
    # A chat request's messages as (role, content) pairs; None: a plain completion. See the
    # module docstring: ``prompt`` is then their rendering for the serving model.
    messages: tuple[tuple[str, str], ...] | None = None

    def chat_messages(self) -> list[dict[str, str]] | None:
        """``messages`` as OpenAI's ``[{"role", "content"}]`` (None for a completion)."""
        if self.messages is None:
            return None
        return [{"role": role, "content": content} for role, content in self.messages]

    def validate(self) -> None:
        """Checks shared by every engine; engines add their own (context window)."""
        if not self.prompt or not self.prompt.strip():
            raise InvalidRequestError("prompt must be a non-empty string")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool):
            raise InvalidRequestError(f"max_tokens must be an integer, got {self.max_tokens!r}")
        if self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.start_index < 0:
            raise InvalidRequestError(f"start_index must be >= 0, got {self.start_index}")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequestError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")


@runtime_checkable
class Endpoint(Protocol):
    """A token producer: a llama.cpp device, a vLLM replica, an OpenAI API, an emulated profile."""

    kind: EndpointKind
    name: str

    def stream(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]: ...

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes in this engine (an estimate where the engine has no tokenizer)."""
        ...

    async def close(self) -> None:
        """Release the engine's resources (model memory, connections)."""
        ...


# name -> factory(**config) -> Endpoint. Engines register themselves where they are defined
# (device_agents/, cluster/); importing those modules fills this registry.
ENDPOINTS: Registry = Registry("endpoint engine")
