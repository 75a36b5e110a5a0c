"""An emulated server replica that runs the continuous-batching model in real time (DESIGN.md §8).

:class:`~disco.scheduler.batching.Replica` is the clock-agnostic model of a vLLM-style replica;
this engine is its real-clock driver. One instance is one replica: one ``Replica`` and one asyncio
task, the replica's batch clock, which plans a step, sleeps until the step's end and hands each
sequence the token the step produced. Every stream of the replica waits on that one clock, so TTFT
and TBT grow with the load the replica is offered, which is what lets the testbed close the loop
between DiSCo's routing and server latency. The same model drives the simulator in virtual time,
so emulated and simulated runs compare on one schedule.

Cost: streams are coroutines waiting on their own queue; the driver does O(1) work per token
(one queue put), so thousands of concurrent streams in one process cost little more than their
queues. The driver sleeps on an event while the replica is idle.

Clock: the model runs in unscaled seconds since construction; ``time_scale`` maps them onto
``time.monotonic()`` (0.1 runs the replica 10x faster). Steps sleep to absolute deadlines; a step
that overshoots its deadline delays the next one (it starts at the real time), as a real server's
would. Token events carry the real time at which the driver delivered them.

Text and faults follow :class:`~disco.device_agents.engines.emulated.EmulatedEndpoint`: token text
depends only on (index, seed), so a resumed stream continues exactly; ``fail_after_tokens`` and
``stall_after_tokens`` inject failures with the same semantics (a stalled stream leaves the batch,
so it hangs without holding a slot).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

from disco.device_agents.engines.emulated import EmulatedEndpoint, EmulatedStats, check_faults
from disco.scheduler.batching import Replica, ServerPreset
from disco.scheduler.endpoint import EndpointFailedError, GenerationRequest, InvalidRequestError
from disco.scheduler.presets import load_preset
from disco.scheduler.tokens import estimate_tokens
from disco.scheduler.types import EndpointKind, TokenEvent

MAX_SAMPLES = 100_000  # per replica: hours of steps at plotting resolution, a few MB at most

# What a stream's queue carries: (sequence-relative token index, delivery time) or a failure.
_Item = tuple[int, float] | BaseException


class BatchingEndpoint:
    """A continuous-batching server replica (``preset``) emulated in real time.

    ``context_tokens`` bounds prompt + prefix + max_tokens (default and cap: the preset's KV
    capacity, since a sequence that cannot fit the cache could never finish).
    """

    kind = EndpointKind.SERVER
    # Placeholder text shared with EmulatedEndpoint (it only reads ``self.seed``), so both
    # emulated engines produce the same words for the same (index, seed).
    token_text = EmulatedEndpoint.token_text

    def __init__(
        self,
        preset: ServerPreset | str,
        seed: int = 0,
        *,
        name: str | None = None,
        time_scale: float = 1.0,
        context_tokens: int | None = None,
        fail_after_tokens: int | None = None,
        stall_after_tokens: int | None = None,
        record: bool = True,
    ) -> None:
        self.preset = load_preset(preset)
        self.name = name or f"emulated:{self.preset.name}"
        if time_scale <= 0:  # the model's clock is real time divided by the scale
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        if context_tokens is not None and context_tokens <= 0:
            raise ValueError(f"context_tokens must be > 0, got {context_tokens}")
        check_faults(fail_after_tokens, stall_after_tokens)
        self.seed = seed
        self.time_scale = time_scale
        self.context_tokens = min(context_tokens or self.preset.kv_tokens, self.preset.kv_tokens)
        self.fail_after_tokens = fail_after_tokens
        self.stall_after_tokens = stall_after_tokens
        self.stats = EmulatedStats()
        self._replica = Replica(self.preset, name=self.name, record=record)
        self._t0 = time.monotonic()  # model time 0
        self._late_s = 0.0  # sum over steps of (real end - planned end), real seconds
        self._late_max_s = 0.0
        self._streams: dict[str, asyncio.Queue[_Item]] = {}
        self._ids = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._dead: str | None = None  # why streams are refused (closed, or the driver failed)

    # ---- Endpoint -----------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return estimate_tokens(text)

    async def stream(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        prompt = self._validate(req)
        if self._dead is not None:
            raise EndpointFailedError(f"{self.name}: {self._dead}")
        wake = self._ensure_driver()
        sid = f"{req.request_id or '#'}/{next(self._ids)}"
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        stats = self.stats
        stats.started += 1
        stats.active += 1
        finished = False
        try:
            if self.fail_after_tokens != 0:  # 0 fails before the replica sees the request
                self._streams[sid] = queue
                self._replica.submit(
                    sid,
                    prompt + req.start_index,
                    req.max_tokens,
                    self._now(),
                    cache_key=req.cache_key or req.request_id or None,
                    shared_tokens=prompt,
                )
                wake.set()
            for i in range(req.max_tokens):
                if i == self.fail_after_tokens:
                    stats.failed += 1
                    finished = True
                    raise EndpointFailedError(f"{self.name}: injected failure after {i} tokens")
                if i == self.stall_after_tokens:
                    self._abort(sid)
                    await asyncio.Event().wait()  # never set: hangs until cancelled
                item = await queue.get()
                if isinstance(item, BaseException):
                    stats.failed += 1
                    finished = True
                    raise item
                n, at = item
                index = req.start_index + n
                stats.tokens += 1
                yield TokenEvent(
                    index=index,
                    text=self.token_text(index),
                    time=at,
                    source=self.kind,
                    finish_reason="length" if n == req.max_tokens - 1 else None,
                )
            stats.completed += 1
            finished = True
        finally:
            stats.active -= 1
            if not finished:
                stats.cancelled += 1
            self._abort(sid)  # no-op for a sequence the replica already finished

    async def close(self) -> None:
        """Stop the batch clock; open streams fail (EndpointFailedError), new ones are refused."""
        self._fail_all("closed")
        task, self._task = self._task, None
        if task is not None and not task.done() and self._loop is asyncio.get_running_loop():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ---- observability ------------------------------------------------------------------------

    def replica_state(self) -> dict[str, Any]:
        """The replica's instantaneous load and its counters (``busy_s`` in model seconds)."""
        r = self._replica
        st = r.stats
        return {
            "queue": len(r.waiting),
            "running": len(r.running),
            "kv_used": r.kv_used,
            "kv_cached": r.cached,
            "kv_tokens": self.preset.kv_tokens,
            "steps": st.steps,
            "busy_s": st.busy_s,
            "preemptions": st.preemptions,
            "cache_hit_tokens": st.cache_hit_tokens,
            "tokens": st.tokens,
            # The emulation's fidelity: real time the batch clock lost to the event loop.
            "late_s": self._late_s,
            "late_max_ms": 1000.0 * self._late_max_s,
            "late_share": self._late_s / (st.busy_s * self.time_scale + self._late_s)
            if st.busy_s > 0
            else 0.0,
        }

    def samples(self) -> list[tuple[float, int, int, int]]:
        """(t, queue, running, kv_used) at each step start and when the replica goes idle, the
        last ``MAX_SAMPLES``; ``t`` on the ``time.monotonic()`` clock, like token times."""
        t0, scale = self._t0, self.time_scale
        recorded = self._replica.stats.samples[-MAX_SAMPLES:]
        return [(t0 + t * scale, q, r, kv) for t, q, r, kv in recorded]

    # ---- internals ----------------------------------------------------------------------------

    def _now(self) -> float:
        return (time.monotonic() - self._t0) / self.time_scale

    def _validate(self, req: GenerationRequest) -> int:
        req.validate()
        prompt = req.prompt_tokens_hint or estimate_tokens(req.prompt)
        if prompt <= 0:
            raise InvalidRequestError(f"prompt_tokens_hint must be > 0, got {prompt}")
        total = prompt + req.start_index + req.max_tokens
        if total > self.context_tokens:
            raise InvalidRequestError(
                f"prompt + prefix + max_tokens is ~{total} tokens; {self.name} has a context "
                f"window of {self.context_tokens} tokens (KV cache {self.preset.kv_tokens})"
            )
        return prompt

    def _abort(self, sid: str) -> None:
        self._streams.pop(sid, None)
        self._replica.abort(sid, self._now())

    def _ensure_driver(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._task is None or self._loop is not loop:
            if self._task is not None and self._loop is not None and not self._loop.is_closed():
                raise RuntimeError(f"{self.name}: one replica serves one event loop")
            self._loop = loop
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._drive(self._wake), name=f"{self.name}:clock")
        assert self._wake is not None
        return self._wake

    async def _drive(self, wake: asyncio.Event) -> None:
        try:
            await self._run(wake)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug in the model must not leave streams hanging
            self._fail_all(f"batch clock failed: {e!r}")
            raise

    async def _run(self, wake: asyncio.Event) -> None:
        rep = self._replica
        t0, scale = self._t0, self.time_scale
        samples = rep.stats.samples
        while True:
            step = rep.next_step(self._now())
            if step is None:  # idle (or nothing admissible, which validation rules out)
                if rep.record:
                    samples.append((self._now(), len(rep.waiting), len(rep.running), rep.kv_used))
                wake.clear()
                await wake.wait()
                continue
            if len(samples) > 2 * MAX_SAMPLES:  # amortized O(1) bound on the model's list
                del samples[:-MAX_SAMPLES]
            # Always yield, even when late, so consumers run between steps.
            due = t0 + step.end * scale
            await asyncio.sleep(max(due - time.monotonic(), 0.0))
            emissions = rep.finish(step)
            at = time.monotonic()
            # How far the real clock fell behind the model (the next step starts from real
            # time, so this is the emulation's own delay: event-loop lag on a busy machine).
            late = at - due
            self._late_s += late
            self._late_max_s = max(self._late_max_s, late)
            streams = self._streams
            for em in emissions:
                queue = streams.get(em.seq.id)
                if queue is None:
                    continue
                for j in range(len(em.times)):
                    queue.put_nowait((em.first_index + j, at))

    def _fail_all(self, reason: str) -> None:
        self._dead = reason
        for queue in self._streams.values():
            queue.put_nowait(EndpointFailedError(f"{self.name}: {reason}"))
