"""The chaos and soak benchmarks' users: an open-loop load of streaming requests, recorded as the
user received them.

Arrivals are Poisson at ``rate`` per second (seeded), bounded in count (``max_requests``) and
time (``duration_s``, then at most ``drain_s`` for the streams still open). Each request belongs
to one device's user: the agent with probability ``agent_share``, else a fleet device chosen
uniformly; it goes to that device's OpenAI API, or nowhere while that device is dead (a user whose
phone is off sends nothing, and no other device gets the request: ``skipped``). Every SSE chunk is recorded with its time, its ``disco.index`` (the token's index in
the whole response, as the device agent numbered it) and its ``disco.source``: duplicates, order
and completeness are judged from exactly what the user got. Loopback only, ``httpx`` in the
caller's event loop (never Locust: it must not share a process with Ray).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from disco.scheduler.tokens import estimate_tokens

# Words for the prompts (their token count is what the devices estimate or tokenize).
_WORDS = (
    "device", "server", "stream", "token", "budget", "latency", "phone", "reader", "model",
    "answer", "question", "river", "garden", "window", "morning", "letter", "story", "paint",
    "robot", "music", "winter", "summer", "bridge", "market", "number", "travel", "kitchen",
)  # fmt: skip


@dataclass(frozen=True)
class LoadOptions:
    rate: float = 3.0  # requests per second, Poisson
    duration_s: float = 60.0
    drain_s: float = 60.0  # after the last arrival, streams still open get this long
    max_requests: int | None = None  # None: 1.5 x rate x duration + 10
    agent_share: float = 0.15  # of the requests, to the real llama.cpp agent (while up)
    prompt_words: tuple[int, int] = (12, 160)  # log-uniform
    max_tokens: tuple[int, int] = (16, 64)  # uniform
    seed: int = 0
    read_timeout_s: float = 30.0  # a stream silent this long is recorded as hung
    agent_id: str = "agent-0"

    def request_cap(self) -> int:
        if self.max_requests is not None:
            return self.max_requests
        return int(1.5 * self.rate * self.duration_s) + 10


@dataclass
class StreamRecord:
    """One request as its user saw it; times in seconds from the run's start."""

    id: int
    device: str
    sent: float
    prompt_words: int
    max_tokens: int
    prompt_tokens: int = 0  # the core's estimate of the prompt (disco.scheduler.tokens)
    status: int = 0  # HTTP status; 0: no response
    error: str | None = None
    done: bool = False  # "data: [DONE]" came
    finish_reason: str | None = None
    end: float | None = None
    index: list[int | None] = field(default_factory=list)  # per chunk: disco.index
    source: list[str | None] = field(default_factory=list)  # per chunk: disco.source
    t: list[float] = field(default_factory=list)  # per chunk: when it arrived

    @property
    def accepted(self) -> bool:
        """The device took the request on (anything but no answer or a refusal: 4xx/429)."""
        return self.status == 200 or self.status >= 500

    @property
    def complete(self) -> bool:
        """Finished as a stream should: [DONE], a finish reason, indices 0..n-1 once each."""
        return (
            self.done
            and self.error is None
            and self.finish_reason is not None
            and self.index == list(range(len(self.index)))
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prompt_text(words: int, rng: np.random.Generator) -> str:
    picks = rng.integers(0, len(_WORDS), size=words)
    return " ".join(_WORDS[i] for i in picks) + "."


class OpenLoop:
    """Send the schedule, record every stream; :meth:`run` returns the records."""

    def __init__(
        self,
        opts: LoadOptions,
        targets: Callable[[], dict[str, str | None]],
        clock_origin: float | None = None,
    ) -> None:
        self.opts = opts
        self.targets = targets  # every device id -> its API's URL, None while it is dead
        self.t0 = time.monotonic() if clock_origin is None else clock_origin
        self.records: list[StreamRecord] = []
        self.skipped = 0  # arrivals whose device was dead: not sent
        self._tasks: set[asyncio.Task] = set()
        self.stopped = False

    def now(self) -> float:
        return time.monotonic() - self.t0

    def open_streams(self) -> list[StreamRecord]:
        """The requests sent and not ended yet."""
        return [r for r in self.records if r.end is None]

    def schedule(self) -> list[float]:
        """Arrival times (s from the start), seeded, within the duration and the cap."""
        o = self.opts
        rng = np.random.default_rng([o.seed, 1])
        out, t = [], 0.0
        while len(out) < o.request_cap():
            t += float(rng.exponential(1.0 / o.rate))
            if t >= o.duration_s:
                break
            out.append(t)
        return out

    async def run(self) -> list[StreamRecord]:
        import httpx

        o = self.opts
        rng = np.random.default_rng([o.seed, 2])
        timeout = httpx.Timeout(o.read_timeout_s, connect=5.0)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            for due in self.schedule():
                if self.stopped:
                    break
                delay = due - self.now()
                if delay > 0:
                    await asyncio.sleep(delay)
                devices = self.targets()
                device = self._pick(devices, rng)
                url = devices.get(device)
                lo, hi = o.prompt_words
                words = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
                max_tokens = int(rng.integers(o.max_tokens[0], o.max_tokens[1] + 1))
                prompt = prompt_text(words, rng)
                if url is None:
                    self.skipped += 1
                    continue
                rec = StreamRecord(len(self.records), device, self.now(), words, max_tokens)
                self.records.append(rec)
                rec.prompt_tokens = estimate_tokens(prompt)
                body = {"prompt": prompt, "max_tokens": rec.max_tokens, "stream": True,
                        "temperature": 0.0}  # fmt: skip
                task = asyncio.create_task(self._one(client, url, body, rec))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            await self._drain()
        return self.records

    def _pick(self, devices: dict[str, str | None], rng: np.random.Generator) -> str:
        agent = self.opts.agent_id
        fleet = sorted(d for d in devices if d != agent)
        share = rng.random()  # drawn for every arrival: the same draws whoever is up
        if agent in devices and (not fleet or share < self.opts.agent_share):
            return agent
        return fleet[int(rng.integers(0, len(fleet)))]

    async def _drain(self) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.opts.drain_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _one(self, client: Any, url: str, body: dict[str, Any], rec: StreamRecord) -> None:
        import httpx

        try:
            async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                rec.status = r.status_code
                if r.status_code != 200:
                    rec.error = (await r.aread()).decode("utf-8", "replace")[:300]
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data.strip() == "[DONE]":
                        rec.done = True
                        break
                    self._chunk(rec, json.loads(data))
                    if rec.error is not None:
                        break
        except asyncio.CancelledError:
            rec.error = rec.error or "hung: still open at the end of the drain"
        except (httpx.HTTPError, ValueError, OSError) as e:
            rec.error = f"{type(e).__name__}: {e}"[:300]
        finally:
            rec.end = self.now()

    def _chunk(self, rec: StreamRecord, obj: dict[str, Any]) -> None:
        if "error" in obj:
            err = obj["error"]
            rec.error = "stream error: " + str(err.get("message") if isinstance(err, dict) else err)
            return
        choices = obj.get("choices") or []
        if not choices:
            return  # a usage chunk
        tag = obj.get("disco") or {}
        rec.index.append(tag.get("index"))
        rec.source.append(tag.get("source"))
        rec.t.append(self.now())
        if choices[0].get("finish_reason"):
            rec.finish_reason = choices[0]["finish_reason"]


__all__ = ["LoadOptions", "OpenLoop", "StreamRecord", "prompt_text"]
