"""The allocation of a pool's bill (margin.budget.fleet.allocation): every micro to someone, exactly, by each idle
policy, with fractions of a micro carried forward and never dropped."""
from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from margin.budget.fleet.allocation import (
    PLATFORM,
    Consumer,
    allocate,
    exact_shares,
    pool_bill,
    round_with_carry,
)

PRICE = 170_000  # cpu: $0.17 per replica-hour


def test_the_bill_is_replica_time_times_price_and_its_fraction_is_carried():
    bill, carry = pool_bill(15_000_000, PRICE)  # 15 replica-seconds at $0.17/h = 708.33 µ$
    assert (bill, carry) == (708, Fraction(1, 3))
    total, carry = 0, Fraction(0)
    for _ in range(3):
        bill, carry = pool_bill(15_000_000, PRICE, carry)
        total += bill
    assert (total, carry) == (2125, 0)  # 3 × 708⅓ exactly, not 3 × 708


def test_usage_splits_the_whole_bill_by_compute_time():
    shares, basis = exact_shares(900, 15_000_000, [Consumer("a", compute_ns=2_000_000_000),
                                                   Consumer("b", compute_ns=1_000_000_000, reserved_us=15_000_000)],
                                 "usage")
    assert basis == "usage" and shares == {"a": 600, "b": 300, PLATFORM: 0}


def test_usage_with_no_compute_splits_by_reserved_time_and_with_nothing_goes_to_the_platform():
    shares, basis = exact_shares(900, 15_000_000, [Consumer("a", reserved_us=15_000_000),
                                                   Consumer("b", reserved_us=30_000_000)], "usage")
    assert basis == "reservation" and shares == {"a": 300, "b": 600, PLATFORM: 0}
    shares, basis = exact_shares(900, 15_000_000, [Consumer("a")], "usage")
    assert basis == "none" and shares == {"a": 0, PLATFORM: 900}


def test_reservation_ignores_usage():
    shares, _ = exact_shares(900, 15_000_000, [Consumer("a", compute_ns=10**9, reserved_us=1),
                                               Consumer("b", reserved_us=2)], "reservation")
    assert shares == {"a": 300, "b": 600, PLATFORM: 0}


def test_platform_policy_charges_the_usage_share_of_replica_time_and_keeps_the_rest():
    # 1.5 s of compute in 15 replica-seconds: a tenth of the bill; the rest is the platform's idle line
    shares, basis = exact_shares(900, 15_000_000, [Consumer("a", compute_ns=1_500_000_000)], "platform")
    assert basis == "platform" and shares == {"a": 90, PLATFORM: 810}
    # compute beyond the replica time (several model instances) is scaled to all of the bill, never more
    shares, _ = exact_shares(900, 1_000_000, [Consumer("a", compute_ns=3 * 10**9), Consumer("b", compute_ns=10**9)],
                             "platform")
    assert shares == {"a": 675, "b": 225, PLATFORM: 0}


def test_a_steady_small_share_is_billed_its_exact_total_never_zero():
    """The defect of per-entry round(): 0.3 µ$ an interval rounded to 0 every time. With the carry the party's
    total stays within one micro of its exact share."""
    carries: dict = {}
    bill_carry = Fraction(0)
    total = exact = 0
    for _ in range(1000):
        result = allocate(1_000_000, PRICE, [Consumer("small", compute_ns=6_350_000),
                                             Consumer("big", compute_ns=1_000_000_000)], "platform", carries,
                          bill_carry)
        carries, bill_carry = result.carries, result.bill_carry
        total += result.micros["small"]
        exact += result.shares["small"]
        assert sum(result.micros.values()) == result.bill
    assert total > 0 and abs(total - exact) < 1


def test_a_departed_partys_carry_goes_to_the_platform_not_lost():
    micros, carries = round_with_carry({"a": Fraction(5), PLATFORM: Fraction(5)}, {"gone": Fraction(1, 2),
                                                                                  PLATFORM: Fraction(1, 4)}, 10)
    assert sum(micros.values()) == 10 and carries[PLATFORM] + carries["a"] == Fraction(3, 4)


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        exact_shares(1, 1, [], "cheapest")
    with pytest.raises(ValueError):
        exact_shares(1, 1, [Consumer("a"), Consumer("a")], "usage")
    with pytest.raises(ValueError):
        exact_shares(1, 1, [Consumer("a", compute_ns=-1)], "usage")
    with pytest.raises(ValueError):
        pool_bill(-1, PRICE)


consumers = st.lists(st.tuples(st.integers(0, 10**12), st.integers(0, 10**8)), min_size=0, max_size=6)


@settings(max_examples=300, deadline=None, derandomize=True)  # the same 300 histories every run
@given(intervals=st.lists(st.tuples(st.integers(0, 10**9), consumers), min_size=1, max_size=25),
       policy=st.sampled_from(["usage", "reservation", "platform"]), price=st.integers(0, 100_000_000))
def test_every_interval_sums_to_its_bill_and_every_party_stays_within_a_micro(intervals, policy, price):
    carries: dict = {}
    bill_carry = Fraction(0)
    billed = Fraction(0)
    exact_bill = Fraction(0)
    got: dict[str, int] = {}
    owed: dict[str, Fraction] = {}
    for replica_us, used in intervals:
        parties = [Consumer(f"d{i}", c, r) for i, (c, r) in enumerate(used)]
        result = allocate(replica_us, price, parties, policy, carries, bill_carry)
        carries, bill_carry = result.carries, result.bill_carry
        assert sum(result.micros.values()) == result.bill  # the ledger equals the bill, every interval
        assert all(m >= 0 for m in result.micros.values())
        billed += result.bill
        exact_bill += Fraction(replica_us * price, 3_600_000_000)
        for gone in set(got) - set(result.micros):  # a party that left: its carry went to the platform's line
            del got[gone], owed[gone]
        for key, m in result.micros.items():
            got[key] = got.get(key, 0) + m
            owed[key] = owed.get(key, Fraction(0)) + result.shares[key]
    assert 0 <= exact_bill - billed < 1
    # every party's total since it (last) came is its exact share less its carry, and carries are less than a micro
    # (or two, summed)
    for key in got:
        if key != PLATFORM and key in carries:
            assert abs(got[key] - owed[key]) < 1 + 1e-12
    assert sum(carries.values(), Fraction(0)) == 0
