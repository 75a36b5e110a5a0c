"""How to add your own dispatch policy: a small one, registered as ``hedge-after``.

A policy decides, per request, when each endpoint starts (seconds after arrival, NaN: never); the
rest is shared. The steps:

1. Subclass :class:`~disco.scheduler.policies.common.WindowPolicy` and implement
   ``_decide(lengths, hints) -> (server_start, device_start)`` over arrays of prompt lengths (the
   simulator calls it on whole chunks, the live scheduler on one request at a time). Optionally
   ``_recompute()``, called every ``recompute_every`` observations to refit from ``self.window``
   (the last ``window`` outcomes: prompt lengths, outputs, constrained spend, server TTFTs).
2. Set ``name``, and ``uses_budget = True`` if the policy spends the constrained endpoint: the
   base class then keeps the spent share within the budget with its guard, live and simulated.
3. Register it: ``POLICIES.add("my-policy", MyPolicy)`` (or ``@POLICIES.register("my-policy")``)
   at import time. Only the built-ins are imported by ``disco.scheduler.policies``; import your
   module before naming the policy in Python (``make_policy``, ``SweepSpec(policies=...)``).
4. Live, name it ``package.module:Class`` (``scheduler.policy`` in the testbed YAML, or
   ``disco agent --policy``): the module is imported where the policy is built, the Ray
   scheduler actor included, so no registration is needed there.

``tests/scheduler/test_custom_policy.py`` runs this one through the simulator and the live
resolver.
"""

from __future__ import annotations

import numpy as np

from ..types import EndpointKind
from .base import POLICIES
from .common import WindowPolicy


class HedgeAfter(WindowPolicy):
    """The unconstrained endpoint starts at once; the constrained one is a hedge started after a
    fixed ``wait_s`` if no first token came by then (DiSCo-D's wait time, constant instead of
    learned per prompt length). The first token wins, so the hedge never slows a request down."""

    name = "hedge-after"
    uses_budget = True  # the hedge spends the constrained endpoint: the base class guards it
    wait_s = 0.5

    # No ``decision_table()``: a device planning from snapshots gets a frozen copy of this policy
    # (correct, not compact); a table of its own would be FixedStarts of the two starts below.

    def _decide(self, lengths: np.ndarray, hints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = lengths.size
        if self.budget <= 0.0:
            return self.unconstrained_only(n)
        now, hedge = np.zeros(n), np.full(n, self.wait_s)
        return (hedge, now) if self.constrained is EndpointKind.SERVER else (now, hedge)


POLICIES.add(HedgeAfter.name, HedgeAfter)
