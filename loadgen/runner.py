"""Runs Locust headless as a child process and shows its progress.

Locust's gevent monkey-patching must never share a process with Ray or asyncio code (DESIGN.md
section 7), so Locust always runs in its own interpreter; this module only starts it, watches the
progress file the locustfile writes, and stops it cleanly: on Ctrl-C the child gets one SIGINT
(Locust then writes its CSV and HTML reports, and the locustfile marks the requests in flight as
interrupted), so what was measured is kept.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .schedule import ScheduledRequest
from .spec import SPEC_ENV, LoadSpec

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


@dataclass(frozen=True, slots=True)
class RunResult:
    returncode: int
    interrupted: bool
    wall_s: float


def default_users(reqs: Sequence[ScheduledRequest], window_s: float = 20.0) -> int:
    """Enough users to absorb the concurrency: the most requests due within any ``window_s``
    (a generous bound on one request's latency), at least 4. Idle users only sleep."""
    if not reqs:
        return 1
    due = [r.due for r in reqs]
    j = peak = 0
    for i, t in enumerate(due):
        while due[j] < t - window_s:
            j += 1
        peak = max(peak, i - j + 1)
    return max(4, min(len(reqs), peak, 256))


def locust_command(
    spec_path: Path, out_dir: Path, users: int, run_time_s: float, html: bool = True,
    user_class: str = "StreamingUser",
) -> list[str]:  # fmt: skip
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(users), "-r", str(max(1, users)),  # all users within ~1 s
        "--run-time", f"{math.ceil(run_time_s)}s", "--stop-timeout", "0",
        "--csv", str(out_dir / "locust"), "--only-summary",
        "--logfile", str(out_dir / "locust.log"), "--exit-code-on-error", "0",
    ]  # fmt: skip
    if html:
        cmd += ["--html", str(out_dir / "locust.html")]
    return [*cmd, user_class]  # the one user class of the locustfile this run uses


def run_locust(
    spec: LoadSpec,
    out_dir: Path,
    reqs: Sequence[ScheduledRequest],
    *,
    users: int | None = None,
    on_progress: Callable[[dict], None] | None = None,
    progress_every_s: float = 2.0,
    html: bool = True,
    nice: int = 0,
) -> RunResult:
    """Replay ``reqs`` (already written to ``spec.schedule``) and wait for Locust to finish.

    ``nice`` < 0 raises Locust's scheduling priority where the process may (root; ignored
    otherwise): on a machine saturated by the system under test, a load generator that waits
    for a CPU sends late. Locust itself uses a few % of a core, so the others hardly notice.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path = out_dir / "load_spec.json"
    spec.write(spec_path)
    if spec.mode == "closed":
        if not users:
            raise ValueError("a closed-loop run needs its number of users (the concurrency)")
        n_users, user_class = users, "ClosedLoopUser"
        # A hard bound: the duration (or, by count, every request at its full timeout, one
        # user after another), then the last ones' timeout.
        span = spec.duration_s if spec.duration_s is not None else (
            math.ceil(len(reqs) / users) * spec.request_timeout_s)  # fmt: skip
        run_time = spec.start_lead_s + 2 + span + spec.request_timeout_s + 5
    else:
        n_users, user_class = users or default_users(reqs), "StreamingUser"
        last_due = reqs[-1].due if reqs else 0.0
        # A hard bound: every request has had its full timeout after the last one was due.
        run_time = spec.start_lead_s + 2 + last_due + spec.request_timeout_s + 5
    cmd = locust_command(spec_path, out_dir, n_users, run_time, html=html, user_class=user_class)
    env = {**os.environ, SPEC_ENV: str(spec_path), "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    with open(out_dir / "locust.out", "w", encoding="utf-8") as out:
        # Own session: the terminal's Ctrl-C reaches only us, and we forward exactly one SIGINT.
        child = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        if nice:
            _renice(child.pid, nice)
        interrupted = False
        try:
            _watch(child, Path(spec.progress), on_progress, progress_every_s)
        except KeyboardInterrupt:
            interrupted = True
            _stop(child)
    return RunResult(child.returncode, interrupted, time.monotonic() - started)


def _renice(pid: int, nice: int) -> None:
    """Set the child's nice value (from here: no preexec_fn in a threaded parent); a priority
    this process may not raise (no privilege) is left as it is."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, os.getpriority(os.PRIO_PROCESS, 0) + nice)


def _watch(
    child: subprocess.Popen,
    progress: Path,
    on_progress: Callable[[dict], None] | None,
    every: float,
) -> None:
    next_report = time.monotonic() + every
    while child.poll() is None:
        time.sleep(0.2)
        if on_progress and time.monotonic() >= next_report:
            next_report += every
            p = read_progress(progress)
            if p:
                on_progress(p)
    if on_progress:
        p = read_progress(progress)
        if p:
            on_progress(p)


def _stop(child: subprocess.Popen, grace_s: float = 20.0) -> None:
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGINT)
    try:
        child.wait(timeout=grace_s)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        child.kill()  # a second Ctrl-C, or a child stuck in shutdown
        child.wait()


def read_progress(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def format_progress(p: dict) -> str:
    line = (
        f"[load] {p.get('elapsed_s', 0):6.1f}s  sent {p.get('sent', 0)}/{p.get('total', 0)}"
        f"  done {p.get('done', 0)}  in flight {p.get('inflight', 0)}  errors {p.get('errors', 0)}"
    )
    if p.get("late"):
        cause = "no free user: add --users" if p.get("late_no_user") else "busy CPU"
        line += f"  late {p['late']} (max {p.get('max_lag_s', 0) * 1000:.0f} ms, {cause})"
    return line
