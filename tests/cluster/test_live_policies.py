"""A simulation-only policy (the oracle: it needs each request's server TTFT in advance) is refused
wherever a policy plans live requests, with one line, before anything starts."""

from __future__ import annotations

import pytest
from needs import require

from disco.cluster.cli import main
from disco.cluster.config import SchedulerConfig
from disco.cluster.resolve import (
    OfflinePolicyError,
    build_live_policy,
    check_live_policy,
    policy_names,
)
from disco.scheduler.policies.base import PolicyConfig
from disco.scheduler.policies.oracle import Oracle
from disco.scheduler.profiles import DEVICE_PROFILES, SERVER_PROFILES


def oracle_factory(config, server, device):  # a ``module:factory`` that hides the class
    return Oracle(config, server, device)


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_only_the_oracle_is_offline():
    offline = [name for name in policy_names() if _refused(name)]
    assert offline == ["oracle"]


def _refused(name: str) -> bool:
    try:
        check_live_policy(name)
    except OfflinePolicyError:
        return True
    return False


def test_a_factory_that_builds_an_oracle_is_refused_too():
    sp, dp = SERVER_PROFILES.get("gpt-4o-mini"), DEVICE_PROFILES.get("xiaomi14-qwen0.5b")
    with pytest.raises(OfflinePolicyError, match="disco sim"):
        build_live_policy("test_live_policies:oracle_factory", PolicyConfig(), sp, dp)
    assert build_live_policy("disco", PolicyConfig(), sp, dp).name == "disco"


def test_the_scheduler_actor_refuses_it():
    require("ray")  # the actor module imports Ray; the check itself does not
    from disco.cluster.scheduler_actor import policy_from_config, start_scheduler

    cfg = SchedulerConfig(policy="oracle", checkpoint="none")
    with pytest.raises(OfflinePolicyError):
        policy_from_config(cfg)
    with pytest.raises(OfflinePolicyError):  # in the caller, before any actor exists
        start_scheduler(cfg)


def test_disco_serve_refuses_it_before_connecting(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("scheduler:\n  policy: oracle\nray:\n  address: 127.0.0.1:1\n")
    assert main(["serve", "--config", str(p)]) == 2
    line = one_line_error(capsys)
    assert line.startswith("disco serve: error: policy 'oracle'") and "disco sim" in line


def test_disco_agent_refuses_it(capsys):
    code = main(["agent", "--server", "http://127.0.0.1:1", "--policy", "oracle", "--port", "9"])
    assert code == 2
    assert "policy 'oracle' needs each request's server TTFT" in one_line_error(capsys)


def test_disco_demo_refuses_it(tmp_path, capsys):
    code = main(["demo", "--quick", "--policies", "disco,oracle", "--out", str(tmp_path)])
    assert code == 2
    assert "policy 'oracle'" in one_line_error(capsys)
