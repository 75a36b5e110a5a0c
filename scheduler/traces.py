"""Request traces: Azure LLM CSV, BurstGPT CSV and Mooncake JSONL, detected by content.

Every format becomes a list of :class:`TraceRecord` sorted by arrival, with arrival times in
seconds since the first request. Rows that describe no servable request (zero prompt or zero
response tokens: BurstGPT logs failures that way) are dropped.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
BURSTGPT_COLUMNS = ("Timestamp", "Request tokens", "Response tokens")


class TraceFormatError(ValueError):
    """The trace is empty, malformed or in no format we know (one-line message)."""


@dataclass(frozen=True, slots=True)
class TraceRecord:
    arrival: float  # seconds since the first request of the trace
    prompt_tokens: int
    output_tokens: int
    session: str | None = None


def default_trace_path() -> Path:
    """The Azure conversation trace shipped with the package (CC-BY 4.0, see data/TRACES.md)."""
    return Path(__file__).resolve().parent / "data" / "azure_llm_2023_conv.csv"


def code_trace_path() -> Path:
    """The Azure coding-service trace shipped with the package (CC-BY 4.0, see data/TRACES.md)."""
    return Path(__file__).resolve().parent / "data" / "azure_llm_2023_code.csv"


def load_trace(path: str | Path, limit: int | None = None) -> list[TraceRecord]:
    """Read a trace file; the format is recognised from its first line, not its name."""
    p = Path(path)
    if limit is not None and limit <= 0:
        raise TraceFormatError(f"limit must be > 0, got {limit}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise TraceFormatError(f"trace not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TraceFormatError(f"cannot read trace {p}: {e}") from None
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    if not first:
        raise TraceFormatError(f"trace {p} is empty")
    parser = _detect(first)
    if parser is None:
        raise TraceFormatError(
            f"trace {p}: unknown format (expected Azure LLM CSV, BurstGPT CSV or Mooncake JSONL), "
            f"first line: {first[:80]!r}"
        )
    try:
        rows = parser(text)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        if isinstance(e, TraceFormatError):
            raise TraceFormatError(f"trace {p}: {e}") from None
        raise TraceFormatError(f"trace {p}: malformed row: {e}") from None
    records = _finish(rows, limit)
    if not records:
        raise TraceFormatError(f"trace {p} holds no request with prompt and output tokens > 0")
    return records


_Row = tuple[float, int, int, "str | None"]


def _detect(first_line: str) -> Callable[[str], list[_Row]] | None:
    s = first_line.strip()
    if s.startswith("{"):
        try:
            obj = json.loads(s)
        except json.JSONDecodeError:
            return None
        if isinstance(obj, dict) and {"timestamp", "input_length", "output_length"} <= obj.keys():
            return _parse_mooncake
        return None
    header = [h.strip() for h in next(csv.reader([s]))]
    if all(c in header for c in AZURE_COLUMNS):
        return _parse_azure
    if all(c in header for c in BURSTGPT_COLUMNS):
        return _parse_burstgpt
    return None


def _csv_rows(text: str) -> tuple[list[str], Iterable[list[str]]]:
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader)]
    return header, (r for r in reader if r and any(c.strip() for c in r))


def _parse_azure(text: str) -> list[_Row]:
    header, rows = _csv_rows(text)
    it, ic, ig = (header.index(c) for c in AZURE_COLUMNS)
    day_cache: dict[str, float] = {}
    out: list[_Row] = []
    for line, r in enumerate(rows, start=2):
        try:
            out.append((_azure_seconds(r[it], day_cache), int(r[ic]), int(r[ig]), None))
        except (ValueError, IndexError):
            raise TraceFormatError(f"malformed Azure row at line {line}: {','.join(r)[:80]!r}") from None
    return out


def _azure_seconds(ts: str, day_cache: dict[str, float]) -> float:
    """'2023-11-16 18:15:46.6805900' -> seconds; any number of fraction digits (3.10-safe)."""
    ts = ts.strip()
    try:
        return float(ts)  # some copies carry numeric timestamps
    except ValueError:
        pass
    day, _, clock = ts.replace("T", " ").partition(" ")
    base = day_cache.get(day)
    if base is None:
        # Days count from the first day seen, so float seconds keep sub-microsecond precision.
        ordinal = date.fromisoformat(day).toordinal()
        first = day_cache.setdefault("", float(ordinal))
        base = day_cache[day] = (ordinal - first) * 86400.0
    clock = clock.rstrip("Z")
    h, m, s = clock.split(":")
    return base + int(h) * 3600 + int(m) * 60 + float(s)


def _parse_burstgpt(text: str) -> list[_Row]:
    header, rows = _csv_rows(text)
    it, ip, io_ = (header.index(c) for c in BURSTGPT_COLUMNS)
    isess = header.index("Session ID") if "Session ID" in header else None
    out: list[_Row] = []
    for line, r in enumerate(rows, start=2):
        try:
            sess = (r[isess].strip() or None) if isess is not None else None
            # Token counts are sometimes written as floats ("18.0").
            out.append((float(r[it]), int(float(r[ip])), int(float(r[io_])), sess))
        except (ValueError, IndexError):
            raise TraceFormatError(f"malformed BurstGPT row at line {line}: {','.join(r)[:80]!r}") from None
    return out


def _parse_mooncake(text: str) -> list[_Row]:
    out: list[_Row] = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            o = json.loads(raw)
            sess = o.get("session_id", o.get("session"))
            out.append(
                (
                    float(o["timestamp"]) / 1000.0,  # Mooncake timestamps are milliseconds
                    int(o["input_length"]),
                    int(o["output_length"]),
                    None if sess is None else str(sess),
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise TraceFormatError(f"malformed Mooncake line {line}: {raw[:80]!r}") from None
    return out


def _finish(rows: list[_Row], limit: int | None) -> list[TraceRecord]:
    # Drop failures/empty requests, sort by arrival (stable), rebase time to the first request.
    kept = [r for r in rows if r[1] > 0 and r[2] > 0]
    kept.sort(key=lambda r: r[0])
    if limit is not None:
        kept = kept[:limit]
    if not kept:
        return []
    t0 = kept[0][0]
    return [TraceRecord(t - t0, p, o, s) for t, p, o, s in kept]
