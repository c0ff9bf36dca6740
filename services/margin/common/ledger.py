"""The spend ledger: one append-only table every service writes what it spent into.

The budget service owns reading it (GetSpend, ListLedger, enforcement); writers append entries whose
ids they choose, so a retried batch never bills twice (an id already present is skipped). Only Margin's own
services and workers write it (RecordSpend takes the admin key), and an id is unique per tenant: the key is
(tenant, id), so no id of one tenant can collide with, or reveal, another's. The ids Margin's writers choose are
keyed (:class:`EntryIds`), so no one can compute one before it is written.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Integer, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from margin.common.db import Base
from margin.common.tenancy import utcnow

log = logging.getLogger(__name__)
SPEND_CATEGORIES = ("training", "compression", "serving")  # what a tenant spends: its budget counts these
PLATFORM_CATEGORIES = ("fleet", "idle", "jobs")             # the platform's own lines (the bill and its idle part)
CATEGORIES = (*SPEND_CATEGORIES, *PLATFORM_CATEGORIES, "revenue")
# Ids of the entries only the fleet metering writes (margin.budget.fleet): no other writer may take them.
DESCRIPTION_CHARS = 300
FLEET_ID_PREFIXES = ("fleet:", "alloc:", "idle:", "jobs:", "revenue:")


class LedgerRow(Base):
    __tablename__ = "ledger_entries"
    # The key is (tenant, id): an id is the writer's idempotency key within its tenant's ledger only. A database made
    # when the key was the id alone is rebuilt at start (margin.common.db.migrate_primary_keys).
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    id: Mapped[str] = mapped_column(String(100), primary_key=True)
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


class EntryIds:
    """The ids Margin's own writers give their entries: a readable prefix and an HMAC-SHA256, keyed with the
    deployment's ledger id key (:func:`margin.common.config.ledger_id_key`), of what the entry is for.

    Deterministic, so a retry — from any process of the deployment — writes the same id and bills once; not
    guessable without the key, so no one can take the id of an entry before Margin writes it. Without a key (a
    process not configured for a deployment: tests, tools), a random one is made for this process: ids stay
    unguessable, but only this process recognizes its own retries by id."""

    def __init__(self, key: bytes | None):
        if not key:
            log.warning("no ledger id key (MARGIN_LEDGER_ID_KEY or MARGIN_ADMIN_KEY): ledger ids are keyed with a "
                        "random key of this process")
            key = secrets.token_bytes(32)
        self._key = key

    def digest(self, *parts: object, chars: int = 40) -> str:
        """``chars`` hex digits of the HMAC of ``parts`` (JSON-encoded: no two lists of parts share a message)."""
        message = json.dumps([str(p) for p in parts], separators=(",", ":")).encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()[:chars]

    def keyed(self, prefix: str, *parts: object) -> str:
        """``<prefix>:<40 hex digits>`` (the fleet metering's ids: pool, interval and party)."""
        return f"{prefix}:{self.digest(prefix, *parts)}"

    def job_attempt(self, kind: str, tenant_id: int, job_id: str, attempt: int) -> str:
        """``<kind>:<job>:<attempt>:<32 hex digits>``: one entry per attempt of a job."""
        return f"{kind}:{job_id}:{attempt}:{self.digest(kind, tenant_id, job_id, attempt, chars=32)}"


def check_entries(entries: list[LedgerEntry]) -> None:
    for e in entries:
        if e.category not in CATEGORIES:
            raise ValueError(f"unknown spend category {e.category!r}")
        if e.micros < 0:
            raise ValueError("ledger amounts are never negative")


def append_in(s: Session, entries: list[LedgerEntry]) -> int:
    """Append entries inside the caller's transaction, skipping those whose id their tenant's ledger already holds.
    Returns how many were new."""
    check_entries(entries)
    if not entries:
        return 0
    found = s.execute(select(LedgerRow.tenant_id, LedgerRow.id).where(
        LedgerRow.tenant_id.in_({e.tenant_id for e in entries}), LedgerRow.id.in_({e.id for e in entries})))
    existing = {(tenant_id, entry_id) for tenant_id, entry_id in found}
    fresh = {(e.tenant_id, e.id): e for e in entries if (e.tenant_id, e.id) not in existing}
    s.add_all(LedgerRow(**{**vars(e), "description": e.description[:DESCRIPTION_CHARS]}) for e in fresh.values())
    return len(fresh)


def append_entries(sessions: sessionmaker, entries: list[LedgerEntry]) -> tuple[int, int]:
    """Append entries, skipping ids already in their tenant's ledger. Returns (written, duplicates)."""
    if not entries:
        return 0, 0
    with sessions.begin() as s:
        written = append_in(s, entries)
    return written, len(entries) - written
