"""`disco bench list`: every benchmark with the first paragraph of its docstring; unknown names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from disco.cluster import cli
from disco.cluster.commands import bench


def test_bench_list_prints_every_bench_with_its_docstring(
    capsys: pytest.CaptureFixture[str],
) -> None:
    scripts = sorted(bench.bench_dir().glob("bench_*.py"))
    if not scripts:
        pytest.skip("no bench scripts in this checkout")
    assert cli.main(["bench", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(scripts)
    for line, path in zip(lines, scripts, strict=True):
        name = path.stem.removeprefix("bench_")
        doc = ast.get_docstring(ast.parse(path.read_text()))
        first = " ".join(doc.split("\n\n")[0].split())  # every bench has a docstring
        assert line.split()[0] == name and line.endswith(first), line


def test_bench_list_without_a_docstring_and_unknown_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bench_alpha.py").write_text('"""Alpha: one\nline.\n\nDetails."""\nimport nope\n')
    (tmp_path / "bench_beta.py").write_text("print('no docstring')\n")
    (tmp_path / "helper.py").write_text('"""Not a bench."""\n')
    monkeypatch.setattr(bench, "bench_dir", lambda: tmp_path)
    assert cli.main(["bench", "list"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "alpha  Alpha: one line.",  # read, not imported (its import would fail)
        "beta   (no description)",
    ]
    assert cli.main(["bench", "gamma"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown benchmark 'gamma' (known: alpha, beta;" in err
