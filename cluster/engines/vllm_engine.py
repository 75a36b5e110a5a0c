"""vLLM's async engine (v1 ``AsyncLLM``) behind the Endpoint protocol: the GPU server engine.

Meant to run inside a Ray Serve replica (one engine per replica; the replica's event loop drives
it). Why our own wrapper when Ray Serve LLM (``ray.serve.llm.build_openai_app``) already serves
vLLM with an OpenAI API (which our ``openai`` engine can talk to)? Three things it does not give
us directly: per-token events with token ids and producer timestamps (no stream batching, which
Ray Serve LLM enables by default and which adds ~20 ms TTFT), resume from exact token ids
(``prompt`` and ``prefix`` tokenized separately, like the llama.cpp engine), and an explicit abort
when the consumer closes the stream.

- Streaming: ``RequestOutputKind.DELTA``; when the consumer falls behind, vLLM merges deltas, so
  one output may carry several token ids. Each id still becomes its own event (exact indices and
  ids); the delta's text goes on the last of them.
- Cancel: closing the stream aborts the request in the engine (``AsyncLLM.abort``).
- Concurrency: vLLM batches concurrent streams itself (``max_concurrency = None``).
- Chat: :meth:`VLLMEndpoint.render_chat` is the tokenizer's ``apply_chat_template`` (what
  ``vllm serve`` renders chat with), ending with the assistant turn's header; a BOS the template
  writes itself is dropped when encoding adds one (every prompt is encoded with the tokenizer's
  special tokens), so there is exactly one. A tokenizer without a template gets the plain
  transcript (:func:`~disco.scheduler.wire.default_chat_template`), and a chat request then stops
  at its turn headers (vLLM's own ``stop``); a template's end of turn is the model's EOS.
"""

from __future__ import annotations

import inspect
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from disco.scheduler.endpoint import EndpointFailedError, GenerationRequest, InvalidRequestError
from disco.scheduler.types import EndpointKind, TokenEvent
from disco.scheduler.wire import DEFAULT_CHAT_STOP, default_chat_template


class VLLMUnavailableError(RuntimeError):
    """vLLM is not installed (or not importable on this machine)."""


@dataclass(frozen=True)
class VLLMConfig:
    model: str  # HF model directory (or a GGUF file with ``tokenizer`` set)
    tokenizer: str | None = None
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool = False
    dtype: str = "auto"
    seed: int = 0
    engine_args: dict[str, Any] = field(default_factory=dict)  # any other AsyncEngineArgs field


def _import_vllm() -> Any:
    try:
        import vllm
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.sampling_params import RequestOutputKind
    except ImportError as e:
        raise VLLMUnavailableError(
            f"the vllm engine needs vLLM (pip install 'disco-testbed[gpu]'): {e}"
        ) from None
    try:
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError:  # older releases: the v0 engine under its old name
        from vllm import AsyncLLMEngine as AsyncLLM
    return vllm, AsyncEngineArgs, RequestOutputKind, AsyncLLM


class VLLMEndpoint:
    max_concurrency: int | None = None

    def __init__(
        self,
        model: str,
        *,
        kind: EndpointKind | str = EndpointKind.SERVER,
        name: str | None = None,
        **options: Any,
    ) -> None:
        self._vllm, engine_args_cls, self._output_kind, async_llm = _import_vllm()
        self.config = VLLMConfig(model=model, **options)
        self.kind = EndpointKind(kind)
        self.name = name or f"vllm:{model}"
        c = self.config
        args = engine_args_cls(
            model=c.model,
            tokenizer=c.tokenizer,
            max_model_len=c.max_model_len,
            gpu_memory_utilization=c.gpu_memory_utilization,
            enforce_eager=c.enforce_eager,
            dtype=c.dtype,
            seed=c.seed,
            **c.engine_args,
        )
        self._engine = async_llm.from_engine_args(args)
        self.max_model_len: int = self._engine.model_config.max_model_len
        # The engine's tokenizer: a property on recent releases, an async getter on older ones.
        self._tokenizer: Any = getattr(self._engine, "tokenizer", None)
        self._ids = itertools.count()
        self.tokens_generated = 0
        self.active_streams = 0

    def unfinished_requests(self) -> int:
        """Requests the vLLM engine still holds (0 once every stream has ended or been aborted),
        from AsyncLLM's ``output_processor`` (v1): what tests check an abort against."""
        if self._engine is None:
            return 0
        return int(self._engine.output_processor.get_num_unfinished_requests())

    async def _tok(self) -> Any:
        if self._tokenizer is None:
            tok = self._engine.get_tokenizer()
            self._tokenizer = await tok if inspect.isawaitable(tok) else tok
        return self._tokenizer

    def _sync_tok(self) -> Any:
        if self._tokenizer is None:
            tok = self._engine.get_tokenizer()
            if inspect.isawaitable(tok):  # older vLLM: only reachable from a coroutine
                tok.close()
                raise RuntimeError("on this vLLM version, the tokenizer is ready after one stream")
            self._tokenizer = tok
        return self._tokenizer

    def count_tokens(self, text: str) -> int:
        return len(self._sync_tok().encode(text, add_special_tokens=False)) if text else 0

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """``messages`` as this model's prompt (module docstring). Raises InvalidRequestError
        when the template refuses them."""
        tok = self._sync_tok()
        if not getattr(tok, "chat_template", None):
            return default_chat_template(messages)
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja2's errors, the template's raise_exception
            raise InvalidRequestError(f"{self.name}'s chat template: {e}") from None
        bos = getattr(tok, "bos_token", None)
        if bos and text.startswith(bos) and list(tok.encode(""))[:1] == [tok.bos_token_id]:
            text = text[len(bos) :]  # stream's encode adds it
        return text

    @property
    def chat_stop(self) -> tuple[str, ...]:
        """Stop strings of a chat turn: the plain transcript's, when the tokenizer has no
        template (a template's turn ends with the model's EOS, which vLLM stops at)."""
        return () if getattr(self._sync_tok(), "chat_template", None) else DEFAULT_CHAT_STOP

    async def stream(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        if self._engine is None:
            raise EndpointFailedError(f"{self.name} is closed")
        req.validate()
        tok = await self._tok()
        ids = list(tok.encode(req.prompt))
        if req.prefix:
            ids += tok.encode(req.prefix, add_special_tokens=False)
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt + prefix is {len(ids)} tokens; {self.name} has a context window of "
                f"{self.max_model_len} tokens"
            )
        params = self._vllm.SamplingParams(
            max_tokens=min(req.max_tokens, self.max_model_len - len(ids)),
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=list(self.chat_stop) if req.messages is not None else None,
            output_kind=self._output_kind.DELTA,
        )
        rid = f"{req.request_id or 'disco'}-{next(self._ids)}"
        prompt = self._vllm.TokensPrompt(prompt_token_ids=ids)
        outputs = self._engine.generate(prompt, params, rid)
        index = req.start_index
        finished = False
        self.active_streams += 1
        try:
            async for out in outputs:
                now = time.monotonic()
                c = out.outputs[0]
                new = list(c.token_ids)
                reason = c.finish_reason if out.finished else None
                for j, tid in enumerate(new):
                    last = j == len(new) - 1
                    self.tokens_generated += 1
                    yield TokenEvent(
                        index,
                        c.text if last else "",
                        now,
                        int(tid),
                        self.kind,
                        _finish(reason) if last else None,
                    )
                    index += 1
                finished = out.finished
        except Exception as e:  # noqa: BLE001 - engine death, validation inside vLLM, ...
            if isinstance(e, ValueError) and index == req.start_index:
                raise InvalidRequestError(f"{self.name}: {e}") from e
            raise EndpointFailedError(f"{self.name}: {type(e).__name__}: {e}") from e
        finally:
            self.active_streams -= 1
            await outputs.aclose()  # vLLM aborts the request when its generator is closed
            if not finished:
                await self._engine.abort(rid)  # explicit too: a no-op if already gone

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()
            # Drop it now, while modules are alive: vLLM's __del__ shuts down again and fails
            # noisily if that first happens at interpreter exit.
            del engine


def _finish(reason: str | None) -> str | None:
    return "stop" if reason not in (None, "length") else reason
