"""Raw measurements: one JSON line per request, as the user's side saw it.

Written by the Locust process as each request ends (so an interrupted run keeps every finished
request), read back by :mod:`disco.loadgen.report`. Times are seconds: ``due``/``sent``/``end``
from the run's start, ``token_times`` from this request's send.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO


@dataclass(slots=True)
class RequestRecord:
    id: str
    target: str
    due: float
    sent: float
    prompt_tokens: int
    max_tokens: int
    session: str | None = None
    status: int = 0  # HTTP status; 0 when no response came
    error: str | None = None
    token_times: list[float] = field(default_factory=list)
    end: float | None = None
    finish_reason: str | None = None
    # Per token (aligned with ``token_times``), which endpoint produced it ("server"/"device"),
    # from the ``disco.source`` of its SSE chunk; None where the chunk does not say.
    token_sources: list[str | None] = field(default_factory=list)
    # the server's ``disco`` extension, last value of each key
    extra: dict[str, Any] = field(default_factory=dict)
    # The Locust user that sent it (closed loop: each user's requests follow one another).
    user: int | None = None
    # The Locust worker process that sent it (``disco load --workers N``: 0..N-1); None when
    # one Locust process sent everything.
    worker: int | None = None
    # Set after the run (disco.loadgen.phases, disco.loadgen.slo): "warmup", "measured" or
    # "cooldown" by its scheduled send time (only "measured" ones enter the summary and the
    # figures); whether it met every part of the run's SLO (None: no SLO) and which it missed.
    phase: str | None = None
    slo_ok: bool | None = None
    slo_missed: list[str] = field(default_factory=list)

    @property
    def lag(self) -> float:
        """How late the request went out against its schedule (pacing error)."""
        return self.sent - self.due

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def tokens(self) -> int:
        return len(self.token_times)

    @property
    def gaps(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    @property
    def sources(self) -> list[str | None]:
        """Each token's source, aligned with ``token_times``; all None when the record's list
        does not line up (an older record that skipped chunks without a source)."""
        s = self.token_sources
        return list(s) if len(s) == len(self.token_times) else [None] * len(self.token_times)

    @property
    def first_source(self) -> str | None:
        """The endpoint that produced the first token the user saw, where the stream says."""
        s = self.sources
        return s[0] if s else None

    @property
    def handovers(self) -> list[int]:
        """Token indices where another endpoint took over the stream (a migration or a
        failover: the stream does not say which); unknown sources are never counted."""
        s = self.sources
        return [k for k in range(1, len(s)) if s[k] and s[k - 1] and s[k] != s[k - 1]]

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> str:
        d = asdict(self)
        d["token_times"] = [round(t, 6) for t in self.token_times]
        return json.dumps(d)

    @classmethod
    def from_json(cls, line: str) -> RequestRecord:
        d = json.loads(line)
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class RecordWriter:
    """Appends records and flushes each one: a crash or Ctrl-C loses at most the line in flight."""

    def __init__(self, path: str | Path) -> None:
        self._f: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115 (lives as long as the run)

    def write(self, rec: RequestRecord) -> None:
        self._f.write(rec.to_json() + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_records(path: str | Path) -> list[RequestRecord]:
    """Every complete line of ``path``; a truncated last line (killed writer) is skipped."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            out.append(RequestRecord.from_json(line))
        except (json.JSONDecodeError, TypeError):
            continue
    return out


def write_records(path: str | Path, records: list[RequestRecord]) -> None:
    """Rewrite ``path`` with ``records`` (after the run marks their phase and SLO): a new file
    moved into place, so a reader never sees half of it."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(r.to_json() + "\n")
    tmp.replace(p)
