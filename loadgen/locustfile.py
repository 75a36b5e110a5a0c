"""Locust users that replay a schedule open-loop and stream /v1/completions from device agents.

Loaded by ``locust -f`` in its own process (``disco.loadgen.runner`` starts it): importing Locust
monkey-patches the process with gevent, which must never meet Ray or asyncio code.

Every user shares one :class:`~disco.loadgen.pacer.Pacer`: a user claims the next request, sleeps
until it is due, sends it to its device, and streams the answer (open loop, ``StreamingUser``).
In closed loop (``ClosedLoopUser``, ``disco load --concurrency N``: N users) the shared pacer is a
:class:`~disco.loadgen.pacer.ClosedLoop`: a request is due as soon as a user claims it, so each
user sends its next request when its previous one has ended, in the schedule's order.

In Locust's distributed mode (``disco load --workers N``: one ``--master``, N ``--worker``
processes) each worker is told its index (``DISCO_LOAD_WORKER=i/N``) and replays only the
schedule's positions ``p % N == i`` with its own pacer; every worker's pacer starts at the same
wall-clock time zero (``DISCO_LOAD_T0``, or the master's, sent to the workers as the test starts),
so together they send the whole schedule once, on its timeline. A worker that has sent and heard
back its share tells the master; the master ends the run when every worker still connected is
done (one that dies stops being connected after Locust's heartbeat timeout, ~3 s). Each worker
writes its own records and progress files, which ``disco.loadgen.runner`` merges.

TTFT is taken inside the streaming loop at the first non-empty token (Locust's own timing of
``stream=True`` stops at the headers), every token gets its own arrival time, and the results go
to Locust's statistics as custom entries (``TTFT``, ``TBT``, ``completion``: the web UI and
``--csv`` show them) and, raw, to a JSONL file.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

import gevent
from locust import FastHttpUser, constant, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner
from locust.stats import CSV_STATS_INTERVAL_SEC

from disco.loadgen.pacer import ClosedLoop, Pacer
from disco.loadgen.records import RecordWriter, RequestRecord
from disco.loadgen.schedule import ScheduledRequest, read_schedule
from disco.loadgen.spec import (
    SPEC_ENV,
    T0_ENV,
    WORKER_ENV,
    LoadSpec,
    parse_worker,
    share,
    worker_path,
)
from disco.scheduler.wire import SSEDecoder

log = logging.getLogger("disco.loadgen")
KIND = "SSE"  # request_type of the custom entries
# Custom messages between Locust's master and its workers (distributed mode).
T0_MSG = "disco_t0"  # master -> workers: {"t0_epoch": wall-clock time zero of the schedule}
DONE_MSG = "disco_done"  # worker -> master: its share is sent and answered


@dataclass
class ReplayRun:
    """State shared by every user of one Locust process (attached to the Environment)."""

    spec: LoadSpec
    requests: list[ScheduledRequest]
    pacer: Pacer | ClosedLoop
    writer: RecordWriter
    t0_epoch: float = 0.0
    inflight: int = 0
    done: int = 0
    errors: int = 0
    quitting: bool = False
    open_records: dict[str, RequestRecord] = field(default_factory=dict)
    worker: int | None = None  # distributed mode: this worker's index
    finished: bool = False  # every request of this process's share sent and answered
    master_t0_epoch: float | None = None  # distributed mode: time zero, from the master

    @classmethod
    def from_env(cls) -> ReplayRun:
        spec = _spec()
        reqs = read_schedule(spec.schedule)
        worker = None
        if os.environ.get(WORKER_ENV):
            worker, n = parse_worker(os.environ[WORKER_ENV])
            reqs = [reqs[p] for p in share(len(reqs), worker, n)]
            spec = replace(spec, records=str(worker_path(spec.records, worker)),
                           progress=str(worker_path(spec.progress, worker)))  # fmt: skip
        pacer: Pacer | ClosedLoop
        if spec.mode == "closed":
            pacer = ClosedLoop(len(reqs), spec.duration_s)
        else:
            pacer = Pacer(
                [r.due for r in reqs], late_s=spec.late_s, warn=log.warning, spin_s=spec.spin_s
            )
        return cls(spec, reqs, pacer, RecordWriter(spec.records), worker=worker)

    def progress(self) -> dict:
        s = self.pacer.stats()
        return {
            "worker": self.worker, "finished": self.finished,
            "total": s.total, "sent": s.sent, "done": self.done, "errors": self.errors,
            "inflight": self.inflight, "late": s.late, "late_no_user": s.late_no_user,
            "max_lag_s": round(s.max_lag_s, 4),
            "elapsed_s": round(max(0.0, time.monotonic() - self.pacer.t0), 2) if self.pacer.started else 0.0,
        }  # fmt: skip


@dataclass
class MasterState:
    """The ``--master`` process's part (it sends nothing): time zero, and which workers are done."""

    start_lead_s: float
    done: set[str] = field(default_factory=set)  # Locust client ids
    t0_epoch: float | None = None
    started: set[str] = field(default_factory=set)  # the workers connected at the start


def _spec() -> LoadSpec:
    path = os.environ.get(SPEC_ENV)
    if not path:
        raise RuntimeError(f"{SPEC_ENV} is not set: run this locustfile through `disco load`")
    return LoadSpec.read(path).located(path)


def _t0_env() -> float | None:
    text = os.environ.get(T0_ENV)
    return float(text) if text else None


def body_reader(resp: Any) -> Any:
    """The body of a ``stream=True`` FastHttpUser response, as an object whose
    ``readline(b"\\n")`` returns each line as soon as it arrives.

    Locust's public ``iter_content(chunk_size)`` waits for ``chunk_size`` bytes before it yields
    (geventhttpclient's ``read(n)``), which would hold back every token's arrival time; the
    response underneath, Locust's private ``_response`` (geventhttpclient's), reads per line.
    This is the one place that touches it; tests/cluster/test_private_apis.py fails when Locust
    moves it (or when it stops returning lines as they arrive).
    """
    return resp._response


@events.init.add_listener
def _on_init(environment: Environment, **_kw) -> None:
    runner = environment.runner
    if isinstance(runner, MasterRunner):  # sends nothing: no schedule, no records
        master = MasterState(_spec().start_lead_s)
        environment.disco_master = master  # type: ignore[attr-defined]
        runner.register_message(DONE_MSG, lambda environment, msg: _on_done(environment, msg))
        return
    if isinstance(runner, WorkerRunner) and not os.environ.get(WORKER_ENV):
        raise RuntimeError(f"a Locust --worker needs {WORKER_ENV}=INDEX/COUNT (e.g. 0/2): "
                           "which share of the schedule it sends")  # fmt: skip
    run = ReplayRun.from_env()
    environment.disco_run = run  # type: ignore[attr-defined]
    StreamingUser.network_timeout = run.spec.request_timeout_s  # before any user is spawned
    if isinstance(runner, WorkerRunner):

        def on_t0(environment: Environment, msg: Any, **_kw: Any) -> None:
            run.master_t0_epoch = float(msg.data["t0_epoch"])

        runner.register_message(T0_MSG, on_t0)
    _warm_up({r.target for r in run.requests})


def _warm_up(targets: set[str]) -> None:
    """One GET /health per target before the clock starts. The first request of a fresh process
    imports and initialises parts of the HTTP client and gevent's resolver, which blocks every
    greenlet for tens of ms: measured as a late send of the next scheduled requests otherwise."""
    from geventhttpclient import HTTPClient
    from geventhttpclient.url import URL

    for t in sorted(targets):
        try:
            url = URL(t + "/health")
            client = HTTPClient.from_url(url, connection_timeout=2, network_timeout=2)
            try:
                client.get(url.request_uri).read()
            finally:
                client.close()
        except Exception as e:  # noqa: BLE001 - a target without /health still gets the load
            log.debug("warm-up of %s failed: %r", t, e)


@events.test_start.add_listener
def _on_start(environment: Environment, **_kw) -> None:
    master: MasterState | None = getattr(environment, "disco_master", None)
    if master is not None:
        # Fired once every expected worker has connected, before their users are spawned; the
        # message reaches each worker before its spawn order (one ordered connection each).
        master.t0_epoch = _t0_env() or time.time() + master.start_lead_s
        runner = environment.runner
        assert runner is not None
        runner.send_message(T0_MSG, {"t0_epoch": master.t0_epoch})
        gevent.spawn(_end_when_workers_done, environment, master)
        return
    run: ReplayRun = environment.disco_run  # type: ignore[attr-defined]
    # Users are spawned after this event, so they all meet the same time zero.
    if isinstance(environment.runner, WorkerRunner):
        t0_epoch = _t0_env() or run.master_t0_epoch
        if t0_epoch is None:
            log.warning("no time zero from the master: this worker starts on its own clock")
            t0_epoch = time.time() + run.spec.start_lead_s
        # The wall clock fixes the origin once; the pacer then runs on the monotonic clock.
        run.pacer.start(time.monotonic() + (t0_epoch - time.time()))
        run.t0_epoch = t0_epoch
    else:
        run.pacer.start(time.monotonic() + run.spec.start_lead_s)
        run.t0_epoch = time.time() + run.spec.start_lead_s
    gevent.spawn(_write_progress, run)


def _on_done(environment: Environment, msg: Any) -> None:
    master: MasterState = environment.disco_master  # type: ignore[attr-defined]
    master.done.add(msg.node_id)
    log.info("worker %s (index %s) has sent and heard back its share", msg.node_id,
             (msg.data or {}).get("worker"))  # fmt: skip


def _end_when_workers_done(environment: Environment, master: MasterState) -> None:
    """Quit once every worker still connected has reported its share done. A worker that dies
    drops out of the connected ones when Locust's heartbeat misses it (~3 s); with --run-time
    as the hard bound, the run never waits on a dead worker."""
    runner = environment.runner
    assert isinstance(runner, MasterRunner)

    def alive() -> set[str]:
        return {c.id for c in runner.clients.ready + runner.clients.spawning
                + runner.clients.running}  # fmt: skip

    master.started = alive()
    while True:
        gevent.sleep(0.25)
        if alive() <= master.done:
            if master.started - master.done:
                log.warning("ending with %d of %d workers done (the others were lost)",
                            len(master.started & master.done), len(master.started))  # fmt: skip
            gevent.spawn(runner.quit)  # quit() kills the runner's greenlets, not this one
            return


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_kw) -> None:
    if getattr(environment, "disco_master", None) is not None:
        runner = environment.runner
        if isinstance(runner, MasterRunner) and runner.clients.all:
            # Stopped early (Ctrl-C, --run-time): quit the workers now, not after this event, so
            # their last reports (the requests they cut off) reach the CSV written below.
            runner.quit()
        # The master writes --csv (from the workers' reports): one more round, as below.
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)
        return
    run: ReplayRun | None = getattr(environment, "disco_run", None)
    if run is None:
        return
    run.quitting = True  # users stop claiming and sending
    # Requests cut off by the end of the run (Ctrl-C, --run-time) are written as interrupted.
    for rec in list(run.open_records.values()):
        rec.error = rec.error or "interrupted"
        run.writer.write(rec)
        run.errors += 1
        _fire(environment, "completion", (time.monotonic() - run.pacer.t0 - rec.sent) * 1000,
              StreamError(rec.error), rec.tokens)  # fmt: skip
    run.open_records.clear()
    _dump_progress(run)
    run.writer.close()
    if run.worker is not None:
        return  # a worker writes no CSV: its statistics went to the master
    # Locust's --csv writer runs every CSV_STATS_INTERVAL_SEC and not again at shutdown: let it
    # run once more so the CSV holds the final statistics.
    gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)


def _write_progress(run: ReplayRun) -> None:
    while not run.quitting:
        _dump_progress(run)
        gevent.sleep(1.0)


def _dump_progress(run: ReplayRun) -> None:
    tmp = run.spec.progress + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        # CLOCK_MONOTONIC is system-wide on Linux: another process (a benchmark's server) can
        # compare its own monotonic readings with the schedule's origin.
        t0 = run.pacer.t0 if run.pacer.started else None
        json.dump({**run.progress(), "t0_epoch": run.t0_epoch, "t0_monotonic": t0}, f)
    os.replace(tmp, run.spec.progress)


def _fire(env: Environment, name: str, ms: float, exc: Exception | None = None, length: int = 0):
    env.events.request.fire(
        request_type=KIND, name=name, response_time=ms, response_length=length,
        exception=exc, context={},
    )  # fmt: skip


class StreamError(Exception):
    pass


_USER_IDS = itertools.count()


class StreamingUser(FastHttpUser):
    """One simulated user of an open-loop run: it claims the next slot of the shared schedule,
    sleeps until it is due and sends it; requests carry absolute URLs (each goes to its own
    device)."""

    host = "http://127.0.0.1"  # required by Locust; every request names its target in full
    wait_time = constant(0)  # the pacer decides when to send
    network_timeout = 120.0  # replaced by the spec's request timeout at init
    connection_timeout = 10.0
    max_retries = 0  # a retry would hide a failure and shift the schedule
    mode = "open"  # the spec's mode this class serves

    def on_start(self) -> None:
        run: ReplayRun = self.environment.disco_run  # type: ignore[attr-defined]
        if run.spec.mode != self.mode:
            raise RuntimeError(f"{type(self).__name__} runs {self.mode} loop, the spec says "
                               f"{run.spec.mode}")  # fmt: skip
        self.index = next(_USER_IDS)

    @task
    def replay(self) -> None:
        run: ReplayRun = self.environment.disco_run  # type: ignore[attr-defined]
        slot = None if run.quitting else run.pacer.claim()
        claimed_at = time.monotonic()
        if slot is None:
            self._maybe_finish(run)
            gevent.sleep(0.2)
            return
        req = run.requests[slot.index]
        run.pacer.wait(slot, gevent.sleep)
        if run.quitting:
            return
        sent_at = time.monotonic()
        run.pacer.sent(slot, sent_at, claimed_at)
        rec = RequestRecord(
            id=req.id, target=req.target, due=slot.due, sent=sent_at - run.pacer.t0,
            prompt_tokens=req.prompt_tokens, max_tokens=req.max_tokens, session=req.session,
            user=getattr(self, "index", None), worker=run.worker,
        )  # fmt: skip
        run.inflight += 1
        run.open_records[req.id] = rec
        finished = False
        try:
            self._stream(run, req, rec, sent_at)
            finished = True
        except StreamError as e:
            rec.error = str(e)
        except Exception as e:  # noqa: BLE001 (any client failure is a failed request, not a crash)
            rec.error = f"{type(e).__name__}: {e}"
        finally:
            if rec.error is None and not finished:  # GreenletExit: the run was stopped under us
                rec.error = "interrupted"
            if run.open_records.pop(req.id, None) is not None:
                rec.end = time.monotonic() - run.pacer.t0
                run.inflight -= 1
                run.done += 1
                run.errors += rec.error is not None
                run.writer.write(rec)
                total_ms = (rec.end - rec.sent) * 1000
                _fire(self.environment, "completion", total_ms,
                      StreamError(rec.error) if rec.error else None, rec.tokens)  # fmt: skip
                self._maybe_finish(run)

    def _stream(self, run: ReplayRun, req: ScheduledRequest, rec: RequestRecord, t_send: float):
        body = {
            "prompt": req.prompt, "max_tokens": req.max_tokens, "stream": True,
            "temperature": run.spec.temperature, "user": req.session or req.id,
        }  # fmt: skip
        if run.spec.model:
            body["model"] = run.spec.model
        resp = self.client.request(
            "POST", req.target + run.spec.path, json=body, stream=True, name="headers",
            headers={"Accept": "text/event-stream", "X-Request-Id": req.id},
        )  # fmt: skip
        rec.status = int(getattr(resp, "status_code", 0) or 0)
        if getattr(resp, "error", None) is not None and rec.status == 0:
            raise StreamError(f"no response: {resp.error}")
        if rec.status != 200:
            raise StreamError(f"HTTP {rec.status}: {(resp.text or '')[:200]}")
        raw = body_reader(resp)
        dec = SSEDecoder()
        while True:
            line = raw.readline(b"\n")
            chunk = dec.feed(line) if line else dec.flush()
            if chunk is not None:
                if chunk.tokens:
                    now = time.monotonic() - t_send
                    if not rec.token_times:
                        _fire(self.environment, "TTFT", now * 1000)
                    rec.token_times.extend([now] * len(chunk.tokens))
                    src = chunk.disco.source if chunk.disco else None  # who made them
                    rec.token_sources.extend([src] * len(chunk.tokens))  # aligned, None: unsaid
                if chunk.disco is not None:
                    rec.extra.update(chunk.disco.to_dict())
                if chunk.finish_reason:
                    rec.finish_reason = chunk.finish_reason
                if chunk.error is not None:
                    raise StreamError(chunk.error.message)
                if chunk.done:
                    break
            if not line:
                break
        for gap in rec.gaps:
            _fire(self.environment, "TBT", gap * 1000)
        if not rec.token_times:
            raise StreamError("the stream ended without a token")

    def _maybe_finish(self, run: ReplayRun) -> None:
        # Every request handed out was answered, and no more will be (the schedule is used up,
        # or a closed loop's duration has passed).
        if run.quitting or run.finished:
            return
        if run.pacer.exhausted and run.done >= run.pacer.stats().claimed:
            run.finished = True
            runner = self.environment.runner
            if isinstance(runner, WorkerRunner):  # the master ends the run when all are done
                _dump_progress(run)
                runner.send_message(DONE_MSG, {"worker": run.worker, "sent": run.done})
                return
            run.quitting = True
            if runner is not None:
                gevent.spawn(runner.quit)  # not from this greenlet: quit() kills the users


class ClosedLoopUser(StreamingUser):
    """One user of a closed-loop run (``disco load --concurrency N`` starts N): the shared pacer
    is a :class:`~disco.loadgen.pacer.ClosedLoop`, so the inherited task claims the next request
    of the schedule as soon as this user's previous one has ended and sends it at once; the run
    ends after its duration or its last request, whichever comes first."""

    mode = "closed"
