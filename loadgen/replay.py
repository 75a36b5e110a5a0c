"""One load run end to end: arrivals -> schedule with prompts -> Locust -> records -> report.

The library entry point behind ``disco load`` and ``disco demo`` (which calls it once per policy).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import counters as agent_counters
from . import phases as run_phases
from . import slo as run_slo
from .arrivals import Arrival
from .prompts import Corpus, PromptBuilder, TokenCounter, default_counter
from .records import RequestRecord, read_records, write_records
from .report import device_side, error_kinds, summarize_records, write_json, write_plots
from .runner import RunResult, format_progress, run_locust
from .schedule import ScheduledRequest, build_schedule, write_schedule
from .spec import LoadSpec

WORKERS_NOTE = (
    "workers: Locust's distributed mode, one master and this many worker processes, worker i "
    "sending the schedule's positions p with p % workers == i on one shared time zero; "
    "sent_per_worker: requests each sent (each record's `worker`); workers_unfinished: the "
    "workers that died or stopped before their share was sent and answered, and why; "
    "send_lag_*: a request's send time minus its scheduled time, whichever worker sent it"
)


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
    # Locust's distributed mode: one master and this many local worker processes, each sending
    # its share of an open-loop schedule (see disco.loadgen.runner); None: one Locust process.
    workers: int | None = None
    # Closed loop: ``concurrency`` users, each sending its next request when its previous one
    # ends (the schedule's send times are ignored), for at most ``run_s`` seconds.
    concurrency: int | None = None
    # The run's send window [0, run_s) in seconds (open loop: the schedule's window; closed
    # loop: its duration); None: up to the last scheduled send (see disco.loadgen.phases).
    run_s: float | None = None
    phases: run_phases.Phases = run_phases.Phases()  # warm-up, cool-down, ramp: excluded
    slo: run_slo.SLO | None = None  # per-request SLO: attainment and goodput
    meta: Mapping[str, Any] | None = None  # more keys for summary.json (provenance, the point)


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
    closed = opts.concurrency is not None
    spec = LoadSpec(
        schedule=str(out / "schedule.jsonl"), records=str(records_path),
        progress=str(out / "progress.json"), model=opts.model,
        request_timeout_s=opts.request_timeout_s, spin_s=opts.spin_s,
        mode="closed" if closed else "open", duration_s=opts.run_s if closed else None,
    )  # fmt: skip
    last: list[str] = [""]

    def show(p: dict) -> None:
        line = format_progress(p)
        if line != last[0]:
            last[0] = line
            say(line)

    targets = list(dict.fromkeys(r.target for r in reqs))
    before = agent_counters.read_all(targets) if opts.counters else None
    users = opts.concurrency if closed else opts.users
    run = run_locust(spec, out, reqs, users=users, on_progress=show, html=opts.html,
                     nice=opts.nice, workers=opts.workers, say=say)  # fmt: skip
    records = read_records(records_path)
    # Phase and SLO flags on every record, kept in requests.jsonl; only the measured ones
    # enter the summary and the figures.
    window = run_phases.mark(records, opts.phases, opts.run_s)
    run_slo.mark(records, opts.slo)
    if records:
        write_records(records_path, records)
    counted = run_phases.measured(records)
    summary = {"label": opts.label, **summarize_records(counted)}
    summary.update(run_slo.attainment(counted, opts.slo, window["measured_window_s"]))
    summary.update(device_side(_counters(before, records, targets)))
    summary["scheduled"] = len(reqs)
    summary["sent"] = len(records)
    summary["mode"] = spec.mode
    summary["concurrency"] = opts.concurrency
    # Locust processes that sent: 1 (one local process) or the distributed run's workers, with
    # how many requests each sent and any that did not finish its share (index -> why).
    summary["workers"] = run.workers or 1
    summary["locust"] = "distributed" if run.workers else "local"
    if run.workers:
        summary["sent_per_worker"] = [sum(1 for r in records if r.worker == i)
                                      for i in range(run.workers)]  # fmt: skip
        summary["workers_unfinished"] = {str(i): why for i, why in (run.unfinished or {}).items()}
    summary["offered_rate_per_s"] = None if closed else _offered(reqs, window)
    summary.update(window)
    summary["interrupted"] = run.interrupted
    summary["error_kinds"] = dict(error_kinds(counted))
    summary.update(opts.meta or {})
    notes = summary.pop("notes")
    notes["phases"] = run_phases.NOTE
    if opts.slo is not None:
        notes["slo"] = run_slo.NOTE
    if run.workers:
        notes["workers"] = WORKERS_NOTE
    summary["notes"] = notes  # last: the prose after the numbers
    write_json(out / "summary.json", summary)
    if opts.plots and counted:
        write_plots({opts.label: counted}, out, slo=opts.slo)
    return ReplayResult(records, summary, run, out)


def _offered(reqs: Sequence[ScheduledRequest], window: Mapping[str, Any]) -> float | None:
    """Open loop: the requests the schedule sends in the measured window, per second."""
    lo, hi, span = window["measured_from_s"], window["measured_to_s"], window["measured_window_s"]
    if not span:
        return None
    cool = window["cooldown_s"] > 0
    return sum(1 for r in reqs if r.due >= lo and (not cool or r.due < hi)) / span


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
