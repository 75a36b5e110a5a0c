from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from disco.scheduler.migration import MigrationConfig, decide_migration, decide_migration_batch
from disco.scheduler.profiles import DEVICE_PROFILES, SERVER_PROFILES
from disco.scheduler.types import EndpointKind, MigrationRule

SERVER = SERVER_PROFILES.get("command")
DEVICE = DEVICE_PROFILES.get("xiaomi14-qwen0.5b")
TO_DEVICE = MigrationRule(target=EndpointKind.DEVICE, from_kind=EndpointKind.SERVER)
TO_SERVER = MigrationRule(target=EndpointKind.SERVER, from_kind=EndpointKind.DEVICE)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([TO_DEVICE, TO_SERVER]),
    st.lists(st.integers(1, 5000), min_size=1, max_size=8),
    st.lists(st.floats(0, 3000), min_size=8, max_size=8),
    st.floats(0.5, 10),
    st.lists(st.booleans(), min_size=8, max_size=8),
    st.lists(st.floats(0, 5), min_size=8, max_size=8),
)
def test_batch_decision_equals_scalar(rule, prompts, remaining, read_tps, warm, ready) -> None:
    cfg = MigrationConfig(read_tps=read_tps)
    k = len(prompts)
    rem = np.array(remaining[:k])
    batch = decide_migration_batch(
        rule, np.array(prompts, float), 1, rem, SERVER, DEVICE, cfg, np.array(warm[:k]), np.array(ready[:k])
    )
    for i, p in enumerate(prompts):
        d = decide_migration(
            rule, rule.from_kind, p, 1, float(rem[i]), SERVER, DEVICE, cfg,
            target_prefilled=warm[i], target_ready_s=ready[i],
        )  # fmt: skip
        assert d.migrate == bool(batch.migrate[i])
        if d.migrate:
            assert d.at_index == int(batch.at_index[i])
            assert np.isclose(d.saving_usd, batch.saving_usd[i])


def test_server_win_migrates_to_cheaper_device_when_many_tokens_remain() -> None:
    d = decide_migration(TO_DEVICE, EndpointKind.SERVER, 200, 1, 2000, SERVER, DEVICE)
    assert d.migrate and d.target is EndpointKind.DEVICE and d.saving_usd > 0
    # The switch waits for the buffer B = r_c * t_m and for the target's prefill.
    assert d.at_index >= np.ceil(d.overhead_s / SERVER.tbt_s)
    short = decide_migration(TO_DEVICE, EndpointKind.SERVER, 200, 1, 10, SERVER, DEVICE)
    assert not short.migrate
    other = decide_migration(TO_DEVICE, EndpointKind.DEVICE, 200, 1, 2000, SERVER, DEVICE)
    assert not other.migrate  # the rule only moves a server win


def test_a_warm_race_loser_is_a_cheaper_and_faster_target() -> None:
    cold = decide_migration(TO_DEVICE, EndpointKind.SERVER, 2000, 1, 600, SERVER, DEVICE)
    warm = decide_migration(
        TO_DEVICE, EndpointKind.SERVER, 2000, 1, 600, SERVER, DEVICE, target_prefilled=True
    )
    assert warm.migrate
    assert warm.overhead_s < cold.overhead_s
    assert warm.saving_usd > cold.saving_usd
    assert cold.at_index is None or warm.at_index < cold.at_index
