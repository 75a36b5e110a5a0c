"""Schedules: routing to devices, caps on prompt and output lengths, JSONL round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from disco.loadgen.arrivals import Arrival
from disco.loadgen.prompts import Corpus, EstimateCounter, PromptBuilder
from disco.loadgen.schedule import build_schedule, read_schedule, write_schedule
from disco.scheduler.registry import UnknownNameError

TARGETS = ["http://127.0.0.1:1", "http://127.0.0.1:2/", "http://127.0.0.1:3"]


@pytest.fixture(scope="module")
def builder() -> PromptBuilder:
    words = tuple(("The quick brown fox jumps over the lazy dog. " * 200).split())
    return PromptBuilder(Corpus(words, "test"), EstimateCounter())


def _arrivals(n: int, session=lambda i: None) -> list[Arrival]:
    return [Arrival(i * 0.1, 40 + i, 300 + i, session(i)) for i in range(n)]


def test_round_robin_and_caps(builder: PromptBuilder) -> None:
    reqs = build_schedule(_arrivals(6), TARGETS, builder, max_tokens_cap=302, max_prompt_tokens=42)
    assert [r.target[-1] for r in reqs] == ["1", "2", "3", "1", "2", "3"]
    assert [r.max_tokens for r in reqs] == [300, 301, 302, 302, 302, 302]
    assert [r.trace_prompt_tokens for r in reqs] == [40, 41, 42, 43, 44, 45]
    assert all(abs(r.prompt_tokens - min(40 + i, 42)) <= 3 for i, r in enumerate(reqs))
    assert len({r.id for r in reqs}) == 6


def test_session_routing_is_sticky(builder: PromptBuilder) -> None:
    reqs = build_schedule(
        _arrivals(30, lambda i: f"user{i % 4}"), TARGETS, builder, routing="session"
    )
    by_session: dict[str, set[str]] = {}
    for r in reqs:
        by_session.setdefault(r.session, set()).add(r.target)
    assert all(len(t) == 1 for t in by_session.values())
    with pytest.raises(UnknownNameError):
        build_schedule(_arrivals(1), TARGETS, builder, routing="nope")


def test_jsonl_round_trip(tmp_path: Path, builder: PromptBuilder) -> None:
    reqs = build_schedule(_arrivals(3), TARGETS[:1], builder)
    write_schedule(tmp_path / "s.jsonl", reqs)
    assert read_schedule(tmp_path / "s.jsonl") == reqs


def test_prompt_scale_keeps_the_length_order(builder: PromptBuilder) -> None:
    arr = [Arrival(0.0, p, 10) for p in (80, 400, 1600)]
    reqs = build_schedule(arr, TARGETS[:1], builder, prompt_scale=0.125, max_prompt_tokens=150)
    assert [r.trace_prompt_tokens for r in reqs] == [80, 400, 1600]
    want = [10, 50, 150]  # scaled, then capped
    assert all(abs(r.prompt_tokens - w) <= 3 for r, w in zip(reqs, want, strict=True))
    with pytest.raises(ValueError):
        build_schedule(arr, TARGETS[:1], builder, prompt_scale=0)
