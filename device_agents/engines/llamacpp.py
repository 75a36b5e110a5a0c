"""llama.cpp (through llama-cpp-python) behind the Endpoint protocol: the real device engine.

Threading: llama.cpp calls block for a whole decode step, so generation runs on a worker thread
and hands each token to the event loop through an asyncio queue; the loop never blocks.
A ``Llama`` object is NOT thread-safe, so each endpoint owns exactly one worker thread and every
call that touches the model's context runs there. Concurrent streams on one endpoint are therefore
*queued* (FIFO): the second starts when the first finishes or is cancelled
(``max_concurrency = 1``). Tokenizing only reads the vocabulary and may run on any thread.

Resume: ``prompt`` and ``prefix`` are tokenized separately (the prompt with BOS, the prefix
without) and concatenated, so a prefix that this model generated re-tokenizes to the same ids and
a greedy resume continues exactly as the uninterrupted run would. llama-cpp-python reuses the
KV cache for the longest common token prefix with the previous call, which makes resuming on the
same engine cheap.

Cancel: closing the stream sets a flag that the worker checks before each decode step, so at most
the step already in progress completes; ``aclose()`` returns once the worker has stopped.

End of sequence: when the model emits an end-of-generation token the stream ends with one event of
empty text carrying that token's id and ``finish_reason="stop"`` (as OpenAI-style servers send a
final empty chunk). A stream cut by ``max_tokens`` or the context window ends with "length".

Chat: :meth:`LlamaCppEndpoint.render_chat` renders messages with the GGUF's own template
(``tokenizer.chat_template``) through llama-cpp-python's ``Jinja2ChatFormatter``, ending with the
assistant turn's header; a GGUF without one (the bundled Gemma-3-270M is the base model and ships
none) gets the plain transcript of :func:`disco.scheduler.wire.default_chat_template`. Every
prompt is tokenized with its special tokens parsed (as llama-server and vLLM do), so the
template's turn markers are the model's control tokens, and with the BOS the model asks for: the
renderer drops a BOS the template wrote itself when the tokenizer adds one, so there is exactly
one. A chat request (``req.messages`` set) also ends at the template's stop strings
(:mod:`.stop_strings`; the plain transcript's ``"\\nuser:"``...); a template's end-of-turn token
is an end-of-generation token already.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import functools
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from disco.device_agents.models import ModelUnavailableError, resolve_model
from disco.scheduler.endpoint import EndpointFailedError, GenerationRequest, InvalidRequestError
from disco.scheduler.types import EndpointKind, TokenEvent
from disco.scheduler.wire import DEFAULT_CHAT_STOP, ChatTemplate, default_chat_template

from .stop_strings import StopMatcher


@dataclass(frozen=True, slots=True)
class LlamaCppConfig:
    """What to load and how. ``model``: a GGUF path or a bundled model name (None: default)."""

    model: str | None = None
    n_ctx: int = 2048
    n_threads: int | None = None  # None: all CPUs this process may use
    n_batch: int = 256
    seed: int = 0  # sampling seed when a request has none (greedy ignores it)
    top_k: int = 0  # 0: off (OpenAI-style sampling is temperature + top_p only)
    verbose: bool = False

    def threads(self) -> int:
        if self.n_threads is not None:
            return self.n_threads
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return max(1, os.cpu_count() or 1)


_END = object()


class LlamaCppEndpoint:
    """A local GGUF model as a device (default) or server endpoint."""

    max_concurrency = 1  # one Llama context: streams are queued, see the module docstring

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        kind: EndpointKind | str = EndpointKind.DEVICE,
        name: str | None = None,
        **options: Any,
    ) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise ModelUnavailableError(
                "the llamacpp engine needs llama-cpp-python (pip install llama-cpp-python, "
                "or pip install 'disco-testbed[device]')"
            ) from None
        self.config = LlamaCppConfig(model=None if model is None else os.fspath(model), **options)
        if self.config.n_ctx <= 0 or self.config.n_batch <= 0 or self.config.threads() <= 0:
            raise ValueError(f"n_ctx, n_batch and n_threads must be > 0: {self.config}")
        self.model_path: Path = resolve_model(self.config.model)
        self.kind = EndpointKind(kind)
        self.name = name or f"llamacpp:{self.model_path.stem}"
        self._lib = llama_cpp
        threads = self.config.threads()
        self._llm = llama_cpp.Llama(
            model_path=str(self.model_path),
            n_ctx=self.config.n_ctx,
            n_batch=self.config.n_batch,
            n_threads=threads,
            n_threads_batch=threads,
            seed=self.config.seed,
            verbose=self.config.verbose,
        )
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        self.n_ctx: int = self._llm.n_ctx()
        self.n_params: int = int(llama_cpp.llama_model_n_params(self._llm.model))
        # The single worker thread that owns the Llama context (see module docstring).
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llamacpp")
        self._closed = False
        self.tokens_generated = 0  # decode steps completed (tests check cancel with it)
        self._jobs_lock = threading.Lock()
        self._jobs = 0  # generation jobs queued or running on the worker

    # --- tokenization -----------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        return len(self._llm.tokenize(text.encode(), add_bos=False, special=True)) if text else 0

    def _input_ids(self, req: GenerationRequest) -> list[int]:
        ids = self._llm.tokenize(req.prompt.encode(), add_bos=True, special=True)
        if req.prefix:
            ids += self._llm.tokenize(req.prefix.encode(), add_bos=False)
        return ids

    # --- chat (module docstring) -------------------------------------------------------------
    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """``messages`` as this model's prompt, ending with the assistant turn's header.

        Raises InvalidRequestError when the template refuses the messages (roles that do not
        alternate, say)."""
        import jinja2

        render, _ = self._chat
        try:
            return render(messages)
        except (jinja2.TemplateError, ValueError, TypeError) as e:
            raise InvalidRequestError(f"{self.name}'s chat template: {e}") from None

    @property
    def chat_stop(self) -> tuple[str, ...]:
        """The stop strings that end a chat turn of this model (see :meth:`render_chat`)."""
        return self._chat[1]

    @functools.cached_property
    def _chat(self) -> tuple[ChatTemplate, tuple[str, ...]]:
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            return default_chat_template, DEFAULT_CHAT_STOP
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        bos, eos = (self._token_text(t) for t in (self._llm.token_bos(), self._llm.token_eos()))
        fmt = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)
        drop_bos = bool(bos) and bool(self._lib.llama_vocab_get_add_bos(self._vocab))

        def render(messages: list[dict[str, str]]) -> str:
            prompt = fmt(messages=messages).prompt  # add_generation_prompt: the formatter's default
            # _input_ids adds the BOS when the model wants one: do not send it twice.
            return prompt[len(bos) :] if drop_bos and prompt.startswith(bos) else prompt

        return render, (eos,) if eos else ()

    def _token_text(self, token: int) -> str:
        if token < 0:  # the model has no such token
            return ""
        return self._lib.llama_vocab_get_text(self._vocab, token).decode("utf-8", "replace")

    def _chat_stops(
        self, req: GenerationRequest, emit: Callable[[Any], bool], stop: threading.Event
    ) -> Callable[[Any], bool]:
        """``emit`` that ends a chat request at :attr:`chat_stop` (a StopMatcher between the
        worker and the loop): at a match it sets ``stop``, so that decoding ends there."""
        if req.messages is None or not self.chat_stop:
            return emit
        matcher = StopMatcher(self.chat_stop)

        def checked(item: Any) -> bool:
            if not isinstance(item, TokenEvent):  # the end, or a failure: release what is held
                for ev in matcher.flush():
                    emit(ev)
                return emit(item)
            ok = all([emit(ev) for ev in matcher.push(item)])
            if matcher.stopped:
                stop.set()
                return False
            return ok

        return checked

    # --- streaming ----------------------------------------------------------------------------
    async def stream(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        if self._closed:
            raise EndpointFailedError(f"{self.name} is closed")
        req.validate()
        ids = self._input_ids(req)
        if len(ids) >= self.n_ctx:
            raise InvalidRequestError(
                f"prompt + prefix is {len(ids)} tokens; {self.name} has a context window of "
                f"{self.n_ctx} tokens (set n_ctx or shorten the prompt)"
            )
        budget = min(req.max_tokens, self.n_ctx - len(ids))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def emit(item: Any) -> bool:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
                return True
            except RuntimeError:  # the loop is gone: nobody is listening any more
                stop.set()
                return False

        with self._jobs_lock:
            self._jobs += 1
        job = self._worker.submit(self._generate, ids, budget, req, emit, stop)
        job.add_done_callback(self._job_done)  # counts the worker's work, not the consumer's
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise EndpointFailedError(f"{self.name}: generation failed: {item}") from item
                yield item
        finally:
            stop.set()
            # Still queued: drop it. Running: wait for the step in progress to end (a caller that
            # cancels again, as anyio cancel scopes do, stops waiting; the worker stops anyway).
            if not job.cancel():
                await asyncio.shield(asyncio.wrap_future(job))

    def _job_done(self, _: concurrent.futures.Future) -> None:
        with self._jobs_lock:
            self._jobs -= 1

    @property
    def active_streams(self) -> int:
        """Streams whose generation is queued or still running on the worker thread."""
        return self._jobs

    def _generate(
        self,
        ids: list[int],
        budget: int,
        req: GenerationRequest,
        emit: Callable[[Any], bool],
        stop: threading.Event,
    ) -> None:
        """Runs on the worker thread: one decode step per token, each handed to the loop."""
        try:
            emit = self._chat_stops(req, emit, stop)
            llm = self._llm
            if req.temperature > 0:
                llm.set_seed(self.config.seed if req.seed is None else req.seed)
            tokens = llm.generate(
                ids,
                temp=req.temperature,
                top_p=req.top_p,
                top_k=self.config.top_k,
                min_p=0.0,
                repeat_penalty=1.0,
            )
            utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # pieces may split a char
            for i in range(budget):
                if stop.is_set():
                    break
                tok = next(tokens)  # the first call prefills, each later one decodes a token
                self.tokens_generated += 1
                now = time.monotonic()
                if self._lib.llama_vocab_is_eog(self._vocab, tok):
                    ev = TokenEvent(req.start_index + i, utf8.decode(b"", final=True), now,
                                    tok, self.kind, "stop")  # fmt: skip
                    emit(ev)
                    break
                last = i == budget - 1
                text = utf8.decode(llm.detokenize([tok]), final=last)
                ev = TokenEvent(req.start_index + i, text, now, tok, self.kind,
                                "length" if last else None)  # fmt: skip
                if not emit(ev):
                    break
            tokens.close()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer as a failure
            emit(e)
        emit(_END)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        # Free the model on its own thread, after any stream still running there.
        await asyncio.wrap_future(self._worker.submit(self._llm.close), loop=loop)
        self._worker.shutdown(wait=False)
