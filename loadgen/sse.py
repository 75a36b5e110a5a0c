"""Parsing OpenAI-style streaming responses (server-sent events) into tokens.

One SSE event may carry several tokens (servers batch under load, vllm#5263); TBT must still be
per token. A chunk's tokens are counted from, in order of preference: ``choices[0].logprobs.tokens``
(the OpenAI completions field), the testbed's ``disco.tokens`` extension, else one token per
non-empty text chunk. Tokens that arrive in one chunk reach the user at the same instant: their
gaps are 0, which is what the user saw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Chunk:
    tokens: list[str] = field(default_factory=list)  # non-empty token texts in this event
    done: bool = False  # ``data: [DONE]``
    finish_reason: str | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # the ``disco`` extension, if present


class SSEDecoder:
    """Feeds raw lines (bytes or str, with or without line ends); yields one :class:`Chunk` per
    complete ``data:`` event."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: bytes | str) -> Chunk | None:
        if isinstance(line, bytes):
            line = line.decode("utf-8", errors="replace")
        line = line.rstrip("\r\n")
        if line.startswith("data:"):
            self._data.append(line[5:].lstrip(" "))
            return None
        if line == "" and self._data:  # blank line ends an event
            payload, self._data = "\n".join(self._data), []
            return parse_payload(payload)
        return None  # comments (":"), "event:", "id:", "retry:" carry no tokens

    def flush(self) -> Chunk | None:
        """An unterminated last event (a server that closes without the blank line)."""
        if not self._data:
            return None
        payload, self._data = "\n".join(self._data), []
        return parse_payload(payload)


def parse_payload(payload: str) -> Chunk:
    if payload.strip() == "[DONE]":
        return Chunk(done=True)
    try:
        obj = json.loads(payload)
    except json.JSONDecodeError:
        return Chunk(error=f"malformed SSE data: {payload[:80]!r}")
    if not isinstance(obj, dict):
        return Chunk(error=f"unexpected SSE data: {payload[:80]!r}")
    if "error" in obj:
        err = obj["error"]
        msg = err.get("message", err) if isinstance(err, dict) else err
        return Chunk(error=str(msg))
    extra = obj.get("disco") if isinstance(obj.get("disco"), dict) else {}
    choices = obj.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    text = choice.get("text")
    if text is None:  # chat completions put it in the delta
        text = (choice.get("delta") or {}).get("content") or ""
    tokens = _tokens_of(choice, extra, text)
    return Chunk(tokens=tokens, finish_reason=choice.get("finish_reason"), extra=extra)


def _tokens_of(choice: dict, extra: dict, text: str) -> list[str]:
    # Empty strings (a partial UTF-8 character) show the user nothing: they are not tokens here.
    lp = choice.get("logprobs")
    if isinstance(lp, dict) and isinstance(lp.get("tokens"), list) and lp["tokens"]:
        return [str(t) for t in lp["tokens"] if t]
    if isinstance(extra.get("tokens"), list) and extra["tokens"]:
        return [str(t) for t in extra["tokens"] if t]
    return [text] if text else []
