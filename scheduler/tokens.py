"""The one token-count estimate, for text where no tokenizer is at hand.

Emulated engines, the ``openai`` engine (the server's tokenizer is remote), the Serve-handle
endpoint, the agent's planner input and the load generator's prompt builder all count tokens with
this function, so a prompt is the same length wherever it is estimated. Engines with a real
tokenizer (llama.cpp, vLLM) count exactly instead (``Endpoint.count_tokens``).
"""

from __future__ import annotations

import math

# The usual rule of thumb for English BPE vocabularies; a corpus that measured its own ratio
# passes it (loadgen.prompts: 4.6 on its text with the SmolLM2 vocabulary).
CHARS_PER_TOKEN = 4.0


def estimate_tokens(text: str, chars_per_token: float = CHARS_PER_TOKEN) -> int:
    """Tokens ``text`` takes at ``chars_per_token`` characters a token, rounded up; 0 for ""."""
    if chars_per_token <= 0:
        raise ValueError(f"chars_per_token must be > 0, got {chars_per_token}")
    return math.ceil(len(text) / chars_per_token) if text else 0
