"""SSE decoding: tokens are counted per token, not per chunk."""

from __future__ import annotations

import json

from disco.loadgen.sse import SSEDecoder, parse_payload


def _events(dec: SSEDecoder, raw: str):
    out = []
    for line in raw.splitlines(keepends=True):
        c = dec.feed(line.encode())
        if c is not None:
            out.append(c)
    return out


def test_one_token_per_text_chunk_and_done() -> None:
    raw = (
        'data: {"choices": [{"text": "Hel"}]}\n\n'
        ": keep-alive comment\n\n"
        'data: {"choices": [{"text": "lo", "finish_reason": "length"}]}\n\n'
        "data: [DONE]\n\n"
    )
    ev = _events(SSEDecoder(), raw)
    assert [e.tokens for e in ev] == [["Hel"], ["lo"], []]
    assert ev[1].finish_reason == "length" and ev[2].done


def test_a_chunk_with_several_tokens_counts_each() -> None:
    chunk = {"choices": [{"text": "a b c", "logprobs": {"tokens": ["a", " b", " c"]}}]}
    assert parse_payload(json.dumps(chunk)).tokens == ["a", " b", " c"]
    ext = {"choices": [{"text": "xy"}], "disco": {"tokens": ["x", "y"], "source": "device"}}
    c = parse_payload(json.dumps(ext))
    assert c.tokens == ["x", "y"] and c.extra["source"] == "device"


def test_empty_text_is_not_a_token_and_chat_deltas_work() -> None:
    assert parse_payload('{"choices": [{"text": ""}]}').tokens == []
    assert parse_payload('{"choices": [{"delta": {"content": "hi"}}]}').tokens == ["hi"]


def test_errors_and_garbage() -> None:
    assert parse_payload('{"error": {"message": "overloaded"}}').error == "overloaded"
    assert parse_payload("not json").error
    assert parse_payload("[1, 2]").error


def test_unterminated_last_event_is_flushed() -> None:
    dec = SSEDecoder()
    assert dec.feed(b'data: {"choices": [{"text": "z"}]}\n') is None
    c = dec.flush()
    assert c is not None and c.tokens == ["z"]
    assert dec.flush() is None
