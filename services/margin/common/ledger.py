"""The spend ledger: one append-only table every service writes what it spent into.

The budget service owns reading it (GetSpend, ListLedger, enforcement); writers append entries whose
ids they choose, so a retried batch never bills twice (an id already present is skipped).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Integer, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from margin.common.db import Base
from margin.common.tenancy import utcnow

SPEND_CATEGORIES = ("training", "compression", "serving")  # what a tenant spends: its budget counts these
PLATFORM_CATEGORIES = ("fleet", "idle", "jobs")             # the platform's own lines (the bill and its idle part)
CATEGORIES = (*SPEND_CATEGORIES, *PLATFORM_CATEGORIES, "revenue")
# Ids of the entries only the fleet metering writes (margin.budget.fleet): no other writer may take them.
DESCRIPTION_CHARS = 300
FLEET_ID_PREFIXES = ("fleet:", "alloc:", "idle:", "jobs:", "revenue:")


class LedgerRow(Base):
    __tablename__ = "ledger_entries"
    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    category: Mapped[str] = mapped_column(String(20), index=True)
    currency: Mapped[str] = mapped_column(String(3), default="USD")
    micros: Mapped[int] = mapped_column(BigInteger)
    quantity: Mapped[int] = mapped_column(BigInteger, default=0)
    model: Mapped[str] = mapped_column(String(100), default="")
    version: Mapped[int] = mapped_column(Integer, default=0)
    deployment: Mapped[str] = mapped_column(String(200), default="")
    job_id: Mapped[str] = mapped_column(String(100), default="")
    description: Mapped[str] = mapped_column(String(DESCRIPTION_CHARS), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


@dataclass(frozen=True)
class LedgerEntry:
    id: str
    tenant_id: int
    category: str
    micros: int
    quantity: int = 0
    model: str = ""
    version: int = 0
    deployment: str = ""
    job_id: str = ""
    description: str = ""
    currency: str = "USD"
    created_at: datetime = field(default_factory=utcnow)


def check_entries(entries: list[LedgerEntry]) -> None:
    for e in entries:
        if e.category not in CATEGORIES:
            raise ValueError(f"unknown spend category {e.category!r}")
        if e.micros < 0:
            raise ValueError("ledger amounts are never negative")


def append_in(s: Session, entries: list[LedgerEntry]) -> int:
    """Append entries inside the caller's transaction, skipping ids already present. Returns how many were new."""
    check_entries(entries)
    if not entries:
        return 0
    existing = set(s.scalars(select(LedgerRow.id).where(LedgerRow.id.in_([e.id for e in entries]))))
    fresh = {e.id: e for e in entries if e.id not in existing}
    s.add_all(LedgerRow(**{**vars(e), "description": e.description[:DESCRIPTION_CHARS]}) for e in fresh.values())
    return len(fresh)


def append_entries(sessions: sessionmaker, entries: list[LedgerEntry]) -> tuple[int, int]:
    """Append entries, skipping ids already in the ledger. Returns (written, duplicates)."""
    if not entries:
        return 0, 0
    with sessions.begin() as s:
        written = append_in(s, entries)
    return written, len(entries) - written
