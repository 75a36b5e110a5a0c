"""Baseline policies: one endpoint, both always, a random split, a plain length threshold.

Budget semantics follow the regime: the budget b caps the share of prompt tokens the
*constrained* endpoint prefills; the unconstrained one is free to use. Each baseline that takes a
budget *races* (starts both endpoints) on the requests it gives to the constrained endpoint, which
is the strongest use of that endpoint without a wait-time policy.
"""

from __future__ import annotations

import numpy as np

from ..snapshot import FixedStarts, LengthSplit, RandomShare
from ..types import EndpointKind
from .base import POLICIES
from .common import NEVER, WindowPolicy


class ServerOnly(WindowPolicy):
    name = "server-only"

    def decision_table(self):
        return FixedStarts(0.0, NEVER)

    def _decide(self, lengths, hints):
        n = lengths.size
        return np.zeros(n), np.full(n, NEVER)


class DeviceOnly(WindowPolicy):
    name = "device-only"

    def decision_table(self):
        return FixedStarts(NEVER, 0.0)

    def _decide(self, lengths, hints):
        n = lengths.size
        return np.full(n, NEVER), np.zeros(n)


class Race(WindowPolicy):
    name = "race"

    def decision_table(self):
        return FixedStarts(0.0, 0.0)

    def _decide(self, lengths, hints):
        return self.race(lengths.size)


class RandomSplit(WindowPolicy):
    """Races a random share b of requests (independent of length, so E[spent] = b)."""

    name = "random"
    uses_budget = True

    def decision_table(self):
        return RandomShare(self.budget, (0.0, 0.0), self.unconstrained_starts(), self.config.seed)

    def _decide(self, lengths, hints):
        n = lengths.size
        use = self.rng.random(n) < self.budget
        ss_r, ds_r = self.race(n)
        ss_u, ds_u = self.unconstrained_only(n)
        return np.where(use, ss_r, ss_u), np.where(use, ds_r, ds_u)


def length_threshold(lengths: np.ndarray, share: float, long_side: bool) -> float:
    """Threshold so that the prompts on one side of it hold at most ``share`` of all tokens.

    ``long_side``: the selected prompts are l >= threshold (else l <= threshold). Returns +inf /
    -inf when nothing can be selected.
    """
    if lengths.size == 0 or share <= 0:
        return np.inf if long_side else -np.inf
    s = np.sort(lengths)[::-1] if long_side else np.sort(lengths)
    cum = np.cumsum(s)
    k = int(np.searchsorted(cum, share * cum[-1], side="right"))  # how many fit
    if k == 0:
        return np.inf if long_side else -np.inf
    if k >= s.size:
        return -np.inf if long_side else np.inf
    # Ties at the boundary must not slip in, so step just past the first excluded value.
    edge = s[k]
    return float(np.nextafter(edge, np.inf)) if long_side else float(np.nextafter(edge, -np.inf))


class LengthThreshold(WindowPolicy):
    """Plain length split: races the prompts the constrained endpoint suits best (short ones on a
    scarce device, long ones on a scarce server) up to b of the window's prompt tokens; no wait
    times and no budget feedback. In the server-constrained regime this is DiSCo-S's rule without
    its feedback correction."""

    name = "length"
    uses_budget = True

    def __init__(self, config, server, device) -> None:
        super().__init__(config, server, device)
        self.long_side = self.constrained is EndpointKind.SERVER
        self.threshold = np.inf if self.long_side else -np.inf  # nothing before data

    def _share(self) -> float:
        return self.budget

    def decision_table(self):
        if self.budget >= 1.0:
            return FixedStarts(0.0, 0.0)
        return LengthSplit(float(self.threshold), self.long_side, (0.0, 0.0),
                           self.unconstrained_starts())  # fmt: skip

    def _recompute(self) -> None:
        w = self.window.view()
        self.threshold = length_threshold(self.window.l[w], self._share(), self.long_side)

    def _decide(self, lengths, hints):
        n = lengths.size
        if self.budget >= 1.0:
            return self.race(n)
        use = lengths >= self.threshold if self.long_side else lengths <= self.threshold
        ss_r, ds_r = self.race(n)
        ss_u, ds_u = self.unconstrained_only(n)
        return np.where(use, ss_r, ss_u), np.where(use, ds_r, ds_u)


POLICIES.add("server-only", ServerOnly)
POLICIES.add("device-only", DeviceOnly)
POLICIES.add("race", Race)
POLICIES.add("random", RandomSplit)
POLICIES.add("length", LengthThreshold)
