"""Shared machinery of our policies: the sliding window, online estimates, the budget guard.

Every policy here has one decision function, ``_decide(lengths, hints)``, that maps prompt lengths
to start times with the *current* state. The scalar ``plan()`` calls it on one request; the
simulator's batch path calls it on a chunk of requests. State only changes in ``_recompute()``,
every ``recompute_every`` observations, so both paths see the same state for the same request.

The one per-request piece of state is the budget guard ([R] ours): the constrained endpoint is
used for a request only if, even if it prefilled the whole prompt, the spent share of prompt tokens
stays within ``b + guard_slack``. It makes ``budget_used <= b + guard_slack`` hold on any trace,
short ones included, while the online feedback steers the long-run spend to ``b``.

Live, many requests are planned before any of them is reported, so the guard also counts the
requests in flight: planned, not yet observed. A definite start of the constrained endpoint
reserves the whole prompt until its outcome arrives; a hedge (a delayed start that may never fire)
reserves its prompt times the probability that it fires (``hedge_fire_share``, DiSCo-D's estimate
of the server's TTFT survival), so a burst of hedges is counted in expectation without starving
hedging. In the load-free simulator ``observe`` follows ``plan`` at once, so nothing is ever in
flight there; the causal simulator has requests in flight as live.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..profiles import DeviceProfile, ServerProfile
from ..types import EndpointKind, MigrationRule, Plan, Regime, Request, RequestOutcome
from .base import PolicyConfig

NEVER = math.nan  # start time of an endpoint that does not start
DEFAULT_OUTPUT_TOKENS = 128.0  # output-length prior before any observation (our assumption)
GUARD_SLACK = 0.01
# Output lengths drift slowly; refitting their conditional mean every 10th recompute is plenty.
OUTPUT_REFIT_EVERY = 10


def migration_rule(regime: Regime) -> MigrationRule:
    """paper-notes [R]: decoding moves away from the constrained endpoint after it wins."""
    scarce = regime.constrained
    return MigrationRule(target=scarce.other, from_kind=scarce)


@dataclass(slots=True)
class Observation:
    """What a policy learns from one finished request (arrays of these feed ``observe_arrays``)."""

    prompt_tokens: int
    output_tokens: int
    spent: float  # prompt tokens the constrained endpoint prefilled for it
    server_ttft: float  # from the server's own start; NaN if the server never started
    server_ttft_exact: bool  # False: the server was cancelled first (censored at server_ttft)


class Window:
    """Ring buffer of the last ``size`` observations, as numpy arrays, with running totals of
    prompt tokens (``l_sum``) and constrained spend (``spent_sum``): the sliding budget window."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.n = 0  # total ever added
        self.l = np.zeros(size)
        self.out = np.zeros(size)
        self.spent = np.zeros(size)
        self.ts = np.full(size, np.nan)
        self.exact = np.zeros(size, dtype=bool)
        self.l_sum = 0.0
        self.spent_sum = 0.0

    def add(self, lengths, out, spent, ts, exact) -> None:
        lengths = np.atleast_1d(np.asarray(lengths, dtype=float))
        k = lengths.size
        m = min(k, self.size)  # only the newest `size` matter
        sl = slice(k - m, k)
        idx = (self.n + (k - m) + np.arange(m)) % self.size
        self.l[idx] = lengths[sl]
        self.out[idx] = np.atleast_1d(out)[sl]
        self.spent[idx] = np.atleast_1d(spent)[sl]
        self.ts[idx] = np.atleast_1d(ts)[sl]
        self.exact[idx] = np.atleast_1d(exact)[sl]
        self.n += k
        # Exact totals (no drift): a sum over <= size entries per add of a chunk.
        w = self.view()
        self.l_sum = float(self.l[w].sum())
        self.spent_sum = float(self.spent[w].sum())

    def view(self) -> slice:
        return slice(0, min(self.n, self.size))

    def newest_sums(self, k: int) -> tuple[float, float]:
        """(prompt tokens, spend) of the newest ``k`` observations."""
        k = max(0, min(k, self.n, self.size))
        if k == 0:
            return 0.0, 0.0
        idx = (self.n - 1 - np.arange(k)) % self.size
        return float(self.l[idx].sum()), float(self.spent[idx].sum())

    def departing(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(prompt tokens, spend) of the entries that the next ``k`` adds push out of the window
        (0 while it is not full); ``k`` <= size."""
        j = np.arange(k)
        full = self.n + j >= self.size
        idx = (self.n + j) % self.size
        return np.where(full, self.l[idx], 0.0), np.where(full, self.spent[idx], 0.0)


class KaplanMeier:
    """Kaplan-Meier estimate of P(T > t): censored observations (a server cancelled before its
    first token) only say T > time. Flat beyond the last observation."""

    def __init__(self, times: np.ndarray, exact: np.ndarray) -> None:
        order = np.argsort(times, kind="stable")
        self.t = times[order]
        at_risk = times.size - np.arange(times.size)
        self.surv = np.cumprod(1.0 - exact[order] / at_risk)

    def __call__(self, points: np.ndarray | float) -> np.ndarray:
        p = np.asarray(points, dtype=float)
        if self.t.size == 0:
            return np.ones_like(p)
        idx = np.searchsorted(self.t, p, side="right")  # observations <= point
        return np.where(idx == 0, 1.0, self.surv[np.maximum(idx - 1, 0)])


class OutputEstimator:
    """Expected output tokens given the prompt length: a conditional mean over length buckets of
    the window (paper-notes: "an online conditional mean by prompt length")."""

    def __init__(self, buckets: int = 8) -> None:
        self.buckets = buckets
        self.edges = np.zeros(0)
        self.means = np.array([DEFAULT_OUTPUT_TOKENS])

    def fit(self, lengths: np.ndarray, outputs: np.ndarray) -> None:
        if lengths.size < self.buckets * 4:
            if lengths.size:
                self.edges, self.means = np.zeros(0), np.array([float(outputs.mean())])
            return
        srt = np.sort(lengths)
        pos = np.linspace(0, 1, self.buckets + 1)[1:-1] * (srt.size - 1)
        edges = np.unique(np.interp(pos, np.arange(srt.size), srt))  # = np.quantile, cheaper
        b = np.searchsorted(edges, lengths, side="right")
        sums = np.bincount(b, outputs, minlength=edges.size + 1)
        cnt = np.bincount(b, minlength=edges.size + 1)
        glob = float(outputs.mean())
        self.edges = edges
        self.means = np.where(cnt > 0, sums / np.maximum(cnt, 1), glob)

    def __call__(self, lengths: np.ndarray) -> np.ndarray:
        return self.means[np.searchsorted(self.edges, lengths, side="right")]


class WindowPolicy:
    """Base of every policy: window, recompute cadence, budget guard, plan/observe plumbing.

    Subclasses set ``name``/``uses_budget`` and implement ``_decide`` (and ``_recompute``).
    """

    name = ""
    uses_budget = False

    def __init__(self, config: PolicyConfig, server: ServerProfile, device: DeviceProfile) -> None:
        self.config = config
        self.server = server
        self.device = device
        self.regime: Regime = config.regime
        self.constrained: EndpointKind = config.regime.constrained
        self.window = Window(config.window)
        self.outputs = OutputEstimator()
        self.rng = np.random.default_rng(config.seed)
        # Lifetime totals (reports); the budget counts the sliding window (``budget_seen``).
        self.seen_tokens = 0.0  # prompt tokens of every observed request
        self.spent_tokens = 0.0  # of those, prefilled by the constrained endpoint
        self._since_recompute = 0
        self._recomputes = 0
        # request id -> (server start, device start, prompt tokens, reserved constrained tokens)
        self._pending: dict[str, tuple[float, float, float, float]] = {}
        self.inflight_seen = 0.0  # prompt tokens of planned, not yet observed requests
        self.inflight_spent = 0.0  # of those, reserved for a definite constrained start
        self._rule = migration_rule(config.regime) if config.migration else None
        self.defer_fits = False  # True: fit on refit() only (snapshot publishing)
        # (prompt tokens, reserved spend) that snapshot holders planned and have not reported
        # yet (issue 11; set by the publisher, counted by feedback_counts_inflight)
        self.holder_inflight = (0.0, 0.0)

    # --- what subclasses provide --------------------------------------------------------
    def _decide(self, lengths: np.ndarray, hints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(server_start, device_start) per request, NaN = never; current state only."""
        raise NotImplementedError

    def _recompute(self) -> None:
        """Refresh thresholds / wait times from the window (called every recompute_every)."""

    def decision_table(self):
        """``_decide`` as a :mod:`~disco.scheduler.snapshot` table a device plans from (issue
        11); None: ship a frozen copy of the whole policy instead."""
        return None

    def unconstrained_starts(self) -> tuple[float, float]:
        """(server start, device start) of the unconstrained endpoint alone."""
        return (NEVER, 0.0) if self.constrained is EndpointKind.SERVER else (0.0, NEVER)

    # --- shared -------------------------------------------------------------------------
    @property
    def budget(self) -> float:
        return self.config.budget

    @property
    def budget_seen(self) -> float:
        """Prompt tokens of the observed requests the budget counts: the sliding window."""
        return self.window.l_sum

    @property
    def budget_spent(self) -> float:
        """Of those, what the constrained endpoint prefilled."""
        return self.window.spent_sum

    def unconstrained_only(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        zero, never = np.zeros(n), np.full(n, NEVER)
        return (never, zero) if self.constrained is EndpointKind.SERVER else (zero, never)

    def race(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(n), np.zeros(n)

    def constrained_start(self, ss: np.ndarray, ds: np.ndarray) -> np.ndarray:
        return ss if self.constrained is EndpointKind.SERVER else ds

    @property
    def guarded(self) -> bool:
        """Whether the budget guard applies (policies that take a budget)."""
        return self.uses_budget

    def guard_allows(self, prompt_tokens: float) -> bool:
        """Budget guard for one request (see module doc); the batch path runs the same rule."""
        if not self.guarded or self.budget >= 1.0:
            return True
        seen = self.budget_seen + self.inflight_seen + prompt_tokens
        spent = self.budget_spent + self.inflight_spent + prompt_tokens
        return spent <= (self.budget + GUARD_SLACK) * seen

    def hedge_fire_share(self, start_s: float) -> float:
        """[R] Probability that a hedge of the constrained endpoint at ``start_s`` fires (the
        other endpoint has no first token by then): a planned hedge reserves that share of its
        prompt until its outcome is known, so a burst of hedges cannot outrun the guard. 0 for
        policies without an estimate of the other endpoint's TTFT."""
        del start_s
        return 0.0

    def expected_output_tokens(self, prompt_tokens: np.ndarray | float) -> np.ndarray:
        return self.outputs(np.atleast_1d(np.asarray(prompt_tokens, dtype=float)))

    @property
    def migration(self) -> MigrationRule | None:
        return self._rule

    def plan(self, request: Request, now: float) -> Plan:
        del now  # decisions depend on the request and the learned state, not on the clock
        ss, ds = self._decide_one(request)
        if not np.isnan(self.constrained_start(ss, ds)[0]) and not self.guard_allows(
            request.prompt_tokens
        ):
            ss, ds = self.unconstrained_only(1)
        s, d = float(ss[0]), float(ds[0])
        c = self.constrained_start(ss, ds)[0]
        self._release(request.id)  # a re-planned id must not reserve twice
        if c == 0.0:
            reserve = float(request.prompt_tokens)
        elif math.isnan(c):
            reserve = 0.0
        else:  # a hedge: reserve what it spends in expectation
            reserve = float(request.prompt_tokens) * self.hedge_fire_share(float(c))
        self._pending[request.id] = (s, d, float(request.prompt_tokens), reserve)
        self.inflight_seen += request.prompt_tokens
        self.inflight_spent += reserve
        if len(self._pending) > 4 * self.config.window:  # reports lost live: forget the oldest
            self._release(next(iter(self._pending)))
        return Plan(
            request_id=request.id,
            server_start=None if math.isnan(s) else s,
            device_start=None if math.isnan(d) else d,
            migration=self._rule,
            policy=self.name,
        )

    def _decide_one(self, request: Request) -> tuple[np.ndarray, np.ndarray]:
        """``_decide`` for one live request (length-1 arrays), its device queue included."""
        hint = np.nan if request.server_ttft_hint is None else request.server_ttft_hint
        return self._decide(np.array([self.decision_length(request)]), np.array([hint]))

    def decision_length(self, request: Request) -> float:
        """The prompt length a decision is made for. [R] ours (issue 10): a device busy with a
        queue reaches its first token later, exactly as for a longer prompt on an idle device,
        so the request is decided as the prompt whose device TTFT on an idle device equals its
        own behind the queue: l + delay x prefill speed. Budget accounting keeps the real l."""
        length = float(request.prompt_tokens)
        if self.config.device_queue_aware and request.device_queue is not None:
            length += self.device.queue_delay(request.device_queue) * self.device.prefill_tps
        return length

    def observe(self, outcome: RequestOutcome) -> None:
        if outcome.refused:  # never ran: no work, not part of the budget window
            self._release(outcome.request_id)
            return
        ss = self._release(outcome.request_id)
        plen = outcome.prompt_tokens
        spent = (
            outcome.server_prompt_tokens
            if self.constrained is EndpointKind.SERVER
            else outcome.device_prompt_tokens
        )
        ts, exact = NEVER, False
        started = outcome.server_started
        if started is None:
            started = outcome.server_prompt_tokens > 0
        if not math.isnan(ss) and started and outcome.ttft is not None:
            ts = outcome.ttft - ss  # exact if the server won, else a lower bound (censored)
            exact = outcome.first_token_from is EndpointKind.SERVER
        n_out = len(outcome.token_times) or (outcome.server_output_tokens + outcome.device_output_tokens)
        self.observe_arrays(
            np.array([plen], float), np.array([n_out], float), np.array([min(spent, plen)], float),
            np.array([ts]), np.array([exact]),
        )  # fmt: skip

    def _release(self, request_id: str) -> float:
        """Drop a request's in-flight reservation; returns its planned server start (NaN: none)."""
        entry = self._pending.pop(request_id, None)
        if entry is None:
            return NEVER
        ss, _, plen, reserved = entry
        self.inflight_seen = max(0.0, self.inflight_seen - plen)
        self.inflight_spent = max(0.0, self.inflight_spent - reserved)
        if not self._pending:  # no drift from float round-off
            self.inflight_seen = self.inflight_spent = 0.0
        return ss

    def refit(self) -> bool:
        """Recompute now from the window if anything arrived since the last fit (the snapshot
        publisher's cadence, issue 11: fits per publish, not per ``recompute_every``
        observations, when ``defer_fits`` is set). Returns whether it recomputed."""
        if self._since_recompute == 0:
            return False
        self._since_recompute = 0
        self._fit()
        return True

    def _fit(self) -> None:
        self._recomputes += 1
        w = self.window.view()
        if self._recomputes % OUTPUT_REFIT_EVERY == 1:
            self.outputs.fit(self.window.l[w], self.window.out[w])
        self._recompute()

    def observe_arrays(self, lengths, out, spent, ts, exact) -> None:
        """Feed observations in arrival order; recomputes at exactly the points the scalar path
        would (every ``recompute_every`` observations), or only on ``refit()`` when
        ``defer_fits`` is set (the scheduler then fits once per published snapshot)."""
        k = len(lengths)
        if getattr(self, "defer_fits", False):
            self.window.add(lengths, out, spent, ts, exact)
            self.seen_tokens += float(np.sum(lengths))
            self.spent_tokens += float(np.sum(spent))
            self._since_recompute += k
            return
        i = 0
        while i < k:
            take = min(k - i, self.config.recompute_every - self._since_recompute)
            sl = slice(i, i + take)
            self.window.add(lengths[sl], out[sl], spent[sl], ts[sl], exact[sl])
            self.seen_tokens += float(np.sum(lengths[sl]))
            self.spent_tokens += float(np.sum(spent[sl]))
            self._since_recompute += take
            i += take
            if self._since_recompute == self.config.recompute_every:
                self._since_recompute = 0
                self._fit()


def budget_guard_scan(
    want: np.ndarray,
    lengths: np.ndarray,
    spend_if_used: np.ndarray,
    seen0: float,
    spent0: float,
    budget: float,
    drop_seen: np.ndarray | None = None,
    drop_spent: np.ndarray | None = None,
) -> np.ndarray:
    """Batch twin of ``WindowPolicy.guard_allows`` over a chunk, observations applied in order.

    ``spend_if_used``: what request i spends on the constrained endpoint if allowed (known to the
    simulator from its world). ``seen0``/``spent0``: the budget window's totals before the chunk;
    ``drop_seen``/``drop_spent``: what leaves the window as each of the chunk's observations
    enters it (``Window.departing``). Returns the allowed mask. Vectorised when the guard never
    binds.
    """
    if budget >= 1.0:
        return want.copy()
    k = lengths.size
    ds = np.zeros(k) if drop_seen is None else np.asarray(drop_seen, dtype=float)
    dp = np.zeros(k) if drop_spent is None else np.asarray(drop_spent, dtype=float)
    cap_rate = budget + GUARD_SLACK
    spend = np.where(want, spend_if_used, 0.0)
    seen_before = seen0 + np.concatenate(([0.0], np.cumsum(lengths - ds)[:-1]))
    spent_before = spent0 + np.concatenate(([0.0], np.cumsum(spend - dp)[:-1]))
    ok = spent_before + lengths <= cap_rate * (seen_before + lengths)
    if np.all(ok | ~want):
        return want.copy()
    allowed = want.copy()
    seen, spent = seen0, spent0
    for i in range(k):  # rare: the guard binds somewhere in this chunk
        li = float(lengths[i])
        if allowed[i] and spent + li > cap_rate * (seen + li):
            allowed[i] = False
        if allowed[i]:
            spent += float(spend_if_used[i])
        spent -= float(dp[i])
        seen += li - float(ds[i])
    return allowed
