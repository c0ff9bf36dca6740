"""SQL tables of the fleet's bill, owned by the budget service."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Float, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from margin.common.db import Base
from margin.common.tenancy import utcnow


class FleetIntervalRow(Base):
    """One pool's metering interval as billed: the primary key makes a report idempotent (a retry, or a second
    gateway reporting the same pool, bills nothing twice). The money is in the ledger; these are the facts behind it
    and its totals, for the fleet view."""
    __tablename__ = "fleet_intervals"
    pool_key: Mapped[str] = mapped_column(String(250), primary_key=True)   # pool, or pool/replica for a worker
    start_us: Mapped[int] = mapped_column(BigInteger, primary_key=True)    # interval start, µs since the epoch
    end_us: Mapped[int] = mapped_column(BigInteger)
    pool: Mapped[str] = mapped_column(String(200), index=True)
    kind: Mapped[str] = mapped_column(String(10))                          # serving | worker
    device_class: Mapped[str] = mapped_column(String(50))
    replicas: Mapped[int] = mapped_column(Integer, default=0)
    replica_us: Mapped[int] = mapped_column(BigInteger, default=0)
    used_ns: Mapped[int] = mapped_column(BigInteger, default=0)            # Triton compute (or job busy) time
    price_micros_per_hour: Mapped[int] = mapped_column(BigInteger, default=0)
    bill_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    allocated_micros: Mapped[int] = mapped_column(BigInteger, default=0)   # to tenants (serving) or jobs (worker)
    idle_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    revenue_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    policy: Mapped[str] = mapped_column(String(12), default="usage")
    basis: Mapped[str] = mapped_column(String(12), default="none")
    observer: Mapped[str] = mapped_column(String(200), default="")
    ended_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class FleetObservationRow(Base):
    """Which observer reported which pool interval: a retry of the same report is recognized and skipped; a second
    gateway's report of an interval already billed adds only the requests it served (each gateway counts its own)."""
    __tablename__ = "fleet_observations"
    pool_key: Mapped[str] = mapped_column(String(250), primary_key=True)
    start_us: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    observer: Mapped[str] = mapped_column(String(200), primary_key=True)


class FleetCarryRow(Base):
    """The fraction of a micro a party of a pool is owed (or overpaid) after its last interval, as an exact
    rational; the bill's own carry is the party ``__bill__``."""
    __tablename__ = "fleet_carries"
    pool_key: Mapped[str] = mapped_column(String(250), primary_key=True)
    party: Mapped[str] = mapped_column(String(250), primary_key=True)
    numerator: Mapped[str] = mapped_column(String(80))
    denominator: Mapped[str] = mapped_column(String(80))


class ServingDeploymentRow(Base):
    """The serving deployments as the fleet observer (the inference gateway) last reported them: what the cost-budget
    autoscaler plans for, without reading the inference service's tables."""
    __tablename__ = "fleet_deployments"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    triton_name: Mapped[str] = mapped_column(String(250), unique=True)
    model: Mapped[str] = mapped_column(String(100))
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(20))
    device_class: Mapped[str] = mapped_column(String(50))
    min_replicas: Mapped[int] = mapped_column(Integer, default=1)
    max_replicas: Mapped[int] = mapped_column(Integer, default=1)
    capacity_rps: Mapped[float] = mapped_column(Float, default=0.0)
    price_micros_per_hour: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class PriceListRow(Base):
    """Revenue prices: what a tenant (0: the default for every tenant) charges per served request of a model
    ("" : every model without its own row), in micros per million requests."""
    __tablename__ = "price_lists"
    tenant_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(100), primary_key=True)
    micros_per_million: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3), default="USD")
