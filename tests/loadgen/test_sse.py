"""The load generator's reading of streams (the wire's SSE decoder, as the Locust users run it)
against the mock server's writing: tokens are counted per token, not per chunk."""

from __future__ import annotations

import httpx
import pytest

from disco.loadgen.mock_server import MockConfig, MockServer
from disco.scheduler.wire import SSEDecoder


def _read(url: str, body: dict, headers: dict | None = None) -> list:
    """Chunks as the Locust user sees them: raw lines fed to the decoder, then a flush."""
    dec, chunks = SSEDecoder(), []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers,
                      timeout=10) as r:  # fmt: skip
        assert r.status_code == 200
        for line in r.iter_lines():
            c = dec.feed(line)
            if c is not None:
                chunks.append(c)
    last = dec.flush()
    return chunks + ([last] if last else [])


@pytest.mark.parametrize("per_chunk", [1, 3])
def test_every_token_is_counted_whatever_the_chunking(per_chunk):
    with MockServer(MockConfig(ttft_s=0.0, tbt_s=0.0, tokens_per_chunk=per_chunk)) as srv:
        chunks = _read(srv.url, {"prompt": "hi", "max_tokens": 7, "stream": True},
                       {"X-Request-Id": "r1"})  # fmt: skip
        assert "r1" in srv.arrivals
    assert chunks[-1].done and all(not c.done for c in chunks[:-1])
    tokens = [t for c in chunks for t in c.tokens]
    assert tokens == [f" t{i}" for i in range(7)]
    assert len(chunks) - 1 == -(-7 // per_chunk)  # ceil: one event per chunk, not per token
    assert [c.finish_reason for c in chunks[:-1]][-1] == "length"
    assert [c.disco.index for c in chunks[:-1]] == list(range(0, 7, per_chunk))


def test_the_mock_refuses_bad_bodies_in_the_wire_error_shape():
    with MockServer() as srv:
        for path, body, status, needle in [
            ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
            ("/v1/completions", {"prompt": "x", "max_tokens": "3"}, 400, "max_tokens"),
            ("/v1/other", {"prompt": "x"}, 404, "/v1/completions"),
        ]:
            r = httpx.post(srv.url + path, json=body, timeout=10)
            err = r.json()["error"]
            assert r.status_code == status and needle in err["message"]
            assert set(err) == {"message", "type", "param", "code"}
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x"}, timeout=10)
        assert r.status_code == 200 and r.text.count("data: {") == 16  # the wire's default
