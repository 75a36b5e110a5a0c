"""The one token-count estimate, and that every estimating counter in the tree is it."""

from __future__ import annotations

import pytest

from disco.scheduler.tokens import CHARS_PER_TOKEN, estimate_tokens

TEXTS = ["", "a", "abcd", "abcde", "The capital of France is Paris. " * 7]


def test_rounds_up_at_four_characters_a_token():
    assert CHARS_PER_TOKEN == 4.0
    assert [estimate_tokens(t) for t in TEXTS] == [0, 1, 1, 2, 56]
    assert estimate_tokens("x" * 46, chars_per_token=4.6) == 10
    with pytest.raises(ValueError):
        estimate_tokens("x", chars_per_token=0)


def test_engines_without_a_tokenizer_count_with_it():
    from disco.device_agents.engines.emulated import EmulatedEndpoint
    from disco.device_agents.engines.openai_http import OpenAIEndpoint
    from disco.scheduler.profiles import load_profile

    counters = [
        EmulatedEndpoint(load_profile("gpt-4o-mini", "server")).count_tokens,
        OpenAIEndpoint(base_url="http://127.0.0.1:9").count_tokens,
    ]
    try:
        from disco.cluster.handle_endpoint import ServeHandleEndpoint
    except ImportError:  # the cluster extra is not installed
        pass
    else:
        counters.append(ServeHandleEndpoint(None, "m").count_tokens)
    for count in counters:
        assert [count(t) for t in TEXTS] == [estimate_tokens(t) for t in TEXTS]


def test_the_prompt_builders_estimate_is_it_at_the_corpus_ratio():
    from disco.loadgen.prompts import EstimateCounter

    c = EstimateCounter()
    for t in TEXTS[1:]:
        assert c.count(t) == max(1, estimate_tokens(t, c.chars_per_token))
    assert c.count("") == 1  # a prompt is at least one token


def test_the_agent_plans_with_it_when_no_engine_counts():
    from disco.device_agents import agent

    assert agent.estimate_tokens is estimate_tokens
