"""Reading the device agents' /metrics counters around a run (disco.loadgen.counters)."""

from __future__ import annotations

import pytest

from disco.device_agents.telemetry import AgentMetrics
from disco.loadgen.counters import Reading, parse_metrics, read_all, run_counters
from disco.loadgen.mock_server import MockConfig, MockServer


def _metrics(**kw) -> AgentMetrics:
    return AgentMetrics(**kw)


def test_parse_reads_the_agents_own_rendering() -> None:
    m = _metrics(completed=5, failed=1, tokens_server=40, tokens_device=12, migrations=2,
                 failovers=1, server_cost_usd=0.25, device_energy_j=7.5)  # fmt: skip
    got = parse_metrics(m.render(labels='device_id="d-1"'))
    assert got is not None
    assert (got["completed"], got["failed"], got["migrations"], got["failovers"]) == (5, 1, 2, 1)
    assert (got["tokens_server"], got["tokens_device"]) == (40, 12)
    assert got["server_cost_usd"] == pytest.approx(0.25)
    assert got["device_energy_j"] == pytest.approx(7.5)


def test_parse_sums_a_page_of_several_devices_and_ignores_other_series() -> None:
    page = (
        _metrics(migrations=1, tokens_server=3).render(labels='device_id="a"')
        + _metrics(migrations=2, tokens_device=4).render(labels='device_id="b"')
        + "vllm:num_requests_running 3\n# a comment\n"
    )
    got = parse_metrics(page)
    assert got is not None and got["migrations"] == 3
    assert (got["tokens_server"], got["tokens_device"]) == (3, 4)
    assert parse_metrics("vllm:num_requests_running 3\n") is None


def test_run_counters_is_the_increase_or_says_why_not() -> None:
    before = Reading({"u": {"migrations": 1.0, "server_cost_usd": 0.5}})
    after = Reading({"u": {"migrations": 4.0, "server_cost_usd": 0.75}})
    got = run_counters(before, after, ["u"])
    assert isinstance(got, dict) and got["migrations"] == 3
    assert got["server_cost_usd"] == pytest.approx(0.25)
    assert "backwards" in run_counters(after, before, ["u"])
    assert "HTTP 404" in run_counters(Reading(problems={"u": "HTTP 404"}), after, ["u"])


def test_read_all_tells_an_agent_from_a_plain_server() -> None:
    with MockServer(MockConfig(metrics=True)) as agent, MockServer() as plain:
        a, p = agent.url, plain.url
        r = read_all([a, p, a])
    assert list(r.counters) == [a] and r.counters[a]["completed"] == 0
    assert "404" in r.problems[p]
