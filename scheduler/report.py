"""Writing sweep results: sim.json, sim.csv, a text table and PNG plots."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .simulator import ROW_KEYS


def write_rows(
    out_dir: Path, rows: Sequence[dict], meta: dict[str, Any], keys: Sequence[str] | None = None
) -> tuple[Path, Path]:
    """``sim.json`` = {"rows": [...], "meta": {...}} and ``sim.csv`` (columns ``keys``, default
    ``ROW_KEYS``); nothing time-dependent, so the same inputs and seed give byte-identical files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, cpath = out_dir / "sim.json", out_dir / "sim.csv"
    jpath.write_text(json.dumps({"rows": list(rows), "meta": meta}, indent=1, allow_nan=False) + "\n")
    with cpath.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(keys or ROW_KEYS), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return jpath, cpath


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) >= 10 ** (-nd) or v == 0 else f"{v:.2e}"
    return str(v)


TABLE_COLS = (
    ("policy", "policy"), ("budget", "b"), ("migration", "mig"), ("budget_used", "used"),
    ("ttft_mean", "ttft_mean"), ("ttft_p50", "p50"), ("ttft_p90", "p90"), ("ttft_p99", "p99"),
    ("tbt_p99", "tbt_p99"), ("qoe_mean", "qoe"), ("server_cost", "server_$"),
    ("device_energy_j", "energy_J"), ("migrations", "migr"),
)  # fmt: skip


# Shared devices (causal simulator, --users): refused requests, wait for a device slot (s).
DEVICE_QUEUE_COLS = (
    ("refused", "refused"), ("device_wait_mean", "dq_wait"), ("device_wait_p99", "dq_p99"),
)  # fmt: skip


def format_table(rows: Sequence[dict], extra: Sequence[tuple[str, str]] = ()) -> str:
    """The rows as a text table: ``TABLE_COLS`` and then the ``extra`` (key, header) columns."""
    cols = (*TABLE_COLS, *extra)
    head = [h for _, h in cols]
    body = [[_fmt(r.get(k)) for k, _ in cols] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def plot_rows(rows: Sequence[dict], out_dir: Path, title: str = "", dpi: int = 100) -> list[Path]:
    """TTFT (mean, P99) against budget per policy; cost against mean TTFT, migration on/off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    base_mig = not any(r["migration"] is False for r in rows)
    paths: list[Path] = []

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "ttft_mean", "mean TTFT (s)"), (axes[1], "ttft_p99", "P99 TTFT (s)")):
        for p in policies:
            rs = sorted((r for r in rows if r["policy"] == p and r["migration"] is base_mig),
                        key=lambda r: r["budget"])  # fmt: skip
            ax.plot([r["budget"] for r in rs], [r[key] for r in rs], marker="o", ms=3, label=p)
        ax.set_xlabel("budget b")
        ax.set_ylabel(label + ", log scale")
        ax.set_yscale("log")  # device-only sits far above the rest
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / "ttft_vs_budget.png")
    fig.savefig(paths[-1], dpi=dpi)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for mig, marker in ((False, "o"), (True, "^")):
        rs = [r for r in rows if r["migration"] is mig]
        if not rs:
            continue
        cost = [r["server_cost"] + (r.get("device_cost") or 0.0) for r in rs]
        ax.scatter([r["ttft_mean"] for r in rs], cost, marker=marker, s=14,
                   label=f"migration {'on' if mig else 'off'}")  # fmt: skip
    ax.set_xlabel("mean TTFT (s)")
    ax.set_ylabel("server + device-energy cost, USD (trace)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / "cost_vs_ttft.png")
    fig.savefig(paths[-1], dpi=dpi)
    plt.close(fig)
    return paths


def claim_failures(
    rows: Sequence[dict],
    budgets: Sequence[float],
    mean_tolerance: float = 0.10,
    budget_slack: float = 0.02,
    p99_tolerance: float = 0.0,
) -> dict[float, list[str]]:
    """The issue's claims per budget: DiSCo's P99 TTFT <= (1 + ``p99_tolerance``) x every
    baseline that stays within the budget (budget_used <= b + slack; race or the constrained
    endpoint alone do not), and DiSCo's mean TTFT within ``mean_tolerance`` of the oracle's.
    Returns the failures per budget."""
    out: dict[float, list[str]] = {}
    for b in budgets:
        at = {r["policy"]: r for r in rows if r["budget"] == b and not r["migration"]}
        d, fails = at["disco"], []
        for name, r in at.items():
            if name in ("disco", "oracle") or r["budget_used"] > b + budget_slack:
                continue
            if (1.0 + p99_tolerance) * r["ttft_p99"] < d["ttft_p99"]:
                fails.append(f"P99 {d['ttft_p99']:.3f} > {name} {r['ttft_p99']:.3f}")
        if "oracle" in at:
            gap = d["ttft_mean"] / at["oracle"]["ttft_mean"] - 1.0
            if gap > mean_tolerance:
                fails.append(f"mean {gap:+.1%} vs oracle")
        out[b] = fails
    return out
