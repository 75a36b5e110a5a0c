"""Chat through the model's own template: the llama.cpp engine renders messages with the GGUF's
``tokenizer.chat_template`` (llama-cpp-python's Jinja2ChatFormatter), a resume continues the
assistant's turn, and the agent's OpenAI API answers a chat without echoing it or inventing turns.

Real models, greedy, a few tokens each: SmolLM2-135M-Instruct (a ChatML template whose
``<|im_end|>`` is an end-of-generation token) and Gemma-3-270M (the base model: its GGUF has no
template, so it gets the plain transcript and stops at the next turn's header).
"""

from __future__ import annotations

import asyncio

import pytest
from needs import missing, require

require("llama_cpp")
openai = require("openai")

from fakes import FailAfter, cheap_device_profiles  # noqa: E402

from disco.device_agents.agent import AgentConfig, DeviceAgent  # noqa: E402
from disco.device_agents.agent_http import BackgroundServer, create_app  # noqa: E402
from disco.device_agents.coordinator import Coordinator  # noqa: E402
from disco.device_agents.engines.openai_http import OpenAIEndpoint  # noqa: E402
from disco.device_agents.local_planner import StaticPlanner  # noqa: E402
from disco.device_agents.models import ModelUnavailableError  # noqa: E402
from disco.scheduler.endpoint import GenerationRequest  # noqa: E402
from disco.scheduler.types import EndpointKind  # noqa: E402
from disco.scheduler.wire import DEFAULT_CHAT_STOP, default_chat_template  # noqa: E402

S, D = EndpointKind.SERVER, EndpointKind.DEVICE
HI = "Hi! How are you?"  # the plain transcript made SmolLM2 repeat this and ramble on
SUM = "What is 2+2?"
PARIS = "What is the capital of France?"
# Gemma 3's instruction template (the -it models'), which writes the BOS itself.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def chat_request(ep, messages, max_tokens: int, **kw) -> GenerationRequest:
    turns = tuple((m["role"], m["content"]) for m in messages)
    return GenerationRequest(ep.render_chat(messages), max_tokens, messages=turns, **kw)


def engine(name: str, kind: EndpointKind = D):
    from disco.device_agents.engines.llamacpp import LlamaCppEndpoint

    try:
        return LlamaCppEndpoint(name, kind=kind, n_ctx=512, n_threads=1)
    except ModelUnavailableError as e:
        missing(str(e))


@pytest.fixture(scope="module")
def smol():
    ep = engine("smollm2-135m")
    yield ep
    asyncio.run(ep.close())


@pytest.fixture(scope="module")
def gemma():
    ep = engine("gemma3-270m", S)
    yield ep
    asyncio.run(ep.close())


def run(ep, req: GenerationRequest):
    async def go():
        return [ev async for ev in ep.stream(req)]

    return asyncio.run(go())


def text(events) -> str:
    return "".join(e.text for e in events)


# ---- the prompt ----------------------------------------------------------------------------------


def test_the_prompt_is_the_gguf_template_ending_with_the_assistant_header(smol):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = smol._llm
    template = llm.metadata["tokenizer.chat_template"]
    msgs = [{"role": "system", "content": "Be brief."}, *user(SUM)]
    prompt = smol.render_chat(msgs)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # The ids llama-cpp-python's own chat handler would prefill for these messages.
    fmt = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="<|im_start|>")
    r = fmt(messages=msgs)
    own = llm.tokenize(r.prompt.encode(), add_bos=not r.added_special, special=True)
    ids = smol._input_ids(GenerationRequest(prompt, 1))
    assert ids == own
    start, end = llm.tokenize(b"<|im_start|><|im_end|>", add_bos=False, special=True)
    assert ids.count(start) == 3 and ids.count(end) == 2  # control tokens, not text
    assert smol.chat_stop == ("<|im_end|>",) and r.stop == ["<|im_end|>"]


def test_a_template_that_writes_the_bos_gets_exactly_one(gemma, monkeypatch):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = gemma._llm
    bos = llm.token_bos()
    monkeypatch.setitem(llm.metadata, "tokenizer.chat_template", GEMMA_TEMPLATE)
    monkeypatch.delitem(gemma.__dict__, "_chat", raising=False)  # render with the patched one
    try:
        prompt = gemma.render_chat(user(PARIS))
        full = Jinja2ChatFormatter(GEMMA_TEMPLATE, eos_token="<eos>", bos_token="<bos>")(
            messages=user(PARIS)
        ).prompt
        assert full.startswith("<bos><start_of_turn>user\n")
        assert full == "<bos>" + prompt and prompt.endswith("<start_of_turn>model\n")
        ids = gemma._input_ids(GenerationRequest(prompt, 1))
        assert ids[0] == bos and ids[1] != bos  # the tokenizer's BOS, once
        assert ids == llm.tokenize(full.encode(), add_bos=False, special=True)
        doubled = llm.tokenize(full.encode(), add_bos=True, special=True)
        assert doubled[:2] == [bos, bos]  # what sending the template's BOS as text would do
    finally:
        gemma.__dict__.pop("_chat", None)


def test_a_gguf_without_a_template_gets_the_transcript_and_stops_at_a_new_turn(gemma):
    assert "tokenizer.chat_template" not in gemma._llm.metadata
    prompt = gemma.render_chat(user(PARIS))
    assert prompt == default_chat_template(user(PARIS)) and gemma.chat_stop == DEFAULT_CHAT_STOP
    events = run(gemma, chat_request(gemma, user(PARIS), 24))
    assert text(events) == " The capital of France is Paris."
    assert events[-1].finish_reason == "stop"
    assert [e.index for e in events] == list(range(len(events)))
    # The same prompt as a plain completion goes on into a turn it invents.
    assert "\nuser:" in text(run(gemma, GenerationRequest(prompt, 24)))


def test_the_template_ends_the_turn_with_an_end_of_generation_token(smol):
    events = run(smol, chat_request(smol, user(SUM), 24))
    reply = text(events)
    assert "4" in reply and events[-1].finish_reason == "stop"
    assert events[-1].text == "" and events[-1].token_id == smol._llm.token_eos()  # <|im_end|>


def test_a_resume_continues_the_assistant_turn(smol):
    full = run(smol, chat_request(smol, user(HI), 12))
    k = 5
    prefix = text(full[:k])
    resume = chat_request(smol, user(HI), 12 - k, prefix=prefix, start_index=k)
    # prompt + prefix, inside the one assistant turn: no new transcript around the prefix
    ids = smol._input_ids(resume)
    prompt_ids = smol._input_ids(chat_request(smol, user(HI), 1))
    assert ids == prompt_ids + smol._llm.tokenize(prefix.encode(), add_bos=False)
    header = smol._llm.tokenize(b"<|im_start|>assistant", add_bos=False, special=True)
    n = len(header)
    assert sum(ids[i : i + n] == header for i in range(len(ids))) == 1
    resumed = run(smol, resume)
    assert [e.index for e in resumed] == list(range(k, 12))
    assert [e.text for e in resumed] == [e.text for e in full[k:]]  # greedy: the same turn


# ---- the agent's OpenAI API ----------------------------------------------------------------------


def agent_over(device, server=None, planner=None, device_id="dev"):
    sp, dp = cheap_device_profiles()
    coord = Coordinator(server, device, sp, dp)
    return DeviceAgent(coord, planner or StaticPlanner(None, 0.0), AgentConfig(device_id=device_id))


@pytest.fixture
def serve():
    servers = []

    def start(agent) -> str:
        srv = BackgroundServer(create_app(agent))
        servers.append(srv)
        return srv.start()

    yield start
    for srv in servers:
        srv.stop()


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_openai_client_chats_with_the_device_model(smol, serve):
    url = serve(agent_over(smol))
    c = client(url)
    stream = c.chat.completions.create(
        model="disco", messages=user(HI), max_tokens=16, temperature=0, stream=True
    )
    reply = "".join(ch.choices[0].delta.content or "" for ch in stream)
    assert reply.strip() and HI not in reply
    assert "user" not in reply.lower() and "<|im_" not in reply
    whole = c.chat.completions.create(model="disco", messages=user(SUM), max_tokens=24)
    choice = whole.choices[0]
    assert "4" in choice.message.content and choice.finish_reason == "stop"  # its turn ended
    assert SUM not in choice.message.content
    with pytest.raises(openai.NotFoundError) as e:  # a wrong route: OpenAI's error JSON
        c.with_options(base_url=f"{url}/v2").chat.completions.create(model="disco", messages=[])
    assert e.value.body == {"message": "Not Found: POST /v2/chat/completions",
                            "type": "invalid_request_error", "param": None, "code": None}  # fmt: skip


def test_a_server_with_another_model_renders_the_chat_with_its_own_template(smol, gemma, serve):
    # The "server" is another agent's API over Gemma (device-only there): this agent sends it
    # the messages, and it renders them for Gemma, not with SmolLM2's ChatML.
    server_url = serve(agent_over(gemma, device_id="gemma"))
    server = OpenAIEndpoint(server_url, model="disco", disco_extensions=True)
    c = client(serve(agent_over(smol, server, StaticPlanner(0.0, None))))
    r = c.chat.completions.create(model="disco", messages=user(PARIS), max_tokens=24)
    assert r.choices[0].message.content == " The capital of France is Paris."
    assert r.model_extra["disco"]["sources"] == ["server"] * 8


def test_failover_resumes_the_assistant_turn_on_the_server(smol, gemma, serve):
    server_url = serve(agent_over(gemma, device_id="gemma"))
    server = OpenAIEndpoint(server_url, model="disco", disco_extensions=True)
    k = 3
    device = FailAfter(smol, k)
    device.render_chat = smol.render_chat  # the agent renders with its device engine's template
    agent = agent_over(device, server, StaticPlanner(None, 0.0))
    r = client(serve(agent)).chat.completions.create(
        model="disco", messages=user(PARIS), max_tokens=16
    )
    reply, sources = r.choices[0].message.content, r.model_extra["disco"]["sources"]
    assert sources[:k] == ["device"] * k and set(sources[k:]) == {"server"}
    head = text(run(smol, chat_request(smol, user(PARIS), k)))
    # Gemma continued SmolLM2's first tokens inside the same (transcript) assistant turn.
    tail = run(gemma, chat_request(gemma, user(PARIS), 16 - k, prefix=head, start_index=k))
    assert reply == head + text(tail) and "user:" not in reply
    assert r.choices[0].finish_reason == tail[-1].finish_reason == "stop"  # at the turn's end
