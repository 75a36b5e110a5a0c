"""An engine that replays a latency profile with real sleeps and placeholder text.

It is what lets one process host thousands of devices (or a fleet of server replicas): each stream
is one coroutine that sleeps until its next token is due, so 1,000+ concurrent streams cost little
more than their timers. Timing comes from a :class:`~disco.scheduler.profiles.ServerProfile`
(sampled TTFT distribution, gamma-distributed gaps) or a
:class:`~disco.scheduler.profiles.DeviceProfile` (TTFT = a + l / prefill_tps over prompt + prefix,
decode at decode_tps).

Determinism: every stream draws from its own RNG keyed by (seed, request id, start index), so a
run does not depend on how concurrent streams interleave. Requests without an id are numbered in
call order. Token *text* depends only on the token index (and the seed), so a stream resumed from a
prefix continues exactly where an uninterrupted one would have been.

Fault injection (for failover tests): ``fail_after_tokens=n`` raises
:class:`EndpointFailedError` after n tokens of a stream (0: before the first token);
``stall_after_tokens=n`` stops producing after n tokens without ending the stream (a hung server).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from disco.scheduler.endpoint import EndpointFailedError, GenerationRequest, InvalidRequestError
from disco.scheduler.profiles import (
    DEVICE_PROFILES,
    SERVER_PROFILES,
    DeviceProfile,
    Profile,
    ServerProfile,
    load_profile,
)
from disco.scheduler.tokens import estimate_tokens
from disco.scheduler.types import EndpointKind, TokenEvent

# Placeholder vocabulary: short words so that text length per token resembles real BPE output.
_WORDS = (
    "the", "quick", "model", "streams", "tokens", "to", "a", "reader", "who", "waits", "for",
    "each", "word", "while", "device", "and", "server", "share", "work", "within", "budget", "of",
    "time", "energy", "cost", "so", "that", "first", "token", "comes", "soon", "then", "rest",
    "follows", "at", "steady", "pace", "as", "text", "grows", "line", "by",
)  # fmt: skip

def resolve_profile(profile: Profile | str, kind: EndpointKind | str | None = None) -> Profile:
    """A profile object, a registered profile name, or a JSON file written by ``disco profile``."""
    if isinstance(profile, ServerProfile | DeviceProfile):
        return profile
    if kind is not None:
        return load_profile(profile, EndpointKind(kind).value)
    if profile in SERVER_PROFILES:
        return SERVER_PROFILES.get(profile)
    if profile in DEVICE_PROFILES:
        return DEVICE_PROFILES.get(profile)
    path = Path(profile)
    if path.is_file():
        try:
            file_kind = json.loads(path.read_text()).get("kind")
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"cannot read profile {profile}: {e}") from None
        return load_profile(profile, str(file_kind))
    known = ", ".join(SERVER_PROFILES.names() + DEVICE_PROFILES.names())
    raise ValueError(f"unknown profile {profile!r}: not a registered name ({known}) nor a file")


def check_faults(fail_after_tokens: int | None, stall_after_tokens: int | None) -> None:
    """The emulated engines' fault-injection knobs (see the module doc): None or >= 0."""
    for label, v in (("fail_after_tokens", fail_after_tokens),
                     ("stall_after_tokens", stall_after_tokens)):  # fmt: skip
        if v is not None and v < 0:
            raise ValueError(f"{label} must be >= 0, got {v}")


@dataclass(slots=True)
class EmulatedStats:
    """Counters a test (or the coordinator's tests) can inspect."""

    started: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    tokens: int = 0
    active: int = 0


class EmulatedEndpoint:
    """Replays ``profile`` in real time. Kind (device/server) follows the profile's kind.

    ``time_scale`` multiplies every sleep (0.01 replays a profile 100x faster, for tests).
    ``context_tokens`` bounds prompt + prefix, like a real engine's context window.
    """

    def __init__(
        self,
        profile: Profile | str,
        seed: int = 0,
        *,
        kind: EndpointKind | str | None = None,
        name: str | None = None,
        time_scale: float = 1.0,
        context_tokens: int = 8192,
        ttft_jitter_cv: float = 0.0,
        fail_after_tokens: int | None = None,
        stall_after_tokens: int | None = None,
    ) -> None:
        self.profile = resolve_profile(profile, kind)
        self.kind = EndpointKind(self.profile.kind)
        self.name = name or f"emulated:{self.profile.name}"
        if time_scale < 0:
            raise ValueError(f"time_scale must be >= 0, got {time_scale}")
        if context_tokens <= 0:
            raise ValueError(f"context_tokens must be > 0, got {context_tokens}")
        check_faults(fail_after_tokens, stall_after_tokens)
        self.seed = seed
        self.time_scale = time_scale
        self.context_tokens = context_tokens
        self.ttft_jitter_cv = ttft_jitter_cv  # device TTFT noise (server TTFT is already random)
        self.fail_after_tokens = fail_after_tokens
        self.stall_after_tokens = stall_after_tokens
        self.stats = EmulatedStats()
        self._anonymous = itertools.count()

    def count_tokens(self, text: str) -> int:
        return estimate_tokens(text)

    def _rng(self, req: GenerationRequest) -> np.random.Generator:
        key = req.request_id or f"#{next(self._anonymous)}"
        return np.random.default_rng([self.seed, zlib.crc32(key.encode()), req.start_index])

    def _timeline(self, req: GenerationRequest, prefill_tokens: int) -> tuple[float, np.ndarray]:
        """(TTFT, gaps between the following tokens), in unscaled seconds."""
        rng = self._rng(req)
        p = self.profile
        if isinstance(p, ServerProfile):
            ttft = float(p.sample_ttft(rng, prefill_tokens)[0])
        else:
            ttft = float(p.ttft(prefill_tokens))
            if self.ttft_jitter_cv > 0:
                shape = 1.0 / self.ttft_jitter_cv**2
                ttft *= float(rng.gamma(shape, 1.0 / shape))
        gaps = p.sample_tbt(rng, max(req.max_tokens - 1, 0))
        return ttft, gaps

    def token_text(self, index: int) -> str:
        return _WORDS[(index + self.seed) % len(_WORDS)] + " "

    def _validate(self, req: GenerationRequest) -> int:
        req.validate()
        prompt_tokens = req.prompt_tokens_hint or estimate_tokens(req.prompt)
        prefill = prompt_tokens + req.start_index
        if prefill >= self.context_tokens:
            raise InvalidRequestError(
                f"prompt + prefix is ~{prefill} tokens; {self.name} has a context window of "
                f"{self.context_tokens} tokens"
            )
        return prefill

    async def stream(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        prefill = self._validate(req)
        ttft, gaps = self._timeline(req, prefill)
        stats = self.stats
        stats.started += 1
        stats.active += 1
        finished = False
        try:
            # Sleep to absolute deadlines so scheduling delays do not accumulate as drift.
            due = time.monotonic() + ttft * self.time_scale
            for i in range(req.max_tokens):
                if i == self.fail_after_tokens:
                    stats.failed += 1
                    finished = True
                    raise EndpointFailedError(f"{self.name}: injected failure after {i} tokens")
                if i == self.stall_after_tokens:
                    await asyncio.Event().wait()  # never set: hangs until cancelled
                if i > 0:
                    due += float(gaps[i - 1]) * self.time_scale
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                index = req.start_index + i
                last = i == req.max_tokens - 1
                stats.tokens += 1
                yield TokenEvent(
                    index=index,
                    text=self.token_text(index),
                    time=time.monotonic(),
                    source=self.kind,
                    finish_reason="length" if last else None,
                )
            stats.completed += 1
            finished = True
        finally:
            stats.active -= 1
            if not finished:
                stats.cancelled += 1

    async def close(self) -> None:
        return None
