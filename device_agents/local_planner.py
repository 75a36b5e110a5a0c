"""Planners that run inside the agent process: a core Policy on a monotonic clock, or a fixed plan.

The cluster side hands agents the scheduler actor instead; both satisfy
:class:`disco.scheduler.planner.Planner`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from disco.scheduler.policies.base import Policy, PolicyConfig, make_policy
from disco.scheduler.profiles import DeviceProfile, ServerProfile
from disco.scheduler.types import MigrationRule, Plan, Request, RequestOutcome


class LocalPlanner:
    """A Planner over one Policy; ``clock`` must be the clock the requests' arrivals use."""

    def __init__(self, policy: Policy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock

    @classmethod
    def from_name(
        cls,
        name: str,
        config: PolicyConfig,
        server: ServerProfile,
        device: DeviceProfile,
        clock: Callable[[], float] = time.monotonic,
    ) -> LocalPlanner:
        return cls(make_policy(name, config, server, device), clock)

    async def plan(self, request: Request) -> Plan:
        return self.policy.plan(request, self.clock())

    async def report(self, outcome: RequestOutcome) -> None:
        self.policy.observe(outcome)


@dataclass(frozen=True, slots=True)
class StaticPlanner:
    """The same plan for every request (tests, benchmarks, a fallback when the scheduler is down)."""

    server_start: float | None = 0.0
    device_start: float | None = 0.0
    cancel_loser: bool = True
    migration: MigrationRule | None = None
    policy: str = "static"

    async def plan(self, request: Request) -> Plan:
        return Plan(
            request.id,
            self.server_start,
            self.device_start,
            self.cancel_loser,
            self.migration,
            self.policy,
        )

    async def report(self, outcome: RequestOutcome) -> None:
        return None
