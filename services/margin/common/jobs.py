"""Jobs in SQL: the single source of truth for training and compression runs.

Celery only carries "run job <id>"; everything a user sees (state, progress, cost, result) lives here.

A job is run under a **lease with a fencing token**. A worker that starts (or resumes) a job takes the lease,
which increments ``fence`` and opens a new attempt; every write it makes afterwards names that fence, and a
write with a stale fence is refused (:class:`LeaseLost`). So a redelivered or duplicate task can never
overwrite a newer attempt, finish a job twice, or bill twice. Each attempt keeps its own device-seconds and
cost; a job's cost is the sum of its attempts, and each attempt is written to the spend ledger exactly once
(entry id ``<kind>:<job>:<attempt>:<keyed digest>``, :meth:`~margin.common.ledger.EntryIds.job_attempt`: no tenant
can write it first).
"""
from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from margin.common import ledger
from margin.common.costs import PriceCatalog, RunCost, run_cost
from margin.common.db import Base
from margin.common.errors import FailedPrecondition, NotFound
from margin.common.ledger import LedgerEntry
from margin.common.paging import decode_token, encode_token, page_size
from margin.common.tenancy import as_utc, utcnow

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, BUDGET_EXCEEDED = (
    "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "BUDGET_EXCEEDED")
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, BUDGET_EXCEEDED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, BUDGET_EXCEEDED})


class LeaseLost(RuntimeError):
    """This attempt no longer holds the job: a newer attempt took it over, or it ended."""


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("tenant_id", "kind", "idempotency_key"),)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)   # keyset paging, newest first
    id: Mapped[str] = mapped_column(String(40), unique=True)
    kind: Mapped[str] = mapped_column(String(20), index=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    tenant: Mapped[str] = mapped_column(String(100))   # its name: workers act on its behalf in the registry
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    state: Mapped[str] = mapped_column(String(20), index=True)
    spec: Mapped[dict] = mapped_column(JSON)
    device_class: Mapped[str] = mapped_column(String(40))
    world_size: Mapped[int] = mapped_column(Integer, default=1)
    budget_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    estimate: Mapped[dict] = mapped_column(JSON, default=dict)
    progress: Mapped[dict] = mapped_column(JSON, default=dict)   # epoch, total_epochs, step, loss, eta_seconds
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    result: Mapped[dict] = mapped_column(JSON, default=dict)     # {"model": ..., "number": ...}
    checkpoint: Mapped[dict] = mapped_column(JSON, default=dict)  # {"key", "epoch", "step", "batch"}
    efficiency: Mapped[dict] = mapped_column(JSON, default=dict)  # {"eta", "scaling", "t_single_s", ...}
    message: Mapped[str] = mapped_column(String(2000), default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    fence: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str] = mapped_column(String(200), default="")
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class AttemptRow(Base):
    __tablename__ = "job_attempts"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)   # equals the fence it ran under
    owner: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    device_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    devices: Mapped[int] = mapped_column(Integer, default=1)
    compute_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    energy_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    total_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    energy_kwh: Mapped[float] = mapped_column(Float, default=0.0)
    outcome: Mapped[str] = mapped_column(String(40), default="")
    billed: Mapped[bool] = mapped_column(Boolean, default=False)


class ThroughputRow(Base):
    """Measured training throughput, the basis of the next estimate for the same family and device."""

    __tablename__ = "training_throughput"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    family: Mapped[str] = mapped_column(String(40), index=True)
    device_class: Mapped[str] = mapped_column(String(40))
    precision: Mapped[str] = mapped_column(String(10))
    world_size: Mapped[int] = mapped_column(Integer)
    work_per_second: Mapped[float] = mapped_column(Float)        # sample-parameters per second
    overhead_seconds: Mapped[float] = mapped_column(Float)       # start-up, data loading, registration
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


@dataclass(frozen=True)
class AttemptCost:
    attempt: int
    device_seconds: float
    compute_micros: int
    energy_micros: int
    total_micros: int
    energy_kwh: float
    outcome: str

    def as_cost(self, device_class: str) -> dict:
        return {"total_micros": self.total_micros, "compute_micros": self.compute_micros,
                "energy_micros": self.energy_micros, "device_hours": self.device_seconds / 3600.0,
                "energy_kwh": self.energy_kwh, "device_class": device_class}


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    tenant_id: int
    tenant: str
    state: str
    spec: dict
    device_class: str
    world_size: int
    budget_micros: int
    estimate: dict
    progress: dict
    metrics: dict
    result: dict
    checkpoint: dict
    efficiency: dict
    message: str
    attempts: int
    fence: int
    cancel_requested: bool
    idempotency_key: str
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    attempt_costs: tuple[AttemptCost, ...] = field(default=())

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def cost_micros(self) -> int:
        return sum(a.total_micros for a in self.attempt_costs)

    def total_cost(self) -> dict:
        """Sum over attempts: total/compute/energy micros, device-hours and kWh."""
        return {"total_micros": sum(a.total_micros for a in self.attempt_costs),
                "compute_micros": sum(a.compute_micros for a in self.attempt_costs),
                "energy_micros": sum(a.energy_micros for a in self.attempt_costs),
                "device_hours": sum(a.device_seconds for a in self.attempt_costs) / 3600.0,
                "energy_kwh": sum(a.energy_kwh for a in self.attempt_costs),
                "device_class": self.device_class}


@dataclass(frozen=True)
class Lease:
    """What a worker holds while it runs a job: every write names ``fence``."""

    job: Job
    fence: int
    owner: str
    prior_micros: int   # what earlier attempts of this job already cost


@dataclass(frozen=True)
class Refusal:
    """Why a worker did not take a job (it is done, another attempt holds it, or it gave up)."""

    reason: str


@dataclass
class NewJob:
    kind: str
    tenant_id: int
    tenant: str
    spec: dict
    device_class: str
    world_size: int = 1
    budget_micros: int = 0
    estimate: dict = field(default_factory=dict)
    idempotency_key: str = ""
    total_epochs: int = 0


class JobStore:
    """Jobs, attempts and leases over SQLAlchemy (SQLite locally, PostgreSQL in a cluster)."""

    def __init__(self, sessions: sessionmaker, catalog: PriceCatalog, id_prefix: str = "job",
                 ledger_key: bytes | None = None):
        self._sessions = sessions
        self._entry_ids = ledger.EntryIds(ledger_key)  # config.ledger_id_key(): the deployment's, for every process
        self.sessions = sessions  # for readers of the same database (the tenant budgets)
        self._catalog = catalog
        self._prefix = id_prefix

    # -- the control plane ----------------------------------------------------------------------
    def create(self, new: NewJob) -> tuple[Job, bool]:
        """Insert a QUEUED job; with an idempotency key already used, return that job instead. (job, created)."""
        if new.idempotency_key:
            existing = self.find_by_key(new.tenant_id, new.kind, new.idempotency_key)
            if existing is not None:
                return existing, False
        job_id = f"{self._prefix}-{secrets.token_hex(8)}"
        row = JobRow(id=job_id, kind=new.kind, tenant_id=new.tenant_id, tenant=new.tenant,
                     idempotency_key=new.idempotency_key or None,
                     state=QUEUED, spec=new.spec, device_class=new.device_class, world_size=new.world_size,
                     budget_micros=new.budget_micros, estimate=new.estimate,
                     progress={"epoch": 0, "total_epochs": new.total_epochs, "step": 0})
        try:
            with self._sessions.begin() as s:
                s.add(row)
        except IntegrityError:
            existing = self.find_by_key(new.tenant_id, new.kind, new.idempotency_key) if new.idempotency_key else None
            if existing is None:
                raise
            return existing, False
        return self.get(new.tenant_id, job_id), True

    def find_by_key(self, tenant_id: int, kind: str, key: str) -> Job | None:
        with self._sessions() as s:
            row = s.scalar(select(JobRow).where(JobRow.tenant_id == tenant_id, JobRow.kind == kind,
                                                JobRow.idempotency_key == key))
            return _job(s, row) if row is not None else None

    def get(self, tenant_id: int | None, job_id: str, kind: str | None = None) -> Job:
        """A job by id; another tenant's job (or another kind's) is NOT_FOUND. ``tenant_id`` None: any tenant."""
        with self._sessions() as s:
            row = _row(s, job_id)
            if row is None or (tenant_id is not None and row.tenant_id != tenant_id) or (kind and row.kind != kind):
                raise NotFound(f"job {job_id!r} not found")
            return _job(s, row)

    def list(self, tenant_id: int, kind: str, state: str | None = None, size: int = 0,
             token: str = "") -> tuple[list[Job], str]:
        limit = page_size(size)
        query = select(JobRow).where(JobRow.tenant_id == tenant_id, JobRow.kind == kind)
        if state:
            query = query.where(JobRow.state == state)
        after = decode_token(token)
        if after:
            query = query.where(JobRow.seq < after)
        with self._sessions() as s:
            rows = s.scalars(query.order_by(JobRow.seq.desc()).limit(limit + 1)).all()
            jobs = [_job(s, r) for r in rows[:limit]]
            return jobs, (encode_token(rows[limit - 1].seq) if len(rows) > limit else "")

    def request_cancel(self, tenant_id: int, job_id: str, reason: str) -> Job:
        """A queued job is CANCELLED at once; a running one is asked to stop (its worker checkpoints and ends)."""
        with self._sessions.begin() as s:
            row = _row(s, job_id, lock=True)
            if row is None or row.tenant_id != tenant_id:
                raise NotFound(f"job {job_id!r} not found")
            if row.state in TERMINAL:
                raise FailedPrecondition(f"job {job_id} already ended {row.state}")
            row.cancel_requested = True
            if row.state == QUEUED:
                row.state, row.ended_at = CANCELLED, utcnow()
                row.message = f"cancelled before it started: {reason}" if reason else "cancelled before it started"
            else:
                row.message = f"cancel requested: {reason}" if reason else "cancel requested"
        return self.get(tenant_id, job_id)

    def fail_undispatched(self, job_id: str, message: str) -> None:
        with self._sessions.begin() as s:
            s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.state == QUEUED)
                      .values(state=FAILED, message=message, ended_at=utcnow()))

    def expired_leases(self, grace_seconds: float = 0.0, kind: str | None = None) -> list[Job]:
        """RUNNING jobs (of ``kind``) whose worker stopped renewing its lease (the whole worker died)."""
        cutoff = utcnow() - timedelta(seconds=grace_seconds)
        query = select(JobRow).where(JobRow.state == RUNNING, JobRow.lease_until < cutoff)
        with self._sessions() as s:
            rows = s.scalars(query.where(JobRow.kind == kind) if kind else query).all()
            return [_job(s, r) for r in rows]

    # -- the worker side ------------------------------------------------------------------------
    def acquire(self, job_id: str, owner: str, lease_seconds: float, max_attempts: int,
                holder_gone: Callable[[str], bool] = lambda _: False) -> Lease | Refusal:
        """Take the job for a new attempt (fence + 1), unless it ended, another live attempt holds it, or it
        has used up ``max_attempts`` (then it ends FAILED: a poison job does not loop).

        A live lease is taken over only when ``holder_gone(owner of the lease)`` says its holder is certainly
        dead (a worker on the same node sees that the process is gone); otherwise the job waits for the lease to
        lapse, so a duplicate delivery never runs beside a live attempt."""
        now = utcnow()
        with self._sessions.begin() as s:
            row = _row(s, job_id, lock=True)
            if row is None:
                return Refusal(f"job {job_id} does not exist")
            if row.state in TERMINAL:
                return Refusal(f"job {job_id} already ended {row.state}")
            lease_until = as_utc(row.lease_until)
            if row.state == RUNNING and lease_until and lease_until > now and not holder_gone(row.lease_owner):
                return Refusal(f"job {job_id} is held by {row.lease_owner} until {lease_until.isoformat()}")
            self._close_open_attempts(s, row, "worker lost")
            if row.cancel_requested:
                row.state, row.ended_at = CANCELLED, now
                self._bill(s, row)
                return Refusal(f"job {job_id} was cancelled")
            if row.attempts >= max_attempts:
                row.state, row.ended_at = FAILED, now
                row.message = (f"gave up after {row.attempts} attempts: the worker was lost each time "
                               "(a poison job, or a node that keeps dying)")
                self._bill(s, row)
                return Refusal(row.message)
            row.attempts += 1
            row.fence += 1
            row.state, row.lease_owner = RUNNING, owner
            row.lease_until = now + timedelta(seconds=lease_seconds)
            row.started_at = row.started_at or now
            if row.attempts > 1:
                row.message = f"attempt {row.attempts} (resumed after the worker was lost)"
            s.add(AttemptRow(job_id=job_id, attempt=row.fence, owner=owner, started_at=now, devices=row.world_size))
            s.flush()
            prior = sum(a.total_micros for a in s.scalars(select(AttemptRow).where(
                AttemptRow.job_id == job_id, AttemptRow.attempt != row.fence)))
            return Lease(_job(s, row), row.fence, owner, prior)

    def heartbeat(self, lease: Lease, lease_seconds: float, *, device_seconds: float,
                  progress: dict | None = None, metrics: dict | None = None, checkpoint: dict | None = None,
                  efficiency: dict | None = None) -> tuple[RunCost, bool]:
        """Renew the lease and record progress and this attempt's cost so far.

        Returns (this attempt's cost, cancel requested). Raises :class:`LeaseLost` on a stale fence."""
        cost = run_cost(self._catalog, lease.job.device_class, device_seconds / 3600.0)
        with self._sessions.begin() as s:
            row = self._fenced(s, lease)
            row.lease_until = utcnow() + timedelta(seconds=lease_seconds)
            if progress:
                row.progress = {**row.progress, **progress}
            if metrics:
                row.metrics = {**row.metrics, **metrics}
            if checkpoint:
                row.checkpoint = checkpoint
            if efficiency:
                row.efficiency = {**row.efficiency, **efficiency}
            self._record_attempt_cost(s, lease, device_seconds, cost)
            return cost, row.cancel_requested

    def finish(self, lease: Lease, state: str, *, device_seconds: float, message: str = "",
               result: dict | None = None, metrics: dict | None = None, progress: dict | None = None,
               checkpoint: dict | None = None) -> Job:
        """End the job (fenced) and bill every attempt not billed yet — never more than the job's budget in all:
        the stop before a step that would cross it is a projection, and when the last step still overshoots the
        platform absorbs the difference (the message says how much)."""
        if state not in TERMINAL:
            raise ValueError(f"{state} is not a terminal state")
        cost = run_cost(self._catalog, lease.job.device_class, device_seconds / 3600.0)
        with self._sessions.begin() as s:
            row = self._fenced(s, lease)
            cost, absorbed = self._within_budget(s, lease, cost)
            if absorbed:
                message = f"{message} (the last step overshot the budget by {absorbed} micros: not billed)".strip()
            row.state, row.ended_at, row.message = state, utcnow(), message
            row.lease_until = None
            if result:
                row.result = result
            if metrics:
                row.metrics = {**row.metrics, **metrics}
            if progress:
                row.progress = {**row.progress, **progress}
            if checkpoint:
                row.checkpoint = checkpoint
            attempt = self._record_attempt_cost(s, lease, device_seconds, cost)
            attempt.ended_at, attempt.outcome = utcnow(), state
            self._bill(s, row)
        return self.get(None, lease.job.id)

    def attempts_between(self, owner_prefix: str, start: datetime,
                         end: datetime) -> list[tuple[str, str, str, str, float]]:
        """The attempts whose owner starts with ``owner_prefix`` (a node: ``host/``) that ran within [start, end):
        (job id, tenant, kind, owner, seconds of the window they ran). A worker's fleet report uses it."""
        with self._sessions() as s:
            rows = s.execute(select(AttemptRow.job_id, JobRow.tenant, JobRow.kind, AttemptRow.owner,
                                    AttemptRow.started_at, AttemptRow.ended_at)
                             .join(JobRow, JobRow.id == AttemptRow.job_id)
                             .where(AttemptRow.owner.startswith(owner_prefix, autoescape=True),
                                    AttemptRow.started_at < end,
                                    (AttemptRow.ended_at.is_(None)) | (AttemptRow.ended_at > start))).all()
        out = []
        for job_id, tenant, kind, owner, started, ended in rows:
            ran = (min(end, as_utc(ended) or end) - max(start, as_utc(started))).total_seconds()
            if ran > 0:
                out.append((job_id, tenant, kind, owner, ran))
        return out

    def record_throughput(self, family: str, device_class: str, precision: str, world_size: int,
                          work_per_second: float, overhead_seconds: float) -> None:
        with self._sessions.begin() as s:
            s.add(ThroughputRow(family=family, device_class=device_class, precision=precision,
                                world_size=world_size, work_per_second=work_per_second,
                                overhead_seconds=overhead_seconds))

    def throughput_history(self, family: str, device_class: str, precision: str, world_size: int,
                           limit: int = 20) -> list[tuple[float, float]]:
        """Recent (work per second, overhead seconds) measurements, newest first."""
        with self._sessions() as s:
            rows = s.execute(select(ThroughputRow.work_per_second, ThroughputRow.overhead_seconds).where(
                ThroughputRow.family == family, ThroughputRow.device_class == device_class,
                ThroughputRow.precision == precision, ThroughputRow.world_size == world_size)
                .order_by(ThroughputRow.id.desc()).limit(limit)).all()
            return [(float(a), float(b)) for a, b in rows]

    # -- internals --------------------------------------------------------------------------------
    @staticmethod
    def _fenced(s: Session, lease: Lease) -> JobRow:
        row = _row(s, lease.job.id, lock=True)
        if row is None or row.fence != lease.fence or row.state != RUNNING:
            raise LeaseLost(f"job {lease.job.id}: attempt {lease.fence} no longer holds the job "
                            f"(fence now {row.fence if row else '-'}, state {row.state if row else '-'})")
        return row

    @staticmethod
    def _within_budget(s: Session, lease: Lease, cost: RunCost) -> tuple[RunCost, int]:
        """This attempt's cost capped so that all attempts together stay within the job's budget; and the
        micros absorbed."""
        budget = lease.job.budget_micros
        if not budget:
            return cost, 0
        prior = sum(a.total_micros for a in s.scalars(select(AttemptRow).where(
            AttemptRow.job_id == lease.job.id, AttemptRow.attempt != lease.fence)))
        allowed = max(budget - prior, 0)
        if cost.total_micros <= allowed:
            return cost, 0
        compute = min(cost.compute_micros, allowed)
        return replace(cost, compute_micros=compute, energy_micros=allowed - compute,
                       total_micros=allowed), cost.total_micros - allowed

    @staticmethod
    def _record_attempt_cost(s: Session, lease: Lease, device_seconds: float, cost: RunCost) -> AttemptRow:
        attempt = s.get(AttemptRow, (lease.job.id, lease.fence))
        attempt.device_seconds = device_seconds
        attempt.compute_micros, attempt.energy_micros = cost.compute_micros, cost.energy_micros
        attempt.total_micros, attempt.energy_kwh = cost.total_micros, cost.energy_kwh
        return attempt

    @staticmethod
    def _close_open_attempts(s: Session, row: JobRow, outcome: str) -> None:
        for attempt in s.scalars(select(AttemptRow).where(AttemptRow.job_id == row.id,
                                                          AttemptRow.ended_at.is_(None))):
            attempt.ended_at, attempt.outcome = utcnow(), outcome

    def _bill(self, s: Session, row: JobRow) -> None:
        """One ledger entry per attempt, id ``<kind>:<job>:<attempt>:<keyed digest>`` (idempotent, not guessable),
        in the finishing transaction so a job's cost and the ledger never disagree."""
        attempts = s.scalars(select(AttemptRow).where(AttemptRow.job_id == row.id,
                                                      AttemptRow.billed.is_(False))).all()
        entries = [LedgerEntry(id=self._entry_ids.job_attempt(row.kind, row.tenant_id, row.id, a.attempt),
                               tenant_id=row.tenant_id, category=row.kind,
                               micros=a.total_micros, quantity=round(a.device_seconds * 1000),
                               model=str(row.spec.get("model", "")), version=int(row.result.get("number", 0) or 0),
                               job_id=row.id, description=f"{row.kind} job {row.id} attempt {a.attempt} "
                                                          f"({a.device_seconds:.2f} device-s on {row.device_class})")
                   for a in attempts]
        ledger.append_in(s, entries)
        for a in attempts:
            a.billed = True


def _row(s: Session, job_id: str, lock: bool = False) -> JobRow | None:
    query = select(JobRow).where(JobRow.id == job_id)
    return s.scalar(query.with_for_update() if lock else query)


def _job(s: Session, row: JobRow) -> Job:
    attempts = s.scalars(select(AttemptRow).where(AttemptRow.job_id == row.id).order_by(AttemptRow.attempt)).all()
    return Job(
        id=row.id, kind=row.kind, tenant_id=row.tenant_id, tenant=row.tenant, state=row.state, spec=dict(row.spec),
        device_class=row.device_class, world_size=row.world_size, budget_micros=row.budget_micros,
        estimate=dict(row.estimate or {}), progress=dict(row.progress or {}), metrics=dict(row.metrics or {}),
        result=dict(row.result or {}), checkpoint=dict(row.checkpoint or {}), efficiency=dict(row.efficiency or {}),
        message=row.message, attempts=row.attempts, fence=row.fence, cancel_requested=row.cancel_requested,
        idempotency_key=row.idempotency_key or "", created_at=as_utc(row.created_at),
        started_at=as_utc(row.started_at), ended_at=as_utc(row.ended_at),
        attempt_costs=tuple(AttemptCost(a.attempt, a.device_seconds, a.compute_micros, a.energy_micros,
                                        a.total_micros, a.energy_kwh, a.outcome) for a in attempts))
