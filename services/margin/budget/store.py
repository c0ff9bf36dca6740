"""Tenant budgets and what has been spent against them, in SQL, free of gRPC.

A tenant has at most one budget: a total per period (daily or monthly, UTC) in integer micros, optional limits
per spend category (training, compression, serving), the serving policy for when the serving budget is exhausted
(``reject``, ``degrade`` or ``throttle``), alert thresholds (fractions of the total; 0.5, 0.8 and 1.0 by default)
and an optional webhook. Spend is read from the one ledger every service appends to
(:mod:`margin.common.ledger`): sums by category, model and deployment over the current period, what is left,
and the end-of-period projection: the serving fleet's current burn (what its allocated cost came to over the last
few metering intervals, idle replicas included) for the time left, plus the jobs at their rate so far. Only the
spend categories count (the ledger's platform lines and revenue are not a tenant's spend).
"""
from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    and_,
    func,
    or_,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from margin.budget.egress import EgressPolicy
from margin.budget.periods import PERIODS, bounds, projected_with_burn
from margin.common.db import Base
from margin.common.errors import InvalidArgument
from margin.common.ledger import (
    CATEGORIES,
    FLEET_ID_PREFIXES,
    SPEND_CATEGORIES,
    LedgerEntry,
    LedgerRow,
    append_entries,
)
from margin.common.paging import page_size
from margin.common.tenancy import as_utc, utcnow

POLICIES = ("reject", "degrade", "throttle")
DEFAULT_THRESHOLDS = (0.5, 0.8, 1.0)
BURN_WINDOW_S = 300.0   # the serving burn rate is read over this much of the recent past
_CURRENCY = re.compile(r"[A-Z]{3}")


class BudgetRow(Base):
    __tablename__ = "budgets"
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    period: Mapped[str] = mapped_column(String(10))
    total_micros: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3), default="USD")
    category_limits: Mapped[dict] = mapped_column(JSON, default=dict)  # category -> micros
    policy: Mapped[str] = mapped_column(String(10), default="reject")
    thresholds: Mapped[list] = mapped_column(JSON, default=list)
    webhook_url: Mapped[str] = mapped_column(String(500), default="")
    webhook_secret: Mapped[str] = mapped_column(String(200), default="")  # signs alerts (HMAC-SHA256)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class AlertRow(Base):
    """One row per threshold crossed per period: the unique key makes each threshold fire once, whichever
    replica of the budget service sees the crossing first."""
    __tablename__ = "budget_alerts"
    __table_args__ = (UniqueConstraint("tenant_id", "period_start", "threshold"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    period_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    threshold: Mapped[float] = mapped_column()
    spent_micros: Mapped[int] = mapped_column(BigInteger)
    total_micros: Mapped[int] = mapped_column(BigInteger)
    fired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


@dataclass(frozen=True)
class Budget:
    tenant_id: int
    period: str
    total_micros: int
    category_limits: dict[str, int] = field(default_factory=dict)
    policy: str = "reject"
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    webhook_url: str = ""
    webhook_secret: str = ""
    currency: str = "USD"

    def limit(self, category: str) -> int | None:
        return self.category_limits.get(category)


@dataclass(frozen=True)
class SpendLine:
    key: str
    category: str
    micros: int
    entries: int
    limit_micros: int | None = None


@dataclass(frozen=True)
class Spend:
    tenant_id: int
    budget: Budget | None
    period_start: datetime
    period_end: datetime
    spent_micros: int
    remaining_micros: int | None  # None without a budget
    projected_micros: int
    by_category: list[SpendLine]
    by_model: list[SpendLine]
    by_deployment: list[SpendLine]
    burn_micros_per_hour: int = 0  # the serving fleet's current burn (allocated), plus nothing of the jobs

    def remaining_for(self, category: str) -> int | None:
        """What is left for ``category``: the smaller of the total's and the category limit's remainder."""
        if self.budget is None:
            return None
        left = self.remaining_micros
        limit = self.budget.limit(category)
        if limit is not None:
            spent = next((line.micros for line in self.by_category if line.key == category), 0)
            left = min(left, limit - spent)
        return left


@dataclass(frozen=True)
class Alert:
    tenant_id: int
    tenant: str
    threshold: float
    spent_micros: int
    total_micros: int
    period_start: datetime
    period_end: datetime
    webhook_url: str
    webhook_secret: str


def validate(b: Budget) -> Budget:
    """The rules of a budget, whoever sets it: SetBudget (through :meth:`BudgetStore.set_budget`) and the budgets
    file (:mod:`margin.budget.seed`, before it writes anything)."""
    if b.period not in PERIODS:
        raise InvalidArgument(f"budget.period must be one of {list(PERIODS)}")
    if b.total_micros <= 0:
        raise InvalidArgument("budget.total must be a positive amount")
    if not isinstance(b.currency, str) or not _CURRENCY.fullmatch(b.currency):
        raise InvalidArgument(f"budget currency {b.currency!r} is not a 3-letter ISO 4217 code such as USD")
    for category, limit in b.category_limits.items():
        if category not in CATEGORIES:
            raise InvalidArgument(f"unknown spend category {category!r}; known: {list(CATEGORIES)}")
        if limit < 0:
            raise InvalidArgument(f"the {category} limit must be >= 0")
    if b.policy not in POLICIES:
        raise InvalidArgument(f"exhausted_policy must be one of {list(POLICIES)}")
    if any(not 0 < t <= 10 for t in b.thresholds) or len(set(b.thresholds)) != len(b.thresholds):
        raise InvalidArgument("alert_thresholds must be distinct fractions of the total in (0, 10], e.g. 0.5, 0.8, 1")
    if b.webhook_url and not b.webhook_url.startswith(("http://", "https://")):
        raise InvalidArgument("webhook_url must be an http(s) URL")
    if b.webhook_url and not b.webhook_secret:
        raise InvalidArgument("a webhook needs a webhook_secret: alerts are signed with HMAC-SHA256")
    return b


def _budget(row: BudgetRow) -> Budget:
    return Budget(tenant_id=row.tenant_id, period=row.period, total_micros=row.total_micros,
                  category_limits=dict(row.category_limits or {}), policy=row.policy,
                  thresholds=tuple(row.thresholds or DEFAULT_THRESHOLDS), webhook_url=row.webhook_url,
                  webhook_secret=row.webhook_secret, currency=row.currency)


class BudgetStore:
    def __init__(self, sessions: sessionmaker, interval_s: float = 15.0, burn_window_s: float = BURN_WINDOW_S,
                 egress: EgressPolicy | None = None):
        self._sessions = sessions
        self._interval_s, self._burn_window_s = interval_s, burn_window_s
        self._egress = egress or EgressPolicy()

    # -- budgets ------------------------------------------------------------------------------------------------
    def set_budget(self, budget: Budget) -> Budget:
        validate(budget)
        values = {"period": budget.period, "total_micros": budget.total_micros, "currency": budget.currency,
                  "category_limits": dict(budget.category_limits), "policy": budget.policy,
                  "thresholds": sorted(budget.thresholds), "webhook_url": budget.webhook_url,
                  "webhook_secret": budget.webhook_secret}
        with self._sessions.begin() as s:
            row = s.get(BudgetRow, budget.tenant_id, with_for_update=True)
            if budget.webhook_url and (row is None or row.webhook_url != budget.webhook_url):
                # a new destination: refuse one that is obviously not allowed (the send-time check is the guard;
                # a webhook kept as it was, e.g. by the budgets file, is not judged again here)
                self._egress.check_url(budget.webhook_url, "budget.webhook_url")
            if row is None:
                row = BudgetRow(tenant_id=budget.tenant_id, **values)
                s.add(row)
            else:
                for key, value in values.items():
                    setattr(row, key, value)
            s.flush()
            return _budget(row)

    def get_budget(self, tenant_id: int) -> Budget | None:
        with self._sessions() as s:
            row = s.get(BudgetRow, tenant_id)
            return _budget(row) if row else None

    def budgeted_tenants(self) -> list[int]:
        with self._sessions() as s:
            return list(s.scalars(select(BudgetRow.tenant_id)))

    # -- spend --------------------------------------------------------------------------------------------------
    def spend(self, tenant_id: int, at: datetime | None = None) -> Spend:
        """Spend in the current period (a budget's period, or the UTC month without one)."""
        at = as_utc(at) or utcnow()
        budget = self.get_budget(tenant_id)
        start, end = bounds(budget.period if budget else "monthly", at)
        in_period = and_(LedgerRow.tenant_id == tenant_id, LedgerRow.created_at >= start, LedgerRow.created_at < end,
                         LedgerRow.category.in_(SPEND_CATEGORIES))
        with self._sessions() as s:
            def grouped(*columns) -> list[tuple]:
                return s.execute(select(*columns, func.sum(LedgerRow.micros), func.count())
                                 .where(in_period).group_by(*columns).order_by(*columns)).all()

            categories = grouped(LedgerRow.category)
            models = grouped(LedgerRow.model, LedgerRow.category)
            deployments = grouped(LedgerRow.deployment, LedgerRow.category)
        limits = budget.category_limits if budget else {}
        by_category = [SpendLine(c, c, int(m), n, limits.get(c)) for c, m, n in categories]
        spent = sum(line.micros for line in by_category)
        serving = next((line.micros for line in by_category if line.key == "serving"), 0)
        burn = sum(self.serving_burn(tenant_id, at, start).values())
        return Spend(
            tenant_id=tenant_id, budget=budget, period_start=start, period_end=end, spent_micros=spent,
            remaining_micros=budget.total_micros - spent if budget else None,
            projected_micros=projected_with_burn(spent, serving, burn, start, end, at), by_category=by_category,
            by_model=[SpendLine(k, c, int(m), n) for k, c, m, n in models if k],
            by_deployment=[SpendLine(k, c, int(m), n) for k, c, m, n in deployments if k],
            burn_micros_per_hour=burn)

    def serving_burn(self, tenant_id: int, at: datetime | None = None, period_start: datetime | None = None) \
            -> dict[str, int]:
        """Each deployment's allocated serving cost per hour over the recent past: the entries dated in the last
        ``burn_window_s`` (at most since ``period_start``) over the time they cover — from the start of the first
        one's metering interval to the last one (while it is still billing: the interval under way is not in the
        ledger yet)."""
        at = as_utc(at) or utcnow()
        window_start = at - timedelta(seconds=self._burn_window_s)
        if period_start is not None:
            window_start = max(window_start, period_start)
        with self._sessions() as s:
            rows = s.execute(select(LedgerRow.deployment, func.sum(LedgerRow.micros), func.min(LedgerRow.created_at),
                                    func.max(LedgerRow.created_at))
                             .where(LedgerRow.tenant_id == tenant_id, LedgerRow.category == "serving",
                                    LedgerRow.created_at >= window_start, LedgerRow.created_at <= at)
                             .group_by(LedgerRow.deployment)).all()
        burn = {}
        interval = timedelta(seconds=self._interval_s)
        for deployment, micros, first, last in rows:
            covered_from = as_utc(first) - interval  # the first entry's interval is all in the sum
            if period_start is not None:
                covered_from = max(covered_from, period_start)
            covered_to = as_utc(last) if at - as_utc(last) <= 2 * interval else at
            seconds = max((covered_to - covered_from).total_seconds(), self._interval_s)
            burn[deployment] = int(int(micros) * 3600 / seconds)
        return burn

    def remaining(self, tenant_id: int, category: str, at: datetime | None = None) -> int | None:
        """What ``category`` may still spend this period; None when the tenant has no budget."""
        return self.spend(tenant_id, at).remaining_for(category)

    # -- the ledger ---------------------------------------------------------------------------------------------
    def record(self, entries: list[LedgerEntry]) -> tuple[int, int]:
        """Append entries; ids already present are skipped, so a retried batch never bills twice. Only spend
        categories, and never an id of the fleet metering's (:data:`~margin.common.ledger.FLEET_ID_PREFIXES`)."""
        for entry in entries:
            if entry.category not in SPEND_CATEGORIES:
                raise InvalidArgument(f"entry {entry.id}: only spend ({', '.join(SPEND_CATEGORIES)}) is recorded "
                                      "this way; the fleet's lines come from its metering")
            if entry.id.startswith(FLEET_ID_PREFIXES):
                raise InvalidArgument(f"entry {entry.id}: ids starting {', '.join(FLEET_ID_PREFIXES)} belong to the "
                                      "fleet metering")
        try:
            return append_entries(self._sessions, entries)
        except ValueError as err:
            raise InvalidArgument(str(err)) from None
        except IntegrityError:  # a concurrent writer appended one of these ids between our check and insert
            return self._record_one_by_one(entries)

    def _record_one_by_one(self, entries: list[LedgerEntry]) -> tuple[int, int]:
        written = 0
        for entry in entries:
            try:
                written += append_entries(self._sessions, [entry])[0]
            except IntegrityError:
                pass
        return written, len(entries) - written

    def ledger(self, tenant_id: int, *, category: str = "", since: datetime | None = None,
               until: datetime | None = None, size: int = 0, token: str = "") -> tuple[list[LedgerRow], str]:
        """A page of the tenant's entries, oldest first (keyset on time, then id)."""
        if category and category not in CATEGORIES:
            raise InvalidArgument(f"unknown spend category {category!r}; known: {list(CATEGORIES)}")
        size = page_size(size)
        query = select(LedgerRow).where(LedgerRow.tenant_id == tenant_id)
        if category:
            query = query.where(LedgerRow.category == category)
        if since:
            query = query.where(LedgerRow.created_at >= since)
        if until:
            query = query.where(LedgerRow.created_at < until)
        if token:
            after_time, after_id = _decode(token)
            query = query.where(or_(LedgerRow.created_at > after_time,
                                    and_(LedgerRow.created_at == after_time, LedgerRow.id > after_id)))
        with self._sessions() as s:
            rows = list(s.scalars(query.order_by(LedgerRow.created_at, LedgerRow.id).limit(size + 1)))
            s.expunge_all()
        more = len(rows) > size
        rows = rows[:size]
        return rows, (_encode(rows[-1]) if more else "")

    # -- alerts -------------------------------------------------------------------------------------------------
    def claim_alerts(self, tenant_id: int, tenant: str, at: datetime | None = None) -> list[Alert]:
        """The thresholds this period's spend has crossed that have not fired yet, each claimed once (a unique
        row per tenant, period and threshold): the caller sends them."""
        spend = self.spend(tenant_id, at)
        budget = spend.budget
        if budget is None:
            return []
        claimed = []
        for threshold in sorted(budget.thresholds):
            if spend.spent_micros * 1_000_000 < round(threshold * 1_000_000) * budget.total_micros:
                break
            try:
                with self._sessions.begin() as s:
                    s.add(AlertRow(tenant_id=tenant_id, period_start=spend.period_start, threshold=threshold,
                                   spent_micros=spend.spent_micros, total_micros=budget.total_micros))
            except IntegrityError:
                continue  # fired before
            claimed.append(Alert(tenant_id, tenant, threshold, spend.spent_micros, budget.total_micros,
                                 spend.period_start, spend.period_end, budget.webhook_url, budget.webhook_secret))
        return claimed


def _encode(row: LedgerRow) -> str:
    created = as_utc(row.created_at).isoformat()
    return base64.urlsafe_b64encode(json.dumps({"t": created, "id": row.id}).encode()).decode()


def _decode(token: str) -> tuple[datetime, str]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        return datetime.fromisoformat(data["t"]), str(data["id"])
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument("page_token is not a token this service issued") from None
