"""Oracle: knows each request's server TTFT (``Request.server_ttft_hint``) before deciding.

It uses the constrained endpoint only where it shortens TTFT, ranked by TTFT saved per prompt
token (a fractional-knapsack greedy), down to the ratio ``lam`` at which the budget is used up.
``calibrate`` sets ``lam`` from the whole trace (the simulator knows it in advance, which is what
makes this a lower bound on mean TTFT at that budget); without it ``lam`` is re-estimated from the
window like every other policy's state.
"""

from __future__ import annotations

import numpy as np

from ..types import EndpointKind
from .base import POLICIES
from .common import WindowPolicy


class Oracle(WindowPolicy):
    name = "oracle"
    uses_budget = True
    wants_hints = True

    def __init__(self, config, server, device) -> None:
        super().__init__(config, server, device)
        self.lam = np.inf
        self.calibrated = False

    @property
    def guarded(self) -> bool:
        # Calibrated on the whole trace, the budget holds by construction; a causal guard would
        # only stop the oracle from being the bound it is meant to be.
        return not self.calibrated

    def gain_per_token(self, lengths: np.ndarray, server_ttft: np.ndarray) -> np.ndarray:
        td = np.asarray(self.device.ttft(lengths), dtype=float)
        saved = server_ttft - td if self.constrained is EndpointKind.DEVICE else td - server_ttft
        return np.where(saved > 0, saved / lengths, 0.0)

    def calibrate(self, lengths: np.ndarray, server_ttft: np.ndarray) -> None:
        self.lam = self._lambda_for(lengths, server_ttft, self.budget)
        self.calibrated = True

    @staticmethod
    def _lambda_for_ratio(ratio: np.ndarray, lengths: np.ndarray, budget: float) -> float:
        order = np.argsort(-ratio, kind="stable")
        r, cum = ratio[order], np.cumsum(lengths[order])
        k = int(np.searchsorted(cum, budget * float(lengths.sum()), side="right"))
        k = min(k, int(np.count_nonzero(r > 0)))
        if k == 0:
            return np.inf
        if k < r.size and r[k] == r[k - 1]:
            # A tie at the cut would overspend: only strictly better ratios get in.
            return float(np.nextafter(r[k - 1], np.inf))
        return float(r[k - 1])

    def _lambda_for(self, lengths: np.ndarray, server_ttft: np.ndarray, budget: float) -> float:
        return self._lambda_for_ratio(self.gain_per_token(lengths, server_ttft), lengths, budget)

    def _recompute(self) -> None:
        if self.calibrated:
            return
        w = self.window.view()
        ts = self.window.ts[w]
        have = ~np.isnan(ts)
        if have.any():
            self.lam = self._lambda_for(self.window.l[w][have], ts[have], self.budget)

    def _decide(self, lengths, hints):
        n = lengths.size
        if self.budget >= 1.0:
            return self.race(n)
        if self.budget <= 0.0 or np.isnan(hints).any():
            return self.unconstrained_only(n)
        use = (self.gain_per_token(lengths, hints) >= self.lam) & (self.lam > 0)
        ss_u, ds_u = self.unconstrained_only(n)
        ss_r, ds_r = self.race(n)
        return np.where(use, ss_r, ss_u), np.where(use, ds_r, ds_u)


POLICIES.add("oracle", Oracle)
