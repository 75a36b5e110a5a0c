"""`disco demo`: the whole testbed end to end, DiSCo against its baselines, in one command.

1. Takes a slice of the shipped Azure conversation trace, thinned to a rate this machine can
   serve, and builds real prompts of the trace's lengths and output lengths (capped where the real
   small device model needs it).
2. Starts the testbed through the runtime (``Testbed.start``): local Ray, the server replicas
   behind Ray Serve (on CPU: emulated GPU-class replicas that run the continuous-batching model of
   a server preset in real time, so their queue grows with the load the devices send; vLLM where a
   CUDA GPU and vLLM are present; llama.cpp on request), the scheduler actor, a real llama.cpp
   device agent, and an emulated fleet of the paper's phones with an HTTP front per device.
3. For each policy: a fresh scheduler actor, device agent and fleet (so budgets, online estimates
   and counters start from zero; Ray, Serve and the server replica stay up), then the same
   schedule replayed open-loop by Locust in its own process (``disco.loadgen``).
4. TTFT / TBT / QoE from Locust's client-side records; server cost, device energy and migrations
   from the device side's counters (agent and fleet metrics); budget used from the outcomes the
   devices reported to the scheduler (its ledger).
5. Prints the comparison table, writes DIR/summary.json, plots (each replica's queue and running
   batch over time per policy among them), and the causal simulator's prediction for the same
   schedule, preset, replicas and seed next to the measurement (DIR/sim_vs_live.md); shuts
   everything down.

``--sweep`` (``run_sweep``) answers the capacity question instead: on the same testbed, for each
offered rate and each policy (fresh device side each time, the same budget), one run into
``DIR/<policy>/rate-<r>/`` with the SLO's attainment and goodput and the warm-up left out; then
every policy's capacity curve on one figure (``DIR/sweep.png``: TTFT P99 and goodput against the
offered load) and every row in ``DIR/sweep.json`` (``disco.loadgen.sweep``'s keys).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from disco.cluster.commands import report_hook
from disco.cluster.errors import CliError

DEFAULT_POLICIES = "disco,disco:nomig,server-only,device-only,race,random,length"
QUICK_POLICIES = "disco,disco:nomig,device-only,random"
SWEEP_POLICIES = "disco,server-only,length,random,race"
QUICK_SWEEP_POLICIES = "disco,server-only,length"
NO_MIGRATION = ":nomig"  # a policy run with migration off (same policy, same budget)


@dataclass(frozen=True, slots=True)
class DemoSize:
    """How much load: ``--quick`` stays under 5 minutes on 2 cores with >= 150 requests for each
    of its four policies; the full run sends >= 600 per policy."""

    duration_s: float  # replayed trace time per policy
    rate: float  # requests/s after thinning the trace
    devices: int  # emulated devices (plus the one real llama.cpp agent)
    max_tokens: int  # cap on the trace's output lengths (the real small model's context)
    max_prompt_tokens: int
    prompt_scale: float = 1.0  # the trace's own prompt lengths


# Sized on this 2-core machine (bench/results/demo.md): Ray Serve streams ~1.5-2k chunks/s here,
# so the token rate stays well under that. Two emulated replicas of the demo preset at ~3
# requests/s of Azure conversation prompts keep the server's queue busy: in the causal simulator
# server-only's mean TTFT is ~7 s at 3/s over 200 s (0.7 s at 2/s), without the unbounded backlog
# of 3.5/s; the quick run's 42 s at 3.6/s fills the replicas' KV caches without running away.
QUICK = DemoSize(duration_s=42.0, rate=3.6, devices=12, max_tokens=128, max_prompt_tokens=1536)
FULL = DemoSize(duration_s=200.0, rate=3.0, devices=24, max_tokens=256, max_prompt_tokens=1536)


@dataclass(frozen=True, slots=True)
class SweepSize:
    """``disco demo --sweep``: the offered rates (requests/s, Poisson arrivals with the
    trace's prompt and output lengths), the seconds of sending per point and the warm-up left
    out of each. ``--quick`` stays under 10 minutes on 2 cores (measured:
    bench/results/capacity.md)."""

    rates: tuple[float, ...]
    duration_s: float
    warmup_s: float


QUICK_SWEEP = SweepSize(rates=(1.0, 3.0, 5.0), duration_s=30.0, warmup_s=5.0)
FULL_SWEEP = SweepSize(rates=(1.0, 2.0, 3.0, 4.0, 5.0), duration_s=60.0, warmup_s=10.0)
SWEEP_SLO = "ttft=2s,tbt=1s"  # an interactive chat's patience, on this machine's devices
DEMO_PRESET = "llama3-8b-a10g"  # see scheduler/presets.py for every number's source
DEMO_REPLICAS = 2
PAPER_DEVICES = ("xiaomi14-qwen0.5b", "pixel7pro-bloom1.1b")  # the fleet, cycled
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
    p.add_argument("--policies",
                   help=f"NAME or NAME{NO_MIGRATION} (migration off); default: {DEFAULT_POLICIES} "
                   f"(--quick: {QUICK_POLICIES})")  # fmt: skip
    p.add_argument("--budget", type=float, default=0.3, help="budget ratio b in [0, 1]")
    p.add_argument("--regime", choices=("server", "device"), default="device",
                   help="which endpoint the budget constrains (default: device: DiSCo-D hedges the "
                   "self-hosted server's queueing tail with the device)")  # fmt: skip
    p.add_argument("--duration", type=float, help="trace seconds replayed per policy")
    p.add_argument("--rate", type=float, help="requests/s (the trace slice is thinned to it)")
    p.add_argument("--devices", type=int, help="emulated devices besides the real one")
    p.add_argument("--start", type=float, default=600.0, help="trace offset of the slice, s")
    p.add_argument("--server-engine", choices=("auto", "llamacpp", "vllm", "emulated"),
                   default="auto", help="auto: vllm with a CUDA GPU, else emulated (the "
                   "continuous-batching model of --server-preset in real time)")  # fmt: skip
    p.add_argument("--server-preset", default=DEMO_PRESET,
                   help=f"server preset of the emulated replicas (default {DEMO_PRESET}; "
                   "disco sim --list-server-presets)")  # fmt: skip
    p.add_argument("--replicas", type=int, default=DEMO_REPLICAS,
                   help=f"server replicas (default {DEMO_REPLICAS})")  # fmt: skip
    p.add_argument("--no-agent", action="store_true", help="no real llama.cpp device agent")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("capacity sweep (--sweep)")
    g.add_argument("--sweep", action="store_true",
                   help="the capacity curve of each policy at the same budget: one run per "
                   "policy and offered rate (Poisson arrivals given their count, the trace's "
                   "lengths), DIR/"
                   "sweep.json and DIR/sweep.png (TTFT P99 and goodput vs offered load, every "
                   f"policy); --quick: {QUICK_SWEEP_POLICIES} at {_csv(QUICK_SWEEP.rates)}/s, "
                   f"{QUICK_SWEEP.duration_s:g} s each (< 10 min on 2 cores)")  # fmt: skip
    g.add_argument("--rates", metavar="R,R,...",
                   help=f"--sweep: requests/s (default {_csv(FULL_SWEEP.rates)}; --quick: "
                   f"{_csv(QUICK_SWEEP.rates)}); --duration: seconds per point")  # fmt: skip
    g.add_argument("--slo", metavar="ttft=..,tbt=..,tpot=..",
                   help=f"per-request SLO for attainment and goodput (--sweep default: "
                   f"{SWEEP_SLO})")  # fmt: skip
    g.add_argument("--warmup", type=float, metavar="S",
                   help="leave out requests due in each run's first S seconds (--sweep default: "
                   f"{QUICK_SWEEP.warmup_s:g}, full {FULL_SWEEP.warmup_s:g})")  # fmt: skip
    g.add_argument("--cooldown", type=float, default=0.0, metavar="S",
                   help="leave out requests due in each run's last S seconds")  # fmt: skip
    report_hook.attach(p, run)  # DIR/report.html (and each policy's) after the run


# ---- plan ----------------------------------------------------------------------------------------


def _size(args: argparse.Namespace) -> DemoSize:
    s = QUICK if args.quick else FULL
    return replace(
        s,
        duration_s=args.duration if args.duration is not None else s.duration_s,
        rate=args.rate if args.rate is not None else s.rate,
        devices=args.devices if args.devices is not None else s.devices,
    )


def _default_policies(args: argparse.Namespace) -> str:
    if args.sweep:
        return QUICK_SWEEP_POLICIES if args.quick else SWEEP_POLICIES
    return QUICK_POLICIES if args.quick else DEFAULT_POLICIES


def _measure_plan(args: argparse.Namespace, size: DemoSize):
    """The sweep's size (None without --sweep), the SLO and the warm-up/cool-down, checked
    before anything starts."""
    from disco.loadgen.phases import Phases
    from disco.loadgen.slo import SloError, parse_slo
    from disco.loadgen.sweep import parse_points

    if args.rates is not None and not args.sweep:
        raise CliError("--rates sets the rates of --sweep: add --sweep")
    sweep = None
    if args.sweep:
        base = QUICK_SWEEP if args.quick else FULL_SWEEP
        rates = base.rates
        if args.rates is not None:
            try:
                rates = tuple(p.value for p in parse_points("rate", args.rates))
            except ValueError as e:
                raise CliError(str(e)) from None
        if args.rate is not None:
            raise CliError("--sweep runs every rate of --rates: drop --rate")
        sweep = SweepSize(
            rates=rates,
            duration_s=args.duration if args.duration is not None else base.duration_s,
            warmup_s=args.warmup if args.warmup is not None else base.warmup_s,
        )
    try:
        text = args.slo if args.slo is not None else (SWEEP_SLO if args.sweep else None)
        slo = parse_slo(text) if text is not None else None
        warmup = sweep.warmup_s if sweep is not None else (args.warmup or 0.0)
        phases = Phases(warmup, args.cooldown)
        phases.check(sweep.duration_s if sweep is not None else size.duration_s)
    except (SloError, ValueError) as e:
        raise CliError(str(e)) from None
    return sweep, slo, phases


def _policies(spec: str) -> list[str]:
    from disco.cluster.resolve import check_live_policy, policy_names

    names = [p.strip() for p in spec.split(",") if p.strip()]
    known = policy_names()
    bad = [p for p in names if p.removesuffix(NO_MIGRATION) not in known]
    if not names or bad:
        raise CliError(f"unknown policy {', '.join(bad) or '(none)'} (known: {', '.join(known)})")
    if len(set(names)) != len(names):
        raise CliError("--policies lists a policy twice")
    for name in names:  # every policy runs live here, not only in the simulation beside it
        check_live_policy(name.removesuffix(NO_MIGRATION))
    return names


def split_policy(label: str) -> tuple[str, bool]:
    """``disco:nomig`` -> ("disco", False): the policy and whether migration is on."""
    return label.removesuffix(NO_MIGRATION), not label.endswith(NO_MIGRATION)


def _server_engine(choice: str) -> str:
    from disco.cluster.gpu import has_cuda_gpu

    if choice != "auto":
        return choice
    if has_cuda_gpu():
        try:
            import vllm  # noqa: F401
        except ImportError:
            return "emulated"
        return "vllm"
    return "emulated"


def testbed_config(
    size: DemoSize, policy: str, budget: float, regime: str, engine: str, agent: bool, seed: int,
    preset: str = DEMO_PRESET, replicas: int = DEMO_REPLICAS,
) -> Any:  # fmt: skip
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

    server_profile = f"preset:{preset}"  # the load-free prior the policies start from
    if engine == "llamacpp":
        server_profile = "preset:llamacpp-gemma3-270m-cpu1"  # its n_threads: 1
        server = ServerConfig(
            engine="llamacpp", num_cpus=1.0, http=HttpConfig(port=0), num_replicas=replicas,
            engine_kwargs={"model": SERVER_MODEL, "kind": "server", "n_threads": 1, "n_ctx": 2048},
        )  # fmt: skip
    elif engine == "vllm":
        from disco.device_agents.models import resolve_model

        server = ServerConfig(
            engine="vllm", num_cpus=1.0, num_gpus=1.0, http=HttpConfig(port=0),
            num_replicas=replicas,
            engine_kwargs={"model": str(resolve_model(SERVER_MODEL))},
        )  # fmt: skip
    else:
        server = ServerConfig(
            engine="emulated", num_cpus=0.1, http=HttpConfig(port=0), num_replicas=replicas,
            engine_kwargs={"preset": preset, "seed": seed},
            # Far above what a replica batches (max_num_seqs): queueing happens in the
            # replica's own scheduler, as in vLLM, not in Serve's router.
            max_ongoing_requests=1024,
        )  # fmt: skip
    return TestbedConfig(
        ray=RayConfig(include_dashboard=False),  # Ray itself is started by _start_ray
        server=server,
        scheduler=SchedulerConfig(
            policy=split_policy(policy)[0],
            migration=split_policy(policy)[1],
            budget=budget,
            regime=regime,
            seed=seed,
            server_profile=server_profile,
            checkpoint="none",
            # The demo sends ~30-150 requests per policy: re-estimate often enough to adapt.
            window=SCHED_WINDOW,
            recompute_every=SCHED_RECOMPUTE,
        ),  # fmt: skip
        # The demo starts its own fleet (with an HTTP front) from this section.
        fleet=FleetConfig(devices=0, profiles=list(PAPER_DEVICES), seed=seed),
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
            "completed", "failed", "planner_errors", "planner_fallbacks")  # fmt: skip
    tot = {k: sum(p.get(k, 0) for p in parts) for k in keys}
    stats = ray.get(tb.scheduler.stats.remote(), timeout=30)
    tot["budget_used"] = stats.get("spent_ratio")
    tot["ledger"] = stats.get("ledger")
    tot["plans"] = stats.get("plans")
    tot["plans_after_fit"] = stats.get("plans_after_fit")
    tot["plans_not_device_only"] = stats.get("plans_not_device_only")
    return tot


# ---- run -----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from disco.loadgen import arrivals as arr
    from disco.loadgen.replay import ReplayOptions, prepare
    from disco.scheduler.traces import TraceFormatError, default_trace_path, load_trace

    started = time.monotonic()
    if not 0.0 <= args.budget <= 1.0:
        raise CliError(f"--budget must be in [0, 1], got {args.budget}")
    policies = _policies(args.policies or _default_policies(args))
    size = _size(args)
    sweep, slo, phases = _measure_plan(args, size)
    if args.replicas < 1:
        raise CliError(f"--replicas must be >= 1, got {args.replicas}")
    try:
        from disco.scheduler.presets import load_preset

        preset = load_preset(args.server_preset)
    except ValueError as e:
        raise CliError(str(e)) from None
    if size.duration_s <= 0 or size.rate <= 0 or size.devices < 0:
        raise CliError("--duration and --rate must be > 0, --devices >= 0")
    if args.no_agent and size.devices == 0:
        raise CliError("no device to send to: drop --no-agent or give --devices > 0")
    engine = _server_engine(args.server_engine)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if sweep is not None:
        return run_sweep(args, policies, size, sweep, slo, phases, engine, preset, out, started)

    server_desc = (f"{args.replicas} x emulated {preset.name}" if engine == "emulated"
                   else f"{args.replicas} x {engine}")  # fmt: skip
    say(f"{len(policies)} policies ({', '.join(policies)}), budget {args.budget:g} "
        f"({args.regime}-constrained), server {server_desc}, "
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
                         request_timeout_s=60.0, nice=LOCUST_NICE, run_s=size.duration_s,
                         phases=phases, slo=slo)  # fmt: skip
    placeholders = [f"http://target-{i}" for i in range(n_targets)]
    say(f"trace slice: {len(arrivals)} requests over {size.duration_s:g} s of the Azure "
        f"conversation trace; building prompts from real text...")  # fmt: skip
    reqs = prepare(arrivals, placeholders, opts)

    cfg = testbed_config(size, policies[0], args.budget, args.regime, engine,
                         not args.no_agent, args.seed, preset.name, args.replicas)  # fmt: skip
    rows, runs, devices_seen, replica_series = _run_policies(
        cfg, policies, reqs, placeholders, opts, size, out
    )
    _report(rows, runs, reqs, policies, args, size, engine, out, devices_seen, preset,
            replica_series)  # fmt: skip
    say(f"done in {time.monotonic() - started:.0f} s; results in {out}/")
    return 130 if any(r.get("interrupted") for r in rows) else 0


def _start_testbed(cfg, size):
    """Local Ray, the server replicas and the scheduler (no devices yet), and the fleet config
    each policy's run restarts: one fleet actor with an HTTP front for all emulated devices."""
    from disco.cluster.runtime import Testbed

    t = time.monotonic()
    say("starting the testbed (local Ray, Serve server replicas); ~20-40 s...")
    _start_ray(cfg)
    try:
        tb = Testbed.start(replace(cfg, agent=replace(cfg.agent, enabled=False)))
    except BaseException:
        _stop_ray()
        raise
    say(f"testbed up in {time.monotonic() - t:.0f} s: server {tb.server_url}")
    return tb, replace(cfg.fleet, devices=size.devices, devices_per_actor=max(size.devices, 1))


def _stop_testbed(tb) -> None:
    tb.stop_device_side()  # a no-op unless a run raised
    say("shutting the testbed down...")
    tb.shutdown()
    _stop_ray()


def _run_policies(cfg, policies, reqs, placeholders, opts, size, out):
    from disco.loadgen.phases import measured
    from disco.loadgen.replay import replay

    rows: list[dict[str, Any]] = []
    runs: dict[str, list] = {}
    seen: dict[str, Any] = {}
    series: dict[str, dict[str, list]] = {}
    tb, fleet = _start_testbed(cfg, size)
    try:
        for i, policy in enumerate(policies):
            t = time.monotonic()
            # A fresh scheduler actor, agent and fleet per policy (the runtime's own scheduler
            # actor is replaced by the first): budgets, estimates and counters start from zero.
            name, mig = split_policy(policy)
            tb.restart_device_side(replace(cfg.scheduler, policy=name, migration=mig),
                                   fleet=fleet, agent=cfg.agent, fleet_http=True)  # fmt: skip
            t_policy = time.monotonic()
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
            runs[policy] = measured(res.records)  # warm-up and cool-down stay out of the plots
            states: dict[str, Any] = {}
            series[policy] = replica_samples(tb.server_handle, since=t_policy, states=states)
            dev["replicas"] = states
            rows.append(_row(policy, cfg.scheduler.budget, res.summary, dev, res.run.interrupted))
            s = res.summary
            say(f"[{i + 1}/{len(policies)}] {policy}: {s['requests']} requests, {s['errors']} errors, "
                f"TTFT P50 {_ms(s['ttft_p50_s'])} P99 {_ms(s['ttft_p99_s'])}")  # fmt: skip
            tb.stop_device_side()
            if res.run.interrupted:
                say("interrupted: skipping the remaining policies")
                break
    finally:
        _stop_testbed(tb)
    return rows, runs, seen, series


def run_sweep(args, policies, size, sweep, slo, phases, engine, preset, out, started) -> int:
    """``disco demo --sweep``: for each offered rate (Poisson arrivals given their count, the
    trace's lengths; the same schedule for every policy) and each policy, a fresh scheduler,
    agent and fleet (budget and estimates from zero) and one run into
    ``DIR/<policy>/rate-<r>/``; then every policy's capacity curve on one figure
    (``DIR/sweep.png``) and their rows in ``DIR/sweep.json``."""
    from disco.cluster.provenance import provenance
    from disco.loadgen import arrivals as arr
    from disco.loadgen.replay import ReplayOptions, prepare, replay
    from disco.loadgen.sweep import Point, point_info, row, sweep_table, write_sweep
    from disco.scheduler.traces import default_trace_path, load_trace

    n_targets = size.devices + (0 if args.no_agent else 1)
    placeholders = [f"http://target-{i}" for i in range(n_targets)]
    opts = ReplayOptions(max_tokens=size.max_tokens, max_prompt_tokens=size.max_prompt_tokens,
                         prompt_scale=size.prompt_scale, seed=args.seed, request_timeout_s=60.0,
                         nice=LOCUST_NICE, run_s=sweep.duration_s, phases=phases, slo=slo)  # fmt: skip
    server_desc = (f"{args.replicas} x emulated {preset.name}" if engine == "emulated"
                   else f"{args.replicas} x {engine}")  # fmt: skip
    say(f"capacity sweep: {len(policies)} policies ({', '.join(policies)}) x rates "
        f"{_csv(sweep.rates)}/s, {sweep.duration_s:g} s each ({sweep.warmup_s:g} s warm-up left "
        f"out), budget {args.budget:g} ({args.regime}-constrained), server {server_desc}, "
        f"{'1 real llama.cpp device + ' if not args.no_agent else ''}{size.devices} emulated; "
        f"SLO {slo}")  # fmt: skip
    lengths = arr.TraceLengths.of(load_trace(default_trace_path()))
    schedules = {}
    for rate in sweep.rates:
        got = arr.poisson_given_count(rate, lengths, sweep.duration_s, seed=args.seed)
        schedules[Point("rate", rate)] = prepare(got, placeholders, opts)
    each = ", ".join(f"{len(r)} requests at {p.value:g}/s" for p, r in schedules.items())
    say(f"schedules: {each}")
    cfg = testbed_config(size, policies[0], args.budget, args.regime, engine,
                         not args.no_agent, args.seed, preset.name, args.replicas)  # fmt: skip
    prov = provenance(args)
    rows: list[dict[str, Any]] = []
    infos: list[dict[str, Any]] = []
    interrupted = False
    n_runs, k = len(schedules) * len(policies), 0
    tb, fleet = _start_testbed(cfg, size)
    try:
        for point, reqs in schedules.items():  # every policy at one rate, then the next rate
            for policy in policies:
                k += 1
                t = time.monotonic()
                name, mig = split_policy(policy)
                tb.restart_device_side(replace(cfg.scheduler, policy=name, migration=mig),
                                       fleet=fleet, agent=cfg.agent, fleet_http=True)  # fmt: skip
                mapping = dict(zip(placeholders, tb.device_urls, strict=True))
                mine = [replace(r, target=mapping[r.target]) for r in reqs]
                say(f"[{k}/{n_runs}] {policy} at {point.value:g}/s: devices up in "
                    f"{time.monotonic() - t:.0f} s; {len(mine)} requests...")  # fmt: skip
                popts = replace(opts, label=f"{policy} {point.name}",
                                meta={"policy": policy, "sweep_point": point.name, **prov})  # fmt: skip
                folder = out / policy / point.name
                res = replay(mine, folder, popts, say=lambda s: print("       " + s, flush=True))
                try:
                    dev = device_totals(tb)
                except Exception as e:  # noqa: BLE001 - e.g. actors gone after a Ctrl-C
                    say(f"device-side counters unavailable: {e!r}")
                    dev = {}
                rows.append(row(policy, point, res.summary, costs=dev))
                info = point_info(policy, point, res.summary, folder)
                info["device_side"] = {k: dev.get(k) for k in (
                    "server_cost_usd", "device_energy_j", "migrations", "budget_used", "plans",
                    "plans_after_fit", "plans_not_device_only", "failed")}  # fmt: skip
                infos.append(info)
                r = rows[-1]
                say(f"[{k}/{n_runs}] {policy} at {point.value:g}/s: {r['requests']} measured, "
                    f"{r['errors']} errors, TTFT P99 {_ms(r['ttft_p99'])}, SLO met "
                    f"{_pct(r['slo_attainment'])}, goodput {_num(r['goodput'])}/s, budget used "
                    f"{_num(r['budget_used'])} ({time.monotonic() - t:.0f} s)")  # fmt: skip
                tb.stop_device_side()
                if res.run.interrupted:
                    interrupted = True
                    break
            if interrupted:
                say("interrupted: skipping the remaining runs")
                break
    finally:
        _stop_testbed(tb)
    wall = time.monotonic() - started
    config = {
        "policies": policies, "rates": list(sweep.rates), "duration_s": sweep.duration_s,
        "warmup_s": phases.warmup_s, "cooldown_s": phases.cooldown_s, "budget": args.budget,
        "regime": args.regime, "quick": bool(args.quick), "server_engine": engine,
        "server_preset": preset.name, "replicas": args.replicas, "devices": size.devices,
        "max_tokens": size.max_tokens, "max_prompt_tokens": size.max_prompt_tokens,
        "device_profiles": list(PAPER_DEVICES), "real_device_agent": not args.no_agent,
        "arrivals": "poisson, given its count (rate x duration)",
        "lengths": "azure_llm_2023_conv (shipped), resampled",
        "wall_s": round(wall, 1), "interrupted": interrupted,
    }  # fmt: skip
    if rows:
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        write_sweep(out, "rate", rows, infos, slo=slo.to_dict() if slo else None,
                    meta={"config": config, "date": date, **prov},
                    title=f"Capacity per policy at budget {args.budget:g} ({args.regime}-"
                    f"constrained), {server_desc}; SLO {slo}")  # fmt: skip
        print()
        print(sweep_table(rows, "rate"))
    say(f"done in {wall:.0f} s; results in {out}/ (sweep.json, sweep.png, sweep.md)")
    return 130 if interrupted else 0


def replica_samples(
    handle: Any, since: float, states: dict[str, Any], calls: int = 24
) -> dict[str, list]:
    """Each replica's (t, queue, running, kv) samples since ``since`` (monotonic clock; the demo
    runs on one machine). Serve routes each call to one replica, so the same call is made a
    few times and the answers are keyed by replica id (two replicas are both reached with
    probability 1 - 2^-23 in 24 calls). ``states`` receives each replica's counters (cumulative
    since the replica started: the emulation's lateness among them)."""
    out: dict[str, list] = {}
    try:
        for _ in range(calls):
            got = handle.engine_samples.remote().result(timeout_s=30)
            rid = got.get("replica", "?") if isinstance(got, dict) else "?"
            samples = got.get("samples", []) if isinstance(got, dict) else []
            out[rid] = [(t - since, q, r, kv) for t, q, r, kv in samples if t >= since]
            state = got.get("state") if isinstance(got, dict) else None
            if state:
                states[rid] = state
    except Exception as e:  # noqa: BLE001 - a plot is not worth failing the demo
        say(f"replica samples unavailable: {e!r}")
    return out


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


ROW_KEYS = ("policy", "migration", "budget", "requests", "errors", "ttft_mean", "ttft_p50",
            "ttft_p99", "tbt_p99", "qoe_mean", "server_cost", "device_energy_j", "budget_used",
            "migrations")  # fmt: skip
SIM_KEYS = ("policy", "migration", "ttft_mean", "ttft_p99", "budget_used", "server_cost",
            "migrations")  # fmt: skip


def _row(policy: str, budget: float, s: dict, dev: dict, interrupted: bool) -> dict[str, Any]:
    """One policy's row: latency from the load run's summary (``disco load``'s keys, units in
    the name), cost and budget from the device side. The row keeps the simulator's key names
    (seconds, USD) so that live and simulated rows compare key by key."""
    return {
        "policy": policy, "migration": split_policy(policy)[1], "budget": budget,
        "requests": s["requests"], "errors": s["errors"],
        "ttft_mean": s["ttft_mean_s"], "ttft_p50": s["ttft_p50_s"], "ttft_p99": s["ttft_p99_s"],
        "tbt_p99": s["tbt_p99_s"], "qoe_mean": s["qoe_mean"],
        "server_cost": dev.get("server_cost_usd"), "device_energy_j": dev.get("device_energy_j"),
        "budget_used": dev.get("budget_used"), "migrations": dev.get("migrations"),
        "interrupted": interrupted,
    }  # fmt: skip


def _report(rows, runs, reqs, policies, args, size, engine, out, devices_seen, preset,
            series) -> None:  # fmt: skip
    from disco.cluster.provenance import commit, machine, provenance
    from disco.loadgen.report import table, write_json, write_plots

    if not rows:
        return
    cols = list(ROW_KEYS)
    print()
    print(table(rows, cols))
    print()
    measured = {p: recs for p, recs in runs.items() if recs}
    if measured:
        from disco.loadgen.slo import parse_slo

        write_plots(measured, out, slo=parse_slo(args.slo) if args.slo else None)
    if any(series.values()):
        plot_replicas(series, out / "replicas.png")
    simulated = _simulated_preset(preset, engine)
    sim_rows = simulate_schedule(reqs, policies, args, simulated, engine, not args.no_agent)
    sim_md = sim_vs_live_md(rows, sim_rows, args, simulated, engine, len(reqs))
    last = next((d.get("replicas") for d in reversed(list(devices_seen.values()))
                 if d.get("replicas")), None)  # fmt: skip
    if last:
        share = [st.get("late_share", 0.0) for st in last.values()]
        worst = max(st.get("late_max_ms", 0.0) for st in last.values())
        sim_md += (
            f"\nEmulation fidelity: over the whole run the replicas' batch clocks ran "
            f"{', '.join(f'{100 * x:.1f} %' for x in share)} behind the model's step times "
            f"(event-loop lag on this machine; worst single step {worst:.0f} ms late). The "
            "simulator has no such lag.\n"
        )
    print(table(sim_rows, list(SIM_KEYS)))
    (out / "sim_vs_live.md").write_text(sim_md)
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cfg = {
        "policies": policies, "budget": args.budget, "regime": args.regime,
        "quick": bool(args.quick), "server_engine": engine, "server_preset": preset.name,
        "replicas": args.replicas, "size": asdict(size), "device_profiles": list(PAPER_DEVICES),
        "trace": "azure_llm_2023_conv (shipped)", "trace_start_s": args.start, "seed": args.seed,
    }  # fmt: skip
    write_json(out / "summary.json", {
        "rows": [{k: r[k] for k in ROW_KEYS} for r in rows], "sim_rows": sim_rows, "config": cfg,
        "device_side": devices_seen, "date": date, **provenance(args),
    })  # fmt: skip
    server_desc = (
        f"{args.replicas} x emulated `{preset.name}` ({preset.model} on {preset.hardware}; the "
        "continuous-batching model in real time)" if engine == "emulated"
        else f"{args.replicas} x {engine} ({SERVER_MODEL})"
    )  # fmt: skip
    md = [
        f"# `disco demo{' --quick' if args.quick else ''}`",
        "",
        f"{date}, {machine()}, commit {commit()}. Server: {server_desc}; devices: "
        f"{'one real llama.cpp agent (' + DEVICE_MODEL + ') + ' if not args.no_agent else ''}"
        f"{size.devices} emulated ({', '.join(PAPER_DEVICES)}, cycled); {len(reqs)} requests per "
        f"policy from {size.duration_s:g} s of the Azure conversation trace (offset "
        f"{args.start:g} s) thinned to {size.rate:g}/s, the trace's prompt lengths (cap "
        f"{size.max_prompt_tokens}) and output lengths (cap {size.max_tokens}); budget "
        f"{args.budget:g}, {args.regime}-constrained; seed {args.seed}.",
        "TTFT/TBT/QoE: client side (Locust); server cost, device energy, migrations: the devices' "
        "counters; budget used: the devices' outcome reports, as the scheduler's ledger sums them.",
        "",
        table(rows, cols, markdown=True),
        "",
        "![replicas](replicas.png)" if any(series.values()) else "",
        "",
        sim_md.replace("# Simulator", "## Simulator", 1),
    ]  # fmt: skip
    (out / "demo.md").write_text("\n".join(md))


def plot_replicas(series: dict[str, dict[str, list]], path: Path) -> None:
    """One panel per policy: each replica's waiting queue and running batch over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pols = [p for p, s in series.items() if s]
    fig, axes = plt.subplots(len(pols), 1, figsize=(9, 1.9 * len(pols) + 0.6), sharex=True,
                             squeeze=False)  # fmt: skip
    for ax, pol in zip(axes[:, 0], pols, strict=True):
        for k, (rid, samples) in enumerate(sorted(series[pol].items())):
            if not samples:
                continue
            t, q, r, _ = zip(*samples, strict=True)
            ax.step(t, r, where="post", color=f"C{k}", lw=1, label=f"replica {rid[:4]} running")
            ax.step(t, q, where="post", color=f"C{k}", lw=1, ls="--", label=f"{rid[:4]} waiting")
        ax.set_ylabel("sequences")
        ax.set_title(pol, fontsize=9, loc="left")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=4, loc="upper right")
    axes[-1, 0].set_xlabel("seconds since the policy's run started")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _simulated_preset(preset: Any, engine: str) -> Any:
    """The preset that describes the server that ran: the emulated one's own, the llama.cpp
    replica's fitted one, none for vLLM (fit one from it with disco profile --fit-batching)."""
    from disco.scheduler.presets import load_preset

    if engine == "emulated":
        return preset
    if engine == "llamacpp":
        return load_preset("llamacpp-gemma3-270m-cpu1")  # the replica's 1 thread
    return None


def simulate_schedule(reqs, policies, args, preset, engine, agent) -> list[dict[str, Any]]:
    """The causal simulator on the demo's own schedule, preset, replicas, devices and seed."""
    from disco.scheduler.causal_sim import CausalSettings, run_causal
    from disco.scheduler.migration import MigrationConfig
    from disco.scheduler.policies import PolicyConfig, make_policy
    from disco.scheduler.presets import preset_profile
    from disco.scheduler.profiles import load_profile
    from disco.scheduler.traces import TraceRecord
    from disco.scheduler.types import Regime

    if preset is None:
        return []  # no preset describes a real GPU engine here: fit one (disco profile)
    from disco.scheduler.tokens import estimate_tokens

    profiles = [load_profile(p, "device") for p in PAPER_DEVICES]
    real = load_profile(str(_data("profile-llamacpp-smollm2-135m.json")), "device")
    devices, records = [], []
    t0 = min(r.due for r in reqs)
    for r in reqs:
        j = int(r.target.rsplit("-", 1)[1])  # the placeholder's index: agent first, then fleet
        is_agent = agent and j == 0
        devices.append(real if is_agent else profiles[(j - (1 if agent else 0)) % len(profiles)])
        # The prompt length as that device counts it (and tells the server): the real agent
        # tokenizes (the schedule's count uses the same vocabulary), emulated phones estimate.
        plen = r.prompt_tokens if is_agent else max(1, estimate_tokens(r.prompt))
        records.append(TraceRecord(r.due - t0, plen, r.max_tokens))
    regime = Regime(args.regime)
    rtt = 0.05  # the fleet's network default (NetworkConfig.rtt_ms)
    settings = CausalSettings(replicas=args.replicas, rtt_s=rtt, seed=args.seed,
                              migration=MigrationConfig(rtt_s=rtt))  # fmt: skip
    rows = []
    for label in policies:
        name, mig = split_policy(label)
        cfg = PolicyConfig(regime=regime, budget=args.budget, migration=mig, window=SCHED_WINDOW,
                           recompute_every=SCHED_RECOMPUTE, seed=args.seed)  # fmt: skip
        pol = make_policy(name, cfg, preset_profile(preset), profiles[0])
        res = run_causal(pol, records, preset, profiles[0], settings, regime, devices=devices)
        row = {"policy": label, "migration": mig}
        row.update({k: res.summary.get(k) for k in SIM_KEYS if k not in row})
        rows.append(row)
    return rows


def sim_vs_live_md(rows, sim_rows, args, preset, engine, n) -> str:
    from disco.loadgen.report import table

    live = {r["policy"]: r for r in rows}
    if preset is None:
        return f"# Simulator prediction vs live measurement\n\nNo preset describes the {engine} engine: nothing simulated (fit one with disco profile --fit-batching).\n"
    lines = [
        "# Simulator prediction vs live measurement",
        "",
        f"The causal simulator (scheduler/causal_sim.py) on the same schedule ({n} requests), "
        f"preset ({preset.name}), replicas ({args.replicas}), devices and seed; the policies "
        f"learn from outcomes as they complete. Goal: mean and P99 TTFT within 15 %, budget used "
        "within 0.03.",
        "",
    ]
    out = []
    for s in sim_rows:
        lv = live.get(s["policy"], {})
        r = {"policy": s["policy"]}
        for k in ("ttft_mean", "ttft_p99"):
            a, b = lv.get(k), s.get(k)
            r[f"live {k} s"] = None if a is None else round(a, 3)
            r[f"sim {k} s"] = None if b is None else round(b, 3)
            r[f"{k} err %"] = None if not a or b is None else round(100 * (b - a) / a, 1)
        for side, v in (("live", lv.get("budget_used")), ("sim", s.get("budget_used"))):
            r[f"{side} budget"] = None if v is None else round(v, 3)
        r["live migr."], r["sim migr."] = lv.get("migrations"), s.get("migrations")
        out.append(r)
    lines.append(table(out, list(out[0]), markdown=True))
    return "\n".join(lines) + "\n"


def _data(name: str) -> Path:
    from importlib import resources

    return Path(str(resources.files("disco.scheduler.data") / name))


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms"


def _csv(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f} %"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"
