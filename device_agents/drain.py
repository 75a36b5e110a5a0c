"""Stopping an agent's HTTP front gracefully (``disco agent`` on SIGTERM or Ctrl-C).

1. Stop accepting: from the signal on, every new request is answered 503 with an OpenAI-style
   error (``code: "shutting_down"``, ``Retry-After``), so a client or a load balancer moves on at
   once; the port stays open during the grace period so that clients get that answer rather than
   a refused connection. ``/metrics`` still answers (the final counters can be scraped).
2. Let the requests in flight finish, for at most ``grace_s``.
3. End the streams still open with an error event in their SSE stream (``data: {"error": ...}``
   and no ``[DONE]``: the client knows the text is incomplete and may resume elsewhere), then
   close the server. A second signal skips what is left of the grace period.

:class:`Drain` is the state (``create_app(..., drain=d)`` wires it into the app);
:func:`serve_until_signalled` runs uvicorn with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

from disco.scheduler import wire

log = logging.getLogger(__name__)

SHUTTING_DOWN = "shutting_down"  # the error code of both the 503 and the final stream event
ALWAYS_OPEN = ("/metrics",)  # answered while draining
SETTLE_S = 2.0  # after the grace period: time for the ended streams to send their error event
_END, _STOPPED = object(), object()


class _Failed:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Drain:
    """Shared by the app (middleware, stream wrapper) and the server loop that stops it."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0  # HTTP requests inside the app now (a stream counts until its end)
        self.refused = 0  # requests answered 503 while draining
        self.ended = 0  # streams ended by the grace period
        self._pumps: set[asyncio.Task] = set()

    def begin(self) -> None:
        self.draining = True

    @staticmethod
    def refusal() -> wire.ApiError:
        return wire.ApiError(
            503, "the device agent is shutting down: send the request elsewhere",
            code=SHUTTING_DOWN,
        )  # fmt: skip

    @staticmethod
    def cut_off() -> wire.ApiError:
        return wire.ApiError(
            503, "the device agent shut down before the end of this stream (grace period over)",
            code=SHUTTING_DOWN,
        )  # fmt: skip

    def middleware(self, app: Any) -> Any:
        """The ASGI app wrapped: 503 while draining, and in-flight requests counted."""
        return DrainMiddleware(app, self)

    async def track(self, body: AsyncIterator[str]) -> AsyncIterator[str]:
        """An SSE body that :meth:`end_streams` can end with an error event.

        The body is pulled by a task of its own (the one a cancel can reach: the response's task
        belongs to the server) and handed over through a queue: a few microseconds per event.
        Closing this iterator (the client went away) closes the body, as without it."""
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for item in body:
                    queue.put_nowait(item)
            except Exception as e:  # noqa: BLE001 - handed to the consumer, raised there
                queue.put_nowait(_Failed(e))
            else:
                queue.put_nowait(_END)

        def pumped(t: asyncio.Task) -> None:
            if t.cancelled():  # also when cancelled before its first step
                queue.put_nowait(_STOPPED)

        task = asyncio.get_running_loop().create_task(pump())
        task.add_done_callback(pumped)
        self._pumps.add(task)
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if item is _STOPPED:
                    yield wire.sse(self.cut_off().event())  # no [DONE]: the stream broke
                    return
                if isinstance(item, _Failed):
                    raise item.exc
                yield item
        finally:
            self._pumps.discard(task)
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            with contextlib.suppress(Exception):
                await body.aclose()  # type: ignore[attr-defined]  # stops every endpoint

    def end_streams(self) -> int:
        """End every tracked stream now (each sends its error event); returns how many."""
        live = [t for t in self._pumps if not t.done()]
        for t in live:
            t.cancel()
        self.ended += len(live)
        return len(live)

    async def wait(self, grace_s: float, *, poll_s: float = 0.05) -> int:
        """Wait for the requests in flight, at most ``grace_s``; then end the streams left and
        give them a moment to say so. Returns how many were ended."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(poll_s)
        ended = self.end_streams()
        settle = loop.time() + SETTLE_S
        while self.in_flight and loop.time() < settle:
            await asyncio.sleep(poll_s / 5)
        return ended


class DrainMiddleware:
    """Pure ASGI (streams pass through untouched)."""

    def __init__(self, app: Any, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining and scope.get("path") not in ALWAYS_OPEN:
            from starlette.responses import JSONResponse

            self.drain.refused += 1
            err = self.drain.refusal()
            headers = {"Retry-After": "1", "Connection": "close"}
            await JSONResponse(err.body(), status_code=err.status, headers=headers)(
                scope, receive, send
            )
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


async def serve_until_signalled(
    app: Any,
    host: str,
    port: int,
    drain: Drain,
    grace_s: float,
    *,
    signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
    say: Any = print,
) -> int:
    """Serve ``app`` (built with ``drain``) until one of ``signals``; then drain (module doc) and
    return the signal's number. Must run in the main thread's event loop."""
    import uvicorn

    class _Server(uvicorn.Server):
        def capture_signals(self) -> contextlib.AbstractContextManager[None]:
            # uvicorn's own handlers would shut down at once and then re-raise the signal
            # (killing the process); ours drain first and return.
            return contextlib.nullcontext()

    cfg = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                         timeout_graceful_shutdown=int(SETTLE_S) + 1)  # fmt: skip
    server = _Server(cfg)
    loop = asyncio.get_running_loop()
    received: list[int] = []
    got = asyncio.Event()

    def on_signal(sig: int) -> None:
        received.append(sig)
        if len(received) > 1:
            drain.end_streams()  # again: do not wait for the grace period
        got.set()

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    serving = loop.create_task(server.serve())
    try:
        waiter = loop.create_task(got.wait())
        await asyncio.wait({serving, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if serving.done():  # it never started (the port is taken...) or stopped by itself
            serving.result()
            return 0
        name = signal.Signals(received[0]).name
        drain.begin()
        say(f"disco agent: {name}: refusing new requests, {drain.in_flight} in flight, "
            f"grace {grace_s:g} s")  # fmt: skip
        ended = await drain.wait(grace_s)
        server.should_exit = True
        await serving
        say(f"disco agent: stopped ({ended} stream(s) ended by the grace period, "
            f"{drain.refused} request(s) refused while draining)")  # fmt: skip
        return received[0]
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        if not serving.done():
            server.should_exit = True
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(serving, SETTLE_S + 2)
