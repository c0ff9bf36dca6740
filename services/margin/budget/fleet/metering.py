"""The bill and its allocation, written to the ledger: what :rpc:`ReportFleet` does with a fleet observer's report.

For each pool in a report (one metering interval), in one transaction:

1. the interval is claimed (:class:`~margin.budget.fleet.tables.FleetIntervalRow`'s key: pool and start) — a
   second gateway reporting the same pool interval finds it taken and bills nothing again, but adds the requests it
   served (each gateway counts its own: zero-micro ``serving`` entries carrying them, and their revenue); a retried
   report of the same observer (:class:`~margin.budget.fleet.tables.FleetObservationRow`) changes nothing;
2. the bill — live replica time × the device class's price — is a ``fleet`` entry on the platform's line;
3. it is allocated (:mod:`margin.budget.fleet.allocation`): serving pools to their deployments' tenants as
   ``serving`` entries (quantity: the requests served through the gateway), by Triton's compute time and the idle
   policy; worker pools to the jobs that ran (``jobs`` entries on the platform's line: the tenants pay those
   through their jobs' own entries); what no one pays is the platform's ``idle`` entry. The entries sum to the
   bill to the micro; fractions of a micro are carried per party;
4. requests served through the gateway become ``revenue`` entries of their tenant at its price list;
5. serving reports refresh the deployments the autoscaler plans for.

Every entry is dated at the interval's end, and its id (``fleet:``, ``alloc:``, ``idle:``, ``jobs:``, ``revenue:``
and a digest of pool, interval and party keyed with the deployment's ledger id key,
:class:`~margin.common.ledger.EntryIds`) is one that no other writer may use, nor compute before it is written.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from margin.budget.fleet import prices, views
from margin.budget.fleet.allocation import PLATFORM, POLICIES, Consumer, allocate, split_exact
from margin.budget.fleet.tables import FleetCarryRow, FleetIntervalRow, FleetObservationRow, ServingDeploymentRow
from margin.common.costs import PriceCatalog, UnknownDeviceClass, format_money
from margin.common.errors import InvalidArgument
from margin.common.ledger import EntryIds, LedgerEntry, append_in
from margin.common.names import validate_name, validate_text
from margin.common.tenancy import TenantStore, utcnow

log = logging.getLogger(__name__)

KINDS = ("serving", "worker")
STATES = ("READY", "LOADING", "SCALED_TO_ZERO", "UNLOADED")  # UNLOADED: undeployed in the interval, still billed
MAX_INTERVAL_S = 3600
MAX_REPLICAS = 10_000
MAX_INSTANCES = 64          # model instances busy at once on one replica: compute time beyond this is not possible
MAX_REQUESTS = 10**12       # per deployment per interval
BILL = "__bill__"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class DeploymentUsage:
    tenant: str
    deployment: str
    model: str
    version: int
    triton_name: str
    state: str
    device_class: str
    compute_ns: int = 0
    executions: int = 0
    inferences: int = 0
    gateway_requests: int = 0
    reserved_replica_us: int = 0
    min_replicas: int = 1
    max_replicas: int = 1
    capacity_rps: float = 0.0
    price_micros_per_hour: int = 0


@dataclass(frozen=True)
class JobUsage:
    tenant: str
    job_id: str
    kind: str
    busy_us: int


@dataclass(frozen=True)
class PoolReport:
    pool: str
    kind: str
    device_class: str
    replica: str = ""
    replica_us: int = 0
    replicas: int = 0
    deployments: tuple[DeploymentUsage, ...] = ()
    jobs: tuple[JobUsage, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.pool}/{self.replica}" if self.replica else self.pool


@dataclass(frozen=True)
class Allocated:
    """What a deployment was allocated of a pool interval billed now, and the Triton requests it served there."""
    tenant: str
    deployment: str
    micros: int
    inferences: int


@dataclass(frozen=True)
class FleetReport:
    start: datetime
    end: datetime
    pools: tuple[PoolReport, ...]
    observer: str = ""
    snapshot_only: bool = False


def micros_of(moment: datetime) -> int:
    delta = moment.astimezone(UTC) - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


class FleetMeter:
    """Turns fleet reports into the bill, its allocation and revenue in the ledger (see the module docstring)."""

    def __init__(self, sessions: sessionmaker, tenants: TenantStore, catalog: PriceCatalog, policy: str = "usage",
                 clock=utcnow, ledger_key: bytes | None = None):
        if policy not in POLICIES:
            raise ValueError(f"idle policy must be one of {list(POLICIES)}, got {policy!r}")
        self._sessions, self._tenants, self._catalog, self._clock = sessions, tenants, catalog, clock
        self._ids = EntryIds(ledger_key)  # config.ledger_id_key(): every replica of the service shares it
        self.policy = policy
        self.platform_id = tenants.ensure_platform()

    # -- a report ----------------------------------------------------------------------------------------------
    def report(self, report: FleetReport) -> tuple[int, int, list[Allocated]]:
        """Bill and allocate every pool of ``report``; returns (pool intervals billed, already billed, what each
        deployment was allocated of the intervals billed now)."""
        self._check(report)
        names = {name: tid for tid, name in self._tenants.names().items()}
        unknown = sorted({u.tenant for p in report.pools for u in (*p.deployments, *p.jobs)} - set(names))
        if unknown:
            raise InvalidArgument(f"unknown tenants in the fleet report: {unknown}")
        serving = [p for p in report.pools if p.kind == "serving"]
        if serving or report.snapshot_only:
            self._refresh_deployments([d for p in serving for d in p.deployments], names)
        if report.snapshot_only:
            return 0, 0, []
        billed = duplicates = 0
        allocated: list[Allocated] = []
        for pool in report.pools:
            outcome = self._take(report, pool, names)
            if isinstance(outcome, list):
                billed += 1
                allocated.extend(outcome)
            else:
                duplicates += 1
        return billed, duplicates, allocated

    def _take(self, report: FleetReport, pool: PoolReport, names: dict[str, int]) -> list[Allocated] | str:
        """Bill one pool interval (the allocations), or — billed by another observer before — add this observer's
        requests ("requests"), or nothing for a retry ("retry")."""
        start_us = micros_of(report.start)
        for _ in range(2):  # two observers racing to bill one interval: the loser adds its requests on a second try
            try:
                with self._sessions.begin() as s:
                    s.add(FleetObservationRow(pool_key=pool.key, start_us=start_us, observer=report.observer[:200]))
                    s.flush()  # IntegrityError: this observer reported this interval before (a retry)
                    if s.get(FleetIntervalRow, (pool.key, start_us)) is None:
                        return self._bill(s, report, pool, names)
                    self._requests_only(s, report, pool, names)
                    return "requests"
            except IntegrityError:
                with self._sessions() as s:
                    if s.get(FleetObservationRow, (pool.key, start_us, report.observer[:200])) is not None:
                        return "retry"
        return "retry"

    def _check(self, report: FleetReport) -> None:
        if report.end <= report.start:
            raise InvalidArgument("interval_end must be after interval_start")
        length = (report.end - report.start).total_seconds()
        if not report.snapshot_only:
            if length > MAX_INTERVAL_S:
                raise InvalidArgument(f"a metering interval is at most {MAX_INTERVAL_S} s, this one is {length:.0f} s")
            if report.end > self._clock() + timedelta(minutes=5):
                raise InvalidArgument("interval_end is in the future")
        deployments: set[tuple[str, str]] = set()
        triton_names: set[str] = set()
        for pool in report.pools:
            if pool.kind not in KINDS:
                raise InvalidArgument(f"pool {pool.pool!r}: kind must be one of {list(KINDS)}")
            if not pool.pool or len(pool.key) > 240:
                raise InvalidArgument("every pool needs a name (with its replica, at most 240 characters)")
            validate_text(pool.key, "pool")
            if pool.kind == "worker" and not pool.replica:
                raise InvalidArgument(f"worker pool {pool.pool!r}: name the reporting replica")
            try:
                self._catalog.device(pool.device_class)
            except UnknownDeviceClass as err:
                raise InvalidArgument(f"pool {pool.pool!r}: {err}") from None
            if not 0 <= pool.replica_us <= length * 1e6 * MAX_REPLICAS or not 0 <= pool.replicas <= MAX_REPLICAS:
                raise InvalidArgument(f"pool {pool.pool!r}: replica time {pool.replica_us} µs is not possible in a "
                                      f"{length:.1f} s interval")
            for d in pool.deployments:
                if (d.tenant, d.deployment) in deployments or d.triton_name in triton_names:
                    raise InvalidArgument(f"pool {pool.pool!r}: deployment {d.deployment!r} is reported twice")
                deployments.add((d.tenant, d.deployment))
                triton_names.add(d.triton_name)
                validate_name(d.model, "deployment model")
                for what, value in (("deployment", d.deployment), ("triton_name", d.triton_name)):
                    validate_text(value, f"pool {pool.pool!r}: {what}")
                if not d.deployment or len(d.deployment) > 200 or not d.triton_name or len(d.triton_name) > 250:
                    raise InvalidArgument(f"pool {pool.pool!r}: a deployment needs a name and a Triton name")
                if d.device_class and d.device_class not in self._catalog.devices:
                    raise InvalidArgument(f"deployment {d.deployment!r}: unknown device class {d.device_class!r}")
                if d.state not in STATES:
                    raise InvalidArgument(f"deployment {d.deployment!r}: state must be one of {list(STATES)}")
                if min(d.compute_ns, d.executions, d.inferences, d.gateway_requests, d.reserved_replica_us,
                       d.min_replicas, d.max_replicas, d.price_micros_per_hour) < 0 \
                        or not 0 <= d.capacity_rps < float("inf"):
                    raise InvalidArgument(f"deployment {d.deployment!r}: counts and times are never negative, and "
                                          "capacity_rps is a finite number")
                if d.compute_ns > length * 1e9 * MAX_REPLICAS * MAX_INSTANCES \
                        or d.reserved_replica_us > length * 1e6 * MAX_REPLICAS \
                        or max(d.executions, d.inferences, d.gateway_requests) > MAX_REQUESTS:
                    raise InvalidArgument(f"deployment {d.deployment!r}: its compute time, reserved time or counts are "
                                          f"not possible in a {length:.1f} s interval")
            for j in pool.jobs:
                if not 0 <= j.busy_us <= length * 1e6 or not j.job_id or len(j.job_id) > 100:
                    raise InvalidArgument(f"pool {pool.pool!r}: a job needs an id and a busy time within the interval")

    # -- the bill ----------------------------------------------------------------------------------------------
    def _bill(self, s: Session, report: FleetReport, pool: PoolReport, names: dict[str, int]) -> list[Allocated]:
        start_us, end_us = micros_of(report.start), micros_of(report.end)
        price = self._catalog.device(pool.device_class).micros_per_hour
        s.add(FleetIntervalRow(pool_key=pool.key, start_us=start_us, end_us=end_us, pool=pool.pool, kind=pool.kind,
                               device_class=pool.device_class, replicas=pool.replicas, replica_us=pool.replica_us,
                               price_micros_per_hour=price, policy=self.policy, observer=report.observer[:200],
                               ended_at=report.end))
        s.flush()  # claims the interval now: IntegrityError when it was billed before
        carries = self._carries(s, pool.key)
        if pool.kind == "serving":
            parties = {f"{names[d.tenant]}/{d.deployment}": d for d in pool.deployments}
            consumers = [Consumer(k, d.compute_ns, d.reserved_replica_us) for k, d in parties.items()]
            policy = self.policy
        else:
            parties = {f"job/{names[j.tenant]}/{j.job_id}": j for j in pool.jobs}
            consumers = [Consumer(k, j.busy_us * 1000) for k, j in parties.items()]
            policy = "platform"
        bill_carry = carries.pop(BILL, Fraction(0))
        revenue_carries = {k: v for k, v in carries.items() if k.startswith("revenue/")}
        result = allocate(pool.replica_us, price, consumers, policy,
                          {k: v for k, v in carries.items() if k not in revenue_carries}, bill_carry)
        at = report.end
        interval = f"{(end_us - start_us) / 1e6:.1f} s"
        entries = [LedgerEntry(
            id=self._ids.keyed("fleet", pool.key, start_us), tenant_id=self.platform_id, category="fleet",
            micros=result.bill, quantity=pool.replica_us, deployment=pool.pool[:200], created_at=at,
            description=f"{pool.key} ({pool.device_class}): {pool.replica_us / 1e6:.2f} replica-s of {interval} × "
                        f"{format_money(price)}/h")]
        allocated = 0
        for key, usage in parties.items():
            micros = result.micros[key]
            allocated += micros
            entries.extend(self._party_entries(pool, start_us, key, usage, micros, names, result.basis, at))
        idle = result.micros[PLATFORM]
        if idle:
            entries.append(LedgerEntry(
                id=self._ids.keyed("idle", pool.key, start_us), tenant_id=self.platform_id, category="idle",
                micros=idle, deployment=pool.pool[:200], created_at=at,
                description=f"{pool.key}: what no tenant pays of {interval} ({policy} policy, split by "
                            f"{result.basis})"))
        revenue, next_revenue = self._revenue(s, pool, start_us, names, revenue_carries, at)
        entries.extend(revenue)
        append_in(s, entries)
        self._replace_allocation_carries(s, pool.key, {**result.carries, BILL: result.bill_carry})
        self._upsert_carries(s, pool.key, next_revenue)
        row = s.get(FleetIntervalRow, (pool.key, start_us))
        row.bill_micros, row.allocated_micros, row.idle_micros = result.bill, allocated, idle
        row.revenue_micros = sum(e.micros for e in revenue)
        row.used_ns = min(sum(c.compute_ns for c in consumers), 2**63 - 1)  # a BIGINT
        row.basis = result.basis
        return [Allocated(u.tenant, u.deployment, result.micros[k], u.inferences) for k, u in parties.items()
                if isinstance(u, DeploymentUsage)]

    def _party_entries(self, pool: PoolReport, start_us: int, key: str, usage, micros: int, names: dict[str, int],
                       basis: str, at: datetime) -> list[LedgerEntry]:
        if isinstance(usage, JobUsage):
            if not micros:
                return []
            return [LedgerEntry(
                id=self._ids.keyed("jobs", pool.key, start_us, key), tenant_id=self.platform_id, category="jobs",
                micros=micros, quantity=usage.busy_us, job_id=usage.job_id, created_at=at,
                description=f"{pool.key}: {usage.busy_us / 1e6:.2f} s of {usage.tenant}'s {usage.kind} job "
                            f"{usage.job_id} (billed to it by the job's own entries)")]
        if not micros and not usage.gateway_requests:
            return []
        return [LedgerEntry(
            id=self._ids.keyed("alloc", pool.key, start_us, key), tenant_id=names[usage.tenant], category="serving",
            micros=micros, quantity=usage.gateway_requests, model=usage.model, version=usage.version,
            deployment=usage.deployment, created_at=at,
            description=f"{pool.pool}: {usage.compute_ns / 1e9:.4f} s Triton compute ({usage.inferences} "
                        f"inferences), {usage.reserved_replica_us / 1e6:.1f} reserved replica-s; split by {basis}")]

    def _revenue(self, s: Session, pool: PoolReport, start_us: int, names: dict[str, int],
                 carries: dict[str, Fraction], at: datetime, suffix: str = "") \
            -> tuple[list[LedgerEntry], dict[str, Fraction]]:
        """Requests served through the gateway at their tenant's price list, fractions of a micro carried."""
        entries, next_carries = [], dict(carries)
        for d in pool.deployments:
            if not d.gateway_requests:
                continue
            tenant_id = names[d.tenant]
            per_million = prices.price_for(s, tenant_id, d.model)
            if per_million is None:
                continue
            party = f"revenue/{tenant_id}/{d.deployment}"
            micros, next_carries[party] = split_exact(Fraction(d.gateway_requests * per_million, 1_000_000),
                                                      carries.get(party, Fraction(0)))
            if micros:
                entries.append(LedgerEntry(
                    id=self._ids.keyed("revenue", pool.key, start_us, party + suffix), tenant_id=tenant_id,
                    category="revenue", micros=micros, quantity=d.gateway_requests, model=d.model, version=d.version,
                    deployment=d.deployment, created_at=at,
                    description=f"{d.gateway_requests} requests at {format_money(per_million)} per million"))
        return entries, next_carries

    # -- carries -----------------------------------------------------------------------------------------------
    @staticmethod
    def _carries(s: Session, pool_key: str) -> dict[str, Fraction]:
        rows = s.scalars(select(FleetCarryRow).where(FleetCarryRow.pool_key == pool_key)).all()
        return {r.party: Fraction(int(r.numerator), int(r.denominator)) for r in rows}

    @staticmethod
    def _replace_allocation_carries(s: Session, pool_key: str, carries: dict[str, Fraction]) -> None:
        """The bill's and every allocation party's carry, replacing the last interval's (a party gone has handed
        its carry to the platform)."""
        s.execute(delete(FleetCarryRow).where(FleetCarryRow.pool_key == pool_key,
                                              FleetCarryRow.party.not_like("revenue/%")))
        FleetMeter._add_carries(s, pool_key, carries)

    @staticmethod
    def _upsert_carries(s: Session, pool_key: str, carries: dict[str, Fraction]) -> None:
        s.execute(delete(FleetCarryRow).where(FleetCarryRow.pool_key == pool_key,
                                              FleetCarryRow.party.in_([p[:250] for p in carries])))
        FleetMeter._add_carries(s, pool_key, carries)

    @staticmethod
    def _add_carries(s: Session, pool_key: str, carries: dict[str, Fraction]) -> None:
        s.add_all(FleetCarryRow(pool_key=pool_key, party=party[:250], numerator=str(value.numerator),
                                denominator=str(value.denominator))
                  for party, value in carries.items() if value)

    def _requests_only(self, s: Session, report: FleetReport, pool: PoolReport, names: dict[str, int]) -> None:
        """Another observer billed this pool interval: add the requests this one served through its gateway (as
        zero-micro serving entries) and their revenue; the bill and its allocation stand."""
        start_us, at, observer = micros_of(report.start), report.end, report.observer[:200]
        entries = [LedgerEntry(
            id=self._ids.keyed("alloc", pool.key, start_us, f"{names[d.tenant]}/{d.deployment}@{observer}"),
            tenant_id=names[d.tenant], category="serving", micros=0, quantity=d.gateway_requests, model=d.model,
            version=d.version, deployment=d.deployment, created_at=at,
            description=f"{pool.pool}: {d.gateway_requests} requests through another gateway ({observer}); the "
                        "interval's cost is on the first report's entry")
            for d in pool.deployments if d.gateway_requests]
        carries = {k: v for k, v in self._carries(s, pool.key).items() if k.startswith("revenue/")}
        revenue, next_revenue = self._revenue(s, pool, start_us, names, carries, at, suffix=f"@{observer}")
        append_in(s, entries + revenue)
        self._upsert_carries(s, pool.key, next_revenue)
        row = s.get(FleetIntervalRow, (pool.key, start_us))
        row.revenue_micros += sum(e.micros for e in revenue)

    # -- the autoscaler's view ---------------------------------------------------------------------------------
    def _refresh_deployments(self, deployments: Iterable[DeploymentUsage], names: dict[str, int]) -> None:
        current = {d.triton_name: d for d in deployments if d.state != "UNLOADED"}
        with self._sessions.begin() as s:
            rows = {r.triton_name: r for r in s.scalars(select(ServingDeploymentRow))}
            for name, row in rows.items():
                if name not in current:
                    s.delete(row)
            s.flush()
            for name, d in current.items():
                row = rows.get(name)
                if row is None:
                    row = ServingDeploymentRow(triton_name=name, tenant_id=names[d.tenant], name=d.deployment)
                    s.add(row)
                row.model, row.version, row.state, row.device_class = d.model, d.version, d.state, d.device_class
                row.min_replicas, row.max_replicas = d.min_replicas, d.max_replicas
                row.capacity_rps, row.price_micros_per_hour = d.capacity_rps, d.price_micros_per_hour

    # -- reading it back ---------------------------------------------------------------------------------------
    def fleet_view(self, since: datetime, until: datetime) -> views.FleetView:
        return views.fleet_view(self._sessions, self.platform_id, self._tenants.names(), since, until, self.policy)

    def margin_view(self, tenant_id: int | None, since: datetime, until: datetime) -> views.MarginView:
        return views.margin_view(self._sessions, self.platform_id, self._tenants.names(), since, until, tenant_id)

    def set_prices(self, tenant_id: int, entries: list[prices.Price]) -> list[prices.Price]:
        return prices.set_prices(self._sessions, tenant_id, entries)

    def prices(self, tenant_id: int) -> list[prices.Price]:
        return prices.get_prices(self._sessions, tenant_id)
