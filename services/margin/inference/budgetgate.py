"""What serving does once a tenant's serving budget for the period is spent, by the tenant's policy:

- ``reject`` (the default): RESOURCE_EXHAUSTED, saying what was spent of what;
- ``degrade``: the request is served by the cheapest ready variant of the same model that meets the request's
  quality floor (the cheapest of all when the request names none), even when it named a version or alias;
- ``throttle``: every row costs ``THROTTLE_FACTOR`` tokens of the tenant's rate limit, so it gets a tenth of
  its usual rate.

The spend is the budget service's (``GetSpend`` over gRPC with the platform's key): the allocated cost of the
tenant's share of its serving pools, idle replicas included, billed every metering interval. It is cached per tenant
for a short time so a request does not pay a call. When the budget service cannot be reached the gate stays open
(and says so in the log): serving does not stop because the accounting is down, and the fleet's replica time is
billed when it is back (the observer keeps its reports until they are taken).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from margin.common.costs import format_money
from margin.common.errors import MarginError, ResourceExhausted
from margin.sdk.budgets import BudgetsClient, remaining_for
from margin.v1 import budget_pb2

log = logging.getLogger(__name__)
THROTTLE_FACTOR = 10
SERVING = budget_pb2.SPEND_CATEGORY_SERVING


@dataclass(frozen=True)
class ServingBudget:
    exhausted: bool
    policy: str = "reject"
    spent_micros: int = 0
    limit_micros: int = 0
    remaining_micros: int | None = None  # what serving may still spend this period; None: no budget

    def refuse(self, tenant: str) -> ResourceExhausted:
        return ResourceExhausted(f"{tenant}'s serving budget for this period is spent "
                                 f"({format_money(self.spent_micros)} of {format_money(self.limit_micros)}); its "
                                 "policy is to reject — raise the budget, or set the policy to degrade or throttle")


OPEN = ServingBudget(exhausted=False)
POLICIES = {budget_pb2.EXHAUSTED_POLICY_DEGRADE: "degrade", budget_pb2.EXHAUSTED_POLICY_THROTTLE: "throttle"}


def serving_budget(report: budget_pb2.SpendReport) -> ServingBudget:
    """The serving part of a tenant's spend report: spent, its limit (the category's, else the total) and what is
    left (the smaller of the total's and the category's remainder)."""
    if not report.budget.HasField("total"):
        return OPEN
    total = report.budget.total.micros
    serving = next((line.amount.micros for line in report.by_category if line.key == "serving"), 0)
    limit = next((c.limit.micros for c in report.budget.category_limits if c.category == SERVING), None)
    left = remaining_for(report, "serving")
    policy = POLICIES.get(report.budget.exhausted_policy, "reject")
    return ServingBudget(left <= 0, policy, serving if limit is not None else report.spent.micros,
                         limit if limit is not None else total, left)


class BudgetGate:
    def __init__(self, budgets: BudgetsClient, ttl_s: float = 2.0, clock=time.monotonic):
        self._budgets, self._ttl, self._clock = budgets, ttl_s, clock
        self._cache: dict[str, tuple[float, ServingBudget]] = {}
        self._lock = threading.Lock()

    def cached(self, tenant: str) -> ServingBudget | None:
        """The tenant's status when a fresh one is cached (no call), else None."""
        with self._lock:
            cached = self._cache.get(tenant)
        return cached[1] if cached and self._clock() - cached[0] < self._ttl else None

    def status(self, tenant: str, fresh: bool = False) -> ServingBudget:
        cached = None if fresh else self.cached(tenant)
        if cached is not None:
            return cached
        now = self._clock()
        try:
            status = serving_budget(self._budgets.spend(tenant))
        except MarginError as err:  # cached like an answer, so a budget service that is down is not asked per request
            log.warning("cannot read %s's serving budget (%s): serving as if within it", tenant, err)
            status = OPEN
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[tenant] = (now, status)
        return status
