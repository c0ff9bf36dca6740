"""SQL table of the inference service: deployments on Triton."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from margin.common.db import Base
from margin.common.tenancy import utcnow


class DeploymentRow(Base):
    __tablename__ = "inference_deployments"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))               # what the tenant calls it: <model>-v<n>
    triton_name: Mapped[str] = mapped_column(String(250), unique=True)
    model: Mapped[str] = mapped_column(String(100), index=True)
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(20))
    device_class: Mapped[str] = mapped_column(String(50))
    instances: Mapped[int] = mapped_column(Integer, default=1)
    batching: Mapped[dict] = mapped_column(JSON, default=dict)
    signature: Mapped[dict] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)      # the version's registry metrics (routing)
    price_micros_per_hour: Mapped[int] = mapped_column(BigInteger, default=0)
    capacity_rps: Mapped[float] = mapped_column(Float, default=0.0)
    cost_per_million_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    latency_p50_ms: Mapped[float] = mapped_column(Float, default=0.0)
    min_replicas: Mapped[int] = mapped_column(Integer, default=1)
    max_replicas: Mapped[int] = mapped_column(Integer, default=1)
    message: Mapped[str] = mapped_column(String(1000), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # added with scale to zero (nullable: a database made before gets the columns empty)
    scale_to_zero_after_s: Mapped[int | None] = mapped_column(Integer, nullable=True, default=0)
    last_cold_start_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_cold_start_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
