"""What the fleet's ledger lines say, read back: the fleet view (each pool's bill, allocated, idle, utilization) and
the margin view (revenue, allocated cost and gross margin per tenant and model, with the platform's idle line).

Money comes from the ledger (the authority); replica time and utilization from the billed intervals behind it.
Both read entries dated in ``[since, until)`` — an entry is dated at the end of its metering interval.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import sessionmaker

from margin.budget.fleet import prices
from margin.budget.fleet.tables import FleetIntervalRow
from margin.common.ledger import LedgerRow
from margin.common.tenancy import as_utc

SERIES_BUCKETS = 48


@dataclass(frozen=True)
class PoolLine:
    pool: str
    kind: str
    device_class: str
    replica_seconds: float
    price_micros_per_hour: int
    bill_micros: int
    allocated_micros: int
    idle_micros: int
    utilization: float
    intervals: int
    replicas: int


@dataclass(frozen=True)
class FleetView:
    since: datetime
    until: datetime
    pools: list[PoolLine]
    bill_micros: int
    tenants_micros: int                          # serving allocations to tenants
    jobs_micros: int                             # worker time of tenants' jobs
    idle_micros: int                             # the platform's idle line
    by_tenant: list[tuple[str, int, int]]        # (tenant, micros, entries)
    policy: str

    @property
    def balanced(self) -> bool:
        return self.bill_micros == self.tenants_micros + self.jobs_micros + self.idle_micros


@dataclass(frozen=True)
class MarginLine:
    tenant: str
    model: str
    requests: int
    revenue_micros: int
    cost_micros: int

    @property
    def margin_micros(self) -> int:
        return self.revenue_micros - self.cost_micros


@dataclass(frozen=True)
class MarginView:
    since: datetime
    until: datetime
    lines: list[MarginLine]
    platform_idle_micros: int | None             # None: not the caller's to see (a tenant key)
    series: list[tuple[datetime, int, int]]      # (bucket start, cost, revenue)
    has_price_list: bool

    @property
    def revenue_micros(self) -> int:
        return sum(line.revenue_micros for line in self.lines)

    @property
    def cost_micros(self) -> int:
        return sum(line.cost_micros for line in self.lines)


def _window(since: datetime, until: datetime):
    return and_(LedgerRow.created_at >= since, LedgerRow.created_at < until)


def fleet_view(sessions: sessionmaker, platform_id: int, names: dict[int, str], since: datetime, until: datetime,
               policy: str) -> FleetView:
    in_window = _window(since, until)
    platform_line = and_(LedgerRow.tenant_id == platform_id, LedgerRow.category.in_(["fleet", "jobs", "idle"]))
    allocation = and_(LedgerRow.category == "serving", LedgerRow.id.like("alloc:%"))
    with sessions() as s:
        # one statement, so one snapshot: a report landing meanwhile is in all the totals or in none
        totals = dict(s.execute(select(LedgerRow.category, func.sum(LedgerRow.micros)).where(
            in_window, or_(platform_line, allocation)).group_by(LedgerRow.category)).all())
        tenants = s.execute(select(LedgerRow.tenant_id, func.sum(LedgerRow.micros), func.count()).where(
            in_window, allocation).group_by(LedgerRow.tenant_id)).all()
        rows = s.scalars(select(FleetIntervalRow).where(FleetIntervalRow.ended_at >= since,
                                                        FleetIntervalRow.ended_at < until)).all()
        pools = _pool_lines(rows)
    by_tenant = sorted(((names.get(t, str(t)), int(m), n) for t, m, n in tenants), key=lambda x: (-x[1], x[0]))
    return FleetView(since, until, pools, int(totals.get("fleet") or 0), int(totals.get("serving") or 0),
                     int(totals.get("jobs") or 0), int(totals.get("idle") or 0), by_tenant, policy)


def _pool_lines(rows) -> list[PoolLine]:
    grouped: dict[str, list[FleetIntervalRow]] = defaultdict(list)
    for row in rows:
        grouped[row.pool].append(row)
    lines = []
    for pool, items in sorted(grouped.items()):
        replica_us = sum(r.replica_us for r in items)
        last_end = max(r.end_us for r in items)
        latest: dict[str, FleetIntervalRow] = {}
        for r in items:
            if r.pool_key not in latest or r.end_us > latest[r.pool_key].end_us:
                latest[r.pool_key] = r
        live = sum(r.replicas for r in latest.values() if r.end_us >= last_end - 2 * (r.end_us - r.start_us))
        last = max(items, key=lambda r: r.end_us)
        lines.append(PoolLine(
            pool=pool, kind=last.kind, device_class=last.device_class, replica_seconds=replica_us / 1e6,
            price_micros_per_hour=last.price_micros_per_hour, bill_micros=sum(r.bill_micros for r in items),
            allocated_micros=sum(r.allocated_micros for r in items), idle_micros=sum(r.idle_micros for r in items),
            utilization=sum(r.used_ns for r in items) / (replica_us * 1000) if replica_us else 0.0,
            intervals=len(items), replicas=live))
    return lines


def margin_view(sessions: sessionmaker, platform_id: int, names: dict[int, str], since: datetime, until: datetime,
                tenant_id: int | None, buckets: int = SERIES_BUCKETS) -> MarginView:
    """Per tenant (one, or every tenant when ``tenant_id`` is None) and model: requests served through the gateway,
    revenue, allocated serving cost; the series buckets cost and revenue over the window."""
    conditions = [_window(since, until), LedgerRow.category.in_(["serving", "revenue"])]
    if tenant_id is not None:
        conditions.append(LedgerRow.tenant_id == tenant_id)
    with sessions() as s:
        grouped = s.execute(select(LedgerRow.tenant_id, LedgerRow.model, LedgerRow.category,
                                   func.sum(LedgerRow.micros), func.sum(LedgerRow.quantity))
                            .where(*conditions).group_by(LedgerRow.tenant_id, LedgerRow.model, LedgerRow.category)
                            ).all()
        points = s.execute(select(LedgerRow.created_at, LedgerRow.category, LedgerRow.micros)
                           .where(*conditions, LedgerRow.micros > 0)).all()
        idle = None
        if tenant_id is None:
            idle = int(s.scalar(select(func.coalesce(func.sum(LedgerRow.micros), 0)).where(
                _window(since, until), LedgerRow.tenant_id == platform_id, LedgerRow.category == "idle")))
        priced = prices.has_prices(s, tenant_id)
    table: dict[tuple[int, str], dict[str, int]] = defaultdict(lambda: {"cost": 0, "revenue": 0, "requests": 0})
    for tid, model, category, micros, quantity in grouped:
        cell = table[(tid, model)]
        if category == "serving":
            cell["cost"] += int(micros or 0)
            cell["requests"] += int(quantity or 0)
        else:
            cell["revenue"] += int(micros or 0)
    lines = [MarginLine(names.get(tid, str(tid)), model, c["requests"], c["revenue"], c["cost"])
             for (tid, model), c in sorted(table.items(), key=lambda kv: (names.get(kv[0][0], ""), kv[0][1]))]
    return MarginView(since, until, lines, idle, _series(points, since, until, buckets), priced)


def _series(points, since: datetime, until: datetime, buckets: int) -> list[tuple[datetime, int, int]]:
    span = (until - since) / buckets
    cost, revenue = [0] * buckets, [0] * buckets
    for created, category, micros in points:
        i = min(buckets - 1, max(0, int((as_utc(created) - since) / span)))
        (cost if category == "serving" else revenue)[i] += int(micros)
    return [(since + span * i, cost[i], revenue[i]) for i in range(buckets)]
