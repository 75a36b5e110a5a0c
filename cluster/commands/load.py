"""`disco load`: replay a trace (or synthetic arrivals) against device agents with Locust.

Locust runs headless in a child process (its gevent never meets Ray); this process checks the
input, builds the schedule and the prompts, shows progress and writes the report. Every input
problem (unreadable trace, unknown format, empty window, unreachable target) is reported before
anything is sent.

``disco load --overlay DIR,DIR,... --out DIR`` sends nothing: it draws finished runs (each one's
``--label``) on one figure and tabulates them side by side (``disco.loadgen.overlay``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from disco.cluster.errors import CliError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "load",
        help="replay a trace against device agents with Locust (headless) and report TTFT/TBT",
        description="Open-loop trace replay with Locust: streams /v1/completions from each target "
        "and writes Locust's CSV/HTML, requests.jsonl, summary.json and PNG plots (timeline.png: "
        "every request's tokens by endpoint) to --out. With --overlay: compare finished runs.",
    )
    p.add_argument("--target", help="device agent base URL(s), comma-separated (required "
                   "unless --overlay)")  # fmt: skip
    p.add_argument("--trace", help="trace file (Azure LLM CSV, BurstGPT CSV or Mooncake JSONL); "
                   "default: the shipped Azure conversation trace")  # fmt: skip
    p.add_argument("--arrivals", choices=("trace", "poisson", "gamma"), default="trace",
                   help="send times from the trace, or synthetic with lengths from the trace")  # fmt: skip
    p.add_argument("--cv", type=float, default=2.0, help="gamma arrivals: coefficient of variation")
    p.add_argument("--speedup", type=float, default=1.0, help="replay X times faster")
    p.add_argument("--start", type=float, default=0.0, help="window start, trace seconds")
    p.add_argument("--duration", type=float, default=60.0, help="window length, trace seconds")
    p.add_argument("--rate", type=float, help="requests/s: thin the trace window to this rate "
                   "(synthetic: the arrival rate, required)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=256, help="cap on the trace's output length")
    p.add_argument("--max-prompt-tokens", type=int, help="cap on the trace's prompt length")
    p.add_argument("--prompt-scale", type=float, default=1.0,
                   help="multiply the trace's prompt lengths (before the cap), e.g. 0.125")  # fmt: skip
    p.add_argument("--users", type=int, help="Locust users (default: enough for peak concurrency)")
    p.add_argument("--routing", choices=("round-robin", "session"), default="round-robin")
    p.add_argument("--tokenizer", default="auto",
                   help="prompt sizing: auto (SmolLM2 vocabulary if installed), estimate, or a .gguf")  # fmt: skip
    p.add_argument("--model", help="the `model` field of each request (default: omitted)")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="run",
                   help="name of this run in its plots and summary.json, and in --overlay legends")  # fmt: skip
    p.add_argument("--out", required=True, help="output folder")
    g = p.add_argument_group("--overlay: compare finished runs (sends nothing)")
    g.add_argument("--overlay", metavar="DIR,DIR,...",
                   help="output folders of earlier runs: their TTFT/TBT CDFs on one figure with a "
                   "legend by --label (overlay.png) and a table side by side (overlay.md)")  # fmt: skip
    p.set_defaults(run=run)


# The run table printed at the end (units: see disco.loadgen.report.UNITS_NOTE).
RUN_COLUMNS = ["label", "requests", "errors", "ttft_mean_s", "ttft_p50_s", "ttft_p99_s",
               "tbt_p99_s", "qoe_mean", "send_lag_p99_s"]  # fmt: skip
SPLIT_COLUMNS = ["first_from_server", "first_from_device", "tokens_server", "tokens_device",
                 "handovers", "migrations", "failovers", "server_cost_usd", "device_energy_j",
                 "budget_used"]  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from disco.loadgen.replay import (
        ReplayOptions,
        TargetError,
        check_reachable,
        parse_targets,
        prepare,
        replay,
    )
    from disco.loadgen.report import table

    if args.overlay is not None:
        return _overlay(args)
    if not args.target:
        raise CliError("--target is required (or --overlay DIR,DIR,... to compare finished runs)")
    for name in ("speedup", "duration", "request_timeout", "prompt_scale"):
        if getattr(args, name) <= 0:
            raise CliError(f"--{name.replace('_', '-')} must be > 0")
    for name in ("max_tokens", "max_prompt_tokens", "users"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1")
    try:
        targets = parse_targets(args.target)
    except TargetError as e:
        raise CliError(str(e)) from None
    arrivals = _arrivals(args)
    if not arrivals:
        raise CliError("the schedule is empty: widen --duration or raise --rate")
    try:
        check_reachable(targets)
    except TargetError as e:
        raise CliError(str(e)) from None
    counter = _counter(args.tokenizer)
    opts = ReplayOptions(
        label=args.label, max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
        prompt_scale=args.prompt_scale,
        users=args.users, routing=args.routing, model=args.model,
        request_timeout_s=args.request_timeout, seed=args.seed,
    )  # fmt: skip
    span = arrivals[-1].time
    print(f"[load] {len(arrivals)} requests over {span:.1f} s to {len(targets)} target(s); "
          f"building prompts ({counter.name} token counts)...", flush=True)  # fmt: skip
    reqs = prepare(arrivals, targets, opts, counter)
    out = Path(args.out)
    res = replay(reqs, out, opts, say=lambda s: print(s, flush=True))
    print(table([res.summary], RUN_COLUMNS))
    print(table([res.summary], SPLIT_COLUMNS))
    if res.summary["error_kinds"]:
        print(
            "[load] errors: "
            + ", ".join(f"{k} x{n}" for k, n in res.summary["error_kinds"].items())
        )
    if res.summary.get("refused"):
        print(
            f"[load] device saturated: {res.summary['refused']} requests refused with HTTP 429 "
            "(device_saturated): the device's queue was full and the budget kept the server out"
        )
    state = "interrupted; partial results" if res.run.interrupted else "results"
    print(f"[load] {state} in {out}/ (summary.json, requests.jsonl, locust_*.csv, *.png)")
    return 130 if res.run.interrupted else 0


def _overlay(args: argparse.Namespace) -> int:
    from disco.loadgen.overlay import RunDirError, overlay_table, write_overlay

    if args.target:
        raise CliError("--overlay compares finished runs and sends nothing: drop --target")
    dirs = [d.strip() for d in args.overlay.split(",") if d.strip()]
    if not dirs:
        raise CliError("--overlay needs at least one run folder")
    try:
        runs, paths = write_overlay(dirs, args.out)
    except RunDirError as e:
        raise CliError(str(e)) from None
    print(overlay_table(runs))
    print(f"[load] {len(runs)} run(s) compared in {args.out}/ ({', '.join(p.name for p in paths)})")
    return 0


def _arrivals(args: argparse.Namespace) -> list:
    from disco.loadgen import arrivals as arr
    from disco.scheduler.traces import TraceFormatError, default_trace_path, load_trace

    path = Path(args.trace) if args.trace else default_trace_path()
    try:
        records = load_trace(path)
    except TraceFormatError as e:
        raise CliError(str(e)) from None
    try:
        if args.arrivals == "trace":
            return arr.from_trace(
                records, speedup=args.speedup, start=args.start, duration=args.duration,
                rate=args.rate, seed=args.seed,
            )  # fmt: skip
        if args.rate is None:
            raise CliError(f"--arrivals {args.arrivals} needs --rate")
        process = (
            arr.Poisson(args.rate)
            if args.arrivals == "poisson"
            else arr.GammaBursts(args.rate, args.cv)
        )
        return arr.synthetic(process, arr.TraceLengths.of(records), duration=args.duration / args.speedup,
                             seed=args.seed)  # fmt: skip
    except ValueError as e:
        raise CliError(str(e)) from None


def _counter(name: str):
    from disco.loadgen.prompts import EstimateCounter, LlamaCppCounter, default_counter

    if name == "auto":
        return default_counter()
    if name == "estimate":
        return EstimateCounter()
    if not Path(name).is_file():
        raise CliError(f"--tokenizer: {name} is not 'auto', 'estimate' or a .gguf file")
    return LlamaCppCounter(name)
