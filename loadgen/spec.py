"""What the CLI hands to the Locust process: paths and knobs, as one small JSON file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# The Locust process finds its spec through this variable (Locust owns the command line).
SPEC_ENV = "DISCO_LOAD_SPEC"
# Locust's distributed mode (``disco load --workers N``): each ``--worker`` process is told
# "i/N" here and sends the schedule's requests whose position p has ``p % N == i``, writing its
# records and progress to its own files (:func:`worker_path`).
WORKER_ENV = "DISCO_LOAD_WORKER"
# Optional: the schedule's time zero as wall-clock seconds (``time.time()``), shared by every
# worker. Unset: the ``--master`` picks it when the test starts (every expected worker has
# connected by then), ``start_lead_s`` ahead, and sends it to the workers.
T0_ENV = "DISCO_LOAD_T0"


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

    def located(self, spec_path: str | Path) -> LoadSpec:
        """This spec as read from ``spec_path`` on another machine (a copied run folder): a
        schedule that is not where it was written, and records/progress whose folder is not
        there, are taken from (written to) the spec file's own folder."""
        here = Path(spec_path).resolve().parent
        moved = {}
        if not Path(self.schedule).exists():
            moved["schedule"] = str(here / Path(self.schedule).name)
        for name in ("records", "progress"):
            if not Path(getattr(self, name)).parent.is_dir():
                moved[name] = str(here / Path(getattr(self, name)).name)
        return replace(self, **moved) if moved else self


def parse_worker(text: str) -> tuple[int, int]:
    """``"i/N"`` (the value of :data:`WORKER_ENV`) -> ``(i, N)``, with 0 <= i < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"{WORKER_ENV}={text!r}: expected INDEX/COUNT, e.g. 0/2") from None
    if not 0 <= i < n:
        raise ValueError(f"{WORKER_ENV}={text!r}: need 0 <= INDEX < COUNT")
    return i, n


def worker_path(path: str | Path, index: int) -> Path:
    """Worker ``index``'s own file beside ``path``: ``requests.jsonl`` -> ``requests.w0.jsonl``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.w{index}{p.suffix}")


def share(n: int, index: int, workers: int) -> list[int]:
    """The schedule positions (of ``n``) that worker ``index`` of ``workers`` sends."""
    return list(range(index, n, workers))
