"""Open-loop pacing: a slow response holds one user, never the schedule."""

from __future__ import annotations

import threading
import time

import pytest

from disco.loadgen.pacer import Pacer


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, dt: float) -> None:
        self.now += dt


def test_slots_are_handed_out_once_in_order() -> None:
    p = Pacer([0.0, 0.5, 0.5, 2.0], clock=FakeClock())
    p.start()
    slots = [p.claim() for _ in range(5)]
    assert [s.index for s in slots[:4]] == [0, 1, 2, 3]
    assert slots[4] is None and p.exhausted
    with pytest.raises(ValueError):
        Pacer([1.0, 0.5])


def test_wait_sleeps_until_due_on_a_fake_clock() -> None:
    clock = FakeClock()
    p = Pacer([0.0, 1.25], clock=clock)
    p.start()
    s0, s1 = p.claim(), p.claim()
    assert p.wait(s0, clock.sleep) == 0.0
    assert p.wait(s1, clock.sleep) == pytest.approx(1.25)
    assert p.sent(s1, clock()) == pytest.approx(0.0)


def test_slow_response_does_not_delay_the_next_send() -> None:
    """Two users, three requests 0.1 s apart; request 0 takes 1.5 s to answer. Open loop: requests
    1 and 2 still go out before request 0's response ends (a closed loop would wait for it)."""
    p = Pacer([0.0, 0.1, 0.2])
    p.start()
    sent: dict[int, float] = {}
    done: dict[int, float] = {}

    def user() -> None:
        while (slot := p.claim()) is not None:
            sent[slot.index] = p.wait(slot, time.sleep)
            p.sent(slot, sent[slot.index])
            time.sleep(1.5 if slot.index == 0 else 0.01)  # the response
            done[slot.index] = time.monotonic()

    threads = [threading.Thread(target=user) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(sent) == [0, 1, 2]
    assert sent[1] < done[0] and sent[2] < done[0]
    assert sent[0] <= sent[1] <= sent[2]


def test_too_few_users_are_reported_as_falling_behind() -> None:
    clock = FakeClock()
    warnings: list[str] = []
    p = Pacer([0.0, 0.1, 0.2], clock=clock, late_s=0.05, warn=warnings.append)
    p.start()
    # One user: request 0's response takes 1 s, so requests 1 and 2 go out late.
    for slot in iter(p.claim, None):
        claimed = clock()
        p.sent(slot, p.wait(slot, clock.sleep), claimed)
        clock.sleep(1.0)
    st = p.stats()
    assert st.sent == 3 and st.late == 2 and st.late_no_user == 2
    assert st.max_lag_s == pytest.approx(1.8)
    assert len(warnings) == 1 and "add users" in warnings[0]  # rate-limited


def test_a_late_wake_up_is_blamed_on_the_cpu() -> None:
    clock = FakeClock()
    warnings: list[str] = []
    p = Pacer([0.5], clock=clock, warn=warnings.append)
    p.start()
    slot = p.claim()
    clock.sleep(0.6)  # claimed at 0, woken 100 ms after the due time
    p.sent(slot, clock(), claimed_at=0.0)
    st = p.stats()
    assert st.late == 1 and st.late_no_user == 0
    assert "CPU" in warnings[0]
