from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from disco.scheduler.profiles import (
    DEVICE_PROFILES,
    SERVER_PROFILES,
    Prices,
    fit_device_profile,
    fit_server_profile,
    load_profile,
    save_profile,
)
from disco.scheduler.registry import UnknownNameError


def test_named_profiles_for_the_paper() -> None:
    assert {"gpt-4o-mini", "deepseek-v2.5", "command", "llama-3-70b"} <= set(SERVER_PROFILES.names())
    assert {"pixel7pro-bloom1.1b", "xiaomi14-qwen0.5b"} <= set(DEVICE_PROFILES.names())
    for name in SERVER_PROFILES.names():
        assert SERVER_PROFILES.get(name).source
    ts = SERVER_PROFILES.get("gpt-4o-mini").sample_ttft(np.random.default_rng(0), np.full(5000, 500))
    assert 0.3 < float(np.median(ts)) < 0.7 and float(np.percentile(ts, 99)) > 2.0  # a long tail


def test_json_round_trip_and_errors(tmp_path: Path) -> None:
    dev = DEVICE_PROFILES.get("pixel7pro-bloom1.1b")
    path = tmp_path / "dev.json"
    save_profile(dev, path, measured=True, machine="test")
    assert load_profile(str(path), "device") == dev
    srv_path = tmp_path / "srv.json"
    save_profile(SERVER_PROFILES.get("command"), srv_path)
    assert load_profile(str(srv_path), "server") == SERVER_PROFILES.get("command")
    with pytest.raises(ValueError, match="expected device"):
        load_profile(str(srv_path), "device")
    with pytest.raises(UnknownNameError, match="unknown server profile"):
        load_profile("gpt-9", "server")
    with pytest.raises(ValueError, match="not found"):
        load_profile(str(tmp_path / "missing.json"), "server")


def test_fits_recover_measured_speeds() -> None:
    lens = np.array([32, 128, 512, 1024], float)
    dev = fit_device_profile("d", lens, 0.1 + lens / 250.0, decode_tps=20.0, params_b=0.5)
    assert dev.prefill_tps == pytest.approx(250.0) and dev.ttft_base_s == pytest.approx(0.1)
    srv = fit_server_profile("s", [0.4, 0.5, 2.0], [0.02, 0.02, 0.02], Prices(1, 2))
    assert srv.tbt_s == pytest.approx(0.02) and srv.ttft_samples == (0.4, 0.5, 2.0)
    with pytest.raises(ValueError):
        fit_device_profile("d", [10, 10], [0.1, 0.2], decode_tps=1.0, params_b=1.0)
