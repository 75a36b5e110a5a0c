"""The chat-shaped workload and the regime's device-energy price."""

from __future__ import annotations

import numpy as np
import pytest

from disco.scheduler import workloads as wl
from disco.scheduler.profiles import (
    DEFAULT_LAMBDA_USD_PER_J,
    DEVICE_PROFILES,
    DEVICE_REGIME_LAMBDA_USD_PER_J,
    SERVER_PROFILES,
    regime_lambda,
    with_lambda,
)
from disco.scheduler.types import Regime


def test_chat_workload_has_the_published_means_and_is_seeded() -> None:
    recs = wl.chat_workload(40_000, seed=3)
    p = np.array([r.prompt_tokens for r in recs], float)
    o = np.array([r.output_tokens for r in recs], float)
    # Log-normal with the LMSYS-Chat-1M means (rounding and clipping move them a little).
    assert p.mean() == pytest.approx(wl.LMSYS_PROMPT_MEAN_TOKENS, rel=0.03)
    assert o.mean() == pytest.approx(wl.LMSYS_RESPONSE_MEAN_TOKENS, rel=0.03)
    assert np.median(p) < p.mean() and p.min() >= 1 and o.max() <= wl.CHAT_MAX_TOKENS
    arrivals = np.array([r.arrival for r in recs])
    assert arrivals[0] == 0.0 and np.all(np.diff(arrivals) >= 0)
    assert wl.chat_workload(50, seed=3) == wl.chat_workload(50, seed=3)
    assert wl.chat_workload(50, seed=3) != wl.chat_workload(50, seed=4)
    with pytest.raises(ValueError):
        wl.chat_workload(0)


def test_regime_lambda_makes_the_constrained_endpoint_the_dearer_decoder() -> None:
    assert regime_lambda(Regime.SERVER_CONSTRAINED) == regime_lambda("server") == DEFAULT_LAMBDA_USD_PER_J
    assert regime_lambda(Regime.DEVICE_CONSTRAINED) == DEVICE_REGIME_LAMBDA_USD_PER_J
    for dev in DEVICE_PROFILES.names():
        for srv in SERVER_PROFILES.names():
            out = SERVER_PROFILES.get(srv).prices.output_per_mtok / 1e6
            d = DEVICE_PROFILES.get(dev)
            assert with_lambda(d, regime_lambda("device")).cost_usd(1) > out, (dev, srv)
            assert with_lambda(d, regime_lambda("server")).cost_usd(1) < out, (dev, srv)
    with pytest.raises(ValueError):
        regime_lambda("both")
    with pytest.raises(ValueError):
        with_lambda(DEVICE_PROFILES.get("xiaomi14-qwen0.5b"), -1.0)
