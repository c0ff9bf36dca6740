"""The autoscaler's planner over a real SQLite database: one snapshot per tick (no dependence on the order of the
deployments), burn rates from the allocated ledger, scale to zero and the pool's floor."""
from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from margin.budget.autoscaler.planner import Planner
from margin.budget.fleet.tables import ServingDeploymentRow
from margin.budget.store import Budget, BudgetStore
from margin.common.db import make_engine, make_sessionmaker
from margin.common.ledger import LedgerEntry, append_entries
from margin.common.tenancy import TenantStore

NOW = datetime(2026, 11, 15, 12, tzinfo=UTC)
PRICE = 170_000  # µ$ per replica-hour
# tenant, deployment, min, max, capacity: two idle deployments of one tenant whose budget pays for about one replica
# for the rest of the month, a third that burns, and another tenant's
ROWS = [("acme", "a-v1", 1, 4, 100.0), ("acme", "b-v1", 1, 4, 100.0), ("acme", "c-v1", 0, 4, 50.0),
        ("other", "d-v1", 1, 2, 10.0)]


def planner_over(tmp_path, order: tuple[int, ...], states: dict[str, str] | None = None,
                 apply=None) -> tuple[Planner, dict[str, int]]:
    """A planner over a fresh database whose deployments were inserted in ``order`` (so their ids, and the order
    the planner reads them in, follow it), with acme's budget and allocated serving entries of the last minutes."""
    engine = make_engine(f"sqlite:///{tmp_path / ('db-' + '-'.join(map(str, order)) + '.db')}")
    sessions = make_sessionmaker(engine)
    tenants, budgets = TenantStore(sessions), BudgetStore(sessions, interval_s=15)
    ids = {name: tenants.create_tenant(name).id for name in ("acme", "other")}
    start = NOW.replace(day=1, hour=0)
    budgets.set_budget(Budget(tenant_id=ids["acme"], period="monthly", total_micros=(PRICE * 24 * 16 * 3) // 2))
    entries = [LedgerEntry(f"e{i}", ids["acme"], "serving", 2_000_000, deployment="a-v1", created_at=start
                           + timedelta(hours=i)) for i in range(3)]
    entries += [LedgerEntry(f"burn{i}", ids["acme"], "serving", 3_000, deployment="c-v1",
                            created_at=NOW - timedelta(seconds=15 * i)) for i in range(1, 11)]
    append_entries(sessions, entries)
    with sessions.begin() as s:
        for i in order:
            tenant, name, minimum, maximum, capacity = ROWS[i]
            s.add(ServingDeploymentRow(tenant_id=ids[tenant], name=name, triton_name=f"t{ids[tenant]}--{name}",
                                       model=name[0], version=1, state=(states or {}).get(name, "READY"),
                                       device_class="cpu", min_replicas=minimum, max_replicas=maximum,
                                       capacity_rps=capacity, price_micros_per_hour=PRICE))
    targets = {"cpu": "margin-triton-cpu"} if apply else None
    return Planner(sessions, budgets, "", "hpa" if apply else "report-only", apply,
                   clock=lambda: NOW.timestamp(), targets=targets), ids


def decisions(planner: Planner) -> dict[str, tuple]:
    return {p.deployment: (p.chosen, p.affordable, p.demand, p.reason) for p in planner.tick()}


def test_decisions_do_not_depend_on_the_order_of_the_deployments(tmp_path):
    """Every order of the rows, two ticks each (the second reads the first's replica counts): the same plans. Before
    the snapshot, a deployment's 'others' read what the same tick had just chosen for the one before it."""
    seen = None
    for order in itertools.permutations(range(len(ROWS))):
        planner, _ = planner_over(tmp_path, order)
        first, second = decisions(planner), decisions(planner)
        if seen is None:
            seen = (first, second)
            # the two idle deployments are alike, so they are planned alike
            assert first["a-v1"][0] == first["b-v1"][0] and second["a-v1"][0] == second["b-v1"][0]
        assert (first, second) == seen, f"order {order} planned differently"


def test_the_other_deployments_burn_is_their_allocated_cost(tmp_path):
    planner, ids = planner_over(tmp_path, (0, 1, 2, 3))
    burn = planner.budgets.serving_burn(ids["acme"], NOW)
    # c-v1: 10 entries of 3,000 µ$ covering the 150 s from one interval before the first to the last: 720,000 µ$/h
    assert burn["c-v1"] == 30_000 * 3600 // 150
    assert "a-v1" not in burn  # its entries are hours old: no burn now, whatever it spent earlier


def test_a_scaled_to_zero_deployment_is_planned_at_zero_and_its_pool_floor_follows(tmp_path):
    applied: list[tuple[str, int, int]] = []

    def apply(pool: str, replicas: int, reason: str, minimum: int) -> bool:
        applied.append((pool, replicas, minimum))
        return True

    asleep = dict.fromkeys(("a-v1", "b-v1", "c-v1", "d-v1"), "SCALED_TO_ZERO")
    planner, _ = planner_over(tmp_path, (0, 1, 2, 3), asleep, apply)
    plans = {p.deployment: p for p in planner.tick()}
    assert {p.chosen for p in plans.values()} == {0} and all(p.reason.startswith("scaled to zero") for p in
                                                             plans.values())
    assert applied == [("margin-triton-cpu", 0, 0)]  # every deployment of the pool at zero: the pool's floor is 0

    planner, _ = planner_over(tmp_path, (3, 2, 1, 0), {**asleep, "c-v1": "LOADING"}, apply)
    plans = {p.deployment: p for p in planner.tick()}
    assert plans["c-v1"].chosen >= 1 and plans["c-v1"].state == "LOADING"
    assert applied[-1] == ("margin-triton-cpu", 1, 1)  # a cold start wakes the pool
