"""Service-level objectives per request, SLO attainment and goodput.

``--slo ttft=1s,tbt=200ms,tpot=50ms`` (each part optional, units ``s`` or ``ms``) bounds, for each
request, as the user saw it:

- ``ttft``: the time to its first token;
- ``tbt``: its largest user-visible gap between two tokens (tokens that arrive in one chunk are
  0 apart; a request of one token has no gap and meets it);
- ``tpot``: its mean time per output token after the first, as ``vllm bench serve`` defines it:
  (e2e latency - ttft) / (output tokens - 1), the e2e latency ending at the last token; 0 for a
  request of one token (vLLM's convention).

A request meets the SLO when it succeeded and meets every part given (``<=``, as vLLM). SLO
attainment is the share of the measured requests that meet it (a failed request misses it);
goodput is the number of measured requests that meet it per second of the measured window
(DistServe's definition; ``vllm bench serve --goodput`` counts the same requests over its run).

Pure Python: used by the load generator's report, the sweeps and the tests alike.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .records import RequestRecord

PARTS = ("ttft", "tbt", "tpot")
NOTE = (
    "slo: upper bounds in seconds per request (ttft_s: time to first token; tbt_s: its largest "
    "gap between two tokens; tpot_s: (last token - first token) / (tokens - 1), vllm bench "
    "serve's TPOT); slo_attainment: the share of the measured requests that succeeded and met "
    "every bound given; goodput_per_s: those requests per second of the measured window "
    "(DistServe); slo_missed: requests per missed bound (error: failed requests)"
)
_VALUE = re.compile(r"^\s*((?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(ms|s)\s*$")


class SloError(ValueError):
    """A ``--slo`` text that does not parse."""


@dataclass(frozen=True, slots=True)
class SLO:
    """Upper bounds in seconds; None: that part is not bounded."""

    ttft_s: float | None = None
    tbt_s: float | None = None
    tpot_s: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return {"ttft_s": self.ttft_s, "tbt_s": self.tbt_s, "tpot_s": self.tpot_s}

    def __str__(self) -> str:
        parts = [f"{p}={_fmt(getattr(self, p + '_s'))}" for p in PARTS
                 if getattr(self, p + "_s") is not None]  # fmt: skip
        return ",".join(parts)

    def missed(self, rec: RequestRecord) -> list[str]:
        """The parts ``rec`` misses (``error`` for a failed request, which misses them all)."""
        if not rec.ok or not rec.token_times:
            return ["error"]
        m = request_metrics(rec)
        return [p for p in PARTS if (lim := getattr(self, p + "_s")) is not None and m[p] > lim]

    def met(self, rec: RequestRecord) -> bool:
        return not self.missed(rec)


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def parse_slo(text: str) -> SLO:
    """``ttft=1s,tbt=200ms,tpot=50ms`` (any subset, any order) -> :class:`SLO`.

    Raises :class:`SloError` with a message that names the bad part."""
    example = "e.g. --slo ttft=1s,tbt=200ms,tpot=50ms"
    items = [p.strip() for p in (text or "").split(",") if p.strip()]
    if not items:
        raise SloError(f"--slo is empty ({example})")
    got: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep or not name:
            raise SloError(f"--slo: {item!r} is not NAME=VALUE ({example})")
        if name not in PARTS:
            raise SloError(f"--slo: unknown part {name!r} (known: {', '.join(PARTS)})")
        if name in got:
            raise SloError(f"--slo: {name} is given twice")
        m = _VALUE.match(value)
        if m is None:
            raise SloError(
                f"--slo: {name}={value.strip()!r} is not a time with its unit (s or ms, e.g. "
                f"{name}=1s or {name}=200ms)"
            )
        seconds = float(m.group(1)) / (1000.0 if m.group(2) == "ms" else 1.0)
        if seconds <= 0:
            raise SloError(f"--slo: {name} must be > 0, got {value.strip()}")
        got[name] = seconds
    return SLO(got.get("ttft"), got.get("tbt"), got.get("tpot"))


def request_metrics(rec: RequestRecord) -> dict[str, float]:
    """A successful request's TTFT, largest gap between tokens and mean time per output token
    (seconds; see the module docstring)."""
    t = rec.token_times
    ttft = t[0]
    n = len(t)
    largest = max((b - a for a, b in zip(t, t[1:], strict=False)), default=0.0)
    tpot = (t[-1] - ttft) / (n - 1) if n > 1 else 0.0
    return {"ttft": ttft, "tbt": largest, "tpot": tpot}


def mark(records: Sequence[RequestRecord], slo: SLO | None) -> None:
    """Set each record's ``slo_ok`` and ``slo_missed`` (None and [] without an SLO)."""
    for r in records:
        if slo is None:
            r.slo_ok, r.slo_missed = None, []
        else:
            r.slo_missed = slo.missed(r)
            r.slo_ok = not r.slo_missed


def attainment(
    records: Sequence[RequestRecord], slo: SLO | None, window_s: float | None
) -> dict[str, Any]:
    """The summary's SLO keys over ``records`` (the measured ones) and a window of ``window_s``
    seconds: ``slo`` (the bounds, seconds), ``slo_attainment`` (fraction), ``goodput_per_s``,
    ``slo_met`` (requests) and ``slo_missed`` (requests per missed part; one request can miss
    several). All null without an SLO."""
    if slo is None:
        return {"slo": None, "slo_attainment": None, "goodput_per_s": None, "slo_met": None,
                "slo_missed": None}  # fmt: skip
    missed: dict[str, int] = dict.fromkeys((*PARTS, "error"), 0)
    good = 0
    for r in records:
        parts = slo.missed(r)
        good += not parts
        for p in parts:
            missed[p] += 1
    n = len(records)
    return {
        "slo": slo.to_dict(),
        "slo_attainment": good / n if n else None,
        "goodput_per_s": good / window_s if window_s and window_s > 0 else None,
        "slo_met": good,
        "slo_missed": missed,
    }
