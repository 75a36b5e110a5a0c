"""`disco demo`: the whole testbed end to end, DiSCo against its baselines, in one command.

1. Takes a slice of the shipped Azure conversation trace, thinned to a rate this machine can
   serve, and builds real prompts of the trace's lengths (capped for the small models).
2. Starts the testbed through the runtime (``Testbed.start``): local Ray, a server replica
   (llama.cpp on CPU; vLLM where a CUDA GPU and vLLM are present), the scheduler actor, a real
   llama.cpp device agent, and an emulated fleet with an HTTP front per device (``FleetHttpActor``).
3. For each policy: a fresh scheduler actor, device agent and fleet (so budgets, online estimates
   and counters start from zero; Ray, Serve and the server replica stay up), then the same
   schedule replayed open-loop by Locust in its own process (``disco.loadgen``).
4. TTFT / TBT / QoE from Locust's client-side records; server cost, device energy and migrations
   from the device side's counters (agent and fleet metrics); budget used from the outcomes the
   devices reported to the scheduler (its ledger).
5. Prints the comparison table, writes DIR/summary.json, plots, and the simulator's prediction for
   the same requests next to the measurement (DIR/sim_vs_live.md); shuts everything down.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from disco.cluster.errors import CliError

DEFAULT_POLICIES = "disco,server-only,device-only,race"


@dataclass(frozen=True, slots=True)
class DemoSize:
    """How much load: chosen so ``--quick`` stays under 5 minutes on 2 cores, the default under 20."""

    duration_s: float  # replayed trace time per policy
    rate: float  # requests/s after thinning the trace
    devices: int  # emulated devices (plus the one real llama.cpp agent)
    max_tokens: int
    max_prompt_tokens: int
    # The trace's prompts (median ~1,000 tokens) scaled to what 2-core CPU models prefill in
    # about a second, keeping the length distribution's shape (see build_schedule).
    prompt_scale: float = 0.125


QUICK = DemoSize(duration_s=30.0, rate=1.0, devices=4, max_tokens=24, max_prompt_tokens=384)
# The one-stream CPU server replica serves ~0.6-0.8 requests/s of these sizes: the full run keeps
# it below saturation over 200 s (server-only then shows queueing, not an ever-growing backlog);
# the quick run's 30 s at 1/s overloads it briefly, which is the server tail DiSCo hedges.
FULL = DemoSize(duration_s=200.0, rate=0.6, devices=8, max_tokens=32, max_prompt_tokens=512)
# Locust shares the 2 cores with both llama.cpp engines: a higher priority (where allowed) keeps
# its sends on schedule; it needs a few % of one core.
LOCUST_NICE = -5
SCHED_WINDOW, SCHED_RECOMPUTE = 200, 10  # the scheduler's (and the simulator's) estimate window
SERVER_MODEL = "gemma3-270m"  # the "big" model, on the server replica
DEVICE_MODEL = "smollm2-135m"  # the small model, on the real device agent


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole testbed locally and compare DiSCo with its baselines",
        description="Local Ray + server replica + real llama.cpp device + emulated fleet + "
        "scheduler; replays a slice of the Azure conversation trace with Locust once per policy.",
    )
    p.add_argument("--quick", action="store_true", help="a small run (< 5 min on 2 cores)")
    p.add_argument("--out", default="results/demo", help="output folder (default: results/demo)")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help=f"default: {DEFAULT_POLICIES}")
    p.add_argument("--budget", type=float, default=0.3, help="budget ratio b in [0, 1]")
    p.add_argument("--regime", choices=("server", "device"), default="server",
                   help="which endpoint the budget constrains (default: server)")  # fmt: skip
    p.add_argument("--duration", type=float, help="trace seconds replayed per policy")
    p.add_argument("--rate", type=float, help="requests/s (the trace slice is thinned to it)")
    p.add_argument("--devices", type=int, help="emulated devices besides the real one")
    p.add_argument("--start", type=float, default=600.0, help="trace offset of the slice, s")
    p.add_argument("--server-engine", choices=("auto", "llamacpp", "vllm", "emulated"),
                   default="auto", help="auto: vllm with a CUDA GPU, else llamacpp")  # fmt: skip
    p.add_argument("--no-agent", action="store_true", help="no real llama.cpp device agent")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


# ---- plan ----------------------------------------------------------------------------------------


def _size(args: argparse.Namespace) -> DemoSize:
    s = QUICK if args.quick else FULL
    return replace(
        s,
        duration_s=args.duration if args.duration is not None else s.duration_s,
        rate=args.rate if args.rate is not None else s.rate,
        devices=args.devices if args.devices is not None else s.devices,
    )


def _policies(spec: str) -> list[str]:
    from disco.cluster.resolve import policy_names

    names = [p.strip() for p in spec.split(",") if p.strip()]
    known = policy_names()
    bad = [p for p in names if p not in known]
    if not names or bad:
        raise CliError(f"unknown policy {', '.join(bad) or '(none)'} (known: {', '.join(known)})")
    if len(set(names)) != len(names):
        raise CliError("--policies lists a policy twice")
    return names


def _server_engine(choice: str) -> str:
    from disco.cluster.gpu import has_cuda_gpu

    if choice != "auto":
        return choice
    if has_cuda_gpu():
        try:
            import vllm  # noqa: F401
        except ImportError:
            return "llamacpp"
        return "vllm"
    return "llamacpp"


def testbed_config(
    size: DemoSize, policy: str, budget: float, regime: str, engine: str, agent: bool, seed: int
) -> Any:
    """The demo's testbed: everything sized for a 2-core laptop (one thread per llama.cpp)."""
    from disco.cluster.config import (
        AgentConfig,
        FleetConfig,
        HttpConfig,
        RayConfig,
        SchedulerConfig,
        ServerConfig,
        TestbedConfig,
    )

    if engine == "llamacpp":
        server = ServerConfig(
            engine="llamacpp", num_cpus=1.0, http=HttpConfig(port=0),
            engine_kwargs={"model": SERVER_MODEL, "kind": "server", "n_threads": 1, "n_ctx": 2048},
        )  # fmt: skip
    elif engine == "vllm":
        from disco.device_agents.models import resolve_model

        server = ServerConfig(
            engine="vllm", num_cpus=1.0, num_gpus=1.0, http=HttpConfig(port=0),
            engine_kwargs={"model": str(resolve_model(SERVER_MODEL))},
        )  # fmt: skip
    else:
        server = ServerConfig(
            engine="emulated", num_cpus=0.1, http=HttpConfig(port=0),
            engine_kwargs={"profile": "gpt-4o-mini"},
        )  # fmt: skip
    return TestbedConfig(
        ray=RayConfig(include_dashboard=False),  # Ray itself is started by _start_ray
        server=server,
        scheduler=SchedulerConfig(
            policy=policy,
            budget=budget,
            regime=regime,
            seed=seed,
            checkpoint="none",
            # The demo sends ~30-150 requests per policy: re-estimate often enough to adapt.
            window=SCHED_WINDOW,
            recompute_every=SCHED_RECOMPUTE,
        ),  # fmt: skip
        fleet=FleetConfig(devices=0),  # the demo starts its own fleet, with an HTTP front
        agent=AgentConfig(
            enabled=agent,
            model=DEVICE_MODEL,
            num_cpus=0.5,
            engine_kwargs={"n_threads": 1, "n_ctx": 2048},
        ),  # fmt: skip
    )


def device_totals(tb: Any) -> dict[str, Any]:
    """Cost, energy and migrations from the devices' own counters (the testbed's agent and
    fleets); budget used from the outcomes they reported to the scheduler."""
    import ray

    parts = []
    if tb.agent is not None:
        parts.append(ray.get(tb.agent.metrics.remote(), timeout=30))
    parts.extend(ray.get([f.stats.remote() for f in tb.fleets], timeout=30))
    keys = ("server_cost_usd", "device_energy_j", "migrations", "tokens_server", "tokens_device",
            "completed", "failed", "planner_errors")  # fmt: skip
    tot = {k: sum(p.get(k, 0) for p in parts) for k in keys}
    stats = ray.get(tb.scheduler.stats.remote(), timeout=30)
    tot["budget_used"] = stats.get("spent_ratio")
    tot["ledger"] = stats.get("ledger")
    return tot


# ---- run -----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from disco.loadgen import arrivals as arr
    from disco.loadgen.replay import ReplayOptions, prepare
    from disco.scheduler.traces import TraceFormatError, default_trace_path, load_trace

    started = time.monotonic()
    if not 0.0 <= args.budget <= 1.0:
        raise CliError(f"--budget must be in [0, 1], got {args.budget}")
    policies = _policies(args.policies)
    size = _size(args)
    if size.duration_s <= 0 or size.rate <= 0 or size.devices < 0:
        raise CliError("--duration and --rate must be > 0, --devices >= 0")
    if args.no_agent and size.devices == 0:
        raise CliError("no device to send to: drop --no-agent or give --devices > 0")
    engine = _server_engine(args.server_engine)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    say(f"{len(policies)} policies ({', '.join(policies)}), budget {args.budget:g} "
        f"({args.regime}-constrained), server engine {engine}, "
        f"{'1 real llama.cpp device + ' if not args.no_agent else ''}{size.devices} emulated")  # fmt: skip
    try:
        trace = load_trace(default_trace_path())
        arrivals = arr.from_trace(trace, start=args.start, duration=size.duration_s,
                                  rate=size.rate, seed=args.seed)  # fmt: skip
    except (TraceFormatError, ValueError) as e:
        raise CliError(str(e)) from None
    n_targets = size.devices + (0 if args.no_agent else 1)
    opts = ReplayOptions(max_tokens=size.max_tokens, max_prompt_tokens=size.max_prompt_tokens,
                         prompt_scale=size.prompt_scale, seed=args.seed,
                         request_timeout_s=60.0, nice=LOCUST_NICE)  # fmt: skip
    placeholders = [f"http://target-{i}" for i in range(n_targets)]
    say(f"trace slice: {len(arrivals)} requests over {size.duration_s:g} s of the Azure "
        f"conversation trace; building prompts from real text...")  # fmt: skip
    reqs = prepare(arrivals, placeholders, opts)

    cfg = testbed_config(size, policies[0], args.budget, args.regime, engine,
                         not args.no_agent, args.seed)  # fmt: skip
    rows, runs, devices_seen = _run_policies(cfg, policies, reqs, placeholders, opts, size, out)
    _report(rows, runs, reqs, policies, args, size, engine, out, devices_seen)
    say(f"done in {time.monotonic() - started:.0f} s; results in {out}/")
    return 130 if any(r.get("interrupted") for r in rows) else 0


def _run_policies(cfg, policies, reqs, placeholders, opts, size, out):
    from disco.cluster.runtime import Testbed
    from disco.loadgen.replay import replay

    rows: list[dict[str, Any]] = []
    runs: dict[str, list] = {}
    seen: dict[str, Any] = {}
    t = time.monotonic()
    say("starting the testbed (local Ray, Serve server replica); ~20-40 s...")
    _start_ray(cfg)
    try:
        tb = Testbed.start(replace(cfg, agent=replace(cfg.agent, enabled=False)))
    except BaseException:
        _stop_ray()
        raise
    say(f"testbed up in {time.monotonic() - t:.0f} s: server {tb.server_url}")
    # One fleet actor with an HTTP front (FleetHttpActor) for all the emulated devices.
    fleet = replace(cfg.fleet, devices=size.devices, devices_per_actor=max(size.devices, 1))
    try:
        for i, policy in enumerate(policies):
            t = time.monotonic()
            # A fresh scheduler actor, agent and fleet per policy (the runtime's own scheduler
            # actor is replaced by the first): budgets, estimates and counters start from zero.
            tb.restart_device_side(replace(cfg.scheduler, policy=policy), fleet=fleet,
                                   agent=cfg.agent, fleet_http=True)  # fmt: skip
            targets = tb.device_urls
            say(f"[{i + 1}/{len(policies)}] {policy}: scheduler, {len(targets)} device(s) up "
                f"in {time.monotonic() - t:.0f} s; replaying {len(reqs)} requests...")  # fmt: skip
            mapping = dict(zip(placeholders, targets, strict=True))
            mine = [replace(r, target=mapping[r.target]) for r in reqs]
            popts = replace(opts, label=policy)
            res = replay(mine, out / policy, popts, say=lambda s: print("       " + s, flush=True))
            try:
                dev = device_totals(tb)
            except Exception as e:  # noqa: BLE001 - e.g. actors gone after a Ctrl-C: keep the rest
                say(f"device-side counters unavailable: {e!r}")
                dev = {}
            seen[policy] = dev
            runs[policy] = res.records
            rows.append(_row(policy, cfg.scheduler.budget, res.summary, dev, res.run.interrupted))
            s = res.summary
            say(f"[{i + 1}/{len(policies)}] {policy}: {s['requests']} requests, {s['errors']} errors, "
                f"TTFT P50 {_ms(s['ttft_p50'])} P99 {_ms(s['ttft_p99'])}")  # fmt: skip
            tb.stop_device_side()
            if res.run.interrupted:
                say("interrupted: skipping the remaining policies")
                break
    finally:
        tb.stop_device_side()  # a no-op unless a policy's run raised
        say("shutting the testbed down...")
        tb.shutdown()
        _stop_ray()
    return rows, runs, seen


def _start_ray(cfg: Any) -> None:
    """A fresh embedded Ray, started here rather than by the runtime: ``address="local"`` never
    joins a cluster someone else started on this machine (a bare ``ray.init()`` would), and the
    dashboard stays off (it doubles Ray's start time here). Logical CPUs for placement only: the
    actors mostly wait on I/O or drive one llama.cpp thread."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False,
             namespace=cfg.ray.namespace, log_to_driver=False)  # fmt: skip


def _stop_ray() -> None:
    import ray
    from ray import serve

    with contextlib.suppress(Exception):
        serve.shutdown()
    ray.shutdown()


ROW_KEYS = ("policy", "budget", "requests", "errors", "ttft_mean", "ttft_p50", "ttft_p99",
            "tbt_p99", "qoe_mean", "server_cost", "device_energy_j", "budget_used", "migrations")  # fmt: skip


def _row(policy: str, budget: float, s: dict, dev: dict, interrupted: bool) -> dict[str, Any]:
    return {
        "policy": policy, "budget": budget, "requests": s["requests"], "errors": s["errors"],
        "ttft_mean": s["ttft_mean"], "ttft_p50": s["ttft_p50"], "ttft_p99": s["ttft_p99"],
        "tbt_p99": s["tbt_p99"], "qoe_mean": s["qoe_mean"],
        "server_cost": dev.get("server_cost_usd"), "device_energy_j": dev.get("device_energy_j"),
        "budget_used": dev.get("budget_used"), "migrations": dev.get("migrations"),
        "interrupted": interrupted,
    }  # fmt: skip


def _report(rows, runs, reqs, policies, args, size, engine, out, devices_seen) -> None:
    from disco.loadgen.report import table, write_json, write_plots

    if not rows:
        return
    cols = list(ROW_KEYS)
    print()
    print(table(rows, cols))
    print()
    measured = {p: recs for p, recs in runs.items() if recs}
    if measured:
        write_plots(measured, out)
    comparison, sim_md = _sim_vs_live(rows, runs, reqs, policies, args)
    (out / "sim_vs_live.md").write_text(sim_md)
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cfg = {
        "policies": policies, "budget": args.budget, "regime": args.regime,
        "quick": bool(args.quick), "server_engine": engine, "size": asdict(size),
        "trace": "azure_llm_2023_conv (shipped)", "trace_start_s": args.start, "seed": args.seed,
    }  # fmt: skip
    write_json(out / "summary.json", {
        "rows": [{k: r[k] for k in ROW_KEYS} for r in rows], "config": cfg,
        "device_side": devices_seen, "sim_vs_live": comparison, "date": date, "machine": _machine(),
    })  # fmt: skip
    md = [
        f"# `disco demo{' --quick' if args.quick else ''}`",
        "",
        f"{date}, {_machine()}. Server replica: {engine} ({SERVER_MODEL if engine != 'emulated' else 'gpt-4o-mini profile'}); "
        f"devices: {'one real llama.cpp agent (' + DEVICE_MODEL + ') + ' if not args.no_agent else ''}"
        f"{size.devices} emulated; {len(reqs)} requests per policy from {size.duration_s:g} s of "
        f"the Azure conversation trace (offset {args.start:g} s) thinned to {size.rate:g}/s, "
        f"prompt lengths x{size.prompt_scale:g} (cap {size.max_prompt_tokens}), outputs capped at "
        f"{size.max_tokens} tokens; budget {args.budget:g}, {args.regime}-constrained.",
        "TTFT/TBT/QoE: client side (Locust); server cost, device energy, migrations: the devices' "
        "counters; budget used: the devices' outcome reports, as the scheduler's ledger sums them.",
        "",
        table(rows, cols, markdown=True),
        "",
        sim_md.replace("# Simulator", "## Simulator", 1),
    ]  # fmt: skip
    (out / "demo.md").write_text("\n".join(md))


def _machine() -> str:
    import os
    import platform

    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def _sim_vs_live(rows, runs, reqs, policies, args) -> tuple[list[dict[str, Any]], str]:
    from disco.cluster.config import SchedulerConfig
    from disco.loadgen import compare
    from disco.loadgen.report import table
    from disco.scheduler.profiles import load_profile
    from disco.scheduler.types import Regime

    sc = SchedulerConfig()
    server, device = (
        load_profile(sc.server_profile, "server"),
        load_profile(sc.device_profile, "device"),
    )
    regime = Regime(args.regime)
    est = {"seed": args.seed, "window": SCHED_WINDOW, "recompute_every": SCHED_RECOMPUTE}
    predicted = {"configured": compare.simulate(reqs, server, device, regime=regime,
                                                budget=args.budget, policies=policies, **est)}  # fmt: skip
    if "server-only" in runs and "device-only" in runs:
        cs = compare.calibrate_server(server, runs["server-only"])
        cd = compare.calibrate_device(device, runs["device-only"])
        predicted["calibrated"] = compare.simulate(reqs, cs, cd, regime=regime, budget=args.budget,
                                                   policies=policies, **est)  # fmt: skip
    sbs = compare.side_by_side(rows, predicted)
    cols = ["policy", "source", *compare.COMPARED]
    text = [
        "# Simulator prediction vs live measurement",
        "",
        f"Same requests (the demo's schedule: {len(reqs)} requests), policies and budget "
        f"({args.budget:g}, {args.regime}-constrained). `sim (configured)`: the profiles the "
        f"scheduler planned with ({sc.server_profile}, {sc.device_profile}); `sim (calibrated)`: "
        "server TTFTs/gaps from the live server-only run, device TTFT line and decode speed "
        "from the live device-only run (when both ran).",
        "",
        table(sbs, cols, markdown=True),
        "",
        "Why they differ:",
        "",
        *[f"- {e}" for e in compare.EXPLANATIONS],
        "",
    ]
    print(table(sbs, cols))
    print()
    return sbs, "\n".join(text)


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms"
