"""SQLAlchemy engine factory: SQLite (WAL, busy timeout) locally, PostgreSQL in a cluster."""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import Connection, Engine, Inspector, Table, create_engine, event, inspect, text
from sqlalchemy.orm import DeclarativeBase, sessionmaker


class Base(DeclarativeBase):
    """Declarative base shared by every table, so one ``create_all`` makes the whole schema."""


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False},
                               pool_size=32, max_overflow=32)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=16, max_overflow=16)


def make_sessionmaker(engine: Engine) -> sessionmaker:
    Base.metadata.create_all(engine)
    add_missing_columns(engine)
    migrate_primary_keys(engine)
    return sessionmaker(engine, expire_on_commit=False)


def add_missing_columns(engine: Engine) -> list[str]:
    """Bring a database made by an earlier version up to date: ``create_all`` makes missing tables but not the
    columns added since to existing ones; each such column (nullable, by rule) is added. Returns what was added."""
    existing = inspect(engine)
    added = []
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            if not existing.has_table(table.name):
                continue
            present = {c["name"] for c in existing.get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                if not column.nullable:
                    raise RuntimeError(f"{table.name}.{column.name} was added as NOT NULL: new columns must be "
                                       "nullable so an existing database can take them")
                kind = column.type.compile(dialect=engine.dialect)
                conn.execute(text(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}'))
                added.append(f"{table.name}.{column.name}")
    return added


def migrate_primary_keys(engine: Engine) -> list[str]:
    """Bring a table whose primary key changed since the database was made (the ledger's: ``id``, then ``(tenant_id,
    id)``) to the key the model declares, keeping every row. Returns the tables migrated.

    SQLite cannot change a key in place: the table is rebuilt — its indexes dropped, renamed aside, made anew, the
    rows copied, the old one dropped — in one ``BEGIN IMMEDIATE`` transaction. PostgreSQL changes the key in place
    under an exclusive lock. Either way the key is checked again once the lock is held, so services starting at once
    over one database migrate it once; a failure rolls everything back."""
    migrated = []
    found = inspect(engine)
    for table in Base.metadata.sorted_tables:
        if not _key_changed(found, table):
            continue
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock first: no other process rebuilds beside us
            else:
                conn.execute(text(f'LOCK TABLE "{table.name}" IN ACCESS EXCLUSIVE MODE'))
            if _key_changed(inspect(conn), table):
                (_rebuild if engine.dialect.name == "sqlite" else _rekey)(conn, table)
                migrated.append(table.name)
            conn.commit()
    return migrated


def _key_changed(found: Inspector, table: Table) -> bool:
    if not found.has_table(table.name):
        return False
    return found.get_pk_constraint(table.name)["constrained_columns"] != [c.name for c in table.primary_key.columns]


def _rekey(conn: Connection, table: Table) -> None:
    old = inspect(conn).get_pk_constraint(table.name)["name"]
    columns = ", ".join(f'"{c.name}"' for c in table.primary_key.columns)
    conn.execute(text(f'ALTER TABLE "{table.name}" DROP CONSTRAINT "{old}", ADD PRIMARY KEY ({columns})'))


def _rebuild(conn: Connection, table: Table) -> None:
    found = inspect(conn)
    referring = [t for t in found.get_table_names() if t != table.name
                 and any(fk["referred_table"] == table.name for fk in found.get_foreign_keys(t))]
    if referring:  # renaming the table aside would move their references with it
        raise RuntimeError(f"cannot rebuild {table.name} with its new primary key: {referring} refer to it")
    present = {c["name"] for c in found.get_columns(table.name)}
    for index in found.get_indexes(table.name):  # index names are the schema's: the new table makes them again
        conn.execute(text(f'DROP INDEX "{index["name"]}"'))
    aside = f"_old_{table.name}"
    conn.execute(text(f'ALTER TABLE "{table.name}" RENAME TO "{aside}"'))
    table.create(conn)
    columns = ", ".join(f'"{c.name}"' for c in table.columns if c.name in present)
    conn.execute(text(f'INSERT INTO "{table.name}" ({columns}) SELECT {columns} FROM "{aside}"'))
    conn.execute(text(f'DROP TABLE "{aside}"'))
