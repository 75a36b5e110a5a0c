"""The central scheduler: one Ray actor wrapping a core policy for every device in the testbed.

- ``plan_many(requests)`` answers a whole batch in one call (a Ray call costs ~1 ms here, a policy
  decision microseconds); :class:`~disco.cluster.planner_client.ActorPlanner` gathers concurrent
  callers into such batches. The methods are async, so many batches are in flight at once.
- ``report_many(outcomes)`` feeds telemetry (first-token times, work done, costs) to the policy's
  online estimates and to the budget ledger.
- Restarts: the actor is created with ``max_restarts``; its state (the pickled policy, the
  ledger and the current config, as changed by ``reconfigure``) is checkpointed to Ray's GCS
  store (or a file) at most every ``checkpoint_interval_s`` after a report (0: on every report),
  and ``__init__`` restores it, so a restarted actor keeps its budget accounting and config.
  Callers' in-flight calls are retried (``max_task_retries=-1``). The write runs off the event
  loop that answers plans (:class:`~disco.cluster.scheduler_state.Checkpointer`).
- ``sync(msg)`` (issue 11, ``planning: snapshot``): a holder (fleet actor, device agent) that
  plans locally sends its batch of outcomes and gets the newest policy snapshot and its next
  budget lease (:class:`~disco.scheduler.publisher.SnapshotPublisher`); the policy then fits once
  per publish, so this actor's work grows with syncs, not requests.
- ``reconfigure(config)`` switches policy, budget, regime or profiles live (``disco serve`` run
  again) and answers what changed; ``status()`` is what ``disco status`` shows, including the
  small registry of device agents and fleets that ``register`` fills (kept in memory only:
  fleets register once at start, standalone agents every few seconds).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import ray

from disco.cluster import wire
from disco.cluster.config import SchedulerConfig, from_dict, to_dict
from disco.cluster.metrics import scheduler_sampler
from disco.cluster.resolve import check_live_policy, policy_from_config
from disco.cluster.scheduler_state import Checkpointer, NullStore, SchedulerCore, make_store
from disco.scheduler.lease import LeaseConfig
from disco.scheduler.publisher import PublishConfig, SnapshotPublisher
from disco.scheduler.types import Plan, Regime, Request, RequestOutcome

# Keys ``reconfigure`` applies without rebuilding the policy; any other change (policy, budget,
# regime, migration, window, profiles...) rebuilds it.
NON_POLICY_KEYS = frozenset({"checkpoint_interval_s", "planning", "sync_s"})
# Fixed when the actor is created (its name, restarts, store, placement): a change needs a new
# actor (``disco down``, then ``disco serve``); ``reconfigure`` reports and keeps them.
CREATION_KEYS = frozenset({"actor_name", "max_restarts", "checkpoint", "num_cpus", "resources"})


class SchedulerActor:
    """Use :func:`start_scheduler` to create it as a Ray actor."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = from_dict(SchedulerConfig, config, "scheduler")
        self.core = SchedulerCore(
            policy_from_config(self.cfg), Regime(self.cfg.regime), replay_window=self.cfg.window
        )
        self.store = make_store(self.cfg.checkpoint, self.cfg.actor_name)
        blob = self.store.load()
        if blob is not None:
            saved = SchedulerCore.snapshot_config(blob)
            if saved is not None:
                # Ray re-runs __init__ with the creation-time config; the snapshot holds the
                # current one (``reconfigure`` may have changed policy, budget, regime).
                self.cfg = from_dict(SchedulerConfig, saved, "scheduler")
                self.core.regime = Regime(self.cfg.regime)
            self.core.restore(blob, lambda: policy_from_config(self.cfg))
        self.checkpointer = Checkpointer(
            self.store,
            lambda: self.core.snapshot(to_dict(self.cfg)),
            self.cfg.checkpoint_interval_s,
        )
        self.started_at = time.time()
        self.devices: dict[str, dict[str, Any]] = {}  # registry: id -> entry (``register``)
        self.metrics = scheduler_sampler(self)  # Ray metrics, <= 1/s (cluster/metrics.py)
        self.publisher: SnapshotPublisher | None = None  # made by the first sync

    async def ping(self) -> int:
        """The actor's process id (changes when Ray restarts it)."""
        return os.getpid()

    async def probe(self) -> dict[str, Any]:
        """This actor's process, event loop and state size now (``disco bench soak``):
        ``state_bytes`` is a checkpoint's size, ``recent`` the outcomes kept for a replay."""
        import asyncio

        snapshot = self.core.snapshot(to_dict(self.cfg))
        return {"pid": os.getpid(), "tasks": len(asyncio.all_tasks()),
                "state_bytes": len(snapshot), "recent": len(self.core.recent),
                "devices": len(self.devices)}  # fmt: skip

    async def plan(self, request: Request) -> Plan:
        return self.core.plan_many((request,), time.monotonic())[0]

    async def plan_many(self, requests: Sequence[Request]) -> list[Plan]:
        plans = self.core.plan_many(requests, time.monotonic())
        self.metrics.touch()
        return plans

    async def plan_wire(self, requests: Sequence[tuple]) -> list[tuple]:
        """``plan_many`` on plain tuples (see :mod:`disco.cluster.wire`): pickling dataclasses
        costs more than the decision itself, so the planner client uses this."""
        plans = self.core.plan_many([wire.request_from(r) for r in requests], time.monotonic())
        self.metrics.touch()
        return [wire.plan_to(p) for p in plans]

    async def report(self, outcome: RequestOutcome) -> None:
        await self.report_many((outcome,))

    async def report_many(self, outcomes: Sequence[RequestOutcome]) -> None:
        self.core.observe_many(outcomes)
        self.checkpointer.touch()
        self.metrics.touch()

    def _publish_config(self) -> PublishConfig:
        c = self.cfg
        return PublishConfig(interval_s=c.publish_interval_s, sync_s=c.sync_s,
                             lease=LeaseConfig(period_s=c.lease_period_s,
                                               headroom=c.lease_headroom))  # fmt: skip

    def _publisher(self) -> SnapshotPublisher:
        if self.publisher is None:
            self.publisher = SnapshotPublisher(
                self.core.policy, self._publish_config(),
                config_version=self.core.config_version, seen_seq=self.core.holder_seq,
            )  # fmt: skip
        return self.publisher

    async def sync(self, msg: dict[str, Any]) -> dict[str, Any]:
        """A holder's batch in; the newest snapshot (if it has an older one) and its lease out
        (see :meth:`SnapshotPublisher.sync`). A batch number already taken (a resend, or a call
        Ray replays after a restart: the numbers travel with the checkpoint) counts once."""
        answer, totals = self._publisher().sync(msg, time.monotonic(), time.time())
        if totals is not None:
            self.core.ledger.add_totals(totals)
            self.core.plans += int(msg.get("plans", 0))
        self.checkpointer.touch()
        self.metrics.touch()
        return answer

    async def snapshot(self) -> dict[str, Any]:
        """The current policy snapshot (wire form), published now if none is."""
        return self._publisher().current(time.monotonic(), time.time()).to_wire()

    async def cpu(self) -> dict[str, float]:
        """This actor's process CPU time (``disco bench scale``: the scheduler's cost)."""
        t = os.times()
        return {"cpu_s": t.user + t.system, "sync_cpu_s":
                0.0 if self.publisher is None else self.publisher.stats.cpu_s}  # fmt: skip

    async def checkpoint(self) -> None:
        """Write the state now and wait until it is written (tests, shutdown)."""
        await self.checkpointer.flush()

    async def reconfigure(self, config: dict[str, Any]) -> dict[str, Any]:
        """Switch policy, budget, regime or profiles live; the ledger (the budget spent so far)
        carries over. Returns ``{"changed": {key: [old, new]}, "kept": {key: [old, asked]},
        "version": n}``: ``kept`` lists keys fixed at the actor's creation (``CREATION_KEYS``),
        left as they are. Nothing changed: nothing is rebuilt and the version stays."""
        asked = from_dict(SchedulerConfig, config, "scheduler")
        old, new = to_dict(self.cfg), to_dict(asked)
        kept = {k: [old[k], new[k]] for k in sorted(CREATION_KEYS) if old[k] != new[k]}
        new.update({k: old[k] for k in kept})
        changed = {k: [old[k], new[k]] for k in new if old[k] != new[k]}
        if changed:
            cfg = from_dict(SchedulerConfig, new, "scheduler")
            if changed.keys() - NON_POLICY_KEYS:
                self.core.policy = policy_from_config(cfg)  # raises before anything changed
                if self.publisher is not None:
                    self.publisher.set_policy(self.core.policy, self.core.config_version + 1)
            self.core.regime = Regime(cfg.regime)
            self.cfg = cfg
            if self.publisher is not None:
                if cfg.planning == "central":  # back to per-request plans: fits as before
                    self.publisher.detach()
                    self.publisher = None
                else:
                    self.publisher.set_config(self._publish_config())
            self.core.config_version += 1
            self.checkpointer.interval_s = cfg.checkpoint_interval_s
            await self.checkpoint()
        return {"changed": changed, "kept": kept, "version": self.core.config_version}

    async def config(self) -> dict[str, Any]:
        """The current config (as ``reconfigure`` left it): what device agents run locally
        when this actor does not answer in time (``ActorPlanner.fallback``)."""
        return to_dict(self.cfg)

    async def stats(self) -> dict[str, Any]:
        node = ray.get_runtime_context().get_node_id()
        return (
            self.core.stats()
            | self.checkpointer.stats()
            | {"node_id": node, "config": to_dict(self.cfg)}
        )

    # ---- operations: the registry of devices, status, teardown --------------------------------

    async def register(self, entry: dict[str, Any]) -> None:
        """A device agent or fleet says it is up (again): ``id``, ``kind`` (``agent``, ``fleet``,
        ``agent-actor``), ``devices`` and whatever else it wants shown (``actor``: its actor's
        name, ``url``, ``metrics``: its counters). A later call with the same id replaces it."""
        now = time.time()
        key = str(entry["id"])
        first = self.devices.get(key, {}).get("registered_at", now)
        self.devices[key] = dict(entry) | {"id": key, "registered_at": first, "seen_at": now}
        self.metrics.touch()

    async def unregister(self, device_id: str) -> bool:
        return self.devices.pop(str(device_id), None) is not None

    async def status(self) -> dict[str, Any]:
        """What ``disco status`` shows, as plain data: the policy, the budget (target, the share
        spent since the actor's ledger began, and over the policy's sliding window), the config
        version, counters with this actor's clock (``t``: two samples give plans/s) and the
        registry of devices."""
        ctx = ray.get_runtime_context()
        policy = self.core.policy
        seen = getattr(policy, "budget_seen", None)
        spent = getattr(policy, "budget_spent", None)
        window = getattr(policy, "window", None)
        led = self.core.ledger
        return {
            "name": self.cfg.actor_name,
            "namespace": ctx.namespace,
            "node_id": ctx.get_node_id(),
            "pid": os.getpid(),
            "started_at": self.started_at,
            "policy": getattr(policy, "name", None) or self.cfg.policy,
            "regime": self.cfg.regime,
            "migration": self.cfg.migration,
            "config_version": self.core.config_version,
            "budget": {
                "target": self.cfg.budget,
                "spent_share": led.spent_ratio(self.core.regime),
                "window": self.cfg.window,
                "window_requests": min(getattr(window, "n", 0), self.cfg.window),
                "window_share": spent / seen if seen else None,
            },
            "plans": self.core.plans,
            "requests": led.requests,
            "errors": led.errors,
            "migrations": led.migrations,
            "restores": self.core.restores,
            "planning": self.cfg.planning,
            "snapshots": None if self.publisher is None else self.publisher.status(),
            "t": time.monotonic(),
            "config": to_dict(self.cfg),
            "devices": sorted(self.devices.values(), key=lambda d: d["id"]),
        } | self.checkpointer.stats()

    async def forget(self) -> None:
        """Drop the checkpoint and stop writing it (``disco down``: the next actor of this name
        starts from an empty ledger)."""
        self.checkpointer.close()  # waits for a write in flight, so none lands after clear()
        self.checkpointer.store = NullStore()
        self.store.clear()


def start_scheduler(
    cfg: SchedulerConfig, *, fresh: bool = True, detached: bool = False
) -> ray.actor.ActorHandle:
    """Create (or, with ``fresh=False``, join) the named scheduler actor.

    ``fresh`` drops a checkpoint left by an earlier testbed of the same name, so a new run does
    not inherit an old budget; ``detached`` keeps the actor after the driver exits
    (``disco serve``). Raises :class:`~disco.cluster.resolve.OfflinePolicyError` here, in the
    caller, for a policy that cannot plan live (rather than an actor that fails to start).
    """
    check_live_policy(cfg.policy)
    if fresh:
        make_store(cfg.checkpoint, cfg.actor_name).clear()
    opts: dict[str, Any] = {
        "name": cfg.actor_name,
        "max_restarts": cfg.max_restarts,
        "max_task_retries": -1,
        "num_cpus": cfg.num_cpus,
        "get_if_exists": not fresh,
    }
    if cfg.resources:
        opts["resources"] = dict(cfg.resources)
    if detached:
        opts["lifetime"] = "detached"
    return ray.remote(SchedulerActor).options(**opts).remote(to_dict(cfg))
