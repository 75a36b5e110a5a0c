"""Runs Locust headless as a child process and shows its progress.

Locust's gevent monkey-patching must never share a process with Ray or asyncio code (DESIGN.md
section 7), so Locust always runs in its own interpreter; this module only starts it, watches the
progress file the locustfile writes, and stops it cleanly: on Ctrl-C the child gets one SIGINT
(Locust then writes its CSV and HTML reports, and the locustfile marks the requests in flight as
interrupted), so what was measured is kept.

With ``workers=N`` it runs Locust's own distributed mode instead: one headless ``--master``
(``--expect-workers N``, bound to 127.0.0.1 on a free port) and N local ``--worker`` processes,
worker ``i`` told ``DISCO_LOAD_WORKER=i/N`` (it sends the schedule positions ``p % N == i``; see
the locustfile for the shared time zero). Each worker writes ``requests.w<i>.jsonl`` and
``progress.w<i>.json``; progress is shown merged, and the records are merged into the one
``requests.jsonl`` at the end. Every wait is bounded: a worker that dies is reported (the master
stops waiting for it after Locust's heartbeat timeout), one that dies before the test starts
ends the run with :class:`LocustRunError`, and a process that does not stop is killed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .records import read_records, write_records
from .schedule import ScheduledRequest
from .spec import SPEC_ENV, WORKER_ENV, LoadSpec, share, worker_path

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
# Distributed mode: how long the master waits for its workers to connect (Locust's
# --expect-workers-max-wait), and how long processes get to stop before they are killed.
CONNECT_WAIT_S = 60.0
STOP_GRACE_S = 20.0


class LocustRunError(RuntimeError):
    """A distributed run that could not start (a worker or the master died first)."""


@dataclass(frozen=True, slots=True)
class RunResult:
    returncode: int
    interrupted: bool
    wall_s: float
    workers: int | None = None  # distributed mode: the number of Locust workers
    # Workers that died, or stopped before their share was sent and answered: index -> why.
    unfinished: dict[int, str] | None = None


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
    user_class: str = "StreamingUser", extra: Sequence[str] = (),
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
    return [*cmd, *extra, user_class]  # the one user class of the locustfile this run uses


def worker_command(out_dir: Path, index: int, port: int, user_class: str = "StreamingUser",
                   master_host: str = "127.0.0.1") -> list[str]:  # fmt: skip
    """One Locust ``--worker`` (its environment: :data:`SPEC_ENV`, ``DISCO_LOAD_WORKER=i/N``)."""
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--worker",
        "--master-host", master_host, "--master-port", str(port),
        "--logfile", str(out_dir / f"locust.w{index}.log"), "--exit-code-on-error", "0",
        user_class,
    ]  # fmt: skip


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for the master to bind)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    workers: int | None = None,
    say: Callable[[str], None] | None = None,
) -> RunResult:
    """Replay ``reqs`` (already written to ``spec.schedule``) and wait for Locust to finish.

    ``workers``: Locust's distributed mode with that many local worker processes (open loop
    only); records are merged into ``spec.records``. ``say`` gets one-line notices (a worker
    that died).

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
    if workers is not None:
        if spec.mode != "open":
            raise ValueError("distributed mode (workers) replays open-loop schedules only")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        # Locust deals the users out evenly: every worker needs some.
        n_users = workers * math.ceil(max(n_users, workers) / workers)
        return _run_distributed(spec, spec_path, out_dir, len(reqs), n_users, run_time, html,
                                nice, workers, on_progress, progress_every_s, say)  # fmt: skip
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


def _run_distributed(
    spec: LoadSpec, spec_path: Path, out_dir: Path, n_reqs: int, users: int, run_time: float,
    html: bool, nice: int, workers: int, on_progress: Callable[[dict], None] | None,
    every: float, say: Callable[[str], None] | None,
) -> RunResult:  # fmt: skip
    """One ``--master`` and ``workers`` ``--worker`` processes; see the module's docstring."""
    records, progress = Path(spec.records), Path(spec.progress)
    for i in range(workers):  # a re-run into the same folder starts clean (records append)
        worker_path(records, i).unlink(missing_ok=True)
        worker_path(progress, i).unlink(missing_ok=True)
    port = free_port()
    extra = ["--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port),
             "--expect-workers", str(workers),
             "--expect-workers-max-wait", f"{CONNECT_WAIT_S:g}"]  # fmt: skip
    master_cmd = locust_command(spec_path, out_dir, users, run_time, html=html, extra=extra)
    env = {**os.environ, SPEC_ENV: str(spec_path), "PYTHONUNBUFFERED": "1"}
    env.pop(WORKER_ENV, None)
    started = time.monotonic()
    procs: list[subprocess.Popen] = []
    logs = []
    interrupted = False
    unfinished: dict[int, str] = {}
    try:
        for name, cmd, penv in [
            ("locust.out", master_cmd, env),
            *((f"locust.w{i}.out", worker_command(out_dir, i, port),
               {**env, WORKER_ENV: f"{i}/{workers}"}) for i in range(workers)),
        ]:  # fmt: skip
            logs.append(open(out_dir / name, "w", encoding="utf-8"))  # noqa: SIM115 (closed below)
            procs.append(subprocess.Popen(cmd, stdout=logs[-1], stderr=subprocess.STDOUT,
                                          env=penv, start_new_session=True))  # fmt: skip
            if nice:
                _renice(procs[-1].pid, nice)
        master, ws = procs[0], procs[1:]
        paths = [worker_path(progress, i) for i in range(workers)]
        # A hard bound on top of the master's own: connecting, --run-time, stopping.
        deadline = started + CONNECT_WAIT_S + run_time + 2 * STOP_GRACE_S
        next_report = time.monotonic() + every
        while master.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            for i, w in enumerate(ws):
                if i not in unfinished and w.poll() is not None and w.returncode != 0:
                    unfinished[i] = f"exited with code {w.returncode}"
                    if not any(p.exists() for p in paths):
                        raise LocustRunError(f"worker {i} {unfinished[i]} before the test "
                                             f"started: see {out_dir}/locust.w{i}.out")  # fmt: skip
                    if say:
                        say(f"[load] worker {i} {unfinished[i]} (see {out_dir}/locust.w{i}.out);"
                            " the run goes on without the rest of its share")  # fmt: skip
            if on_progress and time.monotonic() >= next_report:
                next_report += every
                p = merge_progress(paths, workers)
                if p:
                    on_progress(p)
        if master.poll() is None:
            if say:
                say("[load] the Locust master outlived its bound: stopping it")
            _stop_distributed(procs)
        # The master quits its workers as it ends; give them a moment, then stop them.
        _wait_all(ws, time.monotonic() + STOP_GRACE_S / 2)
        _stop_all(ws)
        if not any(p.exists() for p in paths) and master.returncode != 0:
            raise LocustRunError(f"the Locust master exited with code {master.returncode} before "
                                 f"the test started: see {out_dir}/locust.out")  # fmt: skip
    except KeyboardInterrupt:
        interrupted = True
        _stop_distributed(procs)
    except BaseException:
        _stop_distributed(procs)
        raise
    finally:
        for f in logs:
            f.close()
    final = [read_progress(p) or {} for p in paths]
    for i, p in enumerate(final):
        if i not in unfinished and not interrupted and not p.get("finished"):
            rc, total = procs[i + 1].returncode, len(share(n_reqs, i, workers))
            unfinished[i] = (f"sent {p.get('sent', 0)} of its {total} requests, "
                             f"{p.get('done', 0)} answered (exit code {rc})")  # fmt: skip
    if on_progress:
        p = merge_progress(paths, workers)
        if p:
            on_progress(p)
    merge_records(records, workers)
    return RunResult(procs[0].returncode if procs else -1, interrupted,
                     time.monotonic() - started, workers, unfinished)  # fmt: skip


def merge_records(path: str | Path, workers: int) -> int:
    """Every worker's records (``requests.w<i>.jsonl``) into ``path``, ordered by due time; the
    per-worker files are removed (each record keeps its ``worker``). Returns the count."""
    got = []
    for i in range(workers):
        got += read_records(worker_path(path, i))
    got.sort(key=lambda r: (r.due, r.id))
    write_records(path, got)
    for i in range(workers):
        worker_path(path, i).unlink(missing_ok=True)
    return len(got)


def merge_progress(paths: Sequence[Path], workers: int) -> dict | None:
    """The workers' progress files as one (sums; the largest lag and elapsed time)."""
    parts = [p for p in (read_progress(x) for x in paths) if p]
    if not parts:
        return None
    keys = ("total", "sent", "done", "inflight", "errors", "late", "late_no_user")
    out: dict = {k: sum(p.get(k, 0) for p in parts) for k in keys}
    out["max_lag_s"] = max(p.get("max_lag_s", 0.0) for p in parts)
    out["elapsed_s"] = max(p.get("elapsed_s", 0.0) for p in parts)
    out["workers"] = workers
    out["workers_reporting"] = len(parts)
    out["workers_finished"] = sum(1 for p in parts if p.get("finished"))
    return out


def _wait_all(procs: Sequence[subprocess.Popen], until: float) -> None:
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, until - time.monotonic()))


def _stop_distributed(procs: Sequence[subprocess.Popen]) -> None:
    """The master first (it tells its workers to quit: they stop their users, which writes the
    requests in flight as interrupted, and send their last statistics), then any worker left
    (one that never connected, or whose master died)."""
    if procs:
        _stop_all(procs[:1])
        _wait_all(procs[1:], time.monotonic() + 5.0)
        _stop_all(procs[1:])


def _stop_all(procs: Sequence[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """One SIGINT to each process still running (each keeps what it measured), then a kill for
    any that has not ended ``grace_s`` later (or at a second Ctrl-C)."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGINT)
    with contextlib.suppress(KeyboardInterrupt):
        _wait_all(alive, time.monotonic() + grace_s)
    for p in alive:
        if p.poll() is None:
            p.kill()
            p.wait()


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
    if p.get("workers"):
        line += f"  workers {p.get('workers_reporting', 0)}/{p['workers']}"
        if p.get("workers_finished"):
            line += f" ({p['workers_finished']} done)"
    return line
