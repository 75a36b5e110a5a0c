"""Test doubles loaded by Ray workers by import path (``tests.cluster.doubles:...``), and a
helper the tests that run ``disco`` as a process share.

Ray puts the driver's working directory on its workers' ``sys.path``, so run pytest from the
repository root.
"""

from __future__ import annotations

import signal
import subprocess

from disco.scheduler.types import EndpointKind, MigrationRule, Plan, Request, RequestOutcome


class CountingPolicy:
    """Races both endpoints until `budget` requests were observed, then uses the server only."""

    name = "counting"

    def __init__(self, config, server, device) -> None:
        self.config = config
        self.observed = 0
        self.device_prompt_tokens = 0

    def plan(self, request: Request, now: float) -> Plan:
        device = 0.0 if self.device_prompt_tokens < 1000 else None
        return Plan(request.id, server_start=0.0, device_start=device, policy=self.name)

    def observe(self, outcome: RequestOutcome) -> None:
        self.observed += 1
        self.device_prompt_tokens += outcome.device_prompt_tokens


class UnpicklablePolicy(CountingPolicy):
    """Holds a lambda, so checkpoints fall back to replaying recent outcomes."""

    def __init__(self, config, server, device) -> None:
        super().__init__(config, server, device)
        self.hook = lambda: None


class RaceMigratePolicy(CountingPolicy):
    """Race both endpoints; a server win may migrate the rest of the generation to the device."""

    name = "race-migrate"

    def plan(self, request: Request, now: float) -> Plan:
        rule = MigrationRule(target=EndpointKind.DEVICE, from_kind=EndpointKind.SERVER)
        return Plan(request.id, 0.0, 0.0, cancel_loser=True, migration=rule, policy=self.name)


class ServerOnlyPolicy(CountingPolicy):
    """Start the server only (the device serves only as a failover target)."""

    name = "server-only"

    def plan(self, request: Request, now: float) -> Plan:
        return Plan(request.id, server_start=0.0, device_start=None, policy=self.name)


def stop_process(proc: subprocess.Popen, wait_s: float = 10.0) -> None:
    """Ctrl-C, as a user would; kill it if it has not exited within ``wait_s``."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
