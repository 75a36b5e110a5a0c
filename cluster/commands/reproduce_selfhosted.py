"""`disco reproduce --self-hosted [PRESET]`: the paper's TTFT table under self-hosted replicas.

Issue 14 item 4: the tail/mean TTFT reduction table of `paper.md`, with the server being N
continuous-batching replicas of a server preset in the causal simulator
(`scheduler/causal_sim.py`), at two load levels (two replica counts per regime at the trace's own
rate), both regimes, both of the paper's devices, on a slice of the Azure conversation trace, beside
a load-free column (the same preset as an API service, the load-free simulator). The API-service
dimension collapses (self-hosted has no list price: the server's cost is replica time x the
preset's $/h). DiSCo is compared against (a) the paper's kind of baselines and (b) `length`, as in
`paper.md`; the replicas' measured load (running batch, waiting queue, KV occupancy) shows which
level is light and which heavy. Writes OUT/paper_selfhosted.md; `paper.md` is left as it is.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from disco.cluster.errors import CliError

from .reproduce import (
    DEVICES,
    FEASIBLE_SLACK,
    MEAN_GAP,
    P99_GAP,
    PAPER_TAIL,
    REGIMES,
    _mean_sd,
    pct,
    pm,
    workload_records,
)

DEFAULT_PRESET = "llama3-8b-a10g"  # the demo's
# Replica counts (light, heavy) per regime, measured in paper_selfhosted.md's load table. Device-
# constrained, the server gets every request: 5 replicas of the A10G preset run the full trace's
# rate near their KV capacity, 8 lightly. Server-constrained, it gets about b of the prompts: 3
# replicas are as loaded at b >= 0.5 as 5 are device-constrained.
DEFAULT_REPLICAS = {"device": "8,5", "server": "8,3"}
DEFAULT_LIMIT = 2000  # first N requests of the conversation trace (7.1 min of it)
SH_BUDGETS = (0.1, 0.3, 0.5, 0.7, 0.9)
SH_POLICIES = ("disco", "random", "length")
RTT_S = 0.05  # device <-> server round trip (as `disco sim`'s default)
LOADS = ("light", "heavy")  # replica counts, in the causal simulator
LOAD_FREE = "load-free"  # the same preset as an API service would be: the load-free simulator
COLUMNS = (LOAD_FREE, *LOADS)


def _single(regime: str) -> str:
    return "server-only" if regime == "device" else "device-only"


@dataclass(frozen=True)
class SHJob:
    preset: str
    replicas: int  # 0: the load-free simulator
    load: str  # "load-free" / "light" / "heavy"
    device: str
    regime: str  # "device" / "server"
    seed: int
    limit: int
    lambda_usd_per_j: float
    budgets: tuple[float, ...]


def _time_weighted(samples: Sequence[tuple[float, int, int, int]], span: tuple[float, float]):
    """Mean (waiting, running, KV tokens) of one replica over ``span``, each step-start sample
    held until the next one (an idle gap counts at the last step's values: at low load, upper
    bounds). A replica that never stepped: zeros."""
    t0, t1 = span
    if not samples or t1 <= t0:
        return 0.0, 0.0, 0.0
    acc = [0.0, 0.0, 0.0]
    for i, (t, q, r, kv) in enumerate(samples):
        nxt = samples[i + 1][0] if i + 1 < len(samples) else t1
        dt = max(0.0, min(nxt, t1) - max(t, t0))
        acc[0] += q * dt
        acc[1] += r * dt
        acc[2] += kv * dt
    return tuple(a / (t1 - t0) for a in acc)


def run_sh_job(job: SHJob) -> list[dict]:
    """Every policy x budget of one (load, device, regime, seed): one causal replay each (with
    load, a policy's decisions change the server it observes, so nothing is shared)."""
    from disco.scheduler.causal_sim import CausalSettings, run_causal
    from disco.scheduler.migration import MigrationConfig
    from disco.scheduler.policies import PolicyConfig, make_policy
    from disco.scheduler.presets import load_preset, preset_profile
    from disco.scheduler.profiles import DEVICE_PROFILES, with_lambda
    from disco.scheduler.types import Regime

    cpu0 = time.process_time()
    records = workload_records("conv", job.limit, 0)
    preset = load_preset(job.preset)
    server = preset_profile(preset)
    device = with_lambda(DEVICE_PROFILES.get(job.device), job.lambda_usd_per_j)
    regime = Regime(job.regime)
    cells = [(_single(job.regime), 0.0)] + [(p, b) for p in SH_POLICIES for b in job.budgets]
    if job.replicas == 0:
        return _load_free_rows(job, records, server, device, regime, cells, cpu0)
    settings = CausalSettings(replicas=job.replicas, rtt_s=RTT_S, seed=job.seed,
                              migration=MigrationConfig(rtt_s=RTT_S), record_replicas=True)  # fmt: skip
    key = {"load": job.load, "replicas": job.replicas, "device": job.device,
           "regime": job.regime, "seed": job.seed}  # fmt: skip
    span = (min(r.arrival for r in records), None)
    rows = []
    for name, b in cells:
        cfg = PolicyConfig(regime=regime, budget=b, migration=False, seed=job.seed)
        res = run_causal(make_policy(name, cfg, server, device), records, preset, device,
                         settings, regime)  # fmt: skip
        s = res.summary
        started = np.array([o.server_started for o in res.outcomes])
        ends = [float(o.token_times[-1]) for o in res.outcomes if len(o.token_times)]
        window = (span[0], max(ends) if ends else span[0])
        per = [_time_weighted(x, window) for x in res.replica_samples]
        n = len(per)
        rows.append({
            **key, "policy": name, "budget": b,
            **{k: s[k] for k in ("ttft_mean", "ttft_p99", "budget_used", "server_cost",
                                 "server_replica_usd", "qoe_mean", "errors")},
            "busy": sum(s["replica_busy"]) / n,
            "waiting": sum(p[0] for p in per) / n, "running": sum(p[1] for p in per) / n,
            "kv": sum(p[2] for p in per) / n / preset.kv_tokens,
            **_start_stats(started, records),
        })  # fmt: skip
    rows[-1]["cpu_s"] = time.process_time() - cpu0  # the job's CPU time, on its last row
    return rows


def _start_stats(started, records) -> dict[str, float]:
    """started: share of the requests whose server leg started; long_kept: share of the slice's
    longest tenth of prompts (>= its 90th percentile) that the server never started."""
    plen = np.array([r.prompt_tokens for r in records])
    long = plen >= np.percentile(plen, 90)
    started = np.asarray(started, dtype=bool)
    return {"started": float(started.mean()), "long_kept": float((~started[long]).mean())}


def _load_free_rows(job: SHJob, records, server, device, regime, cells, cpu0: float) -> list[dict]:
    """The same slice, policies and budgets through the load-free simulator (as `paper.md`), the
    server being the preset's load-free profile: an idle replica's TTFT whatever the load."""
    from disco.scheduler.policies import PolicyConfig, make_policy
    from disco.scheduler.simulator import (
        SimSettings,
        World,
        evaluate,
        run_batch,
        summarize_outcomes,
    )

    world = World.build(records, server, device, job.seed)
    settings = SimSettings()
    key = {"load": job.load, "replicas": 0, "device": job.device, "regime": job.regime,
           "seed": job.seed}  # fmt: skip
    rows = []
    for name, b in cells:
        cfg = PolicyConfig(regime=regime, budget=b, migration=False, seed=job.seed)
        run = run_batch(make_policy(name, cfg, world.server, world.device), world, settings)
        s = summarize_outcomes(world, evaluate(world, run, None, settings), regime, settings)
        started = np.isfinite(np.asarray(run.server_start, dtype=float))
        rows.append({**key, "policy": name, "budget": b,
                     **{k: s.get(k) for k in ("ttft_mean", "ttft_p99", "budget_used", "server_cost",
                                              "qoe_mean")},
                     "errors": 0, "server_replica_usd": None, "busy": None, "waiting": None,
                     "running": None, "kv": None, **_start_stats(started, records)})  # fmt: skip
    rows[-1]["cpu_s"] = time.process_time() - cpu0
    return rows


# --- aggregation -----------------------------------------------------------------------------------
def index_rows(rows: list[dict], budgets) -> dict:
    """(load, device, regime, seed, budget) -> {policy: row}; the single endpoint's row (budget
    free) is copied to every budget."""
    at: dict = defaultdict(dict)
    for r in rows:
        k = (r["load"], r["device"], r["regime"], r["seed"])
        if r["policy"] == _single(r["regime"]):
            for b in budgets:
                at[(*k, b)][r["policy"]] = r
        else:
            at[(*k, r["budget"])][r["policy"]] = r
    return at


def _cells():
    return [(reg, dev) for reg in REGIMES.values() for dev in DEVICES.values()]


def reductions(at: dict, seeds, budgets) -> dict:
    """Per (load, regime, device): DiSCo's P99 and mean reduction vs (a) the best feasible
    paper-kind baseline and (b) length, per seed averaged over the budgets (mean ± sd over
    seeds), and the range over budgets of the seed means (as paper.md)."""
    out = {}
    for load in COLUMNS:
        for reg, dev in _cells():
            per_seed: dict[str, list[float]] = defaultdict(list)
            per_b: dict[str, list[list[float]]] = defaultdict(list)
            for seed in seeds:
                acc: dict[str, list[float]] = defaultdict(list)
                for b in budgets:
                    pols = at.get((load, dev, reg, seed, b))
                    if not pols or "disco" not in pols:
                        continue
                    d = pols["disco"]
                    paper_kind = [pols[p] for p in (_single(reg), "random")
                                  if p in pols and pols[p]["budget_used"] <= b + FEASIBLE_SLACK]  # fmt: skip
                    ln = pols.get("length")
                    for metric, short in (("ttft_p99", "tail"), ("ttft_mean", "mean")):
                        if paper_kind:
                            acc[f"{short}_a"].append(1.0 - d[metric] / min(r[metric] for r in paper_kind))
                        if ln is not None and ln["budget_used"] <= b + FEASIBLE_SLACK:
                            acc[f"{short}_b"].append(1.0 - d[metric] / ln[metric])
                for k, v in acc.items():
                    per_seed[k].append(sum(v) / len(v))
                    per_b[k].append(v)
            cell = {k: _mean_sd(v) for k, v in per_seed.items()}
            for k, lists in per_b.items():
                by_b = [sum(x) / len(x) for x in zip(*lists, strict=False)]
                cell[k + "_range"] = (min(by_b), max(by_b))
            out[(load, reg, dev)] = cell
    return out


MEAN_KEYS = ("ttft_mean", "ttft_p99", "budget_used", "server_cost", "server_replica_usd", "busy",
             "waiting", "running", "kv", "qoe_mean", "started", "long_kept")  # fmt: skip


def seed_mean(at: dict, load, dev, reg, b, seeds) -> dict[str, dict]:
    acc: dict = defaultdict(lambda: defaultdict(list))
    for seed in seeds:
        for p, r in at.get((load, dev, reg, seed, b), {}).items():
            for k in MEAN_KEYS:
                acc[p][k].append(float(r[k] or 0.0))
    return {p: {k: sum(v) / len(v) for k, v in m.items()} for p, m in acc.items()}


def device_mean(at: dict, load, reg, b, seeds) -> dict[str, dict]:
    """{policy: {metric: mean over seeds and the two devices}}."""
    per = [seed_mean(at, load, dev, reg, b, seeds) for dev in DEVICES.values()]
    out = {}
    for p in per[0]:
        if all(p in m for m in per):
            out[p] = {k: sum(m[p][k] for m in per) / len(per) for k in MEAN_KEYS}
    return out


def gaps(at: dict, seeds, budgets) -> list[dict]:
    """Every (column, regime, device, budget) where DiSCo's seed mean is worse than a feasible
    baseline's by more than P99_GAP / MEAN_GAP."""
    out = []
    for load in COLUMNS:
        for reg, dev in _cells():
            for b in budgets:
                m = seed_mean(at, load, dev, reg, b, seeds)
                if "disco" not in m:
                    continue
                d = m["disco"]
                for p in (_single(reg), "random", "length"):
                    r = m.get(p)
                    if r is None or r["budget_used"] > b + FEASIBLE_SLACK:
                        continue
                    for metric, tol in (("ttft_p99", P99_GAP), ("ttft_mean", MEAN_GAP)):
                        if d[metric] > (1.0 + tol) * r[metric]:
                            out.append({"load": load, "regime": reg, "device": dev, "budget": b,
                                        "metric": metric, "baseline": p, "disco": d[metric],
                                        "base": r[metric], "disco_used": d["budget_used"],
                                        "base_used": r["budget_used"]})  # fmt: skip
    return out


def overspend(at: dict, seeds, budgets) -> list[tuple]:
    """(load, regime, device, b, used) where DiSCo's seed-mean budget used exceeds b + slack."""
    out = []
    for load in COLUMNS:
        for reg, dev in _cells():
            for b in budgets:
                d = seed_mean(at, load, dev, reg, b, seeds).get("disco")
                if d is not None and d["budget_used"] > b + FEASIBLE_SLACK:
                    out.append((load, reg, dev, b, d["budget_used"]))
    return out


def load_table_budgets(budgets: Sequence[float]) -> tuple[float, ...]:
    """The load table's budgets: the middle one and the largest (0.5 and 0.9 by default)."""
    s = sorted(budgets)
    return tuple(dict.fromkeys((s[(len(s) - 1) // 2], s[-1])))


# --- rendering --------------------------------------------------------------------------------------
def _range(vals: list[float]) -> str:
    if not vals:
        return "-"
    lo, hi = pct(min(vals)), pct(max(vals))
    return lo if lo == hi else f"{lo} to {hi}"


def render(rows: list[dict], meta: dict, seeds, budgets) -> str:
    from disco.scheduler.presets import load_preset

    preset = load_preset(meta["preset"])
    at = index_rows(rows, budgets)
    red = reductions(at, seeds, budgets)
    gap_list = gaps(at, seeds, budgets)
    over = overspend(at, seeds, budgets)
    reps = meta["replicas"]
    load_budgets = load_table_budgets(budgets)
    n_causal = sum(1 for r in rows if r["replicas"])
    L: list[str] = []
    add = L.append
    add("# The DiSCo paper's TTFT table under self-hosted replicas")
    add("")
    add(f"Generated by `{meta['command']}` on {meta['when']}: {meta['machine']}, "
        f"{meta['workers']}, **{meta['wall_s']:.0f} s** wall ({n_causal:,} causal replays and "
        f"{len(rows) - n_causal} load-free runs, "
        f"{meta['cpu_s']:.0f} CPU-s in the workers). "
        f"Commit {meta['commit']}. Seeds {', '.join(map(str, seeds))}; numbers are the mean ± "
        "sample standard deviation over seeds unless marked. Issue 14 item 4: a column the paper "
        "could not have (its servers are API services whose TTFT does not depend on the load the "
        "devices send). The API-service tables are in [`paper.md`](paper.md).")  # fmt: skip
    add("")
    add("What runs: the causal simulator (`scheduler/causal_sim.py`, the same as `disco sim "
        f"--server-preset {preset.name} --replicas N`): the server is N continuous-batching "
        f"replicas of the preset `{preset.name}` ({preset.model} on {preset.hardware}; "
        f"max {preset.max_num_seqs} sequences and {preset.max_batched_tokens:,} tokens a step, "
        f"KV cache {preset.kv_tokens:,} tokens; `scheduler/presets.py`) behind Ray Serve's "
        f"power-of-two router, device <-> server round trip {RTT_S * 1000:.0f} ms, and each "
        "request its own device (the paper's two phones, `scheduler/profiles.py`). A policy plans "
        "at arrival and learns each outcome when the request completes, in virtual time, so the "
        "server TTFT it sees is the queue its own decisions built. Migration off (as in "
        "`paper.md`'s TTFT tables). The oracle is not run: it needs each server TTFT in advance, "
        "which a loaded server does not have.")  # fmt: skip
    add("")
    add(f"Workload: **a slice**, the first {meta['requests']:,} requests of the Azure "
        f"conversation trace ({meta['trace_min']:.1f} min of it at its own rate, "
        f"{meta['rate']:.2f} requests/s; {meta['lengths'][0]:.0f} prompt / "
        f"{meta['lengths'][1]:.0f} output tokens per request on average), to keep the run "
        "under 10 minutes on 2 cores (`paper.md` replays all 19,366). Budgets b = "
        f"{', '.join(f'{b:g}' for b in budgets)} (`paper.md`: 0.1 ... 0.9). Two load levels at the "
        "trace's own rate, set by the replica count: device-constrained, where the server gets "
        f"every request, **light** = {reps['device']['light']} and **heavy** = "
        f"{reps['device']['heavy']} replicas; server-constrained, where it gets about b of the "
        f"prompts, **light** = {reps['server']['light']} and **heavy** = "
        f"{reps['server']['heavy']} (measured below). The API-service dimension collapses: a "
        "self-hosted server "
        "has no list price; its cost is replica time x the preset's "
        f"${preset.usd_per_hour:g}/h (attributed to each request's share of the steps it ran in, "
        "as `causal_sim` does; the provisioned cost is replicas x the replay's span x $/h).")  # fmt: skip
    add("")
    add("Comparisons as in `paper.md`: **(a)** the paper's kind of baselines, the unconstrained "
        "endpoint alone (server-only when the device is constrained, device-only when the server "
        f"is) and the random split at b; **(b)** the `length` split at b. A baseline counts at b "
        f"when its budget used <= b + {FEASIBLE_SLACK}. A reduction is 1 - DiSCo / best baseline "
        "at the same budget (positive: DiSCo is better), averaged over the budgets; brackets: the "
        "range over budgets (of the seed means).")
    add("")
    add(f"The **{LOAD_FREE}** column is the paper's setting for the same server: the same slice, "
        "policies and budgets through the load-free simulator (`scheduler/simulator.py`, as "
        "`paper.md`), the server being the preset as if it were an API service "
        "(`presets.preset_profile`: an idle replica's TTFT for every request, whatever the load, "
        "no round trip, and the policy learns each outcome at once). What moves between it and the light and "
        "heavy columns is the queue, and the causal order of plans and outcomes.")  # fmt: skip
    add("")
    add("## Load levels (measured)")
    add("")
    idle = preset.unloaded_ttft(meta["lengths"][0]) + RTT_S
    add(f"Each policy's replay at b = {' and '.join(f'{b:g}' for b in load_budgets)} (the single "
        "endpoint: budget-free), the mean "
        "over seeds and both devices. An idle replica's TTFT for the slice's mean prompt is "
        f"{idle:.2f} s (prefill + round trip). Busy: share of the replay's span in which a replica "
        "runs a step. Running / waiting: sequences in a replica's batch / queue, KV: its KV cache "
        "in use, time-weighted between step starts (an idle gap counts at the last step's values, "
        "so where busy is low they are upper bounds). Server $: replica time attributed to the "
        "requests; provisioned: all replicas over the span.")  # fmt: skip
    add("")
    add("| regime | load | replicas | policy | b | budget used | TTFT mean s | TTFT P99 s | "
        "busy % | running / replica | waiting / replica | KV % | server $ attributed / "
        "provisioned |")
    add("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for reg_name, reg in REGIMES.items():
        for load in LOADS:
            lines = []
            for b in load_budgets:
                m = device_mean(at, load, reg, b, seeds)
                for p in (("disco", "length", "random") if b != load_budgets[0] else
                          (_single(reg), "disco", "length", "random")):  # fmt: skip
                    if p in m:
                        lines.append((p, "-" if p == _single(reg) else f"{b:g}", m[p]))
            for p, bs, r in lines:
                add(f"| {reg_name} | {load} | {reps[reg][load]} | {p} | {bs} | {r['budget_used']:.3f} | "
                    f"{r['ttft_mean']:.3f} | {r['ttft_p99']:.3f} | {100 * r['busy']:.0f} | "
                    f"{r['running']:.1f} | {r['waiting']:.2f} | {100 * r['kv']:.0f} | "
                    f"{r['server_cost']:.3f} / {r['server_replica_usd']:.3f} |")  # fmt: skip
    add("")
    for title, short in (("Tail (P99) TTFT reduction", "tail"), ("Mean TTFT reduction", "mean")):
        add(f"## {title}, self-hosted")
        add("")
        head = "| regime | device |"
        if short == "tail":
            head += " paper (3 API services) |"
        head += "".join(f" {load} (a) | {load} (b) |" for load in COLUMNS)
        add(head)
        add("|" + "---|" * (head.count("|") - 1))
        for reg_name, reg in REGIMES.items():
            for dev_name, dev in DEVICES.items():
                line = f"| {reg_name} | {dev_name} |"
                if short == "tail":
                    pv = [v for (s, r, d), v in PAPER_TAIL.items() if r == reg and d == dev]
                    line += f" {min(pv):.2f} to {max(pv):.2f} |"
                for load in COLUMNS:
                    c = red[(load, reg, dev)]
                    for k in (f"{short}_a", f"{short}_b"):
                        if k in c:
                            lo, hi = c[k + "_range"]
                            line += f" {pm(c[k])} [{pct(lo)}, {pct(hi)}] |"
                        else:
                            line += " - |"
                add(line)
        add("")
        add("Percent. " + ("Paper: the three services' values for this regime and device [N]."
                           if short == "tail" else "Paper [P]: mean TTFT -6 % to -78 %."))  # fmt: skip
        add("")
    add("## Where DiSCo loses under load")
    add("")
    n_cmp = len(COLUMNS) * len(_cells()) * len(budgets) * 3 * 2
    add(f"Every (column, regime, device, budget) where DiSCo's seed mean is worse than a feasible "
        f"baseline's by more than {100 * P99_GAP:.0f} % (P99) or {100 * MEAN_GAP:.0f} % (mean): "
        f"**{len(gap_list)}** of {n_cmp} comparisons (3 columns x regimes x devices x budgets x 3 "
        "baselines x 2 metrics).")  # fmt: skip
    add("")
    add("| column | regime | P99 vs length | P99 vs (a) | mean vs length | mean vs (a) |")
    add("|---|---|---|---|---|---|")
    for load in COLUMNS:
        for reg in REGIMES.values():
            g = [x for x in gap_list if x["load"] == load and x["regime"] == reg]

            def n(metric, is_len, g=g):
                return sum(1 for x in g if x["metric"] == metric and (x["baseline"] == "length") == is_len)

            add(f"| {load} | {reg} | {n('ttft_p99', True)} | {n('ttft_p99', False)} | "
                f"{n('ttft_mean', True)} | {n('ttft_mean', False)} |")
    add("")
    worst = sorted(gap_list, key=lambda x: x["disco"] / x["base"], reverse=True)[:15]
    if worst:
        add("The largest, with the budget each policy used:")
        add("")
        add("| column | regime / device | b | metric | DiSCo | baseline | gap | used DiSCo / baseline |")
        add("|---|---|---|---|---|---|---|---|")
        for x in worst:
            add(f"| {x['load']} | {x['regime']} / {x['device'].split('-')[0]} | {x['budget']:.1f} | "
                f"{'P99' if x['metric'] == 'ttft_p99' else 'mean'} | {x['disco']:.3f} | "
                f"{x['base']:.3f} ({x['baseline']}) | {x['disco'] / x['base'] - 1:+.1%} | "
                f"{x['disco_used']:.3f} / {x['base_used']:.3f} |")  # fmt: skip
        add("")
    if over:
        add(f"DiSCo itself over its budget (used > b + {FEASIBLE_SLACK}, seed means): " + "; ".join(
            f"{load} / {reg} / {dev.split('-')[0]} b = {b:g}: {u:.3f}" for load, reg, dev, b, u in over) + ".")
    else:
        add(f"DiSCo stays within b + {FEASIBLE_SLACK} at every load, regime, device and budget.")
    add("")
    add("## What changes against the API-service columns")
    add("")
    add(analysis(at, red, seeds, budgets, reps, meta["lengths"][0], idle, over))
    add("")
    return "\n".join(L)


def analysis(at, red, seeds, budgets, reps, mean_prompt: float, idle: float, over: list) -> str:
    """What changes against the API-service columns: our reading of the default run, every
    number filled in from this run's rows."""
    from disco.scheduler.profiles import DEVICE_PROFILES

    def m(load, reg, b, pol):
        return device_mean(at, load, reg, b, seeds).get(pol, {})

    def rng(col, reg, k):
        v = [red[(col, reg, d)][k][0] for d in DEVICES.values() if k in red[(col, reg, d)]]
        return _range(v)

    mid, top = load_table_budgets(budgets)[0], max(budgets)
    so_l, so_h = m("light", "device", mid, "server-only"), m("heavy", "device", mid, "server-only")
    d_h = m("heavy", "device", mid, "disco")
    phone = {d: float(DEVICE_PROFILES.get(d).ttft(mean_prompt)) for d in DEVICES.values()}
    if not (so_l and so_h and d_h):
        return f"(the run has no device-constrained rows at b = {mid:g})"
    # the server-constrained regime's worst P99 against length, heavy
    worst, wb = None, None
    for dev in DEVICES.values():
        for b in budgets:
            x = seed_mean(at, "heavy", dev, "server", b, seeds)
            if "disco" in x and "length" in x:
                g = x["disco"]["ttft_p99"] / x["length"]["ttft_p99"]
                if worst is None or g > worst[0]:
                    worst, wb = (g, dev, b), x
    st = m("heavy", "server", top, "disco")
    wdev = worst

    def kept(pol: str) -> str:
        v = [seed_mean(at, c, wdev[1], "server", wdev[2], seeds).get(pol, {}).get("long_kept", 0.0)
             for c in COLUMNS]  # fmt: skip
        return " / ".join(f"{100 * x:.1f}" for x in v) + " %"
    lines = [
        "With an API service (`paper.md`, and the load-free column here) a server TTFT is a draw "
        "that no decision changes. With self-hosted replicas every prompt a policy sends to the "
        "server joins a queue that all requests share, so the policy sets the server TTFT it then "
        "races against, in both directions.",
        "",
        "- **Device-constrained** (the server gets every request; the budget is the phones' "
        f"prefill). *Light* ({reps['device']['light']} replicas: server-only's TTFT "
        f"{so_l['ttft_mean']:.2f} s mean / {so_l['ttft_p99']:.2f} s P99, {idle:.2f} s idle; "
        f"{so_l['waiting']:.2f} waiting per replica, {100 * so_l['kv']:.0f} % KV): a phone "
        f"prefills the slice's mean prompt ({mean_prompt:.0f} tokens) in "
        + " / ".join(f"{v:.1f} s ({d.split('-')[0]})" for d, v in phone.items())
        + ", so it rarely beats the server and every policy is server-only in effect: DiSCo's "
        f"P99 {rng('light', 'device', 'tail_a')} % and mean {rng('light', 'device', 'mean_a')} % "
        f"against (a), as in the load-free column ({rng(LOAD_FREE, 'device', 'tail_a')} %; "
        "`paper.md`'s API services have slow TTFT tails that a phone can beat, this idle "
        "replica does not). "
        f"*Heavy* ({reps['device']['heavy']} replicas: server-only {so_h['ttft_mean']:.2f} s / "
        f"{so_h['ttft_p99']:.2f} s, {so_h['waiting']:.2f} waiting per replica, "
        f"{100 * so_h['kv']:.0f} % KV): DiSCo wins, P99 {rng('heavy', 'device', 'tail_a')} % "
        f"and mean {rng('heavy', 'device', 'mean_a')} % under (a), and P99 "
        f"{rng('heavy', 'device', 'tail_b')} % under `length`. The queue is what the device "
        "budget buys down: each race a phone wins cancels its server leg, so at "
        f"b = {mid:g} the replicas hold {d_h['waiting']:.2f} waiting and "
        f"{100 * d_h['kv']:.0f} % KV under DiSCo against {so_h['waiting']:.2f} and "
        f"{100 * so_h['kv']:.0f} % under server-only, and every request's server TTFT falls with "
        "it. This is the column the paper could not have: the same policies against the same "
        "server as an API service gain nothing here.",
        "",
        "- **Server-constrained** (the server gets about b of the prompts; the budget is the "
        "server's prefill). Against (a) the load-free column looks like `paper.md`'s: DiSCo's "
        f"P99 {rng(LOAD_FREE, 'server', 'tail_a')} % under device-only and random, whose P99 is "
        "the phones' prefill of the longest prompts; the queue takes part of it back, "
        f"{rng('light', 'server', 'tail_a')} % light and {rng('heavy', 'server', 'tail_a')} % "
        f"heavy ({reps['server']['heavy']} replicas; at b = {top:g}, "
        f"{st.get('waiting', 0.0):.2f} waiting per replica and {100 * st.get('kv', 0.0):.0f} % "
        "KV under DiSCo). Against `length` DiSCo is behind on this slice even load-free "
        f"({rng(LOAD_FREE, 'server', 'tail_b')} %; on `paper.md`'s full trace with the API "
        "services it is ahead), and the load adds to it: "
        f"{rng('light', 'server', 'tail_b')} % light, {rng('heavy', 'server', 'tail_b')} % heavy "
        f"(worst: b = {wdev[2]:g}, {wdev[1].split('-')[0]}, P99 {wb['disco']['ttft_p99']:.2f} s "
        f"against {wb['length']['ttft_p99']:.2f} s). That P99 is the phone's prefill of long "
        f"prompts the server never started: at b = {wdev[2]:g} on that phone DiSCo leaves "
        f"{kept('disco')} of the slice's longest tenth of prompts on the phone (load-free / "
        f"light / heavy) against `length`'s {kept('length')}, and it starts the server for "
        f"{100 * wb['disco']['started']:.1f} % of the requests against "
        f"{100 * wb['length']['started']:.1f} % at about the same prompt-token share "
        f"({wb['disco']['budget_used']:.3f} / {wb['length']['budget_used']:.3f}): more, "
        f"shorter prompts, and a longer queue ({wb['disco']['waiting']:.2f} against "
        f"{wb['length']['waiting']:.2f} waiting per replica). Our reading, not isolated by this "
        "run: DiSCo-S's feedback runs its spend closer to b than `length`'s, so the budget guard "
        "binds more often, and under load each start stays in flight, reserved against the "
        "budget, for longer; a binding guard refuses in arrival order, long prompts included. "
        "`random` beats DiSCo's mean in every column, most under load (DiSCo's mean against "
        f"(a): {rng(LOAD_FREE, 'server', 'mean_a')} % load-free, "
        f"{rng('light', 'server', 'mean_a')} % light, {rng('heavy', 'server', 'mean_a')} % "
        "heavy): it starts the server over every length, so the phones keep only some of the "
        "long prompts and its P99 is worse for it.",
        "",
        ("DiSCo keeps its budget at every load (above), so none of this is overspending. "
         if not over else f"DiSCo overspends at {len(over)} (load, cell, budget) points (above). ")
        + "What a load-aware DiSCo would need: both of its planners price a start by the prompt "
        "tokens it spends on the constrained endpoint and read the server's TTFT from a window "
        "of past outcomes; with replicas a server start also delays every later request, which "
        "the window sees only after the fact.",
    ]
    return "\n".join(lines)


# --- the command --------------------------------------------------------------------------------------
def map_jobs(fn: Callable, jobs: list, workers: int, ray_address: str | None,
             progress: Callable[[int, object], None]) -> list:  # fmt: skip
    """``fn`` over ``jobs``, in order: in this process, over ``workers`` processes, or as Ray
    tasks (one CPU each) on a local Ray (``ray_address`` "local") or a cluster."""
    out: list = [None] * len(jobs)
    if ray_address is not None:
        try:
            import ray
        except ImportError:
            raise CliError("--ray needs Ray: install the project's 'ray' extra") from None
        started_here = not ray.is_initialized()
        if started_here:
            kw = {"include_dashboard": False} if ray_address == "local" else {}
            ray.init(address=ray_address, log_to_driver=False, **kw)
        try:
            task = ray.remote(num_cpus=1)(fn)
            refs = [task.remote(j) for j in jobs]
            index = {r: i for i, r in enumerate(refs)}
            pending, done = list(refs), 0
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                i = index[ready[0]]
                out[i] = ray.get(ready[0])
                done += 1
                progress(done, jobs[i])
        finally:
            if started_here:
                ray.shutdown()
        return out
    if workers == 1:
        for i, j in enumerate(jobs):
            out[i] = fn(j)
            progress(i + 1, j)
        return out
    with ProcessPoolExecutor(workers) as ex:
        for i, (j, res) in enumerate(zip(jobs, ex.map(fn, jobs), strict=True)):
            out[i] = res
            progress(i + 1, j)
    return out


def parse_replicas(text: str, flag: str) -> dict[str, int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"{flag} must be two integers LIGHT,HEAVY, got {text!r}") from None
    if len(vals) != 2 or min(vals) < 1:
        raise CliError(f"{flag} must be two integers >= 1, LIGHT,HEAVY, got {text!r}")
    if vals[0] <= vals[1]:
        raise CliError(f"{flag}: the light level needs more replicas than the heavy one, got {text!r}")
    return dict(zip(LOADS, vals, strict=True))


def parse_budgets(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise CliError(f"--budgets must be comma-separated numbers, got {text!r}") from None
    if not vals or any(not 0.0 < v < 1.0 for v in vals):
        raise CliError(f"--budgets must be numbers in (0, 1), got {text!r}")
    return vals


def write_json(path: Path, meta: dict, seeds, budgets, rows: list[dict]) -> None:
    """The run's rows (one a line) and meta: `rerender` writes paper_selfhosted.md from them."""
    head = {"meta": meta, "seeds": list(seeds), "budgets": list(budgets)}
    body = ",\n".join(json.dumps(r, separators=(",", ":")) for r in rows)
    path.write_text(json.dumps(head)[:-1] + ', "rows": [\n' + body + "\n]}\n")


def rerender(json_path: str | Path) -> str:
    """paper_selfhosted.md again from the rows a run wrote (paper_selfhosted.json)."""
    data = json.loads(Path(json_path).read_text())
    return render(data["rows"], data["meta"], tuple(data["seeds"]), tuple(data["budgets"]))


def run(args, seeds: tuple[int, ...], lambdas: dict[str, float]) -> int:
    from disco.cluster.provenance import commit, machine
    from disco.scheduler.presets import load_preset

    try:
        load_preset(args.self_hosted)  # an unknown name or a malformed file fails here, at once
    except ValueError as e:
        raise CliError(str(e)) from None
    reps = {"device": parse_replicas(args.replicas or DEFAULT_REPLICAS["device"], "--replicas"),
            "server": parse_replicas(args.replicas_server or DEFAULT_REPLICAS["server"],
                                     "--replicas-server")}  # fmt: skip
    budgets = parse_budgets(args.budgets) if args.budgets is not None else SH_BUDGETS
    limit = args.limit if args.limit is not None else DEFAULT_LIMIT
    # device-constrained first: the longer replays (every request reaches the server)
    jobs = [SHJob(args.self_hosted, reps[reg][load], load, dev, reg, seed, limit, lambdas[reg],
                  budgets)
            for reg in ("device", "server") for load in LOADS for dev in DEVICES.values()
            for seed in seeds]  # fmt: skip
    jobs += [SHJob(args.self_hosted, 0, LOAD_FREE, dev, reg, seed, limit, lambdas[reg], budgets)
             for reg in ("device", "server") for dev in DEVICES.values() for seed in seeds]  # fmt: skip
    t0 = time.perf_counter()

    def progress(done: int, job: SHJob) -> None:
        if not args.quiet:
            print(f"\rreproduce --self-hosted: {done}/{len(jobs)} {job.load} {job.regime} "
                  f"{job.device} seed {job.seed:<3} {time.perf_counter() - t0:6.1f} s", end="",
                  file=sys.stderr)  # fmt: skip

    results = map_jobs(run_sh_job, jobs, args.jobs, args.ray, progress)
    rows = [r for res in results for r in res]
    wall = time.perf_counter() - t0
    if not args.quiet:
        print(file=sys.stderr)
    recs = workload_records("conv", limit, 0)
    span = recs[-1].arrival - recs[0].arrival
    meta = {
        "command": "disco " + " ".join(getattr(args, "argv", ["reproduce", "--self-hosted"])),
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "wall_s": wall, "runs": len(rows), "commit": commit(),
        "cpu_s": sum(r.get("cpu_s", 0.0) for r in rows),
        "workers": (f"Ray tasks ({args.ray})" if args.ray is not None
                    else f"{args.jobs} worker process{'es' if args.jobs > 1 else ''}"),
        "preset": args.self_hosted, "replicas": reps, "requests": len(recs),
        "trace_min": span / 60.0, "rate": len(recs) / span if span > 0 else 0.0,
        "lengths": (sum(r.prompt_tokens for r in recs) / len(recs),
                    sum(r.output_tokens for r in recs) / len(recs)),
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "paper_selfhosted.json", meta, seeds, budgets, rows)
    (out / "paper_selfhosted.md").write_text(render(rows, meta, seeds, budgets))
    if not args.quiet:
        print(f"wrote {out / 'paper_selfhosted.md'}, paper_selfhosted.json ({wall:.0f} s "
              "simulation)", file=sys.stderr)  # fmt: skip
    return 0
