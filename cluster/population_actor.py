"""Ray actors hosting shards of an emulated device population (issue 11, ``disco bench scale``).

Each :class:`PopulationActor` holds one shard of :class:`~disco.device_agents.population.Population`
(its devices as arrays, one tick timer for all its streams) and its holder's planner:
``planning="snapshot"``: one :class:`~disco.device_agents.snapshot_planner.SnapshotPlanner` named
``pop<i>`` syncing with the scheduler actor (over the emulated scheduler round trip);
``"central"``: a per-request :class:`~disco.cluster.planner_client.ActorPlanner` behind
:class:`~disco.cluster.snapshot_client.RttPlanner`. :func:`start_populations` spreads N devices
over M actors (placed with ``num_cpus`` and custom ``resources``, as fleet actors are).

Methods: ``start(t_start_wall)`` (every shard starts its arrivals at the same wall-clock instant,
so a burst phase is cluster-wide), ``poll()`` (aggregates only: counters, histograms, the
planner's status, what would be lost if the actor died now), ``stop(drain_s)`` (then the holder's
last sync). A killed actor loses its streams in flight and the outcomes its planner had not
synced: the driver reports them from the actor's last poll (:func:`lost_of`).
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

import ray

from disco.device_agents.population import Population, config_from_dict, config_to_dict

_DEFAULT_NUM_CPUS = 0.5


class PopulationActor:
    """Use :func:`start_populations` to create these."""

    def __init__(
        self,
        population: dict[str, Any],
        index: int,
        scheduler: Any,
        scheduler_cfg: dict[str, Any],
        planning: str = "snapshot",
        scheduler_rtt_ms: float = 0.0,
    ) -> None:
        from disco.cluster.planner_client import ActorPlanner
        from disco.cluster.snapshot_client import RttPlanner, snapshot_planner

        cfg = config_from_dict(population)
        rtt_s = scheduler_rtt_ms / 1000.0
        self.index, self.planning = index, planning
        self.holder = f"pop{index}"
        if planning == "snapshot":
            planner: Any = snapshot_planner(
                scheduler, self.holder, scheduler_cfg, devices=cfg.devices, rtt_s=rtt_s
            )
        elif planning == "central":
            planner = ActorPlanner(scheduler, config=scheduler_cfg)
            if rtt_s > 0:
                planner = RttPlanner(planner, rtt_s)
        else:
            raise ValueError(f"planning must be 'snapshot' or 'central', got {planning!r}")
        self.planner = planner
        self.pop = Population(cfg, planner, planning)
        self.stopped = False
        gc.freeze()  # what setup made (profiles, trace, Ray's objects) is never collected again

    async def ping(self) -> int:
        return os.getpid()

    async def start(self, t_start_wall: float) -> float:
        """Arrivals begin at wall-clock ``t_start_wall`` (on the monotonic clock)."""
        t_start = time.monotonic() + (t_start_wall - time.time())
        self.pop.start(t_start)
        return t_start

    def _lost(self) -> dict[str, Any]:
        c = self.pop.c
        if self.planning == "snapshot":
            from disco.device_agents.snapshot_planner import pending_totals

            unsynced = pending_totals(self.planner).requests
        else:
            unsynced = c.completed - c.reported - c.report_errors
        return {"in_flight": self.pop.in_flight, "unsynced_outcomes": int(unsynced)}

    async def poll(self) -> dict[str, Any]:
        """Aggregates only (no per-request data)."""
        out = self.pop.stats(series_from=len(self.pop.series))
        t = os.times()
        out |= {"index": self.index, "holder": self.holder, "pid": os.getpid(),
                "cpu_s": t.user + t.system, "nice": os.nice(0),
                "would_lose": self._lost()}  # fmt: skip
        return out

    async def stop(self, drain_s: float = 0.0) -> dict[str, Any]:
        """No more arrivals; streams get ``drain_s`` to end; the holder's last sync; the final
        poll (with the whole time series)."""
        if not self.stopped:
            self.stopped = True
            await self.pop.stop(drain_s)
            close = getattr(self.planner, "close", None)
            if close is not None:
                await close()
        out = await self.poll()
        out["series"] = self.pop.series
        return out


def shard_sizes(devices: int, actors: int) -> list[int]:
    """``devices`` spread over ``actors`` as evenly as possible (the first get one more)."""
    if actors < 1 or devices < actors:
        raise ValueError(f"need 1 <= actors <= devices, got {actors} actors for {devices} devices")
    q, r = divmod(devices, actors)
    return [q + (1 if i < r else 0) for i in range(actors)]


def start_populations(
    devices: int,
    actors: int,
    population: Any,
    scheduler: Any,
    scheduler_cfg: dict[str, Any],
    *,
    planning: str = "snapshot",
    scheduler_rtt_ms: float = 0.0,
    num_cpus: float = _DEFAULT_NUM_CPUS,
    resources: dict[str, float] | None = None,
    name_prefix: str = "disco-scale.",
) -> list[Any]:
    """Create ``actors`` PopulationActors holding ``devices`` devices in all; shard i gets
    devices numbered from the sum of the shards before it and the seed ``seed + 1000 i``.
    ``population``: a PopulationConfig (or its dict) whose ``devices``, ``device_offset``,
    ``seed`` and ``id_prefix`` are set per shard. Waits until every actor is up."""
    from dataclasses import replace

    from disco.device_agents.population import PopulationConfig

    base = population if isinstance(population, PopulationConfig) else config_from_dict(population)
    opts: dict[str, Any] = {"num_cpus": num_cpus}
    if resources:
        opts["resources"] = dict(resources)
    cls = ray.remote(PopulationActor)
    handles, offset = [], 0
    for i, n in enumerate(shard_sizes(devices, actors)):
        shard = replace(base, devices=n, device_offset=offset, seed=base.seed + 1000 * i,
                        id_prefix=f"pop{i}")  # fmt: skip
        handles.append(
            cls.options(**opts, name=f"{name_prefix}pop{i}").remote(
                config_to_dict(shard), i, scheduler, scheduler_cfg, planning, scheduler_rtt_ms
            )
        )
        offset += n
    ray.get([h.ping.remote() for h in handles], timeout=120)
    return handles


def lost_of(last_poll: dict[str, Any] | None) -> dict[str, Any]:
    """What a dead actor took with it, as of its last poll (a lower bound for what arrived
    after that poll): its streams in flight and the outcomes not yet synced to the scheduler."""
    if last_poll is None:
        return {"in_flight": None, "unsynced_outcomes": None, "as_of_poll": False}
    return dict(last_poll["would_lose"]) | {"as_of_poll": True}


__all__ = ["PopulationActor", "lost_of", "shard_sizes", "start_populations"]
