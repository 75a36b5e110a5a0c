"""Results of a load run: summary statistics, text tables and PNG plots.

All client-side: TTFT, TBT and QoE come from the per-token arrival times the Locust users
recorded (:mod:`disco.loadgen.records`), aggregated with the core's metric functions
(``disco.scheduler.metrics``) so the live numbers and the simulator's are computed the same way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from disco.scheduler.metrics import percentile, qoe

from .records import RequestRecord


def summarize_records(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Aggregate one run. Latency aggregates use the successful requests; ``errors`` counts the
    rest (interrupted ones included)."""
    ok = [r for r in records if r.ok and r.token_times]
    ttft = np.array([r.ttft for r in ok], dtype=float)
    gaps = np.concatenate([np.diff(r.token_times) for r in ok]) if ok else np.zeros(0)
    lags = np.array([r.lag for r in records], dtype=float)
    q = np.array([qoe(np.asarray(r.token_times) + r.sent, r.sent) for r in ok], dtype=float)
    t_first = min((r.sent for r in records), default=0.0)
    t_last = max((r.end if r.end is not None else r.sent for r in records), default=0.0)
    span = max(t_last - t_first, 1e-9)
    tokens = sum(r.tokens for r in ok)

    def mean(a: np.ndarray) -> float | None:
        return float(a.mean()) if a.size else None

    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "tokens": tokens,
        "duration_s": span if records else 0.0,
        "throughput_rps": len(ok) / span if records else 0.0,
        "output_tokens_per_s": tokens / span if records else 0.0,
        "ttft_mean": mean(ttft),
        "ttft_p50": percentile(ttft, 50),
        "ttft_p90": percentile(ttft, 90),
        "ttft_p99": percentile(ttft, 99),
        "tbt_mean": mean(gaps),
        "tbt_p50": percentile(gaps, 50),
        "tbt_p99": percentile(gaps, 99),
        "qoe_mean": mean(q),
        "send_lag_p50": percentile(lags, 50),
        "send_lag_p99": percentile(lags, 99),
        "send_lag_max": float(lags.max()) if lags.size else None,
    }


def error_kinds(records: Sequence[RequestRecord], top: int = 5) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for r in records:
        if r.error:
            key = r.error.split(":")[0][:60]
            counts[key] = counts.get(key, 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])[:top]


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, default=str) + "\n", encoding="utf-8")


# --- tables ---------------------------------------------------------------------------------------

# column -> (header, scale, format): seconds shown as milliseconds where that reads better.
COLUMNS: dict[str, tuple[str, float, str]] = {
    "policy": ("policy", 1, "{}"),
    "label": ("run", 1, "{}"),
    "budget": ("budget", 1, "{:.2f}"),
    "requests": ("reqs", 1, "{:d}"),
    "errors": ("errors", 1, "{:d}"),
    "ttft_mean": ("TTFT mean ms", 1000, "{:.0f}"),
    "ttft_p50": ("TTFT P50 ms", 1000, "{:.0f}"),
    "ttft_p90": ("TTFT P90 ms", 1000, "{:.0f}"),
    "ttft_p99": ("TTFT P99 ms", 1000, "{:.0f}"),
    "tbt_mean": ("TBT mean ms", 1000, "{:.1f}"),
    "tbt_p99": ("TBT P99 ms", 1000, "{:.1f}"),
    "qoe_mean": ("QoE", 1, "{:.3f}"),
    "server_cost": ("server $", 1, "{:.2e}"),
    "device_energy_j": ("device J", 1, "{:.1f}"),
    "budget_used": ("budget used", 1, "{:.2f}"),
    "migrations": ("migr.", 1, "{:d}"),
    "send_lag_p99": ("send lag P99 ms", 1000, "{:.1f}"),
    "throughput_rps": ("req/s", 1, "{:.2f}"),
}


def format_cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    _, scale, fmt = COLUMNS.get(key, (key, 1, "{}"))
    try:
        return fmt.format(value * scale if scale != 1 else value)
    except (ValueError, TypeError):
        return str(value)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], markdown: bool = False) -> str:
    """A fixed-width (or Markdown) table of ``columns`` over ``rows``."""
    heads = [COLUMNS.get(c, (c, 1, ""))[0] for c in columns]
    cells = [[format_cell(c, row.get(c)) for c in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        lines += ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(heads)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*heads), *(fmt.format(*r) for r in cells)])


# --- plots ----------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, values: np.ndarray, label: str) -> None:
    v = np.sort(values)
    if v.size:
        ax.plot(v, np.arange(1, v.size + 1) / v.size, label=f"{label} (n={v.size})")


def plot_ttft_cdf(runs: Mapping[str, Sequence[RequestRecord]], path: str | Path) -> Path:
    """TTFT CDF, one curve per run (policy)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, recs in runs.items():
        _cdf(ax, np.array([r.ttft * 1000 for r in recs if r.ok and r.ttft is not None]), label)
    ax.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title="Time to first token")
    ax.set_xscale("log")
    return _finish_cdf(plt, fig, ax, path)


def _finish_cdf(plt, fig, ax, path: str | Path) -> Path:
    """Grid, legend (if any curve), save and close: the common tail of the CDF plots."""
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_tbt_cdf(runs: Mapping[str, Sequence[RequestRecord]], path: str | Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, recs in runs.items():
        gaps = [np.diff(r.token_times) * 1000 for r in recs if r.ok and r.tokens > 1]
        _cdf(ax, np.concatenate(gaps) if gaps else np.zeros(0), label)
    ax.set(xlabel="time between tokens (ms)", ylabel="fraction of gaps", title="TBT")
    ax.set_xscale("symlog", linthresh=1.0)
    return _finish_cdf(plt, fig, ax, path)


def plot_timeline(records: Sequence[RequestRecord], path: str | Path, bin_s: float = 1.0) -> Path:
    """Arrival rate (requests sent per second) and TTFT of each request over the run."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    sent = np.array([r.sent for r in records], dtype=float)
    if sent.size:
        edges = np.arange(0.0, sent.max() + bin_s, bin_s)
        if edges.size < 2:
            edges = np.array([0.0, bin_s])
        counts, _ = np.histogram(sent, bins=edges)
        ax1.step(edges[:-1], counts / bin_s, where="post")
    ax1.set(ylabel="requests/s sent", title="Load and latency over time")
    ok = [r for r in records if r.ok and r.ttft is not None]
    bad = [r for r in records if not r.ok]
    ax2.scatter([r.sent for r in ok], [r.ttft * 1000 for r in ok], s=6, label="TTFT")
    if bad:
        ax2.scatter([r.sent for r in bad], [1.0] * len(bad), s=12, marker="x", c="red",
                    label="error")  # fmt: skip
    ax2.set(xlabel="time since start (s)", ylabel="TTFT (ms)")
    ax2.set_yscale("log")
    if ax2.collections:
        ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_plots(runs: Mapping[str, Sequence[RequestRecord]], out_dir: str | Path) -> list[Path]:
    """TTFT and TBT CDFs over all runs, and one timeline per run."""
    out = Path(out_dir)
    paths = [plot_ttft_cdf(runs, out / "ttft_cdf.png"), plot_tbt_cdf(runs, out / "tbt_cdf.png")]
    for label, recs in runs.items():
        name = "timeline.png" if len(runs) == 1 else f"timeline_{_slug(label)}.png"
        paths.append(plot_timeline(recs, out / name))
    return paths


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)
