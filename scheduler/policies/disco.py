"""DiSCo: DiSCo-S (server-constrained) and DiSCo-D (device-constrained), recomputed online.

paper-notes.md [N] gives the shapes; the concrete algorithms here are OUR reconstruction [R]:

- DiSCo-S: the device (free) always starts; the server also starts (a race) for prompts of length
  >= l_th, the smallest threshold whose prompts hold at most b_eff of the window's prompt tokens.
- DiSCo-D: the server always starts; the device starts after a wait w(l) unless the server has
  produced its first token by then. w is a table over prompt-length buckets of the window, chosen
  in two stages: (1) tail protection: the smallest TTFT target X such that rescuing the cheapest
  buckets (device wait X - T_d(l_max)) leaves at most (1 - tail_quantile) of requests exposed to a
  server TTFT above X, within the budget; then, budget permitting, every bucket rescuable at X,
  at the lower level X * (1 - tail_robust) (window noise makes X optimistic); (2) average
  optimisation: per bucket, the wait (no longer than stage 1's) minimising mean + mu * cost, with
  the multiplier mu fitted to the budget, then a greedy fill of what is left by mean-TTFT gain
  per budget token (this favours short prompts). The server TTFT
  distribution is a Kaplan-Meier estimate over the window (a server cancelled by a device win only
  says "slower than this"); the device TTFT is the profile's a + c*l.
  Third, a length-dominating candidate (when length_candidate): w = 0 on every bucket the
  `length` split at the nominal b races on the same window (an extra bucket edge sits at its
  threshold), except buckets whose prefill fits well under that split's estimated tail X, which
  get the longest wait keeping wait + prefill <= X * (1 - tail_robust); then the same stage (2)
  spends what this saves on the mean. Stage (2) only shortens waits, so no request ends above
  that safe level and later than under the length split. The two-stage table is kept only where
  the window's estimated tail quantile (S(x) x share of prompts whose device cap exceeds x) is
  lower than the dominating table's by more than candidate_tol, since it was fitted to the same
  window and its estimate is optimistic. With mean_tail_select (the default, issue 14) the mean
  counts too: the mean-optimal table (stage 2 alone, no tail stage) replaces the kept one where the
  window estimates its mean lower by more than mean_gain_min, its tail no higher than the kept
  table's or the length split's, and its planned spend as high. Tail protection first cost up to
  +95 % mean TTFT on a chat-shaped workload, where racing short prompts at once is what the mean
  needs (bench/results/paper.md).
- Budget feedback: every recompute, b_eff = b + deficit / (feedback_horizon periods' worth of
  prompt tokens), where deficit = b * seen - spent counted from the first recompute on (the
  requests before it had nothing to spend with), so the spent share converges to b; b_eff is also
  capped so that the next period would end at most guard_headroom x the guard's slack over b (a
  binding guard refuses requests in arrival order, tail-critical ones included).
"""

from __future__ import annotations

import numpy as np

from ..snapshot import FixedStarts, LengthSplit, WaitTable
from ..types import EndpointKind
from .base import POLICIES
from .baselines import length_threshold
from .common import GUARD_SLACK, NEVER, KaplanMeier, WindowPolicy

LENGTH_BUCKETS = 16
# Lagrange multipliers tried (seconds of mean TTFT per prompt token), 0 first.
MU_GRID = np.concatenate(([0.0], np.logspace(-9, 3, 96)))
WAIT_GRID = 40
MIN_SERVER_SAMPLES = 20
REPRESENTATIVES = 8


class DiSCo(WindowPolicy):
    name = "disco"
    uses_budget = True

    def __init__(self, config, server, device) -> None:
        super().__init__(config, server, device)
        self.b_eff = config.budget
        self.threshold = np.inf  # DiSCo-S: no race before data
        self.edges = np.zeros(0)  # DiSCo-D: one bucket, never hedge before data
        self.waits = np.array([np.inf])
        self.tail_target: float | None = None
        self.choice = ""  # DiSCo-D: which candidate table the last fit kept
        self._origin: tuple[float, float] | None = None  # (seen, spent) at the first fit
        self._km: KaplanMeier | None = None  # server TTFT survival, from the last fit

    # --- online budget ------------------------------------------------------------------
    def _effective_budget(self) -> float:
        b = self.budget
        w = self.window.view()
        if b <= 0.0 or b >= 1.0 or self.window.n == 0:
            return b
        mean_l = float(self.window.l[w].mean())
        horizon = self.config.feedback_horizon * self.config.recompute_every * mean_l
        if self._origin is None:
            # [R] The deficit counts from the first recompute: the requests before it had no
            # learned state to spend with, and repaying them in one period overshoots the guard.
            self._origin = (
                (self.seen_tokens, self.spent_tokens)
                if self.config.feedback_from_first_fit
                else (0.0, 0.0)
            )
        # [R] Integral feedback on the deficit since then, so the spent share converges to b
        # (a deficit over the sliding window alone leaves a steady offset); the guard and the
        # cap below hold the sliding window itself to b.
        seen0, spent0 = self._origin
        in_seen = in_spent = 0.0
        if self.config.feedback_counts_inflight:
            # Its own plans in flight, and the devices' (snapshot holders', issue 11).
            h_seen, h_spent = getattr(self, "holder_inflight", (0.0, 0.0))
            in_seen, in_spent = self.inflight_seen + h_seen, self.inflight_spent + h_spent
        deficit = b * (self.seen_tokens + in_seen - seen0) - (self.spent_tokens + in_spent - spent0)
        b_eff = b + deficit / horizon
        if self.config.guard_headroom < 1.0:
            # [R] Stay clear of the budget guard: plan the next period so that the window's
            # share would end at most guard_headroom x GUARD_SLACK over b. A guard that binds
            # refuses requests in arrival order, tail-critical ones included.
            period = self.config.recompute_every * mean_l
            cap = b + GUARD_SLACK * self.config.guard_headroom
            seen_w, spent_w = self.budget_seen + in_seen, self.budget_spent + in_spent
            b_eff = min(b_eff, (cap * (seen_w + period) - spent_w) / period)
        return float(np.clip(b_eff, 0.0, 1.0))

    def hedge_fire_share(self, start_s: float) -> float:
        """P(server TTFT > start_s) from the window's Kaplan-Meier estimate (1 before a fit)."""
        return 1.0 if self._km is None else float(self._km(start_s))

    def _recompute(self) -> None:
        if self.budget <= 0.0 or self.budget >= 1.0:
            return  # _decide never looks at the learned state then
        self.b_eff = self._effective_budget()
        w = self.window.view()
        if self.constrained is EndpointKind.SERVER:
            self.threshold = length_threshold(self.window.l[w], self.b_eff, long_side=True)
        else:
            self._fit_waits(self.window.l[w], self.window.ts[w], self.window.exact[w])

    def _decide_one(self, request):
        ss, ds = super()._decide_one(request)
        q = request.device_queue
        if (
            self.constrained is EndpointKind.SERVER
            and not np.isfinite(self.threshold)
            and 0.0 < self.budget < 1.0
            and self.config.device_queue_aware
            and q is not None
            and q.busy
        ):
            # [R] Cold start: before the first fit the threshold races nothing, so a device
            # that is already busy would queue every request (and refusals never teach the
            # policy). Race such a request; the budget guard decides whether it may.
            ss = np.zeros(1)
        return ss, ds

    def decision_table(self):
        if self.budget >= 1.0:
            return FixedStarts(0.0, 0.0)
        if self.budget <= 0.0:
            return FixedStarts(*self.unconstrained_starts())
        if self.constrained is EndpointKind.SERVER:
            cold = not np.isfinite(self.threshold) and self.config.device_queue_aware
            return LengthSplit(float(self.threshold), True, (0.0, 0.0), (NEVER, 0.0), cold)
        return WaitTable(tuple(map(float, self.edges)), tuple(map(float, self.waits)),
                         EndpointKind.DEVICE)  # fmt: skip

    def _decide(self, lengths, hints):
        n = lengths.size
        if self.budget >= 1.0:
            return self.race(n)
        if self.budget <= 0.0:
            return self.unconstrained_only(n)
        if self.constrained is EndpointKind.SERVER:
            ss = np.where(lengths >= self.threshold, 0.0, NEVER)
            return ss, np.zeros(n)
        wait = self.waits[np.searchsorted(self.edges, lengths, side="right")]
        return np.zeros(n), np.where(np.isfinite(wait), wait, NEVER)

    # --- DiSCo-D wait table ---------------------------------------------------------------
    def _fit_waits(self, lengths: np.ndarray, ts: np.ndarray, exact: np.ndarray) -> None:
        have = ~np.isnan(ts)
        tsv, exv = ts[have], exact[have]
        if tsv.size < MIN_SERVER_SAMPLES or lengths.size < LENGTH_BUCKETS:
            return  # keep the previous table
        km = KaplanMeier(tsv, exv)
        self._km = km  # the hedges' reservation (hedge_fire_share) uses the same estimate
        t_sorted = km.t

        def quant(p: np.ndarray) -> np.ndarray:  # np.quantile on sorted data, without re-sorting
            return np.interp(p * (t_sorted.size - 1), np.arange(t_sorted.size), t_sorted)

        ls = np.sort(lengths)
        n = ls.size
        budget = self.b_eff * float(ls.sum())
        ttft = self.device.ttft

        # E[min(T_s, c)] = integral_0^c S(t) dt on a fine grid; flat KM tail beyond the data.
        tmax = float(t_sorted[-1])
        tg = np.linspace(0.0, tmax, 257)
        s_t = km(tg)
        i_t = np.concatenate(([0.0], np.cumsum(0.5 * (s_t[1:] + s_t[:-1]) * np.diff(tg))))

        def e_min(c: np.ndarray) -> np.ndarray:
            return np.interp(c, tg, i_t) + s_t[-1] * np.maximum(c - tmax, 0.0)

        never_mean = float(i_t[-1] + s_t[-1] * tmax)  # leftover mass assumed near 2 * tmax

        qpos = np.linspace(0, 1, LENGTH_BUCKETS + 1)[1:-1] * (n - 1)
        edges = np.interp(qpos, np.arange(n), ls)
        thr = -np.inf
        if self.config.length_candidate:
            # [R] One more edge just above the length split's threshold (nominal b, as the `length`
            # baseline computes it on the same window), for the length-dominating candidate below.
            thr = length_threshold(ls, self.budget, long_side=False)
            if np.isfinite(thr):
                edges = np.append(edges, np.nextafter(thr, np.inf))
        edges = np.unique(edges)
        bucket = np.searchsorted(edges, ls, side="right")
        nb = edges.size + 1
        count = np.bincount(bucket, minlength=nb).astype(float)
        lsum = np.bincount(bucket, ls, minlength=nb)
        starts = np.searchsorted(bucket, np.arange(nb))
        lmax = ls[starts + count.astype(int) - 1]
        # Each bucket's mean TTFT is averaged over REPRESENTATIVES length quantiles (speed).
        pos = starts[:, None] + np.floor(
            (np.arange(REPRESENTATIVES) + 0.5) / REPRESENTATIVES * count[:, None]
        ).astype(int)
        rep_td = np.asarray(ttft(ls[pos]), dtype=float)  # (nb, R)

        def option(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """(expected spent tokens, summed mean TTFT) per bucket for per-bucket waits w."""
            fin = np.isfinite(w)
            wf = np.where(fin, w, 0.0)
            cost = np.where(fin, lsum * km(wf), 0.0)
            mean = np.where(fin, e_min(wf[:, None] + rep_td).mean(axis=1), never_mean) * count
            return cost, mean

        # Stage 1, tail protection (vectorised over candidate targets x).
        xs = quant(np.linspace(0.5, 0.999, 60))
        s_x = km(xs)
        allowed = (1.0 - self.config.tail_quantile) * n
        exposed = n * s_x
        lmax_td = np.asarray(ttft(lmax), dtype=float)
        w_x = xs[:, None] - lmax_td[None, :]
        ok = w_x >= 0
        cost_x = lsum[None, :] * km(np.maximum(w_x, 0.0))
        per_req = np.where(ok, cost_x / np.maximum(count, 1.0)[None, :], np.inf)
        order = np.argsort(per_req, axis=1, kind="stable")
        cum_cnt = np.cumsum(count[order], axis=1)
        cum_cost = np.cumsum(np.take_along_axis(cost_x, order, axis=1), axis=1)
        need = n - allowed / np.maximum(s_x, 1e-12)  # requests that must be rescued
        k = (cum_cnt < need[:, None]).sum(axis=1)  # buckets chosen = k + 1
        free = exposed <= allowed
        reach = (k < ok.sum(axis=1)) & (cum_cost[np.arange(xs.size), np.minimum(k, nb - 1)] <= budget)
        feasible = free | reach
        waits = np.full(nb, np.inf)
        self.tail_target = None
        if feasible.any():
            i = int(np.argmax(feasible))
            self.tail_target = float(xs[i])
            if not free[i]:
                # Protect beyond the minimum: every bucket rescuable at x, cheapest first, while
                # the budget lasts, so that window noise does not push the realised tail over x.
                m = min(int(ok[i].sum()), int(np.searchsorted(cum_cost[i], budget, side="right")))
                chosen = order[i, : max(m, k[i] + 1)]
                waits[chosen] = w_x[i, chosen]
                # Robustness: the window's x is an estimate; where the budget allows, rescue the
                # same buckets at a lower level x * (1 - tail_robust) (shorter waits).
                lo = xs[i] * (1.0 - self.config.tail_robust) - lmax_td
                cand = order[i, : int(ok[i].sum())]
                robust = np.maximum(lo[cand], 0.0)
                extra = lsum[cand] * km(robust) - np.where(np.isfinite(waits[cand]), cost_x[i, cand], 0.0)
                left = budget - float(cost_x[i, chosen].sum())
                take = np.cumsum(extra) <= left
                waits[cand[take]] = robust[take]

        td_all = np.asarray(ttft(ls), dtype=float)

        alpha = 1.0 - self.config.tail_quantile
        s_at_t = km(t_sorted)

        def tail_estimate(wt: np.ndarray) -> float:
            """The window's tail_quantile of TTFT under per-bucket waits wt: P(TTFT > x) is
            S(x) x the share of window prompts whose device cap (wait + prefill) exceeds x."""
            caps = np.sort(wt[bucket] + td_all)
            caps = caps[: int(np.searchsorted(caps, np.inf))]  # the finite ones
            best = np.inf
            # Both factors are right-continuous steps, so the smallest such x is a jump of one.
            for xs, s_xs in ((t_sorted, s_at_t), (caps, km(caps))):
                ok_x = s_xs * (1.0 - np.searchsorted(caps, xs, side="right") / n) <= alpha
                if ok_x.any():
                    best = min(best, float(xs[int(np.argmax(ok_x))]))
            return best

        # [R] Length-dominating table: w = 0 wherever the length split at b races (same window,
        # same threshold), except that buckets short enough to be rescued well under that split's
        # estimated tail X get the longest wait keeping wait + prefill <= X * (1 - tail_robust).
        # Every request then either does no worse than under the length split or finishes under
        # that safe level, so the tail cannot be worse; the budget this saves goes to the mean.
        dom = np.full(nb, np.inf)
        if self.config.length_candidate and thr > -np.inf:
            upper = np.append(edges, np.inf)  # bucket j holds l < upper[j]
            raced = upper <= np.nextafter(thr, np.inf) if np.isfinite(thr) else np.ones(nb, bool)
            x_len = tail_estimate(np.where(raced, 0.0, np.inf))
            safe = x_len * (1.0 - self.config.tail_robust)
            dom = np.where(raced, np.maximum(safe - lmax_td, 0.0), np.inf)

        # Stage 2, average optimisation: per bucket, pick the wait minimising mean + mu * cost
        # among waits no longer than the tail stage's, with the smallest mu (from a log grid) that
        # fits the budget, then fill what the Lagrangian leaves between hull points greedily.
        grid = np.unique(np.concatenate(([0.0], quant(np.linspace(0, 0.995, WAIT_GRID)))))
        g = grid.size
        choice_w = np.concatenate(
            (np.broadcast_to(grid, (nb, g)), np.full((nb, 1), np.inf), waits[:, None], dom[:, None]),
            axis=1,
        )
        cost = np.empty(choice_w.shape)
        mean = np.empty(choice_w.shape)
        cost[:, :g] = lsum[:, None] * km(grid)[None, :]
        mean[:, :g] = e_min(grid[None, None, :] + rep_td[:, :, None]).mean(axis=1) * count[:, None]
        cost[:, g], mean[:, g] = 0.0, never_mean * count
        cost[:, g + 1], mean[:, g + 1] = option(waits)
        cost[:, g + 2], mean[:, g + 2] = option(dom)
        rows = np.arange(nb)

        def optimise(ceiling: np.ndarray, budget: float = budget) -> np.ndarray:
            """Stage (2) under per-bucket wait ceilings, within ``budget`` tokens."""
            allowed_col = choice_w <= ceiling[:, None]

            # All multipliers at once: the smallest mu on a log grid whose choice fits.
            obj = np.where(allowed_col[None], mean[None] + MU_GRID[:, None, None] * cost[None], np.inf)
            sels = np.argmin(obj, axis=2)  # (mu, nb)
            fits = cost[rows[None, :], sels].sum(axis=1) <= budget
            sel = sels[int(np.argmax(fits))] if fits.any() else sels[-1]
            left = budget - float(cost[rows, sel].sum())
            for _ in range(2 * nb):
                dc = cost - cost[rows, sel][:, None]
                dm = mean[rows, sel][:, None] - mean
                fits = allowed_col & (dm > 0) & (dc <= left)
                if not fits.any():
                    break
                ratio = np.where(fits, dm / np.maximum(dc, 1e-12), -np.inf)
                j, c = divmod(int(np.argmax(ratio)), choice_w.shape[1])
                left -= float(dc[j, c])
                sel = sel.copy()
                sel[j] = c
            return sel

        # Keep the two-stage table only where the window says it beats the length-dominating
        # one's tail by more than candidate_tol (its estimate is optimistic: it was fitted to this
        # window); the dominating table is safe against the length split by design. Compared
        # before stage (2), which only shortens waits (and would cost a second pass).
        tol = 1.0 - self.config.candidate_tol
        use_dom = self.config.length_candidate and np.isfinite(dom).any()
        two_stage_wins = not use_dom or tail_estimate(waits) < tail_estimate(dom) * tol
        best = optimise(waits if two_stage_wins else dom)
        self.choice = "two-stage" if two_stage_wins else "length-dominating"
        table = choice_w[rows, best]
        if self.config.mean_tail_select and thr > -np.inf:
            # [R] Mean and tail together (issue 14): both tables above put the tail first. The
            # mean-optimal table (stage 2 alone) replaces the kept one where the window estimates
            # its mean lower by more than mean_gain_min, its tail quantile no higher than the
            # kept table's or the plain length split's, and it plans to spend as much (within
            # 1 %: the budget feedback must still be able to reach b).
            upper = np.append(edges, np.inf)  # bucket j holds l < upper[j]
            raced = upper <= np.nextafter(thr, np.inf) if np.isfinite(thr) else np.ones(nb, bool)
            m_kept = float(mean[rows, best].sum()) / n
            alt = optimise(np.full(nb, np.inf))
            m_alt = float(mean[rows, alt].sum()) / n
            split_cost = float(option(np.where(raced, 0.0, np.inf))[0].sum())
            spends = cost[rows, alt].sum() >= 0.99 * min(cost[rows, best].sum(), split_cost)
            if spends and m_alt < m_kept * (1.0 - self.config.mean_gain_min):
                alt_table = choice_w[rows, alt]
                q_ref = max(tail_estimate(table), tail_estimate(np.where(raced, 0.0, np.inf)))
                if tail_estimate(alt_table) <= q_ref:
                    table, self.choice = alt_table, "mean-optimal"
        self.edges, self.waits = edges, table


POLICIES.add("disco", DiSCo)
