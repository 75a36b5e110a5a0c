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
- Budget feedback: every recompute, b_eff = b + deficit / (feedback_horizon periods' worth of
  prompt tokens), where deficit = b * seen - spent, so the spent share converges to b.
"""

from __future__ import annotations

import numpy as np

from ..types import EndpointKind
from .base import POLICIES
from .baselines import length_threshold
from .common import NEVER, KaplanMeier, WindowPolicy

LENGTH_BUCKETS = 16
# Lagrange multipliers tried (seconds of mean TTFT per prompt token), 0 first.
MU_GRID = np.concatenate(([0.0], np.logspace(-9, 3, 96)))
WAIT_GRID = 40
MIN_SERVER_SAMPLES = 20
REPRESENTATIVES = 8
_FORCE = None
_LOG = []


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

    # --- online budget ------------------------------------------------------------------
    def _effective_budget(self) -> float:
        b = self.budget
        w = self.window.view()
        if b <= 0.0 or b >= 1.0 or self.window.n == 0:
            return b
        mean_l = float(self.window.l[w].mean())
        horizon = self.config.feedback_horizon * self.config.recompute_every * mean_l
        deficit = b * self.seen_tokens - self.spent_tokens
        return float(np.clip(b + deficit / horizon, 0.0, 1.0))

    def _recompute(self) -> None:
        if self.budget <= 0.0 or self.budget >= 1.0:
            return  # _decide never looks at the learned state then
        self.b_eff = self._effective_budget()
        w = self.window.view()
        if self.constrained is EndpointKind.SERVER:
            self.threshold = length_threshold(self.window.l[w], self.b_eff, long_side=True)
        else:
            self._fit_waits(self.window.l[w], self.window.ts[w], self.window.exact[w])

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
        t_sorted = km.t

        def quant(p: np.ndarray) -> np.ndarray:  # np.quantile on sorted data, without re-sorting
            return np.interp(p * (t_sorted.size - 1), np.arange(t_sorted.size), t_sorted)

        ls = np.sort(lengths)
        n = ls.size
        budget = self.b_eff * float(ls.sum())
        # [R] stage 1 (which lengths the tail needs) at the nominal b when tail_nominal_budget:
        # a threshold that follows the feedback's swings exposes the knife-edge lengths.
        tail_b = (self.budget if self.config.tail_nominal_budget else self.b_eff) * float(ls.sum())
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
        if self.config.length_candidate:
            # [R] One more edge just above the length split's threshold, so that the length-style
            # candidate below is exactly the `length` baseline's rule at b_eff.
            thr = length_threshold(ls, tail_b / float(ls.sum()), long_side=False)
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
        reach = (k < ok.sum(axis=1)) & (cum_cost[np.arange(xs.size), np.minimum(k, nb - 1)] <= tail_b)
        feasible = free | reach
        waits = np.full(nb, np.inf)
        self.tail_target = None
        if feasible.any():
            i = int(np.argmax(feasible))
            self.tail_target = float(xs[i])
            if not free[i]:
                # Protect beyond the minimum: every bucket rescuable at x, cheapest first, while
                # the budget lasts, so that window noise does not push the realised tail over x.
                m = min(int(ok[i].sum()), int(np.searchsorted(cum_cost[i], tail_b, side="right")))
                chosen = order[i, : max(m, k[i] + 1)]
                waits[chosen] = w_x[i, chosen]
                # Robustness: the window's x is an estimate; where the budget allows, rescue the
                # same buckets at a lower level x * (1 - tail_robust) (shorter waits).
                lo = xs[i] * (1.0 - self.config.tail_robust) - lmax_td
                cand = order[i, : int(ok[i].sum())]
                robust = np.maximum(lo[cand], 0.0)
                extra = lsum[cand] * km(robust) - np.where(np.isfinite(waits[cand]), cost_x[i, cand], 0.0)
                left = tail_b - float(cost_x[i, chosen].sum())
                take = np.cumsum(extra) <= left
                waits[cand[take]] = robust[take]

        # Stage 2, average optimisation: per bucket, pick the wait minimising mean + mu * cost
        # among waits no longer than the tail stage's, with the smallest mu (from a log grid) that
        # fits the budget, then fill what the Lagrangian leaves between hull points greedily.
        grid = np.unique(np.concatenate(([0.0], quant(np.linspace(0, 0.995, WAIT_GRID)))))
        g = grid.size
        choice_w = np.concatenate(
            (np.broadcast_to(grid, (nb, g)), np.full((nb, 1), np.inf), waits[:, None]), axis=1
        )
        cost = np.empty(choice_w.shape)
        mean = np.empty(choice_w.shape)
        cost[:, :g] = lsum[:, None] * km(grid)[None, :]
        mean[:, :g] = e_min(grid[None, None, :] + rep_td[:, :, None]).mean(axis=1) * count[:, None]
        cost[:, g], mean[:, g] = 0.0, never_mean * count
        cost[:, g + 1], mean[:, g + 1] = option(waits)
        rows = np.arange(nb)

        def optimise(ceiling: np.ndarray) -> np.ndarray:
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

        cfg = self.config
        cands = [optimise(waits)]
        if cfg.length_candidate:
            # [R] Candidate 2: the length-style table (w = 0 on the shortest buckets that fit the
            # budget, no device above), then the same mean stage on what is left. The length split
            # is in DiSCo-D's feasible set, so offering it keeps the tail stage's estimation error
            # from losing to it.
            fit = int(np.searchsorted(np.cumsum(lsum), tail_b, side="right"))
            lw = np.full(nb, np.inf)
            lw[:fit] = 0.0
            cands.append(optimise(lw))
        if len(cands) == 1:
            best = cands[0]
        else:
            td_all = np.asarray(ttft(ls), dtype=float)
            allowed_frac = 1.0 - cfg.tail_quantile
            scores = []
            for sel in cands:
                wt = choice_w[rows, sel]
                caps = np.sort(wt[bucket] + td_all)  # TTFT <= cap (device start + prefill)
                xs = np.unique(np.concatenate((t_sorted, caps[np.isfinite(caps)])))
                frac = 1.0 - np.searchsorted(caps, xs, side="right") / n  # share with cap > x
                ok_x = km(xs) * frac <= allowed_frac
                p_tail = float(xs[int(np.argmax(ok_x))]) if ok_x.any() else np.inf
                scores.append((p_tail, float(mean[rows, sel].sum()) / n))
            p_best = min(s[0] for s in scores)
            near = [i for i, s in enumerate(scores) if s[0] <= p_best * (1.0 + cfg.candidate_tol)]
            best = cands[min(near, key=lambda i: (scores[i][1], i))]
            if _FORCE is not None:
                best = cands[_FORCE]
            _LOG.append(scores)
        self.edges, self.waits = edges, choice_w[rows, best]


POLICIES.add("disco", DiSCo)
