"""Per-request and aggregate metrics: TTFT, TBT, Andes QoE, cost, energy and budget used.

Andes QoE (Liu et al., arXiv 2404.16283; paper-notes.md "Andes QoE"): the user reads tokens no
faster than the expected token delivery speed ``tds``, so the *visible* token curve is paced by a
client buffer (token k is shown at max(arrival_k, shown_{k-1} + 1/tds)). QoE = min(1, S_actual /
S_target), both areas taken from the request's arrival up to the moment the last token is shown:
S_actual under the visible token-count curve, S_target under E(t) = min(N, tds * (t - expected_ttft)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .types import EndpointKind, Regime, RequestOutcome

DEFAULT_EXPECTED_TTFT_S = 1.0
DEFAULT_TDS = 4.8  # reading speed, tokens/s (Andes)

SUMMARY_KEYS = (
    "requests", "errors", "refused", "ttft_mean", "ttft_p50", "ttft_p90", "ttft_p99", "tbt_mean",
    "tbt_p99", "qoe_mean", "qoe_perfect", "server_cost", "device_energy_j", "device_cost",
    "budget_used", "budget_used_full", "migrations",
)  # fmt: skip


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); None for no values."""
    a = np.asarray(values, dtype=float)
    return float(np.percentile(a, q)) if a.size else None


def weighted_percentile(
    values: np.ndarray, weights: np.ndarray, q: float
) -> float | None:
    """``percentile(np.repeat(values, weights), q)`` without building the repeated array.

    Integer weights; used where many gaps share a value (the simulator's pooled gaps).
    """
    v = np.asarray(values, dtype=float)
    w = np.asarray(weights, dtype=np.int64)
    keep = w > 0
    v, w = v[keep], w[keep]
    total = int(w.sum())
    if total == 0:
        return None
    order = np.argsort(v, kind="stable")
    v, cw = v[order], np.cumsum(w[order])
    pos = (total - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    vlo = v[np.searchsorted(cw, lo + 1)]
    vhi = v[np.searchsorted(cw, hi + 1)]
    return float(vlo + (vhi - vlo) * (pos - lo))


def target_area(t_end: float | np.ndarray, n: float | np.ndarray, expected_ttft: float, tds: float):
    """Area under E(t) = min(n, tds * (t - expected_ttft))+ from 0 to t_end (vectorised)."""
    u = np.maximum(np.asarray(t_end, dtype=float) - expected_ttft, 0.0)
    n = np.asarray(n, dtype=float)
    ramp = n / tds  # time the ideal curve needs to deliver all n tokens
    return np.where(u <= ramp, 0.5 * tds * u * u, 0.5 * n * ramp + n * (u - ramp))


def paced_times(rel_times: Sequence[float] | np.ndarray, tds: float) -> np.ndarray:
    """Times the user sees each token: no earlier than one reading interval after the previous."""
    r = np.asarray(rel_times, dtype=float)
    if r.size == 0:
        return r
    d = 1.0 / tds
    k = np.arange(r.size) * d
    # v_k = max(r_k, v_{k-1} + d)  <=>  v_k - k d = running max of (r_j - j d).
    return np.maximum.accumulate(r - k) + k


def qoe(
    token_times: Sequence[float] | np.ndarray,
    arrival: float,
    expected_ttft: float = DEFAULT_EXPECTED_TTFT_S,
    tds: float = DEFAULT_TDS,
    paced: bool = True,
) -> float:
    """Andes QoE of one response in [0, 1]; ``paced=False`` uses the raw delivery curve."""
    if expected_ttft < 0 or tds <= 0:
        raise ValueError("expected_ttft must be >= 0 and tds > 0")
    rel = np.asarray(token_times, dtype=float) - arrival
    if rel.size == 0:
        return 0.0
    v = paced_times(rel, tds) if paced else np.sort(rel)
    t_end = float(v[-1])
    s_actual = float(np.sum(t_end - v))  # each shown token adds (t_end - shown_k) of area
    s_target = float(target_area(t_end, v.size, expected_ttft, tds))
    if s_target <= 0.0:
        return 1.0  # everything shown before the user expected the first token
    return min(1.0, s_actual / s_target)


def summarize(
    outcomes: list[RequestOutcome],
    regime: Regime | None = None,
    expected_ttft: float = DEFAULT_EXPECTED_TTFT_S,
    tds: float = DEFAULT_TDS,
) -> dict[str, float | int | None]:
    """Aggregate outcomes. ``budget_used`` needs the regime (which endpoint is constrained):
    prompt tokens the constrained endpoint prefilled / all prompt tokens (paper-notes "Budget
    ratio"); ``budget_used_full`` the same share over prompt + output tokens (our full-cost variant).
    Failed requests (``error`` set, no tokens) count in ``errors`` and not in latency aggregates.
    Refused ones (``refused``: turned away before any endpoint started) count in ``requests`` and
    ``refused`` only: not in ``errors``, latency, work or the budget shares (as the policies, which
    drop them from their budget window).
    """
    ran = [o for o in outcomes if not o.refused]
    ok = [o for o in ran if o.error is None and len(o.token_times)]
    gaps = [np.diff(np.asarray(o.token_times, dtype=float)) for o in ok]
    gap_arr = np.concatenate(gaps) if gaps else np.zeros(0)
    return summarize_arrays(
        ttft=np.array([o.ttft for o in ok], dtype=float),
        qoe=np.array([qoe(o.token_times, o.arrival, expected_ttft, tds) for o in ok], dtype=float),
        gap_values=gap_arr,
        gap_weights=np.ones(gap_arr.size, dtype=np.int64),
        prompt_tokens=np.array([o.prompt_tokens for o in ran], dtype=float),
        output_tokens=np.array([len(o.token_times) for o in ran], dtype=float),
        server_prompt=np.array([o.server_prompt_tokens for o in ran], dtype=float),
        server_output=np.array([o.server_output_tokens for o in ran], dtype=float),
        device_prompt=np.array([o.device_prompt_tokens for o in ran], dtype=float),
        device_output=np.array([o.device_output_tokens for o in ran], dtype=float),
        server_cost=np.array([o.server_cost for o in ran], dtype=float),
        device_energy_j=np.array([o.device_energy_j for o in ran], dtype=float),
        migrations=sum(o.migrated_at is not None for o in ran),
        errors=len(ran) - len(ok),
        regime=regime,
        refused=len(outcomes) - len(ran),
    )


def summarize_arrays(
    *,
    ttft: np.ndarray,
    qoe: np.ndarray,
    gap_values: np.ndarray,
    gap_weights: np.ndarray,
    prompt_tokens: np.ndarray,
    output_tokens: np.ndarray,
    server_prompt: np.ndarray,
    server_output: np.ndarray,
    device_prompt: np.ndarray,
    device_output: np.ndarray,
    server_cost: np.ndarray,
    device_energy_j: np.ndarray,
    migrations: int,
    errors: int,
    regime: Regime | None,
    device_usd_per_j: float | None = None,
    refused: int = 0,
) -> dict[str, float | int | None]:
    """The one aggregation both the per-outcome path and the simulator's batch path use.
    ``refused``: requests refused before any endpoint started, not in any of the arrays."""
    gw = np.asarray(gap_weights, dtype=np.int64)
    n_gaps = int(gw.sum())
    out: dict[str, float | int | None] = {
        "requests": int(prompt_tokens.size) + int(refused),
        "errors": int(errors),
        "refused": int(refused),
        "ttft_mean": float(ttft.mean()) if ttft.size else None,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p90": percentile(ttft, 90),
        "ttft_p99": percentile(ttft, 99),
        "tbt_mean": float(np.dot(gap_values, gw) / n_gaps) if n_gaps else None,
        "tbt_p99": weighted_percentile(gap_values, gw, 99),
        "qoe_mean": float(qoe.mean()) if qoe.size else None,
        "qoe_perfect": float(np.mean(qoe >= 0.99)) if qoe.size else None,
        "server_cost": float(server_cost.sum()),
        "device_energy_j": float(device_energy_j.sum()),
        "device_cost": None
        if device_usd_per_j is None
        else float(device_energy_j.sum() * device_usd_per_j),
        "budget_used": None,
        "budget_used_full": None,
        "migrations": int(migrations),
    }
    if regime is not None:
        side = regime.constrained
        cp, co = (server_prompt, server_output) if side is EndpointKind.SERVER else (
            device_prompt, device_output
        )
        total_p = float(prompt_tokens.sum())
        total_all = total_p + float(output_tokens.sum())
        out["budget_used"] = float(cp.sum()) / total_p if total_p else 0.0
        out["budget_used_full"] = float(cp.sum() + co.sum()) / total_all if total_all else 0.0
    return out
