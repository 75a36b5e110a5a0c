"""A tiny OpenAI-compatible streaming server on loopback, for tests and the pacing benchmark.

Standard library only (threads, no asyncio), so it runs beside pytest without touching an event
loop. ``POST /v1/completions`` with ``stream: true`` answers ``max_tokens`` tokens as SSE after a
fixed TTFT, one token every ``tbt_s``; it records when each request arrived so a benchmark can
compare the server's view of the send times with the schedule.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class MockConfig:
    ttft_s: float = 0.005
    tbt_s: float = 0.002
    tokens_per_chunk: int = 1
    # Request id (the X-Request-Id header) -> extra delay before its first token.
    slow: dict[str, float] = field(default_factory=dict)


@dataclass
class MockServer:
    config: MockConfig = field(default_factory=MockConfig)
    arrivals: dict[str, float] = field(default_factory=dict)  # request id -> time.monotonic()
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

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        pass  # quiet: tests and the benchmark print their own summaries

    def do_GET(self) -> None:  # noqa: N802 (stdlib naming)
        if self.path in ("/health", "/v1/models"):
            self._json(200, {"status": "ok", "data": [{"id": "mock"}]})
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:  # noqa: N802
        arrived = time.monotonic()
        rid = self.headers.get("X-Request-Id", "")
        owner = self.server_owner
        owner.arrivals[rid] = arrived
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError:
            self._json(400, {"error": {"message": "bad JSON"}})
            return
        if self.path != "/v1/completions" or not body.get("prompt"):
            self._json(400, {"error": {"message": "expected /v1/completions with a prompt"}})
            return
        cfg = owner.config
        n = int(body.get("max_tokens") or 16)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        time.sleep(cfg.ttft_s + cfg.slow.get(rid, 0.0))
        sent = 0
        while sent < n:
            k = min(cfg.tokens_per_chunk, n - sent)
            toks = [f" t{sent + i}" for i in range(k)]
            last = sent + k >= n
            chunk = {
                "id": rid, "object": "text_completion",
                "choices": [{"index": 0, "text": "".join(toks),
                             "logprobs": {"tokens": toks} if k > 1 else None,
                             "finish_reason": "length" if last else None}],
            }  # fmt: skip
            self._chunk(f"data: {json.dumps(chunk)}\n\n")
            sent += k
            if not last:
                time.sleep(cfg.tbt_s)
        self._chunk("data: [DONE]\n\n")
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
