"""What serving does once a tenant's serving budget for the period is spent, by the tenant's policy:

- ``reject`` (the default): RESOURCE_EXHAUSTED, saying what was spent of what;
- ``degrade``: the request is served by the cheapest ready variant of the same model that meets the request's
  quality floor (the cheapest of all when the request names none), even when it named a version or alias;
- ``throttle``: every row costs ``THROTTLE_FACTOR`` tokens of the tenant's rate limit, so it gets a tenth of
  its usual rate.

The budget is read from the one ledger through :class:`~margin.budget.store.BudgetStore`, cached per tenant for
a short time so a request does not pay a database query; the gateway's own meter writes the ledger every second,
so enforcement lags the spend by about that much.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from margin.budget.store import BudgetStore
from margin.common.costs import format_money
from margin.common.errors import ResourceExhausted

THROTTLE_FACTOR = 10


@dataclass(frozen=True)
class ServingBudget:
    exhausted: bool
    policy: str = "reject"
    spent_micros: int = 0
    limit_micros: int = 0

    def refuse(self, tenant: str) -> ResourceExhausted:
        return ResourceExhausted(f"{tenant}'s serving budget for this period is spent "
                                 f"({format_money(self.spent_micros)} of {format_money(self.limit_micros)}); its "
                                 "policy is to reject — raise the budget, or set the policy to degrade or throttle")


OPEN = ServingBudget(exhausted=False)


class BudgetGate:
    def __init__(self, budgets: BudgetStore, ttl_s: float = 2.0, clock=time.monotonic):
        self._budgets, self._ttl, self._clock = budgets, ttl_s, clock
        self._cache: dict[int, tuple[float, ServingBudget]] = {}
        self._lock = threading.Lock()

    def cached(self, tenant_id: int) -> ServingBudget | None:
        """The tenant's status when a fresh one is cached (no database query), else None."""
        with self._lock:
            cached = self._cache.get(tenant_id)
        return cached[1] if cached and self._clock() - cached[0] < self._ttl else None

    def status(self, tenant_id: int) -> ServingBudget:
        cached = self.cached(tenant_id)
        if cached is not None:
            return cached
        now = self._clock()
        spend = self._budgets.spend(tenant_id)
        left = spend.remaining_for("serving")
        if left is None or left > 0:
            status = OPEN
        else:
            serving = next((line.micros for line in spend.by_category if line.key == "serving"), 0)
            limit = spend.budget.limit("serving")
            status = ServingBudget(True, spend.budget.policy, serving if limit is not None else spend.spent_micros,
                                   limit if limit is not None else spend.budget.total_micros)
        with self._lock:
            self._cache[tenant_id] = (now, status)
        return status
