"""The central side of snapshot planning: telemetry in, snapshots and leases out (issue 11).

:class:`SnapshotPublisher` wraps the scheduler's policy. Holders (fleet actors, device agents)
call :meth:`SnapshotPublisher.sync` every few hundred milliseconds with the outcomes they
collected (:class:`~disco.scheduler.outcome_batch.OutcomeBatch`) and the prompt tokens they
planned; they get back the newest :class:`~disco.scheduler.snapshot.PolicySnapshot` when theirs
is older, and their next :class:`~disco.scheduler.lease.Lease`. The policy fits once per publish
(``interval_s``), not every ``recompute_every`` observations (``WindowPolicy.defer_fits``), so
the scheduler's work grows with syncs and publishes, not with requests: a sync costs a few array
operations over at most ``max_samples`` rows, a publish one fit.

Pure: the caller passes both clocks (``now``: monotonic, for cadence and lease expiry; ``wall``:
``time.time()``, stamped on the snapshot so holders can tell its age).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

from .lease import LeaseBook, LeaseConfig
from .outcome_batch import BatchTotals, OutcomeBatch
from .snapshot import PolicySnapshot, snapshot_of


@dataclass(frozen=True, slots=True)
class PublishConfig:
    interval_s: float = 1.0  # at most one fit and publish per interval (when data arrived)
    sync_s: float = 0.5  # how often holders sync (they read it from the first answer)
    max_samples: int = 2000  # rows per holder batch the policy learns from (totals exact)
    lease: LeaseConfig = field(default_factory=LeaseConfig)

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.sync_s <= 0 or self.max_samples < 1:
            raise ValueError("publish: interval_s > 0, sync_s > 0, max_samples >= 1")


@dataclass(slots=True)
class PublisherStats:
    syncs: int = 0
    publishes: int = 0
    fits: int = 0
    rows: int = 0  # observation rows the policy learned from
    requests: int = 0  # requests the batches summarised (rows <= requests)
    duplicates: int = 0  # batches sent again after a sync the holder saw fail: ignored
    cpu_s: float = 0.0  # thread CPU time spent in sync (ingest, publish, lease)


class SnapshotPublisher:
    """``seen_seq``: each holder's last batch number taken (the caller may keep it with its
    checkpoint, so that a call Ray replays on a restarted scheduler is not counted twice)."""

    def __init__(self, policy: Any, config: PublishConfig | None = None,
                 *, config_version: int = 1, seen_seq: dict[str, int] | None = None) -> None:  # fmt: skip
        self.config = config or PublishConfig()
        self.stats = PublisherStats()
        self.book = LeaseBook(float(policy.config.budget), self.config.lease)
        self.seen_seq = {} if seen_seq is None else seen_seq
        # A new publisher (a restarted scheduler) numbers its snapshots anew: holders compare
        # (epoch, version), so an old snapshot of the same number is never taken for current.
        self.epoch = os.urandom(4).hex()
        self.version = 0
        self.snapshot: PolicySnapshot | None = None
        self._published_at = -float("inf")
        self._new_rows = 0
        self.set_policy(policy, config_version)

    def set_config(self, config: PublishConfig) -> None:
        """New cadences and lease settings (a reconfigure); holders read ``sync_s`` next sync."""
        self.config = config
        self.book.config = config.lease

    def detach(self) -> None:
        """Hand the policy back to per-request planning: fits every ``recompute_every`` again,
        no holders' plans in flight in its feedback."""
        self.policy.defer_fits = False
        self.policy.holder_inflight = (0.0, 0.0)

    @property
    def snapshot_id(self) -> str:
        return f"{self.epoch}/{self.version}"

    def set_policy(self, policy: Any, config_version: int) -> None:
        """Use ``policy`` from now on (a reconfigure): the next sync gets its snapshot."""
        policy.defer_fits = True
        if hasattr(policy.config, "feedback_counts_inflight"):
            policy.config = replace(policy.config, feedback_counts_inflight=True)
        self.policy = policy
        self.config_version = config_version
        self.book.budget = float(policy.config.budget)
        self.snapshot = None

    def ingest(self, holder: str, devices: int, batch: dict[str, Any] | None,
               planned_tokens: float, now: float,
               inflight: tuple[float, float] = (0.0, 0.0)) -> BatchTotals:  # fmt: skip
        """Learn from a holder's wire batch; returns its exact totals (for the ledger).
        ``inflight``: (prompt tokens, reserved spend) of its plans not reported yet."""
        totals = BatchTotals()
        spent = 0.0
        if batch is not None:
            totals = BatchTotals(**batch["totals"])
            arrays = OutcomeBatch.wire_arrays(batch)
            if arrays[0].size:
                self.policy.observe_arrays(*arrays)
                self._new_rows += int(arrays[0].size)
                self.stats.rows += int(arrays[0].size)
            self.stats.requests += totals.requests
            regime = self.policy.regime
            spent = float(totals.device_prompt_tokens if regime.value == "device"
                          else totals.server_prompt_tokens)  # fmt: skip
        self.book.report(holder, devices, float(planned_tokens), spent, now, inflight)
        self._update_inflight()
        return totals

    def _update_inflight(self) -> None:
        # [R] The policy's budget feedback counts what is planned but not reported yet (every
        # live holder's plans in flight), as the central guard does: outcomes arrive a whole
        # stream later, and a feedback blind to them overshoots, then stops spending. Kept apart
        # from the policy's own in-flight reservations (its per-request plans, if any).
        self.policy.holder_inflight = self.book.inflight()

    def current(self, now: float, wall: float) -> PolicySnapshot:
        """The snapshot to hand out: refit and republish when ``interval_s`` has passed and new
        observations arrived (or none was published for this policy yet)."""
        due = now - self._published_at >= self.config.interval_s
        if self.snapshot is None or (due and self._new_rows > 0):
            if self._new_rows > 0 and self.policy.refit():
                self.stats.fits += 1
            self._new_rows = 0
            self.version += 1
            self.snapshot = snapshot_of(self.policy, self.version, epoch=self.epoch,
                                        config_version=self.config_version, published_at=wall)  # fmt: skip
            self._published_at = now
            self.stats.publishes += 1
        return self.snapshot

    def sync(self, msg: dict[str, Any], now: float,
             wall: float) -> tuple[dict[str, Any], BatchTotals | None]:  # fmt: skip
        """One holder's sync. ``msg``: ``holder``, ``devices``, ``seq`` (its batch number; a
        number already taken is a resend: only the lease and snapshot are answered), ``batch``
        (wire, or None), ``planned_tokens`` and ``plans`` (since its last batch),
        ``inflight_tokens``/``inflight_spent`` (its plans not reported yet, now), ``have`` (the
        id of the snapshot it plans from, "" for none). Answers ``snapshot`` (wire; None when the
        holder's is current), ``id``, ``lease`` (wire), ``sync_s``, ``seq`` (acknowledged); and
        the batch's totals for the caller's ledger (None for a resend)."""
        t0 = time.thread_time()
        holder = str(msg["holder"])
        seq = msg.get("seq")
        fresh = seq is None or int(seq) > self.seen_seq.get(holder, 0)
        inflight = (float(msg.get("inflight_tokens", 0.0)), float(msg.get("inflight_spent", 0.0)))
        devices = int(msg.get("devices", 1))
        totals: BatchTotals | None = None
        if fresh:
            if seq is not None:
                self.seen_seq[holder] = int(seq)
            totals = self.ingest(holder, devices, msg.get("batch"),
                                 float(msg.get("planned_tokens", 0.0)), now, inflight)  # fmt: skip
        else:
            self.stats.duplicates += 1
            self.book.report(holder, devices, 0.0, 0.0, now, inflight)
            self._update_inflight()
        snap = self.current(now, wall)
        lease = self.book.grant(holder, now, getattr(self.policy, "b_eff", None),
                                self.policy.budget_seen, self.policy.budget_spent)  # fmt: skip
        self.stats.syncs += 1
        answer = {
            "id": self.snapshot_id,
            "version": snap.version,
            "snapshot": None if msg.get("have") == self.snapshot_id else snap.to_wire(),
            "lease": lease.to_wire(),
            "sync_s": self.config.sync_s,
            "seq": seq,
        }
        self.stats.cpu_s += time.thread_time() - t0
        return answer, totals

    def status(self) -> dict[str, Any]:
        s = self.stats
        return {"version": self.version, "epoch": self.epoch, "syncs": s.syncs,
                "publishes": s.publishes, "fits": s.fits, "rows": s.rows,
                "requests": s.requests, "duplicates": s.duplicates,
                "sync_cpu_s": s.cpu_s} | self.book.stats()  # fmt: skip
