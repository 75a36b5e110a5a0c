"""What the CLI hands to the Locust process: paths and knobs, as one small JSON file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

# The Locust process finds its spec through this variable (Locust owns the command line).
SPEC_ENV = "DISCO_LOAD_SPEC"


@dataclass(frozen=True, slots=True)
class LoadSpec:
    schedule: str  # JSONL of ScheduledRequest
    records: str  # JSONL of RequestRecord, appended per request
    progress: str  # JSON rewritten about once a second while running
    model: str | None = None  # the request's `model` field; None: omitted (the server's default)
    path: str = "/v1/completions"
    request_timeout_s: float = 120.0
    late_s: float = 0.05  # pacing lag above which users are falling behind
    temperature: float = 0.0
    # The schedule starts this long after Locust's test_start, so every user (spawned within
    # ~1 s) has claimed its first slot before the first request falls due.
    start_lead_s: float = 1.0
    spin_s: float = 0.0  # see Pacer.spin_s
    # "open": the schedule's send times (StreamingUser); "closed": each user sends its next
    # request when its previous one ends (ClosedLoopUser), for at most duration_s seconds.
    mode: str = "open"
    duration_s: float | None = None

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1), encoding="utf-8")

    @classmethod
    def read(cls, path: str | Path) -> LoadSpec:
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))
