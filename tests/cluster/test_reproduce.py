"""`disco reproduce` on a small slice: the file's structure, the paper's column, numbers from the run."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from disco.cluster.cli import main
from disco.cluster.commands.reproduce import DEVICES, PAPER_TAIL, REGIMES, SERVICES

PAPER_NOTES = Path(__file__).resolve().parents[3] / "shared" / "paper-notes.md"
SMALL = ["reproduce", "--limit", "300", "--quiet", "--jobs", "1", "--lambda-sweep", "1e-6,5e-5"]
WORKLOADS = ("conv", "code", "chat")


def _run(out: Path, *extra: str) -> str:
    t = time.perf_counter()
    assert main([*SMALL, "--out", str(out), *extra]) == 0
    assert time.perf_counter() - t < 60
    return (out / "paper.md").read_text()


def _tail_rows(text: str) -> list[list[str]]:
    section = text.split("## Tail (P99) TTFT reduction")[1].split("\n## ")[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith("| service")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]


def _section_table(text: str, heading: str) -> list[list[str]]:
    section = text.split(heading)[1].split("\n#")[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("| ") and "---" not in ln]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("reproduce")
    return {
        "seed0": _run(base / "s0", "--seeds", "0"),
        "seed1": _run(base / "s1", "--seeds", "1", "--no-plots"),
        "dir": str(base),
    }


def test_structure_and_plots(runs) -> None:
    text = runs["seed0"]
    for heading in ("# The DiSCo paper's tables beside ours", "## Tail (P99) TTFT reduction",
                    "## Mean TTFT reduction", "## Migration savings per regime",
                    "### Across lambda", "## Where DiSCo loses"):  # fmt: skip
        assert heading in text, heading
    assert "disco reproduce --limit 300" in text and "Seeds 0;" in text
    assert "https://arxiv.org/abs/2309.11998" in text  # the chat workload's source
    rows = _tail_rows(text)
    assert len(rows) == 12
    assert {(r[0], r[1], r[2]) for r in rows} == {
        (s, r, d) for s in SERVICES for r in REGIMES for d in DEVICES
    }
    for r in rows:  # paper + (a) and (b) for each workload, every one a number from the run
        assert len(r) == 4 + 2 * len(WORKLOADS)
        for cell in r[4:]:
            assert re.fullmatch(r"-?\d+\.\d ± \d+\.\d \[-?\d+\.\d, -?\d+\.\d\]", cell), cell
    for png in ("paper_tail.png", "paper_lambda.png"):
        assert (Path(runs["dir"]) / "s0" / png).stat().st_size > 1000
    assert not (Path(runs["dir"]) / "s1" / "paper_tail.png").exists()


def test_paper_column_is_the_notes_table(runs) -> None:
    rows = _tail_rows(runs["seed0"])
    got = {(SERVICES[r[0]], REGIMES[r[1]], DEVICES[r[2]]): float(r[3]) for r in rows}
    assert got == PAPER_TAIL
    if not PAPER_NOTES.is_file():
        pytest.skip(f"{PAPER_NOTES} not in this checkout's parent (only the code's copy checked)")
    notes = {}
    for line in PAPER_NOTES.read_text().splitlines():
        m = re.fullmatch(r"\| (GPT|LLaMA|Command) \| (\S+) \| ([\d.]+)% \| ([\d.]+)% \|", line.strip())
        if m:
            svc, reg = SERVICES[m[1]], REGIMES[m[2]]
            notes[(svc, reg, "pixel7pro-bloom1.1b")] = float(m[3])
            notes[(svc, reg, "xiaomi14-qwen0.5b")] = float(m[4])
    assert notes == PAPER_TAIL


def test_numbers_come_from_the_run(runs) -> None:
    a, b = _tail_rows(runs["seed0"]), _tail_rows(runs["seed1"])
    assert [r[:4] for r in a] == [r[:4] for r in b]  # the paper's side does not move
    assert [r[4:] for r in a] != [r[4:] for r in b]  # ours does, with the seed
    ma = _section_table(runs["seed0"], "## Migration savings per regime")
    mb = _section_table(runs["seed1"], "## Migration savings per regime")
    assert ma != mb


def test_migration_fires_in_both_regimes(runs) -> None:
    rows = _section_table(runs["seed0"], "## Migration savings per regime")
    chat = {r[1]: r for r in rows if r[0] == "chat"}
    assert set(chat) == {"server-constrained", "device-constrained"}
    for r in chat.values():
        assert float(r[5].replace(",", "")) > 0  # migrations per run at the regime's lambda
        assert float(r[2].split()[0]) > 0  # and they save on the constrained endpoint


def test_bad_arguments_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["reproduce", "--workloads", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown workload 'nope'" in capsys.readouterr().err
    assert main(["reproduce", "--lambda", "-1", "--out", str(tmp_path)]) == 2
    assert "lambdas must be >= 0" in capsys.readouterr().err
