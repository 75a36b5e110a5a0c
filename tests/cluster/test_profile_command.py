"""`disco profile` on a real engine (llama.cpp, SmolLM2) and on the emulated one."""

from __future__ import annotations

import json

import pytest

from disco.cluster.cli import main
from disco.scheduler.profiles import load_profile


def test_profiles_llamacpp_into_a_loadable_device_profile(tmp_path, capsys):
    out = tmp_path / "smollm2.json"
    argv = ["profile", "--endpoint", "llamacpp", "--model", "smollm2-135m", "--threads", "1",
            "--prompt-lens", "16,64", "--max-tokens", "4", "--repeats", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["measured"] is True and data["engine"].startswith("llamacpp")
    assert data["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert data["date"] and "CPUs" in data["machine"]
    assert sorted(s["target_tokens"] for s in data["samples"]) == [16, 64]
    assert all(s["output_tokens"] >= 1 and s["ttft_s"] > 0 for s in data["samples"])
    prof = load_profile(str(out), "device")
    assert 0.1 < prof.params_b < 0.2  # 135M parameters, read from the GGUF
    assert prof.prefill_tps > 0 and prof.decode_tps > 0


def test_profiles_emulated_server_as_empirical_ttfts(tmp_path):
    out = tmp_path / "server.json"
    argv = ["profile", "--endpoint", "emulated", "--model", "gpt-4o-mini", "--prompt-lens", "8,16",
            "--max-tokens", "3", "--repeats", "1", "--warmup", "0", "--price-in", "0.15",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    prof = load_profile(str(out), "server")
    assert len(prof.ttft_samples) == 2 and prof.prices.input_per_mtok == 0.15


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--endpoint", "nope"], "unknown endpoint engine 'nope'"),
        (["--endpoint", "llamacpp", "--model", "no-such-model"], "neither a bundled model"),
        (
            ["--endpoint", "emulated", "--model", "gpt-4o-mini", "--prompt-lens", "a,b"],
            "--prompt-lens",
        ),
        (["--endpoint", "openai"], "--base-url is required"),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, capsys, extra, needle):
    assert main(["profile", *extra, "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert not (tmp_path / "x.json").exists()
