"""Stop strings over a token stream: where a chat template's turn ends in text, not in a token.

A model whose chat template ends a turn with an end-of-generation token (SmolLM2's
``<|im_end|>``, Gemma's ``<end_of_turn>``) stops by itself: llama.cpp flags the token as EOG.
A GGUF that ships no template is prompted with the plain transcript
(:func:`disco.scheduler.wire.default_chat_template`), and a model that goes on after its answer
writes the next turn's header (``"\\nuser:"``) as ordinary text. :class:`StopMatcher` ends the
stream there, as OpenAI servers end a stream at a ``stop`` string:

- the stop string and everything after it are never sent; the token in which it starts is sent
  with the text before it (possibly empty) and ``finish_reason="stop"``;
- a token whose text may be the beginning of a stop string (``"\\n"`` before ``"user:"``) is held
  back until a later token settles it, then sent whole with its own timestamp. Tokens stay whole
  and keep their indices, so the delivered text is a prefix of the model's own, and a resume from
  it continues the same turn.

Pure and synchronous: the llama.cpp engine runs it on its worker thread, between decode steps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from disco.scheduler.types import TokenEvent


class StopMatcher:
    """Feed it a stream's events in order (:meth:`push`); it returns those safe to send now."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held: list[TokenEvent] = []
        self.stopped = False  # a stop string matched: the stream is over

    def push(self, ev: TokenEvent) -> list[TokenEvent]:
        """The events that can go out after ``ev`` (none once :attr:`stopped`)."""
        if self.stopped:
            return []
        self.held.append(ev)
        text = "".join(e.text for e in self.held)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._cut(min(hits))
        if ev.finish_reason is not None:  # the stream ends here: nothing left to wait for
            return self.flush()
        limit = len(text) - self._open_tail(text)
        out: list[TokenEvent] = []
        pos = 0
        while self.held and pos + len(self.held[0].text) <= limit:
            pos += len(self.held[0].text)
            out.append(self.held.pop(0))
        return out

    def flush(self) -> list[TokenEvent]:
        """Everything held (the stream ended or failed without a stop string)."""
        out, self.held = self.held, []
        return out

    def _cut(self, hit: int) -> list[TokenEvent]:
        """The held events up to the stop string at ``hit``, the last one cut before it."""
        out: list[TokenEvent] = []
        pos = 0
        for ev in self.held:
            end = pos + len(ev.text)
            if end <= hit:
                out.append(ev)
                pos = end
                continue
            out.append(replace(ev, text=ev.text[: hit - pos], finish_reason="stop"))
            break
        self.held = []
        return out

    def _open_tail(self, text: str) -> int:
        """The length of the longest end of ``text`` that begins some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
