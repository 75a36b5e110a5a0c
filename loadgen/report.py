"""Results of a load run: summary statistics, text tables and PNG plots.

All client-side: TTFT, TBT and QoE come from the per-token arrival times the Locust users
recorded (:mod:`disco.loadgen.records`), aggregated with the core's metric functions
(``disco.scheduler.metrics``) so the live numbers and the simulator's are computed the same way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from disco.scheduler.metrics import percentile, qoe

from .records import RequestRecord

if TYPE_CHECKING:
    from .slo import SLO

# Every numeric key of a summary carries its unit: times in seconds (``_s``), money in US dollars
# (``_usd``), energy in joules (``_j``), rates per second (``_per_s``); a key without one counts
# what it names (requests, tokens, hand-overs) or is a fraction in [0, 1] (``qoe_mean``,
# ``budget_used``). Names shared with ``disco demo`` (its device-side counters and its
# scheduler's ledger) are the same: ``server_cost_usd``, ``device_energy_j``, ``migrations``,
# ``tokens_server``, ``tokens_device``, ``first_from_server``, ``first_from_device``.
UNITS_NOTE = (
    "times in seconds (_s), money in USD (_usd), energy in joules (_j), rates per second "
    "(_per_s); no suffix: a count of what the key names, or a fraction in [0, 1] (qoe_mean, "
    "budget_used, slo_attainment)"
)
STREAM_NOTE = (
    "first_from_*, tokens_*, handovers, requests_with_handover: the successful requests' "
    "streams, each token's endpoint from its SSE chunk's disco.source (unknown: the target "
    "does not tag its tokens); a hand-over is a change of endpoint mid-stream, a migration or "
    "a failover (the stream does not say which)"
)
BUDGET_NOTE = (
    "budget_used: the share of prompt tokens the constrained endpoint prefilled over the run, "
    "every leg that started charged (race losers included), from the agents' own /metrics "
    "(prefill_tokens_total / prompt_tokens_total, after minus before the run); regime: the "
    "agents' budget_regime. Null when the targets are no disco agents or disagree on the regime"
)
COUNTER_KEYS = ("migrations", "failovers", "server_cost_usd", "device_energy_j")


def summarize_records(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Aggregate one run from the user's side. Every aggregate uses the successful requests
    (``errors`` counts the rest, interrupted ones included); the send lag uses all of them."""
    ok = [r for r in records if r.ok and r.token_times]
    ttft = np.array([r.ttft for r in ok], dtype=float)
    gaps = np.concatenate([np.diff(r.token_times) for r in ok]) if ok else np.zeros(0)
    lags = np.array([r.lag for r in records], dtype=float)
    q = np.array([qoe(np.asarray(r.token_times) + r.sent, r.sent) for r in ok], dtype=float)
    t_first = min((r.sent for r in records), default=0.0)
    t_last = max((r.end if r.end is not None else r.sent for r in records), default=0.0)
    span = max(t_last - t_first, 1e-9)
    tokens = sum(r.tokens for r in ok)
    sources = [s for r in ok for s in r.sources]
    firsts = [r.first_source for r in ok]
    handed = [len(r.handovers) for r in ok]

    def mean(a: np.ndarray) -> float | None:
        return float(a.mean()) if a.size else None

    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "tokens": tokens,
        "duration_s": span if records else 0.0,
        "ok_per_s": len(ok) / span if records else 0.0,
        "output_tokens_per_s": tokens / span if records else 0.0,
        "ttft_mean_s": mean(ttft),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "ttft_p99_s": percentile(ttft, 99),
        "tbt_mean_s": mean(gaps),
        "tbt_p50_s": percentile(gaps, 50),
        "tbt_p99_s": percentile(gaps, 99),
        "qoe_mean": mean(q),
        "send_lag_p50_s": percentile(lags, 50),
        "send_lag_p99_s": percentile(lags, 99),
        "send_lag_max_s": float(lags.max()) if lags.size else None,
        "first_from_server": firsts.count("server"),
        "first_from_device": firsts.count("device"),
        "first_from_unknown": sum(1 for s in firsts if s not in ("server", "device")),
        "tokens_server": sources.count("server"),
        "tokens_device": sources.count("device"),
        "tokens_unknown_source": sum(1 for s in sources if s not in ("server", "device")),
        "handovers": sum(handed),
        "requests_with_handover": sum(1 for h in handed if h),
    }


def device_side(counters: Mapping[str, float] | str | None) -> dict[str, Any]:
    """The keys only the device agents know: their counters' increase over the run
    (:func:`disco.loadgen.counters.run_counters`), or null with the reason; budget and regime
    are always null for the load generator (``BUDGET_NOTE``)."""
    notes = {"units": UNITS_NOTE, "stream": STREAM_NOTE, "budget": BUDGET_NOTE}
    raw: dict[str, Any] | None = None
    if isinstance(counters, Mapping):
        raw = {
            k: v if k in ("server_cost_usd", "device_energy_j") else int(round(v))
            for k, v in counters.items()
        }
        vals: dict[str, Any] = {k: raw.get(k) for k in COUNTER_KEYS}
        notes["counters"] = (
            ", ".join(COUNTER_KEYS) + ": the targets' own /metrics counters, after minus before "
            "the run (any other traffic those agents served meanwhile is included)"
        )  # fmt: skip
    else:
        vals = dict.fromkeys(COUNTER_KEYS)
        notes["counters"] = (
            ", ".join(COUNTER_KEYS) + ": null: only the device agents count these (their "
            f"/metrics), and they could not be read: {counters or 'not read'}"
        )
    regime, used = None, None
    if raw is not None:
        sides = [x for x in ("server", "device") if raw.pop(f"regime_{x}", 0)]
        regime = sides[0] if len(sides) == 1 else None
        if regime is not None and raw.get("prompt_tokens"):
            used = raw.get(f"prefill_{regime}", 0) / raw["prompt_tokens"]
    return {**vals, "refused": raw.get("refused") if raw else None, "regime": regime,
            "budget_used": used, "agent_counters": raw, "notes": notes}  # fmt: skip


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
    # disco load's summary keys (units in the name; see UNITS_NOTE)
    "ttft_mean_s": ("TTFT mean ms", 1000, "{:.0f}"),
    "ttft_p50_s": ("TTFT P50 ms", 1000, "{:.0f}"),
    "ttft_p90_s": ("TTFT P90 ms", 1000, "{:.0f}"),
    "ttft_p99_s": ("TTFT P99 ms", 1000, "{:.0f}"),
    "tbt_mean_s": ("TBT mean ms", 1000, "{:.1f}"),
    "tbt_p50_s": ("TBT P50 ms", 1000, "{:.1f}"),
    "tbt_p99_s": ("TBT P99 ms", 1000, "{:.1f}"),
    "send_lag_p99_s": ("send lag P99 ms", 1000, "{:.1f}"),
    "ok_per_s": ("req/s", 1, "{:.2f}"),
    "duration_s": ("duration s", 1, "{:.1f}"),
    "first_from_server": ("1st tok server", 1, "{:d}"),
    "first_from_device": ("1st tok device", 1, "{:d}"),
    "tokens_server": ("tokens server", 1, "{:d}"),
    "tokens_device": ("tokens device", 1, "{:d}"),
    "handovers": ("hand-overs", 1, "{:d}"),
    "failovers": ("failovers", 1, "{:d}"),
    "server_cost_usd": ("server $", 1, "{:.2e}"),
    # SLO and sweeps (disco.loadgen.slo, disco.loadgen.sweep)
    "slo_attainment": ("SLO met", 100, "{:.1f} %"),
    "goodput_per_s": ("goodput/s", 1, "{:.2f}"),
    "goodput": ("goodput/s", 1, "{:.2f}"),
    "rate": ("rate/s", 1, "{:.3g}"),
    "speedup": ("speedup", 1, "{:g}"),
    "concurrency": ("users", 1, "{:d}"),
    "offered_rate_per_s": ("offered/s", 1, "{:.2f}"),
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


def plot_ttft_cdf(
    runs: Mapping[str, Sequence[RequestRecord]], path: str | Path, slo: SLO | None = None
) -> Path:
    """TTFT CDF, one curve per run (policy); with an SLO that bounds TTFT, a vertical line at
    the bound and each run's share of requests within it in the legend."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, recs in runs.items():
        ttft = np.array([r.ttft * 1000 for r in recs if r.ok and r.ttft is not None])
        if slo is not None and slo.ttft_s is not None and len(recs):
            within = float(np.sum(ttft <= slo.ttft_s * 1000)) / len(recs)
            label = f"{label}, {100 * within:.0f} % within"
        _cdf(ax, ttft, label)
    ax.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title="Time to first token")
    ax.set_xscale("log")
    _slo_line(ax, slo, "ttft_s", "TTFT SLO")
    return _finish_cdf(plt, fig, ax, path)


def _slo_line(ax, slo: SLO | None, part: str, what: str) -> None:
    """A dashed vertical line at the SLO's bound ``part`` (seconds; the axis is in ms)."""
    bound = None if slo is None else getattr(slo, part)
    if bound is not None:
        ax.axvline(bound * 1000, color="red", ls="--", lw=1, gid=f"slo:{part}",
                   label=f"{what} {bound * 1000:g} ms")  # fmt: skip


def _finish_cdf(plt, fig, ax, path: str | Path) -> Path:
    """Grid, legend (if any curve), save and close: the common tail of the CDF plots."""
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_tbt_cdf(
    runs: Mapping[str, Sequence[RequestRecord]], path: str | Path, slo: SLO | None = None
) -> Path:
    """CDF of every gap between tokens; with an SLO that bounds TBT (each request's largest
    gap), a vertical line at the bound."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, recs in runs.items():
        gaps = [np.diff(r.token_times) * 1000 for r in recs if r.ok and r.tokens > 1]
        _cdf(ax, np.concatenate(gaps) if gaps else np.zeros(0), label)
    ax.set(xlabel="time between tokens (ms)", ylabel="fraction of gaps", title="TBT")
    ax.set_xscale("symlog", linthresh=1.0)
    _slo_line(ax, slo, "tbt_s", "SLO on each request's largest gap:")
    return _finish_cdf(plt, fig, ax, path)


def plot_load(records: Sequence[RequestRecord], path: str | Path, bin_s: float = 1.0) -> Path:
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
    missed = [r for r in ok if r.slo_ok is False]  # met its TTFT maybe, not every bound
    ok = [r for r in ok if r.slo_ok is not False]
    ax2.scatter([r.sent for r in ok], [r.ttft * 1000 for r in ok], s=6,
                label="TTFT" + (" (met the SLO)" if missed else ""))  # fmt: skip
    if missed:
        ax2.scatter([r.sent for r in missed], [r.ttft * 1000 for r in missed], s=8,
                    c="tab:orange", label="TTFT (missed the SLO)")  # fmt: skip
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


# Token marks by the endpoint that produced them; None: the stream did not say.
SOURCE_COLOURS: dict[str | None, str] = {"server": "tab:blue", "device": "tab:orange", None: "0.5"}
TIMELINE_MAX_REQUESTS = 300


def timeline_sample(
    records: Sequence[RequestRecord], max_requests: int = TIMELINE_MAX_REQUESTS
) -> list[RequestRecord]:
    """The requests a timeline shows, in send order: all of them up to ``max_requests``, else
    ``max_requests`` spread evenly over the send order (deterministic)."""
    recs = sorted(records, key=lambda r: (r.sent, r.id))
    if len(recs) <= max_requests:
        return recs
    idx = np.unique(np.linspace(0, len(recs) - 1, max_requests).round().astype(int))
    return [recs[i] for i in idx]


def timeline_figure(
    records: Sequence[RequestRecord], label: str = "", max_requests: int = TIMELINE_MAX_REQUESTS
):
    """One row per request (first sent on top): a bar from its send to its end (darker while it
    waits for its first token), a mark per token at its arrival, coloured by the endpoint that
    produced it, a diamond where another endpoint took over (migration or failover), a red x at
    a failed request's end. Over ``max_requests`` requests, an even sample (said in the title).

    Returns the matplotlib figure; its marks are collections with a ``gid``: ``tokens:server``,
    ``tokens:device``, ``tokens:unknown``, ``handovers``, ``errors``."""
    plt = _plt()
    shown = timeline_sample(records, max_requests)
    n_rows = len(shown)
    height = min(2.6 + 0.04 * n_rows, 14.0)
    fig, ax = plt.subplots(figsize=(9, height))
    y = np.arange(n_rows)
    sent = np.array([r.sent for r in shown], dtype=float)
    last = np.array([r.token_times[-1] if r.token_times else 0.0 for r in shown], dtype=float)
    end = np.array(
        [r.end if r.end is not None else r.sent + t for r, t in zip(shown, last, strict=True)]
    )
    first = np.array(
        [r.sent + r.ttft if r.ttft is not None else e for r, e in zip(shown, end, strict=True)]
    )
    if n_rows:
        ax.barh(y, first - sent, left=sent, height=0.7, color="0.8")  # waiting for 1st token
        ax.barh(y, end - first, left=first, height=0.7, color="0.93")  # streaming
    # Marks about as tall as a row: (points per row)^2.
    row_pt = 72 * height * 0.75 / max(n_rows, 1)
    size = float(np.clip(row_pt * 0.8, 2, 12)) ** 2
    points: dict[str | None, tuple[list[float], list[int]]] = {s: ([], []) for s in SOURCE_COLOURS}
    for i, r in enumerate(shown):
        for t, s in zip(r.token_times, r.sources, strict=True):
            xs, ys = points[s if s in SOURCE_COLOURS else None]
            xs.append(r.sent + t)
            ys.append(i)
    handles: list[Any] = [_patch("0.8", "waiting for 1st token"), _patch("0.93", "streaming")]
    for src, colour in SOURCE_COLOURS.items():
        name = src or "unknown"
        xs, ys = points[src]
        if xs or src is not None:  # server and device always (a test finds them by gid)
            ax.scatter(xs, ys, marker="|", s=size, c=colour, linewidths=0.7, gid=f"tokens:{name}")
            handles.append(_mark("|", f"{name} token", color=colour, ms=9, mew=1.5))
    hx = [r.sent + r.token_times[k] for r in shown for k in r.handovers]
    hy = [i for i, r in enumerate(shown) for _ in r.handovers]
    ax.scatter(hx, hy, marker="D", s=max(size, 16), facecolors="none", edgecolors="k",
               linewidths=0.9, gid="handovers")  # fmt: skip
    handles.append(_mark("D", "hand-over (migration or failover)", mfc="none", mec="k", ms=6))
    bad = [(e, i) for i, (r, e) in enumerate(zip(shown, end, strict=True)) if not r.ok]
    ax.scatter([e for e, _ in bad], [i for _, i in bad], marker="x", s=max(size, 16), c="red",
               gid="errors")  # fmt: skip
    handles.append(_mark("x", "error", color="red", ms=6))
    ax.set_ylim(n_rows - 0.5, -0.5)  # the first request sent on top
    if n_rows > 40:
        ax.set_yticks([])
    ax.set(xlabel="seconds since the run started", ylabel="requests, in send order")
    n = len(records)
    what = (
        f"{n_rows} of {n} requests (even sample by send order)" if n_rows < n else f"{n} requests"
    )
    ax.set_title(f"Per-request timeline{': ' + label if label else ''} — {what}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    # The legend from stand-ins: marks in a dense plot are too small to read in a legend.
    ax.legend(handles=handles, fontsize=7, ncol=4, loc="upper center",
              bbox_to_anchor=(0.5, -0.45 / height - 0.05))  # fmt: skip
    return fig


def _patch(colour: str, label: str) -> Any:
    from matplotlib.patches import Patch

    return Patch(color=colour, label=label)


def _mark(marker: str, label: str, **kw: Any) -> Any:
    from matplotlib.lines import Line2D

    return Line2D([], [], ls="", marker=marker, label=label, **kw)


def plot_request_timeline(
    records: Sequence[RequestRecord],
    path: str | Path,
    label: str = "",
    max_requests: int = TIMELINE_MAX_REQUESTS,
) -> Path:
    """:func:`timeline_figure`, saved as a PNG."""
    plt = _plt()
    fig = timeline_figure(records, label, max_requests)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def write_plots(
    runs: Mapping[str, Sequence[RequestRecord]], out_dir: str | Path, slo: SLO | None = None
) -> list[Path]:
    """TTFT and TBT CDFs over all runs (the SLO's bounds marked); per run, the per-request
    timeline and the load over time (``timeline.png``/``load.png`` for one run,
    ``timeline_<label>.png``/``load_<label>.png``). Give the measured records only (warm-up and
    cool-down are excluded from every figure: :func:`disco.loadgen.phases.measured`)."""
    out = Path(out_dir)
    paths = [plot_ttft_cdf(runs, out / "ttft_cdf.png", slo),
             plot_tbt_cdf(runs, out / "tbt_cdf.png", slo)]  # fmt: skip
    for label, recs in runs.items():
        tail = ".png" if len(runs) == 1 else f"_{_slug(label)}.png"
        paths.append(plot_request_timeline(recs, out / f"timeline{tail}", label))
        paths.append(plot_load(recs, out / f"load{tail}"))
    return paths


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)
