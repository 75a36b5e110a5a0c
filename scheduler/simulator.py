"""Virtual-time simulator: replays a trace through the same policy objects the live system uses.

Model (each choice is ours [R] unless paper-notes says otherwise):
- Requests are independent: each has its own device (per-user phone) and sees a server TTFT drawn
  from the server profile (queueing and network are inside that distribution). One ``World`` of
  draws per trace and seed is shared by every policy, so policies differ only by their decisions.
- Device TTFT is the profile's a + c*l. Tokens after the first come at the endpoint's mean
  inter-token gap (the profiles' jitter, ``tbt_cv``, changes no decision and is not simulated,
  which also keeps QoE and TBT in closed form for the batch path).
- A plan's start > 0 is a hedge: that endpoint starts only if the other has produced no first token
  by then. The first first token wins; the loser is cancelled then. Billing is the one rule of
  ``billing.py``: every endpoint that started is charged its whole prompt, and that is what the
  budget counts.
- Migration (rule in the plan, decided at the first token by ``decide_migration_batch`` with the
  policy's expected output length): the target is sent prompt + generated text at once; the
  source keeps generating until the target is ready and the planned index is reached, and the
  switch happens at the next source token boundary, so the user sees no extra gap. The target is
  charged a prefill of prompt + the tokens before the switch (prompt + 1 if the source finished
  first). A server target pays a fresh server TTFT draw.

Two paths share every formula: ``run_scalar`` (per request: ``plan``, simulate, ``observe``;
builds full ``RequestOutcome``s) and ``run_batch`` (chunks of ``recompute_every`` requests through
the policy's vectorised ``_decide``, the same budget guard and ``observe_arrays``; summarised in
closed form). A test holds them equal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .metrics import DEFAULT_EXPECTED_TTFT_S, DEFAULT_TDS, summarize_arrays, target_area
from .migration import MigrationConfig, decide_migration_batch, median_ttft, warm_latency
from .policies import PolicyConfig, make_policy
from .policies.common import NEVER, WindowPolicy, budget_guard_scan
from .profiles import DeviceProfile, ServerProfile, regime_lambda, with_lambda
from .traces import TraceRecord
from .types import EndpointKind, MigrationRule, Plan, Regime, Request, RequestOutcome


@dataclass(frozen=True)
class SimSettings:
    expected_ttft: float = DEFAULT_EXPECTED_TTFT_S  # Andes QoE
    tds: float = DEFAULT_TDS
    migration: MigrationConfig = field(default_factory=MigrationConfig)


@dataclass(frozen=True)
class World:
    """Everything random about one replay, drawn once per (trace, profiles, seed)."""

    arrival: np.ndarray
    prompt: np.ndarray  # float, tokens
    output: np.ndarray  # int, tokens
    server_ttft: np.ndarray
    server_ttft_migrate: np.ndarray  # a fresh server TTFT if decoding migrates to the server
    device_ttft: np.ndarray
    server: ServerProfile
    device: DeviceProfile

    @classmethod
    def build(
        cls,
        records: Sequence[TraceRecord],
        server: ServerProfile,
        device: DeviceProfile,
        seed: int = 0,
    ) -> World:
        rng = np.random.default_rng(seed)
        prompt = np.array([r.prompt_tokens for r in records], dtype=float)
        return cls(
            arrival=np.array([r.arrival for r in records], dtype=float),
            prompt=prompt,
            output=np.array([r.output_tokens for r in records], dtype=np.int64),
            server_ttft=server.sample_ttft(rng, prompt),
            server_ttft_migrate=server.sample_ttft(rng, prompt),
            device_ttft=np.asarray(device.ttft(prompt), dtype=float),
            server=server,
            device=device,
        )

    def __len__(self) -> int:
        return int(self.prompt.size)

    def priced(self, lambda_usd_per_j: float) -> World:
        """The same draws with device energy priced at ``lambda_usd_per_j`` USD/J."""
        device = with_lambda(self.device, lambda_usd_per_j)
        return self if device is self.device else replace(self, device=device)


@dataclass
class Dispatch:
    """Who started, who won and when (times relative to arrival)."""

    started_s: np.ndarray
    started_d: np.ndarray
    t0: np.ndarray
    server_won: np.ndarray


def dispatch(ss: np.ndarray, ds: np.ndarray, ts: np.ndarray, td: np.ndarray) -> Dispatch:
    """Resolve start times (NaN = never; > 0 = hedge) into starts and the first-token winner."""
    has_s, has_d = ~np.isnan(ss), ~np.isnan(ds)
    fs_raw, fd_raw = ss + ts, ds + td  # NaN where never
    # The earlier start always starts; the later one only if no first token arrived by then.
    started_s = has_s & (~has_d | (ss <= ds) | (fd_raw > ss))
    started_d = has_d & (~has_s | (ds <= ss) | (fs_raw > ds))
    fs = np.where(started_s, fs_raw, np.inf)
    fd = np.where(started_d, fd_raw, np.inf)
    return Dispatch(started_s, started_d, np.minimum(fs, fd), fs <= fd)


@dataclass
class Outcomes:
    """Per-request results as arrays (the batch twin of a list of RequestOutcome)."""

    d: Dispatch
    switch: np.ndarray  # first token index from the migration target (= output where none)
    migrated: np.ndarray
    server_prompt: np.ndarray
    server_output: np.ndarray
    device_prompt: np.ndarray
    device_output: np.ndarray
    server_cost: np.ndarray
    device_energy_j: np.ndarray


def outcome_arrays(
    world: World,
    idx: slice | np.ndarray,
    ss: np.ndarray,
    ds: np.ndarray,
    expected_out: np.ndarray,
    rule: MigrationRule | None,
    mcfg: MigrationConfig,
) -> Outcomes:
    server, device = world.server, world.device
    plen, n = world.prompt[idx], world.output[idx]
    d = dispatch(ss, ds, world.server_ttft[idx], world.device_ttft[idx])
    switch = n.copy()
    migrated = np.zeros(n.size, dtype=bool)
    target_prompt = np.zeros(n.size)
    if rule is not None:
        from_server = rule.from_kind is EndpointKind.SERVER
        cand = d.server_won if from_server else ~d.server_won
        if cand.any():
            to_device = rule.target is EndpointKind.DEVICE
            # [R] a race's loser that is the target keeps its prefilled prompt (MigrationConfig
            # .reuse_loser): it is ready when its own first token would have come.
            warm = (d.started_d if to_device else d.started_s) & mcfg.reuse_loser
            t_target = (ds + world.device_ttft[idx]) if to_device else (ss + world.server_ttft[idx])
            ready_true = np.where(warm, np.maximum(t_target - d.t0, 0.0), 0.0)
            if to_device:
                ready_est = ready_true  # device prefill is predictable
            else:
                ready_est = np.where(warm, np.maximum(median_ttft(server) - (d.t0 - ss), 0.0), 0.0)
            dec = decide_migration_batch(
                rule, plen, 1, np.maximum(expected_out - 1.0, 0.0), server, device, mcfg,
                target_prefilled=warm, target_ready_s=ready_est,
            )  # fmt: skip
            launched = cand & dec.migrate
            g_src = server.tbt_s if from_server else device.tbt_s
            if to_device:
                cold = np.asarray(device.ttft(plen + 1), dtype=float) + device.tbt_s
            else:
                # The fresh draw already holds the prompt's term: add the one generated token.
                cold = (
                    mcfg.rtt_s + world.server_ttft_migrate[idx]
                    + server.ttft_per_prompt_token_s * 1 + server.tbt_s
                )  # fmt: skip
            t_m = np.where(warm, ready_true + warm_latency(rule.target, 1, server, device, mcfg), cold)
            k = np.maximum(dec.at_index, np.ceil(t_m / g_src).astype(np.int64))
            migrated = launched & (k < n)
            switch = np.where(migrated, k, n)
            sent = np.where(migrated, k, 1)  # generated text the target took in
            target_prompt = np.where(launched, np.where(warm, sent, plen + sent), 0.0)
    # Tokens: the winner makes [0, switch), the migration target [switch, n).
    s_first = np.where(d.server_won, switch, n - switch)
    d_first = n - s_first
    to_server = rule is not None and rule.target is EndpointKind.SERVER
    server_prompt = np.where(d.started_s, plen, 0.0) + (target_prompt if to_server else 0.0)
    device_prompt = np.where(d.started_d, plen, 0.0) + (0.0 if to_server else target_prompt)
    server_output = s_first.astype(float)
    device_output = d_first.astype(float)
    return Outcomes(
        d=d,
        switch=switch,
        migrated=migrated,
        server_prompt=server_prompt,
        server_output=server_output,
        device_prompt=device_prompt,
        device_output=device_output,
        server_cost=(server_prompt * server.prices.input_per_mtok
                     + server_output * server.prices.output_per_mtok) / 1e6,
        device_energy_j=(device_prompt + device_output) * device.energy_per_token_j,
    )  # fmt: skip


def _gaps(world: World, server_won: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(winner's gap, the other's gap) per request."""
    gs, gd = world.server.tbt_s, world.device.tbt_s
    return np.where(server_won, gs, gd), np.where(server_won, gd, gs)


def token_times(t0: float, n: int, switch: int, g_w: float, g_t: float) -> np.ndarray:
    """Token times relative to arrival: the winner's until ``switch``, then the target's."""
    j = np.arange(n, dtype=float)
    first = t0 + j * g_w
    return np.where(j < switch, first, t0 + switch * g_w + (j - switch) * g_t)


def closed_form_qoe(
    t0: np.ndarray, n: np.ndarray, switch: np.ndarray, g_w: np.ndarray, g_t: np.ndarray,
    expected_ttft: float, tds: float,
) -> np.ndarray:  # fmt: skip
    """Andes QoE of the two-segment token timeline, without building it (see metrics.qoe)."""
    dlt = 1.0 / tds
    n = n.astype(float)
    k = switch.astype(float)
    a = np.maximum(g_w, dlt)
    # Segment 1: shown at t0 + j * max(g_w, d).
    m1 = np.minimum(k, n)
    sum1 = m1 * t0 + a * m1 * (m1 - 1) / 2
    end1 = t0 + (m1 - 1) * a
    # Segment 2 (after a switch): shown at max(P + i d, r_k + i g_t), i = 0..M-1.
    mig = k < n
    m2 = np.where(mig, n - k, 0.0)
    r_k = t0 + k * g_w
    p = np.maximum(end1 + dlt, r_k)
    slower = g_t > dlt
    c = np.where(slower, np.floor((p - r_k) / np.where(slower, g_t - dlt, 1.0)) + 1, m2)
    c = np.clip(c, 0, m2)
    tri = lambda x: x * (x - 1) / 2  # noqa: E731 - sum of 0..x-1
    sum2 = c * p + dlt * tri(c) + (m2 - c) * r_k + g_t * (tri(m2) - tri(c))
    end2 = np.maximum(p + (m2 - 1) * dlt, r_k + (m2 - 1) * g_t)
    t_end = np.where(mig, end2, end1)
    s_actual = n * t_end - (sum1 + np.where(mig, sum2, 0.0))
    s_target = target_area(t_end, n, expected_ttft, tds)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s_target > 0, np.minimum(1.0, s_actual / s_target), 1.0)
    return q


def summarize_outcomes(
    world: World, o: Outcomes, regime: Regime, settings: SimSettings
) -> dict[str, float | int | None]:
    g_w, g_t = _gaps(world, o.d.server_won)
    t0 = o.d.t0
    n = world.output
    # Gap counts: within the winner's run (the switch gap equals the winner's gap), then the target's.
    w_gaps = np.where(o.migrated, o.switch, n - 1).astype(np.int64)
    t_gaps = np.where(o.migrated, n - o.switch - 1, 0).astype(np.int64)
    s_won = o.d.server_won
    gs_count = int(w_gaps[s_won].sum() + t_gaps[~s_won].sum())
    gd_count = int(w_gaps[~s_won].sum() + t_gaps[s_won].sum())
    return summarize_arrays(
        ttft=(world.arrival + t0) - world.arrival,  # same rounding as RequestOutcome.ttft
        qoe=closed_form_qoe(t0, n, o.switch, g_w, g_t, settings.expected_ttft, settings.tds),
        gap_values=np.array([world.server.tbt_s, world.device.tbt_s]),
        gap_weights=np.array([gs_count, gd_count]),
        prompt_tokens=world.prompt,
        output_tokens=n.astype(float),
        server_prompt=o.server_prompt,
        server_output=o.server_output,
        device_prompt=o.device_prompt,
        device_output=o.device_output,
        server_cost=o.server_cost,
        device_energy_j=o.device_energy_j,
        migrations=int(o.migrated.sum()),
        errors=0,
        regime=regime,
        device_usd_per_j=world.device.lambda_usd_per_j,
    )


# --- the two drivers ------------------------------------------------------------------------
def _hints(policy: WindowPolicy, world: World) -> np.ndarray:
    if getattr(policy, "wants_hints", False):
        calibrate = getattr(policy, "calibrate", None)
        if calibrate is not None:
            calibrate(world.prompt, world.server_ttft)
        return world.server_ttft
    return np.full(len(world), np.nan)


def run_scalar(
    policy: WindowPolicy, world: World, settings: SimSettings | None = None
) -> list[RequestOutcome]:
    """Request by request through ``plan``/``observe``, exactly as the live actor drives it."""
    settings = settings or SimSettings()
    hints = _hints(policy, world)
    outs: list[RequestOutcome] = []
    for i in range(len(world)):
        h = None if np.isnan(hints[i]) else float(hints[i])
        req = Request(
            id=str(i),
            arrival=float(world.arrival[i]),
            prompt_tokens=int(world.prompt[i]),
            output_tokens=int(world.output[i]),
            server_ttft_hint=h,
        )
        plan = policy.plan(req, now=req.arrival)
        exp_out = policy.expected_output_tokens(world.prompt[i : i + 1])
        outs.append(simulate_request(world, i, plan, exp_out, settings))
        policy.observe(outs[-1])
    return outs


def simulate_request(
    world: World, i: int, plan: Plan, expected_out: np.ndarray, settings: SimSettings
) -> RequestOutcome:
    ss = np.array([NEVER if plan.server_start is None else plan.server_start])
    ds = np.array([NEVER if plan.device_start is None else plan.device_start])
    o = outcome_arrays(world, slice(i, i + 1), ss, ds, expected_out, plan.migration, settings.migration)
    won_s = bool(o.d.server_won[0])
    g_w, g_t = _gaps(world, o.d.server_won)
    n, k = int(world.output[i]), int(o.switch[0])
    rel = token_times(float(o.d.t0[0]), n, k, float(g_w[0]), float(g_t[0]))
    winner = EndpointKind.SERVER if won_s else EndpointKind.DEVICE
    arrival = float(world.arrival[i])
    return RequestOutcome(
        request_id=plan.request_id,
        arrival=arrival,
        prompt_tokens=int(world.prompt[i]),
        token_times=list(arrival + rel),
        token_sources=[winner] * min(k, n) + [winner.other] * (n - min(k, n)),
        server_prompt_tokens=int(o.server_prompt[0]),
        server_output_tokens=int(o.server_output[0]),
        device_prompt_tokens=int(o.device_prompt[0]),
        device_output_tokens=int(o.device_output[0]),
        server_cost=float(o.server_cost[0]),
        device_energy_j=float(o.device_energy_j[0]),
        first_token_from=winner,
        migrated_at=k if bool(o.migrated[0]) else None,
        server_started=bool(o.d.started_s[0]),
        device_started=bool(o.d.started_d[0]),
    )


@dataclass
class PlannedRun:
    """A policy's decisions over a whole trace (what the batch path hands to evaluation)."""

    server_start: np.ndarray
    device_start: np.ndarray
    expected_out: np.ndarray


def run_batch(policy: WindowPolicy, world: World, settings: SimSettings | None = None) -> PlannedRun:
    """Chunks of ``recompute_every`` requests: the policy state is constant inside a chunk, so
    the vectorised decision equals the scalar one; the budget guard runs in request order."""
    settings = settings or SimSettings()
    hints = _hints(policy, world)
    n = len(world)
    ss_all, ds_all, exp_all = np.empty(n), np.empty(n), np.empty(n)
    step = policy.config.recompute_every - policy._since_recompute
    start = 0
    while start < n:
        sl = slice(start, min(n, start + step))
        lengths = world.prompt[sl]
        ss, ds = policy._decide(lengths, hints[sl])
        if policy.guarded:
            want = ~np.isnan(policy.constrained_start(ss, ds))
            d = dispatch(ss, ds, world.server_ttft[sl], world.device_ttft[sl])
            used = d.started_s if policy.constrained is EndpointKind.SERVER else d.started_d
            drop_seen, drop_spent = policy.window.departing(lengths.size)
            allowed = budget_guard_scan(
                want, lengths, np.where(used, lengths, 0.0), policy.budget_seen,
                policy.budget_spent, policy.budget, drop_seen, drop_spent,
            )  # fmt: skip
            blocked = want & ~allowed
            if blocked.any():
                us, ud = policy.unconstrained_only(int(blocked.sum()))
                ss, ds = ss.copy(), ds.copy()
                ss[blocked], ds[blocked] = us, ud
        exp = policy.expected_output_tokens(lengths)
        d = dispatch(ss, ds, world.server_ttft[sl], world.device_ttft[sl])
        arrival = world.arrival[sl]
        # What observe() would compute from each RequestOutcome, with the same rounding.
        ttft = (arrival + d.t0) - arrival
        ts_obs = np.where(d.started_s, ttft - ss, np.nan)
        spent = np.where(
            d.started_s if policy.constrained is EndpointKind.SERVER else d.started_d, lengths, 0.0
        )
        policy.observe_arrays(
            lengths, world.output[sl].astype(float), spent, ts_obs, d.server_won & d.started_s
        )
        ss_all[sl], ds_all[sl], exp_all[sl] = ss, ds, exp
        start = sl.stop
        step = policy.config.recompute_every
    return PlannedRun(ss_all, ds_all, exp_all)


def evaluate(
    world: World, run: PlannedRun, rule: MigrationRule | None, settings: SimSettings
) -> Outcomes:
    return outcome_arrays(
        world, slice(None), run.server_start, run.device_start, run.expected_out, rule,
        settings.migration,
    )  # fmt: skip


# --- sweeps -----------------------------------------------------------------------------------
ROW_KEYS = (
    "policy", "regime", "budget", "budget_used", "migration", "ttft_mean", "ttft_p50", "ttft_p90",
    "ttft_p99", "tbt_p99", "qoe_mean", "server_cost", "device_energy_j", "migrations", "requests",
    "budget_used_full", "qoe_perfect", "device_cost",
)  # fmt: skip


@dataclass(frozen=True)
class SweepSpec:
    regime: Regime
    budgets: tuple[float, ...]
    policies: tuple[str, ...]
    migration: tuple[bool, ...] = (False, True)
    seed: int = 0
    window: int = 2000
    recompute_every: int = 100
    settings: SimSettings = field(default_factory=SimSettings)
    # [R] device-energy price, USD/J; None: the regime's default (profiles.regime_lambda).
    lambda_usd_per_j: float | None = None


def sweep(
    world: World,
    spec: SweepSpec,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[dict]:
    """One row per policy x budget x migration setting.

    A policy's dispatch does not depend on the migration setting (migration moves decoding, never
    the prompt prefill the budget counts, nor the first token the policy learns from), so each
    (policy, budget) is planned once and evaluated with and without the migration rule; policies
    that take no budget are planned once for all budgets.
    """
    lam = regime_lambda(spec.regime) if spec.lambda_usd_per_j is None else spec.lambda_usd_per_j
    world = world.priced(lam)
    rows: list[dict] = []
    total = len(spec.policies) * len(spec.budgets)
    done = 0
    for name in spec.policies:
        cache: PlannedRun | None = None
        for b in spec.budgets:
            cfg = PolicyConfig(
                regime=spec.regime, budget=b, migration=True, window=spec.window,
                recompute_every=spec.recompute_every, seed=spec.seed,
            )  # fmt: skip
            policy = make_policy(name, cfg, world.server, world.device)
            if cache is None or policy.uses_budget:
                cache = run_batch(policy, world, spec.settings)
            for mig in spec.migration:
                out = evaluate(world, cache, policy.migration if mig else None, spec.settings)
                s = summarize_outcomes(world, out, spec.regime, spec.settings)
                row = {"policy": name, "regime": spec.regime.value, "budget": b, "migration": mig}
                row.update({k: s.get(k) for k in ROW_KEYS if k not in row})
                rows.append(row)
            done += 1
            if progress is not None:
                progress(done, total, f"{name} b={b:g}")
    return rows
