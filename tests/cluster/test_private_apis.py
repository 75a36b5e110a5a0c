"""The private APIs of other projects that we use, each wrapped in one place: these tests fail
when a new release moves or changes them, instead of a checkpoint or a load run failing later.

- Ray's GCS key-value store (``disco.cluster.scheduler_state.ray_kv``): Ray has no public one.
- Locust's streamed response body (``disco.loadgen.locustfile.body_reader``): its public
  ``iter_content`` waits for whole chunks, which would delay every token's timestamp.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

from needs import require


def test_ray_kv_functions_take_what_the_gcs_store_passes():
    require("ray")
    from disco.cluster.scheduler_state import ray_kv

    get, put, delete = ray_kv()
    # GcsStore calls get(key, namespace=), put(key, value, overwrite=, namespace=),
    # delete(key, namespace=): bind those calls without running them (no Ray started).
    inspect.signature(get).bind(b"k", namespace="disco")
    inspect.signature(put).bind(b"k", b"v", overwrite=True, namespace="disco")
    inspect.signature(delete).bind(b"k", namespace="disco")


# Runs in its own process: importing Locust patches the whole process with gevent.
LOCUST_CHECK = textwrap.dedent(
    """
    import threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from locust.contrib.fasthttp import FastHttpSession
    from locust.env import Environment

    from disco.loadgen.locustfile import body_reader

    class Slow(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b"data: first\\n\\n")
            self.wfile.flush()
            time.sleep(0.5)  # the second line comes much later
            self.wfile.write(b"data: second\\n\\n")
            self.wfile.flush()

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    session = FastHttpSession(url, Environment().events.request, user=None)
    t0 = time.monotonic()
    raw = body_reader(session.request("GET", "/", stream=True))
    first = raw.readline(b"\\n")
    waited = time.monotonic() - t0
    assert first == b"data: first\\n", first
    assert waited < 0.4, f"the first line waited for the second ({waited:.2f} s)"
    rest = b"".join(iter(lambda: raw.readline(b"\\n"), b""))
    assert b"data: second" in rest, rest
    print("ok")
    """
)


def test_locust_body_reader_returns_lines_as_they_arrive():
    require("locust", load=False)
    proc = subprocess.run([sys.executable, "-c", LOCUST_CHECK], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
