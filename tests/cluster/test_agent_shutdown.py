"""`disco agent` stops like a service: SIGTERM -> 503 for new requests, the streams in flight get
``--grace-s`` to finish, the rest end with an error event, exit 0. A real process on loopback with
the emulated device engine (no model, no Ray, no server: device-only plans)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from doubles import stop_process

from disco.cluster.runtime import free_port

GRACE_S = 2.0


@pytest.fixture
def agent():
    port = free_port()
    cmd = [
        sys.executable, "-m", "disco.cluster.cli", "agent", "--server", "http://127.0.0.1:9",
        "--engine", "emulated", "--policy", "device-only", "--port", str(port),
        "--grace-s", str(GRACE_S),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "DISCO_API_KEY"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # bounded: ~60 s for the imports and the bind
            if proc.poll() is not None:
                pytest.fail(f"disco agent exited: {proc.stdout.read()[-2000:]}")
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            stop_process(proc)


class Stream(threading.Thread):
    """One streamed completion, read line by line in the background."""

    def __init__(self, url: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.events: list[dict] = []
        self.done = False
        self.first = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        body = {"prompt": "Tell me a long story", "max_tokens": self.max_tokens, "stream": True}
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=60) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        self.events.append(json.loads(line[6:]))
                        self.first.set()
        except Exception as e:  # noqa: BLE001 - checked by the test
            self.error = e
        finally:
            self.first.set()


def test_sigterm_refuses_new_requests_drains_streams_and_exits_0(agent):
    proc, url = agent
    # ~28 tokens/s (xiaomi14-qwen0.5b): the short one ends within the grace, the long one not
    short, long = Stream(url, 20), Stream(url, 1000)
    short.start()
    long.start()
    assert short.first.wait(30) and long.first.wait(30)
    assert short.error is None and long.error is None and long.events
    t_signal = time.monotonic()
    proc.send_signal(signal.SIGTERM)

    refused = None
    while time.monotonic() - t_signal < GRACE_S:  # the port stays open while draining
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=5)
        if r.status_code == 503:
            refused = r
            break
        time.sleep(0.05)
    assert refused is not None, "no 503 while draining"
    err = refused.json()["error"]
    assert err["code"] == "shutting_down" and "shutting down" in err["message"]
    assert refused.headers.get("retry-after") == "1"

    short.join(30)
    long.join(30)
    assert short.error is None and short.done  # finished within the grace period
    assert all("error" not in e for e in short.events) and len(short.events) == 20
    assert long.error is None and not long.done  # cut off: an error event, no [DONE]
    assert "error" not in long.events[0] and len(long.events) < 1000
    last = long.events[-1]
    assert last["error"]["code"] == "shutting_down" and last["status"] == 503
    assert proc.wait(30) == 0
    elapsed = time.monotonic() - t_signal
    assert GRACE_S <= elapsed < GRACE_S + 10, elapsed
    out = proc.stdout.read()
    assert "SIGTERM: refusing new requests" in out and "1 stream(s) ended" in out, out
