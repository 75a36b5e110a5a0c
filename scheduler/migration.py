"""Token-level migration planner (paper-notes.md, "Token-level migration").

After the first token, the rest of a generation may move to the cheaper endpoint. It pays off when
(decode cost difference per token) x (expected remaining tokens) > migration overhead, and it is
invisible to the user when the client buffer holds B = r_c * t_m tokens when the switch happens
(r_c: reading speed, t_m: migration latency). Because endpoints generate faster than people read,
the buffer grows by (r_g - r_c) per second; the switch token index is chosen so that the buffer is
already B tokens deep when the target takes over.

[R] our reconstruction: t_m = network RTT + target prefill of (prompt + generated) + one decode
step; the source keeps generating while the target prefills, so the switch index also adds the
tokens the source emits during t_m.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .profiles import DeviceProfile, ServerProfile
from .types import EndpointKind, MigrationRule

# Andes: reading ~4.8 tokens/s (paper-notes.md, "Andes QoE").
DEFAULT_READ_TPS = 4.8


@dataclass(frozen=True, slots=True)
class MigrationDecision:
    migrate: bool
    target: EndpointKind | None = None
    at_index: int | None = None  # first token index the target produces
    overhead_s: float = 0.0  # estimated t_m
    saving_usd: float = 0.0  # estimated money saved (negative: it would cost more)
    reason: str = ""


@dataclass(frozen=True, slots=True)
class MigrationConfig:
    read_tps: float = DEFAULT_READ_TPS
    rtt_s: float = 0.05  # device <-> server round trip
    # Overhead in money of one migration (the target's re-prefill is charged separately below).
    min_saving_usd: float = 0.0
    min_remaining_tokens: int = 8
    # [R] keep a race's loser alive as the migration target (its prompt is already prefilled).
    reuse_loser: bool = True


def decode_cost_per_token(kind: EndpointKind, server: ServerProfile, device: DeviceProfile) -> float:
    if kind is EndpointKind.SERVER:
        return server.prices.output_per_mtok / 1e6
    return device.cost_usd(1)


def prefill_cost_per_token(kind: EndpointKind, server: ServerProfile, device: DeviceProfile) -> float:
    if kind is EndpointKind.SERVER:
        return server.prices.input_per_mtok / 1e6
    return device.cost_usd(1)


def migration_latency(
    target: EndpointKind,
    context_tokens: int,
    server: ServerProfile,
    device: DeviceProfile,
    cfg: MigrationConfig,
    server_ttft_s: float | None = None,
) -> float:
    """t_m: time from the decision until the target emits its first new token."""
    if target is EndpointKind.DEVICE:
        return float(device.ttft(context_tokens)) + device.tbt_s
    # Server: a fresh request pays the server's queueing/network TTFT again (median if unknown).
    base = server_ttft_s if server_ttft_s is not None else median_ttft(server)
    return cfg.rtt_s + base + server.ttft_per_prompt_token_s * context_tokens + server.tbt_s


def warm_latency(
    target: EndpointKind,
    new_tokens: float | np.ndarray,
    server: ServerProfile,
    device: DeviceProfile,
    cfg: MigrationConfig,
):
    """t_m for a target that already holds the prompt: prefill the new text, one decode step."""
    if target is EndpointKind.DEVICE:
        return np.asarray(new_tokens, dtype=float) / device.prefill_tps + device.tbt_s
    return cfg.rtt_s + server.ttft_per_prompt_token_s * np.asarray(new_tokens, dtype=float) + server.tbt_s


def median_ttft(server: ServerProfile) -> float:
    """A cheap central estimate of the server's TTFT (the live side has no better prior)."""
    if server.ttft_samples:
        s = sorted(server.ttft_samples)
        return s[len(s) // 2]
    # Median of the dominant mixture component is a fair, cheap estimate.
    return max(server.ttft_mixture, key=lambda c: c.weight).median_s


def decide_migration(
    rule: MigrationRule | None,
    winner: EndpointKind,
    prompt_tokens: int,
    generated_tokens: int,
    expected_remaining: float,
    server: ServerProfile,
    device: DeviceProfile,
    cfg: MigrationConfig | None = None,
    *,
    target_prefilled: bool = False,
    target_ready_s: float = 0.0,
) -> MigrationDecision:
    """Decide at first-token time (or later) whether and where to switch.

    ``generated_tokens``: tokens already produced by the winner when deciding; ``expected_remaining``:
    tokens still expected after those (estimated online by the caller when unknown).
    ``target_prefilled``: [R] the target is the race's loser, still alive and prefilling the same
    prompt (done in ``target_ready_s``): it then only has to take in the generated text, which
    makes migrating after a race far cheaper than a cold start.
    """
    cfg = cfg or MigrationConfig()
    if rule is None or winner is not rule.from_kind:
        return MigrationDecision(False, reason="no migration rule for this winner")
    target = rule.target
    src_rate = server.tbt_s if winner is EndpointKind.SERVER else device.tbt_s
    ctx = prompt_tokens + generated_tokens
    if target_prefilled:
        t_m = target_ready_s + warm_latency(target, generated_tokens, server, device, cfg)
    else:
        t_m = migration_latency(target, ctx, server, device, cfg)
    # Tokens the source still emits while the target prefills and the buffer must hold B tokens.
    tokens_during = math.ceil(t_m / src_rate)
    buffer_needed = math.ceil(cfg.read_tps * t_m)
    # The source is faster than reading, so its buffer lead after k tokens is k - r_c * k * tbt.
    lead_per_token = max(1e-9, 1.0 - cfg.read_tps * src_rate)
    tokens_for_buffer = math.ceil(buffer_needed / lead_per_token)
    switch_after = max(tokens_during, tokens_for_buffer)
    at_index = generated_tokens + switch_after
    moved = expected_remaining - switch_after
    if moved < cfg.min_remaining_tokens:
        return MigrationDecision(False, target, None, t_m, 0.0, "too few tokens left to move")
    saving = moved * (
        decode_cost_per_token(winner, server, device) - decode_cost_per_token(target, server, device)
    )
    # Overhead: the target re-prefills prompt + generated text.
    reprefill = at_index if target_prefilled else prompt_tokens + at_index
    overhead = reprefill * prefill_cost_per_token(target, server, device)
    net = saving - overhead
    if net <= cfg.min_saving_usd:
        return MigrationDecision(False, target, None, t_m, net, "saving below overhead")
    return MigrationDecision(True, target, at_index, t_m, net, "saves more than it costs")


@dataclass(frozen=True, slots=True)
class MigrationBatch:
    """Vectorised :func:`decide_migration` for requests whose winner is ``rule.from_kind``."""

    migrate: np.ndarray  # bool
    at_index: np.ndarray  # int; valid where migrate
    overhead_s: np.ndarray
    saving_usd: np.ndarray


def decide_migration_batch(
    rule: MigrationRule,
    prompt_tokens: np.ndarray,
    generated_tokens: int,
    expected_remaining: np.ndarray,
    server: ServerProfile,
    device: DeviceProfile,
    cfg: MigrationConfig | None = None,
    target_prefilled: np.ndarray | None = None,
    target_ready_s: np.ndarray | None = None,
) -> MigrationBatch:
    """Same arithmetic as :func:`decide_migration` (a test holds them equal), over arrays."""
    cfg = cfg or MigrationConfig()
    n = np.asarray(prompt_tokens).size
    warm = np.zeros(n, bool) if target_prefilled is None else np.asarray(target_prefilled, bool)
    ready = np.zeros(n) if target_ready_s is None else np.asarray(target_ready_s, dtype=float)
    winner, target = rule.from_kind, rule.target
    src_rate = server.tbt_s if winner is EndpointKind.SERVER else device.tbt_s
    ctx = np.asarray(prompt_tokens, dtype=float) + generated_tokens
    if target is EndpointKind.DEVICE:
        t_m = np.asarray(device.ttft(ctx), dtype=float) + device.tbt_s
    else:
        base = median_ttft(server)
        t_m = cfg.rtt_s + base + server.ttft_per_prompt_token_s * ctx + server.tbt_s
    t_m = np.where(warm, ready + warm_latency(target, generated_tokens, server, device, cfg), t_m)
    tokens_during = np.ceil(t_m / src_rate)
    buffer_needed = np.ceil(cfg.read_tps * t_m)
    lead_per_token = max(1e-9, 1.0 - cfg.read_tps * src_rate)
    switch_after = np.maximum(tokens_during, np.ceil(buffer_needed / lead_per_token))
    at_index = generated_tokens + switch_after
    moved = np.asarray(expected_remaining, dtype=float) - switch_after
    per_token = decode_cost_per_token(winner, server, device) - decode_cost_per_token(
        target, server, device
    )
    saving = moved * per_token
    reprefill = np.where(warm, at_index, np.asarray(prompt_tokens, dtype=float) + at_index)
    overhead = reprefill * prefill_cost_per_token(target, server, device)
    net = saving - overhead
    migrate = (moved >= cfg.min_remaining_tokens) & (net > cfg.min_saving_usd)
    return MigrationBatch(migrate, at_index.astype(np.int64), t_m, net)
