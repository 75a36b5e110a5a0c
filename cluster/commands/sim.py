"""`disco sim`: virtual-time budget sweeps of the dispatch policies over a request trace.

Replays the trace (Azure LLM CSV, BurstGPT CSV or Mooncake JSONL; the shipped Azure conversation
trace by default) through every policy at every budget, with and without migration, and writes
DIR/sim.json, DIR/sim.csv and PNG plots. Same seed, same output.

Each request has a device of its own unless --users N (with --server-preset): then the trace's
requests go to N devices, each request to one drawn uniformly at random with --seed, and a device
serves --device-slots streams at a time while the others wait in FIFO order; past
--max-device-queue waiting streams, a request planned on the device alone is refused. The rows
then add refused requests and the wait for a device slot (mean, P99).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from disco.cluster.errors import CliError

DEFAULT_POLICIES = "disco,server-only,device-only,race,random,length,oracle"
DEFAULT_BUDGETS = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sim",
        help="virtual-time budget sweeps of the dispatch policies over a trace",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--trace", help="trace file (default: the shipped Azure conversation trace)")
    p.add_argument("--limit", type=int, help="use only the first N requests")
    p.add_argument("--regime", choices=("device", "server"), default="server",
                   help="which endpoint the budget constrains (default: server)")  # fmt: skip
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, help="comma-separated budgets in [0, 1]")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="comma-separated policy names")
    p.add_argument("--migration", choices=("on", "off", "both"), default="both",
                   help="rows with migration on, off or both (default: both)")  # fmt: skip
    p.add_argument("--server-profile", default="gpt-4o-mini",
                   help="API-service profile, named or a JSON file (load-free server TTFT)")
    p.add_argument("--server-preset",
                   help="self-hosted continuous-batching replicas instead of --server-profile: a "
                   "named preset or a JSON file (disco profile --fit-batching); the causal simulator")
    p.add_argument("--replicas", type=int, default=1, help="replicas of --server-preset (default 1)")
    p.add_argument("--rtt-ms", type=float, default=50.0,
                   help="device <-> server round trip with --server-preset (default 50)")
    p.add_argument("--users", type=int,
                   help="with --server-preset: the requests share N devices (each request to one "
                   "drawn uniformly with --seed) that queue their streams (default: each request "
                   "its own device)")  # fmt: skip
    p.add_argument("--device-slots", type=int,
                   help="with --users: streams one device serves at once (default 1, llama.cpp)")
    p.add_argument("--max-device-queue", type=int,
                   help="with --users: refuse a request planned on the device alone while this "
                   "many streams wait for it (default: no limit)")  # fmt: skip
    p.add_argument("--list-server-presets", action="store_true",
                   help="list the named server presets and exit")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="spread a --server-preset sweep's cells over a Ray cluster (local Ray "
                   "without ADDRESS)")  # fmt: skip
    p.add_argument("--device-profile", default="xiaomi14-qwen0.5b", help="named profile or JSON file")
    p.add_argument("--lambda", dest="lambda_usd_per_j", type=float, metavar="USD_PER_J",
                   help="device-energy price in USD per joule (default: the regime's, 5e-5 "
                   "device-constrained, 1e-6 server-constrained; see scheduler/profiles.py)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="random seed (server TTFT draws, random policy)")
    p.add_argument("--window", type=int, default=2000, help="sliding window of online estimates")
    p.add_argument("--recompute-every", type=int, default=100, help="recompute policies every N")
    p.add_argument("--out", default="results/sim", help="output directory (default: results/sim)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress and no table")
    p.set_defaults(run=run)


def parse_budgets(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise CliError(f"--budgets must be comma-separated numbers, got {text!r}") from None
    if not vals:
        raise CliError("--budgets is empty")
    bad = [v for v in vals if not 0.0 <= v <= 1.0]
    if bad:
        raise CliError(f"budgets must be in [0, 1], got {bad[0]:g}")
    return vals


def run(args: argparse.Namespace) -> int:
    from disco.cluster.provenance import provenance
    from disco.scheduler.policies import POLICIES
    from disco.scheduler.profiles import load_profile, regime_lambda, with_lambda
    from disco.scheduler.report import format_table, plot_rows, write_rows
    from disco.scheduler.simulator import SweepSpec, World, sweep
    from disco.scheduler.traces import TraceFormatError, default_trace_path, load_trace
    from disco.scheduler.types import Regime

    if args.list_server_presets:
        return list_presets()
    budgets = parse_budgets(args.budgets)
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    if not policies:
        raise CliError("--policies is empty")
    for name in policies:
        POLICIES.get(name)  # unknown -> UnknownNameError, one line, exit 2
    if args.limit is not None and args.limit <= 0:
        raise CliError(f"--limit must be > 0, got {args.limit}")
    if args.window <= 0 or args.recompute_every <= 0:
        raise CliError("--window and --recompute-every must be > 0")
    if args.replicas < 1:
        raise CliError(f"--replicas must be >= 1, got {args.replicas}")
    if args.rtt_ms < 0:
        raise CliError(f"--rtt-ms must be >= 0, got {args.rtt_ms:g}")
    if args.ray is not None and not args.server_preset:
        raise CliError("--ray spreads a --server-preset sweep; the load-free sweep runs in seconds")
    _check_device_queue(args)
    if args.lambda_usd_per_j is not None and not args.lambda_usd_per_j >= 0:
        raise CliError(f"--lambda must be >= 0 USD/J, got {args.lambda_usd_per_j:g}")
    try:
        server = load_profile(args.server_profile, "server")
        device = load_profile(args.device_profile, "device")
        preset = _preset(args.server_preset) if args.server_preset else None
    except ValueError as e:
        raise CliError(str(e)) from None
    if preset is not None and "oracle" in policies:
        raise CliError("oracle needs each request's server TTFT in advance, which self-hosted "
                       "replicas under load do not have: drop it from --policies with --server-preset")
    trace = Path(args.trace) if args.trace else default_trace_path()
    try:
        records = load_trace(trace, args.limit)
    except TraceFormatError as e:
        raise CliError(str(e)) from None

    regime = Regime(args.regime)
    mig = {"on": (True,), "off": (False,), "both": (False, True)}[args.migration]
    lam = regime_lambda(regime) if args.lambda_usd_per_j is None else args.lambda_usd_per_j
    device = with_lambda(device, lam)
    if preset is not None:
        return _run_causal(args, records, trace, preset, device, regime, budgets, policies, mig)
    spec = SweepSpec(regime, budgets, policies, mig, args.seed, args.window, args.recompute_every,
                     lambda_usd_per_j=lam)  # fmt: skip
    t_start = time.perf_counter()

    def progress(done: int, total: int, what: str) -> None:
        if not args.quiet:
            el = time.perf_counter() - t_start
            print(f"\rsim: {done}/{total} {what:<24} {el:6.1f} s", end="", file=sys.stderr)

    world = World.build(records, server, device, args.seed)
    rows = sweep(world, spec, progress)
    if not args.quiet:
        print(file=sys.stderr)
    out = Path(args.out)
    meta = {
        "trace": trace.name, "requests": len(records), "regime": regime.value,
        "server_profile": server.name, "device_profile": device.name, "seed": args.seed,
        "window": args.window, "recompute_every": args.recompute_every,
        "lambda_usd_per_j": lam, **provenance(args),
    }  # fmt: skip
    write_rows(out, rows, meta)
    if not args.no_plots:
        plot_rows(rows, out, f"{trace.name}: {regime.value}-constrained, {server.name} + {device.name}")
    if not args.quiet:
        print(format_table(rows))
        print(f"wrote {out}/sim.json, sim.csv{'' if args.no_plots else ', plots'} "
              f"({time.perf_counter() - t_start:.1f} s)", file=sys.stderr)  # fmt: skip
    return 0


def _check_device_queue(args: argparse.Namespace) -> None:
    if args.users is None:
        for flag, v in (("--device-slots", args.device_slots),
                        ("--max-device-queue", args.max_device_queue)):  # fmt: skip
            if v is not None:
                raise CliError(f"{flag} needs --users (shared devices)")
        return
    if not args.server_preset:
        raise CliError("--users needs --server-preset (the causal simulator models device queues)")
    if args.users < 1:
        raise CliError(f"--users must be >= 1, got {args.users}")
    if args.device_slots is not None and args.device_slots < 1:
        raise CliError(f"--device-slots must be >= 1, got {args.device_slots}")
    if args.max_device_queue is not None and args.max_device_queue < 0:
        raise CliError(f"--max-device-queue must be >= 0, got {args.max_device_queue}")


def list_presets() -> int:
    from disco.scheduler.presets import SERVER_PRESETS

    for name in SERVER_PRESETS.names():
        p = SERVER_PRESETS.get(name)
        print(f"{name}: {p.model} on {p.hardware}; max_num_seqs {p.max_num_seqs}, "
              f"{p.max_batched_tokens} tokens/step, KV {p.kv_tokens} tokens, "
              f"${p.usd_per_hour:g}/h. Source: {p.source}")  # fmt: skip
    return 0


def _preset(name: str):
    from disco.scheduler.presets import load_preset

    return load_preset(name)


def _run_causal(args, records, trace, preset, device, regime, budgets, policies, mig) -> int:
    from disco.cluster.provenance import provenance
    from disco.scheduler.causal_sim import (
        CAUSAL_ROW_KEYS,
        DEVICE_QUEUE_ROW_KEYS,
        CausalSettings,
        causal_cell,
    )
    from disco.scheduler.migration import MigrationConfig
    from disco.scheduler.presets import preset_profile
    from disco.scheduler.report import DEVICE_QUEUE_COLS, format_table, plot_rows, write_rows
    from disco.scheduler.simulator import ROW_KEYS

    rtt = args.rtt_ms / 1000.0
    shared = args.users is not None
    slots = args.device_slots if args.device_slots is not None else 1
    settings = CausalSettings(replicas=args.replicas, rtt_s=rtt, seed=args.seed,
                              migration=MigrationConfig(rtt_s=rtt), users=args.users,
                              device_slots=slots, max_device_queue=args.max_device_queue)  # fmt: skip
    cells = [(p, b, m) for p in policies for b in budgets for m in mig]
    est = (args.window, args.recompute_every)
    t_start = time.perf_counter()

    def progress(done: int, total: int, what: str) -> None:
        if not args.quiet:
            el = time.perf_counter() - t_start
            print(f"\rsim: {done}/{total} {what:<36} {el:6.1f} s", end="", file=sys.stderr)

    if args.ray is not None:
        rows = _cells_on_ray(args.ray, cells, records, preset, device, regime, settings, est,
                             progress)  # fmt: skip
    else:
        rows = []
        for j, (name, b, m) in enumerate(cells):
            rows.append(causal_cell(records, preset, device, regime, name, b, m, settings, *est))
            progress(j + 1, len(cells), f"{name} b={b:g} migration {'on' if m else 'off'}")
    if not args.quiet:
        print(file=sys.stderr)
    out = Path(args.out)
    meta = {
        "trace": trace.name, "requests": len(records), "regime": regime.value,
        "server_preset": preset.name, "replicas": args.replicas, "rtt_ms": args.rtt_ms,
        "device_profile": device.name, "seed": args.seed, "window": args.window,
        "recompute_every": args.recompute_every, "model": "causal, continuous batching",
        "lambda_usd_per_j": device.lambda_usd_per_j,
        **provenance(args),
    }  # fmt: skip
    keys = CAUSAL_ROW_KEYS
    if shared:
        meta.update(users=args.users, device_assignment="uniform, seeded", device_slots=slots,
                    max_device_queue=args.max_device_queue)  # fmt: skip
        keys += DEVICE_QUEUE_ROW_KEYS
    rows = [{k: r.get(k) for k in keys} for r in rows]
    write_rows(out, rows, meta, (*ROW_KEYS, *DEVICE_QUEUE_ROW_KEYS) if shared else None)
    if not args.no_plots:
        name = preset_profile(preset).name
        plot_rows(rows, out, f"{trace.name}: {regime.value}-constrained, {args.replicas} x "
                             f"{name} + {device.name}")  # fmt: skip
    if not args.quiet:
        print(format_table(rows, DEVICE_QUEUE_COLS if shared else ()))
        print(f"wrote {out}/sim.json, sim.csv{'' if args.no_plots else ', plots'} "
              f"({time.perf_counter() - t_start:.1f} s)", file=sys.stderr)  # fmt: skip
    return 0


def _cells_on_ray(address, cells, records, preset, device, regime, settings, est, progress):
    """One Ray task per cell; the trace and profiles go to the object store once."""
    try:
        import ray
    except ImportError:
        raise CliError("--ray needs Ray: install the project's 'ray' extra") from None
    started_here = not ray.is_initialized()
    if started_here:
        if address == "local":
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    try:
        cell = ray.remote(num_cpus=1)(_ray_cell)
        shared = ray.put((records, preset, device, regime, settings))
        refs = [cell.remote(shared, n, b, m, *est) for n, b, m in cells]
        rows: list[dict] = [None] * len(refs)  # type: ignore[list-item]
        index = {r: j for j, r in enumerate(refs)}
        pending = list(refs)
        done = 0
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            j = index[ready[0]]
            rows[j] = ray.get(ready[0])
            done += 1
            n, b, m = cells[j]
            progress(done, len(cells), f"{n} b={b:g} migration {'on' if m else 'off'}")
        return rows
    finally:
        if started_here:
            ray.shutdown()


def _ray_cell(shared, name: str, budget: float, mig: bool, window: int, recompute: int) -> dict:
    """A sweep cell as a Ray task (``shared``: the trace, preset, device, regime and settings)."""
    from disco.scheduler.causal_sim import causal_cell

    records, preset, device, regime, settings = shared
    return causal_cell(records, preset, device, regime, name, budget, mig, settings, window,
                       recompute)  # fmt: skip
