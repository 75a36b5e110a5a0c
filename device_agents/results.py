"""The JSONL results log: one line per finished request (its outcome plus where it ran)."""

from __future__ import annotations

import json
from dataclasses import fields
from enum import Enum
from pathlib import Path
from typing import IO, Any

from disco.scheduler.types import EndpointKind, RequestOutcome


def outcome_to_dict(outcome: RequestOutcome, **extra: Any) -> dict[str, Any]:
    # Field by field, not dataclasses.asdict: its deep copy costs ~0.5 ms per outcome, which
    # stalls every other stream of a fleet when many requests end together.
    d: dict[str, Any] = {}
    for f in fields(RequestOutcome):
        v = getattr(outcome, f.name)
        if isinstance(v, Enum):
            v = v.value
        elif isinstance(v, list):
            v = [x.value if isinstance(x, Enum) else x for x in v]
        d[f.name] = v
    d.update(extra)
    return d


def outcome_from_dict(d: dict[str, Any]) -> RequestOutcome:
    fields = set(RequestOutcome.__dataclass_fields__)
    kw = {k: v for k, v in d.items() if k in fields}
    kw["token_sources"] = [EndpointKind(s) for s in kw.get("token_sources", [])]
    if kw.get("first_token_from") is not None:
        kw["first_token_from"] = EndpointKind(kw["first_token_from"])
    return RequestOutcome(**kw)


class ResultsLog:
    """Appends outcomes to a JSONL file; line-buffered so a crash loses at most one line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: IO[str] | None = self.path.open("a", buffering=1)

    def write(self, outcome: RequestOutcome, **extra: Any) -> None:
        if self._f is not None:
            self._f.write(json.dumps(outcome_to_dict(outcome, **extra)) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_results(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]
