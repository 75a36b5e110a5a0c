"""``disco bench soak``: the chaos testbed for a long time at a steady load, sampled (issue 15).

The testbed of :mod:`disco.cluster.chaos_bed` (no faults) runs the open-loop load of
:mod:`disco.cluster.chaos_load` for ``duration`` seconds. Every ``sample_every`` seconds a
sample records, per process:

- the processes the project starts (``project``): the agent actor, each fleet actor, the
  scheduler actor and each server replica, found by their own ``probe()`` (pid, live asyncio
  tasks on the actor's event loop; the scheduler adds its state size: a checkpoint's bytes and
  the outcomes it keeps; a replica its open engine streams). Replicas are probed through the
  Serve handle (the router picks; a few calls reach each);
- Ray's own processes (``ray``), reported apart: those the driver's node started (GCS, raylet,
  ...) and every other worker under the raylet, named by their process title (Serve's controller
  and proxy; idle workers summed as one ``IDLE`` series);
- this process (``bench``: the Ray driver and the load's client).

For each: RSS and open file descriptors (psutil, or /proc without it), plus Ray's object store
use (bytes, objects; Ray's raylet stats, a private API). ``soak.json`` holds the samples and, per
series, the value after warm-up (the first sample at or after ``warmup_s``), the last value, the
largest deviation from the warm-up value and the slope of a least-squares line through the
samples after warm-up, per hour (also as % of the warm-up value per hour); ``soak.png`` plots
them; ``samples.jsonl`` gets each sample as it is taken.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from disco.cluster.chaos_load import LoadOptions, OpenLoop

MIB = 1024 * 1024


# ---- one process's RSS and file descriptors ----------------------------------------------------


def proc_stats(pid: int) -> dict[str, float] | None:
    """RSS (MiB) and open file descriptors of ``pid``; None if it is gone."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            p = psutil.Process(pid)
            return {"rss_mib": p.memory_info().rss / MIB, "fds": float(p.num_fds())}
        except (psutil.Error, OSError):
            return None
    try:  # /proc (Linux)
        rss = next(
            int(line.split()[1]) * 1024
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )
        return {"rss_mib": rss / MIB, "fds": float(len(os.listdir(f"/proc/{pid}/fd")))}
    except (OSError, StopIteration, ValueError):
        return None


def _title(pid: int) -> str:
    """A Ray worker's process title without its current method (``ray::ServeController``)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return f"pid{pid}"
    name = raw.removeprefix("ray::").split(" ")[0]
    return name.split(".")[0].split("(")[0] or f"pid{pid}"


def _children(pid: int) -> list[int]:
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:  # noqa: BLE001 - no psutil, or gone: /proc
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    stat = Path(f"/proc/{d}/stat").read_text()
                    if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
        return out


# ---- what to sample ----------------------------------------------------------------------------


class Sampler:
    """Finds the testbed's processes and samples them (module docstring)."""

    def __init__(self, bed: Any, probe_calls: int = 12) -> None:
        self.bed = bed
        self.probe_calls = probe_calls
        self.replica_pids: dict[str, int] = {}  # replica id -> pid (kept between samples)
        self._store_state: Any = None

    def probes(self) -> dict[str, dict[str, Any]]:
        """label -> the actor's probe() answer (pid, tasks, ...)."""
        import ray

        bed, out = self.bed, {}
        calls: list[tuple[str, Any]] = [("scheduler", bed.scheduler.probe.remote())]
        if bed.agent is not None:
            calls.append(("agent", bed.agent.probe.remote()))
        for slot in bed.fleets.values():
            if slot.up:
                calls.append((f"fleet{slot.index}", slot.handle.probe.remote()))
        for label, ref in calls:
            with contextlib.suppress(Exception):
                out[label] = ray.get(ref, timeout=30)
        responses = [bed.server_handle.probe.remote() for _ in range(self.probe_calls)]
        for r in responses:
            with contextlib.suppress(Exception):
                p = r.result(timeout_s=30)
                label = f"replica:{p['replica']}"
                out.setdefault(label, p)
                self.replica_pids[p["replica"]] = p["pid"]
        for rid, pid in self.replica_pids.items():  # not reached this time: still sampled
            out.setdefault(f"replica:{rid}", {"pid": pid})
        return out

    def ray_pids(self, project: set[int]) -> dict[str, list[int]]:
        """Ray's own processes: label -> pids (module docstring)."""
        import ray

        out: dict[str, list[int]] = {}
        raylets: list[int] = []
        with contextlib.suppress(Exception):
            node = ray._private.worker._global_node
            for kind, infos in node.all_processes.items():
                for info in infos:
                    pid = info.process.pid
                    out.setdefault(str(kind), []).append(pid)
                    if str(kind) == "raylet":
                        raylets.append(pid)
        for raylet in raylets:
            for pid in _children(raylet):
                if pid not in project:
                    out.setdefault(_title(pid), []).append(pid)
        return out

    def object_store(self) -> dict[str, float] | None:
        """Bytes and objects in Ray's object store now (the raylet's stats)."""
        import ray

        try:
            from ray._private import internal_api

            if self._store_state is None:
                gcs = ray.get_runtime_context().gcs_address
                self._store_state = internal_api.get_state_from_address(gcs)
            reply = internal_api.get_memory_info_reply(self._store_state, timeout_seconds=10)
            s = reply.store_stats
            return {"used_mib": s.object_store_bytes_used / MIB,
                    "objects": float(s.num_local_objects)}  # fmt: skip
        except Exception:  # noqa: BLE001 - a private API that moved: reported as missing
            return None

    def sample(self, t: float) -> dict[str, Any]:
        probes = self.probes()
        project = {int(p["pid"]) for p in probes.values() if "pid" in p}
        procs: dict[str, dict[str, Any]] = {}
        for label, p in probes.items():
            st = proc_stats(int(p["pid"]))
            if st is not None:
                procs[label] = st | {k: p[k] for k in ("tasks", "state_bytes", "recent", "ongoing")
                                     if k in p}  # fmt: skip
        ray_procs: dict[str, dict[str, Any]] = {}
        for label, pids in self.ray_pids(project | {os.getpid()}).items():
            stats = [s for s in (proc_stats(pid) for pid in pids) if s is not None]
            if stats:
                ray_procs[label] = {"rss_mib": sum(s["rss_mib"] for s in stats),
                                    "fds": sum(s["fds"] for s in stats),
                                    "processes": float(len(stats))}  # fmt: skip
        bench = proc_stats(os.getpid()) or {}
        return {"t": t, "project": procs, "ray": ray_procs, "bench": bench,
                "object_store": self.object_store()}  # fmt: skip


# ---- growth ------------------------------------------------------------------------------------


def growth(ts: Sequence[float], values: Sequence[float], warmup_s: float) -> dict[str, Any] | None:
    """The series after ``warmup_s``: its first value there, the last, the largest deviation
    from the first, and a least-squares slope per hour (absolute and % of the first)."""
    pts = [(t, v) for t, v in zip(ts, values, strict=True) if t >= warmup_s and v is not None]
    if not pts:
        return None
    t, v = np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float)
    first = float(v[0])
    slope = float(np.polyfit(t / 3600.0, v, 1)[0]) if len(pts) >= 3 and np.ptp(t) > 0 else None
    rel = (lambda x: None if first == 0 or x is None else 100.0 * x / first)  # noqa: E731
    dev = float(np.max(np.abs(v - first)))
    return {"after_warmup": first, "last": float(v[-1]), "samples": len(pts),
            "max_dev": dev, "max_dev_pct": rel(dev), "change_pct": rel(float(v[-1]) - first),
            "slope_per_h": slope, "slope_pct_per_h": rel(slope)}  # fmt: skip


def series(samples: Sequence[dict[str, Any]]) -> dict[str, dict[str, list]]:
    """(group:label, metric) -> aligned (t, value) lists over the samples."""
    out: dict[str, dict[str, list]] = {}

    def add(key: str, metric: str, t: float, v: Any) -> None:
        s = out.setdefault(key, {}).setdefault(metric, [[], []])
        s[0].append(t)
        s[1].append(None if v is None else float(v))

    for smp in samples:
        t = smp["t"]
        for group in ("project", "ray"):
            for label, st in smp[group].items():
                for metric, v in st.items():
                    add(f"{group}:{label}", metric, t, v)
        for metric, v in (smp.get("bench") or {}).items():
            add("bench", metric, t, v)
        if smp.get("object_store") is not None:
            for metric, v in smp["object_store"].items():
                add("object_store", metric, t, v)
    return out


def analyse(samples: Sequence[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, metrics in series(samples).items():
        out[key] = {m: growth(t, v, warmup_s) for m, (t, v) in metrics.items()}
    return out


# ---- the plot ----------------------------------------------------------------------------------


def plot_soak(samples: Sequence[dict[str, Any]], warmup_s: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = series(samples)
    fig, axes = plt.subplots(3, 2, figsize=(13, 11), sharex=True)
    panels = (
        (axes[0][0], "project:", "rss_mib", "RSS (MiB): the project's processes"),
        (axes[1][0], "ray:", "rss_mib", "RSS (MiB): Ray's own processes"),
        (axes[1][1], "project:", "fds", "open file descriptors: the project's processes"),
        (axes[2][0], "project:", "tasks", "live asyncio tasks per actor"),
    )
    for ax, prefix, metric, title in panels:
        for key in sorted(k for k in s if k.startswith(prefix) and metric in s[k]):
            t, v = s[key][metric]
            ax.plot(np.array(t) / 60.0, v, lw=0.9, label=key.split(":", 1)[1])
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    ax = axes[0][1]  # the goal: RSS within 5 % of its value after warm-up
    for key in sorted(k for k in s if k.startswith("project:") and "rss_mib" in s[k]):
        t, v = (np.array(x, dtype=float) for x in s[key]["rss_mib"])
        after = np.flatnonzero(t >= warmup_s)
        if after.size:
            ax.plot(t[after] / 60.0, 100.0 * (v[after] / v[after[0]] - 1.0), lw=0.9,
                    label=key.split(":", 1)[1])  # fmt: skip
    ax.axhspan(-5, 5, color="green", alpha=0.06)
    ax.set_title("RSS change since warm-up (%): the project's processes (band: +-5 %)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    ax = axes[2][1]
    if "project:scheduler" in s and "state_bytes" in s["project:scheduler"]:
        t, v = s["project:scheduler"]["state_bytes"]
        ax.plot(np.array(t) / 60.0, np.array(v, dtype=float) / 1024.0, lw=0.9,
                label="scheduler state (KiB)")  # fmt: skip
    if "object_store" in s:
        t, v = s["object_store"]["used_mib"]
        ax.plot(np.array(t) / 60.0, np.array(v, dtype=float) * 1024.0, lw=0.9, ls="--",
                label="object store used (KiB)")  # fmt: skip
    ax.set_title("the scheduler's state and Ray's object store", fontsize=9)
    ax.legend(fontsize=6)
    for row in axes:
        for a in row:
            a.axvline(warmup_s / 60.0, color="gray", ls=":", lw=0.8)
    for a in axes[2]:
        a.set_xlabel("minutes since the load started")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SoakOptions:
    duration_s: float = 1800.0
    out: str = "soak-out"
    rate: float = 3.0
    sample_every_s: float = 10.0
    warmup_s: float | None = None  # None: 10 % of the duration, at least 2 samples, <= 300 s
    seed: int = 0
    replicas: int = 2
    fleets: int = 2
    devices_per_fleet: int = 4
    agent: bool = True

    def warmup(self) -> float:
        if self.warmup_s is not None:
            return self.warmup_s
        return min(300.0, max(0.1 * self.duration_s, 2 * self.sample_every_s))


async def _drive(
    bed: Any, opts: SoakOptions, log: Path | None = None
) -> tuple[OpenLoop, list[dict[str, Any]]]:
    t0 = time.monotonic()
    load = OpenLoop(
        LoadOptions(rate=opts.rate, duration_s=opts.duration_s, drain_s=60.0, seed=opts.seed,
                    agent_id=bed.config.agent.device_id),
        bed.targets, clock_origin=t0,
    )  # fmt: skip
    sampler = Sampler(bed)
    samples: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def sample_loop() -> None:
        k = 0
        while not done.is_set():
            due = k * opts.sample_every_s
            if due > opts.duration_s:
                break
            delay = due - load.now()
            if delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(done.wait(), delay)
                if done.is_set():
                    break
            samples.append(await asyncio.to_thread(sampler.sample, load.now()))
            if log is not None:  # as it goes: an interrupted soak keeps what it sampled
                with log.open("a") as fh:
                    fh.write(json.dumps(samples[-1]) + "\n")
            k += 1

    async def load_then_stop() -> None:
        try:
            await load.run()
        finally:
            done.set()

    await asyncio.gather(load_then_stop(), sample_loop())
    return load, samples


def run_soak(opts: SoakOptions) -> dict[str, Any]:
    """Bring the testbed up, run the load while sampling, write ``soak.json`` and ``soak.png``;
    returns the summary. Always tears down what it started (its own Ray included)."""
    from disco.cluster.chaos_bed import BedOptions, ChaosBed

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    bed_opts = BedOptions(seed=opts.seed, replicas=opts.replicas, fleets=opts.fleets,
                          devices_per_fleet=opts.devices_per_fleet, agent=opts.agent)  # fmt: skip
    t_start = time.monotonic()
    bed = ChaosBed(bed_opts, out)
    try:
        bed.start()
        bed.wait_ready()
        (out / "samples.jsonl").unlink(missing_ok=True)
        load, samples = asyncio.run(_drive(bed, opts, out / "samples.jsonl"))
    finally:
        bed.shutdown()
    warmup = opts.warmup()
    growth_by = analyse(samples, warmup)
    finished = sum(r.complete for r in load.records)
    summary: dict[str, Any] = {
        "duration_s": opts.duration_s, "warmup_s": warmup, "samples": len(samples),
        "requests": len(load.records), "finished": finished,
        "wall_s": time.monotonic() - t_start,
        "growth": growth_by,
        "flat": flatness(samples, warmup),
        "options": asdict(opts),
        "sample_list": samples,
    }  # fmt: skip
    (out / "soak.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_soak(samples, warmup, out / "soak.png")
    return summary


def _quarters(ts: Sequence[float], vs: Sequence[float | None], warmup_s: float) -> tuple:
    """Means of the first and the last quarter of the samples after warm-up (None: too few)."""
    v = [x for t, x in zip(ts, vs, strict=True) if t >= warmup_s and x is not None]
    if len(v) < 4:
        return None, None
    q = len(v) // 4
    return float(np.mean(v[:q])), float(np.mean(v[-q:]))


def flatness(samples: Sequence[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """The issue's goals, per project process: RSS within 5 % of its value after warm-up (at
    every sample); open fds and live tasks flat (they follow the streams in flight, so: the mean
    of the last quarter of the samples after warm-up at most max(2, 10 %) above the first
    quarter's)."""
    out: dict[str, Any] = {}
    for key, metrics in series(samples).items():
        if not key.startswith("project:"):
            continue
        row: dict[str, Any] = {}
        rss = growth(*metrics["rss_mib"], warmup_s) if "rss_mib" in metrics else None
        row["rss_within_5pct"] = None if rss is None or rss["max_dev_pct"] is None \
            else rss["max_dev_pct"] <= 5.0
        for metric, name in (("fds", "fds_flat"), ("tasks", "tasks_flat")):
            first, last = _quarters(*metrics[metric], warmup_s) if metric in metrics else (None,) * 2
            row[name] = None if first is None else last <= first + max(2.0, 0.1 * first)
            if first is not None:
                row[f"{metric}_quarters"] = [round(first, 2), round(last, 2)]
        out[key] = row
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="disco bench soak",
        description="The chaos testbed at a steady load for a long time, sampled; soak.json "
        "+ soak.png.",
    )
    p.add_argument("--duration", type=float, default=1800.0, help="seconds (default 1800)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--rate", type=float, default=3.0, help="requests per second (default 3)")
    p.add_argument("--sample-every", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds before growth is measured (default 10%% of the run, <= 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-agent", action="store_true", help="no llama.cpp agent")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from disco.cluster.chaos import _sigterm_as_interrupt

    a = parser().parse_args(argv)
    if a.duration <= 0 or a.sample_every <= 0 or a.rate <= 0:
        print("--duration, --sample-every and --rate must be > 0", file=sys.stderr)
        return 2
    opts = SoakOptions(duration_s=a.duration, out=a.out, rate=a.rate,
                       sample_every_s=a.sample_every, warmup_s=a.warmup, seed=a.seed,
                       agent=not a.no_agent)  # fmt: skip
    _sigterm_as_interrupt()
    s = run_soak(opts)
    print(f"{s['samples']} samples over {s['duration_s']:.0f} s, {s['requests']} requests "
          f"({s['finished']} finished); warm-up {s['warmup_s']:.0f} s")  # fmt: skip
    for key, m in sorted(s["growth"].items()):
        parts = []
        for metric in ("rss_mib", "fds", "tasks", "state_bytes", "used_mib"):
            g = m.get(metric)
            if g:
                slope = g["slope_per_h"]
                parts.append(f"{metric} {g['after_warmup']:.1f}->{g['last']:.1f}"
                             + (f" ({slope:+.1f}/h)" if slope is not None else ""))  # fmt: skip
        print(f"  {key:<34} " + "; ".join(parts))
    print(f"wrote {Path(a.out) / 'soak.json'} and {Path(a.out) / 'soak.png'}")
    return 0


__all__ = ["SoakOptions", "Sampler", "analyse", "growth", "main", "proc_stats", "run_soak"]
