"""What the scheduler actor must not lose across a restart, and where it is kept.

- :class:`BudgetLedger`: the work each endpoint did (prompt/output tokens, cost, energy), so the
  budget share actually spent is known whatever the policy keeps inside.
- :class:`SchedulerCore`: a policy plus its ledger, with ``plan_many`` / ``observe_many``; no Ray
  and no clock (time is an argument), so it is tested and benchmarked in-process.
- Checkpoint stores: Ray's GCS key-value store (survives an actor restart on any node) or a file.
  A snapshot is the pickled policy and ledger, plus the owner's current config; a policy that
  cannot be pickled is rebuilt by replaying the most recent outcomes (its sliding window) into a
  fresh one.
- :class:`Checkpointer`: writes snapshots without holding up the event loop that answers plans.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

from disco.scheduler.outcome_batch import BatchTotals
from disco.scheduler.policies.base import Policy
from disco.scheduler.types import Plan, Regime, Request, RequestOutcome


@dataclass(slots=True)
class BudgetLedger:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    server_prompt_tokens: int = 0
    device_prompt_tokens: int = 0
    server_output_tokens: int = 0
    device_output_tokens: int = 0
    server_cost: float = 0.0
    device_energy_j: float = 0.0
    first_from_server: int = 0
    first_from_device: int = 0
    migrations: int = 0
    refused: int = 0  # refused by a saturated device before any work: not in the token counts

    def add(self, o: RequestOutcome) -> None:
        one = BatchTotals()  # the one rule of what an outcome adds (scheduler/outcome_batch.py)
        one.add(o)
        self.add_totals(one)

    def add_totals(self, t: BatchTotals) -> None:
        """Add a batch's exact totals (``OutcomeBatch.totals``: the same fields)."""
        for f in fields(BatchTotals):
            setattr(self, f.name, getattr(self, f.name) + getattr(t, f.name))

    def spent_ratio(self, regime: Regime) -> float:
        """Share of prompt tokens the constrained endpoint prefilled (the budget's b)."""
        if self.prompt_tokens == 0:
            return 0.0
        used = (
            self.device_prompt_tokens
            if regime is Regime.DEVICE_CONSTRAINED
            else self.server_prompt_tokens
        )
        return used / self.prompt_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SchedulerCore:
    """A policy with its ledger; batch methods so one call carries many decisions."""

    def __init__(self, policy: Policy, regime: Regime, replay_window: int = 2000) -> None:
        self.policy = policy
        self.regime = regime
        self.ledger = BudgetLedger()
        self.plans = 0
        self.plans_after_fit = 0
        self.plans_not_device_only = 0
        self.restores = 0
        # Bumped by every reconfigure that changes something; kept across restarts.
        self.config_version = 1
        # Snapshot holders' last batch numbers (issue 11): a batch sent again counts once.
        self.holder_seq: dict[str, int] = {}
        # Recent outcomes, to rebuild a policy that cannot be pickled.
        self.recent: deque[RequestOutcome] = deque(maxlen=replay_window)

    def plan_many(self, requests: Sequence[Request], now: float) -> list[Plan]:
        plan = self.policy.plan
        out = [plan(r, now) for r in requests]
        self.plans += len(out)
        if getattr(self.policy, "_recomputes", 0) > 0:
            # After the policy's first fit: how many plans are not device-only (a cold start
            # plans like one), so a run can show the fitted policy at work.
            self.plans_after_fit += len(out)
            self.plans_not_device_only += sum(
                p.server_start is not None or p.device_start != 0.0 for p in out
            )
        return out

    def observe_many(self, outcomes: Sequence[RequestOutcome]) -> None:
        for o in outcomes:
            self.policy.observe(o)
            self.ledger.add(o)
            self.recent.append(o)

    def stats(self) -> dict[str, Any]:
        return {
            "policy": getattr(self.policy, "name", type(self.policy).__name__),
            "regime": self.regime.value,
            "plans": self.plans,
            "plans_after_fit": self.plans_after_fit,
            "plans_not_device_only": self.plans_not_device_only,
            "restores": self.restores,
            "config_version": self.config_version,
            "spent_ratio": self.ledger.spent_ratio(self.regime),
            "ledger": self.ledger.to_dict(),
        }

    # ---- snapshots ----------------------------------------------------------------------------

    def snapshot(self, config: dict[str, Any] | None = None) -> bytes:
        """The state as bytes; ``config`` (the owner's current configuration, plain data)
        travels with it so that a restart comes back with a reconfigured policy/budget."""
        state: dict[str, Any] = {"ledger": self.ledger, "plans": self.plans,
                                 "restores": self.restores, "recent": [],
                                 "config": config, "holder_seq": dict(self.holder_seq),
                                 "config_version": self.config_version}  # fmt: skip
        try:
            state["policy"] = pickle.dumps(self.policy, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 - any unpicklable member: fall back to replay
            # Only then do the recent outcomes travel (they are the bulk of a snapshot).
            state["policy"] = None
            state["recent"] = list(self.recent)
        return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def snapshot_config(blob: bytes) -> dict[str, Any] | None:
        """The configuration a snapshot was taken under (None for one taken without)."""
        return pickle.loads(blob).get("config")

    def restore(self, blob: bytes, fresh_policy: Callable[[], Policy]) -> None:
        """Load a snapshot (its config, if any, is the owner's: :meth:`snapshot_config`)."""
        state = pickle.loads(blob)
        self.ledger = state["ledger"]
        self.plans = state["plans"]
        self.restores = state["restores"] + 1
        self.config_version = state.get("config_version", 1)  # older snapshots: none
        self.holder_seq.clear()  # in place: a publisher may hold this dict
        self.holder_seq.update(state.get("holder_seq", {}))
        self.recent = deque(state["recent"], maxlen=self.recent.maxlen)
        if state["policy"] is not None:
            self.policy = pickle.loads(state["policy"])
        else:
            self.policy = fresh_policy()
            for o in self.recent:
                self.policy.observe(o)


# ---- checkpoint stores ------------------------------------------------------------------------


class CheckpointStore(Protocol):
    def load(self) -> bytes | None: ...

    def save(self, blob: bytes) -> None: ...

    def clear(self) -> None: ...


class NullStore:
    def load(self) -> bytes | None:
        return None

    def save(self, blob: bytes) -> None:
        return None

    def clear(self) -> None:
        return None


class FileStore:
    """Atomic writes (temp file + rename): a crash mid-write leaves the previous snapshot."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def save(self, blob: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def ray_kv() -> Any:
    """Ray's GCS key-value functions ``(get, put, delete)``, the one place that names them.

    Ray (2.60) has no public key-value API: ``ray.experimental.internal_kv``'s underscore
    functions are what Ray's own libraries (Serve, Tune) keep their state in, and their
    signatures have been stable for years. tests/cluster/test_private_apis.py fails when they
    move or change, rather than a checkpoint failing on a cluster.
    """
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_get, internal_kv._internal_kv_put, internal_kv._internal_kv_del


class GcsStore:
    """Ray's GCS key-value store: reachable from every node, outlives any one actor."""

    NAMESPACE = "disco"

    def __init__(self, key: str) -> None:
        self.key = f"scheduler-checkpoint/{key}".encode()

    def load(self) -> bytes | None:
        get, _, _ = ray_kv()
        return get(self.key, namespace=self.NAMESPACE)

    def save(self, blob: bytes) -> None:
        _, put, _ = ray_kv()
        put(self.key, blob, overwrite=True, namespace=self.NAMESPACE)

    def clear(self) -> None:
        _, _, delete = ray_kv()
        delete(self.key, namespace=self.NAMESPACE)


def make_store(spec: str, key: str) -> CheckpointStore:
    """``"gcs"``, ``"none"``, or a file path."""
    if spec == "gcs":
        return GcsStore(key)
    if spec in ("", "none"):
        return NullStore()
    return FileStore(spec)


# ---- checkpointing off the event loop ---------------------------------------------------------

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves snapshots at most every ``interval_s`` after a change, without blocking plan calls.

    The snapshot itself is taken on the event loop: plan calls change the policy between awaits,
    so only there is one state consistent, and pickling is that copy (about 0.1 ms for DiSCo with
    a 2,000-request window here; bench/bench_runtime.py). The write, a GCS round trip or a file
    write and the slow part, runs on one worker thread: writes stay in order, and while one is in
    flight further changes are coalesced into one snapshot taken when it ends (the newest state,
    never a queue of stale ones). ``interval_s`` 0: a write after every change, coalesced so.
    """

    def __init__(
        self, store: CheckpointStore, snapshot: Callable[[], bytes], interval_s: float
    ) -> None:
        self.store = store
        self.snapshot = snapshot
        self.interval_s = interval_s
        self.writes = 0
        self.errors = 0
        self.last_write_s = 0.0  # how long the latest write took on its thread
        self._dirty = False
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Future | None = None
        self._pool: ThreadPoolExecutor | None = None

    def touch(self) -> None:
        """The state changed: save it within ``interval_s``."""
        if isinstance(self.store, NullStore):
            return  # nowhere to keep it: not even the snapshot is taken
        self._dirty = True
        if self._writing is not None or self._timer is not None:
            return  # the write in flight, or the timer, picks the change up
        if self.interval_s <= 0:
            self._start()
        else:
            self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._start)

    async def flush(self) -> None:
        """Save the current state now and wait until it is written (tests, reconfigure)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._writing is not None:  # let the write in flight finish: writes stay ordered
            fut = self._writing
            await asyncio.shield(fut)
            if self._writing is fut:
                # Done, but its done-callback (``_written``) has not run yet: awaiting a done
                # future does not yield, so yield once to let it run (else this spins forever).
                await asyncio.sleep(0)
        self._dirty = True
        self._start()
        if self._writing is not None:
            await asyncio.shield(self._writing)

    def stats(self) -> dict[str, Any]:
        return {"checkpoints": self.writes, "checkpoint_errors": self.errors,
                "checkpoint_write_ms": 1000 * self.last_write_s}  # fmt: skip

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _start(self) -> None:
        if self._timer is not None:  # called early (flush): the timer has nothing left to do
            self._timer.cancel()
            self._timer = None
        if not self._dirty or self._writing is not None:
            return
        self._dirty = False
        blob = self.snapshot()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        loop = asyncio.get_running_loop()
        self._writing = loop.run_in_executor(self._pool, self._save, blob)
        self._writing.add_done_callback(self._written)

    def _save(self, blob: bytes) -> None:
        t0 = time.perf_counter()
        self.store.save(blob)
        self.last_write_s = time.perf_counter() - t0

    def _written(self, fut: asyncio.Future) -> None:
        self._writing = None
        if fut.cancelled():
            return
        err = fut.exception()
        if err is not None:
            self.errors += 1
            self._dirty = True  # retried at the next change, or the next interval below
            log.warning("scheduler checkpoint failed: %r", err)
        else:
            self.writes += 1
        if self._dirty:
            self.touch()
