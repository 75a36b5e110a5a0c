"""The OpenAI wire protocol as the testbed speaks it, written once for every layer.

Who uses it: the Ray Serve app and the device agent parse requests and write chunks with it;
the ``openai`` engine, the Serve-handle endpoint and the load generator read streams with it;
the test stub and the mock server speak through it. It sits in the core so that every layer may
import it. Pure: dataclasses, json, str and bytes; no sockets, no web framework, and no clock
(the caller passes ``created`` and the clock that stamps tokens).

Requests (``POST /v1/completions``, ``POST /v1/chat/completions``): :func:`parse_request`
checks every field before any work starts and raises :class:`ApiError` (a 4xx naming the
field). OpenAI's fields plus these extensions, all optional:

- ``prefix`` (str): text already generated for this prompt, by this or another endpoint; the
  engine re-prefills ``prompt + prefix`` and continues (migration and failover resume this way).
  ``start_index`` (int >= 0): the index of the first token this call yields (the client counts
  the prefix's tokens). A chat body may give the prefix in vLLM's words instead:
  ``continue_final_message: true`` with a final assistant message, which is then the prefix.
- ``prompt_tokens_hint`` (int > 0): the prompt's length in tokens, for an emulated engine's
  timing. ``usage.prompt_tokens`` never uses it: it is the engine's own ``count_tokens``.
- ``cache_key`` (str): the device-side id of the request, the same for all its legs (original,
  migration target, failover), so an engine with a prefix cache finds the prompt it already
  computed for that request (the emulated batching replica does, as vLLM's prefix cache would).
- ``stream_options.include_usage`` (OpenAI's): one last chunk with ``usage`` and no choices.

Chat: the messages are rendered once into the prompt by the serving model's own chat template
(``chat_template``: the agent passes its device engine's, the Serve app its engine's; see
:func:`chat_template_of`), ending with the assistant turn's header, and kept in the request
(``GenerationRequest.messages``) so that a server reached over the wire renders them with its own
template. ``prefix`` then continues the assistant's turn. :func:`default_chat_template` is the
plain transcript of engines without a template (the emulated ones, a GGUF that ships none).

``max_tokens`` defaults to :data:`DEFAULT_MAX_TOKENS` (16) on every route: OpenAI's documented
default for ``/v1/completions``, and vLLM's, so a hand-written request gets what those servers
give, and a forgotten field costs little. The testbed's own clients always send it.

Chunks: one ``data:`` event per token, or per few tokens listed in ``logprobs`` (``tokens`` for
completions, ``content[].token`` for chat), each with the ``disco`` extension
``{"index": int, "source": "server" | "device" | null, "token_id": int | null}``: the index of
the chunk's first token in the whole response, the endpoint that produced it, and the model's
token id when the chunk carries exactly one token of a model that has ids. OpenAI clients ignore
it. A whole (non-streamed) response carries ``{"sources": [per token], "migrated_at": int|null}``.

Empty text: a choice whose text is empty is a token only when it carries a ``finish_reason``
(the end-of-generation token: llama.cpp's end-of-sequence, OpenAI's finish-only last chunk).
Otherwise (chat's role-only first delta, a token that completes no character yet, a usage
chunk) it is no token: the user saw nothing, so it starts no TTFT and adds no gap. Readers
(:func:`token_events`) number the tokens they count, so indices stay contiguous whatever the
producer sent; the ``disco`` index is the producer's own count, for the record.

Errors: OpenAI's body ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status.
Inside a stream, and over a Ray handle where there is no status line, the same object plus
``"status"`` is one event, with no ``[DONE]`` after it: the stream broke, and the client may
resume elsewhere from the tokens it has.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .endpoint import GenerationRequest, InvalidRequestError
from .types import EndpointKind, TokenEvent

DEFAULT_MAX_TOKENS = 16
DONE = "[DONE]"
SSE_MEDIA_TYPE = "text/event-stream"
# No caching, and no buffering by a reverse proxy (nginx honours X-Accel-Buffering): each token
# must reach the user when it is written.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
ENGINE_FAILED = "engine_failed"  # the error code of a 503: no endpoint could (go on) serving

ChatTemplate = Callable[[list[dict[str, str]]], str]


# ---- errors ------------------------------------------------------------------------------------


class ApiError(Exception):
    """A request the API refuses or a stream that broke: an HTTP ``status`` and OpenAI's error
    object (``type`` as OpenAI names the class of error, ``code`` a finer string, or None)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,  # OpenAI's field name
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _error_type(status)
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        """The JSON body of an error response."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}  # fmt: skip

    def event(self) -> dict[str, Any]:
        """The body plus ``status``: an error inside a stream or over a Ray handle."""
        return self.body() | {"status": self.status}

    @classmethod
    def from_body(cls, status: int, body: Any) -> ApiError:
        """Read an error response (or event) back, whatever shape a server gave it."""
        err = body.get("error", body) if isinstance(body, dict) else body
        if not isinstance(err, dict):
            return cls(status, str(err))
        code = err.get("code")
        return cls(
            status,
            str(err.get("message", err)),
            type=err.get("type") if isinstance(err.get("type"), str) else None,
            code=None if code is None else str(code),
            param=err.get("param") if isinstance(err.get("param"), str) else None,
        )


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    return "invalid_request_error" if status < 500 else "server_error"


def route_error(status: int, detail: str, method: str, path: str) -> ApiError:
    """The web framework's own refusal (no such route: 404, wrong method: 405, a body it could
    not bind: 422) as OpenAI's error body, e.g. ``Not Found: GET /v1/nothing``."""
    return ApiError(status, f"{detail or 'error'}: {method} {path}")


def engine_failed(message: str) -> ApiError:
    """The 503 of a server whose engine (or an agent whose endpoints) failed."""
    return ApiError(503, message, code=ENGINE_FAILED)


def check_api_key(header: str | bytes | None, api_key: str | None) -> None:
    """Refuse (401) a request whose ``Authorization`` is not ``Bearer <api_key>``; no key: open."""
    if api_key is None:
        return
    got = header.encode() if isinstance(header, str) else header or b""
    if not hmac.compare_digest(got, f"Bearer {api_key}".encode()):
        raise ApiError(401, "missing or wrong API key", code="invalid_api_key")


# ---- the disco extension -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DiscoTag:
    """The ``disco`` field of a stream chunk (see the module docstring)."""

    index: int
    source: str | None = None
    token_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "source": self.source, "token_id": self.token_id}

    @classmethod
    def from_dict(cls, obj: Any) -> DiscoTag | None:
        """The tag of a chunk, or None where the chunk has none (a plain OpenAI server)."""
        if not isinstance(obj, dict) or not _is_int(obj.get("index")):
            return None
        src, tid = obj.get("source"), obj.get("token_id")
        return cls(obj["index"], src if isinstance(src, str) else None,
                   tid if _is_int(tid) else None)  # fmt: skip


# ---- requests ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiRequest:
    """A validated request body: the generation to run and how to answer it."""

    model: str
    request: GenerationRequest
    chat: bool = False
    stream: bool = False
    include_usage: bool = False
    user: str | None = None  # OpenAI's end-user id; the agent routes a fleet's devices by it


async def read_body(parts: AsyncIterable[bytes], content_length: str | None, limit: int) -> bytes:
    """A request body, refused with a 413 as soon as it passes ``limit`` bytes: a declared
    length is checked before reading, and a chunked upload is counted while it is read."""
    if content_length is not None:
        if not content_length.strip().isdigit():
            raise ApiError(400, "bad Content-Length header")
        if int(content_length) > limit:
            raise ApiError(413, f"request body is {content_length} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for part in parts:
        size += len(part)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(part)
    return b"".join(chunks)


def parse_json(raw: bytes, limit: int | None = None) -> dict[str, Any]:
    """The body as a JSON object, or a 400 (413 past ``limit``) that says what is wrong."""
    if limit is not None and len(raw) > limit:
        raise ApiError(413, f"request body is {len(raw)} bytes; the limit is {limit}")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, over-long integers
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "request body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


def default_chat_template(messages: list[dict[str, str]]) -> str:
    """A plain role-prefixed transcript ending where the assistant's answer starts, so that
    ``template + prefix`` continues the assistant's turn: the template of engines that have
    none of their own (emulated engines; a GGUF without ``tokenizer.chat_template``, which then
    stops at :data:`DEFAULT_CHAT_STOP`, the start of a turn the model invents)."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"


DEFAULT_CHAT_STOP = ("\nuser:", "\nassistant:", "\nsystem:")


def chat_template_of(engine: object) -> ChatTemplate:
    """The engine's own chat template (its ``render_chat(messages) -> prompt``, as the llama.cpp
    and vLLM engines have), else :func:`default_chat_template`."""
    render = getattr(engine, "render_chat", None)
    return render if callable(render) else default_chat_template


def parse_request(
    data: Mapping[str, Any],
    *,
    chat: bool = False,
    models: Sequence[str] | None = None,
    max_tokens_limit: int = 4096,
    request_id: str = "",
    chat_template: ChatTemplate = default_chat_template,
) -> ApiRequest:
    """Validate a completions (or, with ``chat``, a chat completions) body.

    ``models``: the names this server answers to, the first the default (None: any name).
    Raises :class:`ApiError` (400, or 404 for an unknown model) before any work starts; the
    sampling ranges are :meth:`GenerationRequest.validate`'s, the one rule every engine shares.
    """
    model = _model(data, models)
    prefix = _field(data, "prefix", str, "")
    chat_turns = None
    if chat:
        messages = parse_messages(data.get("messages"))
        if _field(data, "continue_final_message", bool, False):
            messages, prefix = _final_assistant(data, messages, prefix)
        try:
            prompt = chat_template(messages)
        except InvalidRequestError as e:  # the model's template refuses these messages
            raise ApiError(400, str(e), param="messages") from None
        chat_turns = tuple((m["role"], m["content"]) for m in messages)
        max_tokens = _field(data, "max_completion_tokens", int, None)
        if max_tokens is None:
            max_tokens = _field(data, "max_tokens", int, DEFAULT_MAX_TOKENS)
    else:
        prompt = _prompt(data.get("prompt"))
        max_tokens = _field(data, "max_tokens", int, DEFAULT_MAX_TOKENS)
    if not 0 < max_tokens <= max_tokens_limit:
        raise ApiError(400, f"'max_tokens' must be in [1, {max_tokens_limit}], got {max_tokens}",
                       param="max_tokens")  # fmt: skip
    if _field(data, "n", int, 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    start_index = _field(data, "start_index", int, 0)
    if start_index < 0:
        raise ApiError(400, f"'start_index' must be >= 0, got {start_index}", param="start_index")
    hint = _field(data, "prompt_tokens_hint", int, None)
    if hint is not None and hint <= 0:
        raise ApiError(400, f"'prompt_tokens_hint' must be > 0, got {hint}",
                       param="prompt_tokens_hint")  # fmt: skip
    options = _field(data, "stream_options", dict, {})
    req = GenerationRequest(
        prompt=prompt,
        max_tokens=max_tokens,
        prefix=prefix,
        start_index=start_index,
        temperature=_number(data, "temperature", 0.0),
        top_p=_number(data, "top_p", 1.0),
        seed=_field(data, "seed", int, None),
        request_id=request_id,
        prompt_tokens_hint=hint,
        cache_key=_field(data, "cache_key", str, None),
        messages=chat_turns,
    )
    try:
        req.validate()
    except InvalidRequestError as e:
        raise ApiError(400, str(e)) from None
    return ApiRequest(
        model=model,
        request=req,
        chat=chat,
        stream=_field(data, "stream", bool, False),
        include_usage=_field(options, "include_usage", bool, False),
        user=_field(data, "user", str, None),
    )


def parse_messages(value: Any) -> list[dict[str, str]]:
    """Chat messages as ``{"role", "content"}`` with string content (text parts joined)."""
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, "each message needs a string 'role'", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: text only
            if not all(_is_text_part(p) for p in content):
                raise ApiError(400, "content parts must be text parts with a string 'text'",
                               param="messages")  # fmt: skip
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, "message 'content' must be a string", param="messages")
        out.append({"role": m["role"], "content": content})
    if not any(m["content"].strip() for m in out):
        raise ApiError(400, "'messages' are all empty", param="messages")
    return out


def _is_text_part(p: Any) -> bool:
    return (
        isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str)
    )


def _final_assistant(
    data: Mapping[str, Any], messages: list[dict[str, str]], prefix: str
) -> tuple[list[dict[str, str]], str]:
    """vLLM's resume: the final assistant message is the prefix, the rest the prompt."""
    if data.get("add_generation_prompt") is True:  # vLLM refuses the pair as well
        raise ApiError(400, "'continue_final_message' needs 'add_generation_prompt': false",
                       param="add_generation_prompt")  # fmt: skip
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise ApiError(400, "'continue_final_message' needs a final assistant message after "
                       "the prompt", param="messages")  # fmt: skip
    if prefix:
        raise ApiError(400, "give the prefix once: 'prefix' or 'continue_final_message'",
                       param="prefix")  # fmt: skip
    rest = messages[:-1]
    if not any(m["content"].strip() for m in rest):
        raise ApiError(400, "'messages' before the final assistant message are all empty",
                       param="messages")  # fmt: skip
    return rest, messages[-1]["content"]


def _model(data: Mapping[str, Any], models: Sequence[str] | None) -> str:
    model = _field(data, "model", str, models[0] if models else "default")
    if models is not None and model not in models:
        raise ApiError(404, f"model {model!r} does not exist (served: {', '.join(models)})",
                       code="model_not_found", param="model")  # fmt: skip
    return model


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]  # OpenAI allows a one-element list
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
    return value


def _field(data: Mapping[str, Any], name: str, kind: type, default: Any) -> Any:
    """``data[name]`` of type ``kind`` (a boolean is no number here), or ``default``."""
    v = data.get(name)
    if v is None:
        return default
    if (isinstance(v, bool) and kind is not bool) or not isinstance(v, kind):
        got = "a boolean" if isinstance(v, bool) else type(v).__name__
        raise ApiError(400, f"'{name}' must be {_KIND_NAMES[kind]}, got {got}", param=name)
    return v


_KIND_NAMES = {str: "a string", int: "an integer", bool: "a boolean", dict: "an object",
               float: "a number"}  # fmt: skip


def _number(data: Mapping[str, Any], name: str, default: float) -> float:
    v = data.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ApiError(400, f"'{name}' must be a number, got {type(v).__name__}", param=name)
    try:
        return float(v)
    except OverflowError:  # an integer too large for a float
        raise ApiError(400, f"'{name}' is out of range", param=name) from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def request_body(
    req: GenerationRequest,
    model: str,
    *,
    messages: list[dict[str, str]] | None = None,
    extensions: bool = True,
    stream: bool = True,
) -> dict[str, Any]:
    """What a client sends for ``req``: a completions body, or a chat body with ``messages``
    (a chat request's own, ``req.chat_messages()``, which the server renders for its model).

    With ``extensions`` (a server of this testbed) the resume travels as ``prefix`` and
    ``start_index``; without, a completions prompt is ``prompt + prefix`` (any server re-reads
    it), and a chat caller puts the prefix into ``messages`` itself.
    """
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stream": stream,
    }
    if messages is not None:
        body["messages"] = messages
    else:
        body["prompt"] = req.prompt if extensions else req.prompt + req.prefix
    if req.seed is not None:
        body["seed"] = req.seed
    if extensions:
        if req.prefix:
            body["prefix"] = req.prefix
        if req.start_index:
            body["start_index"] = req.start_index
        if req.prompt_tokens_hint is not None:
            body["prompt_tokens_hint"] = req.prompt_tokens_hint
        key = req.cache_key or req.request_id
        if key:
            body["cache_key"] = key  # the same for every leg of one request (prefix cache)
    return body


# ---- responses ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }

    @classmethod
    def counted(
        cls, req: GenerationRequest, count_tokens: Callable[[str], int], completion_tokens: int
    ) -> Usage:
        """Usage by the engine's own tokenizer: the tokens this call prefilled (the prompt, and
        on a resume the prefix it re-read), never the client's hint."""
        prompt = count_tokens(req.prompt) + (count_tokens(req.prefix) if req.prefix else 0)
        return cls(prompt, completion_tokens)

    @classmethod
    def from_dict(cls, obj: Any) -> Usage | None:
        if not isinstance(obj, dict):
            return None
        p, c = obj.get("prompt_tokens"), obj.get("completion_tokens")
        return cls(p, c) if _is_int(p) and _is_int(c) else None


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """What every chunk of one response repeats: its id, model, kind, and its creation time
    (Unix seconds; the caller reads the clock, the core never does)."""

    id: str
    model: str
    created: int
    chat: bool = False

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}  # fmt: skip


def chunk(head: ResponseHead, events: Sequence[TokenEvent], *, first: bool = False) -> dict:
    """One stream chunk carrying ``events`` (one token, or a few that arrived together).

    ``first``: the response's first chunk, which for chat also names the assistant role.
    """
    text = "".join(ev.text for ev in events)
    pieces = [ev.text for ev in events] if len(events) > 1 else None
    last = events[-1]
    if head.chat:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        lp = {"content": [{"token": t} for t in pieces]} if pieces else None
        choice: dict[str, Any] = {"index": 0, "delta": delta}
        obj = "chat.completion.chunk"
    else:
        lp = {"tokens": pieces} if pieces else None
        choice = {"index": 0, "text": text}
        obj = "text_completion"
    choice |= {"logprobs": lp, "finish_reason": last.finish_reason}
    tag = DiscoTag(events[0].index, _source(events[0]), events[0].token_id if not pieces else None)
    return head._envelope(obj, [choice]) | {"disco": tag.to_dict()}


def usage_chunk(head: ResponseHead, usage: Usage) -> dict[str, Any]:
    """The last chunk when the client asked for ``stream_options.include_usage``."""
    obj = "chat.completion.chunk" if head.chat else "text_completion"
    return head._envelope(obj, []) | {"usage": usage.to_dict()}


def completion(
    head: ResponseHead, events: Sequence[TokenEvent], usage: Usage, migrated_at: int | None = None
) -> dict[str, Any]:
    """The whole (non-streamed) response."""
    text = "".join(ev.text for ev in events)
    finish = (events[-1].finish_reason if events else None) or "stop"
    if head.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}}
    else:
        choice = {"index": 0, "text": text}
    choice |= {"logprobs": None, "finish_reason": finish}
    ext = {"sources": [_source(ev) for ev in events], "migrated_at": migrated_at}
    obj = "chat.completion" if head.chat else "text_completion"
    return head._envelope(obj, [choice]) | {"usage": usage.to_dict(), "disco": ext}


def _source(ev: TokenEvent) -> str | None:
    return ev.source.value if ev.source is not None else None


def sse(obj: dict[str, Any] | str) -> str:
    """One server-sent event: ``data: <compact JSON>`` and the blank line that ends it."""
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n"


SSE_DONE = sse(DONE)


# ---- reading streams ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Chunk:
    """One decoded stream event: its tokens by the empty-text rule, and what else it said."""

    tokens: tuple[str, ...] = ()
    finish_reason: str | None = None
    done: bool = False  # ``data: [DONE]``
    error: ApiError | None = None
    disco: DiscoTag | None = None
    usage: Usage | None = None

    def events(self, index: int, now: float, source: EndpointKind | None) -> list[TokenEvent]:
        """The chunk's tokens as events numbered from ``index``, all stamped ``now`` (tokens
        that arrive together reach the user together); the finish reason on the last."""
        n = len(self.tokens)
        tid = self.disco.token_id if self.disco is not None and n == 1 else None
        return [
            TokenEvent(index + i, t, now, tid, source, self.finish_reason if i == n - 1 else None)
            for i, t in enumerate(self.tokens)
        ]


def decode_chunk(obj: Any) -> Chunk:
    """A chunk as an object (parsed SSE data, or an item over a Ray handle)."""
    if not isinstance(obj, dict):
        return Chunk(error=ApiError(502, f"unexpected chunk: {str(obj)[:80]!r}"))
    if "error" in obj:
        status = obj.get("status")
        return Chunk(error=ApiError.from_body(status if _is_int(status) else 500, obj))
    choices = obj.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    usage = Usage.from_dict(obj.get("usage"))
    tag = DiscoTag.from_dict(obj.get("disco"))
    if not isinstance(choice, dict):
        return Chunk(disco=tag, usage=usage)  # a usage-only chunk
    finish = choice.get("finish_reason")
    finish = finish if isinstance(finish, str) else None
    return Chunk(_tokens(choice, finish), finish, disco=tag, usage=usage)


def _tokens(choice: dict[str, Any], finish: str | None) -> tuple[str, ...]:
    """The empty-text rule (module docstring) over the choice's text or its listed pieces."""
    text = choice.get("text")
    if text is None:  # chat puts it in the delta
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else None
    text = text if isinstance(text, str) else ""
    pieces = _pieces(choice.get("logprobs"))
    if not pieces or "".join(pieces) != text:  # pieces that do not spell the text are not used
        pieces = [text]
    kept = tuple(p for p in pieces if p)
    return kept if kept or finish is None else ("",)


def _pieces(lp: Any) -> list[str] | None:
    if not isinstance(lp, dict):
        return None
    tokens = lp.get("tokens")  # completions
    if tokens is None and isinstance(lp.get("content"), list):  # chat
        tokens = [c.get("token") for c in lp["content"] if isinstance(c, dict)]
    if isinstance(tokens, list) and len(tokens) > 1 and all(isinstance(t, str) for t in tokens):
        return tokens
    return None


def decode_data(payload: str) -> Chunk:
    """One SSE ``data`` payload: ``[DONE]``, an error, or a chunk."""
    if payload.strip() == DONE:
        return Chunk(done=True)
    try:
        obj = json.loads(payload)
    except ValueError:
        return Chunk(error=ApiError(502, f"malformed SSE data: {payload[:80]!r}"))
    return decode_chunk(obj)


class SSEDecoder:
    """Feed it the stream's lines (bytes or str, with or without line ends); it returns one
    :class:`Chunk` per complete ``data:`` event, else None."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: bytes | str) -> Chunk | None:
        if isinstance(line, bytes):
            line = line.decode("utf-8", errors="replace")
        line = line.rstrip("\r\n")
        if line.startswith("data:"):
            self._data.append(line[5:].removeprefix(" "))
            return None
        if line == "":  # a blank line ends an event
            return self.flush()
        return None  # comments (":"), "event:", "id:", "retry:" carry no data

    def flush(self) -> Chunk | None:
        """The event still open, if any (a server that closed without the blank line)."""
        if not self._data:
            return None
        payload, self._data = "\n".join(self._data), []
        return decode_data(payload)


async def decode_stream(lines: AsyncIterable[bytes | str]) -> AsyncIterator[Chunk]:
    """The chunks of a stream read line by line, the unterminated last event included."""
    dec = SSEDecoder()
    async for line in lines:
        c = dec.feed(line)
        if c is not None:
            yield c
    c = dec.flush()
    if c is not None:
        yield c


async def token_events(
    chunks: AsyncIterable[Chunk],
    start_index: int,
    source: EndpointKind | None,
    clock: Callable[[], float],
) -> AsyncIterator[TokenEvent]:
    """A stream's tokens as events numbered from ``start_index``, each stamped by ``clock`` as
    its chunk arrives. Raises the stream's error event as an :class:`ApiError`, and a 502 when
    the stream ends with neither a finish reason nor ``[DONE]`` (it was cut)."""
    index, finished = start_index, False
    async for c in chunks:
        if c.error is not None:
            raise c.error
        if c.done:
            return
        for ev in c.events(index, clock(), source):
            yield ev
            index += 1
        finished = finished or c.finish_reason is not None
    if not finished:
        raise ApiError(502, "the stream ended before a finish reason or [DONE]")
