"""Budget leases: a global budget without a per-request call (issue 11, DESIGN.md section 9).

The budget b caps the share of prompt tokens the constrained endpoint prefills, cluster-wide. With
per-request central planning the scheduler's guard counts every request in flight; with devices
planning locally from a snapshot, the scheduler instead *leases* each holder (a fleet actor, a
device agent) an allowance of constrained-endpoint prompt tokens for the next period, sized from
what that holder reported (its rate of prompt tokens) and refilled at every sync. [R] ours:

- :class:`LeaseBook` (central): a token bucket per holder. Each renewal refills it with what the
  holder may spend over the time since its last one, (elapsed) x its prompt-token rate (an EWMA
  of what it planned) x min(b_alloc x (1 + headroom), b + max_over_b), where b_alloc is the policy's fitted effective
  budget (its integral feedback steers the cluster-wide share to b; the lease only caps); the
  bucket holds at most one ``period_s`` of that, and the refills never pass the room the sliding
  window leaves under b + slack (the central guard's rule, shared out by rate). A burst of 10x
  the rate empties the bucket early, so the share spent in a burst falls rather than rises. A holder that stops syncing loses its
  lease after ``expire_periods``: counted (``leases_lost``, ``lost_allowance``: the most
  constrained spend that can go unreported) and its share of the room returns to the others.
- :class:`LeaseGuard` (holder): a plan may start the constrained endpoint only while the lease's
  bucket is positive, and takes out its expected spend (the whole prompt for a start at once, the fire probability
  of a hedge); outcomes settle the reservation to the actual spend. In-flight reservations carry
  over to the next lease. When the lease has lapsed (the scheduler is away), the holder funds
  itself: its own lifetime share may not pass b + slack (counted as ``self_funded``).

Pure: the caller passes the clock (seconds, any origin, one per side).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GUARD_SLACK = 0.01  # as the central guard's (policies.common.GUARD_SLACK)


@dataclass(frozen=True, slots=True)
class Lease:
    holder: str
    lease_id: int
    refill: float  # constrained prompt tokens added to the holder's bucket
    cap: float  # the most the bucket may hold (one period at the holder's rate)
    budget: float
    period_s: float
    expires_s: float  # after receipt, the holder stops spending it and funds itself

    @property
    def allowance(self) -> float:
        return self.cap

    def to_wire(self) -> tuple:
        return (self.holder, self.lease_id, self.refill, self.cap, self.budget, self.period_s,
                self.expires_s)  # fmt: skip

    @classmethod
    def from_wire(cls, t: Any) -> Lease:
        return cls(str(t[0]), int(t[1]), float(t[2]), float(t[3]), float(t[4]), float(t[5]),
                   float(t[6]))  # fmt: skip


@dataclass(slots=True)
class LeaseGuard:
    """The holder's side. ``budget``: b, for the self-funded mode before any lease and after one
    lapses."""

    budget: float
    lease: Lease | None = None
    received_at: float = -float("inf")
    bucket: float = 0.0  # constrained prompt tokens it may still commit
    outstanding: dict[str, float] = field(default_factory=dict)  # request id -> reservation
    reserved: float = 0.0  # sum of ``outstanding``: expected spend of the plans in flight
    seen_total: float = 0.0  # prompt tokens of every request this holder planned
    spent_total: float = 0.0  # constrained tokens committed (settled to actual spend)
    denied: int = 0  # plans that wanted the constrained endpoint and were refused it
    self_funded: int = 0  # decisions made with a lapsed lease (or before the first)

    def renew(self, lease: Lease, now: float) -> None:
        lapsed = not self.active(now)
        self.lease, self.received_at = lease, now
        # After a lapse the holder funded itself: start again from this refill alone.
        start = 0.0 if lapsed else self.bucket
        self.bucket = min(start + lease.refill, lease.cap)

    def active(self, now: float) -> bool:
        return self.lease is not None and now - self.received_at <= self.lease.expires_s

    def balance(self, now: float) -> float:
        return self.bucket if self.active(now) else 0.0

    def allows(self, prompt_tokens: float, reserve: float, now: float) -> bool:
        """Whether a plan expected to spend ``reserve`` constrained tokens may go ahead."""
        if reserve <= 0.0 or self.budget >= 1.0:
            return True
        if self.active(now):
            # A positive bucket admits any one plan (it may go into debt, repaid by the next
            # refills): the long-run rate is the refills', and a long prompt, which DiSCo-S races
            # first, is never shut out by a small holder's bucket.
            ok = self.bucket > 0.0
        else:
            self.self_funded += 1
            seen = self.seen_total + prompt_tokens
            ok = self.spent_total + reserve <= (self.budget + GUARD_SLACK) * seen
        if not ok:
            self.denied += 1
        return ok

    def commit(self, request_id: str, prompt_tokens: float, reserve: float) -> None:
        """A plan was made: ``prompt_tokens`` seen, ``reserve`` reserved (0: unconstrained)."""
        self.seen_total += prompt_tokens
        prev = self.outstanding.pop(request_id, None)
        if prev is not None:  # re-planned id: drop its earlier reservation
            self.bucket += prev
            self.spent_total -= prev
            self.reserved -= prev
        if reserve > 0.0:
            self.outstanding[request_id] = reserve
            self.bucket -= reserve
            self.spent_total += reserve
            self.reserved += reserve

    def settle(self, request_id: str, spent: float) -> None:
        """The outcome is known: its reservation becomes the constrained tokens it spent."""
        reserve = self.outstanding.pop(request_id, 0.0)
        self.reserved = max(0.0, self.reserved - reserve) if self.outstanding else 0.0
        self.bucket -= spent - reserve  # a hedge that fired, a migration's prefill: charged now
        self.spent_total += spent - reserve

    def stats(self, now: float) -> dict[str, Any]:
        return {"lease_id": None if self.lease is None else self.lease.lease_id,
                "cap": None if self.lease is None else self.lease.cap,
                "balance": self.balance(now), "active": self.active(now),
                "outstanding": len(self.outstanding), "denied": self.denied,
                "self_funded": self.self_funded, "seen_tokens": self.seen_total,
                "spent_tokens": self.spent_total}  # fmt: skip


@dataclass(slots=True)
class _Holder:
    devices: int
    rate: float | None  # prompt tokens per second, EWMA of reports
    last_sync: float
    last_grant: float | None = None
    allowance: float = 0.0  # the last cap granted
    lease_id: int = 0
    seen: float = 0.0  # reported, lifetime
    spent: float = 0.0
    lost: bool = False
    inflight_seen: float = 0.0  # prompt tokens it planned that are not reported yet
    inflight_spent: float = 0.0  # their reserved constrained spend


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    period_s: float = 2.0
    bucket_s: float = 10.0  # the bucket holds this long's refills (demand is bursty: long prompts)
    headroom: float = 0.25  # allowance over the fitted share: the policy, not the cap, steers
    max_over_b: float = 0.05  # the leased share never passes b + this (a burst's bound)
    expire_periods: float = 3.0  # a holder silent this many periods has lost its lease
    rate_alpha: float = 0.3  # EWMA weight of the newest report's rate
    initial_tokens_s: float = 500.0  # per device-less holder before any report (a guess)

    def __post_init__(self) -> None:
        if self.period_s <= 0 or self.bucket_s <= 0 or self.expire_periods < 1 or not 0 < self.rate_alpha <= 1:
            raise ValueError("lease: period_s > 0, expire_periods >= 1, 0 < rate_alpha <= 1")
        if min(self.headroom, self.initial_tokens_s, self.max_over_b) < 0:
            raise ValueError("lease: headroom, max_over_b and initial_tokens_s must be >= 0")


class LeaseBook:
    """The scheduler's side: one lease per holder, renewed at each of its syncs."""

    def __init__(self, budget: float, config: LeaseConfig | None = None) -> None:
        self.budget = budget
        self.config = config or LeaseConfig()
        self.holders: dict[str, _Holder] = {}
        self.leases_issued = 0
        self.leases_lost = 0
        self.lost_allowance = 0.0  # sum of lost holders' last allowances
        self.revived = 0

    def _rate_of_new(self, devices: int) -> float:
        live = [h for h in self.holders.values() if not h.lost and h.rate is not None]
        per_device = [h.rate / h.devices for h in live if h.devices > 0]
        if per_device and devices > 0:
            return sum(per_device) / len(per_device) * devices
        return self.config.initial_tokens_s

    def report(self, holder: str, devices: int, seen: float, spent: float, now: float,
               inflight: tuple[float, float] = (0.0, 0.0)) -> None:  # fmt: skip
        """A holder's sync: ``seen``/``spent`` prompt tokens since its last one; ``inflight``:
        (prompt tokens, reserved spend) of its plans not reported yet."""
        h = self.holders.get(holder)
        if h is None:  # first contact: the rate of its peers per device, or the guess
            rate = max(self._rate_of_new(devices), seen / self.config.period_s)
            h = self.holders[holder] = _Holder(devices, rate, now)
        else:
            if h.lost:
                h.lost = False
                self.revived += 1
            dt = now - h.last_sync
            if dt > 0:
                a = self.config.rate_alpha
                h.rate = (1 - a) * (h.rate or 0.0) + a * seen / dt
        h.devices, h.last_sync = devices, now
        h.seen += seen
        h.spent += spent
        h.inflight_seen, h.inflight_spent = inflight

    def grant(
        self, holder: str, now: float, b_alloc: float | None, window_seen: float,
        window_spent: float,
    ) -> Lease:  # fmt: skip
        """The holder's next lease (after :meth:`report`). ``b_alloc``: the policy's effective
        budget (None: b); ``window_*``: the budget window's totals (the room under b + slack)."""
        cfg = self.config
        self.expire(now)
        h = self.holders[holder]
        b = self.budget
        fitted = max(0.0, b if b_alloc is None else b_alloc)
        share = min(1.0, fitted * (1.0 + cfg.headroom), b + cfg.max_over_b)
        rates = {k: (x.rate or 0.0) for k, x in self.holders.items() if not x.lost}
        total = sum(rates.values())
        mine = rates.get(holder, 0.0)
        elapsed = cfg.period_s if h.last_grant is None else min(now - h.last_grant, cfg.bucket_s)
        cap = share * mine * cfg.bucket_s
        refill = share * mine * max(elapsed, 0.0)
        if 0.0 < b < 1.0 and total > 0:
            # The room under b + slack over the next period (the window and what is in flight,
            # as the central guard counts it), shared out by rate.
            in_seen, in_spent = self.inflight()
            room = (b + GUARD_SLACK) * (window_seen + in_seen + total * cfg.period_s) - (
                window_spent + in_spent
            )
            mine_room = max(0.0, room) * mine / total
            cap, refill = min(cap, mine_room), min(refill, mine_room)
        if b >= 1.0:
            cap = refill = float("inf")
        elif b <= 0.0:
            cap = refill = 0.0
        h.allowance, h.last_grant = cap, now
        h.lease_id += 1
        self.leases_issued += 1
        return Lease(holder, h.lease_id, refill, cap, b, cfg.period_s,
                     cfg.period_s * cfg.expire_periods)  # fmt: skip

    def inflight(self) -> tuple[float, float]:
        """(prompt tokens, reserved constrained spend) planned by live holders, not yet reported:
        what the budget window does not hold yet."""
        live = [h for h in self.holders.values() if not h.lost]
        return sum(h.inflight_seen for h in live), sum(h.inflight_spent for h in live)

    def expire(self, now: float) -> list[str]:
        """Holders silent past their lease: lost (counted once until they sync again)."""
        limit = self.config.period_s * self.config.expire_periods
        gone = []
        for k, h in self.holders.items():
            if not h.lost and now - h.last_sync > limit:
                h.lost = True
                self.leases_lost += 1
                if h.allowance != float("inf"):
                    self.lost_allowance += h.allowance
                gone.append(k)
        return gone

    def stats(self) -> dict[str, Any]:
        live = [h for h in self.holders.values() if not h.lost]
        return {"holders": len(self.holders), "holders_live": len(live),
                "devices": sum(h.devices for h in live), "leases_issued": self.leases_issued,
                "leases_lost": self.leases_lost, "lost_allowance_tokens": self.lost_allowance,
                "holders_revived": self.revived,
                "reported_seen_tokens": sum(h.seen for h in self.holders.values()),
                "reported_spent_tokens": sum(h.spent for h in self.holders.values())}  # fmt: skip
