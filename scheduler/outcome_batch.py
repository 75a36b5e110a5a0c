"""Outcomes reported in batches: exact totals plus the per-request arrays a policy learns from.

A holder (fleet actor, device agent) that plans from snapshots reports what its requests did at
each sync, not per request (issue 11). The batch keeps the ledger's totals exact and, for the
policy's window, the five numbers per request ``WindowPolicy.observe_arrays`` takes (prompt
length, output length, constrained spend, server TTFT from its start, exact or censored), as
float32 arrays. Past ``max_samples`` per batch it keeps a uniform reservoir sample of those rows
(the totals stay exact), so the scheduler's work per sync is bounded whatever the request rate.
Pure: numpy and dataclasses.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from .types import EndpointKind, Regime, RequestOutcome

ROW = ("prompt", "output", "spent", "server_ttft", "exact")


@dataclass(slots=True)
class BatchTotals:
    """What the scheduler's ledger adds (``BudgetLedger.add_totals``): sums over the batch."""

    requests: int = 0
    errors: int = 0
    refused: int = 0
    prompt_tokens: int = 0
    server_prompt_tokens: int = 0
    device_prompt_tokens: int = 0
    server_output_tokens: int = 0
    device_output_tokens: int = 0
    server_cost: float = 0.0
    device_energy_j: float = 0.0
    first_from_server: int = 0
    first_from_device: int = 0
    migrations: int = 0

    def add(self, o: RequestOutcome) -> None:
        if o.refused:
            self.refused += 1
            return
        self.requests += 1
        self.errors += o.error is not None
        self.prompt_tokens += o.prompt_tokens
        self.server_prompt_tokens += o.server_prompt_tokens
        self.device_prompt_tokens += o.device_prompt_tokens
        self.server_output_tokens += o.server_output_tokens
        self.device_output_tokens += o.device_output_tokens
        self.server_cost += o.server_cost
        self.device_energy_j += o.device_energy_j
        self.first_from_server += o.first_token_from is EndpointKind.SERVER
        self.first_from_device += o.first_token_from is EndpointKind.DEVICE
        self.migrations += o.migrated_at is not None

    def merge(self, other: BatchTotals) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def constrained_spend(o: RequestOutcome, regime: Regime) -> int:
    """Prompt tokens the constrained endpoint prefilled for ``o`` (what the budget counts)."""
    spent = o.server_prompt_tokens if regime is Regime.SERVER_CONSTRAINED else o.device_prompt_tokens
    return min(spent, o.prompt_tokens)


def observation(o: RequestOutcome, server_start: float | None) -> tuple[float, ...] | None:
    """The row a policy learns from ``o`` (as ``WindowPolicy.observe`` derives it), without the
    spend; None for a refused request (no work, not in the window)."""
    if o.refused:
        return None
    ts, exact = math.nan, 0.0
    started = o.server_started
    if started is None:
        started = o.server_prompt_tokens > 0
    if server_start is not None and started and o.ttft is not None:
        ts = o.ttft - server_start  # exact if the server won, else a lower bound (censored)
        exact = float(o.first_token_from is EndpointKind.SERVER)
    n_out = len(o.token_times) or (o.server_output_tokens + o.device_output_tokens)
    return float(o.prompt_tokens), float(n_out), 0.0, ts, exact


@dataclass(slots=True)
class OutcomeBatch:
    regime: Regime
    max_samples: int = 2000
    totals: BatchTotals = field(default_factory=BatchTotals)
    rows: list[tuple[float, ...]] = field(default_factory=list)
    offered: int = 0  # rows offered to the reservoir (= totals.requests when none dropped)
    seed: int = 0
    _rng: random.Random | None = None

    def add(self, o: RequestOutcome, server_start: float | None) -> None:
        self.totals.add(o)
        row = observation(o, server_start)
        if row is None:
            return
        row = (row[0], row[1], float(constrained_spend(o, self.regime)), row[3], row[4])
        self.offered += 1
        if len(self.rows) < self.max_samples:
            self.rows.append(row)
            return
        if self._rng is None:
            self._rng = random.Random(self.seed)
        j = self._rng.randrange(self.offered)  # reservoir: every row kept with equal chance
        if j < self.max_samples:
            self.rows[j] = row

    def __len__(self) -> int:
        return self.totals.requests + self.totals.refused

    def arrays(self) -> tuple[np.ndarray, ...]:
        a = np.asarray(self.rows, dtype=float).reshape(-1, len(ROW))
        return a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4].astype(bool)

    def to_wire(self) -> dict[str, Any]:
        """Plain data: the totals as a dict, the rows as one float32 buffer (20 bytes a row)."""
        buf = np.asarray(self.rows, dtype=np.float32).reshape(-1, len(ROW)).tobytes()
        return {"regime": self.regime.value, "totals": asdict(self.totals), "rows": buf,
                "offered": self.offered}  # fmt: skip

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> OutcomeBatch:
        b = cls(Regime(d["regime"]), totals=BatchTotals(**d["totals"]), offered=int(d["offered"]))
        rows = np.frombuffer(d["rows"], dtype=np.float32).reshape(-1, len(ROW)).astype(float)
        b.rows = [tuple(r) for r in rows]
        b.max_samples = max(b.max_samples, len(b.rows))
        return b

    @staticmethod
    def wire_arrays(d: dict[str, Any]) -> tuple[np.ndarray, ...]:
        """The rows of a wire batch as the five arrays, without building tuples (scheduler side)."""
        a = np.frombuffer(d["rows"], dtype=np.float32).reshape(-1, len(ROW)).astype(float)
        return a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4].astype(bool)
