"""Synthetic request workloads whose length distributions come from published statistics.

``chat_workload``: a chat-shaped workload (short prompts, long outputs), the shape of a phone
assistant's traffic and the opposite of the prompt-heavy Azure traces. Its means are the published
per-turn means of LMSYS-Chat-1M (Zheng et al., "LMSYS-Chat-1M: A Large-Scale Real-World LLM
Conversation Dataset", ICLR 2024, arXiv 2309.11998, https://arxiv.org/abs/2309.11998, Table 1,
Llama-2 tokenizer): 69.5 tokens per user prompt and 214.5 tokens per model response. The paper
publishes means only, so the shape is OUR assumption [R]: independent log-normal prompt and output
lengths with those means and log-space sigmas ``CHAT_PROMPT_SIGMA`` / ``CHAT_OUTPUT_SIGMA``
(heavy right tails as in every published chat-length histogram), clipped to [1, 4096]; Poisson
arrivals at ``CHAT_RATE_PER_S`` (the Azure conversation trace's mean rate). The load-free simulator
does not look at arrival times, so the rate only matters to the causal simulator.
"""

from __future__ import annotations

import numpy as np

from .traces import TraceRecord

# Published means (LMSYS-Chat-1M, Table 1; see the module docstring for the source).
LMSYS_PROMPT_MEAN_TOKENS = 69.5
LMSYS_RESPONSE_MEAN_TOKENS = 214.5
LMSYS_SOURCE = "https://arxiv.org/abs/2309.11998"
# [R] ours: the spread of the fitted log-normals (the source gives no spread).
CHAT_PROMPT_SIGMA = 1.0
CHAT_OUTPUT_SIGMA = 0.8
CHAT_MAX_TOKENS = 4096
CHAT_RATE_PER_S = 5.5


def lognormal_with_mean(rng: np.random.Generator, mean: float, sigma: float, n: int) -> np.ndarray:
    """Log-normal draws whose mean is ``mean``: mu = ln(mean) - sigma^2 / 2."""
    return rng.lognormal(np.log(mean) - 0.5 * sigma * sigma, sigma, n)


def chat_workload(n: int = 12_000, seed: int = 0) -> list[TraceRecord]:
    """``n`` chat-shaped requests (see the module docstring), reproducible from ``seed``."""
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / CHAT_RATE_PER_S, n))
    arrivals -= arrivals[0]
    prompt = lognormal_with_mean(rng, LMSYS_PROMPT_MEAN_TOKENS, CHAT_PROMPT_SIGMA, n)
    output = lognormal_with_mean(rng, LMSYS_RESPONSE_MEAN_TOKENS, CHAT_OUTPUT_SIGMA, n)
    prompt = np.clip(np.rint(prompt), 1, CHAT_MAX_TOKENS).astype(int)
    output = np.clip(np.rint(output), 1, CHAT_MAX_TOKENS).astype(int)
    return [
        TraceRecord(float(a), int(p), int(o))
        for a, p, o in zip(arrivals, prompt, output, strict=True)
    ]
