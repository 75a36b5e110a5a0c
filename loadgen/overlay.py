"""Several finished load runs side by side: one figure (TTFT CDF, TBT CDF, a legend entry per run
label) and one Markdown table (one column per run). What ``disco load --overlay`` writes.

A run is a ``disco load --out`` folder (or one policy's folder of ``disco demo``): its
``summary.json`` gives the label and the device agents' counters, its ``requests.jsonl`` the
per-request measurements, from which the latency figures are recomputed (so runs written before a
summary key was renamed compare all the same).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .phases import measured
from .records import RequestRecord, read_records
from .report import _plt, format_cell, summarize_records, write_json

# Table rows: summary key -> row title (values formatted as in the run tables: ms for times).
ROWS: dict[str, str] = {
    "requests": "requests",
    "errors": "errors",
    "ttft_mean_s": "TTFT mean (ms)",
    "ttft_p50_s": "TTFT P50 (ms)",
    "ttft_p99_s": "TTFT P99 (ms)",
    "tbt_p50_s": "TBT P50 (ms)",
    "tbt_p99_s": "TBT P99 (ms)",
    "qoe_mean": "QoE mean",
    "slo_attainment": "SLO met (share of requests)",
    "goodput_per_s": "goodput (requests/s within the SLO)",
    "first_from_server": "first token from server (requests)",
    "first_from_device": "first token from device (requests)",
    "tokens_server": "tokens from server",
    "tokens_device": "tokens from device",
    "handovers": "hand-overs in streams",
    "migrations": "migrations (agents)",
    "failovers": "failovers (agents)",
    "server_cost_usd": "server cost (USD, agents)",
    "device_energy_j": "device energy (J, agents)",
    "budget_used": "budget used",
}
FORMATS: dict[str, str] = {"device_energy_j": "{:.1f}", "budget_used": "{:.3f}"}


class RunDirError(ValueError):
    """A folder is not a finished load run."""


@dataclass(frozen=True)
class Run:
    label: str
    path: Path
    summary: dict[str, Any]
    records: list[RequestRecord]


def load_run(path: str | Path) -> Run:
    d = Path(path)
    summary_path, records_path = d / "summary.json", d / "requests.jsonl"
    if not summary_path.is_file() or not records_path.is_file():
        raise RunDirError(f"{d} is not a disco load output folder (no summary.json and requests.jsonl)")  # fmt: skip
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise RunDirError(f"{summary_path}: unreadable ({e})") from None
    if not isinstance(summary, dict):
        raise RunDirError(f"{summary_path}: not a JSON object")
    records = measured(read_records(records_path))  # warm-up and cool-down stay out
    # Latency and stream figures recomputed from the records; the rest (label, the agents'
    # counters, SLO, notes) as the run wrote it.
    merged = {**summary, **summarize_records(records)}
    return Run(str(summary.get("label") or d.name), d, merged, records)


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Each folder's run, labels made unique (a repeated label gets its folder's name)."""
    runs = [load_run(p) for p in paths]
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.label] = counts.get(r.label, 0) + 1
    out, seen = [], set()
    for r in runs:
        label = r.label if counts[r.label] == 1 else f"{r.label} ({r.path.name})"
        base, k = label, 2
        while label in seen:
            label, k = f"{base} #{k}", k + 1
        seen.add(label)
        out.append(Run(label, r.path, r.summary, r.records))
    return out


def overlay_figure(runs: Sequence[Run]):
    """TTFT CDF (left) and TBT CDF (right), one curve per run in each, one legend below."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, run in enumerate(runs):
        colour = f"C{k % 10}"
        ttft = np.array([r.ttft * 1000 for r in run.records if r.ok and r.ttft is not None])
        gaps = [np.diff(r.token_times) * 1000 for r in run.records if r.ok and r.tokens > 1]
        tbt = np.concatenate(gaps) if gaps else np.zeros(0)
        for ax, values in ((a1, ttft), (a2, tbt)):
            v = np.sort(values)
            if v.size:
                ax.plot(v, np.arange(1, v.size + 1) / v.size, color=colour, label=run.label)
    a1.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title="Time to first token")
    a2.set(xlabel="time between tokens (ms)", ylabel="fraction of gaps", title="TBT")
    if a1.lines:
        a1.set_xscale("log")
    a2.set_xscale("symlog", linthresh=1.0)
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    # One legend entry per run: the run's colour, whichever panel has its curve.
    handles = [plt.Line2D([], [], color=f"C{k % 10}", label=r.label) for k, r in enumerate(runs)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(runs), 6), fontsize=8,
               title="run (--label)", title_fontsize=8)  # fmt: skip
    fig.tight_layout(rect=(0, 0.08 + 0.04 * ((len(runs) - 1) // 6), 1, 1))
    return fig


def overlay_table(runs: Sequence[Run]) -> str:
    """Markdown: one row per figure, one column per run."""
    head = "| | " + " | ".join(r.label for r in runs) + " |"
    lines = [head, "|---|" + "---|" * len(runs)]
    for key, title in ROWS.items():
        cells = [_cell(key, r.summary.get(key)) for r in runs]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(key: str, value: Any) -> str:
    if value is not None and key in FORMATS:
        return FORMATS[key].format(value)
    return format_cell(key, value)


def write_overlay(paths: Sequence[str | Path], out_dir: str | Path) -> tuple[list[Run], list[Path]]:
    """overlay.png, overlay.md (the table) and overlay.json (labels, folders, summaries)."""
    runs = load_runs(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    fig = overlay_figure(runs)
    fig.savefig(out / "overlay.png", dpi=110)
    plt.close(fig)
    md = ["# Load runs side by side", "", ", ".join(f"`{r.label}`: {r.path}" for r in runs), ""]
    md += [overlay_table(runs), "", "![TTFT and TBT](overlay.png)", ""]
    (out / "overlay.md").write_text("\n".join(md), encoding="utf-8")
    write_json(out / "overlay.json", {
        "labels": [r.label for r in runs],
        "runs": [{"label": r.label, "path": str(r.path), "summary": r.summary} for r in runs],
    })  # fmt: skip
    return runs, [out / "overlay.png", out / "overlay.md", out / "overlay.json"]
