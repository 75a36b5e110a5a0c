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
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import ray

from disco.cluster import wire
from disco.cluster.config import SchedulerConfig, from_dict, to_dict
from disco.cluster.resolve import check_live_policy, policy_from_config
from disco.cluster.scheduler_state import Checkpointer, SchedulerCore, make_store
from disco.scheduler.types import Plan, Regime, Request, RequestOutcome


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

    async def ping(self) -> int:
        """The actor's process id (changes when Ray restarts it)."""
        return os.getpid()

    async def plan(self, request: Request) -> Plan:
        return self.core.plan_many((request,), time.monotonic())[0]

    async def plan_many(self, requests: Sequence[Request]) -> list[Plan]:
        return self.core.plan_many(requests, time.monotonic())

    async def plan_wire(self, requests: Sequence[tuple]) -> list[tuple]:
        """``plan_many`` on plain tuples (see :mod:`disco.cluster.wire`): pickling dataclasses
        costs more than the decision itself, so the planner client uses this."""
        plans = self.core.plan_many([wire.request_from(r) for r in requests], time.monotonic())
        return [wire.plan_to(p) for p in plans]

    async def report(self, outcome: RequestOutcome) -> None:
        await self.report_many((outcome,))

    async def report_many(self, outcomes: Sequence[RequestOutcome]) -> None:
        self.core.observe_many(outcomes)
        self.checkpointer.touch()

    async def checkpoint(self) -> None:
        """Write the state now and wait until it is written (tests, shutdown)."""
        await self.checkpointer.flush()

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Switch policy or budget live; the ledger (the budget spent so far) carries over."""
        cfg = from_dict(SchedulerConfig, config, "scheduler")
        self.core.policy = policy_from_config(cfg)
        self.core.regime = Regime(cfg.regime)
        self.cfg = cfg
        self.checkpointer.interval_s = cfg.checkpoint_interval_s
        await self.checkpoint()

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
