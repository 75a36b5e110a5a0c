"""A tiny OpenAI-compatible streaming server on loopback, for tests and the pacing benchmark.

Standard library threads (no asyncio), so it runs beside pytest without touching an event loop;
bodies, chunks and errors are :mod:`disco.scheduler.wire`'s. ``POST /v1/completions`` answers
``max_tokens`` tokens as SSE after a fixed TTFT, one chunk every ``tbt_s`` (of
``tokens_per_chunk`` tokens, listed in ``logprobs`` as servers under load send them); it records
when each request arrived so a benchmark can compare the server's view of the send times with the
schedule.

For the device-side parts of a report it can also play a device agent: with ``source`` set it tags
every token with the endpoint that produced it (the ``disco`` extension), with ``handover_at`` the
other endpoint takes over a request at a given token (a migration), and with ``metrics`` it
serves ``GET /metrics`` with the agent's counter series (``disco_agent_*``), priced by the
config's made-up rates (a test double: real agents price with their profiles).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from disco.scheduler import wire
from disco.scheduler.types import EndpointKind, TokenEvent

MAX_BODY_BYTES = 1 << 20


@dataclass
class MockConfig:
    ttft_s: float = 0.005
    tbt_s: float = 0.002
    tokens_per_chunk: int = 1
    # Request id (the X-Request-Id header) -> extra delay before its first token.
    slow: dict[str, float] = field(default_factory=dict)
    # The endpoint every token is tagged with ("server" / "device"); None: untagged, as a plain
    # OpenAI server. Request id -> token index from which the other endpoint produces.
    source: str | None = None
    handover_at: dict[str, int] = field(default_factory=dict)
    # Serve the agent's counters at /metrics (else 404, as a server that is no agent).
    metrics: bool = False
    usd_per_server_token: float = 1e-6
    j_per_device_token: float = 0.5


@dataclass
class MockCounters:
    """What a device agent would count (``metrics=True``), per finished request."""

    completed: int = 0
    tokens_server: int = 0
    tokens_device: int = 0
    migrations: int = 0

    def render(self, cfg: MockConfig) -> str:
        p = "disco_agent_"
        rows = [
            ("requests_completed_total", self.completed),
            ("requests_failed_total", 0),
            ("requests_cancelled_total", 0),
            ("requests_rejected_total", 0),
            ('tokens_total{source="server"}', self.tokens_server),
            ('tokens_total{source="device"}', self.tokens_device),
            ("migrations_total", self.migrations),
            ("failovers_total", 0),
            ("server_cost_usd_total", self.tokens_server * cfg.usd_per_server_token),
            ("device_energy_joules_total", self.tokens_device * cfg.j_per_device_token),
        ]
        return "".join(f"{p}{name} {value}\n" for name, value in rows)


@dataclass
class MockServer:
    config: MockConfig = field(default_factory=MockConfig)
    arrivals: dict[str, float] = field(default_factory=dict)  # request id -> time.monotonic()
    counters: MockCounters = field(default_factory=MockCounters)
    inflight: int = 0  # completions being answered now
    max_inflight: int = 0  # the most answered at once (a closed loop's bound, seen here)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _server: ThreadingHTTPServer | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> MockServer:
        owner = self

        class Handler(_Handler):
            server_owner = owner

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> MockServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # Clients closing idle keep-alive connections at the end of a run are not errors.
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streaming
    server_owner: MockServer

    def setup(self) -> None:
        super().setup()
        # Each SSE chunk is its own small write: without TCP_NODELAY, Nagle's algorithm holds
        # one back until the client's delayed ACK (~40 ms) on a kept-alive connection that
        # carries one request after another (closed-loop users).
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        pass  # quiet: tests and the benchmark print their own summaries

    def do_GET(self) -> None:  # noqa: N802 (stdlib naming)
        owner = self.server_owner
        if self.path in ("/health", "/v1/models"):
            self._json(200, {"status": "ok", "data": [{"id": "mock"}]})
        elif self.path == "/metrics" and owner.config.metrics:
            with owner._lock:
                data = owner.counters.render(owner.config).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self._json(404, wire.ApiError(404, f"no route {self.path}").body())

    def do_POST(self) -> None:  # noqa: N802
        arrived = time.monotonic()
        rid = self.headers.get("X-Request-Id", "")
        owner = self.server_owner
        owner.arrivals[rid] = arrived
        # Read the whole body even to refuse it: the connection is kept alive for the next one.
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with owner._lock:
            owner.inflight += 1
            owner.max_inflight = max(owner.max_inflight, owner.inflight)
        try:
            self._complete(rid, raw)
        finally:
            with owner._lock:
                owner.inflight -= 1

    def _complete(self, rid: str, raw: bytes) -> None:
        owner = self.server_owner
        try:
            if self.path != "/v1/completions":
                raise wire.ApiError(404, f"no route {self.path}: expected /v1/completions")
            n = wire.parse_request(wire.parse_json(raw, MAX_BODY_BYTES)).request.max_tokens
        except wire.ApiError as e:
            self._json(e.status, e.body())
            return
        cfg = owner.config
        self.send_response(200)
        self.send_header("Content-Type", wire.SSE_MEDIA_TYPE)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        time.sleep(cfg.ttft_s + cfg.slow.get(rid, 0.0))
        head = wire.ResponseHead(rid, "mock", int(time.time()))
        src = EndpointKind(cfg.source) if cfg.source else None
        switch = cfg.handover_at.get(rid, n) if src is not None else n
        sources = [src if i < switch else src.other for i in range(n)] if src else [None] * n
        for start in range(0, n, cfg.tokens_per_chunk):
            stop = min(start + cfg.tokens_per_chunk, n)
            events = [TokenEvent(i, f" t{i}", 0.0, source=sources[i],
                                 finish_reason="length" if i == n - 1 else None)
                      for i in range(start, stop)]  # fmt: skip
            self._chunk(wire.sse(wire.chunk(head, events, first=start == 0)))
            if stop < n:
                time.sleep(cfg.tbt_s)
        with owner._lock:  # booked before the end of the stream, as an agent's counters
            c = owner.counters
            c.completed += 1
            c.tokens_server += sources.count(EndpointKind.SERVER)
            c.tokens_device += sources.count(EndpointKind.DEVICE)
            c.migrations += 0 < switch < n
        self._chunk(wire.SSE_DONE)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _json(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
