"""Policy snapshots: what a device needs to plan locally, published by the central scheduler.

DESIGN.md section 9 (issue 11): at scale a per-request call to a central actor puts a WAN round
trip into every TTFT. The scheduler keeps computing the policy from everyone's telemetry, and
publishes the *decision function* it fitted as a small, versioned, plain-data
:class:`PolicySnapshot`: a :class:`DecisionTable` (thresholds or a wait table), the migration rule,
the survival curve a hedge's budget reservation needs, and the budget it was fitted for. Devices
plan from the latest one in microseconds (:func:`decide`); the budget is held by leases
(:mod:`disco.scheduler.lease`), not by a per-request guard.

Tables are registered by kind; a policy says which one it is with ``decision_table()``. A policy
that has none (a user's ``module:Class``) ships as :class:`FrozenPolicy`, a pickled copy of the
whole policy that plans with its own ``_decide``: correct, not compact.

The decisions equal the central policy's for the same state and request (before the budget
guard, which the lease replaces); ``tests/scheduler/test_snapshot.py`` holds them equal.
Pure: no clock, no I/O.
"""

from __future__ import annotations

import base64
import bisect
import math
import pickle
import random
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from .profiles import DeviceProfile, profile_from_dict, profile_to_dict
from .registry import Registry
from .types import EndpointKind, MigrationRule, Regime, Request

NEVER = math.nan
Starts = tuple[float, float]  # (server start, device start), NaN: never


class DecisionTable(Protocol):
    """Maps a decision length (prompt tokens, queue included) to start times."""

    kind: ClassVar[str]

    def decide(self, length: float, request: Request) -> Starts: ...

    def to_wire(self) -> dict[str, Any]: ...


TABLES: Registry[type] = Registry("decision table")


def _table(kind: str):
    def deco(cls):
        TABLES.add(kind, cls)
        return cls

    return deco


def _f(x: float) -> float | str:
    """JSON-safe float (inf/nan as strings)."""
    return x if math.isfinite(x) else repr(float(x))


def _unf(x: Any) -> float:
    return float(x)


@_table("fixed")
@dataclass(frozen=True, slots=True)
class FixedStarts:
    """The same starts for every request (server-only, device-only, race, hedge-after)."""

    server: float
    device: float
    kind: ClassVar[str] = "fixed"

    def decide(self, length: float, request: Request) -> Starts:
        return self.server, self.device

    def to_wire(self) -> dict[str, Any]:
        return {"server": _f(self.server), "device": _f(self.device)}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> FixedStarts:
        return cls(_unf(d["server"]), _unf(d["device"]))


@_table("split")
@dataclass(frozen=True, slots=True)
class LengthSplit:
    """``length`` and DiSCo-S: prompts on the chosen side of ``threshold`` get ``chosen`` starts
    (a race), the others ``other`` (the unconstrained endpoint alone). ``race_busy``: DiSCo-S's
    cold start, a request behind a busy device races too (the lease decides whether it may)."""

    threshold: float
    long_side: bool
    chosen: Starts
    other: Starts
    race_busy: bool = False
    kind: ClassVar[str] = "split"

    def decide(self, length: float, request: Request) -> Starts:
        use = length >= self.threshold if self.long_side else length <= self.threshold
        if not use and self.race_busy and request.device_queue is not None:
            use = request.device_queue.busy
        return self.chosen if use else self.other

    def to_wire(self) -> dict[str, Any]:
        return {"threshold": _f(self.threshold), "long_side": self.long_side,
                "chosen": [_f(x) for x in self.chosen], "other": [_f(x) for x in self.other],
                "race_busy": self.race_busy}  # fmt: skip

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> LengthSplit:
        c, o = d["chosen"], d["other"]
        return cls(_unf(d["threshold"]), bool(d["long_side"]), (_unf(c[0]), _unf(c[1])),
                   (_unf(o[0]), _unf(o[1])), bool(d.get("race_busy", False)))  # fmt: skip


@_table("waits")
@dataclass(frozen=True, slots=True)
class WaitTable:
    """DiSCo-D: the unconstrained endpoint starts at once, the constrained one after the wait
    of the prompt's length bucket (``edges`` are bucket upper bounds, exclusive; inf: never)."""

    edges: tuple[float, ...]
    waits: tuple[float, ...]  # len(edges) + 1
    constrained: EndpointKind = EndpointKind.DEVICE
    kind: ClassVar[str] = "waits"

    def __post_init__(self) -> None:
        if len(self.waits) != len(self.edges) + 1:
            raise ValueError("a wait table needs one more wait than edges")

    def decide(self, length: float, request: Request) -> Starts:
        w = self.waits[bisect.bisect_right(self.edges, length)]
        w = w if math.isfinite(w) else NEVER
        return (0.0, w) if self.constrained is EndpointKind.DEVICE else (w, 0.0)

    def to_wire(self) -> dict[str, Any]:
        return {"edges": [_f(x) for x in self.edges], "waits": [_f(x) for x in self.waits],
                "constrained": self.constrained.value}  # fmt: skip

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> WaitTable:
        return cls(tuple(map(_unf, d["edges"])), tuple(map(_unf, d["waits"])),
                   EndpointKind(d["constrained"]))  # fmt: skip


@_table("share")
@dataclass(slots=True)
class RandomShare:
    """``random``: a share ``p`` of the requests race, independent of length. Each holder draws
    from its own generator (seeded), so the share holds in expectation across holders."""

    p: float
    race: Starts
    other: Starts
    seed: int = 0
    rng: random.Random = field(init=False, repr=False, compare=False)
    kind: ClassVar[str] = "share"

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def decide(self, length: float, request: Request) -> Starts:
        return self.race if self.rng.random() < self.p else self.other

    def to_wire(self) -> dict[str, Any]:
        return {"p": self.p, "race": [_f(x) for x in self.race],
                "other": [_f(x) for x in self.other], "seed": self.seed}  # fmt: skip

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> RandomShare:
        r, o = d["race"], d["other"]
        return cls(float(d["p"]), (_unf(r[0]), _unf(r[1])), (_unf(o[0]), _unf(o[1])),
                   int(d.get("seed", 0)))  # fmt: skip


@_table("frozen")
@dataclass(frozen=True, slots=True)
class FrozenPolicy:
    """Any policy without a table of its own: a pickled copy that plans with its ``_decide``
    (its learned state frozen at the snapshot). Correct for any WindowPolicy; not compact."""

    blob: bytes
    kind: ClassVar[str] = "frozen"

    def policy(self) -> Any:
        return _unpickled(self.blob)

    def decide(self, length: float, request: Request) -> Starts:
        p = self.policy()
        hint = np.nan if request.server_ttft_hint is None else request.server_ttft_hint
        ss, ds = p._decide(np.array([length]), np.array([hint]))
        return float(ss[0]), float(ds[0])

    def to_wire(self) -> dict[str, Any]:
        return {"blob": base64.b64encode(self.blob).decode()}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> FrozenPolicy:
        return cls(base64.b64decode(d["blob"]))


_FROZEN_CACHE: dict[int, Any] = {}


def _unpickled(blob: bytes) -> Any:
    # One unpickle per distinct blob (a snapshot is planned from thousands of times).
    key = hash(blob)
    p = _FROZEN_CACHE.get(key)
    if p is None:
        if len(_FROZEN_CACHE) > 8:
            _FROZEN_CACHE.clear()
        p = _FROZEN_CACHE[key] = pickle.loads(blob)
    return p


def table_from_wire(d: dict[str, Any]) -> DecisionTable:
    return TABLES.get(d["kind"]).from_wire(d)


def table_to_wire(t: DecisionTable) -> dict[str, Any]:
    return {"kind": t.kind} | t.to_wire()


@dataclass(frozen=True, slots=True)
class Survival:
    """P(server TTFT > t) at a few points (the policy's Kaplan-Meier estimate), for the share
    of a hedge's prompt a lease reserves until its outcome is known. Empty: 1 everywhere."""

    t: tuple[float, ...] = ()
    s: tuple[float, ...] = ()

    def __call__(self, x: float) -> float:
        if not self.t:
            return 1.0
        i = bisect.bisect_right(self.t, x)
        return 1.0 if i == 0 else self.s[i - 1]

    @classmethod
    def of(cls, km: Any, points: int = 32) -> Survival:
        """A step function through ``points`` quantiles of a KaplanMeier's support."""
        if km is None or km.t.size == 0:
            return cls()
        idx = np.unique(np.linspace(0, km.t.size - 1, points).round().astype(int))
        return cls(tuple(float(x) for x in km.t[idx]), tuple(float(x) for x in km.surv[idx]))


@dataclass(frozen=True, slots=True)
class PolicySnapshot:
    """A published decision function. ``version`` increases with every publish of one scheduler
    (a holder ignores an older one); ``fits``: the policy's recomputes so far (0: cold start)."""

    version: int
    policy: str
    regime: Regime
    budget: float
    table: DecisionTable
    migration: MigrationRule | None
    device: DeviceProfile  # the profile decisions assume for the device (queue delays)
    device_queue_aware: bool = True
    hedge_survival: Survival = Survival()
    b_eff: float | None = None
    fits: int = 0
    config_version: int = 1
    published_at: float = 0.0  # the scheduler's wall clock (time.time()) at publish
    epoch: str = ""  # the publisher's (a restarted scheduler numbers its versions anew)

    @property
    def id(self) -> str:
        return f"{self.epoch}/{self.version}"

    @property
    def constrained(self) -> EndpointKind:
        return self.regime.constrained

    def decision_length(self, request: Request) -> float:
        """As ``WindowPolicy.decision_length``: a busy device's queue lengthens the prompt."""
        length = float(request.prompt_tokens)
        if self.device_queue_aware and request.device_queue is not None:
            length += self.device.queue_delay(request.device_queue) * self.device.prefill_tps
        return length

    def decide(self, request: Request) -> Starts:
        """(server start, device start), NaN: never; the central policy's decision before its
        budget guard."""
        return self.table.decide(self.decision_length(request), request)

    def constrained_start(self, starts: Starts) -> float:
        return starts[0] if self.constrained is EndpointKind.SERVER else starts[1]

    def unconstrained_only(self) -> Starts:
        return (NEVER, 0.0) if self.constrained is EndpointKind.SERVER else (0.0, NEVER)

    def reserve(self, prompt_tokens: float, starts: Starts) -> float:
        """Constrained prompt tokens a plan is expected to spend (the lease's reservation): the
        whole prompt for a start at once, the fire probability of a hedge, 0 if it never starts."""
        c = self.constrained_start(starts)
        if math.isnan(c):
            return 0.0
        return float(prompt_tokens) if c == 0.0 else float(prompt_tokens) * self.hedge_survival(c)

    # ---- plain data, for Ray and for a size that can be measured --------------------------
    def to_wire(self) -> dict[str, Any]:
        m = self.migration
        return {
            "version": self.version, "policy": self.policy, "regime": self.regime.value,
            "budget": self.budget, "table": table_to_wire(self.table),
            "migration": None if m is None else [m.target.value, m.from_kind.value],
            "device": profile_to_dict(self.device), "device_queue_aware": self.device_queue_aware,
            "survival": [list(self.hedge_survival.t), list(self.hedge_survival.s)],
            "b_eff": self.b_eff, "fits": self.fits, "config_version": self.config_version,
            "published_at": self.published_at, "epoch": self.epoch,
        }  # fmt: skip

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> PolicySnapshot:
        m = d.get("migration")
        st, ss = d.get("survival") or ([], [])
        return cls(
            version=int(d["version"]), policy=str(d["policy"]), regime=Regime(d["regime"]),
            budget=float(d["budget"]), table=table_from_wire(d["table"]),
            migration=None if m is None else MigrationRule(EndpointKind(m[0]), EndpointKind(m[1])),
            device=_device(d["device"]),
            device_queue_aware=bool(d.get("device_queue_aware", True)),
            hedge_survival=Survival(tuple(map(float, st)), tuple(map(float, ss))),
            b_eff=d.get("b_eff"), fits=int(d.get("fits", 0)),
            config_version=int(d.get("config_version", 1)),
            published_at=float(d.get("published_at", 0.0)), epoch=str(d.get("epoch", "")),
        )  # fmt: skip


def _device(d: dict[str, Any]) -> DeviceProfile:
    p = profile_from_dict(dict(d))
    if not isinstance(p, DeviceProfile):
        raise ValueError("a snapshot's device profile must be a device profile")
    return p


def snapshot_of(
    policy: Any, version: int, *, config_version: int = 1, published_at: float = 0.0,
    epoch: str = "",
) -> PolicySnapshot:  # fmt: skip
    """The decision function ``policy`` (a WindowPolicy) plans with now, as a snapshot."""
    make = getattr(policy, "decision_table", None)
    table = make() if make is not None else None
    if table is None:
        table = FrozenPolicy(pickle.dumps(policy))
    return PolicySnapshot(
        version=version,
        policy=getattr(policy, "name", "") or type(policy).__name__,
        regime=policy.regime,
        budget=float(policy.config.budget),
        table=table,
        migration=policy.migration,
        device=policy.device,
        device_queue_aware=bool(policy.config.device_queue_aware),
        hedge_survival=Survival.of(getattr(policy, "_km", None)),
        b_eff=getattr(policy, "b_eff", None),
        fits=int(getattr(policy, "_recomputes", 0)),
        config_version=config_version,
        published_at=published_at,
        epoch=epoch,
    )
