"""margin.v1 budget messages <-> the budget core's dataclasses."""
from __future__ import annotations

from datetime import datetime

from margin.budget.autoscaler.planner import Plan
from margin.budget.fleet import prices, views
from margin.budget.fleet.metering import DeploymentUsage, FleetReport, JobUsage, PoolReport
from margin.budget.store import DEFAULT_THRESHOLDS, Budget, Spend, SpendLine
from margin.common import protoconv
from margin.common.errors import InvalidArgument
from margin.common.ledger import LedgerEntry, LedgerRow
from margin.common.tenancy import ApiKeyInfo, Tenant, as_utc
from margin.v1 import budget_pb2

PERIOD_TO_PROTO = {"daily": budget_pb2.BUDGET_PERIOD_DAILY, "monthly": budget_pb2.BUDGET_PERIOD_MONTHLY}
PERIOD_FROM_PROTO = {v: k for k, v in PERIOD_TO_PROTO.items()}
SPEND_CATEGORY_TO_PROTO = {"training": budget_pb2.SPEND_CATEGORY_TRAINING,
                           "compression": budget_pb2.SPEND_CATEGORY_COMPRESSION,
                           "serving": budget_pb2.SPEND_CATEGORY_SERVING}
CATEGORY_TO_PROTO = {**SPEND_CATEGORY_TO_PROTO, "fleet": budget_pb2.SPEND_CATEGORY_FLEET,
                     "idle": budget_pb2.SPEND_CATEGORY_IDLE, "jobs": budget_pb2.SPEND_CATEGORY_JOBS,
                     "revenue": budget_pb2.SPEND_CATEGORY_REVENUE}
SPEND_CATEGORY_FROM_PROTO = {v: k for k, v in SPEND_CATEGORY_TO_PROTO.items()}
CATEGORY_FROM_PROTO = {v: k for k, v in CATEGORY_TO_PROTO.items()}
POLICY_TO_PROTO = {"reject": budget_pb2.EXHAUSTED_POLICY_REJECT, "degrade": budget_pb2.EXHAUSTED_POLICY_DEGRADE,
                   "throttle": budget_pb2.EXHAUSTED_POLICY_THROTTLE}
POLICY_FROM_PROTO = {**{v: k for k, v in POLICY_TO_PROTO.items()}, budget_pb2.EXHAUSTED_POLICY_UNSPECIFIED: "reject"}


def category(value: int, what: str = "category") -> str:
    """A spend category (what budgets limit and RecordSpend records)."""
    if value not in SPEND_CATEGORY_FROM_PROTO:
        raise InvalidArgument(f"{what}: set a spend category (training, compression or serving)")
    return SPEND_CATEGORY_FROM_PROTO[value]


def ledger_category(value: int) -> str:
    """A ListLedger filter: any category of the ledger, or none (0)."""
    if value and value not in CATEGORY_FROM_PROTO:
        raise InvalidArgument(f"category {value} is not a ledger category")
    return CATEGORY_FROM_PROTO.get(value, "")


def budget_from_proto(msg: budget_pb2.Budget, tenant_id: int, webhook_secret: str) -> Budget:
    if msg.period not in PERIOD_FROM_PROTO:
        raise InvalidArgument("budget.period: DAILY or MONTHLY")
    if msg.exhausted_policy not in POLICY_FROM_PROTO:
        raise InvalidArgument(f"budget.exhausted_policy {msg.exhausted_policy} is not a policy")
    limits: dict[str, int] = {}
    for line in msg.category_limits:
        name = category(line.category, "budget.category_limits.category")
        if name in limits:
            raise InvalidArgument(f"budget.category_limits: {name} is given twice")
        limits[name] = line.limit.micros
    return Budget(tenant_id=tenant_id, period=PERIOD_FROM_PROTO[msg.period], total_micros=msg.total.micros,
                  category_limits=limits, policy=POLICY_FROM_PROTO[msg.exhausted_policy],
                  thresholds=tuple(msg.alert_thresholds) or DEFAULT_THRESHOLDS, webhook_url=msg.webhook_url,
                  webhook_secret=webhook_secret, currency=msg.total.currency or "USD")


def budget_to_proto(b: Budget, tenant: str, spend: Spend | None = None) -> budget_pb2.Budget:
    msg = budget_pb2.Budget(
        tenant=tenant, period=PERIOD_TO_PROTO[b.period], total=protoconv.money(b.total_micros, b.currency),
        category_limits=[budget_pb2.CategoryLimit(category=CATEGORY_TO_PROTO[c], limit=protoconv.money(m, b.currency))
                         for c, m in sorted(b.category_limits.items())],
        exhausted_policy=POLICY_TO_PROTO[b.policy], alert_thresholds=list(b.thresholds), webhook_url=b.webhook_url)
    if spend is not None:
        msg.period_start.CopyFrom(protoconv.timestamp(spend.period_start))
        msg.period_end.CopyFrom(protoconv.timestamp(spend.period_end))
    return msg


def _line(line: SpendLine, currency: str) -> budget_pb2.SpendLine:
    msg = budget_pb2.SpendLine(key=line.key, category=CATEGORY_TO_PROTO.get(line.category, 0),
                               amount=protoconv.money(line.micros, currency), entries=line.entries)
    if line.limit_micros is not None:
        msg.limit.CopyFrom(protoconv.money(line.limit_micros, currency))
    return msg


def spend_to_proto(spend: Spend, tenant: str) -> budget_pb2.SpendReport:
    currency = spend.budget.currency if spend.budget else "USD"
    msg = budget_pb2.SpendReport(
        spent=protoconv.money(spend.spent_micros, currency),
        projected_end_of_period=protoconv.money(spend.projected_micros, currency),
        by_category=[_line(x, currency) for x in spend.by_category],
        by_model=[_line(x, currency) for x in spend.by_model],
        by_deployment=[_line(x, currency) for x in spend.by_deployment],
        burn_per_hour=protoconv.money(spend.burn_micros_per_hour, currency))
    if spend.budget is not None:
        msg.budget.CopyFrom(budget_to_proto(spend.budget, tenant, spend))
        msg.remaining.CopyFrom(protoconv.money(spend.remaining_micros, currency))
    return msg


def entry_to_proto(row: LedgerRow, tenant: str) -> budget_pb2.LedgerEntry:
    return budget_pb2.LedgerEntry(
        id=row.id, tenant=tenant, category=CATEGORY_TO_PROTO[row.category],
        amount=protoconv.money(row.micros, row.currency), model=row.model, version=row.version,
        deployment=row.deployment, job_id=row.job_id, description=row.description, quantity=row.quantity,
        time=protoconv.timestamp(as_utc(row.created_at)))


# One ledger entry's ceilings: a billion in the currency, and as many units (µs, inferences); the period sums of a
# tenant's entries are 64-bit integers in the database (an overflow there would break every later GetSpend).
MAX_ENTRY_MICROS = 10**15
MAX_ENTRY_QUANTITY = 10**15


def entry_from_proto(msg: budget_pb2.LedgerEntry, tenant_id: int) -> LedgerEntry:
    if not msg.id or len(msg.id) > 100:
        raise InvalidArgument("entry.id: every entry needs an id (1–100 characters) chosen by the writer")
    if msg.amount.micros < 0:
        raise InvalidArgument(f"entry {msg.id}: amounts are never negative")
    if msg.amount.micros > MAX_ENTRY_MICROS or not 0 <= msg.quantity <= MAX_ENTRY_QUANTITY:
        raise InvalidArgument(f"entry {msg.id}: amount.micros must be at most {MAX_ENTRY_MICROS} and quantity "
                              f"between 0 and {MAX_ENTRY_QUANTITY} (the ledger's sums must stay within 64 bits)")
    fields = {"created_at": protoconv.time_from_proto(msg.time, f"entry {msg.id}.time")} if msg.HasField("time") else {}
    return LedgerEntry(id=msg.id, tenant_id=tenant_id, category=category(msg.category, f"entry {msg.id}.category"),
                       micros=msg.amount.micros, quantity=msg.quantity, model=msg.model, version=msg.version,
                       deployment=msg.deployment, job_id=msg.job_id, description=msg.description[:300],
                       currency=msg.amount.currency or "USD", **fields)


def plan_to_proto(plan: Plan) -> budget_pb2.ScalingPlan:
    msg = budget_pb2.ScalingPlan(
        deployment=plan.deployment, current_replicas=plan.current, demand_replicas=plan.demand,
        affordable_replicas=-1 if plan.affordable is None else plan.affordable, min_replicas=plan.minimum,
        chosen_replicas=plan.chosen, reason=plan.reason, price_per_replica_hour=protoconv.money(
            plan.price_micros_per_hour), hours_left_in_period=plan.hours_left, observed_rps=plan.observed_rps,
        capacity_rps_per_replica=plan.capacity_rps, queue_time_us_per_request=plan.queue_us_per_request,
        target_kind=plan.target_kind, applied=plan.applied, time=protoconv.timestamp(plan.at), state=plan.state)
    if plan.remaining_micros is not None:
        msg.remaining_serving_budget.CopyFrom(protoconv.money(plan.remaining_micros))
    return msg


# -- the fleet -----------------------------------------------------------------------------------------------------
def fleet_report_from_proto(msg: budget_pb2.ReportFleetRequest) -> FleetReport:
    if not msg.HasField("interval_start") or not msg.HasField("interval_end"):
        raise InvalidArgument("a fleet report needs interval_start and interval_end")
    pools = tuple(PoolReport(
        pool=p.pool, kind=p.kind, device_class=p.device_class, replica=p.replica, replica_us=p.replica_us,
        replicas=p.replicas,
        deployments=tuple(DeploymentUsage(
            tenant=d.tenant, deployment=d.deployment, model=d.model, version=d.version, triton_name=d.triton_name,
            state=d.state, device_class=d.device_class or p.device_class, compute_ns=d.compute_ns,
            executions=d.executions, inferences=d.inferences, gateway_requests=d.gateway_requests,
            reserved_replica_us=d.reserved_replica_us, min_replicas=d.min_replicas, max_replicas=d.max_replicas,
            capacity_rps=d.capacity_rps, price_micros_per_hour=d.price_micros_per_hour) for d in p.deployments),
        jobs=tuple(JobUsage(j.tenant, j.job_id, j.kind, j.busy_us) for j in p.jobs)) for p in msg.pools)
    return FleetReport(protoconv.time_from_proto(msg.interval_start, "interval_start"),
                       protoconv.time_from_proto(msg.interval_end, "interval_end"), pools,
                       msg.observer, msg.snapshot_only)


def fleet_view_to_proto(view: views.FleetView, currency: str = "USD") -> budget_pb2.FleetView:
    def m(micros: int):
        return protoconv.money(micros, currency)

    return budget_pb2.FleetView(
        pools=[budget_pb2.FleetPoolLine(
            pool=p.pool, kind=p.kind, device_class=p.device_class, replica_seconds=p.replica_seconds,
            price_per_hour=m(p.price_micros_per_hour), bill=m(p.bill_micros), allocated=m(p.allocated_micros),
            idle=m(p.idle_micros), utilization=p.utilization, intervals=p.intervals, replicas=p.replicas)
            for p in view.pools],
        bill=m(view.bill_micros), tenants=m(view.tenants_micros), jobs=m(view.jobs_micros),
        platform_idle=m(view.idle_micros), balanced=view.balanced, idle_policy=view.policy,
        by_tenant=[budget_pb2.SpendLine(key=t, category=budget_pb2.SPEND_CATEGORY_SERVING, amount=m(micros),
                                        entries=n) for t, micros, n in view.by_tenant])


def margin_view_to_proto(view: views.MarginView, currency: str = "USD") -> budget_pb2.MarginView:
    def m(micros: int):
        return protoconv.money(micros, currency)

    msg = budget_pb2.MarginView(
        lines=[budget_pb2.MarginLine(tenant=x.tenant, model=x.model, requests=x.requests, revenue=m(x.revenue_micros),
                                     cost=m(x.cost_micros), gross_margin=m(x.margin_micros)) for x in view.lines],
        revenue=m(view.revenue_micros), cost=m(view.cost_micros),
        gross_margin=m(view.revenue_micros - view.cost_micros), has_price_list=view.has_price_list,
        series=[budget_pb2.MarginPoint(time=protoconv.timestamp(t), cost=m(c), revenue=m(r))
                for t, c, r in view.series])
    if view.platform_idle_micros is not None:
        msg.platform_idle.CopyFrom(m(view.platform_idle_micros))
    return msg


def window_from_proto(msg: budget_pb2.GetSpendRequest) -> tuple[datetime | None, datetime | None]:
    since, until = protoconv.optional_time(msg, "since"), protoconv.optional_time(msg, "until")
    if since and until and until <= since:
        raise InvalidArgument("until must be after since")
    return since, until


def prices_from_proto(msg: budget_pb2.PriceList) -> list[prices.Price]:
    entries = []
    for e in msg.entries:
        currency = {c for c in (e.per_million.currency, e.per_request.currency) if c} or {"USD"}
        if len(currency) > 1:
            raise InvalidArgument(f"price_list: {e.model or 'every model'} is priced in two currencies")
        if e.per_million.micros < 0 or e.per_request.micros < 0:
            raise InvalidArgument(f"price_list: the price of {e.model or 'every model'} is negative")
        if e.per_request.micros > prices.MAX_MICROS_PER_MILLION // 1_000_000:
            raise InvalidArgument(f"price_list: the per-request price of {e.model or 'every model'} is too large")
        entries.append(prices.Price(e.model, e.per_million.micros + e.per_request.micros * 1_000_000,
                                    currency.pop()))
    return entries


def prices_to_proto(tenant: str, entries: list[prices.Price]) -> budget_pb2.PriceList:
    return budget_pb2.PriceList(tenant=tenant, entries=[budget_pb2.PriceListEntry(
        model=p.model, per_million=protoconv.money(p.micros_per_million, p.currency)) for p in entries])


# -- tenants and keys ----------------------------------------------------------------------------------------------
def tenant_to_proto(tenant: Tenant) -> budget_pb2.Tenant:
    return budget_pb2.Tenant(name=tenant.name, create_time=protoconv.timestamp(tenant.created_at),
                             disable_time=protoconv.timestamp(tenant.disabled_at))


def api_key_to_proto(info: ApiKeyInfo) -> budget_pb2.ApiKey:
    """A key's public facts (never its secret or hash)."""
    return budget_pb2.ApiKey(id=info.id, tenant=info.tenant, description=info.description,
                             create_time=protoconv.timestamp(info.created_at),
                             expire_time=protoconv.timestamp(info.expires_at),
                             revoke_time=protoconv.timestamp(info.revoked_at))
