"""`disco status`: the planning line (issue 11)."""

from __future__ import annotations


def test_disco_status_renders_the_publishers_status():
    """`disco status` shows snapshot planning from the publisher's own status keys."""
    from disco.cluster.commands.status import _planning
    from disco.scheduler.policies import PolicyConfig, make_policy
    from disco.scheduler.profiles import DEVICE_PROFILES, SERVER_PROFILES
    from disco.scheduler.publisher import SnapshotPublisher

    policy = make_policy("length", PolicyConfig(budget=0.3), SERVER_PROFILES.get("gpt-4o-mini"),
                         DEVICE_PROFILES.get("xiaomi14-qwen0.5b"))  # fmt: skip
    pub = SnapshotPublisher(policy)
    pub.sync({"holder": "fleet0", "devices": 500, "seq": 1}, 0.0, 0.0)
    line = _planning({"planning": "snapshot", "snapshots": pub.status()})
    assert line.startswith("snapshot; snapshot v1") and "1 of 1 holders (500 devices)" in line
    assert _planning({"planning": "central", "snapshots": None}) == "central (no snapshot sync yet)"
