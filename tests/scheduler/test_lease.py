"""Budget leases: the holder's guard and the scheduler's book."""

from __future__ import annotations

import math

import pytest

from disco.scheduler.lease import Lease, LeaseBook, LeaseConfig, LeaseGuard


def lease(refill: float, lease_id: int = 1, expires_s: float = 6.0, cap: float = 1000.0) -> Lease:
    return Lease("h", lease_id, refill, cap, 0.3, 2.0, expires_s)


def test_guard_spends_while_its_bucket_is_positive_and_settles_to_actual_spend():
    g = LeaseGuard(0.3)
    assert not g.allows(100, 100, now=0.0) and g.self_funded == 1  # no lease, nothing seen
    g.renew(lease(1000.0), now=0.0)
    assert g.allows(600, 600, now=1.0)
    g.commit("a", 600, 600)
    assert g.allows(500, 500, now=1.0)  # 400 left: one plan may go into debt
    g.commit("b", 500, 500)
    assert not g.allows(10, 10, now=1.0) and g.denied == 2
    g.commit("c", 700, 0.0)  # planned without the constrained endpoint
    assert g.allows(10, 0.0, now=1.0)  # nothing to reserve: always
    g.settle("a", 0.0)  # the reservation was not spent (a hedge that never fired)
    assert g.balance(1.0) == pytest.approx(500.0)
    assert g.seen_total == 1800 and g.spent_total == 500.0


def test_the_bucket_refills_up_to_its_cap_and_hedges_settle_when_known():
    g = LeaseGuard(0.3)
    g.renew(lease(1000.0), now=0.0)
    g.commit("a", 800, 800)
    g.commit("h", 1000, 250)  # a hedge that fires one time in four
    g.renew(lease(500.0, lease_id=2), now=0.5)
    assert g.balance(0.5) == pytest.approx(450.0)  # -50 + 500
    g.renew(lease(5000.0, lease_id=3), now=1.0)
    assert g.balance(1.0) == pytest.approx(1000.0)  # never above one period's worth
    g.settle("a", 800.0)  # spent as reserved: nothing changes
    g.settle("h", 1000.0)  # it fired: the rest of its prompt is charged now
    assert g.balance(1.0) == pytest.approx(250.0)


def test_a_lapsed_lease_funds_itself_at_b():
    g = LeaseGuard(0.3)
    g.renew(lease(10_000.0, expires_s=6.0, cap=10_000.0), now=0.0)
    assert g.active(5.0) and not g.active(7.0)
    # 1,000 tokens seen and none spent: a 300-token start keeps the own share at 0.3 / 1.3k.
    g.commit("x", 1000, 0.0)
    assert g.allows(300, 300, now=10.0)
    assert not g.allows(1000, 1000, now=10.0)  # 1000 / 2000 > b + slack
    assert g.self_funded == 2


def test_book_shares_the_window_room_by_rate_and_counts_lost_leases():
    book = LeaseBook(0.3, LeaseConfig(period_s=2.0, headroom=0.25, expire_periods=3))
    book.report("a", 100, 0.0, 0.0, now=0.0)
    book.report("b", 300, 0.0, 0.0, now=0.0)
    for t in (1.0, 2.0, 3.0, 4.0):
        book.report("a", 100, 1000.0, 300.0, now=t)  # 1,000 prompt tokens/s
        book.report("b", 300, 3000.0, 900.0, now=t)  # 3,000 prompt tokens/s
    la = book.grant("a", 4.0, None, window_seen=1e6, window_spent=0.3e6)
    lb = book.grant("b", 4.0, None, window_seen=1e6, window_spent=0.3e6)
    assert lb.cap == pytest.approx(3 * la.cap, rel=0.05)
    # At most b + max_over_b of its rate, over bucket_s (10 s).
    assert la.cap <= (0.3 + 0.05) * 1000 * 10.0 * 1.01
    # Half a second later, half a second's worth.
    assert book.grant("a", 4.5, None, 1e6, 0.3e6).refill == pytest.approx(la.cap / 20, rel=0.05)
    # A window already over b + slack leaves no room: the leases shrink to nothing.
    assert book.grant("a", 5.0, None, 1e6, 0.4e6).cap == 0.0
    # "b" falls silent past 3 periods: its lease is lost once, and its rate leaves the room.
    book.report("a", 100, 1000.0, 300.0, now=11.0)
    gone = book.expire(11.0)
    assert gone == ["b"] and book.leases_lost == 1 and book.lost_allowance > 0
    assert book.stats()["holders_live"] == 1
    book.report("b", 300, 0.0, 0.0, now=12.0)
    assert book.revived == 1 and book.stats()["holders_live"] == 2


def test_book_edges_of_the_budget():
    assert math.isinf(_grant(1.0))
    assert _grant(0.0) == 0.0


def _grant(budget: float) -> float:
    book = LeaseBook(budget)
    book.report("a", 10, 100.0, 0.0, now=0.0)
    return book.grant("a", 0.0, None, 0.0, 0.0).refill


def test_lease_config_is_checked():
    with pytest.raises(ValueError):
        LeaseConfig(period_s=0)
    with pytest.raises(ValueError):
        LeaseConfig(headroom=-1)

