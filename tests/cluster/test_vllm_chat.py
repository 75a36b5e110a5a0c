"""The vLLM engine's chat rendering, on a stand-in tokenizer (no vLLM needed): the tokenizer's
own template, one BOS, the plain transcript and its stops when there is no template."""

from __future__ import annotations

import pytest

from disco.cluster.engines.vllm_engine import VLLMEndpoint
from disco.scheduler.endpoint import InvalidRequestError
from disco.scheduler.wire import DEFAULT_CHAT_STOP, default_chat_template

MSGS = [{"role": "user", "content": "q"}]


class Tokenizer:
    """Like a Hugging Face tokenizer whose template writes the BOS (Llama, Gemma)."""

    bos_token, bos_token_id = "<s>", 1
    chat_template = "{{ bos_token }}..."

    def __init__(self, adds_bos: bool = True) -> None:
        self.adds_bos = adds_bos

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        if messages[0]["role"] != "user":
            raise ValueError("Conversation roles must alternate user/assistant")
        return "<s>[INST] " + messages[0]["content"] + " [/INST]"

    def encode(self, text, add_special_tokens=True):
        return ([self.bos_token_id] if self.adds_bos and add_special_tokens else []) + [7] * len(
            text
        )


def engine(tok) -> VLLMEndpoint:
    ep = VLLMEndpoint.__new__(VLLMEndpoint)  # no vLLM engine: only the tokenizer is used
    ep.name, ep._tokenizer = "vllm:test", tok
    return ep


def test_the_template_renders_with_one_bos():
    # stream() encodes every prompt with special tokens: the template's own BOS goes.
    assert engine(Tokenizer()).render_chat(MSGS) == "[INST] q [/INST]"
    assert engine(Tokenizer(adds_bos=False)).render_chat(MSGS) == "<s>[INST] q [/INST]"
    assert engine(Tokenizer()).chat_stop == ()


def test_no_template_is_the_plain_transcript_with_its_stops():
    tok = Tokenizer()
    tok.chat_template = None
    ep = engine(tok)
    assert ep.render_chat(MSGS) == default_chat_template(MSGS)
    assert ep.chat_stop == DEFAULT_CHAT_STOP


def test_a_template_error_is_an_invalid_request():
    with pytest.raises(InvalidRequestError, match="alternate"):
        engine(Tokenizer()).render_chat([{"role": "assistant", "content": "a"}])
