"""The `Policy` protocol every dispatch policy implements, and the registry that builds them.

A policy is pure and clock-agnostic: it is asked for a plan with the current time as an argument,
and told what happened (``observe``) so that online estimates and budget accounting stay current.
The live `SchedulerActor` and the virtual-time simulator drive the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..profiles import DeviceProfile, ServerProfile
from ..registry import Registry
from ..types import Plan, Regime, Request, RequestOutcome


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    regime: Regime = Regime.SERVER_CONSTRAINED
    budget: float = 0.5  # share b of prompt tokens the constrained endpoint may prefill
    migration: bool = True
    # Requests in the sliding window of online estimates and of the budget (spent share <= b
    # over the last `window` observed requests, plus those in flight).
    window: int = 2000
    recompute_every: int = 100  # recompute thresholds / wait times every N observations
    seed: int = 0
    # [R] DiSCo-D protects this TTFT quantile first ("tail protection"), then spends the rest of
    # the budget on the mean.
    tail_quantile: float = 0.99
    # [R] DiSCo-D rescues its tail buckets at (1 - tail_robust) x the estimated target where the
    # budget allows, so that window noise does not push the realised tail over it.
    tail_robust: float = 0.2
    # [R] budget feedback: repay the spent-vs-b deficit over this many recompute periods.
    feedback_horizon: float = 4.0
    # [R] DiSCo-D also builds a length-dominating wait table (w = 0 wherever the `length` split
    # at b races, longer safe waits for prompts far under its tail; see disco.py) and keeps its
    # two-stage table only where the window estimates that one's tail quantile lower by more
    # than candidate_tol (relative).
    length_candidate: bool = True
    candidate_tol: float = 0.03
    # [R] DiSCo-D weighs the mean too: its tail-first table gives way to the mean-optimal one
    # (stage 2 alone) where the window estimates a mean lower by more than mean_gain_min (relative)
    # and a tail no higher (disco.py). False: the tail-first table always (before issue 14).
    mean_tail_select: bool = True
    mean_gain_min: float = 0.02
    # [R] DiSCo plans each period to end at most guard_headroom x the guard's slack over b
    # (1.0: no such cap, only the feedback).
    guard_headroom: float = 0.3
    # [R] DiSCo's budget feedback counts the deficit from its first recompute on.
    feedback_from_first_fit: bool = True
    # [R] Plans see the requesting device's queue (Request.device_queue): a request behind a busy
    # device is decided as a longer prompt would be (WindowPolicy.decision_length).
    device_queue_aware: bool = True
    # [R] DiSCo's budget feedback also counts the requests planned but not observed yet
    # (inflight_seen / inflight_spent), so a feedback whose outcomes arrive a stream later does
    # not overshoot. Snapshot publishing (issue 11) turns it on; off: as before.
    feedback_counts_inflight: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.budget <= 1.0:
            raise ValueError(f"budget must be in [0, 1], got {self.budget}")
        if self.window <= 0 or self.recompute_every <= 0:
            raise ValueError("window and recompute_every must be > 0")
        if self.recompute_every > self.window:
            raise ValueError(
                f"recompute_every ({self.recompute_every}) must be <= window ({self.window}): "
                "the window holds the budget of at least one recompute period"
            )


@runtime_checkable
class Policy(Protocol):
    name: str
    config: PolicyConfig

    def plan(self, request: Request, now: float) -> Plan:
        """Decide who starts, when, and whether migration is allowed."""
        ...

    def observe(self, outcome: RequestOutcome) -> None:
        """Feed back a finished request (TTFTs seen, work done) to update estimates and budget."""
        ...


class PolicyFactory(Protocol):
    def __call__(
        self, config: PolicyConfig, server: ServerProfile, device: DeviceProfile
    ) -> Policy: ...


POLICIES: Registry[PolicyFactory] = Registry("policy")


def make_policy(
    name: str, config: PolicyConfig, server: ServerProfile, device: DeviceProfile
) -> Policy:
    return POLICIES.get(name)(config, server, device)
