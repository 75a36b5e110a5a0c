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

    def count_tokens(self, text: str) -> int:
        if self._tokenizer is None:
            tok = self._engine.get_tokenizer()
            if inspect.isawaitable(tok):  # older vLLM: only reachable from a coroutine
                tok.close()
                raise RuntimeError("on this vLLM version, count_tokens works after one stream")
            self._tokenizer = tok
        return len(self._tokenizer.encode(text, add_special_tokens=False)) if text else 0

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
