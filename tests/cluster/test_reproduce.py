"""`disco reproduce` on a small slice: the file's structure, the paper's column, numbers from the run."""

from __future__ import annotations

import json
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


# --- issue 14 item 4: the table under self-hosted replicas ------------------------------------------
SH_SMALL = ["reproduce", "--self-hosted", "--limit", "150", "--seeds", "0", "--budgets", "0.3,0.7",
            "--quiet", "--jobs", "1"]  # fmt: skip
SH_NUM = r"-?\d+\.\d ± \d+\.\d \[-?\d+\.\d, -?\d+\.\d\]"


def _sh_run(out: Path, *extra: str) -> tuple[str, dict, Path]:
    t = time.perf_counter()
    assert main([*SH_SMALL, "--out", str(out), *extra]) == 0
    assert time.perf_counter() - t < 30
    assert not (out / "paper.md").exists()  # the load-free tables are not re-run
    text = (out / "paper_selfhosted.md").read_text()
    return text, json.loads((out / "paper_selfhosted.json").read_text()), out


@pytest.fixture(scope="module")
def sh_runs(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("reproduce_selfhosted")
    return {"default": _sh_run(base / "a"), "heavier": _sh_run(base / "b", "--replicas", "8,1")}


def test_self_hosted_structure(sh_runs) -> None:
    text, data, _ = sh_runs["default"]
    for heading in ("# The DiSCo paper's TTFT table under self-hosted replicas",
                    "## Load levels (measured)", "## Tail (P99) TTFT reduction, self-hosted",
                    "## Mean TTFT reduction, self-hosted", "## Where DiSCo loses under load",
                    "## What changes against the API-service columns"):  # fmt: skip
        assert heading in text, heading
    assert "disco reproduce --self-hosted --limit 150" in text and "first 150 requests" in text
    assert "`llama3-8b-a10g`" in text and "(paper.md)" in text
    analysis = text.split("## What changes against the API-service columns")[1]
    assert "*Heavy* (5 replicas: server-only" in analysis and "(to be written" not in analysis
    for heading, paper_col in (("## Tail (P99) TTFT reduction, self-hosted", True),
                               ("## Mean TTFT reduction, self-hosted", False)):  # fmt: skip
        rows = _section_table(text, heading)
        assert {(r[0], r[1]) for r in rows} == {(r, d) for r in REGIMES for d in DEVICES}
        for r in rows:  # regime, device, [paper range], (a) and (b) of load-free, light, heavy
            assert len(r) == 2 + paper_col + 6
            if paper_col:
                pv = [v for (s, g, d), v in PAPER_TAIL.items() if g == REGIMES[r[0]] and d == DEVICES[r[1]]]
                assert r[2] == f"{min(pv):.2f} to {max(pv):.2f}"
            for cell in r[2 + paper_col:]:
                assert re.fullmatch(SH_NUM, cell), cell
    load = _section_table(text, "## Load levels (measured)")
    # 2 regimes x 2 loads x (single endpoint + 3 policies at b = 0.3, 3 at b = 0.7)
    assert len(load) == 2 * 2 * 7
    assert {(r[0], r[1], r[2]) for r in load} == {
        ("device-constrained", "light", "8"), ("device-constrained", "heavy", "5"),
        ("server-constrained", "light", "8"), ("server-constrained", "heavy", "3"),
    }  # fmt: skip
    # regimes x (load-free, light, heavy) x devices x (single endpoint + 3 policies x 2 budgets)
    assert len(data["rows"]) == 2 * 3 * 2 * (1 + 3 * 2)


def test_self_hosted_numbers_come_from_the_run(sh_runs) -> None:
    from disco.cluster.commands.reproduce_selfhosted import device_mean, index_rows, rerender

    text, data, out = sh_runs["default"]
    # the load table is the rows' mean over the two devices
    at = index_rows(data["rows"], tuple(data["budgets"]))
    m = device_mean(at, "heavy", "device", 0.3, (0,))
    line = next(r for r in _section_table(text, "## Load levels (measured)")
                if r[:5] == ["device-constrained", "heavy", "5", "disco", "0.3"])  # fmt: skip
    assert float(line[6]) == pytest.approx(m["disco"]["ttft_mean"], abs=1e-3)
    assert float(line[7]) == pytest.approx(m["disco"]["ttft_p99"], abs=1e-3)
    # the whole file re-renders from the rows the run wrote beside it
    assert rerender(out / "paper_selfhosted.json") == text
    # one replica for the heavy level: the heavy columns move, the light ones do not
    other = sh_runs["heavier"][0]
    a = _section_table(text, "## Tail (P99) TTFT reduction, self-hosted")
    b = _section_table(other, "## Tail (P99) TTFT reduction, self-hosted")
    dev_a = [r for r in a if r[0] == "device-constrained"]
    dev_b = [r for r in b if r[0] == "device-constrained"]
    assert [r[3:7] for r in dev_a] == [r[3:7] for r in dev_b]  # load-free, light
    assert [r[7:9] for r in dev_a] != [r[7:9] for r in dev_b]  # heavy
    heavy = [r for r in _section_table(other, "## Load levels (measured)")
             if r[0] == "device-constrained" and r[1] == "heavy" and r[3] == "server-only"]  # fmt: skip
    light = [r for r in _section_table(other, "## Load levels (measured)")
             if r[0] == "device-constrained" and r[1] == "light" and r[3] == "server-only"]  # fmt: skip
    assert float(heavy[0][10]) > float(light[0][10])  # waiting per replica: one replica queues


def test_self_hosted_bad_arguments_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["reproduce", "--replicas", "8,5", "--out", str(tmp_path)]) == 2
    assert "--replicas goes with --self-hosted" in capsys.readouterr().err
    assert main([*SH_SMALL, "--replicas", "5,8", "--out", str(tmp_path)]) == 2
    assert "the light level needs more replicas" in capsys.readouterr().err
    assert main([*SH_SMALL, "--budgets", "0,0.5", "--out", str(tmp_path)]) == 2
    assert "--budgets must be numbers in (0, 1)" in capsys.readouterr().err
    assert main(["reproduce", "--self-hosted", "no-such-preset", "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "paper_selfhosted.md").exists()
