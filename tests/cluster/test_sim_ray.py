"""`disco sim --ray`: a causal sweep's cells as Ray tasks give the rows of the serial sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from needs import require

from disco.cluster.cli import main

require("ray")


@pytest.mark.slow
def test_sweep_over_local_ray_equals_the_serial_sweep(tmp_path: Path) -> None:
    args = ["sim", "--limit", "120", "--budgets", "0.3,0.7", "--policies", "disco,random",
            "--server-preset", "llama3-8b-a10g", "--replicas", "2", "--quiet", "--no-plots",
            "--regime", "device"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "serial")]) == 0
    assert main([*args, "--out", str(tmp_path / "ray"), "--ray"]) == 0
    serial = json.loads((tmp_path / "serial" / "sim.json").read_text())["rows"]
    spread = json.loads((tmp_path / "ray" / "sim.json").read_text())["rows"]
    assert len(serial) == 2 * 2 * 2
    assert spread == serial  # same cells, same order, same numbers
