"""The concrete run plan: each request's send time, target device, prompt text and max_tokens.

Built once in the CLI process (prompt building needs a tokenizer; Locust's process should only
send) and handed to the Locust process as a JSONL file.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from disco.scheduler.registry import Registry

from .arrivals import Arrival
from .prompts import PromptBuilder


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    id: str
    due: float  # seconds after the run's start
    target: str  # base URL of the device agent that receives it
    prompt: str
    prompt_tokens: int  # as counted by the prompt builder's tokenizer
    trace_prompt_tokens: int
    max_tokens: int
    session: str | None = None


# (index, session, targets) -> target
Router = Callable[[int, "str | None", Sequence[str]], str]
ROUTERS: Registry = Registry("routing")


@ROUTERS.register("round-robin")
def round_robin(i: int, session: str | None, targets: Sequence[str]) -> str:
    return targets[i % len(targets)]


@ROUTERS.register("session")
def by_session(i: int, session: str | None, targets: Sequence[str]) -> str:
    """A session always reaches the same device, as a user keeps their phone; a stable hash
    (crc32, not Python's salted ``hash``) keeps the mapping the same across runs."""
    if session is None:
        return round_robin(i, session, targets)
    return targets[zlib.crc32(session.encode()) % len(targets)]


def build_schedule(
    arrivals: Sequence[Arrival],
    targets: Sequence[str],
    prompts: PromptBuilder,
    *,
    max_tokens_cap: int | None = None,
    max_prompt_tokens: int | None = None,
    routing: str = "round-robin",
    prompt_scale: float = 1.0,
) -> list[ScheduledRequest]:
    """One :class:`ScheduledRequest` per arrival. ``max_tokens`` is the trace's output length,
    capped by ``max_tokens_cap``. Prompt lengths are multiplied by ``prompt_scale`` (small CPU
    models cannot prefill a 4,000-token trace prompt in useful time; scaling keeps the shape of
    the length distribution, which length-aware policies depend on, where a cap would pile every
    long prompt onto one value), then capped at ``max_prompt_tokens``."""
    if prompt_scale <= 0:
        raise ValueError(f"prompt_scale must be > 0, got {prompt_scale}")
    if not targets:
        raise ValueError("no target URL")
    route: Router = ROUTERS.get(routing)
    out = []
    for i, a in enumerate(arrivals):
        want = max(1, round(a.prompt_tokens * prompt_scale))
        if max_prompt_tokens is not None:
            want = min(want, max_prompt_tokens)
        p = prompts.build(max(1, want))
        mt = a.output_tokens if max_tokens_cap is None else min(a.output_tokens, max_tokens_cap)
        out.append(
            ScheduledRequest(
                id=f"r{i:06d}",
                due=a.time,
                target=route(i, a.session, targets).rstrip("/"),
                prompt=p.text,
                prompt_tokens=p.tokens,
                trace_prompt_tokens=a.prompt_tokens,
                max_tokens=max(1, mt),
                session=a.session,
            )
        )
    return out


def write_schedule(path: str | Path, reqs: Sequence[ScheduledRequest]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in reqs:
            f.write(json.dumps(asdict(r)) + "\n")


def read_schedule(path: str | Path) -> list[ScheduledRequest]:
    with open(path, encoding="utf-8") as f:
        return [ScheduledRequest(**json.loads(line)) for line in f if line.strip()]
