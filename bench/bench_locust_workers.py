"""Locust's distributed mode (`disco load --workers N`): open-loop send error and rate per worker.

Poisson arrivals replayed through ``disco.loadgen`` with ``ReplayOptions.workers`` (one Locust
``--master`` and N local ``--worker`` processes, each sending its share of the schedule on one
shared time zero) against the loopback SSE server (``disco.loadgen.mock_server``, in this
process: 5 ms TTFT, 4 tokens 2 ms apart). Three parts:
1. find: one worker alone at rising rates, ``--runs`` runs each; it sustains a rate when one of
   them (the machine is shared: another tenant's burst stalls a run) has send error (actual
   send time minus scheduled, per request) P99 <= 5 ms, no errors and every request sent;
   stops at the first rate it does not sustain;
2. side by side: at that rate (else the highest tried), one Locust process (no master),
   1 worker and 2 workers, ``--runs`` runs each;
3. scaling: 1, 2, 3 workers at rising rates.
The mock server, the master and the workers all share the machine's cores (2 here), so the
numbers are those of a crowded machine, not of a load generator with cores of its own.
``--nice -5`` (root) raises the priority of this process (the server) and so of Locust's
processes (they inherit it) above other work on the machine, as ``disco demo`` does for Locust.

    .venv/bin/python bench/bench_locust_workers.py --duration 12 --runs 2 --nice -5 --write
    .venv/bin/python bench/bench_locust_workers.py --find-rates 400 600 800 --runs 3 \\
        --skip-scaling --nice -5 --append
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from disco.loadgen.arrivals import LogNormalLengths, Poisson, synthetic
from disco.loadgen.mock_server import MockConfig, MockServer
from disco.loadgen.prompts import Corpus, EstimateCounter
from disco.loadgen.replay import ReplayOptions, prepare, replay

RESULTS = Path(__file__).parent / "results" / "locust_workers.md"
TARGET_P99_MS = 5.0


def _cpu_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def one_run(rate: float, workers: int | None, duration: float, seed: int, corpus: Corpus) -> dict:
    """One replay at ``rate`` (``workers`` None: one Locust process, no master)."""
    arrivals = synthetic(
        Poisson(rate), LogNormalLengths(prompt_median=32, output_median=4, max_tokens=4),
        duration=duration, seed=seed,
    )  # fmt: skip
    opts = ReplayOptions(label=f"{rate:g}/s x{workers}", max_tokens=4, plots=False, html=False,
                         counters=False, workers=workers)  # fmt: skip
    with (
        MockServer(MockConfig(ttft_s=0.005, tbt_s=0.002)) as srv,
        tempfile.TemporaryDirectory() as d,
    ):
        reqs = prepare(arrivals, [srv.url], opts, EstimateCounter(), corpus)
        load1 = os.getloadavg()[0]
        cpu0, own0, t0 = (
            _cpu_s(resource.RUSAGE_CHILDREN),
            _cpu_s(resource.RUSAGE_SELF),
            time.monotonic(),
        )
        res = replay(reqs, d, opts, say=lambda s: None)
        wall, cpu = time.monotonic() - t0, _cpu_s(resource.RUSAGE_CHILDREN) - cpu0
        own = _cpu_s(resource.RUSAGE_SELF) - own0  # the mock server, mostly
        if res.run.interrupted:  # Ctrl-C: Locust is stopped; stop the benchmark too
            raise KeyboardInterrupt
        served = srv.counters.completed
    recs = res.records
    lag = np.array([r.lag for r in recs]) * 1000 if recs else np.zeros(1)
    sent = sorted(r.sent for r in recs)
    dues = sorted(r.due for r in reqs)
    span = sent[-1] - sent[0] if len(sent) > 1 else float("nan")
    p99 = float(np.percentile(lag, 99))
    errors = int(res.summary["errors"])
    return {
        "rate": rate, "workers": workers, "scheduled": len(reqs), "sent": len(recs),
        "served": served, "errors": errors,
        "offered": (len(dues) - 1) / (dues[-1] - dues[0]) if len(dues) > 1 else float("nan"),
        "achieved": (len(sent) - 1) / span if len(sent) > 1 else float("nan"),
        "p50": float(np.percentile(lag, 50)), "p99": p99, "max": float(lag.max()),
        "per_worker": res.summary.get("sent_per_worker"), "cpu_s": cpu, "wall_s": wall,
        "server_cpu_s": own, "seed": seed,
        "load1": load1,
        "ok": p99 <= TARGET_P99_MS and errors == 0 and len(recs) == len(reqs),
    }  # fmt: skip


def _say(part: str, r: dict) -> None:
    who = "1 process" if r["workers"] is None else f"{r['workers']} worker(s)"
    print(f"[{part}] {r['rate']:g}/s, {who}: sent {r['sent']}/{r['scheduled']}, errors "
          f"{r['errors']}, achieved {r['achieved']:.1f}/s of {r['offered']:.1f}/s offered, send "
          f"error P50 {r['p50']:.2f} P99 {r['p99']:.2f} max {r['max']:.1f} ms, Locust CPU "
          f"{r['cpu_s']:.1f} s, server CPU {r['server_cpu_s']:.1f} s, load {r['load1']:.2f} -> "
          f"{'ok' if r['ok'] else 'NOT sustained'}",
          flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--find-rates", type=float, nargs="+",
                    default=[50.0, 100.0, 200.0, 400.0, 600.0, 800.0, 1200.0])  # fmt: skip
    ap.add_argument("--scale-rates", type=float, nargs="+", default=[200.0, 400.0, 600.0, 800.0])
    ap.add_argument("--scale-workers", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--duration", type=float, default=12.0, help="seconds of arrivals per run")
    ap.add_argument("--seed", type=int, default=0, help="run k draws seed + k")
    ap.add_argument("--runs", type=int, default=2, help="runs per point of parts 1 and 2")
    ap.add_argument(
        "--nice", type=int, default=0, help="priority of Locust and the server (< 0: root)"
    )
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--write", action="store_true", help=f"start {RESULTS} anew")
    ap.add_argument("--append", action="store_true", help=f"add a section to {RESULTS}")
    a = ap.parse_args()
    if a.nice:  # Locust's processes inherit it; a priority this user may not raise stays
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + a.nice)
    corpus = Corpus.stdlib()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime at start: {uptime}", flush=True)
    find, sustained, broke = [], [], None
    for rate in a.find_rates:
        runs = [one_run(rate, 1, a.duration, a.seed + k, corpus) for k in range(a.runs)]
        for r in runs:
            _say("find", r)
        find += runs
        if any(r["ok"] for r in runs):
            sustained.append(rate)
        else:
            broke = rate  # the rate where one worker breaks
            break
    at = broke if broke is not None else a.find_rates[-1]
    side = []
    for k in range(a.runs):  # interleaved: a burst of other work hits one run, not one mode
        for workers in (None, 1, 2):
            r = one_run(at, workers, a.duration, a.seed + k, corpus)
            _say("side", r)
            side.append(r)
    scale = []
    if not a.skip_scaling:
        for rate in a.scale_rates:
            for workers in a.scale_workers:
                r = one_run(rate, workers, a.duration, a.seed, corpus)
                _say("scale", r)
                scale.append(r)
    uptime_end = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    if a.write or a.append:
        write(a, uptime, uptime_end, find, sustained, broke, at, side, scale)


HEAD = ("| workers | rate (req/s) | seed | offered | achieved | sent / scheduled | errors | "
        "per worker | send P50 ms | send P99 ms | send max ms | Locust CPU s | server CPU s | "
        "load | P99 <= 5 ms |")  # fmt: skip


def _row(r: dict) -> str:
    who = "1 process" if r["workers"] is None else str(r["workers"])
    per = "-" if not r["per_worker"] else "/".join(str(x) for x in r["per_worker"])
    return (f"| {who} | {r['rate']:g} | {r['seed']} | {r['offered']:.1f} | "
            f"{r['achieved']:.1f} | {r['sent']} / {r['scheduled']} | {r['errors']} | {per} | "
            f"{r['p50']:.2f} | {r['p99']:.2f} | {r['max']:.1f} | {r['cpu_s']:.1f} | "
            f"{r['server_cpu_s']:.1f} | {r['load1']:.2f} | {'yes' if r['ok'] else 'no'} |")  # fmt: skip


def write(a, uptime, uptime_end, find, sustained, broke, at, side, scale) -> None:
    """``--write`` starts the file; ``--append`` adds this invocation as one more section."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = " ".join(["python", "bench/bench_locust_workers.py", *sys.argv[1:]])
    sep = "|---" * (HEAD.count("|") - 1) + "|"
    header = [
        "# Locust distributed mode: `disco load --workers N`",
        "",
        "Poisson arrivals replayed by one Locust `--master` and N local `--worker` processes "
        "(`1 process`: plain single-process Locust, no master) against the loopback mock SSE "
        "server (5 ms TTFT, 4 tokens 2 ms apart) running in the benchmark's own process. *Send "
        "error*: a request's actual send time minus its scheduled time (`requests.jsonl`: "
        "`sent - due`; the summary's `send_lag_*_s`). *offered*: the schedule's own rate (the "
        "Poisson draw); *achieved*: sent requests / time between the first and last send. "
        "*Locust CPU s*: user+system CPU of the master and workers over the run (startup "
        "included); *server CPU s*: the benchmark process's, nearly all the mock server's. "
        "*load*: 1-minute load average as the run started. A rate is *sustained* when a run has "
        f"send error P99 <= {TARGET_P99_MS:g} ms, no errors and every request sent.",
        "",
        "**This machine has 2 cores, and it is shared** (other sessions' test suites ran "
        "meanwhile: see `load`): the mock server, the Locust master and every worker compete for "
        "the same 2 cores, so adding workers here adds processes, not capacity. On machines of "
        "their own, workers add their cores.",
        "",
    ]
    lines = [
        f"## {now}, nice {a.nice}",
        "",
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}: "
        f"`{cmd}`; {a.duration:g} s of schedule per run. `uptime` before: `{uptime}`; after: "
        f"`{uptime_end}`.",
        "",
        f"### 1. One worker alone, rising rates ({a.runs} runs each; sustained: one run meets "
        "the target)",
        "",
        HEAD,
        sep,
        *(_row(r) for r in find),
        "",
        f"Sustained by one worker: {', '.join(f'{x:g}' for x in sustained) or 'none'} req/s; "
        + (
            f"broke at {broke:g} req/s."
            if broke is not None
            else "did not break up to the highest rate tried."
        ),  # fmt: skip
        "",
        f"### 2. At {at:g} req/s: one process, 1 worker, 2 workers (interleaved)",
        "",
        HEAD,
        sep,
        *(_row(r) for r in side),
        "",
    ]
    if scale:
        lines += [
            "### 3. Rate scaling with workers (same machine)",
            "",
            HEAD,
            sep,
            *(_row(r) for r in sorted(scale, key=lambda r: (r["workers"], r["rate"]))),
            "",
        ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    before = RESULTS.read_text() if a.append and RESULTS.exists() else "\n".join(header)
    RESULTS.write_text(before.rstrip("\n") + "\n\n" + "\n".join(lines))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
