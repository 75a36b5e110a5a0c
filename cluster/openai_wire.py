"""The OpenAI completions wire format the server deployment speaks: request parsing and SSE chunks.

No Ray, no web framework: parsing returns a :class:`CompletionBody` or raises :class:`ApiError`
(status + OpenAI-style error JSON), so the route and the tests share one set of rules.

Extensions (all optional, ignored by plain OpenAI clients):
- request ``prefix``: text already generated for this prompt (by this or another endpoint); the
  engine re-prefills ``prompt + prefix`` and continues. This is how a migration target or a
  failover target resumes a generation. ``start_index``: index of the first token this call
  yields (default 0; the client counts the prefix's tokens). ``prompt_tokens_hint``: prompt length
  in tokens for engines without a tokenizer (the emulated one).
- each chunk carries ``disco: {"index": i, "token_id": id}`` so the client sees token boundaries.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from disco.scheduler.endpoint import GenerationRequest, InvalidRequestError
from disco.scheduler.types import TokenEvent


class ApiError(Exception):
    """A request the API refuses: HTTP ``status`` with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "code": self.code}}


@dataclass(frozen=True, slots=True)
class CompletionBody:
    model: str
    request: GenerationRequest
    stream: bool
    include_usage: bool


def parse_json(raw: bytes, max_bytes: int) -> dict[str, Any]:
    if len(raw) > max_bytes:
        raise ApiError(413, f"request body is {len(raw)} bytes; the limit is {max_bytes}")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, over-long integers
        raise ApiError(400, f"body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "body must be a JSON object")
    return data


def _field(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    v = data.get(name, default)
    if v is None:
        return default
    # bool is an int in Python; refuse it where a number is wanted.
    if isinstance(v, bool) and kind is not bool:
        raise ApiError(400, f"'{name}' must be {_kind_name(kind)}, got a boolean")
    if not isinstance(v, kind):
        raise ApiError(400, f"'{name}' must be {_kind_name(kind)}, got {type(v).__name__}")
    return v


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


def _float(data: Mapping[str, Any], name: str, default: float) -> float:
    try:
        return float(_field(data, name, (int, float), default))
    except OverflowError:  # an integer too large for a float
        raise ApiError(400, f"'{name}' is out of range") from None


def parse_completion(
    data: Mapping[str, Any], model_name: str, max_tokens_limit: int, request_id: str
) -> CompletionBody:
    """Validate a /v1/completions body; raise :class:`ApiError` (4xx) on anything wrong."""
    model = _field(data, "model", str, model_name)
    if model != model_name:
        raise ApiError(
            404,
            f"model {model!r} does not exist (this server has {model_name!r})",
            "model_not_found",
        )
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # OpenAI allows a one-element list
    if not isinstance(prompt, str) or not prompt.strip():
        raise ApiError(400, "'prompt' must be a non-empty string")
    max_tokens = _field(data, "max_tokens", int, 16)
    if max_tokens <= 0 or max_tokens > max_tokens_limit:
        raise ApiError(400, f"'max_tokens' must be in [1, {max_tokens_limit}], got {max_tokens}")
    # Types here; the ranges are GenerationRequest.validate's, shared with the device agent.
    temperature = _float(data, "temperature", 0.0)
    top_p = _float(data, "top_p", 1.0)
    seed = _field(data, "seed", int, None)
    n = _field(data, "n", int, 1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported")
    prefix = _field(data, "prefix", str, "")
    start_index = _field(data, "start_index", int, 0)
    if start_index < 0:
        raise ApiError(400, f"'start_index' must be >= 0, got {start_index}")
    hint = _field(data, "prompt_tokens_hint", int, None)
    if hint is not None and hint <= 0:
        raise ApiError(400, f"'prompt_tokens_hint' must be > 0, got {hint}")
    stream = _field(data, "stream", bool, False)
    opts = _field(data, "stream_options", dict, {})
    include_usage = bool(opts.get("include_usage", False))
    req = GenerationRequest(
        prompt=prompt,
        max_tokens=max_tokens,
        prefix=prefix,
        start_index=start_index,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        request_id=request_id,
        prompt_tokens_hint=hint,
    )
    try:
        req.validate()
    except InvalidRequestError as e:
        raise ApiError(400, str(e)) from None
    return CompletionBody(model=model, request=req, stream=stream, include_usage=include_usage)


def chunk(request_id: str, model: str, ev: TokenEvent, created: int) -> dict[str, Any]:
    """One OpenAI ``text_completion`` stream chunk for one token."""
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "text": ev.text, "logprobs": None, "finish_reason": ev.finish_reason}
        ],
        "disco": {"index": ev.index, "token_id": ev.token_id},
    }


def usage_chunk(request_id: str, model: str, created: int, body: CompletionBody, n: int) -> dict:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(body, n),
    }


def usage(body: CompletionBody, completion_tokens: int) -> dict[str, int]:
    prompt = body.request.prompt_tokens_hint or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


def completion(
    request_id: str, model: str, body: CompletionBody, events: list[TokenEvent]
) -> dict[str, Any]:
    """The non-streaming response: all tokens joined."""
    finish = events[-1].finish_reason if events else "length"
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": "".join(e.text for e in events),
                "logprobs": None,
                "finish_reason": finish or "length",
            }
        ],
        "usage": usage(body, len(events)),
    }


def sse(obj: dict[str, Any] | str) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n"


SSE_DONE = sse("[DONE]")
