"""The live-side planner protocol: how a device agent asks for plans and reports outcomes.

`device_agents` is handed an object of this shape when it starts (the scheduler actor's handle
wrapped by `disco.cluster`, or a local policy for a stand-alone agent); it never imports `cluster`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .types import Plan, Request, RequestOutcome


@runtime_checkable
class Planner(Protocol):
    async def plan(self, request: Request) -> Plan: ...

    async def report(self, outcome: RequestOutcome) -> None: ...
