from __future__ import annotations

from disco.scheduler.report import claim_failures, format_table


def _row(policy, b, mean, p99, used):
    return {"policy": policy, "budget": b, "migration": False, "ttft_mean": mean,
            "ttft_p99": p99, "budget_used": used}  # fmt: skip


def test_claim_failures_compare_only_feasible_baselines() -> None:
    rows = [
        _row("disco", 0.5, 1.05, 3.0, 0.5),
        _row("oracle", 0.5, 1.0, 2.9, 0.5),
        _row("race", 0.5, 0.9, 2.0, 1.0),  # infeasible at b = 0.5: ignored
        _row("length", 0.5, 1.2, 3.1, 0.49),
    ]
    assert claim_failures(rows, [0.5]) == {0.5: []}
    rows[3]["ttft_p99"] = 2.95
    rows[1]["ttft_mean"] = 0.9
    fails = claim_failures(rows, [0.5])[0.5]
    assert fails == ["P99 3.000 > length 2.950", "mean +16.7% vs oracle"]


def test_format_table_lines_up() -> None:
    text = format_table([_row("disco", 0.5, 1.0, 3.0, 0.5) | {"migrations": 3, "tbt_p99": None}])
    head, line = text.splitlines()
    assert len(head) == len(line) and "disco" in line and " - " in line
