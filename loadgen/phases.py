"""Warm-up, measured window and cool-down of a run.

A run sends requests over ``[0, end_s)`` seconds (open loop: the schedule's window; closed loop:
``--duration``, or up to its last send when only a request count bounds it). Requests whose
*scheduled* send time (``RequestRecord.due``: the schedule's, so every policy replaying the same
schedule excludes the same requests; in closed loop, when the user became free) falls

- in the first ``ramp_s + warmup_s`` seconds are ``warmup`` (a ``--ramp`` is excluded like a
  warm-up; the warm-up at the full rate follows it),
- in the last ``cooldown_s`` seconds are ``cooldown``,
- in between are ``measured``: only these enter the summary numbers and the figures.

Every record is kept, flagged (``phase``). The measured window's length is goodput's denominator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .records import RequestRecord

WARMUP, MEASURED, COOLDOWN = "warmup", "measured", "cooldown"
PHASES = (WARMUP, MEASURED, COOLDOWN)
NOTE = (
    "every figure and summary number counts only the requests whose scheduled send time fell in "
    "the measured window [measured_from_s, measured_to_s): after ramp_s + warmup_s, before the "
    "last cooldown_s of the send window; requests.jsonl keeps all of them with their phase "
    "(phases: requests and errors per phase). Exceptions: the agents' counters (migrations, "
    "failovers, server_cost_usd, device_energy_j, budget_used) and Locust's own CSV/HTML cover "
    "the whole run"
)


@dataclass(frozen=True, slots=True)
class Phases:
    warmup_s: float = 0.0
    cooldown_s: float = 0.0
    ramp_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("warmup_s", "cooldown_s", "ramp_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.removesuffix('_s')} must be >= 0")

    @property
    def head_s(self) -> float:
        return self.ramp_s + self.warmup_s

    def window(self, end_s: float) -> tuple[float, float]:
        """The measured window ``[start, stop)`` of a run that sends over ``[0, end_s)``."""
        return self.head_s, end_s - self.cooldown_s

    def check(self, end_s: float) -> None:
        """Raise if nothing is left to measure in a run of ``end_s`` seconds."""
        lo, hi = self.window(end_s)
        if hi <= lo:
            parts = [f"{what} {v:g} s" for what, v in (("ramp", self.ramp_s),
                     ("warm-up", self.warmup_s), ("cool-down", self.cooldown_s)) if v]  # fmt: skip
            raise ValueError(
                f"nothing left to measure: {' + '.join(parts) or '0 s'} >= the run's {end_s:g} s"
            )

    def of(self, due: float, end_s: float) -> str:
        lo, hi = self.window(end_s)
        if due < lo:
            return WARMUP
        if self.cooldown_s > 0 and due >= hi:
            return COOLDOWN
        return MEASURED


def run_end(records: Sequence[RequestRecord], end_s: float | None) -> float:
    """The run's send window's end: ``end_s`` when known, else the last scheduled send."""
    if end_s is not None:
        return end_s
    return max((r.due for r in records), default=0.0)


def mark(records: Sequence[RequestRecord], phases: Phases, end_s: float | None) -> dict[str, Any]:
    """Set each record's ``phase``; return the summary's phase keys: the measured window
    (``measured_from_s``, ``measured_to_s``, ``measured_window_s``), the settings
    (``warmup_s``, ``cooldown_s``, ``ramp_s``) and per phase its requests and errors."""
    end = run_end(records, end_s)
    for r in records:
        r.phase = phases.of(r.due, end)
    lo, hi = phases.window(end)
    counts = {p: {"requests": 0, "errors": 0} for p in PHASES}
    for r in records:
        c = counts[r.phase]
        c["requests"] += 1
        c["errors"] += not (r.ok and r.token_times)
    return {
        "warmup_s": phases.warmup_s, "cooldown_s": phases.cooldown_s, "ramp_s": phases.ramp_s,
        "measured_from_s": lo, "measured_to_s": hi, "measured_window_s": max(hi - lo, 0.0),
        "phases": counts,
    }  # fmt: skip


def measured(records: Sequence[RequestRecord]) -> list[RequestRecord]:
    """The records that enter summaries and figures (an unmarked record, as written before
    phases existed, counts as measured)."""
    return [r for r in records if r.phase in (None, MEASURED)]
