"""The revenue price list: what a tenant charges its own customers per request it serves through the gateway.

A tenant's list, or the default list (tenant 0) for tenants without one, prices each model — or every model
without its own entry (model ``""``) — in micros per million requests (a per-request price p is p × 10^6 per
million). Served requests become ``revenue`` entries (:mod:`margin.budget.fleet.metering`); the margin view sets
them against the allocated cost.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from margin.budget.fleet.tables import PriceListRow
from margin.common.errors import InvalidArgument
from margin.common.names import validate_name

DEFAULT = 0  # the tenant id of the default list
MAX_ENTRIES = 1000
MAX_MICROS_PER_MILLION = 10**15  # $10^9 per million requests: anything above is a typo


@dataclass(frozen=True)
class Price:
    model: str                  # "" : every model without its own entry
    micros_per_million: int
    currency: str = "USD"


def validate(entries: list[Price]) -> list[Price]:
    if len(entries) > MAX_ENTRIES:
        raise InvalidArgument(f"a price list has at most {MAX_ENTRIES} entries")
    seen = set()
    for p in entries:
        if p.model:
            validate_name(p.model, "price_list.entries.model")
        if p.model in seen:
            raise InvalidArgument(f"price_list: model {p.model or '(every model)'!r} is priced twice")
        seen.add(p.model)
        if not re.fullmatch(r"[A-Z]{3}", p.currency):
            raise InvalidArgument(f"price_list: currency {p.currency[:20]!r} is not a 3-letter ISO 4217 code such "
                                  "as USD")
        if not 0 <= p.micros_per_million <= MAX_MICROS_PER_MILLION:
            raise InvalidArgument(f"price_list: the price of {p.model or 'every model'} must be between 0 and "
                                  f"{MAX_MICROS_PER_MILLION} micros per million requests")
    return entries


def set_prices(sessions: sessionmaker, tenant_id: int, entries: list[Price]) -> list[Price]:
    """Replace the list of ``tenant_id`` (:data:`DEFAULT` for the default list)."""
    validate(entries)
    with sessions.begin() as s:
        s.execute(delete(PriceListRow).where(PriceListRow.tenant_id == tenant_id))
        s.add_all(PriceListRow(tenant_id=tenant_id, model=p.model, micros_per_million=p.micros_per_million,
                               currency=p.currency) for p in entries)
    return get_prices(sessions, tenant_id)


def get_prices(sessions: sessionmaker, tenant_id: int) -> list[Price]:
    with sessions() as s:
        rows = s.scalars(select(PriceListRow).where(PriceListRow.tenant_id == tenant_id)
                         .order_by(PriceListRow.model)).all()
        return [Price(r.model, r.micros_per_million, r.currency) for r in rows]


def has_prices(s: Session, tenant_id: int | None = None) -> bool:
    query = select(PriceListRow.tenant_id)
    if tenant_id is not None:
        query = query.where(PriceListRow.tenant_id.in_([tenant_id, DEFAULT]))
    return s.scalar(query.limit(1)) is not None


def price_for(s: Session, tenant_id: int, model: str) -> int | None:
    """Micros per million requests of ``model`` for ``tenant_id``: its own list (the model's entry, else its
    every-model entry), else the default list's; None when neither prices it."""
    rows = s.execute(select(PriceListRow.tenant_id, PriceListRow.model, PriceListRow.micros_per_million).where(
        PriceListRow.tenant_id.in_([tenant_id, DEFAULT]), PriceListRow.model.in_([model, ""]))).all()
    found = {(t, m): p for t, m, p in rows}
    own = [(t, m) for t, m in found if t == tenant_id]
    for key in ((tenant_id, model), (tenant_id, "")) if own else ((DEFAULT, model), (DEFAULT, "")):
        if key in found:
            return found[key]
    return None
