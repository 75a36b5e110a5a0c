"""Imports flow one way (README, DESIGN.md section 2): ``scheduler`` imports none of the other
packages, ``device_agents`` and ``loadgen`` never import ``cluster``. Read from the source, so a
lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "scheduler": ("disco.device_agents", "disco.loadgen", "disco.cluster"),
    "device_agents": ("disco.cluster", "disco.loadgen"),
    "loadgen": ("disco.cluster", "disco.device_agents"),
}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_flow_one_way(package):
    bad = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in _imports(path)
        if name.startswith(FORBIDDEN[package])
    ]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)
