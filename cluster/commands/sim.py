"""`disco sim`: virtual-time budget sweeps of the dispatch policies over a request trace.

Replays the trace (Azure LLM CSV, BurstGPT CSV or Mooncake JSONL; the shipped Azure conversation
trace by default) through every policy at every budget, with and without migration, and writes
DIR/sim.json, DIR/sim.csv and PNG plots. Same seed, same output.
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
    p.add_argument("--server-profile", default="gpt-4o-mini", help="named profile or JSON file")
    p.add_argument("--device-profile", default="xiaomi14-qwen0.5b", help="named profile or JSON file")
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
    from disco.scheduler.policies import POLICIES
    from disco.scheduler.profiles import load_profile
    from disco.scheduler.report import format_table, plot_rows, write_rows
    from disco.scheduler.simulator import SweepSpec, World, sweep
    from disco.scheduler.traces import TraceFormatError, default_trace_path, load_trace
    from disco.scheduler.types import Regime

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
    try:
        server = load_profile(args.server_profile, "server")
        device = load_profile(args.device_profile, "device")
    except ValueError as e:
        raise CliError(str(e)) from None
    trace = Path(args.trace) if args.trace else default_trace_path()
    try:
        records = load_trace(trace, args.limit)
    except TraceFormatError as e:
        raise CliError(str(e)) from None

    regime = Regime(args.regime)
    mig = {"on": (True,), "off": (False,), "both": (False, True)}[args.migration]
    spec = SweepSpec(regime, budgets, policies, mig, args.seed, args.window, args.recompute_every)
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
    }  # fmt: skip
    write_rows(out, rows, meta)
    if not args.no_plots:
        plot_rows(rows, out, f"{trace.name}: {regime.value}-constrained, {server.name} + {device.name}")
    if not args.quiet:
        print(format_table(rows))
        print(f"wrote {out}/sim.json, sim.csv{'' if args.no_plots else ', plots'} "
              f"({time.perf_counter() - t_start:.1f} s)", file=sys.stderr)  # fmt: skip
    return 0
