"""One load run end to end: arrivals -> schedule with prompts -> Locust -> records -> report.

The library entry point behind ``disco load`` and ``disco demo`` (which calls it once per policy).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import counters as agent_counters
from .arrivals import Arrival
from .prompts import Corpus, PromptBuilder, TokenCounter, default_counter
from .records import RequestRecord, read_records
from .report import device_side, error_kinds, summarize_records, write_json, write_plots
from .runner import RunResult, format_progress, run_locust
from .schedule import ScheduledRequest, build_schedule, write_schedule
from .spec import LoadSpec


class TargetError(ValueError):
    """A target URL is malformed or nothing answers there."""


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    label: str = "run"
    max_tokens: int | None = 256  # cap on the trace's output length
    max_prompt_tokens: int | None = None  # cap on the trace's prompt length (device context)
    prompt_scale: float = 1.0  # multiplies the trace's prompt lengths (before the cap)
    users: int | None = None  # None: enough for the schedule's peak concurrency
    routing: str = "round-robin"
    model: str | None = None
    request_timeout_s: float = 120.0
    seed: int = 0
    html: bool = True
    plots: bool = True
    counters: bool = True  # read the targets' /metrics before and after (see counters.py)
    nice: int = 0  # < 0: raise Locust's CPU priority (see run_locust)
    spin_s: float = 0.001  # see Pacer.spin_s (1 ms: sub-ms send error for ~5% of a core at 50/s)


@dataclass(frozen=True)
class ReplayResult:
    records: list[RequestRecord]
    summary: dict[str, Any]
    run: RunResult
    out_dir: Path


def parse_targets(spec: str | Sequence[str]) -> list[str]:
    """``http://a:1,http://b:2`` -> validated base URLs (no trailing slash)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    urls = [u.strip().rstrip("/") for u in items if u.strip()]
    if not urls:
        raise TargetError("no target URL given")
    for u in urls:
        parts = urlsplit(u)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TargetError(f"target {u!r} is not an http(s)://host[:port] URL")
    return urls


def check_reachable(urls: Sequence[str], timeout_s: float = 3.0) -> None:
    """A TCP connection to each target, before anything is sent (a refused or silent port fails
    here, with its URL, rather than as a run full of errors)."""
    for u in urls:
        parts = urlsplit(u)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            with socket.create_connection((parts.hostname, port), timeout=timeout_s):
                pass
        except OSError as e:
            raise TargetError(f"target {u} is unreachable: {e.strerror or e}") from None


def prepare(
    arrivals: Sequence[Arrival],
    targets: Sequence[str],
    opts: ReplayOptions,
    counter: TokenCounter | None = None,
    corpus: Corpus | None = None,
) -> list[ScheduledRequest]:
    builder = PromptBuilder(corpus or Corpus.stdlib(), counter or default_counter(), seed=opts.seed)
    return build_schedule(
        arrivals, targets, builder, max_tokens_cap=opts.max_tokens,
        max_prompt_tokens=opts.max_prompt_tokens, routing=opts.routing,
        prompt_scale=opts.prompt_scale,
    )  # fmt: skip


def replay(
    reqs: Sequence[ScheduledRequest],
    out_dir: str | Path,
    opts: ReplayOptions,
    say: Callable[[str], None] = print,
) -> ReplayResult:
    """Run Locust over ``reqs``; write requests.jsonl, Locust's CSV/HTML, summary.json, plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / "requests.jsonl"
    records_path.unlink(missing_ok=True)  # a re-run into the same folder starts clean
    write_schedule(out / "schedule.jsonl", reqs)
    spec = LoadSpec(
        schedule=str(out / "schedule.jsonl"), records=str(records_path),
        progress=str(out / "progress.json"), model=opts.model,
        request_timeout_s=opts.request_timeout_s, spin_s=opts.spin_s,
    )  # fmt: skip
    last: list[str] = [""]

    def show(p: dict) -> None:
        line = format_progress(p)
        if line != last[0]:
            last[0] = line
            say(line)

    targets = list(dict.fromkeys(r.target for r in reqs))
    before = agent_counters.read_all(targets) if opts.counters else None
    run = run_locust(
        spec, out, reqs, users=opts.users, on_progress=show, html=opts.html, nice=opts.nice
    )
    records = read_records(records_path)
    summary = {"label": opts.label, **summarize_records(records)}
    summary.update(device_side(_counters(before, records, targets)))
    summary["scheduled"] = len(reqs)
    summary["interrupted"] = run.interrupted
    summary["error_kinds"] = dict(error_kinds(records))
    summary["notes"] = summary.pop("notes")  # last: the prose after the numbers
    write_json(out / "summary.json", summary)
    if opts.plots and records:
        write_plots({opts.label: records}, out)
    return ReplayResult(records, summary, run, out)


def _counters(
    before: agent_counters.Reading | None, records: Sequence[RequestRecord], targets: list[str]
) -> dict[str, float] | str:
    """The targets' counters over the run, or why they are unknown."""
    if before is None:
        return "not read (ReplayOptions.counters is off)"
    if before.problems:
        url, why = next(iter(before.problems.items()))
        return f"{url}: {why}"
    sent: dict[str, int] = {}  # requests each agent answered (and so books)
    for r in records:
        if r.status:
            sent[r.target] = sent.get(r.target, 0) + 1
    after, settled = agent_counters.read_settled(before, sent)
    got = agent_counters.run_counters(before, after, targets)
    if isinstance(got, dict) and not settled:
        return "the agents had not booked every request of the run 3 s after it ended"
    return got
