"""A database made when ledger ids were one key across tenants (``ledger_entries`` keyed by ``id`` alone) is migrated
at start to the per-tenant key ``(tenant_id, id)``, its rows kept — on SQLite (a local cluster's ~/.margin) and on a
real PostgreSQL server (a cluster's), also when several services start over it at once."""
from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
from margin.common.db import make_engine, make_sessionmaker, migrate_primary_keys
from margin.common.ledger import LedgerEntry, LedgerRow, append_entries
from margin.common.tenancy import TenantStore
from sqlalchemy import BigInteger, Column, DateTime, ForeignKey, Integer, MetaData, String, Table, inspect, select
from sqlalchemy.orm import sessionmaker

from tests.integration.test_postgres import pg_url, postgres  # noqa: F401 (fixtures)

OLD = MetaData()
Table("tenants", OLD, Column("id", Integer, primary_key=True))  # referred to only; made by today's schema
OLD_LEDGER = Table(
    "ledger_entries", OLD,
    Column("id", String(100), primary_key=True),
    Column("tenant_id", ForeignKey("tenants.id"), nullable=False, index=True),
    Column("category", String(20), nullable=False, index=True),
    Column("currency", String(3), nullable=False),
    Column("micros", BigInteger, nullable=False),
    Column("quantity", BigInteger, nullable=False),
    Column("model", String(100), nullable=False),
    Column("version", Integer, nullable=False),
    Column("deployment", String(200), nullable=False),
    Column("job_id", String(100), nullable=False),
    Column("description", String(300), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, index=True))


def old_database(url: str) -> dict[str, int]:
    """Today's schema but the ledger as it was, holding two tenants' entries; the tenants' ids by name."""
    engine = make_engine(url)
    tables = [t for name, t in LedgerRow.metadata.tables.items() if name != "ledger_entries"]
    LedgerRow.metadata.create_all(engine, tables=tables)
    OLD_LEDGER.create(engine)
    sessions = sessionmaker(engine, expire_on_commit=False)  # no migration yet
    tenants = {name: TenantStore(sessions).create_tenant(name).id for name in ("acme", "other")}
    moment = datetime(2026, 11, 1, tzinfo=UTC)
    with engine.begin() as conn:
        conn.execute(OLD_LEDGER.insert(), [
            {"id": entry_id, "tenant_id": tenants[tenant], "category": "training", "currency": "USD",
             "micros": micros, "quantity": 0, "model": "m", "version": 1, "deployment": "", "job_id": "j",
             "description": "before the migration", "created_at": moment}
            for entry_id, tenant, micros in (("training:job-1:1", "acme", 100), ("training:job-2:1", "other", 250),
                                             ("serving:x", "acme", 5))])
    engine.dispose()
    return tenants


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'margin.db'}"
    return request.getfixturevalue("pg_url")


def test_an_old_ledger_is_migrated_to_per_tenant_ids_at_start_keeping_its_rows(url):
    tenants = old_database(url)
    engine = make_engine(url)
    assert inspect(engine).get_pk_constraint("ledger_entries")["constrained_columns"] == ["id"]
    try:
        sessions = make_sessionmaker(engine)  # what every service does at start
        assert inspect(engine).get_pk_constraint("ledger_entries")["constrained_columns"] == ["tenant_id", "id"]
        with sessions() as s:
            rows = {(r.tenant_id, r.id): r.micros for r in s.scalars(select(LedgerRow))}
        assert rows == {(tenants["acme"], "training:job-1:1"): 100, (tenants["other"], "training:job-2:1"): 250,
                        (tenants["acme"], "serving:x"): 5}
        assert {i["name"] for i in inspect(engine).get_indexes("ledger_entries")} >= {
            "ix_ledger_entries_category", "ix_ledger_entries_created_at"}
        # the id of one tenant's entry is new in another's; in its own it is still a duplicate
        assert append_entries(sessions, [LedgerEntry("training:job-2:1", tenants["acme"], "training", 7),
                                         LedgerEntry("training:job-2:1", tenants["other"], "training", 7)]) == (1, 1)
        assert migrate_primary_keys(engine) == []  # the next start finds nothing to do
    finally:
        engine.dispose()


def test_services_starting_at_once_migrate_the_old_ledger_once(url):
    old_database(url)
    engines = [make_engine(url) for _ in range(3)]
    barrier, migrated, errors = threading.Barrier(len(engines)), [], []

    def start(engine) -> None:
        barrier.wait()
        try:
            migrated.extend(migrate_primary_keys(engine))
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=start, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert errors == [] and migrated == ["ledger_entries"]
        assert inspect(engines[0]).get_pk_constraint("ledger_entries")["constrained_columns"] == ["tenant_id", "id"]
        with make_sessionmaker(engines[0])() as s:
            assert len(s.scalars(select(LedgerRow)).all()) == 3
    finally:
        for engine in engines:
            engine.dispose()
