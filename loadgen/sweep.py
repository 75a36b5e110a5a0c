"""Load sweeps: one run per point of offered load, then one table and one figure of them all.

A point is an open-loop rate (``disco load --rates``: synthetic arrivals at that rate), a trace
speed-up (``--speedups``: the trace's own arrivals, replayed that much faster) or a closed-loop
concurrency (``--concurrencies``). Each point runs into its own folder ``DIR/<point>/`` (a full
``disco load`` output); ``DIR/sweep.json`` holds one row per (policy, point) and
``DIR/sweep.png`` draws TTFT P99 and goodput against the offered load, one curve per policy
(``disco demo --sweep`` draws every policy on one figure: their capacity curves).

Row keys (issue 13), in seconds, USD and requests/s: ``policy``, ``rate`` (requests/s offered)
or ``concurrency`` (closed-loop users), plus ``speedup`` for a trace speed-up sweep,
``requests``, ``errors`` (measured ones), ``ttft_p50``, ``ttft_p99``, ``tbt_p99`` (s),
``qoe_mean``, ``slo_attainment`` (fraction), ``goodput`` (requests/s meeting every SLO bound),
``server_cost`` (USD) and ``budget_used`` (fraction).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .report import _plt, table, write_json

KINDS = ("rate", "speedup", "concurrency")
# The row's keys after its load key(s), in order.
ROW_TAIL = ("requests", "errors", "ttft_p50", "ttft_p99", "tbt_p99", "qoe_mean",
            "slo_attainment", "goodput", "server_cost", "budget_used")  # fmt: skip
UNITS = (
    "rate and goodput: requests/s; ttft_*, tbt_p99: seconds; server_cost: USD; "
    "slo_attainment, budget_used, qoe_mean: fractions in [0, 1]; concurrency: closed-loop users; "
    "requests, errors: measured requests (warm-up and cool-down excluded)"
)
COST_NOTE = (
    "server_cost and budget_used: the device agents' counters over the point's whole run, "
    "warm-up and cool-down included (null when the targets are no disco agents)"
)


@dataclass(frozen=True, slots=True)
class Point:
    kind: str  # one of KINDS
    value: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown sweep kind {self.kind!r}")
        if not self.value > 0 or not math.isfinite(self.value):
            raise ValueError(f"a {self.kind} must be > 0, got {self.value}")
        if self.kind == "concurrency" and self.value != int(self.value):
            raise ValueError(f"a concurrency is a whole number of users, got {self.value}")

    @property
    def name(self) -> str:
        """The point's folder name: ``rate-2``, ``speedup-0.5``, ``concurrency-16``."""
        return f"{self.kind}-{self.value:g}"


def parse_points(kind: str, text: str) -> list[Point]:
    """``1,2,4`` -> points of ``kind``, in the order given; raises ValueError with the flag's
    name on a bad or repeated value."""
    flag = {"rate": "--rates", "speedup": "--speedups", "concurrency": "--concurrencies"}[kind]
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"{flag} is empty (e.g. {flag} 1,2,4)")
    points = []
    for x in items:
        try:
            v = float(x)
        except ValueError:
            raise ValueError(f"{flag}: {x!r} is not a number") from None
        try:
            points.append(Point(kind, int(v) if kind == "concurrency" and v == int(v) else v))
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None
    if len({p.value for p in points}) != len(points):
        raise ValueError(f"{flag} lists a value twice")
    return points


def row(
    policy: str | None,
    point: Point,
    summary: Mapping[str, Any],
    costs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One (policy, point) row from a run's ``summary.json`` (``disco load``'s keys); the cost
    and budget (``server_cost_usd``, ``budget_used``) from ``costs`` when given (``disco demo``
    has them from its devices and its scheduler's ledger), else from the summary."""
    costs = summary if costs is None else costs
    out: dict[str, Any] = {"policy": policy}
    if point.kind == "concurrency":
        out["concurrency"] = int(point.value)
    elif point.kind == "speedup":
        out["rate"] = summary.get("offered_rate_per_s")
        out["speedup"] = point.value
    else:
        out["rate"] = point.value
    out.update({
        "requests": summary.get("requests"), "errors": summary.get("errors"),
        "ttft_p50": summary.get("ttft_p50_s"), "ttft_p99": summary.get("ttft_p99_s"),
        "tbt_p99": summary.get("tbt_p99_s"), "qoe_mean": summary.get("qoe_mean"),
        "slo_attainment": summary.get("slo_attainment"), "goodput": summary.get("goodput_per_s"),
        "server_cost": costs.get("server_cost_usd"), "budget_used": costs.get("budget_used"),
    })  # fmt: skip
    return out


def point_info(policy: str | None, point: Point, summary: Mapping[str, Any], path: Path) -> dict:
    """What sweep.json keeps beside a row: where the run is and its achieved throughput."""
    return {
        "policy": policy, "point": point.name, "kind": point.kind, "value": point.value,
        "dir": str(path), "mode": summary.get("mode"), "scheduled": summary.get("scheduled"),
        "offered_rate_per_s": summary.get("offered_rate_per_s"),
        "ok_per_s": summary.get("ok_per_s"), "interrupted": summary.get("interrupted"),
    }  # fmt: skip


def x_key(kind: str) -> str:
    return "concurrency" if kind == "concurrency" else "rate"


def columns(kind: str) -> list[str]:
    return ["policy", x_key(kind), *(["speedup"] if kind == "speedup" else []), *ROW_TAIL]


def sweep_table(rows: Sequence[Mapping[str, Any]], kind: str, markdown: bool = False) -> str:
    return table(rows, columns(kind), markdown=markdown)


def plot_sweep(
    rows: Sequence[Mapping[str, Any]],
    kind: str,
    path: str | Path,
    slo: Mapping[str, Any] | None = None,
    title: str = "",
    throughput: Mapping[tuple[Any, Any], float | None] | None = None,
    offered: Mapping[Any, float | None] | None = None,
) -> Path:
    """TTFT P99 (left) and goodput (right) against the offered load, one curve per policy.
    Without an SLO (no goodput) the right panel shows the successful requests/s from
    ``throughput`` ((policy, x) -> requests/s) instead, and says so. A rate sweep's right panel
    also draws what the schedule sent in each point's measured window (``offered``: x ->
    requests/s; a Poisson sample is not exactly its rate), the most a policy can reach."""
    plt = _plt()
    xk = x_key(kind)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    policies = list(dict.fromkeys(r.get("policy") for r in rows))
    has_goodput = any(r.get("goodput") is not None for r in rows)
    for k, pol in enumerate(policies):
        mine = sorted((r for r in rows if r.get("policy") == pol and r.get(xk) is not None),
                      key=lambda r: r[xk])  # fmt: skip
        xs = [r[xk] for r in mine]
        colour, label = f"C{k % 10}", pol if pol is not None else "run"
        a1.plot(xs, [_nan(r.get("ttft_p99")) for r in mine], "o-", color=colour, label=label)
        if has_goodput:
            ys = [_nan(r.get("goodput")) for r in mine]
        else:
            ys = [_nan((throughput or {}).get((pol, r[xk]))) for r in mine]
        a2.plot(xs, ys, "o-", color=colour, label=label, gid=f"goodput:{label}")
    xlabel = (
        "closed-loop users (concurrency)" if xk == "concurrency" else "offered load (requests/s)"
    )
    a1.set(xlabel=xlabel, ylabel="TTFT P99 (s)", title="TTFT P99")
    if slo and slo.get("ttft_s") is not None:
        a1.axhline(slo["ttft_s"], color="red", ls="--", lw=1, label=f"TTFT SLO {slo['ttft_s']:g} s")
    bounds = ", ".join(f"{k.removesuffix('_s')} <= {v:g} s" for k, v in (slo or {}).items()
                       if v is not None)  # fmt: skip
    if has_goodput:
        a2.set(xlabel=xlabel, ylabel="goodput (requests/s)",
               title=f"Goodput: requests/s meeting {bounds}" if bounds else "Goodput")  # fmt: skip
    else:
        a2.set(xlabel=xlabel, ylabel="successful requests/s",
               title="Throughput (no --slo given: no goodput)")  # fmt: skip
    if xk == "rate":
        xs_all = sorted({r[xk] for r in rows if r.get(xk) is not None})
        sent = [(x, (offered or {}).get(x)) for x in xs_all]
        if sent and all(v is not None for _, v in sent):  # what keeping up with all would reach
            a2.plot([x for x, _ in sent], [v for _, v in sent], ls=":", marker=".", color="0.5",
                    lw=1, label="sent in the window (requests/s)")  # fmt: skip
        elif xs_all:
            a2.plot([0, xs_all[-1]], [0, xs_all[-1]], ls=":", color="0.6", lw=1,
                    label="= offered load")  # fmt: skip
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


def write_sweep(
    out_dir: str | Path,
    kind: str,
    rows: Sequence[Mapping[str, Any]],
    points: Sequence[Mapping[str, Any]],
    *,
    slo: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    title: str = "",
) -> list[Path]:
    """``sweep.json`` (rows, points, SLO, units, then ``meta``: provenance and configuration),
    ``sweep.md`` (the table) and ``sweep.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    xk = x_key(kind)
    throughput = {
        (p["policy"], r[xk]): p.get("ok_per_s") for p, r in zip(points, rows, strict=True)
    }
    offered: dict[Any, float | None] = {}
    for p, r in zip(points, rows, strict=True):
        if offered.get(r[xk]) is None:
            offered[r[xk]] = p.get("offered_rate_per_s")
    write_json(out / "sweep.json", {
        "kind": kind, "x": xk, "rows": list(rows), "points": list(points), "slo": slo,
        "units": UNITS, "notes": {"cost": COST_NOTE}, **(meta or {}),
    })  # fmt: skip
    plot_sweep(rows, kind, out / "sweep.png", slo, title, throughput, offered)
    md = [f"# Sweep over {kind}", "", sweep_table(rows, kind, markdown=True), "",
          f"Units: {UNITS}.", "", "![sweep](sweep.png)", ""]  # fmt: skip
    (out / "sweep.md").write_text("\n".join(md), encoding="utf-8")
    return [out / "sweep.json", out / "sweep.md", out / "sweep.png"]
