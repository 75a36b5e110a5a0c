"""The `disco` command shell: help, unknown subcommands, and the bench launcher."""

from __future__ import annotations

import subprocess
import sys

import pytest
from needs import missing

from disco.cluster import cli
from disco.cluster.commands import bench


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_a_subcommand_that_fails_to_import_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli.COMMANDS, "broken", "no_such_command_module")
    with pytest.raises(ModuleNotFoundError, match="no_such_command_module"):
        cli.build_parser()


def test_no_subcommand_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "usage: disco" in capsys.readouterr().out


def test_unknown_subcommand_exits_2() -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["no-such-command"])
    assert e.value.code == 2


def test_bench_list_and_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    names = bench.available()
    if not names:
        missing("no bench scripts in this checkout")
    assert cli.main(["bench", "list"]) == 0
    assert names[0] in capsys.readouterr().out
    assert cli.main(["bench", "no-such-bench"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'no-such-bench'" in err and err[-1] == "\n" and err.count("\n") == 1


def test_console_script_runs_in_a_fresh_process() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "disco.cluster.cli", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "DiSCo testbed" in r.stdout
