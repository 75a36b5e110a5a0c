"""`disco load`: replay a trace (or synthetic arrivals) against device agents with Locust.

Locust runs headless in a child process (its gevent never meets Ray); this process checks the
input, builds the schedule and the prompts, shows progress and writes the report. Every input
problem (unreadable trace, unknown format, empty window, unreachable target, a bad --slo, flags
that do not go together) is reported before anything is sent.

Modes: open loop (the trace's send times, or synthetic Poisson/Gamma arrivals with an optional
linear ``--ramp``) or closed loop (``--concurrency N`` users, each sending its next request when
its previous one ends). ``--slo`` adds per-request SLO flags, attainment and goodput
(``disco.loadgen.slo``); ``--warmup``/``--cooldown`` leave the first/last seconds out of every
figure and number (``disco.loadgen.phases``). ``--rates``/``--speedups``/``--concurrencies`` run
one of these per point into ``DIR/<point>/`` and then write ``DIR/sweep.json``/``sweep.png``
(``disco.loadgen.sweep``). Every summary.json and sweep.json carries the commit, package
versions, seed, machine and full command (``disco.cluster.provenance``).

``--workers N`` runs Locust's own distributed mode (open loop): one headless ``--master`` and N
local ``--worker`` processes, each sending its share of the schedule on one shared clock; their
records are merged into the one report (``disco.loadgen.runner``).

``disco load --overlay DIR,DIR,... --out DIR`` sends nothing: it draws finished runs (each one's
``--label``) on one figure and tabulates them side by side (``disco.loadgen.overlay``).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from disco.cluster.commands import report_hook
from disco.cluster.errors import CliError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "load",
        help="replay a trace against device agents with Locust (headless) and report TTFT/TBT",
        description="Load tests with Locust: open-loop trace replay or synthetic arrivals, or "
        "closed-loop users (--concurrency); streams /v1/completions from each target and writes "
        "Locust's CSV/HTML, requests.jsonl, summary.json and PNG plots (timeline.png: every "
        "request's tokens by endpoint) to --out. SLO attainment and goodput with --slo; sweeps "
        "over --rates, --speedups or --concurrencies (one run per point, DIR/<point>/, then "
        "DIR/sweep.json and sweep.png). With --overlay: compare finished runs.",
    )
    p.add_argument("--target", help="device agent base URL(s), comma-separated (required "
                   "unless --overlay)")  # fmt: skip
    p.add_argument("--trace", help="trace file (Azure LLM CSV, BurstGPT CSV or Mooncake JSONL); "
                   "default: the shipped Azure conversation trace")  # fmt: skip
    p.add_argument("--arrivals", choices=("trace", "poisson", "gamma"),
                   help="send times from the trace (default), or synthetic with lengths from the "
                   "trace (default with --rates: poisson)")  # fmt: skip
    p.add_argument("--cv", type=float, default=2.0, help="gamma arrivals: coefficient of variation")
    p.add_argument("--speedup", type=float, default=1.0, help="replay X times faster")
    p.add_argument("--start", type=float, default=0.0, help="window start, trace seconds")
    p.add_argument("--duration", type=float,
                   help="open loop: window length, trace seconds (default 60); closed loop: "
                   "seconds of sending (default 60, none with --requests)")  # fmt: skip
    p.add_argument("--rate", type=float, help="requests/s: thin the trace window to this rate "
                   "(synthetic: the arrival rate, required)")  # fmt: skip
    p.add_argument("--requests", type=int,
                   help="send at most N requests (closed loop: the trace's next N, in order; "
                   "open loop: the schedule's first N)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=256, help="cap on the trace's output length")
    p.add_argument("--max-prompt-tokens", type=int, help="cap on the trace's prompt length")
    p.add_argument("--prompt-scale", type=float, default=1.0,
                   help="multiply the trace's prompt lengths (before the cap), e.g. 0.125")  # fmt: skip
    p.add_argument("--users", type=int, help="Locust users (default: enough for peak concurrency)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="open loop: run Locust distributed, one --master and N local --worker "
                   "processes, worker i sending the schedule's requests i, i+N, ... on one shared "
                   "clock (default: one Locust process)")  # fmt: skip
    p.add_argument("--routing", choices=("round-robin", "session"), default="round-robin")
    p.add_argument("--tokenizer", default="auto",
                   help="prompt sizing: auto (SmolLM2 vocabulary if installed), estimate, or a .gguf")  # fmt: skip
    p.add_argument("--model", help="the `model` field of each request (default: omitted)")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label",
                   help="name of this run in its plots and summary.json, in --overlay legends, "
                   "and the policy of a sweep's rows (default: run; rows: null)")  # fmt: skip
    p.add_argument("--out", help="output folder (required, but with --report)")
    m = p.add_argument_group("closed loop, SLO, warm-up, sweeps")
    m.add_argument("--concurrency", type=int, metavar="N",
                   help="closed loop: N users, each sending its next request (the trace's, in "
                   "order, from --start) when its previous one ends; bounded by --duration "
                   "and/or --requests")  # fmt: skip
    m.add_argument("--slo", metavar="ttft=1s,tbt=200ms,tpot=50ms",
                   help="per-request SLO (any part; units s or ms): tbt bounds a request's "
                   "largest gap between tokens, tpot its (e2e - ttft) / (tokens - 1); reports "
                   "slo_attainment and goodput_per_s (requests/s meeting every bound)")  # fmt: skip
    m.add_argument("--warmup", type=float, default=0.0, metavar="S",
                   help="requests due in the first S seconds are flagged warmup and left out of "
                   "every figure and summary number")  # fmt: skip
    m.add_argument("--cooldown", type=float, default=0.0, metavar="S",
                   help="requests due in the last S seconds of sending: flagged cooldown, left out")  # fmt: skip
    m.add_argument("--ramp", type=float, default=0.0, metavar="S",
                   help="synthetic open loop: the rate rises linearly from 0 over the first S "
                   "seconds (left out like a warm-up, before it)")  # fmt: skip
    m.add_argument("--rates", metavar="R,R,...",
                   help="sweep: one run per synthetic arrival rate (requests/s), lengths from "
                   "the trace")  # fmt: skip
    m.add_argument("--speedups", metavar="X,X,...",
                   help="sweep (--arrivals trace): one run per --speedup of the trace's arrivals")  # fmt: skip
    m.add_argument("--concurrencies", metavar="N,N,...",
                   help="sweep: one closed-loop run per number of users")  # fmt: skip
    g = p.add_argument_group("--overlay: compare finished runs (sends nothing)")
    g.add_argument("--overlay", metavar="DIR,DIR,...",
                   help="output folders of earlier runs: their TTFT/TBT CDFs on one figure with a "
                   "legend by --label (overlay.png) and a table side by side (overlay.md)")  # fmt: skip
    report_hook.attach(p, run, rebuild_flag=True)  # DIR/report.html after the run; --report


# The run table printed at the end (units: see disco.loadgen.report.UNITS_NOTE).
RUN_COLUMNS = ["label", "requests", "errors", "ttft_mean_s", "ttft_p50_s", "ttft_p99_s",
               "tbt_p99_s", "qoe_mean", "send_lag_p99_s"]  # fmt: skip
SLO_COLUMNS = ["slo_attainment", "goodput_per_s"]
SPLIT_COLUMNS = ["first_from_server", "first_from_device", "tokens_server", "tokens_device",
                 "handovers", "migrations", "failovers", "server_cost_usd", "device_energy_j",
                 "budget_used"]  # fmt: skip
DEFAULT_DURATION_S = 60.0
# Closed loop bounded by --duration only: prompts are prepared for this many requests per user
# and second (a user whose requests end faster runs out early, and the run says so).
CLOSED_RATE_PER_USER = 1.0


@dataclass(frozen=True)
class Plan:
    """One run: what to send and how."""

    arrivals: list  # disco.loadgen.arrivals.Arrival; closed loop: their order only
    run_s: float | None  # the send window (see ReplayOptions.run_s)
    concurrency: int | None = None  # closed loop


def run(args: argparse.Namespace) -> int:
    from disco.loadgen.runner import LocustRunError

    try:
        return _run(args)
    except LocustRunError as e:  # a distributed run that could not start: not the input's fault
        print(f"disco load: error: {e}", file=sys.stderr, flush=True)
        return 1


def _run(args: argparse.Namespace) -> int:
    from disco.loadgen.replay import TargetError, check_reachable, parse_targets

    if args.overlay is not None:
        return _overlay(args)
    if not args.target:
        raise CliError("--target is required (or --overlay DIR,DIR,... to compare finished runs)")
    _check_numbers(args)
    slo = _slo(args.slo)
    phases = _phases(args)
    kind, points = _sweep(args)
    closed = args.concurrency is not None or kind == "concurrency"
    _check_modes(args, kind, closed)
    try:
        targets = parse_targets(args.target)
    except TargetError as e:
        raise CliError(str(e)) from None
    records = _trace(args)
    plans = {p: _plan(args, records, p, phases) for p in points} if kind else {}
    single = None if kind else _plan(args, records, None, phases)
    try:
        check_reachable(targets)
    except TargetError as e:
        raise CliError(str(e)) from None
    counter = _counter(args.tokenizer)
    out = Path(args.out)
    if kind is None:
        assert single is not None
        res = _run_one(args, single, targets, counter, out, args.label or "run", slo, phases, {})
        _print_run(res, out)
        if res.run.interrupted:
            return 130
        return 1 if res.summary.get("workers_unfinished") else 0  # a worker died: say so
    return _run_sweep(args, kind, plans, targets, counter, out, slo, phases)


def _check_numbers(args: argparse.Namespace) -> None:
    for name in ("speedup", "request_timeout", "prompt_scale"):
        if getattr(args, name) <= 0:
            raise CliError(f"--{name.replace('_', '-')} must be > 0")
    if args.duration is not None and args.duration <= 0:
        raise CliError("--duration must be > 0")
    for name in ("max_tokens", "max_prompt_tokens", "users", "requests", "concurrency",
                 "workers"):  # fmt: skip
        v = getattr(args, name)
        if v is not None and v < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1")


def _slo(text: str | None):
    from disco.loadgen.slo import SloError, parse_slo

    if text is None:
        return None
    try:
        return parse_slo(text)
    except SloError as e:
        raise CliError(str(e)) from None


def _phases(args: argparse.Namespace):
    from disco.loadgen.phases import Phases

    for name in ("warmup", "cooldown", "ramp"):
        if getattr(args, name) < 0:
            raise CliError(f"--{name} must be >= 0")
    return Phases(args.warmup, args.cooldown, args.ramp)


def _sweep(args: argparse.Namespace) -> tuple[str | None, list]:
    from disco.loadgen.sweep import parse_points

    given = [(k, getattr(args, f)) for k, f in (("rate", "rates"), ("speedup", "speedups"),
             ("concurrency", "concurrencies")) if getattr(args, f) is not None]  # fmt: skip
    if not given:
        return None, []
    if len(given) > 1:
        raise CliError("give one of --rates, --speedups, --concurrencies")
    kind, text = given[0]
    try:
        return kind, parse_points(kind, text)
    except ValueError as e:
        raise CliError(str(e)) from None


def _check_modes(args: argparse.Namespace, kind: str | None, closed: bool) -> None:
    """Flags that do not go together, refused before anything is built or sent."""
    if kind == "rate":
        if args.arrivals == "trace":
            raise CliError("--rates draws synthetic arrivals: with --arrivals trace, sweep "
                           "--speedups instead")  # fmt: skip
        if args.rate is not None:
            raise CliError("give --rate or --rates, not both")
    if kind == "speedup" and args.arrivals not in (None, "trace"):
        raise CliError("--speedups replays the trace's arrivals faster: with synthetic "
                       "arrivals, sweep --rates instead")  # fmt: skip
    if closed:
        if args.concurrency is not None and kind == "concurrency":
            raise CliError("give --concurrency or --concurrencies, not both")
        if kind in ("rate", "speedup"):
            raise CliError("--concurrency runs closed loop: it does not go with --rates/--speedups")
        bad = [f for f, v in (("--arrivals", args.arrivals), ("--rate", args.rate),
               ("--users", args.users), ("--workers", args.workers)) if v is not None]  # fmt: skip
        if args.speedup != 1.0:
            bad.append("--speedup")
        if bad:
            raise CliError(f"closed loop (--concurrency) sends as users free up: drop "
                           f"{', '.join(bad)}")  # fmt: skip
    synthetic = (args.arrivals or ("poisson" if kind == "rate" else "trace")) != "trace"
    if args.ramp > 0 and (closed or not synthetic):
        raise CliError("--ramp needs synthetic open-loop arrivals (--arrivals poisson|gamma with "
                       "--rate, or --rates)")  # fmt: skip


def _trace(args: argparse.Namespace) -> list:
    from disco.scheduler.traces import TraceFormatError, default_trace_path, load_trace

    path = Path(args.trace) if args.trace else default_trace_path()
    try:
        return load_trace(path)
    except TraceFormatError as e:
        raise CliError(str(e)) from None


def _plan(args: argparse.Namespace, records: list, point, phases) -> Plan:
    """What one run (or sweep point) sends; every input problem raises CliError here."""
    from disco.loadgen import arrivals as arr

    kind = point.kind if point is not None else None
    if args.concurrency is not None or kind == "concurrency":
        users = int(point.value) if kind == "concurrency" else args.concurrency
        return _closed_plan(args, records, users, phases)
    arrivals_kind = args.arrivals or ("poisson" if kind == "rate" else "trace")
    rate = point.value if kind == "rate" else args.rate
    speedup = point.value if kind == "speedup" else args.speedup
    duration = args.duration if args.duration is not None else DEFAULT_DURATION_S
    run_s = duration / speedup
    try:
        if arrivals_kind == "trace":
            got = arr.from_trace(records, speedup=speedup, start=args.start, duration=duration,
                                 rate=rate, seed=args.seed)  # fmt: skip
            t0 = min(r.arrival for r in records)
            if max(r.arrival for r in records) - t0 < args.start + duration:
                run_s = None  # the trace ends inside the window: the run ends at its last send
        else:
            if rate is None:
                raise CliError(f"--arrivals {arrivals_kind} needs --rate (or sweep --rates)")
            process = (arr.Poisson(rate) if arrivals_kind == "poisson"
                       else arr.GammaBursts(rate, args.cv))  # fmt: skip
            got = arr.synthetic(process, arr.TraceLengths.of(records), duration=run_s,
                                seed=args.seed, ramp_s=args.ramp)  # fmt: skip
    except ValueError as e:
        raise CliError(str(e)) from None
    if args.requests is not None and len(got) > args.requests:
        got, run_s = got[: args.requests], None  # the run ends at its last send
    if not got:
        what = f" at {point.name}" if point is not None else ""
        raise CliError(f"the schedule{what} is empty: widen --duration or raise --rate")
    try:
        phases.check(run_s if run_s is not None else got[-1].time)
    except ValueError as e:
        raise CliError(str(e)) from None
    return Plan(got, run_s)


def _closed_plan(args: argparse.Namespace, records: list, users: int, phases) -> Plan:
    """The trace's requests in order from --start (wrapping round to its first one if the run
    needs more), as many as --requests or the duration can use."""
    from disco.loadgen.arrivals import Arrival

    duration = args.duration
    if duration is None and args.requests is None:
        duration = DEFAULT_DURATION_S
    if duration is not None:
        try:
            phases.check(duration)
        except ValueError as e:
            raise CliError(str(e)) from None
    n = args.requests
    if n is None:
        assert duration is not None
        n = users * (1 + math.ceil(duration * CLOSED_RATE_PER_USER))
    ordered = sorted(records, key=lambda r: r.arrival)
    if not ordered:
        raise CliError("the trace holds no request")
    t0 = ordered[0].arrival
    first = next((i for i, r in enumerate(ordered) if r.arrival >= t0 + args.start), None)
    if first is None:
        raise CliError(f"--start {args.start:g} is past the trace's last request")
    picked = [ordered[(first + i) % len(ordered)] for i in range(n)]
    got = [Arrival(0.0, int(r.prompt_tokens), int(r.output_tokens),
                   None if getattr(r, "session", None) is None else str(r.session))
           for r in picked]  # fmt: skip
    return Plan(got, duration, users)


def _options(args: argparse.Namespace, plan: Plan, label: str, slo, phases, meta: dict):
    from disco.loadgen.replay import ReplayOptions

    return ReplayOptions(
        label=label, max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
        prompt_scale=args.prompt_scale, users=args.users, routing=args.routing,
        model=args.model, request_timeout_s=args.request_timeout, seed=args.seed,
        concurrency=plan.concurrency, run_s=plan.run_s, phases=phases, slo=slo, meta=meta,
        workers=args.workers,
    )  # fmt: skip


def _run_one(args, plan: Plan, targets, counter, out: Path, label: str, slo, phases, meta,
             reqs=None):  # fmt: skip
    """One run into ``out``: prompts (unless ``reqs`` are given), Locust, report."""
    from disco.cluster.provenance import provenance
    from disco.loadgen.replay import prepare, replay

    opts = _options(args, plan, label, slo, phases, {**meta, **provenance(args)})
    if reqs is None:
        if plan.concurrency is not None:
            bound = f"{plan.run_s:g} s" if plan.run_s is not None else "no time limit"
            what = (f"closed loop: {plan.concurrency} users, up to {len(plan.arrivals)} "
                    f"requests ({bound})")  # fmt: skip
        else:
            what = f"{len(plan.arrivals)} requests over {plan.arrivals[-1].time:.1f} s"
        print(f"[load] {what} to {len(targets)} target(s); building prompts ({counter.name} "
              "token counts)...", flush=True)  # fmt: skip
        reqs = prepare(plan.arrivals, targets, opts, counter)
    if opts.workers:
        print(f"[load] Locust distributed: one master and {opts.workers} worker process(es)",
              flush=True)  # fmt: skip
    res = replay(reqs, out, opts, say=lambda s: print(s, flush=True))
    if plan.concurrency is not None and plan.run_s is not None:
        s = res.summary
        if s["sent"] >= len(reqs) and s["interrupted"] is False:
            print(f"[load] the closed-loop users sent all {len(reqs)} prepared requests before "
                  f"--duration ended: give --requests N to prepare more")  # fmt: skip
    return res


def _print_run(res, out: Path) -> None:
    from disco.loadgen.report import table

    s = res.summary
    print(table([s], RUN_COLUMNS + (SLO_COLUMNS if s.get("slo") else [])))
    print(table([s], SPLIT_COLUMNS))
    excluded = {k: v["requests"] for k, v in s["phases"].items() if k != "measured"}
    if any(excluded.values()):
        print(f"[load] left out of the figures and numbers: {excluded['warmup']} warm-up and "
              f"{excluded['cooldown']} cool-down requests (kept in requests.jsonl)")  # fmt: skip
    if s.get("slo"):
        print(f"[load] SLO {_slo_text(s['slo'])}: {s['slo_met']} of {s['requests']} measured "
              f"requests met it; goodput {_num(s['goodput_per_s'])} requests/s over "
              f"{s['measured_window_s']:.1f} s")  # fmt: skip
    if s["error_kinds"]:
        print("[load] errors: " + ", ".join(f"{k} x{n}" for k, n in s["error_kinds"].items()))
    if s.get("refused"):
        print(
            f"[load] device saturated: {s['refused']} requests refused with HTTP 429 "
            "(device_saturated): the device's queue was full and the budget kept the server out"
        )
    for i, why in s.get("workers_unfinished", {}).items():
        print(f"[load] worker {i} did not finish its share: {why}; the report holds what it sent")
    if s.get("sent_per_worker"):
        print(f"[load] {s['workers']} Locust workers sent {s['sent_per_worker']} requests")
    state = "interrupted; partial results" if res.run.interrupted else "results"
    print(f"[load] {state} in {out}/ (summary.json, requests.jsonl, locust_*.csv, *.png)")


def _slo_text(slo: dict) -> str:
    return ", ".join(f"{k.removesuffix('_s')} <= {v:g} s" for k, v in slo.items() if v is not None)


def _num(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def _run_sweep(args, kind: str, plans: dict, targets, counter, out: Path, slo, phases) -> int:
    """One run per point, each in ``out/<point>/``; then sweep.json, sweep.md and sweep.png."""
    from disco.cluster.provenance import provenance
    from disco.loadgen.replay import prepare
    from disco.loadgen.sweep import point_info, row, sweep_table, write_sweep

    policy = args.label  # a sweep's rows name the policy only when told (--label)
    rows, infos = [], []
    shared = None
    if kind == "concurrency":  # the same requests in the same order: prompts built once
        big = max(plans.values(), key=lambda p: len(p.arrivals))
        opts = _options(args, big, "", slo, phases, {})
        print(f"[load] sweep over {len(plans)} concurrencies; building prompts for up to "
              f"{len(big.arrivals)} requests ({counter.name} token counts)...", flush=True)  # fmt: skip
        shared = prepare(big.arrivals, targets, opts, counter)
    interrupted = lost = False
    for i, (point, plan) in enumerate(plans.items()):
        print(f"[load] sweep point {i + 1}/{len(plans)}: {point.name}", flush=True)
        reqs = shared[: len(plan.arrivals)] if shared is not None else None
        label = f"{policy or 'run'} {point.name}"
        res = _run_one(args, plan, targets, counter, out / point.name, label, slo, phases,
                       {"sweep_point": point.name}, reqs)  # fmt: skip
        rows.append(row(policy, point, res.summary))
        lost = lost or bool(res.summary.get("workers_unfinished"))
        infos.append(point_info(policy, point, res.summary, out / point.name))
        s = res.summary
        print(f"[load] {point.name}: {s['requests']} requests, {s['errors']} errors, TTFT P99 "
              f"{_num(s['ttft_p99_s'])} s, goodput {_num(s['goodput_per_s'])}/s", flush=True)  # fmt: skip
        if res.run.interrupted:
            interrupted = True
            print("[load] interrupted: skipping the remaining points")
            break
    config = {"targets": targets, "label": args.label, "points": [p.name for p in plans],
              "warmup_s": phases.warmup_s, "cooldown_s": phases.cooldown_s,
              "ramp_s": phases.ramp_s, "interrupted": interrupted}  # fmt: skip
    write_sweep(out, kind, rows, infos, slo=slo.to_dict() if slo else None,
                meta={"config": config, **provenance(args)},
                title=f"disco load sweep over {kind}" + (f" ({policy})" if policy else ""))  # fmt: skip
    print(sweep_table(rows, kind))
    print(f"[load] sweep results in {out}/ (sweep.json, sweep.md, sweep.png; one folder per point)")
    return 130 if interrupted else 1 if lost else 0


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


def _counter(name: str):
    from disco.loadgen.prompts import EstimateCounter, LlamaCppCounter, default_counter

    if name == "auto":
        return default_counter()
    if name == "estimate":
        return EstimateCounter()
    if not Path(name).is_file():
        raise CliError(f"--tokenizer: {name} is not 'auto', 'estimate' or a .gguf file")
    return LlamaCppCounter(name)
