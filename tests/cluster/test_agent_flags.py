"""`disco agent`'s planning flags, without llama.cpp or Ray: what it plans with by default, and
the flags a scheduler would silently override, refused."""

from __future__ import annotations

import pytest

from disco.cluster.cli import build_parser, main
from disco.cluster.commands import agent as agent_cmd
from disco.scheduler.profiles import load_profile


def _args(*extra: str):
    return build_parser().parse_args(["agent", "--server", "http://127.0.0.1:9", *extra])


@pytest.mark.parametrize(
    "flags", [["--budget", "0.3"], ["--regime", "device"], ["--server-profile", "gpt-4o"],
              ["--budget", "0.3", "--regime", "server"]],
)  # fmt: skip
def test_scheduler_with_its_own_settings_is_refused_in_one_line(capsys, flags):
    # Refused before anything connects (the address is not even a Ray cluster).
    code = main(["agent", "--server", "http://127.0.0.1:9", "--scheduler", "10.9.9.9:1", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "cannot be combined with --scheduler" in err[0] and flags[0] in err[0]


def test_without_a_scheduler_the_local_disco_policy_plans_at_a_stated_budget():
    args = _args()
    line = agent_cmd.local_defaults(args)
    assert line == "local policy disco (regime server, budget 0.5)"
    sp, dp = load_profile(args.server_profile, "server"), load_profile(args.device_profile, "device")
    planner = agent_cmd.local_planner(args, sp, dp)
    assert planner.policy.name == "disco" and planner.policy.config.budget == 0.5


def test_local_flags_are_kept():
    args = _args("--policy", "length", "--budget", "0.2", "--regime", "device")
    assert agent_cmd.local_defaults(args) == "local policy length (regime device, budget 0.2)"


def test_the_default_model_is_the_small_device_model():
    assert _args().model is None  # None: resolve_model's default
    from disco.device_agents.config import AgentConfig
    from disco.device_agents.models import DEFAULT_DEVICE_MODEL

    assert AgentConfig().model is None and DEFAULT_DEVICE_MODEL == "smollm2-135m"
    assert "smollm2-135m" in build_parser()._subparsers._group_actions[0].choices[
        "agent"].format_help()  # fmt: skip
