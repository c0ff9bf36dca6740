"""Allocation of a pool's bill: every micro of it goes to someone, exactly. Pure: no clock, no I/O.

A pool's bill for one metering interval is its live replica time × the price of its device class
(:func:`pool_bill`). It is split among *parties* — the deployments served by the pool (and through them their
tenants), or the jobs that ran on a worker — and :data:`PLATFORM`, the platform's idle line, by the idle policy
(:func:`exact_shares`), as OpenCost and Kubecost split a node's idle cost:

``usage`` (the default)
    the whole interval's bill split by each deployment's Triton compute time; an interval with no compute at all
    is split by each deployment's reserved replica time; with neither, it is the platform's.
``reservation``
    split by reserved replica time (dedicated-endpoint billing, like SageMaker); none reserved: the platform's.
``platform``
    each deployment pays its usage share of the replica time (its compute time / the replica time; all of it at
    most), the idle remainder stays on the platform's line.

Worker pools use ``platform`` whatever the setting: each job's share is its busy time / the replica time (jobs
are billed their device-seconds by their own entries), the idle remainder is the platform's.

The bill and the shares are exact rationals. Whole micros come from :func:`round_with_carry`: each party's target
is its exact share plus what it was owed (or overpaid) from earlier intervals — its *carry* — floored, and the
micros left over go to the largest remainders (Hamilton's method). So, per interval, the parts sum to the bill to
the micro; and over time each party's total stays within one micro of the exact sum of its shares: a fraction of a
micro is carried forward, never dropped. The bill itself is rounded the same way (:func:`pool_bill`): the
running total billed is the floor of the exact running total.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction

POLICIES = ("usage", "reservation", "platform")
PLATFORM = "platform"
MICROSECONDS_PER_HOUR = 3_600_000_000


@dataclass(frozen=True)
class Consumer:
    """One party's use of the pool over the interval: ``compute_ns`` of execution time (Triton's per-model
    statistics, or a job's busy time) and ``reserved_us`` of reserved replica time."""
    key: str
    compute_ns: int = 0
    reserved_us: int = 0


@dataclass(frozen=True)
class Allocation:
    bill: int                          # whole micros billed for the interval
    bill_carry: Fraction               # the bill's fraction of a micro carried to the next interval
    micros: dict[str, int]             # party (and PLATFORM) -> whole micros; sums to ``bill``
    carries: dict[str, Fraction]       # party (and PLATFORM) -> carry after this interval
    shares: dict[str, Fraction]        # party (and PLATFORM) -> exact share of ``bill``
    basis: str                         # what the split went by: "usage", "reservation", "platform" or "none"


def pool_bill(replica_us: int, price_micros_per_hour: int, carry: Fraction = Fraction(0)) -> tuple[int, Fraction]:
    """The interval's bill in whole micros and the carry: floor(replica time × price + carry)."""
    if replica_us < 0 or price_micros_per_hour < 0:
        raise ValueError("replica time and price are never negative")
    exact = Fraction(replica_us * price_micros_per_hour, MICROSECONDS_PER_HOUR) + carry
    whole = math.floor(exact)
    return whole, exact - whole


def exact_shares(bill: int, replica_us: int, consumers: Iterable[Consumer], policy: str) -> tuple[dict, str]:
    """Each consumer's exact share of ``bill`` (and :data:`PLATFORM`'s), by ``policy``; they sum to ``bill``.
    Returns (shares, basis)."""
    if policy not in POLICIES:
        raise ValueError(f"idle policy must be one of {list(POLICIES)}, got {policy!r}")
    consumers = list(consumers)
    if len({c.key for c in consumers}) != len(consumers) or any(c.key == PLATFORM for c in consumers):
        raise ValueError("consumer keys must be distinct and not the platform's")
    if any(c.compute_ns < 0 or c.reserved_us < 0 for c in consumers):
        raise ValueError("compute and reserved time are never negative")
    shares: dict[str, Fraction] = {c.key: Fraction(0) for c in consumers}
    used = sum(c.compute_ns for c in consumers)
    reserved = sum(c.reserved_us for c in consumers)
    basis = "none"
    if policy == "platform":
        capacity = replica_us * 1000  # ns of replica time
        if used and capacity:
            scale = Fraction(bill, max(used, capacity))  # all of the bill at most, when compute exceeds it
            for c in consumers:
                shares[c.key] = c.compute_ns * scale
            basis = "platform"
    elif policy == "usage" and used:
        for c in consumers:
            shares[c.key] = Fraction(bill * c.compute_ns, used)
        basis = "usage"
    elif reserved:
        for c in consumers:
            shares[c.key] = Fraction(bill * c.reserved_us, reserved)
        basis = "reservation"
    shares[PLATFORM] = bill - sum(shares.values(), Fraction(0))
    return shares, basis


def round_with_carry(shares: Mapping[str, Fraction], carries: Mapping[str, Fraction], total: int) \
        -> tuple[dict[str, int], dict[str, Fraction]]:
    """Whole micros for each party, summing to ``total``: floor(share + carry), never below 0, then the micros
    left over (or owed back) by the largest (smallest) remainders; and each party's new carry. A carry of a party
    not in ``shares`` is handed to :data:`PLATFORM` (it must be among ``shares``), so no fraction is lost."""
    if PLATFORM not in shares:
        raise ValueError("the platform is always a party")
    carry = {k: Fraction(carries.get(k, 0)) for k in shares}
    carry[PLATFORM] += sum((Fraction(v) for k, v in carries.items() if k not in shares), Fraction(0))
    target = {k: shares[k] + carry[k] for k in shares}
    micros = {k: max(0, math.floor(t)) for k, t in target.items()}
    left = total - sum(micros.values())
    while left:
        if left > 0:  # most owed first
            order = sorted(target, key=lambda k: (micros[k] - target[k], k))
            step = 1
        else:         # most overpaid first, among those with micros to give back
            order = sorted((k for k in target if micros[k] > 0), key=lambda k: (target[k] - micros[k], k))
            step = -1
            if not order:
                raise ValueError(f"cannot allocate {total} micros: nothing to take back")
        for k in order[:abs(left)]:
            micros[k] += step
            left -= step
    return micros, {k: target[k] - micros[k] for k in target}


def allocate(replica_us: int, price_micros_per_hour: int, consumers: Iterable[Consumer], policy: str,
             carries: Mapping[str, Fraction] | None = None, bill_carry: Fraction = Fraction(0)) -> Allocation:
    """One pool interval: the bill (:func:`pool_bill`), each party's exact share (:func:`exact_shares`) and whole
    micros (:func:`round_with_carry`)."""
    bill, next_bill_carry = pool_bill(replica_us, price_micros_per_hour, bill_carry)
    shares, basis = exact_shares(bill, replica_us, consumers, policy)
    micros, next_carries = round_with_carry(shares, carries or {}, bill)
    return Allocation(bill, next_bill_carry, micros, next_carries, shares, basis)


def split_exact(amount: Fraction, carry: Fraction = Fraction(0)) -> tuple[int, Fraction]:
    """Whole micros of a single running amount (revenue of one line): floor(amount + carry), and the new carry."""
    exact = amount + carry
    whole = math.floor(exact)
    return whole, exact - whole
